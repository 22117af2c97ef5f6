"""RoomPresence: which signed-in users have an open session of a room, across nodes.

Each node keeps, per room, a Redis set of the user ids with at least one session on it
(keys.room_online). A set counts only while the node's entry in the room's viewers hash is
fresh (the node heartbeats it every second), so a crashed node's users stop counting within
VIEWERS_FRESH_MS. The giveaway draw reads both atomically."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from lotcast import keys

log = logging.getLogger(__name__)

ONLINE_TTL_MS = 24 * 3600 * 1000


class RoomPresence:
    def __init__(self, redis: aioredis.Redis, node_id: str) -> None:
        self.redis = redis
        self.node_id = node_id
        self._sessions: dict[tuple[str, str], int] = {}
        self._fresh_rooms: set[str] = set()
        # one writer at a time, so a join and a leave of the same user never reorder in Redis
        self._lock = asyncio.Lock()

    async def join(self, room: str, user: str) -> None:
        async with self._lock:
            count = self._sessions.get((room, user), 0) + 1
            self._sessions[(room, user)] = count
            online = keys.room_online(room, self.node_id)
            async with self.redis.pipeline(transaction=True) as pipe:
                if room not in self._fresh_rooms:
                    pipe.delete(online)  # a set left by an earlier process with our node id
                pipe.sadd(online, user)
                pipe.pexpire(online, ONLINE_TTL_MS)
                await pipe.execute()
            self._fresh_rooms.add(room)

    async def leave(self, room: str, user: str) -> None:
        async with self._lock:
            count = self._sessions.get((room, user), 0) - 1
            if count > 0:
                self._sessions[(room, user)] = count
                return
            self._sessions.pop((room, user), None)
            with contextlib.suppress(RedisError, OSError):
                await self.redis.srem(keys.room_online(room, self.node_id), user)
