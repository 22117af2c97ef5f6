"""Loads the Lua library (lua/*.lua) into Redis as Functions and calls them for one room."""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from lotcast import keys

log = logging.getLogger(__name__)

# moderation.lua wraps bid/vote before room.lua registers them; chat.lua extends room.lua's snapshot.
LUA_FILES = ("common.lua", "auction.lua", "polls.lua", "moderation.lua", "room.lua", "chat.lua")


def library_source() -> str:
    lua = resources.files("lotcast.interactive") / "lua"
    body = "\n".join((lua / name).read_text() for name in LUA_FILES)
    return f"#!lua name={keys.FUNCTION_LIBRARY}\n{body}"


class RoomFunctions:
    """The single writer of room state: every change is one atomic Redis Function call."""

    def __init__(self, redis: aioredis.Redis, history: int) -> None:
        self.redis = redis
        self.history = history
        self._source = library_source()

    async def load(self) -> None:
        await self.redis.function_load(self._source, replace=True)

    async def call(self, name: str, room: str, *args: str | int | bytes) -> Any:
        argv = (keys.room_prefix(room), keys.room_channel(room), self.history, room, *args)
        room_keys = (keys.room_seq(room), keys.ACTIVE_ROOMS)
        try:
            return await self.redis.fcall(f"lotcast_{name}", 2, *room_keys, *argv)
        except ResponseError as exc:
            if "not found" not in str(exc).lower():
                raise
            # A fresh or flushed Redis lost the library: load it again and retry once.
            log.warning("Redis Function library missing (%s); reloading", exc)
            await self.load()
            return await self.redis.fcall(f"lotcast_{name}", 2, *room_keys, *argv)
