"""NodeRegistry: each node heartbeats its state and load into Redis; anyone can list the live nodes.

Layout (names in `lotcast.keys`):
- `node(node_id)`: a hash with the fields of `NodeInfo.to_fields()`, expiring after `ttl`
  (about 3x the heartbeat interval). A node that dies stops refreshing it, and Redis deletes it
  within the TTL: that is the liveness signal, no clocks compared.
- `NODES_INDEX`: a sorted set of node ids scored by last heartbeat (ms), so listing needs no SCAN.
  Readers drop ids whose hash has expired; writers trim ids not seen for 10 TTLs.

One heartbeat is one MULTI/EXEC (HSET + PEXPIRE + ZADD + ZREMRANGEBYSCORE), so a reader never sees
a hash without its TTL.

A node served by several worker processes (lotcast/workers.py) is still one node to readers:
each worker writes its own heartbeat into `node_workers(node_id)` (field `w<i>`), reads its
siblings' back in the same MULTI, and publishes their sum (`combine_workers`) as the node's
hash. A worker's entry older than the TTL (a killed worker) is left out of the sum and deleted;
the last worker to deregister deletes the node.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Collection
from types import TracebackType
from typing import Any, cast

import psutil  # type: ignore[import-untyped,unused-ignore]
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from lotcast import keys
from lotcast.ops.node import (
    InvalidStateError,
    NodeInfo,
    NodeKind,
    NodeLoad,
    NodeState,
    combine_workers,
)
from lotcast.ops.placement import Placement, RelaySelector

log = logging.getLogger(__name__)

# Seconds close() waits for the cancelled heartbeat task.
CLOSE_TIMEOUT = 5.0

LoadProbe = Callable[[], NodeLoad]
CpuProbe = Callable[[], float]

# Allowed transitions of the local state machine.
_TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    NodeState.STARTING: frozenset({NodeState.SERVING, NodeState.STOPPED}),
    NodeState.SERVING: frozenset({NodeState.DRAINING, NodeState.STOPPED}),
    NodeState.DRAINING: frozenset({NodeState.STOPPED}),
    NodeState.STOPPED: frozenset(),
}


def process_cpu_probe() -> CpuProbe:
    """CPU used by this process since the previous call, as a fraction of one core."""
    proc = psutil.Process()
    proc.cpu_percent(interval=None)  # the first call only sets the baseline

    def probe() -> float:
        return float(proc.cpu_percent(interval=None)) / 100.0

    return probe


async def read_live_nodes(redis: aioredis.Redis) -> list[NodeInfo]:
    """Every node whose heartbeat has not expired, in node-id order."""
    members = cast("list[bytes | str]", await redis.zrange(keys.NODES_INDEX, 0, -1))
    ids = [_text(m) for m in members]
    if not ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for node_id in ids:
            pipe.hgetall(keys.node(node_id))
        hashes = await pipe.execute()
    nodes: list[NodeInfo] = []
    expired: list[str] = []
    for node_id, raw in zip(ids, hashes, strict=True):
        if not raw:
            expired.append(node_id)
            continue
        try:
            nodes.append(NodeInfo.from_fields(raw))
        except ValueError as exc:
            log.warning("ignoring malformed heartbeat of node %s: %s", node_id, exc)
    if expired:
        await redis.zrem(keys.NODES_INDEX, *expired)
    return sorted(nodes, key=lambda n: n.node_id)


async def place_viewer(
    redis: aioredis.Redis,
    selector: RelaySelector,
    stream: str,
    *,
    exclude: Collection[str] = (),
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.time,
) -> Placement:
    """Read the live nodes and ask the selector where a viewer of `stream` goes."""
    nodes = await read_live_nodes(redis)
    return selector.place(nodes, stream, int(clock() * 1000), exclude=exclude, rng=rng)


class NodeRegistry:
    """Owns this node's heartbeat: `start()` registers it as SERVING and heartbeats every
    `heartbeat_interval` seconds; `drain()` publishes DRAINING at once; `close()` stops the
    heartbeat task and (by default) removes the node from the registry.

    `load_probe` is called at every heartbeat for the node's current viewers, egress and streams;
    `cpu_probe` for its CPU load (default: this process's CPU, fraction of one core).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        node_id: str,
        url: str,
        kind: NodeKind = "relay",
        capacity: int = 0,
        heartbeat_interval: float = 1.0,
        ttl: float | None = None,
        load_probe: LoadProbe | None = None,
        cpu_probe: CpuProbe | None = None,
        clock: Callable[[], float] = time.time,
        worker: str | None = None,
    ) -> None:
        if heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be positive")
        self.redis = redis
        self.node_id = node_id
        self.url = url
        self.kind: NodeKind = kind
        self.capacity = capacity
        self.heartbeat_interval = heartbeat_interval
        self.ttl = ttl if ttl is not None else 3 * heartbeat_interval
        if self.ttl <= heartbeat_interval:
            raise ValueError("ttl must be longer than the heartbeat interval")
        self._load_probe = load_probe or NodeLoad
        self._cpu_probe = cpu_probe or process_cpu_probe()
        self._clock = clock
        self._state = NodeState.STARTING
        self._started_ms = self._now_ms()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        # this process's own heartbeat; for a worker, `last_node` is the node's sum
        self.last_published: NodeInfo | None = None
        self.last_node: NodeInfo | None = None
        self.worker = worker

    @property
    def state(self) -> NodeState:
        return self._state

    @property
    def key(self) -> str:
        return keys.node(self.node_id)

    def _set_state(self, new: NodeState) -> None:
        old = self._state
        if new is old:
            return
        if new not in _TRANSITIONS[old]:
            raise InvalidStateError(f'Cannot go to "{new.value}" in node state "{old.value}"')
        log.info("node %s: %s -> %s", self.node_id, old.value, new.value)
        self._state = new

    async def start(self) -> None:
        """Publish the first heartbeat (so the node is placeable on return) and keep beating."""
        if self._state is not NodeState.STARTING:
            raise InvalidStateError(f'Cannot start in node state "{self._state.value}"')
        self._set_state(NodeState.SERVING)
        await self.beat()
        self._task = asyncio.create_task(self._run(), name=f"registry-heartbeat-{self.node_id}")

    async def drain(self) -> None:
        """Mark the node DRAINING in Redis now: placement stops sending viewers here."""
        if self._state is NodeState.DRAINING:
            return
        self._set_state(NodeState.DRAINING)
        await self.beat()

    async def close(self, deregister: bool = True) -> None:
        """Stop heartbeating. With `deregister`, delete the node's entry at once; without it the
        entry expires after the TTL, as if the process had died."""
        if self._state is NodeState.STOPPED:
            return
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded: a heartbeat stuck in a dead connection must not hold up shutdown.
            done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT)
            if not done:
                log.error("node %s: heartbeat task ignored cancellation", self.node_id)
            elif not task.cancelled() and task.exception() is not None:
                log.error("node %s: heartbeat task failed: %r", self.node_id, task.exception())
        self._set_state(NodeState.STOPPED)
        if deregister:
            try:
                if self.worker is not None:
                    await self._leave_node()
                    return
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.delete(self.key)
                    pipe.zrem(keys.NODES_INDEX, self.node_id)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("node %s: could not deregister (expires by TTL): %s", self.node_id, exc)

    def snapshot(self) -> NodeInfo:
        """The heartbeat this node would publish now."""
        load = self._load_probe()
        return NodeInfo(
            node_id=self.node_id if self.worker is None else f"{self.node_id}/{self.worker}",
            url=self.url,
            kind=self.kind,
            state=self._state,
            viewers=load.viewers,
            capacity=self.capacity,
            cpu=self._cpu_probe(),
            egress_bps=load.egress_bps,
            streams=dict(load.streams),
            sockets=load.sockets,
            heartbeat_ms=self._now_ms(),
            started_ms=self._started_ms,
        )

    async def beat(self) -> NodeInfo:
        """Publish one heartbeat now (also useful right after a large load change)."""
        if self._state not in (NodeState.SERVING, NodeState.DRAINING):
            raise InvalidStateError(f'Cannot heartbeat in node state "{self._state.value}"')
        info = self.snapshot()
        node = info if self.worker is None else await self._join_node(info)
        await self._publish(node)
        self.last_published = info
        self.last_node = node
        return info

    async def _publish(self, node: NodeInfo) -> None:
        fields: dict[Any, Any] = node.to_fields()
        ttl_ms = int(self.ttl * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key, mapping=fields)
            pipe.pexpire(self.key, ttl_ms)
            pipe.zadd(keys.NODES_INDEX, {self.node_id: node.heartbeat_ms})
            pipe.zremrangebyscore(keys.NODES_INDEX, "-inf", node.heartbeat_ms - 10 * ttl_ms)
            await pipe.execute()

    @property
    def workers_key(self) -> str:
        return keys.node_workers(self.node_id)

    async def _join_node(self, info: NodeInfo) -> NodeInfo:
        """Write this worker's heartbeat, and the node as the sum of its fresh workers."""
        assert self.worker is not None
        ttl_ms = int(self.ttl * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.workers_key, self.worker, json.dumps(info.to_fields()))
            pipe.pexpire(self.workers_key, ttl_ms)
            pipe.hgetall(self.workers_key)
            raw = (await pipe.execute())[-1]
        return await self._sum_fresh(raw, info.heartbeat_ms) or info

    async def _sum_fresh(self, raw: dict[Any, Any], now_ms: int) -> NodeInfo | None:
        fresh: list[NodeInfo] = []
        expired: list[str] = []
        for name, value in raw.items():
            try:
                part = NodeInfo.from_fields(json.loads(value))
            except ValueError as exc:  # json.JSONDecodeError is a ValueError too
                log.warning("dropping malformed worker heartbeat of %s: %s", self.node_id, exc)
                expired.append(_text(name))
                continue
            if now_ms - part.heartbeat_ms <= self.ttl * 1000:
                fresh.append(part)
            else:
                expired.append(_text(name))
        if expired:
            log.info("node %s: worker heartbeats expired: %s", self.node_id, ", ".join(expired))
            await self.redis.hdel(self.workers_key, *expired)
        if not fresh:
            return None
        return combine_workers(self.node_id, self.url, fresh)

    async def _leave_node(self) -> None:
        """Remove this worker; the node goes when its last worker does."""
        assert self.worker is not None
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.workers_key, self.worker)
            pipe.hgetall(self.workers_key)
            raw = (await pipe.execute())[-1]
        node = await self._sum_fresh(raw, self._now_ms())
        if node is not None:
            await self._publish(node)
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.key, self.workers_key)
            pipe.zrem(keys.NODES_INDEX, self.node_id)
            await pipe.execute()

    async def live_nodes(self) -> list[NodeInfo]:
        return await read_live_nodes(self.redis)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self.beat()
                if self._failing:
                    log.info("node %s: heartbeat recovered", self.node_id)
                    self._failing = False
            except (RedisError, OSError) as exc:
                # Keep trying: the node drops out of placement by TTL meanwhile.
                if not self._failing:
                    log.warning("node %s: heartbeat failed: %s", self.node_id, exc)
                    self._failing = True
            except Exception:
                log.exception("node %s: heartbeat error", self.node_id)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def __aenter__(self) -> NodeRegistry:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
