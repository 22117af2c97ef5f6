"""`_wswrite.send_ready`: the hub's one native call per slice of sockets, on real sockets.

Every socket's eligibility answer goes in as is (its fd, or -1 for "not now"); the extension
skips the -1s and lists their indices (the hub pushes the frame to those through their queue),
and reports the sockets that took only part of the frame (or none, or an error) by index.
"""

from __future__ import annotations

import socket
import struct

import pytest
from ws_support import assert_native_writer_built

from lotcast.interactive import _wswrite, wswrite

SNDBUF = 4096


@pytest.fixture(autouse=True)
def native_writer_built() -> None:
    assert_native_writer_built()


def drain(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    got = b""
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            return got
        if not chunk:
            return got
        got += chunk


@pytest.mark.timeout(30)
def test_send_ready_skips_and_lists_the_sockets_that_said_no() -> None:
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
    try:
        for a, _ in pairs:
            a.setblocking(False)
        frame = b"\x82\x05hello"
        fds = [pairs[0][0].fileno(), -1, pairs[2][0].fileno(), -1]
        assert _wswrite.send_ready(frame, fds) == ([], [1, 3])
        assert [drain(b) for _, b in pairs] == [frame, b"", frame, b""]
        assert _wswrite.send_ready(frame, []) == ([], [])
        assert _wswrite.send_ready(frame, [-1, -1]) == ([], [0, 1])
        assert [drain(b) for _, b in pairs] == [b"", b"", b"", b""]
        with pytest.raises(TypeError):
            _wswrite.send_ready(frame, [pairs[0][0].fileno(), "3"])  # type: ignore[list-item]
        with pytest.raises(ValueError):
            _wswrite.send_ready(frame, [1 << 40])
    finally:
        for a, b in pairs:
            a.close()
            b.close()


@pytest.mark.timeout(30)
def test_send_ready_reports_partial_writes_and_errors_by_index_among_skipped_ones() -> None:
    frame = bytes(range(256)) * 256  # 64 KiB: more than a small buffer pair holds
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    listener = socket.create_server(("127.0.0.1", 0))
    tcp_client = socket.create_connection(listener.getsockname())
    tcp_server, _ = listener.accept()
    try:
        pair[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        pair[0].setblocking(False)
        tcp_client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tcp_client.close()  # RST: the server side's next send fails
        tcp_server.setblocking(False)
        shorts, skipped = _wswrite.send_ready(frame, [-1, pair[0].fileno(), -1,
                                                      tcp_server.fileno()])
        assert skipped == [0, 2]
        by_index = dict(shorts)
        assert sorted(by_index) == [1, 3]
        assert 0 < by_index[1] < len(frame)
        assert -by_index[3] in (32, 104)  # EPIPE or ECONNRESET
        assert drain(pair[1]) == frame[:by_index[1]]
        # the buffer drained: the same socket takes part of the frame again
        shorts, skipped = _wswrite.send_ready(frame, [pair[0].fileno()])
        assert skipped == []
        assert len(shorts) == 1 and shorts[0][0] == 0 and 0 < shorts[0][1] < len(frame)
        # EAGAIN: a buffer that is still full takes nothing
        assert _wswrite.send_ready(frame, [pair[0].fileno()]) == ([(0, 0)], [])
    finally:
        pair[0].close()
        pair[1].close()
        tcp_server.close()
        listener.close()


class Socket:
    """A BatchSubscriber on one end of a socket pair: says no while `busy`, and records what
    came through `push` (its queue) and through `native_rest`."""

    user_id = ""

    def __init__(self) -> None:
        self.ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ours.setblocking(False)
        self.busy = False
        self.pushed: list[bytes] = []
        self.rests: list[tuple[bytes, int]] = []

    def native_fd(self) -> int:
        return -1 if self.busy else self.ours.fileno()

    def native_rest(self, wire: bytes, result: int) -> None:
        self.rests.append((wire, result))

    def push(self, frame: bytes) -> None:
        self.pushed.append(frame)

    def close(self) -> None:
        self.ours.close()
        self.peer.close()


@pytest.mark.timeout(30)
def test_deliver_native_writes_the_framed_payload_and_pushes_to_the_busy_ones() -> None:
    subs = [Socket() for _ in range(5)]
    try:
        subs[1].busy = subs[4].busy = True
        payload = b"\x81\xa4type\xa6events" * 20
        written, short, probe_s, send_s = wswrite.deliver_native(
            payload, subs, [s.native_fd for s in subs])
        assert (written, short) == (3, 0)
        assert probe_s >= 0 and send_s >= 0
        wire = wswrite.framed(payload)
        assert wire[:2] == bytes((0x82, 126)) and wire[4:] == payload
        assert [drain(s.peer) for s in subs] == [wire, b"", wire, wire, b""]
        assert [s.pushed for s in subs] == [[], [payload], [], [], [payload]]
        assert all(not s.rests for s in subs)
    finally:
        for s in subs:
            s.close()
