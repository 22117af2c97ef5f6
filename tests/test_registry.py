"""NodeRegistry against a real redis-server: heartbeats, drain, TTL expiry, deregistration."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from lotcast import keys
from lotcast.ops.node import InvalidStateError, NodeInfo, NodeLoad, NodeState
from lotcast.ops.placement import PlacementDecision, RelaySelector
from lotcast.ops.registry import NodeRegistry, place_viewer, read_live_nodes

pytestmark = pytest.mark.timeout(60)

INTERVAL = 0.3


def make(redis: aioredis.Redis, node_id: str, load: list[NodeLoad] | None = None,
         capacity: int = 5, ttl: float | None = None) -> NodeRegistry:
    box = load if load is not None else [NodeLoad()]
    return NodeRegistry(
        redis,
        node_id=node_id,
        url=f"http://127.0.0.1:1/{node_id}",
        capacity=capacity,
        heartbeat_interval=INTERVAL,
        ttl=ttl,
        load_probe=lambda: box[0],
        cpu_probe=lambda: 0.25,
    )


async def wait_for(predicate: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def ids(redis: aioredis.Redis) -> list[str]:
    return [n.node_id for n in await read_live_nodes(redis)]


async def test_start_publishes_at_once_with_ttl(redis_client: aioredis.Redis) -> None:
    load = [NodeLoad(viewers=3, egress_bps=4.5e6, streams={"main": 0}, sockets=2)]
    reg = make(redis_client, "r1", load)
    await reg.start()
    try:
        (node,) = await read_live_nodes(redis_client)
        assert node.node_id == "r1"
        assert node.state is NodeState.SERVING
        assert (node.viewers, node.capacity, node.sockets) == (3, 5, 2)
        assert node.cpu == pytest.approx(0.25)
        assert node.egress_bps == pytest.approx(4.5e6)
        assert dict(node.streams) == {"main": 0}
        pttl = await redis_client.pttl(keys.node("r1"))
        assert 0 < pttl <= 3 * INTERVAL * 1000
    finally:
        await reg.close()


async def test_heartbeat_refreshes_load(redis_client: aioredis.Redis) -> None:
    load = [NodeLoad(viewers=1)]
    # A roomy TTL: this test is about refreshing, not expiry (a busy CI box may delay beats).
    async with make(redis_client, "r1", load, ttl=10 * INTERVAL):
        load[0] = NodeLoad(viewers=4, streams={"a": 1})

        async def updated() -> bool:
            nodes = await read_live_nodes(redis_client)
            return bool(nodes) and nodes[0].viewers == 4
        await wait_for(updated)
        # Several intervals later it is still there: the TTL keeps being refreshed.
        await asyncio.sleep(4 * INTERVAL)
        assert await ids(redis_client) == ["r1"]
        assert await redis_client.pttl(keys.node("r1")) > 10 * INTERVAL * 1000 - 4 * INTERVAL * 1000


async def test_dead_node_expires_within_ttl(redis_client: aioredis.Redis) -> None:
    a, b = make(redis_client, "a"), make(redis_client, "b")
    await a.start()
    await b.start()
    try:
        assert await ids(redis_client) == ["a", "b"]
        # "kill -9": the heartbeat stops, nothing is deleted.
        await a.close(deregister=False)
        assert a.last_published is not None
        last_beat = a.last_published.heartbeat_ms / 1000

        async def gone() -> bool:
            return await ids(redis_client) == ["b"]
        await wait_for(gone, within=10)
        # Redis expires the key server-side: within the TTL, plus polling slack on a busy box.
        assert time.time() - last_beat <= a.ttl + 3.0
        # The reader pruned the index too.
        assert await redis_client.zrange(keys.NODES_INDEX, 0, -1) == [b"b"]
    finally:
        await b.close()


async def test_close_deregisters_at_once(redis_client: aioredis.Redis) -> None:
    reg = make(redis_client, "r1")
    await reg.start()
    await reg.close()
    assert await ids(redis_client) == []
    assert await redis_client.exists(keys.node("r1")) == 0
    assert reg.state is NodeState.STOPPED
    await reg.close()  # idempotent


async def test_drain_is_published_immediately_and_placement_skips_it(
    redis_client: aioredis.Redis,
) -> None:
    a = make(redis_client, "a", [NodeLoad(viewers=0, streams={"s": 0})])
    b = make(redis_client, "b", [NodeLoad(viewers=4, streams={"s": 0})])
    async with a, b:
        # Freshness is the TTL's job here (tested above); a loaded CI machine may delay beats.
        selector = RelaySelector(stale_after=60)
        now = int(time.time() * 1000)
        first = selector.place(await read_live_nodes(redis_client), "s", now)
        assert first.relay is not None and first.relay.node_id == "a"
        await a.drain()
        assert a.state is NodeState.DRAINING
        nodes = {n.node_id: n for n in await read_live_nodes(redis_client)}
        assert nodes["a"].state is NodeState.DRAINING
        placement = selector.place(nodes.values(), "s", int(time.time() * 1000))
        assert placement.decision is PlacementDecision.SERVE
        assert placement.relay is not None and placement.relay.node_id == "b"
        via_redis = await place_viewer(redis_client, selector, "s", exclude=("b",))
        assert via_redis.decision is PlacementDecision.FULL  # a drains, b is excluded
        await a.drain()  # idempotent
        # It keeps heartbeating as draining until closed.
        await asyncio.sleep(4 * INTERVAL)
        assert {n.node_id: n.state for n in await a.live_nodes()}["a"] is NodeState.DRAINING


async def test_state_machine_rejects_illegal_transitions(redis_client: aioredis.Redis) -> None:
    reg = make(redis_client, "r1")
    with pytest.raises(InvalidStateError):
        await reg.drain()  # not started
    with pytest.raises(InvalidStateError):
        await reg.beat()
    await reg.start()
    with pytest.raises(InvalidStateError):
        await reg.start()
    await reg.drain()
    await reg.close()
    with pytest.raises(InvalidStateError):
        await reg.start()


async def test_heartbeat_survives_redis_errors(redis_client: aioredis.Redis) -> None:
    calls = {"n": 0}
    load = NodeLoad(viewers=1)

    def flaky() -> NodeLoad:
        calls["n"] += 1
        if calls["n"] in (2, 3):
            raise ConnectionError("probe broke")  # an OSError, like a lost connection
        return load

    reg = NodeRegistry(redis_client, node_id="f", url="http://x", capacity=2,
                       heartbeat_interval=0.1, load_probe=flaky, cpu_probe=lambda: 0.0)
    async with reg:
        async def recovered() -> bool:
            return calls["n"] >= 5 and await ids(redis_client) == ["f"]
        await wait_for(recovered)


async def test_malformed_heartbeat_is_ignored(redis_client: aioredis.Redis) -> None:
    await redis_client.hset(keys.node("bad"), mapping={"node_id": "bad", "state": "weird"})
    await redis_client.zadd(keys.NODES_INDEX, {"bad": 1})
    async with make(redis_client, "good"):
        assert await ids(redis_client) == ["good"]


def test_fields_round_trip() -> None:
    info = NodeInfo(node_id="n", url="http://n", state=NodeState.DRAINING, viewers=3,
                    capacity=9, cpu=0.5, egress_bps=1e6, streams={"x": 2}, sockets=4,
                    heartbeat_ms=5, started_ms=1)
    raw = {k.encode(): v.encode() for k, v in info.to_fields().items()}
    assert NodeInfo.from_fields(raw) == info
    with pytest.raises(ValueError):
        NodeInfo.from_fields({"node_id": "n"})


def test_constructor_validates_timing() -> None:
    fake = aioredis.Redis()
    with pytest.raises(ValueError):
        NodeRegistry(fake, node_id="n", url="u", heartbeat_interval=0)
    with pytest.raises(ValueError):
        NodeRegistry(fake, node_id="n", url="u", heartbeat_interval=1.0, ttl=1.0)
