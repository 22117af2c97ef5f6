"""Cascade: where a relay pulls each stream from (the origin, or another relay), from the registry.

Rule (`CascadePlanner.choose`): a relay starting a stream pulls it from the origin unless the
relays already carrying it are all full (or `origin_fanout` relays already pull it straight from
the origin); then it pulls from a relay carrying it, the shallowest first (the pure
`RelaySelector.pick_upstream`: serving, fresh, below the CPU limit, depth < max_depth), so the tree
stays within `max_cascade_depth`. A child pull costs the parent one outgoing copy and does not count
against its viewer capacity.

A child identifies itself to its parent with `X-Lotcast-Relay: <node id>` and
`X-Lotcast-Relay-Auth: HMAC-SHA256(jwt_secret, node id)`, so viewers cannot claim the exemption.

When `origin_url` names a relay (a statically configured chain, used by the benchmark), that relay
is always the parent and the depth is its depth + 1.

Several origins (issue 13): "the origin" of a stream is the origin its binding in Redis names
(lotcast/ops/origins.py), when that origin is alive; `origin_url` is the fallback for a stream
without a binding (one origin, a static chain). `bound_origins` is what the relay checks at every
heartbeat to move its pull when a stream's binding changes (an origin drained or crashed).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from lotcast.ops.node import NodeInfo, NodeState
from lotcast.ops.origins import origin_of, origins
from lotcast.ops.placement import RelaySelector
from lotcast.ops.registry import read_live_nodes

logger = logging.getLogger(__name__)

RELAY_HEADER = "x-lotcast-relay"
RELAY_AUTH_HEADER = "x-lotcast-relay-auth"


def relay_signature(secret: str, node_id: str) -> str:
    return hmac.new(secret.encode(), node_id.encode(), hashlib.sha256).hexdigest()


def child_headers(secret: str, node_id: str) -> dict[str, str]:
    return {RELAY_HEADER: node_id, RELAY_AUTH_HEADER: relay_signature(secret, node_id)}


def verified_child(secret: str, node_id: str | None, signature: str | None) -> str | None:
    """The child relay's node id if the headers are genuine, else None."""
    if not node_id or not signature:
        return None
    if hmac.compare_digest(relay_signature(secret, node_id), signature):
        return node_id
    return None


@dataclass(frozen=True)
class Upstream:
    url: str
    depth: int
    node_id: str | None = None  # None: the origin
    origin: str | None = None  # the origin's node id, when found through the stream's binding


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


class CascadePlanner:
    def __init__(self, redis: aioredis.Redis, selector: RelaySelector, node_id: str,
                 origin_url: str, origin_fanout: int = 0) -> None:
        self.redis = redis
        self.selector = selector
        self.node_id = node_id
        self.origin_url = origin_url.rstrip("/")
        self.origin_fanout = origin_fanout

    async def nodes(self) -> list[NodeInfo]:
        return await read_live_nodes(self.redis)

    async def choose(self, stream: str, exclude: Collection[str] = (),
                     below_depth: int | None = None) -> Upstream:
        """The upstream for `stream`. `below_depth` (re-parenting): only parents shallower than
        this, so a relay never picks one of its own descendants."""
        try:
            nodes = await self.nodes()
        except (RedisError, OSError) as exc:
            logger.warning("registry unavailable, pulling %s from the origin: %r", stream, exc)
            return Upstream(self.origin_url, 0)
        upstream = self.plan(nodes, stream, int(time.time() * 1000), exclude, below_depth)
        if upstream.node_id is not None:
            return upstream
        try:
            bound = await self._bound(nodes, [stream])
        except (RedisError, OSError) as exc:
            logger.warning("stream binding unavailable, pulling %s from %s: %r", stream,
                           self.origin_url, exc)
            return upstream
        return bound.get(stream, upstream)

    async def _bound(self, nodes: list[NodeInfo], streams: Collection[str]) -> dict[str, Upstream]:
        live = origins(nodes, int(time.time() * 1000), self.selector.stale_after)
        return {stream: Upstream(node.url.rstrip("/"), 0, origin=node.node_id)
                for stream, node in (await origin_of(self.redis, streams, live)).items()}

    async def bound_origins(self, streams: Collection[str]) -> dict[str, Upstream]:
        """The live origin each of `streams` is bound to (unbound ones are left out)."""
        if not streams:
            return {}
        return await self._bound(await self.nodes(), streams)

    def plan(self, nodes: list[NodeInfo], stream: str, now_ms: int,
             exclude: Collection[str] = (), below_depth: int | None = None) -> Upstream:
        """Pure part of `choose` (table-testable)."""
        static = next((n for n in nodes if n.kind == "relay" and _same_url(n.url, self.origin_url)),
                      None)
        if static is not None:  # origin_url is a relay: a fixed chain
            depth = static.streams.get(stream, 0) + 1
            return Upstream(self.origin_url, depth, static.node_id)
        others = [n for n in nodes if n.node_id != self.node_id and n.node_id not in exclude
                  and (below_depth is None or n.streams.get(stream, 1 << 30) < below_depth)]
        carriers = [n for n in others if self.selector.is_live(n, now_ms)
                    and n.state is NodeState.SERVING and n.carries(stream)]
        if not carriers:
            return Upstream(self.origin_url, 0)
        direct = sum(1 for n in carriers if n.streams[stream] == 0)
        all_full = all(not n.has_room for n in carriers)
        fanout_reached = self.origin_fanout > 0 and direct >= self.origin_fanout
        if not (all_full or fanout_reached):
            return Upstream(self.origin_url, 0)
        parent = self.selector.pick_upstream(others, stream, now_ms,
                                             exclude={self.node_id, *exclude})
        if parent is None:
            return Upstream(self.origin_url, 0)
        return Upstream(parent.url.rstrip("/"), parent.streams[stream] + 1, parent.node_id)

    async def parent_ok(self, stream: str, parent_id: str) -> bool:
        """Is this parent still a good source (live, serving, carrying the stream)?"""
        try:
            nodes = await self.nodes()
        except (RedisError, OSError):
            return True  # cannot tell; keep it
        now_ms = int(time.time() * 1000)
        for n in nodes:
            if n.node_id == parent_id:
                return (self.selector.is_live(n, now_ms) and n.state is NodeState.SERVING
                        and n.carries(stream))
        return False
