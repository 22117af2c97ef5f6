"""The interactive layer on a real Redis Cluster (3 primaries + 3 replicas on loopback).

Redis 7 itself refuses a Function that touches a key outside its call's slot ("Script attempted
to access keys that do not hash to the same slot" / "a non local key"), and the node answers
such a refusal `unavailable`: so every client action below answering anything but `unavailable`
or `internal`, plus every key landing in its room's slot or the {global} slot, is the check that
keys.py and the Lua agree on one slot per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import redis
from redis.crc import key_slot

from lotcast import keys, redisconn
from lotcast.auth import Identity, Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.interactive.functions import RoomFunctions
from lotcast.interactive.hub import CATCH_UP, RoomHub
from lotcast.interactive.protocol import CloseCode, CloseLot, CreateLot, OpenLot, PlaceBid
from lotcast.interactive.roomlog import RoomLog
from lotcast.interactive.store import AuctionStore, RateLimit
from lotcast.redis_cluster import LocalRedisCluster

AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
NO_LIMITS = ("--bid-rate", "0", "--vote-rate", "0", "--ws-msg-rate", "0")
BROKEN = {"unavailable", "internal"}


def rooms_on_each_primary(cluster: LocalRedisCluster, prefix: str) -> list[str]:
    """One room name per primary (by the slot of its {room} tag)."""
    shards = cluster.shards()
    found: dict[int, str] = {}
    for i in range(10_000):
        room = f"{prefix}-{i}"
        slot = key_slot(keys.room_seq(room).encode())
        for shard in shards:
            if shard.primary_port not in found and any(lo <= slot <= hi for lo, hi in shard.slots):
                found[shard.primary_port] = room
        if len(found) == len(shards):
            return [found[s.primary_port] for s in shards]
    raise AssertionError("no room name for some primary")


@pytest.fixture(scope="module")
def redis_server(redis_any: Any) -> Any:
    """redis_client (the rewind test) runs against one Redis and against the cluster."""
    return redis_any


@pytest.fixture(scope="module")
def node(redis_cluster: LocalRedisCluster) -> Iterator[DevServerProcess]:
    with DevServerProcess(redis_cluster.url, *NO_LIMITS, jwt_secret=DEV_JWT_SECRET) as srv:
        yield srv


async def check(client: RoomClient, kind: str, **fields: Any) -> dict[str, Any]:
    reply = await client.request(kind, **fields)
    assert reply["type"] == "ack" or reply.get("code") not in BROKEN, (kind, reply)
    return reply


async def every_action(url: str, room: str) -> None:
    """Every client message type at least once, with valid fields (some refused by the rules,
    which is fine: the refusal came from a Function that ran)."""
    host = RoomClient(url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
    alice = RoomClient(url, room, AUTHORITY.mint(Role.BIDDER, "alice", "Alice"))
    bob = RoomClient(url, room, AUTHORITY.mint(Role.BIDDER, "bob", "Bob"))
    watcher = RoomClient(url, room)
    for c in (host, alice, bob, watcher):
        await c.connect()
    try:
        lot = (await check(host, "lot_create", title="Vase", start_price=100,
                           increments=[[0, 10]], duration_ms=60_000, soft_close_ms=5_000,
                           reserve=150, buy_now=10_000))["lot"]
        await check(alice, "prebid", lot=lot, max=300)
        await check(host, "lot_open", lot=lot)
        await check(bob, "bid", lot=lot, amount=200, max=400, key="k1")
        await check(bob, "bid", lot=lot, amount=200, max=400, key="k1")  # a duplicate
        await check(host, "lot_extend", lot=lot, by_ms=1000)
        await check(host, "lot_close", lot=lot)
        unsold = (await check(host, "lot_create", title="Jug", start_price=100,
                              increments=[[0, 10]], duration_ms=1000, soft_close_ms=0))["lot"]
        await check(host, "lot_open", lot=unsold)
        await check(host, "lot_close", lot=unsold)
        rerun = (await check(host, "lot_rerun", lot=unsold, open=True))["lot"]
        await check(host, "lot_close", lot=rerun)
        poll = (await check(host, "poll_open", question="Colour?", options=["red", "blue"],
                            duration_ms=60_000))["poll"]
        await check(alice, "vote", poll=poll, option=1)
        await check(host, "poll_close", poll=poll)
        await check(alice, "react", reaction="heart")
        giveaway = (await check(host, "giveaway_open", item="Mug"))["giveaway"]
        await check(alice, "giveaway_enter", giveaway=giveaway)
        await check(bob, "giveaway_enter", giveaway=giveaway)
        await check(host, "giveaway_draw", giveaway=giveaway)
        await check(host, "giveaway_proof", giveaway=giveaway)
        other = (await check(host, "giveaway_open", item="Cap"))["giveaway"]
        await check(host, "giveaway_cancel", giveaway=other)
        said = await check(alice, "chat", text="is it signed?")
        await check(host, "question_mark", message=said["message"])
        await check(bob, "question_upvote", question=said["message"])
        await check(host, "question_answer", question=said["message"])
        gone = await check(bob, "chat", text="spam")
        await check(host, "chat_delete", message=gone["message"])
        await check(host, "slow_mode", seconds=0)
        await check(host, "blocked_words", words=["badword"])
        await check(host, "moderator_grant", user="bob")
        await check(host, "moderator_revoke", user="bob")
        await check(host, "user_mute", user="bob", seconds=60)
        await check(host, "user_unmute", user="bob")
        await check(host, "user_ban", user="bob")
        await check(host, "user_unban", user="bob")
        await check(host, "ping")
        resumed = RoomClient(url, room)
        await resumed.connect(resume=(watcher.state.epoch, 1))  # a replay from the log
        await resumed.close()
    finally:
        for c in (host, alice, bob, watcher):
            await c.close()


@pytest.mark.timeout(120)
async def test_every_action_keeps_to_its_rooms_slot(redis_cluster: LocalRedisCluster,
                                                    node: DevServerProcess) -> None:
    redis_cluster.flushall()  # so every key found below was written by these rooms' calls
    rooms = rooms_on_each_primary(redis_cluster, "slots")
    for room in rooms:
        await every_action(node.url, room)
    client = redisconn.connect(redis_cluster.url)
    try:
        allowed = {key_slot(keys.room_seq(r).encode()) for r in rooms} | {
            key_slot(keys.ACTIVE_ROOMS.encode())}
        found: list[bytes] = await client.keys("*", target_nodes="primaries")  # type: ignore
        assert len(found) > 20 * len(rooms)
        for key in found:
            tag_ok = key.startswith(keys.GLOBAL.encode()) or any(
                key.startswith(keys.room_prefix(r).encode()) for r in rooms)
            assert tag_ok and key_slot(key) in allowed, key
        # both libraries, current version, on every primary (replicas hold them by replication)
        for shard in redis_cluster.shards():
            with redis_cluster.node_on_port(shard.primary_port).client() as c:
                libs: Any = c.function_list()
            names = {dict(zip(lib[::2], lib[1::2], strict=True))[b"library_name"]
                     for lib in libs}
            assert names == {keys.FUNCTION_LIBRARY.encode(),
                             keys.SHOW_FUNCTION_LIBRARY.encode()}
    finally:
        await client.aclose()


@pytest.mark.timeout(120)
async def test_rooms_spread_over_every_primary_and_bid_while_the_others_are_busy(
        redis_cluster: LocalRedisCluster, node: DevServerProcess) -> None:
    rooms = rooms_on_each_primary(redis_cluster, "spread")
    owners = {redis_cluster.primary_for(keys.room_seq(r)).port for r in rooms}
    assert len(owners) == 3
    hosts = [RoomClient(node.url, r, AUTHORITY.mint(Role.HOST, "host", "Host")) for r in rooms]
    for h in hosts:
        await h.connect()
    lots = []
    for h in hosts:
        lot = (await h.request("lot_create", title="t", start_price=1, increments=[[0, 1]],
                               duration_ms=120_000, soft_close_ms=0))["lot"]
        await h.request("lot_open", lot=lot)
        lots.append(lot)
    busy = [RoomClient(node.url, r, AUTHORITY.mint(Role.BIDDER, f"busy{i}", "B"))
            for i, r in enumerate(rooms[:2] * 5)]
    await asyncio.gather(*(b.connect() for b in busy))
    stop = asyncio.Event()

    async def hammer(client: RoomClient, lot: str) -> int:
        n = 0
        while not stop.is_set() and n < 400:
            reply = await client.request("bid", lot=lot, amount=1 + random.randrange(10**6))
            assert reply["type"] == "ack" or reply["code"] == "bid_too_low", reply
            n += 1
        return n

    load = [asyncio.create_task(hammer(b, lots[i % 2])) for i, b in enumerate(busy)]
    quiet = RoomClient(node.url, rooms[2], AUTHORITY.mint(Role.BIDDER, "q", "Q"))
    await quiet.connect()
    try:
        for amount in range(10, 30):
            reply = await quiet.request("bid", lot=lots[2], amount=amount)
            assert reply["type"] == "ack" and reply["status"] == "winning", reply
    finally:
        stop.set()
        done = await asyncio.gather(*load)
        assert sum(done) > 0
        for c in (*hosts, *busy, quiet):
            await c.close()


# --- failover -------------------------------------------------------------------------------


@pytest.fixture
def own_cluster() -> Iterator[LocalRedisCluster]:
    """A cluster of its own: the test kills one of its primaries."""
    with LocalRedisCluster(primaries=3, replicas=1) as cluster:
        yield cluster


def room_log(cluster: LocalRedisCluster, room: str) -> list[dict[str, Any]]:
    primary = cluster.primary_for(keys.room_seq(room))
    with primary.client() as c:
        entries: Any = c.xrange(keys.room_log(room))
    return [msgpack.unpackb(f[b"e"], raw=False) for _, f in entries]


@pytest.mark.timeout(240)
async def test_failover_mid_auction_loses_no_acknowledged_bid(
        own_cluster: LocalRedisCluster) -> None:
    room = "failover"
    with DevServerProcess(own_cluster.url, *NO_LIMITS, "--node-id", "node-a",
                          jwt_secret=DEV_JWT_SECRET) as a, \
            DevServerProcess(own_cluster.url, *NO_LIMITS, "--node-id", "node-b",
                             jwt_secret=DEV_JWT_SECRET) as b:
        nodes = [a, b]
        host = RoomClient(a.url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
        await host.connect()
        watchers = [RoomClient(n.url, room) for n in nodes]
        for w in watchers:
            await w.connect()
        lot = (await host.request("lot_create", title="Hot", start_price=100,
                                  increments=[[0, 1]], duration_ms=600_000,
                                  soft_close_ms=0))["lot"]
        assert (await host.request("lot_open", lot=lot))["type"] == "ack"
        bidders = [RoomClient(nodes[i % 2].url, room,
                              AUTHORITY.mint(Role.BIDDER, f"u{i}", f"U{i}")) for i in range(20)]
        await asyncio.gather(*(c.connect() for c in bidders))
        acked: dict[tuple[str, str], dict[str, Any]] = {}  # (user, key) -> ack
        unavailable = 0
        wrong: list[Any] = []
        closes: list[int | None] = []
        stop = asyncio.Event()

        async def bid_until_stopped(i: int, client: RoomClient) -> None:
            nonlocal unavailable
            n = 0
            while not stop.is_set() and n < 2000:
                n += 1
                key = f"{i}-{n}"
                amount = 100 + n * 40 + i  # distinct per bidder
                retry_until = time.monotonic() + 60  # the failover gap, however long it lasts
                while True:  # retry one bid (same idempotency key) until answered
                    try:
                        reply = await client.request("bid", lot=lot, amount=amount, key=key,
                                                     within=15)
                    except ConnectionError:
                        # the node closed the socket (RESYNC: its room log view was reset):
                        # what a client does, reconnect and send the same bid again
                        closes.append(client.close_code)
                        client = RoomClient(client.url.rsplit("/ws/", 1)[0].replace(
                            "ws://", "http://"), room, client.token)
                        bidders[i] = client
                        await client.connect()
                        continue
                    except TimeoutError:
                        wrong.append(("no answer", i, key))
                        return
                    if (reply["type"] == "error" and reply["code"] == "unavailable"
                            and time.monotonic() < retry_until):
                        unavailable += 1
                        await asyncio.sleep(0.05)
                        continue
                    break
                if reply["type"] == "ack":
                    acked[(f"u{i}", key)] = reply
                elif reply.get("code") != "bid_too_low":
                    wrong.append(reply)

        tasks = [asyncio.create_task(bid_until_stopped(i, c)) for i, c in enumerate(bidders)]
        try:
            await asyncio.sleep(1.5)
            before = len(acked)
            assert before > 0
            victim = own_cluster.primary_for(keys.room_seq(room))
            victim.stop(kill=True)  # kill -9 mid-auction
            await asyncio.to_thread(own_cluster.wait_ok, 60)  # its replica is promoted
            promoted = own_cluster.primary_for(keys.room_seq(room))
            assert promoted.port != victim.port
            # bids keep being acknowledged after the promotion, through both nodes
            for _ in range(300):
                if len(acked) > before + 40 and unavailable > 0:
                    break
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        assert not wrong, wrong[:5]
        # a node may have reset sockets whose room log lost unreplicated events: only RESYNC
        assert all(code == int(CloseCode.RESYNC) for code in closes), closes
        assert unavailable > 0  # the gap was answered `unavailable`, not silently
        assert len(acked) > before
        close = await host.request("lot_close", lot=lot)
        assert close["type"] == "ack", close

        events = room_log(own_cluster, room)
        offsets = [e["offset"] for e in events]
        assert offsets == list(range(1, len(events) + 1))  # no gap
        bids = {(e["bidder"], e["amount"], e["offset"]) for e in events if e["type"] == "bid"}
        for (user, _key), ack in acked.items():  # every acknowledged bid is in the log
            assert any(u == user and o == ack["offset"] for u, _, o in bids), (user, ack)
        ends = [e for e in events if e["type"] in ("lot_sold", "lot_unsold")]
        assert len(ends) == 1 and ends[0]["lot"] == lot
        # nodes started before the failover follow the new topology: their watchers (fed by
        # sharded pub/sub re-placed on the promoted primary) see the lot end
        for i in range(len(watchers)):
            for attempt in range(2):
                w = watchers[i]
                if w.close_code is not None:
                    # its node reset the room's sockets (RESYNC, as for the bidders above): what
                    # a client does, reconnect; the snapshot says how the lot ended
                    assert attempt == 0 and w.close_code == int(CloseCode.RESYNC), w.close_code
                    w = watchers[i] = RoomClient(nodes[i].url, room)
                    await w.connect()
                try:
                    await w.wait_for(
                        lambda s: s.lots.get(lot, {}).get("status") in ("sold", "unsold"),
                        within=30)
                    break
                except TimeoutError:
                    if attempt or w.close_code is None:  # still open: it really missed the end
                        raise
        for c in (host, *watchers, *bidders):
            with contextlib.suppress(Exception):
                await c.close()


def test_cluster_fixture_has_a_replica_per_primary(redis_cluster: LocalRedisCluster) -> None:
    shards = redis_cluster.shards()
    assert len(shards) == 3
    assert all(len(s.replica_ports) == 1 for s in shards)
    assert sum(hi - lo + 1 for s in shards for lo, hi in s.slots) == 16384
    with pytest.raises(redis.ResponseError, match="hash to the same slot"):
        with redis_cluster.node_on_port(shards[0].primary_port).client() as c:
            c.execute_command("FCALL", f"{keys.FUNCTION_LIBRARY}_head", 2,
                              keys.room_seq("a"), keys.ACTIVE_ROOMS)


@pytest.mark.timeout(60)
async def test_a_log_that_lost_its_newest_events_gets_a_new_epoch(
        redis_client: Any) -> None:
    """What a failover that lost unreplicated writes looks like to a hub: the log (and seq) are
    behind what it delivered. Injected by trimming the log; the hub must resync, not skip."""
    room = "rewound"
    functions = RoomFunctions(redis_client, 1000)
    await functions.load()
    store = AuctionStore(functions, RateLimit(0, 0))
    hub = RoomHub(room, RoomLog(redis_client, functions), 0.01, 0.2)
    await hub.start()
    closed: list[CloseCode] = []

    class Sock:
        user_id = ""

        def push(self, frame: bytes) -> None:
            pass

        def close_soon(self, code: CloseCode, reason: str) -> None:
            closed.append(code)

    hub.attach(Sock())
    lot = (await store.create_lot(room, CreateLot(cid=1, title="t", start_price=1,
                                                  increments=((0, 1),), duration_ms=60_000,
                                                  soft_close_ms=0)))["lot"]
    await store.open_lot(room, OpenLot(cid=1, lot=lot))
    for amount in range(1, 6):
        await store.place_bid(room, Identity(Role.BIDDER, "u", "U"),
                              PlaceBid(cid=1, lot=lot, amount=amount))
    hub.feed(CATCH_UP)
    for _ in range(200):
        if hub.offset == 7:
            break
        await asyncio.sleep(0.01)
    assert hub.offset == 7
    epoch = hub.epoch
    hub.feed(CATCH_UP)  # nothing lost: no resync
    await asyncio.sleep(0.2)
    assert closed == [] and hub.epoch == epoch
    # the fault: the newest two events never reached the replica that took over
    await redis_client.xdel(keys.room_log(room), "0-6", "0-7")
    await redis_client.execute_command("XSETID", keys.room_log(room), "0-5")
    await redis_client.set(keys.room_seq(room), 5)
    await store.place_bid(room, Identity(Role.BIDDER, "v", "V"),
                          PlaceBid(cid=1, lot=lot, amount=50))  # reuses offset 6
    hub.feed(CATCH_UP)
    for _ in range(200):
        if closed:
            break
        await asyncio.sleep(0.01)
    assert closed == [CloseCode.RESYNC]
    assert hub.epoch != epoch
    assert (await redis_client.get(keys.room_epoch(room))).decode() == hub.epoch
    await hub.close()


class NextVersion(RoomFunctions):
    """The library as the next release would load it: same Lua, version 3."""

    LIBRARY = "lotcast_v3"
    VERSION = "3"


@pytest.mark.timeout(60)
async def test_two_library_versions_never_write_one_room(redis_client: Any) -> None:
    room = "upgrade"
    old = RoomFunctions(redis_client, 1000)
    new = NextVersion(redis_client, 1000)
    await old.load()
    await new.load()  # side by side: the function names differ
    old_store, new_store = AuctionStore(old, RateLimit(0, 0)), AuctionStore(new, RateLimit(0, 0))
    lot = (await old_store.create_lot(room, CreateLot(
        cid=1, title="t", start_price=1, increments=((0, 1),), duration_ms=60_000,
        soft_close_ms=0)))["lot"]
    await old_store.open_lot(room, OpenLot(cid=1, lot=lot))
    bidder = Identity(Role.BIDDER, "u", "U")
    with pytest.raises(redis.exceptions.ResponseError, match="LOTCAST_LIBRARY 2 owns"):
        await new_store.place_bid(room, bidder, PlaceBid(cid=1, lot=lot, amount=5))
    assert (await new.call("head", room))[1] == 2  # reads are served by any version
    await old_store.place_bid(room, bidder, PlaceBid(cid=1, lot=lot, amount=5))
    await old_store.close_lot(room, CloseLot(cid=1, lot=lot))
    # idle now: the next version takes the room with its first write, and the old one is out
    lot2 = (await new_store.create_lot(room, CreateLot(
        cid=1, title="t", start_price=1, increments=((0, 1),), duration_ms=60_000,
        soft_close_ms=0)))["lot"]
    await new_store.open_lot(room, OpenLot(cid=1, lot=lot2))
    assert await redis_client.get(keys.room_lib(room)) == b"3"
    with pytest.raises(redis.exceptions.ResponseError, match="LOTCAST_LIBRARY 3 owns"):
        await old_store.place_bid(room, bidder, PlaceBid(cid=1, lot=lot2, amount=7))
    # the upgrade rolled back and v3's library was deleted: v2 takes over the busy room
    if redisconn.is_cluster(redis_client):
        for node in redisconn.as_cluster(redis_client).get_primaries():
            await node.execute_command("FUNCTION", "DELETE", "lotcast_v3")
    else:
        await redis_client.function_delete("lotcast_v3")
    out = await old_store.place_bid(room, bidder, PlaceBid(cid=1, lot=lot2, amount=7))
    assert out.status == "winning"
    assert await redis_client.get(keys.room_lib(room)) == b"2"
