"""RoomTransport: what a ClientSession needs from its connection, and the WebSocket one.

A session speaks the same protocol over every transport (docs/protocol.md); only framing, the
close signal and the size cap differ. The HTTP fallback transport is in httpstream.py.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Protocol

from starlette.websockets import WebSocket, WebSocketDisconnect

from lotcast.interactive import frameguard
from lotcast.interactive.outbox import DirectWrite, abort_transport, direct_writer
from lotcast.interactive.protocol import CloseCode

CLOSE_WITHIN = 1.0  # seconds a close gets before the connection is aborted


class TransportKind(enum.Enum):
    WEBSOCKET = "websocket"
    HTTP = "http"


class TransportClosed(Exception):
    """The peer went away (or the transport ended); nothing more will be received."""


@dataclass(frozen=True)
class Inbound:
    """One client message as the transport delivered it.

    `data` None without `oversize`: a frame the protocol refuses unread (a text frame).
    `oversize`: a message over the transport cap (the transport's description); `fatal` when the
    transport cannot go on reading after it (a WebSocket), else only that message is refused."""

    data: bytes | None = None
    oversize: str | None = None
    fatal: bool = False


class RoomTransport(Protocol):
    kind: TransportKind

    @property
    def direct(self) -> DirectWrite | None:
        """A synchronous writer for the hub's fan-out, if the transport has one."""

    @property
    def token_param(self) -> str | None: ...

    @property
    def transport_cap(self) -> int | None: ...

    async def accept(self) -> None: ...

    async def receive(self) -> Inbound:
        """The next client message; raises TransportClosed once the peer is gone."""
        ...

    async def send(self, data: bytes) -> None:
        """One server frame (one or more msgpack maps back to back)."""
        ...

    async def close(self, code: CloseCode, reason: str) -> None:
        """Tell the peer `code` and end the connection, within CLOSE_WITHIN seconds or abort."""
        ...


class WebSocketTransport:
    kind = TransportKind.WEBSOCKET

    def __init__(self, websocket: WebSocket) -> None:
        self.ws = websocket
        self.direct = direct_writer(websocket)
        self._guard: frameguard.FrameGuard | None = None

    @property
    def token_param(self) -> str | None:
        return self.ws.query_params.get("token")

    @property
    def transport_cap(self) -> int | None:
        return self._guard.transport_cap if self._guard is not None else None

    async def accept(self) -> None:
        self._guard = frameguard.install(self.ws)
        await self.ws.accept()

    async def receive(self) -> Inbound:
        try:
            message = await self.ws.receive()
        except (WebSocketDisconnect, RuntimeError) as exc:
            raise TransportClosed from exc
        if message["type"] == "websocket.disconnect":
            raise TransportClosed
        oversize = message.get(frameguard.OVERSIZE)
        if oversize is not None:
            return Inbound(oversize=str(oversize), fatal=True)
        return Inbound(data=message.get("bytes"))

    async def send(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def close(self, code: CloseCode, reason: str) -> None:
        try:
            await asyncio.wait_for(self.ws.close(int(code), reason), timeout=CLOSE_WITHIN)
        except (TimeoutError, Exception):
            abort_transport(self.ws)  # the peer is not reading; its buffer would never drain
        if code is CloseCode.MESSAGE_TOO_BIG and self._guard is not None:
            self._guard.finish()
