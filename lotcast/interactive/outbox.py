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


class Outbox:
    """Never blocks the caller: `push` queues bytes or reports overflow (the caller disconnects).

    Everything queued when the sender wakes goes out as ONE WebSocket frame (server frames may
    hold several msgpack maps back to back), so a socket costs one send per wakeup, not per message.
    """

    def __init__(self, send: Callable[[bytes], Awaitable[None]], limit_bytes: int) -> None:
        self._send = send
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
                await self._send(data)
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


def abort_transport(websocket: WebSocket) -> bool:
    """Drop a connection whose peer stopped reading: its close frame could never be written.

    uvicorn does not expose the transport through ASGI; its protocol object is the `send`
    callable's owner. If that ever moves, we fall back to the ASGI close only (covered by
    tests/test_ws_slow.py).
    """
    owner: Any = getattr(getattr(websocket, "_send", None), "__self__", None)
    transport = getattr(owner, "transport", None)
    if transport is None or not hasattr(transport, "abort"):
        return False
    transport.abort()
    return True
