"""The native batch writer (lotcast/interactive/_wswrite.c) against the per-socket fallback.

Two nodes on one Redis, one with the native writer (the default when built), one forced onto the
fallback with LOTCAST_NATIVE_WS=0. Real `websockets` clients on both; one client per node stops
reading for a while behind a tiny receive buffer (so the native writes come up short and their
rest goes through the transport's buffer), one drops its connection in the middle of the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import msgpack
import pytest
from ws_support import Watcher, assert_native_writer_built, hub_stats, native_and_fallback_nodes, until

from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.redis_server import RedisServer

AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
ROOM = "native"
NAME = "N" * 1000  # fat bid events fill the paused readers' buffers sooner
BIDS = 40


@pytest.fixture(autouse=True)
def native_writer_built() -> None:
    assert_native_writer_built()


@pytest.fixture(scope="module")
def nodes(redis_server: RedisServer) -> Iterator[tuple[DevServerProcess, DevServerProcess]]:
    args = ("--bid-rate", "0", "--ws-msg-rate", "0")
    # server side: writes to a paused reader come up short
    with native_and_fallback_nodes(redis_server.url, args, 4096) as pair:
        yield pair


@pytest.mark.timeout(180)
async def test_native_and_fallback_deliver_identical_bytes_with_short_writes_and_a_drop(
        nodes: tuple[DevServerProcess, DevServerProcess]) -> None:
    native, fallback = nodes
    host = RoomClient(native.url, ROOM, AUTHORITY.mint(Role.HOST, "host", "Host"))
    bidder = RoomClient(native.url, ROOM, AUTHORITY.mint(Role.BIDDER, "b1", NAME))
    await host.connect()
    await bidder.connect()
    lot = (await host.request("lot_create", title="T", start_price=10, increments=[[0, 10]],
                              duration_ms=600_000, soft_close_ms=0))["lot"]
    opened = await host.request("lot_open", lot=lot)
    groups = {}
    for node in (native, fallback):
        readers = [Watcher(node.url, ROOM) for _ in range(3)]
        sleepy = Watcher(node.url, ROOM, rcvbuf=2048)
        dropper = Watcher(node.url, ROOM)
        for w in (*readers, sleepy, dropper):
            await w.open()
        groups[node.url] = (readers, sleepy, dropper)
    watchers = [w for readers, sleepy, dropper in groups.values()
                for w in (*readers, sleepy, dropper)]
    readers_all = [w for readers, _, _ in groups.values() for w in readers]

    def position(w: Watcher) -> int:
        return max((int(m["offset"]) for m in w.messages() if m["type"] in ("snapshot", "events")),
                   default=0)

    # every socket has the lot's opening (by snapshot or as an event) before the first bid, so
    # no socket's first bid batch also carries it: one event per batch everywhere
    await until(lambda: all(position(w) >= opened["offset"] for w in watchers))
    for _, sleepy, _ in groups.values():
        sleepy.pause()
    price = 10
    for i in range(BIDS):
        price += 10
        ack = await bidder.request("bid", lot=lot, amount=price)
        offset = ack["offset"]
        if i == BIDS // 2:
            for _, _, dropper in groups.values():
                dropper.ws.transport.abort()  # gone between two batches, unannounced
        # one event per batch: every node frames the same batch bytes
        await until(lambda o=offset: all(w.offsets() and w.offsets()[-1] >= o  # type: ignore[misc]
                                         for w in readers_all))
    for _, sleepy, _ in groups.values():
        sleepy.resume()
    reference = groups[native.url][0][0].bid_batches()
    assert len(reference) == BIDS
    for w in watchers:
        if w in [d for _, _, d in groups.values()]:
            continue
        await until(lambda w=w: len(w.bid_batches()) == BIDS)  # type: ignore[misc]
        assert w.bid_batches() == reference  # byte for byte, on both nodes
        offsets = w.offsets()
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    for _, _, dropper in groups.values():
        assert 0 < len(dropper.bid_batches()) < BIDS
    stats_native = await hub_stats(native.url, ROOM)
    stats_fallback = await hub_stats(fallback.url, ROOM)
    assert stats_native["native_writes"] >= BIDS * 3
    assert stats_native["short_writes"] >= 1  # the paused reader's; test_ws_short_writes.py
    assert stats_fallback["native_writes"] == 0
    for w in watchers:
        await w.close()
    await bidder.close()
    await host.close()


@pytest.mark.timeout(120)
async def test_acks_and_events_on_a_short_written_socket_stay_in_order(
        nodes: tuple[DevServerProcess, DevServerProcess]) -> None:
    native, _ = nodes
    room = "native-order"
    host = RoomClient(native.url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
    await host.connect()
    lot = (await host.request("lot_create", title="T", start_price=10, increments=[[0, 10]],
                              duration_ms=600_000, soft_close_ms=0))["lot"]
    await host.request("lot_open", lot=lot)
    others = [RoomClient(native.url, room, AUTHORITY.mint(Role.BIDDER, f"o{i}", NAME))
              for i in range(2)]
    for o in others:
        await o.connect()
    me = Watcher(native.url, room, rcvbuf=2048, token=AUTHORITY.mint(Role.BIDDER, "me", NAME))
    await me.open()
    me.pause()
    price = 10
    cids = []
    for i in range(30):
        price += 30
        cid = f"c{i}"
        cids.append(cid)
        await me.ws.send(msgpack.packb({"type": "bid", "cid": cid, "lot": lot,
                                        "amount": price}))
        await asyncio.gather(*(o.request("bid", lot=lot, amount=price + 10 * (k + 1))
                               for k, o in enumerate(others)))
    head = (await host.request("ping"))["offset"]
    me.resume()
    await until(lambda: bool(me.offsets()) and me.offsets()[-1] >= head)
    messages = me.messages()  # every frame decodes whole: no bytes interleaved
    acks = [m for m in messages if m["type"] in ("ack", "error") and m.get("for") == "bid"]
    assert [m["cid"] for m in acks] == cids
    offsets = me.offsets()
    assert offsets == list(range(offsets[0], head + 1))
    await me.close()
    for c in (host, *others):
        await c.close()
