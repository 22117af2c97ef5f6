"""ReactionStore: one Redis Function call per tap (lua/reactions.lua), rate-limited per user."""

from __future__ import annotations

from typing import Any

from lotcast.auth import Identity
from lotcast.interactive.protocol import React
from lotcast.interactive.showlib import ShowFunctions, raise_show_error
from lotcast.interactive.store import RateLimit, unpack_result

# Per user per room, across nodes. A tap is cheap for the room (coalesced counts) but each one
# is a Redis call, so a held-down button is cut off here.
REACTION_LIMIT = RateLimit(per_second=5.0, burst=10)


class ReactionStore:
    def __init__(self, functions: ShowFunctions, limit: RateLimit = REACTION_LIMIT) -> None:
        self.functions = functions
        self.limit = limit

    async def react(self, room: str, who: Identity, msg: React) -> dict[str, Any]:
        result = unpack_result(await self.functions.call(
            "react", room, who.user_id, msg.reaction, repr(self.limit.per_second),
            self.limit.burst))
        raise_show_error(result, field="reaction", messages={
            "rate_limited": f"too many reactions; retry in {result.get('retry_ms')} ms"})
        return result
