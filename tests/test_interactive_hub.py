"""RoomHub against real Redis: lost pub/sub messages are refilled from the log, batches are
coalesced and encoded once, an epoch change forces a resync. Plus keys and layering checks."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable

import msgpack
import pytest
import redis.asyncio as aioredis

from lotcast import keys, redisconn
from lotcast.auth import Identity, Role
from lotcast.interactive.functions import RoomFunctions
from lotcast.interactive.hub import CATCH_UP, RoomHub
from lotcast.interactive.polls import PollStore
from lotcast.interactive.protocol import (
    CloseCode,
    CreateLot,
    OpenLot,
    OpenPoll,
    PlaceBid,
    Vote,
    decode_server_frame,
    encode_viewers,
)
from lotcast.interactive.roomlog import RoomLog
from lotcast.interactive.store import AuctionStore, RateLimit
from lotcast.interactive.subscriptions import Subscriptions, subscriptions_for
from lotcast.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server(redis_any: RedisServer) -> RedisServer:
    """Every test here runs against one Redis and against a 3-primary Redis Cluster."""
    return redis_any


class FakeSocket:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.closed: CloseCode | None = None
        self.changed = asyncio.Event()

    def push(self, frame: bytes) -> None:
        self.frames.append(frame)
        self.changed.set()

    def close_soon(self, code: CloseCode, reason: str) -> None:
        self.closed = code
        self.changed.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    def messages(self) -> list[dict[str, object]]:
        return [m for f in self.frames for m in decode_server_frame(f)]

    def offsets(self) -> list[int]:
        return [int(str(e["offset"])) for m in self.messages() if m["type"] == "events"
                for e in m["events"]]  # type: ignore[attr-defined]


async def setup(redis: aioredis.Redis, room: str, flush: float = 0.05
                ) -> tuple[AuctionStore, RoomHub, Subscriptions, list[bytes]]:
    functions = RoomFunctions(redis, 10000)
    await functions.load()
    store = AuctionStore(functions, RateLimit(0, 0))
    hub = RoomHub(room, RoomLog(redis, functions), flush, 0.2)
    subs = subscriptions_for(redis)  # sharded (SSUBSCRIBE) on a cluster
    dropped: list[bytes] = []
    counter = {"n": 0}

    def lossy(data: bytes) -> None:  # pub/sub that loses every third message
        counter["n"] += 1
        if counter["n"] % 3 == 0:
            dropped.append(data)
        else:
            hub.feed(data)

    await subs.subscribe(keys.room_channel(room), lossy)
    await hub.start()
    return store, hub, subs, dropped


async def make_lot(store: AuctionStore, room: str) -> str:
    lot = str((await store.create_lot(room, CreateLot(
        cid=1, title="t", start_price=10, increments=((0, 1),), duration_ms=600_000,
        soft_close_ms=0)))["lot"])
    await store.open_lot(room, OpenLot(cid=1, lot=lot))
    return lot


async def test_lost_messages_are_refilled_from_the_log(redis_client: aioredis.Redis) -> None:
    room = "lossy"
    store, hub, subs, dropped = await setup(redis_client, room)
    sock = FakeSocket()
    hub.attach(sock)
    lot = await make_lot(store, room)
    for i in range(40):
        await store.place_bid(room, Identity(Role.BIDDER, f"u{i % 2}", "U"),
                              PlaceBid(cid=1, lot=lot, amount=10 + i))
    hub.feed(CATCH_UP)  # what a pub/sub reconnect does: the last message may be among the lost
    await sock.until(lambda: sock.offsets()[-1:] == [42])
    assert dropped and hub.stats.gap_fills > 0
    assert sock.offsets() == list(range(1, 43))
    await hub.close()
    await subs.close()


async def test_batches_are_coalesced_and_shared(redis_client: aioredis.Redis) -> None:
    room = "coalesce"
    store, hub, subs, _ = await setup(redis_client, room, flush=0.2)
    socks = [FakeSocket() for _ in range(3)]
    for s in socks:
        hub.attach(s)
    lot = await make_lot(store, room)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(60):
        await store.place_bid(room, Identity(Role.BIDDER, f"u{i % 2}", "U"),
                              PlaceBid(cid=1, lot=lot, amount=10 + i))
    hub.feed(CATCH_UP)
    await socks[0].until(lambda: socks[0].offsets()[-1:] == [62])
    elapsed = loop.time() - started
    assert socks[0].offsets() == list(range(1, 63))
    assert len(socks[0].frames) <= elapsed / 0.2 + 2 < 62
    assert hub.stats.batches == len(socks[0].frames)
    # Encoded once: every socket got the very same bytes objects.
    assert all(a is b for s in socks[1:] for a, b in zip(socks[0].frames, s.frames, strict=True))
    await hub.close()
    await subs.close()


async def test_epoch_change_resyncs_sockets(redis_client: aioredis.Redis) -> None:
    room = "epoch"
    store, hub, subs, _ = await setup(redis_client, room)
    sock = FakeSocket()
    hub.attach(sock)
    old_epoch = hub.epoch
    await redis_client.flushall()  # the room log is gone (e.g. a Redis without persistence)
    await make_lot(store, room)
    await sock.until(lambda: sock.closed is not None)
    assert sock.closed is CloseCode.RESYNC and hub.epoch != old_epoch
    await hub.close()
    await subs.close()


async def test_lua_keys_match_keys_module(redis_client: aioredis.Redis) -> None:
    room = "keys"
    functions = RoomFunctions(redis_client, 100)
    await functions.load()
    store = AuctionStore(functions, RateLimit(5, 5))
    polls = PollStore(functions, RateLimit(5, 5))
    lot = await make_lot(store, room)
    await store.place_bid(room, Identity(Role.BIDDER, "u", "U"),
                          PlaceBid(cid=1, lot=lot, amount=10, key="k"))
    poll = (await polls.open_poll(room, OpenPoll(cid=1, question="q", options=("a", "b"),
                                                 duration_ms=60_000)))["poll"]
    await polls.vote(room, Identity(Role.BIDDER, "u", "U"), Vote(cid=1, poll=poll, option=0))
    expected = {keys.room_seq(room), keys.room_epoch(room), keys.room_log(room),
                keys.room_ids(room), keys.room_lots(room), keys.room_open_lots(room),
                keys.lot(room, lot), keys.lot_idempotency(room, lot), keys.room_polls(room),
                keys.room_open_polls(room), keys.poll(room, poll), keys.poll_voters(room, poll),
                keys.rate_bucket(room, "bid", "u"), keys.rate_bucket(room, "vote", "u"),
                keys.room_due(room), keys.room_lib(room), keys.ACTIVE_ROOMS}
    every_primary = {"target_nodes": "primaries"} if redisconn.is_cluster(redis_client) else {}
    actual = {k.decode() for k in await redis_client.keys("*", **every_primary)}
    assert actual == expected
    entry = (await redis_client.xrange(keys.room_log(room)))[0]
    assert entry[0] == b"0-1" and msgpack.unpackb(entry[1][b"e"])["offset"] == 1


def test_interactive_layer_does_not_import_media() -> None:
    code = ("import sys, lotcast.interactive.service, lotcast.interactive.devserver, "
            "lotcast.interactive.client; "
            "bad = [m for m in sys.modules if m.startswith(('aiortc', 'aioice', 'av', "
            "'lotcast.media'))]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_preframed_batches_match_websockets_framing() -> None:
    from websockets.frames import Frame, Opcode

    from lotcast.interactive.outbox import _framed

    for size in (0, 1, 125, 126, 127, 65535, 65536, 200_000):
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        expected = Frame(Opcode.BINARY, payload).serialize(mask=False)
        assert _framed(payload) == expected
        assert _framed(payload) is _framed(payload)  # framed once per batch


async def test_fanout_yields_between_chunks_and_keeps_order(
        redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    from lotcast.interactive import hub as hub_module

    monkeypatch.setattr(hub_module, "FANOUT_CHUNK", 2)
    functions = RoomFunctions(redis_client, 100)
    hub = RoomHub("chunks", RoomLog(redis_client, functions), 0.1, 0.2)
    socks = [FakeSocket() for _ in range(5)]
    for s in socks:
        hub.attach(s)
    for count in (1, 2, 3):
        hub._broadcast(encode_viewers(epoch="e", offset=0, count=count))
    # Only the first chunk was served synchronously; the rest waits for later loop turns.
    assert sum(len(s.frames) for s in socks) == 2
    for s in socks:
        await s.until(lambda s=s: len(s.frames) == 3)  # type: ignore[misc]
        assert [m["count"] for m in s.messages()] == [1, 2, 3]
    await hub.close()


async def test_a_join_ramp_sends_a_few_viewers_frames_not_one_per_join(
        redis_client: aioredis.Redis) -> None:
    functions = RoomFunctions(redis_client, 100)
    hub = RoomHub("ramp", RoomLog(redis_client, functions), 0.1, 0.2)
    socks = [FakeSocket() for _ in range(5)]
    for s in socks:
        hub.attach(s)
    for count in range(1, 201):  # 200 sockets join within one tally interval
        hub.set_viewers(count)
    for s in socks:
        await s.until(lambda s=s: bool(s.frames) and s.messages()[-1]["count"] == 200)  # type: ignore[misc]
    await asyncio.sleep(0.3)  # nothing more follows
    for s in socks:
        assert [m["count"] for m in s.messages()] == [200]
    hub.set_viewers(150)
    for s in socks:
        await s.until(lambda s=s: len(s.frames) == 2)  # type: ignore[misc]
        assert s.messages()[-1]["count"] == 150
    await hub.close()


async def test_an_overloaded_fanout_merges_batches_instead_of_queueing(
        redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    from lotcast.interactive import hub as hub_module

    monkeypatch.setattr(hub_module, "FANOUT_CHUNK", 1)  # every socket write takes a loop turn
    functions = RoomFunctions(redis_client, 100)
    hub = RoomHub("busy", RoomLog(redis_client, functions), 0.0, 0.2)
    socks = [FakeSocket() for _ in range(20)]
    for s in socks:
        hub.attach(s)
    await hub.start()
    for offset in range(1, 31):  # events keep arriving while the first batch is being written
        hub._append(offset, msgpack.packb({"type": "x", "offset": offset}))
        hub._flush()
        assert len(hub._fanout_jobs) <= 1  # never a backlog of batches
        await asyncio.sleep(0)
    for s in socks:
        await s.until(lambda s=s: bool(s.frames) and  # type: ignore[misc]
                      s.messages()[-1].get("offset") == 30)
        batches = [m for m in s.messages() if m["type"] == "events"]
        assert len(batches) < 30  # merged while the node was busy
        assert sum(len(b["events"]) for b in batches) == 30  # type: ignore[arg-type]
    await hub.close()
