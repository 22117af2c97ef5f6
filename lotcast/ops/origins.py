"""Several origins: which origin holds each stream, and where a new stream goes.

Binding (`StreamBindings`): `keys.stream_origin(stream)` holds the node id of the origin that
accepted the stream's publisher. It is set atomically when a WHIP POST is accepted: set when
absent, kept when it is already ours, or taken over (compare-and-set) from an origin that is dead
(no heartbeat in the registry) or draining. Of two origins racing for one stream, exactly one
wins; the other answers the publisher with a 307 to the winner. The binding's TTL (the registry's)
is refreshed at every heartbeat of its origin, so a crashed origin's bindings expire with its
registry entry; the origin deletes it (compare-and-delete) when the stream ends there.

Placement (`pick_origin`, pure): the least-loaded serving origin with room (publishers /
capacity, then CPU, then node id), as relays are placed.

Relays read the binding (`origin_of`) to pull each stream from its own origin; a stream without
a binding (one origin, a static chain) is pulled from the configured origin URL.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis

from lotcast import keys
from lotcast.ops.node import NodeInfo, NodeState
from lotcast.ops.placement import load_key

logger = logging.getLogger(__name__)

# GET; absent, ours, or the id we may take over -> set to us (PX); else the holder.
_CLAIM = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[1] or (ARGV[3] ~= '' and cur == ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return cur
"""
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def is_live_origin(node: NodeInfo, now_ms: int, stale_after: float) -> bool:
    """An origin whose heartbeat is fresh (any state)."""
    return node.kind == "broadcaster" and now_ms - node.heartbeat_ms <= stale_after * 1000


def origins(nodes: Iterable[NodeInfo], now_ms: int, stale_after: float) -> dict[str, NodeInfo]:
    """The live origins by node id."""
    return {n.node_id: n for n in nodes if is_live_origin(n, now_ms, stale_after)}


def pick_origin(nodes: Iterable[NodeInfo], now_ms: int, stale_after: float,
                exclude: Collection[str] = ()) -> NodeInfo | None:
    """The origin a new stream goes to: serving, fresh, with room, least loaded; None if none."""
    eligible = [n for n in nodes
                if n.node_id not in exclude and is_live_origin(n, now_ms, stale_after)
                and n.state is NodeState.SERVING and n.has_room]
    return min(eligible, key=load_key) if eligible else None


def whip_url(origin: NodeInfo, stream: str) -> str:
    return f"{origin.url.rstrip('/')}/whip/{stream}"


@dataclass(frozen=True)
class Claim:
    """The outcome of a claim: `holder` is the node id the stream is bound to now."""

    holder: str
    mine: bool


class StreamBindings:
    """This origin's side of the bindings: claim, refresh (every heartbeat), release."""

    def __init__(self, redis: aioredis.Redis, node_id: str, ttl: float) -> None:
        self.redis = redis
        self.node_id = node_id
        self.ttl_ms = int(ttl * 1000)
        self.held: set[str] = set()
        self._claim = redis.register_script(_CLAIM)
        self._refresh = redis.register_script(_REFRESH)
        self._release = redis.register_script(_RELEASE)

    async def holder(self, stream: str) -> str | None:
        raw = await self.redis.get(keys.stream_origin(stream))
        return None if raw is None else _text(raw)

    async def claim(self, stream: str, take_over: str | None = None) -> Claim:
        """Bind `stream` to this origin if it is unbound, ours, or bound to `take_over`."""
        raw = await self._claim(keys=[keys.stream_origin(stream)],
                                args=[self.node_id, self.ttl_ms, take_over or ""])
        holder = _text(raw)
        mine = holder == self.node_id
        if mine:
            self.held.add(stream)
            if take_over and take_over != self.node_id:
                logger.warning("stream %s: binding taken over from origin %s", stream, take_over)
        return Claim(holder, mine)

    async def refresh(self) -> list[str]:
        """Extend every binding this origin holds; returns the streams it lost (taken over)."""
        streams = sorted(self.held)
        if not streams:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                await self._refresh(keys=[keys.stream_origin(stream)],
                                    args=[self.node_id, self.ttl_ms], client=pipe)
            results = await pipe.execute()
        lost = [s for s, ok in zip(streams, results, strict=True) if not ok]
        for stream in lost:
            self.held.discard(stream)
        return lost

    async def release(self, stream: str) -> None:
        """Delete the binding if it is still ours (a newer origin's binding stays)."""
        self.held.discard(stream)
        await self._release(keys=[keys.stream_origin(stream)], args=[self.node_id])

    async def release_all(self) -> None:
        for stream in sorted(self.held):
            await self.release(stream)


async def origin_of(redis: aioredis.Redis, streams: Collection[str],
                    live: Mapping[str, NodeInfo]) -> dict[str, NodeInfo]:
    """The live origin each bound stream is bound to (streams bound to no live origin are left
    out). One MGET: the binding keys share one hash tag."""
    names = sorted(streams)
    if not names:
        return {}
    raw = await redis.mget([keys.stream_origin(s) for s in names])
    out: dict[str, NodeInfo] = {}
    for stream, value in zip(names, raw, strict=True):
        if value is None:
            continue
        node = live.get(_text(value))
        if node is not None:
            out[stream] = node
    return out


def _text(value: bytes | str | int) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)
