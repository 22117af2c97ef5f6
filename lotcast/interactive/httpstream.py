"""The room protocol over plain HTTP, for clients whose WebSocket cannot connect.

    POST /room/{room}/stream   body: the first client message (usually `hello`), may be empty
        200, a long-lived binary response: length-prefixed records (protocol.stream_record), the
        first a `session` message, then exactly the frames a WebSocket would carry, the last a
        `close` message when the server ends the session.
    POST /room/{room}/send     header Lotcast-Session; body: one client message
        202 (queued; its answer follows on the stream), 400, 404, 413, 429 (docs/protocol.md).

A stream is one ClientSession, as a WebSocket is: same hub, same outbox (the hub's bytes are
written unchanged behind a 4-byte length), same flood guard, limits and close codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from lotcast.ids import STREAM_ID_RULE, is_valid_stream_id
from lotcast.interactive import protocol as p
from lotcast.interactive.outbox import DirectWrite
from lotcast.interactive.session import InteractiveStats
from lotcast.interactive.transport import CLOSE_WITHIN, Inbound, TransportClosed, TransportKind

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
RunSession = Callable[["HttpStreamTransport", str], Awaitable[object | None]]

KEEPALIVE_S = 15.0
INBOX_LIMIT = 64  # client messages queued and not yet processed, per session
SESSION_ID_BYTES = 24

CORS = [(b"access-control-allow-origin", b"*"),
        (b"access-control-expose-headers", b"Retry-After")]
PREFLIGHT = [*CORS, (b"access-control-allow-methods", b"POST, OPTIONS"),
             (b"access-control-allow-headers", f"Content-Type, {p.SESSION_HEADER}".encode()),
             (b"access-control-max-age", b"600")]
CLOSE = [(b"connection", b"close")]  # after a refused body: this connection is not reused
# An oversize body up to this size is drained before the 413 (larger ones: the connection closes)
DRAIN_LIMIT_BYTES = 1024 * 1024


class AsgiEndpoint:
    """A plain ASGI callable for a Starlette Route (a bound method would be wrapped as a
    request/response endpoint, which cannot stream while it watches for a disconnect)."""

    def __init__(self, handler: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self._handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._handler(scope, receive, send)


class HttpStreamTransport:
    """One stream response plus the queue its POSTs feed (a RoomTransport)."""

    kind = TransportKind.HTTP
    direct: DirectWrite | None = None

    def __init__(self, session_id: str, room: str, send: Send, token_param: str | None) -> None:
        self.session_id = session_id
        self.room = room
        self._send = send
        self._token_param = token_param
        self._inbox: asyncio.Queue[Inbound | None] = asyncio.Queue()
        self._write_lock = asyncio.Lock()
        self._last_write = 0.0
        self._keepalive: asyncio.Task[None] | None = None
        self.open = False  # takes POSTs: from accept until the peer leaves or the server closes
        self.started = False  # the 200 and its headers were sent
        self.ended = False  # the response is complete (or the peer is gone)

    @property
    def token_param(self) -> str | None:
        return self._token_param

    @property
    def transport_cap(self) -> int | None:
        return p.TRANSPORT_CAP_BYTES

    def deliver(self, inbound: Inbound) -> bool:
        """Queue a POSTed message for the session; False when the inbox is full."""
        if self._inbox.qsize() >= INBOX_LIMIT:
            return False
        self._inbox.put_nowait(inbound)
        return True

    def peer_gone(self) -> None:
        self.open = False
        self.ended = True
        self._inbox.put_nowait(None)

    async def accept(self) -> None:
        await self._send({"type": "http.response.start", "status": 200, "headers": [
            *CORS, (b"content-type", p.STREAM_CONTENT_TYPE.encode()),
            (b"cache-control", b"no-store, no-transform"), (b"x-accel-buffering", b"no")]})
        self.started = self.open = True
        await self._write(p.stream_record(p.encode_session(
            session=self.session_id, keepalive_ms=int(KEEPALIVE_S * 1000))))
        self._keepalive = asyncio.create_task(self._keepalive_loop(), name="http-keepalive")

    async def receive(self) -> Inbound:
        item = await self._inbox.get()
        if item is None:
            raise TransportClosed
        return item

    async def send(self, data: bytes) -> None:
        await self._write(p.stream_record(data))

    async def _write(self, body: bytes, more: bool = True) -> None:
        async with self._write_lock:
            if self.ended:
                return
            await self._send({"type": "http.response.body", "body": body, "more_body": more})
            self._last_write = time.monotonic()
            if not more:
                self.ended = True

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_S / 3)
            if time.monotonic() - self._last_write >= KEEPALIVE_S and not self._write_lock.locked():
                await self._write(p.KEEPALIVE_RECORD)

    async def close(self, code: p.CloseCode, reason: str) -> None:
        self.open = False
        await self._stop_keepalive()
        try:
            await asyncio.wait_for(
                self._write(p.stream_record(p.encode_close(code=int(code), reason=reason)),
                            more=False), timeout=CLOSE_WITHIN)
        except (TimeoutError, Exception):
            self.abort()  # the peer is not reading; its buffer would never drain

    async def finish(self) -> None:
        """End the response if the session did not (the peer left): nothing more to say."""
        self.open = False
        await self._stop_keepalive()
        if self.started and not self.ended:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._write(b"", more=False), timeout=CLOSE_WITHIN)

    async def _stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
            self._keepalive = None

    def abort(self) -> None:
        """Drop the TCP connection (uvicorn's response cycle owns the transport)."""
        self.ended = True
        transport = getattr(getattr(self._send, "__self__", None), "transport", None)
        if transport is not None and hasattr(transport, "abort"):
            transport.abort()


class HttpRoomEndpoints:
    """The two ASGI endpoints and the table of live streams that POSTs are matched against."""

    def __init__(self, run_session: RunSession, serving: Callable[[], bool],
                 stats: InteractiveStats) -> None:
        self._run_session = run_session
        self._serving = serving
        self._stats = stats
        self.streams: dict[str, HttpStreamTransport] = {}
        # called with the number of open streams whenever it changes (e.g. a metrics gauge)
        self.count_observers: list[Callable[[int], None]] = []

    def _counted(self) -> None:
        self._stats.http_sessions = len(self.streams)
        for observe in self.count_observers:
            observe(len(self.streams))

    async def stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "OPTIONS":
            await _reply(send, 204, headers=PREFLIGHT)
            return
        room = scope["path_params"]["room"]
        if not is_valid_stream_id(room):
            await _error(send, 400, "bad_room", STREAM_ID_RULE)
            return
        if not self._serving():
            await _error(send, 503, "not_serving", "this node is not serving rooms; try another",
                         [(b"retry-after", b"1")])
            return
        body = await _read_body(scope, receive)
        if body is None:
            await _error(send, 413, "too_large",
                         f"the stream's first message is over {p.TRANSPORT_CAP_BYTES} bytes",
                         CLOSE)
            return
        session_id = secrets.token_urlsafe(SESSION_ID_BYTES)
        transport = HttpStreamTransport(session_id, room, send, _query_token(scope))
        if body:
            transport.deliver(Inbound(data=body))
        self.streams[session_id] = transport
        self._stats.http_sessions_opened += 1
        self._counted()
        watcher = asyncio.create_task(_watch_disconnect(receive, transport), name="http-watch")
        try:
            await self._run_session(transport, room)
        finally:
            self.streams.pop(session_id, None)
            self._counted()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await transport.finish()
        if not transport.started:  # the service stopped between the check and the session
            await _error(send, 503, "not_serving", "this node is not serving rooms; try another",
                         [(b"retry-after", b"1")])

    async def post(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "OPTIONS":
            await _reply(send, 204, headers=PREFLIGHT)
            return
        session_id = _header(scope, p.SESSION_HEADER.lower().encode())
        if not session_id:
            await _error(send, 400, "missing_session",
                         f"the {p.SESSION_HEADER} header (from the stream's session record) is "
                         "required")
            return
        transport = self.streams.get(session_id)
        if transport is None or transport.room != scope["path_params"]["room"] \
                or not transport.open:
            await _error(send, 404, "unknown_session",
                         "no open stream has this session id (it ended or never existed); "
                         "open a new stream")
            return
        body = await _read_body(scope, receive)
        if body is None:
            transport.deliver(Inbound(oversize=f"over {p.TRANSPORT_CAP_BYTES} bytes"))
            await _error(send, 413, "too_large",
                         f"message over {p.TRANSPORT_CAP_BYTES} bytes; refused unread", CLOSE)
            return
        if not transport.deliver(Inbound(data=body)):
            await _error(send, 429, "inbox_full",
                         f"{INBOX_LIMIT} messages of this session are not processed yet; send "
                         "the next one after an earlier one is answered", [(b"retry-after", b"1")])
            return
        await _reply(send, 202)


async def _watch_disconnect(receive: Receive, transport: HttpStreamTransport) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            transport.peer_gone()
            return


async def _read_body(scope: Scope, receive: Receive) -> bytes | None:
    """The request body, or None when it is over the transport cap (never parsed; what follows
    is read and dropped up to DRAIN_LIMIT_BYTES, see _discard)."""
    declared = _header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > p.TRANSPORT_CAP_BYTES:
        if int(declared) <= DRAIN_LIMIT_BYTES:
            await _discard(receive, DRAIN_LIMIT_BYTES)
        return None
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return bytes(body)  # the client went away mid-body
        body += message.get("body", b"")
        if len(body) > p.TRANSPORT_CAP_BYTES:
            if message.get("more_body", False):
                await _discard(receive, DRAIN_LIMIT_BYTES - len(body))
            return None
        if not message.get("more_body", False):
            return bytes(body)


async def _discard(receive: Receive, budget: int) -> None:
    """Read and drop the rest of a refused body. Closing a connection with unread bytes makes
    the kernel reset it, and the client then loses the 413 it has not read yet."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value).decode("latin-1").strip()
    return None


def _query_token(scope: Scope) -> str | None:
    values = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1")).get("token")
    return values[0] if values else None


async def _reply(send: Send, status: int, body: bytes = b"",
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    all_headers = [*(headers if headers is not None else CORS),
                   (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, status: int, code: str, message: str,
                 extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"code": code, "message": message}).encode()
    await _reply(send, status, body,
                 [*CORS, (b"content-type", b"application/json"), *(extra or [])])
