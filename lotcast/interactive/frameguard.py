"""FrameGuard: inbound frames the transport would refuse become ordered messages for the session.

uvicorn's `websockets-sansio` protocol answers two kinds of client frame on its own, before the
application has seen the frames queued ahead of them:
* a message over the transport cap (`ws_max_size`): the connection is failed with 1009 at once,
  so replies the session still owed (even `welcome`) are never written;
* a text frame that is not valid UTF-8: close 1007 and a logged traceback.

The guard hooks one connection's protocol object so that, instead, an oversize message becomes an
OVERSIZE marker queued behind the messages already received (the session answers `too_large`,
sends its owed replies first, then closes with 1009), and invalid UTF-8 becomes an ordinary text
message (answered `bad_frame`). Incoming data after an oversize message is discarded unread, as
RFC 6455 requires after a failed frame; memory stays bounded by the transport cap.

Like outbox.direct_writer, this reads uvicorn/websockets internals; every name used is checked
when the guard is installed (no guard, and the stock behaviour, if one is missing), and
tests/test_ws_protocol_contract.py fails if the hooks stop working.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Generator
from typing import Any

from starlette.websockets import WebSocket

from lotcast.interactive.outbox import server_protocol

log = logging.getLogger(__name__)

OVERSIZE = "lotcast.oversize"  # key of the marker message: the transport's description
MESSAGE_TOO_BIG = 1009
LINGER = 2.0

_PROTOCOL_NAMES = ("conn", "queue", "transport", "frames", "curr_msg_data_type",
                   "send_receive_event_to_app", "handle_parser_exception", "handle_events")
_CONN_NAMES = ("fail", "state", "parser", "parser_exc", "reader", "max_message_size")


class FrameGuard:
    def __init__(self, owner: Any) -> None:
        self._owner = owner
        self._conn = owner.conn
        self._oversize: str | None = None
        self._stock_fail = self._conn.fail
        self._stock_parser_exception = owner.handle_parser_exception
        self._stock_deliver = owner.send_receive_event_to_app
        # Instance attributes shadow the methods: both objects call these through `self.`.
        self._conn.fail = self._fail
        owner.handle_parser_exception = self._parser_exception
        owner.send_receive_event_to_app = self._deliver

    @property
    def transport_cap(self) -> int | None:
        cap = self._conn.max_message_size
        return cap if isinstance(cap, int) else None

    def _fail(self, code: int, reason: str = "") -> None:
        if (code == MESSAGE_TOO_BIG and self._oversize is None
                and self._conn.state.name == "OPEN"):
            self._oversize = reason or "message too big"
            # What the stock fail does, minus the close frame and EOF: read nothing more.
            self._conn.parser = _discarding(self._conn.reader)
            next(self._conn.parser)
            return
        self._stock_fail(code, reason)

    def _parser_exception(self) -> None:
        if self._oversize is not None and self._conn.state.name == "OPEN":
            self._conn.parser_exc = None  # the discarding parser raises nothing more
            # uvicorn skips the frames parsed in the same read as the oversize one: deliver them.
            self._owner.handle_events()
            self._owner.queue.put_nowait({"type": "websocket.receive",
                                          OVERSIZE: self._oversize})
            return
        self._stock_parser_exception()

    def _deliver(self) -> None:
        owner = self._owner
        if owner.curr_msg_data_type == "text":
            data = b"".join(owner.frames)
            try:
                data.decode()
            except UnicodeDecodeError:
                owner.frames = [data.decode("utf-8", "replace").encode()]
        self._stock_deliver()

    def finish(self) -> None:
        """After the session's close frame for an oversize message: end the TCP connection.

        The peer's close reply can never be parsed (the parser is discarding), so the server
        ends the connection itself, but only half (FIN) at first: closing a socket with unread
        data makes the kernel send a reset, and a peer that is still sending would lose our
        close frame. The rest of its data is read and discarded until its EOF, or for at most
        LINGER seconds."""
        transport = getattr(self._owner, "transport", None)
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER, transport.close)
        else:
            transport.close()


def _discarding(reader: Any) -> Generator[None]:
    while not (yield from reader.at_eof()):
        reader.discard()
    while True:  # the transport is gone; uvicorn feeds nothing more
        yield


def install(websocket: WebSocket) -> FrameGuard | None:
    owner = server_protocol(websocket)
    if owner is None or not all(hasattr(owner, name) for name in _PROTOCOL_NAMES):
        return None
    if not all(hasattr(owner.conn, name) for name in _CONN_NAMES):
        return None
    return FrameGuard(owner)
