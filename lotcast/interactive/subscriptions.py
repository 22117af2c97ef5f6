"""The node's pub/sub connection for room channels, routing each channel to its hub.

RoomSubscriptions: one SUBSCRIBE connection on a single Redis. ShardedRoomSubscriptions (Redis
Cluster): SSUBSCRIBE on the primary that owns each room's slot, one connection per primary.
`subscriptions_for` picks by the client the node was given. After a lost connection every hub is
told CATCH_UP: what was published meanwhile is in the room log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from lotcast import redisconn

log = logging.getLogger(__name__)

CATCH_UP = b""  # inbox marker: read the log after our offset (pub/sub may have dropped messages)
RETRY_AFTER = 0.5


class Subscriptions(Protocol):
    """Routes each room channel's messages to its hub; after any connection loss every hub gets
    CATCH_UP (what was published meanwhile is in the log)."""

    reconnects: int

    async def subscribe(self, channel: str, deliver: Callable[[bytes], None]) -> None: ...

    async def unsubscribe(self, channel: str) -> None: ...

    async def close(self) -> None: ...


def subscriptions_for(redis: aioredis.Redis) -> Subscriptions:
    if redisconn.is_cluster(redis):
        return ShardedRoomSubscriptions(redisconn.as_cluster(redis))
    return RoomSubscriptions(redis)


class RoomSubscriptions:
    """One Redis pub/sub connection per node, one SUBSCRIBE per room, routed to its RoomHub."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._routes: dict[bytes, Callable[[bytes], None]] = {}
        self._pubsub = redis.pubsub()
        self._task: asyncio.Task[None] | None = None
        self.reconnects = 0

    async def subscribe(self, channel: str, deliver: Callable[[bytes], None]) -> None:
        self._routes[channel.encode()] = deliver
        await self._pubsub.subscribe(channel)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="room-subscriptions")

    async def unsubscribe(self, channel: str) -> None:
        self._routes.pop(channel.encode(), None)
        with contextlib.suppress(Exception):
            await self._pubsub.unsubscribe(channel)

    async def _run(self) -> None:
        while True:
            try:
                msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("pub/sub connection lost (%r); reconnecting", exc)
                await self._reconnect()
                continue
            if msg is None or msg.get("type") != "message":
                continue
            deliver = self._routes.get(msg["channel"])
            if deliver is not None:
                deliver(msg["data"])

    async def _reconnect(self) -> None:
        self.reconnects += 1
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        while True:
            await asyncio.sleep(0.2)
            try:
                self._pubsub = self.redis.pubsub()
                if self._routes:
                    await self._pubsub.subscribe(*[c.decode() for c in self._routes])
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("pub/sub resubscribe failed: %r", exc)
        for deliver in self._routes.values():
            deliver(CATCH_UP)  # anything published while we were away is in the log

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]


class _NodeSubscriber:
    """One primary's sharded pub/sub connection and the task reading it."""

    def __init__(self, cluster: RedisCluster, node: ClusterNode) -> None:
        self.name = node.name
        self.client = redisconn.node_client(cluster, node)
        self.pubsub = self.client.pubsub()
        self.channels: set[bytes] = set()
        self.task: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.task = None
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        with contextlib.suppress(Exception):
            await self.client.aclose()


class ShardedRoomSubscriptions:
    """Redis Cluster: one SSUBSCRIBE per room on the primary that owns its channel's slot, so a
    room's events never leave its shard. A lost node connection, or a channel the server
    unsubscribed (its slot moved: failover, resharding), is placed again on the slot's current
    owner after a topology refresh, and its hub told to CATCH_UP from the log."""

    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster
        self._routes: dict[bytes, Callable[[bytes], None]] = {}
        self._nodes: dict[str, _NodeSubscriber] = {}
        self._owner: dict[bytes, str] = {}
        self._lock = asyncio.Lock()  # one placement at a time
        self._repairs: set[asyncio.Task[None]] = set()
        self._closed = False
        self.reconnects = 0

    async def subscribe(self, channel: str, deliver: Callable[[bytes], None]) -> None:
        key = channel.encode()
        self._routes[key] = deliver
        async with self._lock:
            await self._place(key)

    async def unsubscribe(self, channel: str) -> None:
        key = channel.encode()
        self._routes.pop(key, None)
        async with self._lock:
            name = self._owner.pop(key, None)
            sub = self._nodes.get(name or "")
            if sub is not None:
                sub.channels.discard(key)
                with contextlib.suppress(Exception):
                    await sub.pubsub.sunsubscribe(channel)

    async def _place(self, key: bytes) -> None:
        node = self.cluster.get_node_from_key(key.decode())
        if node is None:
            raise RedisConnectionLost(f"no node serves {key!r}")
        sub = self._nodes.get(node.name)
        if sub is None:
            sub = self._nodes[node.name] = _NodeSubscriber(self.cluster, node)
        await sub.pubsub.ssubscribe(key.decode())
        sub.channels.add(key)
        self._owner[key] = node.name
        if sub.task is None:
            sub.task = asyncio.create_task(self._read(sub), name=f"room-ssub-{node.name}")

    async def _read(self, sub: _NodeSubscriber) -> None:
        while True:
            try:
                msg: dict[str, Any] | None = await sub.pubsub.get_message(
                    ignore_subscribe_messages=False, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("sharded pub/sub to %s lost (%r); re-placing its rooms",
                            sub.name, exc)
                self._repair(sub.name, set(sub.channels), drop_node=True)
                return
            if msg is None:
                continue
            kind = msg.get("type")
            channel = msg.get("channel")
            if not isinstance(channel, bytes):
                continue
            if kind in ("smessage", "message"):
                deliver = self._routes.get(channel)
                if deliver is not None:
                    deliver(msg["data"])
            elif (kind == "sunsubscribe" and channel in self._routes
                  and self._owner.get(channel) == sub.name):
                # we did not ask: the node no longer owns the slot
                sub.channels.discard(channel)
                self._repair(sub.name, {channel}, drop_node=False)

    def _repair(self, node_name: str, channels: set[bytes], *, drop_node: bool) -> None:
        if self._closed:
            return
        task = asyncio.create_task(self._replace(node_name, channels, drop_node),
                                   name="room-ssub-repair")
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)

    async def _replace(self, node_name: str, channels: set[bytes], drop_node: bool) -> None:
        self.reconnects += 1
        async with self._lock:
            if drop_node:
                sub = self._nodes.pop(node_name, None)
                if sub is not None:
                    await sub.close()
            pending = {c for c in channels if c in self._routes}
            for c in pending:
                if self._owner.get(c) == node_name:
                    self._owner.pop(c, None)
            for _ in range(600):  # ~2 min of retries at most, then give up loudly
                if not pending:
                    break
                await asyncio.sleep(RETRY_AFTER / 2)
                try:
                    await self.cluster.nodes_manager.initialize()
                    for c in list(pending):
                        if c in self._routes:
                            await self._place(c)
                        pending.discard(c)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.debug("sharded pub/sub re-place failed: %r", exc)
                    for name, half in list(self._nodes.items()):
                        if half.task is None:  # a connection that never worked: redo it
                            self._nodes.pop(name, None)
                            await half.close()
            if pending:
                log.error("sharded pub/sub: rooms not re-subscribed: %r", pending)
        for c in channels:
            deliver = self._routes.get(c)
            if deliver is not None:
                deliver(CATCH_UP)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._repairs):
            task.cancel()
        for task in list(self._repairs):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sub in list(self._nodes.values()):
            await sub.close()
        self._nodes.clear()


class RedisConnectionLost(RedisConnectionError):
    """No node serves a room channel's slot (its shard is failing over)."""
