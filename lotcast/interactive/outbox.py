"""Outbox: a socket's bounded send queue, drained by one sender task with batched sends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.websockets import WebSocket
from websockets.protocol import State

log = logging.getLogger(__name__)


SNDBUF_ENV = "LOTCAST_WS_SNDBUF"  # tests only: SO_SNDBUF (bytes) for every room socket
DirectWrite = Callable[[bytes], bool]  # a DirectSocket, or any synchronous frame writer


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
        self._native = direct if isinstance(direct, DirectSocket) else None
        self._native_live = False  # set by the session: LIVE and not closing
        self._on_ready: Callable[[bool], None] | None = None  # the hub's (native_link)
        self._told = False
        self._sending = False
        self.direct_frames = 0
        self.short_writes = 0  # native batch writes whose rest went to the transport's buffer
        self.limit_bytes = limit_bytes
        self._frames: deque[bytes] = deque()
        self._written: list[Callable[[], None]] = []  # callbacks of frames in _frames
        self.queued_bytes = 0
        self.sent_frames = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failed = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-sender")
        self._tell()

    @property
    def native_live(self) -> bool:
        return self._native_live

    @native_live.setter
    def native_live(self, live: bool) -> None:
        self._native_live = live
        self._tell()

    def _native_ok(self) -> bool:
        return (self._native_live and not self._frames and not self._sending
                and self._task is not None)

    def _tell(self) -> None:
        """Tell the hub (native_link) when our side's answer to "may a raw write go now?" flips."""
        if self._on_ready is not None:
            ok = self._native_ok()
            if ok is not self._told:
                self._told = ok
                self._on_ready(ok)

    def native_link(self, ready: Callable[[bool], None]) -> tuple[int, Any] | None:
        """For the hub's ReadySet (wswrite.LinkedSubscriber): our fd and transport, and from now
        on `ready(ok)` at every flip of our side (live, nothing queued here, not sending)."""
        native = self._native
        link = native.link() if native is not None else None
        if link is None:
            return None
        self._on_ready = ready
        self._told = self._native_ok()
        ready(self._told)
        return link

    def native_fd(self) -> int:
        """The fd for the hub's native batch write, when nothing is queued here or in the
        transport (so the raw write cannot overtake anything); else -1. Called for every socket
        of every batch: kept to a few attribute reads."""
        native = self._native
        if (native is None or not self.native_live or self._frames or self._sending
                or self._task is None):
            return -1
        return native.idle_fd()

    def native_rest(self, wire: bytes, result: int) -> None:
        """The native write took only part of `wire` (see DirectSocket.rest)."""
        assert self._native is not None
        self.short_writes += 1
        self._native.rest(wire, result)

    def push(self, frame: bytes, written: Callable[[], None] | None = None) -> bool:
        """Queue a frame. False means the outbox is over its limit (a slow consumer).

        `written` (acks and errors: their write delay is measured) is called once the frame is
        in the transport: at once on the direct path, else after the send that carries it."""
        if (self._direct is not None and not self._frames and not self._sending
                and self._task is not None and self._direct(frame)):
            self.direct_frames += 1
            if written is not None:
                written()
            return True
        if written is not None:
            self._written.append(written)
        self._frames.append(frame)
        self.queued_bytes += len(frame)
        if self._told:
            self._tell()
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
                written, self._written = self._written, []
                self.queued_bytes = 0
                self._sending = True
                await self._send(data)
                self._sending = False
                self._tell()
                self.sent_frames += 1
                for callback in written:
                    callback()
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
        self._written.clear()
        self.queued_bytes = 0
        self._tell()


class DirectSocket:
    """Synchronous writes to one uvicorn `websockets-sansio` connection, bypassing the awaited
    ASGI send: `__call__` frames and hands bytes to the transport (the outbox's direct write);
    `idle_fd` / `rest` serve the hub's native batch writer (wswrite.py).

    Built by `direct_writer`, which checks every uvicorn/websockets attribute used here;
    tests/test_ws_slow.py and test_interactive_hub.py fail if uvicorn renames them.
    """

    def __init__(self, owner: Any, conn: Any) -> None:
        self._owner = owner
        self._conn = conn
        self._writable = owner.writable  # an asyncio.Event, for the life of the connection
        # -2: not looked up yet (the socket is known, and extensions negotiated, once OPEN);
        # -1: never native (an extension transforms frames per connection, or no socket)
        self._fd = -2

    def _open(self) -> bool:
        owner = self._owner
        return not (owner.close_sent or owner.disconnected or not self._writable.is_set()
                    or owner.transport.is_closing() or self._conn.state is not State.OPEN)

    def __call__(self, data: bytes) -> bool:
        """Write `data` as one binary frame now, if the transport takes data (not paused: its
        buffer is under the high-water mark) and the connection is open; False otherwise."""
        if not self._open():
            return False
        conn, transport = self._conn, self._owner.transport
        if conn.extensions:  # e.g. permessage-deflate: frames differ per connection
            try:
                conn.send_binary(data)
            except Exception:
                return False
            transport.write(b"".join(conn.data_to_send()))
        else:
            transport.write(_framed(data))
        return True

    def idle_fd(self) -> int:
        """The socket's fd when a raw `send` cannot overtake anything: the transport holds no
        buffered bytes, is not paused, the connection is open and frames are not transformed
        per connection (no extension); else -1. The hub calls it for every socket of every
        batch, so `_open` is inlined and what cannot change is looked up once."""
        owner = self._owner
        transport = owner.transport
        # `_state` is what websockets' `state` property returns (checked by direct_writer)
        if (owner.close_sent or owner.disconnected or not self._writable.is_set()
                or self._conn._state is not State.OPEN or transport.is_closing()
                or transport.get_write_buffer_size()):
            return -1
        fd = self._fd
        if fd == -2:
            sock = transport.get_extra_info("socket")
            fileno = getattr(sock, "fileno", None)
            fd = self._fd = -1 if self._conn.extensions or not callable(fileno) else int(fileno())
        return fd

    def link(self) -> tuple[int, Any] | None:
        """(fd, transport) for the hub's ReadySet, once OPEN; None if frames are transformed per
        connection (an extension) or there is no socket: never native."""
        if self._conn.state is not State.OPEN or self._conn.extensions:
            return None
        transport = self._owner.transport
        sock = transport.get_extra_info("socket")
        fileno = getattr(sock, "fileno", None)
        if not callable(fileno):
            return None
        return int(fileno()), transport

    def rest(self, wire: bytes, result: int) -> None:
        """A native write took `result` bytes of `wire` (the rest goes to the transport's buffer,
        first in it), or failed with -errno (the connection is lost: abort, as a transport
        write error would)."""
        transport = self._owner.transport
        if result < 0:
            transport.abort()
        else:
            transport.write(wire[result:])


def direct_writer(websocket: WebSocket) -> DirectSocket | None:
    """A DirectSocket for uvicorn's `websockets-sansio` protocol, if in use (else None: the
    caller uses the awaited send only)."""
    owner = server_protocol(websocket)
    needed = ("conn", "transport", "writable", "close_sent", "disconnected")
    if owner is None or not all(hasattr(owner, name) for name in needed):
        return None
    conn = owner.conn
    if not all(hasattr(conn, name) for name in ("send_binary", "data_to_send", "extensions",
                                                  "state", "_state")):
        return None
    transport = owner.transport
    if not all(hasattr(transport, name) for name in ("get_write_buffer_size", "get_extra_info",
                                                       "abort", "is_closing", "write")):
        return None
    sndbuf = os.environ.get(SNDBUF_ENV)
    if sndbuf:  # tests: a tiny kernel send buffer, so writes come up short
        with contextlib.suppress(Exception):
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                          int(sndbuf))
    return DirectSocket(owner, conn)


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


framed = _framed


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
