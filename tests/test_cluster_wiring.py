"""How the interactive layer uses a Redis Cluster (issue 13), seen from the redis-servers:
room events go out with SPUBLISH and each node SSUBSCRIBEs once per room on the room's primary
(one Redis: plain PUBLISH/SUBSCRIBE), a primary that lost the Function library gets it back
without a node restart, and a plain `redis://` URL with `--redis-cluster` is the same cluster
client as a `redis+cluster://` URL. Real redis-servers, real nodes (devserver processes)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from lotcast import keys
from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.redis_cluster import LocalRedisCluster

AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
NO_LIMITS = ("--bid-rate", "0", "--vote-rate", "0", "--ws-msg-rate", "0")


@pytest.fixture(scope="module")
def redis_server(redis_any: Any) -> Any:
    return redis_any


@contextlib.contextmanager
def nodes(url: str, count: int) -> Iterator[list[DevServerProcess]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(DevServerProcess(url, *NO_LIMITS, "--node-id", f"n{i}",
                                                    jwt_secret=DEV_JWT_SECRET))
               for i in range(count)]


def ports(target: Any) -> list[int]:
    """Every primary's port (one Redis: its port)."""
    if isinstance(target, LocalRedisCluster):
        return [s.primary_port for s in target.shards()]
    return [target.port]


def owner_port(target: Any, room: str) -> int:
    if isinstance(target, LocalRedisCluster):
        return target.primary_for(keys.room_seq(room)).port
    return int(target.port)


def numsub(port: int, channel: str, sharded: bool) -> int:
    with redis.Redis(port=port) as c:
        raw: Any = c.execute_command("PUBSUB", "SHARDNUMSUB" if sharded else "NUMSUB", channel)
    return int(raw[1])


class PlainListener:
    """A plain SUBSCRIBE on one node: what a PUBLISH (cluster-wide) would reach."""

    def __init__(self, port: int, channel: str) -> None:
        self.client = redis.Redis(port=port)
        self.pubsub = self.client.pubsub()
        self.pubsub.subscribe(channel)
        self.pubsub.get_message(timeout=5)  # the subscribe confirmation

    def until(self, data: bytes, within: float = 10.0) -> list[bytes]:
        """Every message up to and including `data` (bounded in time)."""
        seen: list[bytes] = []
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            msg = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if msg is not None and msg["type"] == "message":
                seen.append(msg["data"])
                if msg["data"] == data:
                    return seen
        raise AssertionError(f"{data!r} never arrived; got {seen!r}")

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


async def room_with_a_bid(url: str, room: str, watchers: list[RoomClient]) -> None:
    host = RoomClient(url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
    bidder = RoomClient(url, room, AUTHORITY.mint(Role.BIDDER, "alice", "Alice"))
    await host.connect()
    await bidder.connect()
    try:
        lot = (await host.request("lot_create", title="Vase", start_price=10,
                                  increments=[[0, 1]], duration_ms=600_000,
                                  soft_close_ms=0))["lot"]
        assert (await host.request("lot_open", lot=lot))["type"] == "ack"
        reply = await bidder.request("bid", lot=lot, amount=10)
        assert reply["type"] == "ack" and reply["status"] == "winning", reply
        for w in watchers:  # the bid reached every node's sockets through pub/sub
            await w.wait_for(lambda s: any(e["type"] == "bid" for e in s.applied), within=15)
    finally:
        await host.close()
        await bidder.close()


@pytest.mark.timeout(120)
async def test_each_node_subscribes_once_per_room_and_events_stay_in_the_rooms_shard(
        redis_server: Any) -> None:
    cluster = isinstance(redis_server, LocalRedisCluster)
    room = "wiring-pubsub"
    channel = keys.room_channel(room)
    owner = owner_port(redis_server, room)
    others = [p for p in ports(redis_server) if p != owner]
    assert len(others) == (2 if cluster else 0)
    with nodes(redis_server.url, 2) as (a, b):
        watchers = [RoomClient(n.url, room) for n in (a, a, a, b, b)]  # 3 + 2 sockets
        for w in watchers:
            await w.connect()
        listeners = [PlainListener(p, channel) for p in [owner, *others]]
        try:
            # one subscription per node, however many sockets: sharded on the room's primary
            # (nowhere else), plain on one Redis
            if cluster:
                assert numsub(owner, channel, sharded=True) == 2
                assert numsub(owner, channel, sharded=False) == 1  # only our listener
            else:
                assert numsub(owner, channel, sharded=False) == 2 + 1  # and our listener
                assert numsub(owner, channel, sharded=True) == 0
            for port in others:
                assert numsub(port, channel, sharded=True) == 0
                assert numsub(port, channel, sharded=False) == 1  # only our listener
            await room_with_a_bid(a.url, room, watchers)
            # a marker PUBLISHed after the events: what arrived before it is every plain
            # message the room's events caused (PUBLISH order is kept per connection and link)
            marker = b"marker"
            with redis.Redis(port=owner) as c:
                c.publish(channel, marker)
            for listener in listeners:
                seen = listener.until(marker)
                if cluster:  # SPUBLISH: never seen by a plain subscriber, on any node
                    assert seen == [marker], seen
                else:  # one Redis: the events are plain PUBLISHes
                    assert len(seen) >= 3 and seen[-1] == marker, seen
        finally:
            for listener in listeners:
                listener.close()
            for w in watchers:
                await w.close()


@pytest.mark.timeout(120)
async def test_a_primary_that_lost_the_library_gets_it_back_without_a_node_restart(
        redis_server: Any) -> None:
    """A primary that joined empty (or was flushed) answers "function not found": the node loads
    the library on every primary again and the call is retried, answered, not `unavailable`."""
    room = "wiring-reload"
    owner = owner_port(redis_server, room)
    with nodes(redis_server.url, 1) as (srv,):
        host = RoomClient(srv.url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
        bidder = RoomClient(srv.url, room, AUTHORITY.mint(Role.BIDDER, "alice", "Alice"))
        await host.connect()
        await bidder.connect()
        try:
            lot = (await host.request("lot_create", title="Vase", start_price=10,
                                      increments=[[0, 1]], duration_ms=600_000,
                                      soft_close_ms=0))["lot"]
            assert (await host.request("lot_open", lot=lot))["type"] == "ack"
            with redis.Redis(port=owner) as c:
                c.function_flush()
                assert c.function_list() == []
            reply = await bidder.request("bid", lot=lot, amount=10)
            assert reply["type"] == "ack" and reply["status"] == "winning", reply
            with redis.Redis(port=owner) as c:
                libs: Any = c.function_list()
            names = {dict(zip(lib[::2], lib[1::2], strict=True))[b"library_name"]
                     for lib in libs}
            assert keys.FUNCTION_LIBRARY.encode() in names
            # the show library (reactions, giveaways) the same way
            reply = await bidder.request("react", reaction="heart")
            assert reply["type"] == "ack", reply
        finally:
            await host.close()
            await bidder.close()


@pytest.mark.timeout(120)
async def test_a_plain_url_with_the_cluster_flag_is_the_cluster_client(
        redis_cluster: LocalRedisCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--redis-cluster` / LOTCAST_REDIS_CLUSTER=1 with one node's redis:// URL: the node finds
    every shard from that seed and serves a room on each primary, subscribed on its own."""
    from test_redis_cluster import rooms_on_each_primary

    seed = redis_cluster.shards()[0].primary_port
    rooms = rooms_on_each_primary(redis_cluster, "wiring-flag")
    with monkeypatch.context() as env:
        env.setenv("LOTCAST_REDIS_CLUSTER", "1")
        srv = DevServerProcess(f"redis://127.0.0.1:{seed}/0", *NO_LIMITS,
                               jwt_secret=DEV_JWT_SECRET).start()
    try:
        for room in rooms:
            watcher = RoomClient(srv.url, room)
            await watcher.connect()
            try:
                await room_with_a_bid(srv.url, room, [watcher])
                assert numsub(owner_port(redis_cluster, room), keys.room_channel(room),
                              sharded=True) == 1
            finally:
                await watcher.close()
        assert len({owner_port(redis_cluster, r) for r in rooms}) == 3
    finally:
        srv.stop()
