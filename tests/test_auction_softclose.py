"""Soft close and settlement by the server clock: extend inside the window only; sold once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import msgpack
import pytest

from lotcast import keys, redisconn
from lotcast.auth import Identity, Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.interactive.functions import RoomFunctions
from lotcast.interactive.protocol import CreateLot, OpenLot, PlaceBid, ProtocolError
from lotcast.interactive.store import AuctionStore, RateLimit
from lotcast.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server(redis_any: RedisServer) -> RedisServer:
    """Every test here runs against one Redis and against a 3-primary Redis Cluster."""
    return redis_any


AUTHORITY = TokenAuthority(DEV_JWT_SECRET)


@pytest.fixture(scope="module")
def two_nodes(redis_server: RedisServer) -> Iterator[list[DevServerProcess]]:
    with DevServerProcess(redis_server.url, jwt_secret=DEV_JWT_SECRET) as a, \
         DevServerProcess(redis_server.url, jwt_secret=DEV_JWT_SECRET) as b:
        yield [a, b]


async def sleep_until(ms_since_epoch: int) -> None:
    """Redis TIME is this machine's clock, so the local clock says when the server deadline is."""
    await asyncio.sleep(max(0.0, ms_since_epoch / 1000 - time.time()))


async def log_events(url: str, room: str) -> list[dict[str, object]]:
    redis = redisconn.connect(url)
    try:
        return [msgpack.unpackb(f[b"e"], raw=False) for _, f in
                await redis.xrange(keys.room_log(room))]
    finally:
        await redis.aclose()


@pytest.mark.timeout(60)
async def test_soft_close_extends_only_inside_window_and_sells_once(
        two_nodes: list[DevServerProcess], redis_server: RedisServer) -> None:
    room = "soft"
    host = RoomClient(two_nodes[0].url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
    alice = RoomClient(two_nodes[0].url, room, AUTHORITY.mint(Role.BIDDER, "alice", "Alice"))
    bob = RoomClient(two_nodes[1].url, room, AUTHORITY.mint(Role.BIDDER, "bob", "Bob"))
    for c in (host, alice, bob):
        await c.connect()
    lot = (await host.request("lot_create", title="Clock", start_price=100,
                              increments=[[0, 10]], duration_ms=4000,
                              soft_close_ms=1500))["lot"]
    opened = await host.request("lot_open", lot=lot)
    first_end = int(opened["ends_at"])

    outside = await alice.request("bid", lot=lot, amount=100)  # ~4 s left: outside the window
    assert outside["status"] == "winning"
    await sleep_until(first_end - 750)  # ~0.75 s left: inside the 1.5 s window
    inside = await bob.request("bid", lot=lot, amount=200)
    assert inside["status"] == "winning"

    await bob.wait_for(lambda s: s.lots[lot]["status"] == "sold", within=15)
    await alice.wait_for(lambda s: s.lots[lot]["status"] == "sold", within=5)
    events = [e for e in await log_events(redis_server.url, room) if e.get("lot") == lot]
    kinds = [e["type"] for e in events]
    assert kinds == ["lot_created", "lot_opened", "bid", "bid", "lot_extended", "lot_sold"]
    first_bid, second_bid, extended, sold = events[2], events[3], events[4], events[5]
    assert first_bid["ends_at"] == first_end  # no extension outside the window
    assert extended["by"] == "soft_close"
    assert extended["ends_at"] == second_bid["ends_at"] == int(str(second_bid["ts"])) + 1500
    assert int(str(extended["ends_at"])) > first_end
    assert (sold["winner"], sold["price"], sold["by"]) == ("bob", 200, "time")
    assert int(str(sold["ts"])) >= int(str(extended["ends_at"]))  # the server clock decided
    late = await alice.request("bid", lot=lot, amount=1000)
    assert (late["code"], late["state"]) == ("lot_closed", "sold")
    assert alice.state.lots[lot] == bob.state.lots[lot]
    for c in (host, alice, bob):
        await c.close()


@pytest.mark.timeout(60)
async def test_concurrent_settlers_decide_once(redis_server: RedisServer) -> None:
    room = "settle-race"
    redis = redisconn.connect(redis_server.url)
    functions = RoomFunctions(redis, 1000)
    await functions.load()
    store = AuctionStore(functions, RateLimit(0, 0))
    lots = []
    for _ in range(5):
        lot = (await store.create_lot(room, CreateLot(
            cid=1, title="t", start_price=100, increments=((0, 10),), duration_ms=1000,
            soft_close_ms=0, reserve=150)))["lot"]
        opened = await store.open_lot(room, OpenLot(cid=1, lot=lot))
        lots.append(lot)
    await store.place_bid(room, Identity(Role.BIDDER, "u", "U"),
                          PlaceBid(cid=1, lot=lots[0], amount=200))
    await store.place_bid(room, Identity(Role.BIDDER, "u", "U"),
                          PlaceBid(cid=1, lot=lots[1], amount=100))
    await sleep_until(int(opened["ends_at"]) + 50)
    # Twenty settlers (as if on twenty nodes) plus a late bid, all at once.
    results = await asyncio.gather(
        *(store.settle(room) for _ in range(20)),
        store.place_bid(room, Identity(Role.BIDDER, "v", "V"),
                        PlaceBid(cid=1, lot=lots[2], amount=500)),
        return_exceptions=True)
    late = results[-1]
    assert isinstance(late, ProtocolError) and late.code in ("lot_ended", "lot_closed")
    # The servers' own settle loops may win some of these races; never more than once per lot.
    assert sum(r[0] for r in results[:-1] if isinstance(r, tuple)) <= 5
    events = await log_events(redis_server.url, room)
    ends = [(e["lot"], e["type"], e.get("reason")) for e in events
            if e["type"] in ("lot_sold", "lot_unsold")]
    assert sorted(ends) == sorted([(lots[0], "lot_sold", None),
                                   (lots[1], "lot_unsold", "reserve_not_met"),
                                   *[(lot, "lot_unsold", "no_bids") for lot in lots[2:]]])
    assert await redis.zscore(keys.ACTIVE_ROOMS, room) is None
    await redis.aclose()
