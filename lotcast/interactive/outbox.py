"""Outbox: a socket's bounded send queue, drained by one sender task with batched sends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.websockets import WebSocket

log = logging.getLogger(__name__)


DirectWrite = Callable[[bytes], bool]


class Outbox:
    """Never blocks the caller: `push` queues bytes or reports overflow (the caller disconnects).

    Everything queued when the sender wakes goes out as ONE WebSocket frame (server frames may
    hold several msgpack maps back to back), so a socket costs one send per wakeup, not per message.
    With a `direct` writer, a push to an idle outbox whose transport takes data is written at once,
    synchronously: no task wakeup per socket on the fan-out path.
    """

    def __init__(self, send: Callable[[bytes], Awaitable[None]], limit_bytes: int,
                 direct: DirectWrite | None = None) -> None:
        self._send = send
        self._direct = direct
        self._sending = False
        self.direct_frames = 0
        self.limit_bytes = limit_bytes
        self._frames: deque[bytes] = deque()
        self.queued_bytes = 0
        self.sent_frames = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failed = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-sender")

    def push(self, frame: bytes) -> bool:
        """Queue a frame. False means the outbox is over its limit (a slow consumer)."""
        if (self._direct is not None and not self._frames and not self._sending
                and self._task is not None and self._direct(frame)):
            self.direct_frames += 1
            return True
        self._frames.append(frame)
        self.queued_bytes += len(frame)
        if not self._wake.is_set():
            self._wake.set()
        return self.queued_bytes <= self.limit_bytes

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if not self._frames:
                    continue
                data = b"".join(self._frames)
                self._frames.clear()
                self.queued_bytes = 0
                self._sending = True
                await self._send(data)
                self._sending = False
                self.sent_frames += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the peer went away mid-send
            log.debug("outbox send failed: %r", exc)
            self.failed.set()

    async def flush(self, within: float) -> None:
        """Wait (bounded) until everything queued so far was handed to the transport."""
        deadline = asyncio.get_running_loop().time() + within
        while (self._frames or self._wake.is_set()) and not self.failed.is_set():
            if asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._frames.clear()
        self.queued_bytes = 0


def direct_writer(websocket: WebSocket) -> DirectWrite | None:
    """A synchronous binary-frame writer for uvicorn's `websockets-sansio` protocol, if in use.

    It does what that protocol's ASGI `send` does for `websocket.send`, minus the await: frame the
    bytes and hand them to the transport, only while the transport is not paused (its buffer is
    under the high-water mark) and the connection is open. Anything else returns False and the
    caller falls back to the awaited send. tests/test_ws_slow.py and test_interactive_hub.py fail
    if uvicorn renames these attributes.
    """
    owner = server_protocol(websocket)
    needed = ("conn", "transport", "writable", "close_sent", "disconnected")
    if owner is None or not all(hasattr(owner, name) for name in needed):
        return None
    conn = owner.conn
    if not all(hasattr(conn, name) for name in ("send_binary", "data_to_send", "extensions",
                                                  "state")):
        return None

    def write(data: bytes) -> bool:
        if (owner.close_sent or owner.disconnected or not owner.writable.is_set()
                or owner.transport.is_closing() or conn.state.name != "OPEN"):
            return False
        if conn.extensions:  # e.g. permessage-deflate: frames differ per connection
            try:
                conn.send_binary(data)
            except Exception:
                return False
            owner.transport.write(b"".join(conn.data_to_send()))
        else:
            owner.transport.write(_framed(data))
        return True

    return write


class _FrameCache:
    """The last payload framed and its frame (identity match: the hub sends one bytes object)."""

    payload: object = object()
    frame: bytes = b""


def _framed(payload: bytes) -> bytes:
    """One unmasked binary WebSocket frame (RFC 6455 5.2). Server frames are the same bytes for
    every socket, so a batch is framed once: the cache hits for every socket after the first."""
    if payload is _FrameCache.payload:
        return _FrameCache.frame
    n = len(payload)
    if n < 126:
        head = bytes((0x82, n))
    elif n < 1 << 16:
        head = bytes((0x82, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x82, 127)) + n.to_bytes(8, "big")
    _FrameCache.payload, _FrameCache.frame = payload, head + payload
    return _FrameCache.frame


def server_protocol(websocket: WebSocket) -> Any:
    """The server's protocol object behind a Starlette WebSocket, or None.

    ASGI does not expose it. uvicorn's protocol is the owner of the innermost `send` bound method;
    Starlette and middlewares wrap `send` in closures, which we look through.
    """
    pending: list[Any] = [getattr(websocket, "_send", None)]
    for _ in range(16):
        if not pending:
            return None
        fn = pending.pop(0)
        owner = getattr(fn, "__self__", None)
        if owner is not None and hasattr(owner, "transport"):
            return owner
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                content = cell.cell_contents
            except ValueError:
                continue
            if callable(content):
                pending.append(content)
    return None


def abort_transport(websocket: WebSocket) -> bool:
    """Drop a connection whose peer stopped reading: its close frame could never be written.

    If the server's transport cannot be found, we fall back to the ASGI close only (covered by
    tests/test_ws_slow.py).
    """
    transport = getattr(server_protocol(websocket), "transport", None)
    if transport is None or not hasattr(transport, "abort"):
        return False
    transport.abort()
    return True
