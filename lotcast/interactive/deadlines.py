"""SettleIndex: the settle loop's work list, rooms by next lot/poll deadline, across every shard.

The room Functions keep each room's next deadline in its own slot (`keys.room_due`); the index
(`keys.ACTIVE_ROOMS`, in the {global} slot) cannot be written by them on Redis Cluster, where a
Function touches one slot. So the index holds, per room, a lower bound of its deadline:
- a call that may bring a deadline nearer (a lot or poll opens) is followed by
  `ZADD LT index <room's due> room`; deadlines only move later otherwise (bids in the soft-close
  window, extensions, closes), and a score earlier than the truth costs one early settle call;
- the settle loop, after settling a room, sets its exact score (or removes it), then reads the
  room's due again and lowers the score to it: a lot opened while the loop was writing is never
  hidden behind a later score;
- every node lowers the score of the rooms it serves once a second (`refresh`), so a node that
  died between its Function call and the ZADD delays a deadline by about a second, not forever.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from lotcast import keys, redisconn

# Calls that may create or bring forward a room's deadline.
DEADLINE_CALLS = frozenset({"lot_open", "poll_open", "lot_rerun"})


class SettleIndex:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def migrate_legacy(self) -> None:
        """Move a pre-{global} index into place (non-cluster Redis only: the old key could not
        exist on a cluster)."""
        if redisconn.is_cluster(self.redis):
            return
        old: Any = await self.redis.zrange(keys.LEGACY_ACTIVE_ROOMS, 0, -1, withscores=True)
        if old:
            await self.redis.zadd(keys.ACTIVE_ROOMS, dict(old), lt=True)
        await self.redis.delete(keys.LEGACY_ACTIVE_ROOMS)

    async def refresh(self, rooms: list[str]) -> None:
        """Lower each room's score to its current due (adding rooms that are missing)."""
        if not rooms:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for room in rooms:
                pipe.get(keys.room_due(room))
            dues = await pipe.execute()
        found = {room: int(due) for room, due in zip(rooms, dues, strict=True) if due is not None}
        if found:
            await self.redis.zadd(keys.ACTIVE_ROOMS, found, lt=True)

    async def due(self, now_ms: int, limit: int) -> list[str]:
        rooms: Any = await self.redis.zrangebyscore(keys.ACTIVE_ROOMS, "-inf", now_ms, start=0,
                                                    num=limit)
        return [r.decode() if isinstance(r, bytes) else str(r) for r in rooms]

    async def settled(self, room: str, next_due: int) -> None:
        """The settle Function answered `next_due` (-1: nothing open) for `room`."""
        if next_due < 0:
            await self.redis.zrem(keys.ACTIVE_ROOMS, room)
        else:
            await self.redis.zadd(keys.ACTIVE_ROOMS, {room: next_due})
        await self.refresh([room])
