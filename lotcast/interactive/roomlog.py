"""RoomLog: reads of the room log (Redis Stream) and consistent room snapshots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]
import redis.asyncio as aioredis

from lotcast import keys
from lotcast.interactive.functions import RoomFunctions

SNAPSHOT_LOTS = 50
SNAPSHOT_POLLS = 20


@dataclass(frozen=True)
class Head:
    epoch: str
    offset: int
    server_ts: int


class HistoryGone(Exception):
    """The requested offset is older than the retained log (trimmed): send a snapshot instead."""


class RoomLog:
    def __init__(self, redis: aioredis.Redis, functions: RoomFunctions) -> None:
        self.redis = redis
        self.functions = functions

    async def head(self, room: str) -> Head:
        epoch, offset, now = await self.functions.call("head", room)
        return Head(epoch.decode() if isinstance(epoch, bytes) else str(epoch), int(offset),
                    int(now))

    async def read_after(self, room: str, after: int, upto: int | None = None,
                         limit: int = 1000) -> list[tuple[int, bytes]]:
        """Events with offset in (after, upto], at most `limit`; HistoryGone if trimmed away."""
        entries: Any = await self.redis.xrange(keys.room_log(room), min=f"0-{after + 1}",
                                          max="+" if upto is None else f"0-{upto}", count=limit)
        events: list[tuple[int, bytes]] = [
            (int(eid.split(b"-")[1]), fields[b"e"]) for eid, fields in entries]
        if events and events[0][0] != after + 1:
            raise HistoryGone(f"log starts at {events[0][0]}, wanted {after + 1}")
        if not events and (upto is None or upto > after):
            # Nothing at all after `after`: fine only if the log really ends there.
            seq = int(await self.redis.get(keys.room_seq(room)) or 0)
            if seq > after and (upto is None or upto > after):
                raise HistoryGone(f"log has no entries after {after} but seq is {seq}")
        return events

    async def open_tallies(self, room: str) -> list[dict[str, Any]]:
        tallies = msgpack.unpackb(await self.functions.call("tallies", room), raw=False)
        return tallies if isinstance(tallies, list) else []

    async def snapshot(self, room: str) -> dict[str, Any]:
        raw = await self.functions.call("snapshot", room, SNAPSHOT_LOTS, SNAPSHOT_POLLS)
        snap: dict[str, Any] = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        # cmsgpack encodes an empty Lua table as a map.
        for name in ("lots", "polls"):
            if not isinstance(snap.get(name), list):
                snap[name] = []
        return snap
