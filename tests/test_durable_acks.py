"""Durable acks (issue 13, the `redis_ack` setting): with `wait` a bid is answered only after
`WAIT 1 <timeout>` confirms a replica has it, else `unavailable`; `auto` waits only while the
primary has a connected replica; `off` never waits. Real redis-servers (one Redis with and without
a replica, and the 3 + 3 Redis Cluster), real nodes; the fault is a replica stopped with SIGSTOP
(it stays connected but confirms nothing), resumed before the test ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis

from lotcast import keys
from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.interactive.functions import AckPolicy, durability_from
from lotcast.redis_cluster import LocalRedisCluster
from lotcast.redis_server import RedisServer

AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
NO_LIMITS = ("--bid-rate", "0", "--vote-rate", "0", "--ws-msg-rate", "0")
# Long enough for a running replica on a loaded machine, short enough for a stopped one.
WAIT_MS = "2000"


class ReplicaServer(RedisServer):
    """A redis-server replicating `primary` (same durability settings)."""

    def __init__(self, primary: RedisServer) -> None:
        super().__init__()
        self.primary_port = primary.port

    def extra_args(self) -> list[str]:
        return ["--replicaof", "127.0.0.1", str(self.primary_port)]


def wait_replica_online(primary: RedisServer, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with redis.Redis(port=primary.port) as c:
            info = c.info("replication")
        if info.get("connected_slaves") == 1 and info.get("slave0", {}).get("state") == "online":
            return
        time.sleep(0.1)
    raise AssertionError(f"replica not online: {info}")


@contextlib.contextmanager
def stopped(pid: int | None) -> Iterator[None]:
    """The fault: a replica that is connected but confirms nothing."""
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def node(redis_url: str, policy: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[DevServerProcess]:
    with monkeypatch.context() as env:
        env.setenv("LOTCAST_REDIS_ACK", policy)
        env.setenv("LOTCAST_REDIS_WAIT_TIMEOUT_MS", WAIT_MS)
        srv = DevServerProcess(redis_url, *NO_LIMITS, jwt_secret=DEV_JWT_SECRET).start()
    try:
        yield srv
    finally:
        srv.stop()


async def open_lot(url: str, room: str) -> str:
    host = RoomClient(url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
    await host.connect()
    try:
        created = await host.request("lot_create", title="Vase", start_price=10,
                                     increments=[[0, 1]], duration_ms=600_000, soft_close_ms=0)
        assert created["type"] == "ack", created
        opened = await host.request("lot_open", lot=created["lot"])
        assert opened["type"] == "ack", opened
        return str(created["lot"])
    finally:
        await host.close()


async def bid(url: str, room: str, lot: str, amount: int, key: str) -> dict[str, Any]:
    client = RoomClient(url, room, AUTHORITY.mint(Role.BIDDER, "alice", "Alice"))
    await client.connect()
    try:
        return await client.request("bid", lot=lot, amount=amount, key=key, within=20)
    finally:
        await client.close()


def logged_bids(client: redis.Redis, room: str) -> list[dict[str, Any]]:
    entries: Any = client.xrange(keys.room_log(room))
    events = [msgpack.unpackb(f[b"e"], raw=False) for _, f in entries]
    return [e for e in events if e["type"] == "bid"]


def test_the_policy_is_a_setting() -> None:
    assert [durability_from(p, 500).policy for p in ("off", "wait", "auto")] == [
        AckPolicy.OFF, AckPolicy.WAIT, AckPolicy.AUTO]
    with pytest.raises(ValueError, match="redis_ack must be one of off, wait, auto"):
        durability_from("always", 500)


@pytest.mark.timeout(90)
async def test_without_a_replica_wait_refuses_and_auto_and_off_do_not_wait(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """One Redis and no replica (the session's): `wait` can never be confirmed."""
    room = "acks-no-replica"
    with redis.Redis(port=redis_server.port) as c:
        c.flushall()
        assert c.info("replication")["connected_slaves"] == 0
    with node(redis_server.url, "off", monkeypatch) as off:
        lot = await open_lot(off.url, room)
        assert (await bid(off.url, room, lot, 10, "k-off"))["status"] == "winning"
        with node(redis_server.url, "auto", monkeypatch) as auto:
            reply = await bid(auto.url, room, lot, 11, "k-auto")
            assert reply["type"] == "ack" and reply["status"] == "winning", reply
        with node(redis_server.url, "wait", monkeypatch) as wait:
            reply = await bid(wait.url, room, lot, 12, "k-wait")
            assert reply["type"] == "error" and reply["code"] == "unavailable", reply
            # the host's lot actions are durable calls too
            host = RoomClient(wait.url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
            await host.connect()
            try:
                reply = await host.request("lot_extend", lot=lot, by_ms=1000, within=20)
                assert reply["type"] == "error" and reply["code"] == "unavailable", reply
            finally:
                await host.close()
        # the refused bid is on the primary (no replica to lose it to): a retry with its key,
        # on any node, answers the stored result as a duplicate
        again = await bid(off.url, room, lot, 12, "k-wait")
        assert again["type"] == "ack" and again["duplicate"] is True, again


@pytest.mark.timeout(120)
async def test_with_a_replica_wait_acks_once_it_has_the_bid_and_never_without(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    room = "acks-replica"
    primary = RedisServer(data_dir=tmp_path / "primary")
    primary.start()
    replica = ReplicaServer(primary)
    try:
        replica.start()
        wait_replica_online(primary)
        for policy in ("wait", "auto"):  # auto: the primary has a connected replica
            with node(primary.url, policy, monkeypatch) as srv:
                lot = await open_lot(srv.url, f"{room}-{policy}")
                first = await bid(srv.url, f"{room}-{policy}", lot, 10, "k1")
                assert first["type"] == "ack" and first["status"] == "winning", first
                with stopped(replica.pid):
                    refused = await bid(srv.url, f"{room}-{policy}", lot, 20, "k2")
                    assert refused["type"] == "error" and refused["code"] == "unavailable", \
                        (policy, refused)
                # resumed, the replica catches up: the retry is confirmed and is the first
                # attempt's result (same offset), not a second bid
                again = await bid(srv.url, f"{room}-{policy}", lot, 20, "k2")
                assert again["type"] == "ack" and again["duplicate"] is True, again
                with redis.Redis(port=replica.port) as c:
                    bids = logged_bids(c, f"{room}-{policy}")
                assert [(b["amount"], b["offset"]) for b in bids] == [
                    (10, first["offset"]), (20, again["offset"])], bids
        with node(primary.url, "off", monkeypatch) as srv, stopped(replica.pid):
            lot = await open_lot(srv.url, f"{room}-off")
            reply = await bid(srv.url, f"{room}-off", lot, 10, "k1")
            assert reply["type"] == "ack" and reply["status"] == "winning", reply
    finally:
        replica.close()
        primary.close()


@pytest.mark.timeout(150)
async def test_on_the_cluster_wait_is_per_shard(redis_cluster: LocalRedisCluster,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped replica refuses its own shard's acks only; the other shards keep acking."""
    from test_redis_cluster import rooms_on_each_primary

    redis_cluster.wait_ok(60)
    rooms = rooms_on_each_primary(redis_cluster, "acks")
    shards = {s.primary_port: s for s in redis_cluster.shards()}
    victim_room, other_room = rooms[0], rooms[1]
    primary = redis_cluster.primary_for(keys.room_seq(victim_room))
    (replica_port,) = shards[primary.port].replica_ports
    replica = redis_cluster.node_on_port(replica_port)
    with node(redis_cluster.url, "wait", monkeypatch) as srv:
        lots = {r: await open_lot(srv.url, r) for r in (victim_room, other_room)}
        with stopped(replica.pid):
            refused = await bid(srv.url, victim_room, lots[victim_room], 10, "k1")
            assert refused["type"] == "error" and refused["code"] == "unavailable", refused
            fine = await bid(srv.url, other_room, lots[other_room], 10, "k1")
            assert fine["type"] == "ack" and fine["status"] == "winning", fine
        again = await bid(srv.url, victim_room, lots[victim_room], 10, "k1")
        assert again["type"] == "ack" and again["duplicate"] is True, again
        with replica.client() as c:
            c.execute_command("READONLY")
            bids = logged_bids(c, victim_room)
        assert [(b["amount"], b["offset"]) for b in bids] == [(10, again["offset"])], bids
    redis_cluster.wait_ok(60)  # the replica streams again before the next test
