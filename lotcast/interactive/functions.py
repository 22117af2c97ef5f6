"""Loads the Lua library (lua/*.lua) into Redis as Functions and calls them for one room.

On Redis Cluster every call touches one slot (the room's `{room}` hash tag: keys[1] is the room's
seq key and the Lua derives every other key from the room prefix), the library is loaded on every
primary (replicas get it by replication, so a promoted replica has it), and events go out with
SPUBLISH (sharded pub/sub). Durable acks: a write the client is told about is first confirmed by
`WAIT 1 <timeout>` on the same connection (docs/operations.md, "Redis Cluster").
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import PipelineCommand, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from lotcast import keys, redisconn
from lotcast.interactive.deadlines import DEADLINE_CALLS, SettleIndex

log = logging.getLogger(__name__)

# moderation.lua wraps bid/vote before room.lua registers them; chat.lua extends room.lua's snapshot.
LUA_FILES = ("common.lua", "auction.lua", "polls.lua", "moderation.lua", "room.lua", "chat.lua")

# Calls whose answer tells a client its write happened: with AckPolicy.WAIT they are confirmed by
# a replica before the answer (the settle pass and chat are not: a settle lost with its primary
# is decided again by the next pass, chat is best effort).
DURABLE_CALLS = frozenset({"bid", "prebid", "vote", "lot_create", "lot_open", "lot_extend",
                           "lot_close", "lot_rerun", "poll_open", "poll_close"})


# A cluster node's pool fails a command when all its connections are busy (no blocking pool as on
# one Redis), so a bid burst queues here instead: at most this many Function calls in flight.
CLUSTER_CALLS_IN_FLIGHT = 64
TOPOLOGY_REFRESH_S = 0.5
REPLICA_CHECK_S = 1.0


class AckPolicy(enum.Enum):
    OFF = "off"  # acknowledged once the primary has it (and its AOF, appendfsync always)
    WAIT = "wait"  # ... and once a replica has it (WAIT 1 <timeout>); else `unavailable`
    AUTO = "auto"  # WAIT when the Redis has replicas (a cluster with replicas), else OFF


class NotReplicated(RedisConnectionError):
    """WAIT timed out: the write is on the primary but no replica confirmed it. The client is
    answered `unavailable` (retrying with its idempotency key returns the stored answer)."""


@dataclass(frozen=True)
class Durability:
    policy: AckPolicy
    timeout_ms: int


def library_source(files: tuple[str, ...], library: str, sharded: bool,
                   version: str = keys.FUNCTION_VERSION) -> str:
    lua = resources.files("lotcast.interactive") / "lua"
    body = "\n".join((lua / name).read_text() for name in files)
    header = (f"local FN = '{library}_'\nlocal VERSION = '{version}'\n"
              f"local PUBLISH = '{'SPUBLISH' if sharded else 'PUBLISH'}'\n")
    return f"#!lua name={library}\n{header}{body}"


def _owner_version(exc: ResponseError) -> str | None:
    """The owning version named by a claim_room refusal (lua/common.lua), else None."""
    text = str(exc)
    if not text.startswith("LOTCAST_LIBRARY "):
        return None
    return text.split()[1]


def _flat(item: Any) -> list[bytes]:
    if isinstance(item, dict):
        return [v for kv in item.items() for v in kv if isinstance(v, bytes)]
    if isinstance(item, (list, tuple)):
        return [v for v in item if isinstance(v, bytes)]
    return []


def _retryable_routing(exc: BaseException) -> bool:
    """The call did not run: the slot moved or its shard is failing over."""
    return isinstance(exc, (MovedError, AskError, TryAgainError, ClusterDownError))


class RoomFunctions:
    """The single writer of room state: every change is one atomic Redis Function call."""

    LIBRARY = keys.FUNCTION_LIBRARY
    VERSION = keys.FUNCTION_VERSION
    FILES: tuple[str, ...] = LUA_FILES

    def __init__(self, redis: aioredis.Redis, history: int,
                 durability: Durability | None = None) -> None:
        self.redis = redis
        self.history = history
        self.durability = durability or Durability(AckPolicy.OFF, 0)
        self.cluster = redisconn.is_cluster(redis)
        self._source = library_source(self.FILES, self.LIBRARY, self.cluster, self.VERSION)
        self.index = SettleIndex(redis)
        self._in_flight = asyncio.Semaphore(CLUSTER_CALLS_IN_FLIGHT)
        self._refreshed_at = -1.0
        # AUTO: node name ("" = the one Redis) -> (checked at, connected replicas)
        self._replicas: dict[str, tuple[float, int]] = {}

    async def load(self) -> None:
        """FUNCTION LOAD REPLACE on this Redis, or on every primary of the cluster."""
        if self.cluster:
            rc = redisconn.as_cluster(self.redis)
            await rc.initialize()  # the node list is empty until the first command
            for node in rc.get_primaries():
                await rc.execute_command("FUNCTION", "LOAD", "REPLACE", self._source,
                                         target_nodes=node)
        else:
            await self.redis.function_load(self._source, replace=True)

    async def call(self, name: str, room: str, *args: str | int | bytes) -> Any:
        argv = (keys.room_prefix(room), keys.room_channel(room), self.history, room, *args)
        fn = f"{self.LIBRARY}_{name}"
        seq = keys.room_seq(room)
        durable = self.durability.policy is not AckPolicy.OFF and name in DURABLE_CALLS
        result = await self._call_reloading(fn, seq, argv, durable)
        try:
            if name == "settle":  # result: (settled, next due ms | -1)
                await self.index.settled(room, int(result[1]))
            elif name in DEADLINE_CALLS:
                await self.index.refresh([room])
        except RedisError as exc:  # the nodes' once-a-second refresh repairs it
            log.warning("room %s: settle index not updated: %r", room, exc)
        return result

    async def _call_reloading(self, fn: str, seq: str, argv: tuple[Any, ...],
                              durable: bool) -> Any:
        try:
            return await self._call(fn, seq, argv, durable)
        except ResponseError as exc:
            owner = _owner_version(exc)
            if owner is not None:
                # another version's room, busy: refused (`unavailable`) unless that version's
                # library is gone from Redis (the rolling upgrade is over): then take it over
                if not await self._take_over(seq, str(argv[3]), owner):
                    raise
                return await self._call(fn, seq, argv, durable)
            if "not found" not in str(exc).lower():
                raise
            # A fresh or flushed Redis (or a primary that joined empty) lost the library:
            # load it again everywhere and retry once.
            log.warning("Redis Function library missing (%s); reloading", exc)
            await self.load()
            return await self._call(fn, seq, argv, durable)
        except RedisClusterException as exc:
            # e.g. a slot not covered while its shard fails over: the client is told
            # `unavailable` (a RedisError), never an internal error
            raise RedisConnectionError(f"Redis Cluster: {exc}") from exc

    async def _call(self, fn: str, seq: str, argv: tuple[Any, ...], durable: bool) -> Any:
        if self.cluster:
            async with self._in_flight:
                if durable:
                    return await self._call_on_node(fn, seq, argv)
                return await self.redis.fcall(fn, 1, seq, *argv)
        if not durable or not await self._must_wait("", self.redis):
            return await self.redis.fcall(fn, 1, seq, *argv)
        # one connection for both, so WAIT counts this call's write
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.fcall(fn, 1, seq, *argv)
            pipe.execute_command("WAIT", 1, self.durability.timeout_ms)
            result, acked = await pipe.execute()
        self._check_acked(acked)
        return result

    async def _must_wait(self, name: str, client: Any) -> bool:
        """WAIT always; AUTO only while the primary has a connected replica (checked at most
        once a second per node: a shard whose replica was just promoted has none until one
        rejoins, and its acks then do not wait: docs/operations.md)."""
        if self.durability.policy is AckPolicy.WAIT:
            return True
        now = asyncio.get_running_loop().time()
        checked, replicas = self._replicas.get(name, (-10.0, 0))
        if now - checked >= REPLICA_CHECK_S:
            try:
                info = await client.execute_command("INFO", "replication")
                if isinstance(info, bytes):
                    info = dict(line.split(":", 1) for line in info.decode().splitlines()
                                if ":" in line)
                replicas = int(info.get("connected_slaves", 0))
            except (RedisError, OSError):
                replicas = 1  # unknown: the WAIT decides
            self._replicas[name] = (now, replicas)
        return replicas > 0

    async def _call_on_node(self, fn: str, seq: str, argv: tuple[Any, ...]) -> Any:
        """FCALL then WAIT on one connection of the slot's primary: WAIT counts the writes of
        its own connection. A call the node refused for routing (MOVED, CLUSTERDOWN) did not
        run, so it is retried once after a topology refresh; any other failure is raised."""
        rc = redisconn.as_cluster(self.redis)
        for attempt in range(2):
            node = rc.get_node_from_key(seq)
            if node is None:
                raise RedisConnectionError(f"no node serves {seq!r}")
            commands = [PipelineCommand(0, "FCALL", fn, 1, seq, *argv)]
            if await self._must_wait(node.name, node):
                commands.append(PipelineCommand(1, "WAIT", 1, self.durability.timeout_ms))
            try:
                await node.execute_pipeline(commands)
            except (RedisConnectionError, OSError, TimeoutError):
                # the node is gone (its replica may be taking over): learn the new topology
                # for the next call; this one is answered `unavailable`
                await self._refresh_topology(rc)
                raise
            result = commands[0].result
            acked = commands[1].result if len(commands) > 1 else 1
            if isinstance(result, BaseException):
                if attempt == 0 and _retryable_routing(result):
                    await self._refresh_topology(rc, force=True)
                    continue
                if isinstance(result, (RedisConnectionError, OSError, TimeoutError)):
                    await self._refresh_topology(rc)
                if isinstance(result, (RedisError, OSError)):
                    raise result
                raise RedisConnectionError(repr(result)) from result
            if isinstance(acked, BaseException):
                raise NotReplicated(f"WAIT failed: {acked!r}") from acked
            self._check_acked(acked)
            return result
        raise RedisConnectionError(f"{seq!r}: slot still moving")

    async def _take_over(self, seq: str, room: str, owner: str) -> bool:
        """Claim a room of library version `owner` once the room's primary no longer has that
        version's library (deleted after the last old node went: docs/operations.md)."""
        name = f"lotcast_v{owner}"
        listing: Any
        if self.cluster:
            rc = redisconn.as_cluster(self.redis)
            node = rc.get_node_from_key(seq)
            listing = await rc.execute_command("FUNCTION", "LIST", "LIBRARYNAME", name,
                                               target_nodes=node)
        else:
            listing = await self.redis.execute_command(  # type: ignore[no-untyped-call]
                "FUNCTION", "LIST", "LIBRARYNAME", name)
        if any(name.encode() in _flat(lib) for lib in listing or []):
            return False
        log.warning("library %s is gone: version %s takes over %s", name, self.VERSION, seq)
        await self.redis.set(keys.room_lib(room), self.VERSION)
        return True

    async def _refresh_topology(self, rc: RedisCluster, force: bool = False) -> None:
        """CLUSTER SLOTS again (at most twice a second unless forced by a MOVED)."""
        now = asyncio.get_running_loop().time()
        if not force and now - self._refreshed_at < TOPOLOGY_REFRESH_S:
            return
        self._refreshed_at = now
        try:
            await rc.nodes_manager.initialize()
        except (RedisError, RedisClusterException, OSError) as exc:
            log.debug("cluster topology refresh failed: %r", exc)

    def _check_acked(self, acked: Any) -> None:
        if int(acked) < 1:
            raise NotReplicated(f"no replica confirmed the write within "
                                f"{self.durability.timeout_ms} ms")


def durability_from(policy: str, timeout_ms: int) -> Durability:
    """The `redis_ack` setting: off | wait | auto."""
    try:
        return Durability(AckPolicy(policy), timeout_ms)
    except ValueError:
        raise ValueError(f"redis_ack must be one of off, wait, auto (got {policy!r})") from None
