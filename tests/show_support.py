"""Test helpers for reactions, giveaways and pre-bids: a RoomState that also follows the
issue-10 events and frames (docs/protocol.md), and small waiting helpers."""

from __future__ import annotations

import asyncio
from typing import Any

from lotcast.interactive.client import RoomClient, RoomState
from lotcast.interactive.protocol import REACTIONS

GIVEAWAY_EVENTS = ("giveaway_opened", "giveaway_drawn", "giveaway_cancelled")


class ShowState(RoomState):
    """RoomState plus `giveaway` (the current one) and `reactions` (cumulative counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.giveaway: dict[str, Any] | None = None
        self.reactions: dict[str, int] = dict.fromkeys(REACTIONS, 0)
        self.reaction_frames = 0

    def apply(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "snapshot":
            self.giveaway = msg.get("giveaway")
            self.reactions = dict(msg["reactions"])
        elif kind == "reactions":
            self.reaction_frames += 1
            if msg["total"] >= sum(self.reactions.values()):
                self.reactions = dict(msg["counts"])
        super().apply(msg)

    def _apply_event(self, ev: dict[str, Any]) -> None:
        kind = ev["type"]
        if kind in GIVEAWAY_EVENTS:
            self.applied.append(ev)
            if kind == "giveaway_opened":
                self.giveaway = {"giveaway": ev["giveaway"], "item": ev["item"],
                                 "status": "open", "commitment": ev["commitment"]}
            elif self.giveaway is not None and self.giveaway["giveaway"] == ev["giveaway"]:
                if kind == "giveaway_drawn":
                    self.giveaway.update({k: v for k, v in ev.items()
                                          if k not in ("type", "offset", "ts")}, status="drawn")
                else:
                    self.giveaway["status"] = "cancelled"
            return
        if kind == "prebid":
            self.applied.append(ev)
            self.lots[ev["lot"]]["prebids"] = ev["prebids"]
            return
        super()._apply_event(ev)


def show_client(base_url: str, room: str, token: str | None = None) -> RoomClient:
    client = RoomClient(base_url, room, token)
    client.state = ShowState()
    return client


def state(client: RoomClient) -> ShowState:
    assert isinstance(client.state, ShowState)
    return client.state


async def eventually(check: Any, within: float = 10.0, step: float = 0.05) -> None:
    """Await until the async predicate `check()` is true (bounded in time)."""
    async with asyncio.timeout(within):
        while not await check():
            await asyncio.sleep(step)
