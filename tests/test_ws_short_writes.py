"""Short writes of the native room writer: the remainder path, on every frame.

Two nodes on one Redis: one with the native writer, one forced onto the per-socket fallback
(LOTCAST_NATIVE_WS=0). Every server-side room socket has a tiny kernel send buffer
(LOTCAST_WS_SNDBUF) and every client a tiny receive buffer, and each burst of bids makes one
batch several times larger than both together: so even for a client that reads all the time,
the native `send` takes only part of the batch and the rest must go into the transport's buffer,
in order. Streams are compared byte for byte across the two nodes, and one client per node is
reset (TCP RST) while the rest of a batch is still buffered for it.

Batch boundaries are the same on both nodes by construction: with a 1 s batch interval, a bid
after an idle second goes out alone at once, and the rest of its burst, sent back to back once
that batch has arrived, goes out together one interval later.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator

import msgpack
import pytest
from ws_support import (
    Watcher,
    assert_native_writer_built,
    hub_stats,
    native_and_fallback_nodes,
    node_stats,
    until,
)

from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive import _wswrite
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.redis_server import RedisServer

AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
ROOM = "short"
NAME = "S" * 2000  # each bid event carries the bidder's name: ~2.1 KB per event
BURST = 12  # bids per burst: its second batch is ~25 KB, several send buffers
ROUNDS = 4
INTERVAL_MS = 1000
SNDBUF = 4096  # the kernel doubles it: ~8 KB per server socket
RCVBUF = 4096


@pytest.fixture(autouse=True)
def native_writer_built() -> None:
    assert_native_writer_built()


@pytest.fixture(scope="module")
def nodes(redis_server: RedisServer) -> Iterator[tuple[DevServerProcess, DevServerProcess]]:
    args = ("--bid-rate", "0", "--ws-msg-rate", "0", "--ws-flush-interval-ms", str(INTERVAL_MS))
    # server side: every large batch comes up short
    with native_and_fallback_nodes(redis_server.url, args, SNDBUF) as pair:
        yield pair


def acked(bidder: Watcher) -> set[str]:
    return {str(m["cid"]) for m in bidder.messages() if m["type"] == "ack"}


@pytest.mark.timeout(180)
async def test_short_native_writes_deliver_the_fallback_bytes_in_order(
        nodes: tuple[DevServerProcess, DevServerProcess]) -> None:
    native, fallback = nodes
    host = RoomClient(native.url, ROOM, AUTHORITY.mint(Role.HOST, "host", "Host"))
    await host.connect()
    lot = (await host.request("lot_create", title="T", start_price=10, increments=[[0, 10]],
                              duration_ms=600_000, soft_close_ms=0))["lot"]
    opened = await host.request("lot_open", lot=lot)
    bidder = Watcher(native.url, ROOM, token=AUTHORITY.mint(Role.BIDDER, "b1", NAME))
    await bidder.open()
    groups: dict[str, tuple[list[Watcher], Watcher, Watcher]] = {}
    for node in (native, fallback):
        readers = [Watcher(node.url, ROOM, rcvbuf=RCVBUF) for _ in range(2)]
        sleepy = Watcher(node.url, ROOM, rcvbuf=RCVBUF)  # reads nothing until the end
        dropper = Watcher(node.url, ROOM, rcvbuf=RCVBUF)  # reset with a batch half written
        for w in (*readers, sleepy, dropper):
            await w.open()
        groups[node.url] = (readers, sleepy, dropper)
    everyone = [w for readers, s, d in groups.values() for w in (*readers, s, d)]
    readers_all = [w for readers, _, _ in groups.values() for w in readers]

    def position(w: Watcher) -> int:
        return max((int(m["offset"]) for m in w.messages() if m["type"] in ("snapshot", "events")),
                   default=0)

    await until(lambda: all(position(w) >= opened["offset"] for w in everyone))
    await asyncio.sleep(INTERVAL_MS / 1000 * 1.2)  # idle: the first bid goes out alone
    for _, sleepy, dropper in groups.values():
        sleepy.pause()
        dropper.pause()
    price, sent = 10, 0
    for rnd in range(ROUNDS):
        # one bid alone (the hub was idle: its batch goes out at once), then the rest of the
        # burst back to back, acks not awaited: they all wait for the next batch, 1 s later
        for part in (1, BURST - 1):
            cids = []
            for _ in range(part):
                price += 10
                cid = f"r{rnd}-{sent}"
                sent += 1
                cids.append(cid)
                await bidder.ws.send(msgpack.packb({"type": "bid", "cid": cid, "lot": lot,
                                                    "amount": price}))
            await until(lambda c=cids: set(c) <= acked(bidder))  # type: ignore[misc]
            head = max(int(m["offset"]) for m in bidder.messages() if m["type"] == "ack")
            await until(lambda h=head: all(  # type: ignore[misc]
                w.offsets() and w.offsets()[-1] >= h for w in readers_all))
        if rnd == 1:
            # the droppers' kernel buffers are full: the rest of this round's batch is in their
            # transports' buffers (or outboxes) when the connection is reset under it
            for _, _, dropper in groups.values():
                dropper.reset()
        await asyncio.sleep(INTERVAL_MS / 1000 * 1.2)

    for _, sleepy, _ in groups.values():
        sleepy.resume()
    reference = groups[native.url][0][0].bid_batches()
    assert len(reference) == 2 * ROUNDS  # [first bid], [the other BURST - 1] per round
    assert sum(len(msgpack.unpackb(b)["events"]) for b in reference) == BURST * ROUNDS
    assert max(len(b) for b in reference) > 2 * (2 * SNDBUF + 2 * RCVBUF)  # never fits at once
    for node in (native, fallback):
        readers, sleepy, dropper = groups[node.url]
        for w in (*readers, sleepy):
            await until(lambda w=w: len(w.bid_batches()) == len(reference))  # type: ignore[misc]
            assert w.bid_batches() == reference  # byte for byte, on both nodes
            offsets = w.offsets()
            assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
            assert offsets[-1] == head
        # the reset socket got a prefix of the stream, whole frames only, then nothing
        got = dropper.bid_batches()
        assert got == reference[:len(got)]
        assert len(got) < len(reference)
    stats_native = await hub_stats(native.url, ROOM)
    stats_fallback = await hub_stats(fallback.url, ROOM)
    # every big batch came up short natively on every reading socket: the remainder path ran
    assert stats_native["short_writes"] >= ROUNDS * 2
    assert stats_native["native_writes"] >= ROUNDS * 2 * 2
    assert stats_fallback["native_writes"] == 0
    assert stats_fallback["short_writes"] == 0
    # the reset sockets are gone (native: host, bidder, readers, sleepy), the others served
    for node, expected in ((native, 5), (fallback, 3)):
        for _ in range(200):
            if (await node_stats(node.url))["by_room"][ROOM] == expected:
                break
            await asyncio.sleep(0.05)
        assert (await node_stats(node.url))["by_room"][ROOM] == expected
    for w in (*everyone, bidder):
        await w.close()
    await host.close()


@pytest.mark.timeout(30)
def test_send_many_reports_partial_writes_and_errors_by_index() -> None:
    """The extension on real sockets: whole writes are not reported; a full peer gives the bytes
    the kernel took (0 for EAGAIN); a reset peer gives -errno."""
    frame = bytes(range(256)) * 256  # 64 KiB: more than a small buffer pair holds
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    listener = socket.create_server(("127.0.0.1", 0))
    tcp_client = socket.create_connection(listener.getsockname())
    tcp_server, _ = listener.accept()
    try:
        for a, _ in pairs:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
            a.setblocking(False)
        tcp_client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tcp_client.close()  # RST: the server side's next send fails
        tcp_server.setblocking(False)
        small = b"hello"
        assert _wswrite.send_many(small, [pairs[0][0].fileno()]) == []
        assert pairs[0][1].recv(64) == small
        shorts = _wswrite.send_many(frame, [pairs[0][0].fileno(), tcp_server.fileno(),
                                            pairs[1][0].fileno()])
        by_index = dict(shorts)
        assert sorted(by_index) == [0, 1, 2]
        assert 0 < by_index[0] < len(frame)
        assert 0 < by_index[2] < len(frame)
        assert by_index[1] < 0  # -EPIPE or -ECONNRESET
        assert -by_index[1] in (32, 104)
        got = b""
        pairs[0][1].setblocking(False)
        while True:
            try:
                chunk = pairs[0][1].recv(1 << 16)
            except BlockingIOError:
                break
            got += chunk
        assert got == frame[:by_index[0]]
        # EAGAIN: a buffer that is still full takes nothing
        assert _wswrite.send_many(frame, [pairs[1][0].fileno()]) == [(0, 0)]
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        tcp_server.close()
        listener.close()
