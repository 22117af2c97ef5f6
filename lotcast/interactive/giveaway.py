"""GiveawayStore: open / enter / draw / cancel a giveaway and read its proof, each one atomic
Redis Function call (lua/giveaway.lua). The seed is drawn here from the OS CSPRNG when the
giveaway opens; only its SHA-256 (the commitment) is public until the draw reveals it."""

from __future__ import annotations

import secrets
from typing import Any

from lotcast.auth import Identity
from lotcast.interactive.protocol import (
    GIVEAWAY_PROOF_PAGE,
    CancelGiveaway,
    DrawGiveaway,
    EnterGiveaway,
    GiveawayProof,
    OpenGiveaway,
)
from lotcast.interactive.showlib import ShowFunctions, raise_show_error
from lotcast.interactive.store import unpack_result

MAX_ENTRIES = 100_000  # per giveaway; keeps the draw's Redis call short
SEED_BYTES = 32


def _messages(ident: str, result: dict[str, Any]) -> dict[str, str]:
    return {
        "unknown_giveaway": f"no giveaway {ident!r} in this room",
        "giveaway_closed": f"giveaway {ident} is {result.get('state')}",
        "giveaway_in_progress": f"giveaway {result.get('giveaway')} is still open; draw or "
                                "cancel it first",
        "lot_is_open": f"lot {result.get('lot')} is open; giveaways run between lots",
        "duplicate_entry": f"you already entered giveaway {ident}",
        "giveaway_full": f"giveaway {ident} has {result.get('max')} entries, the most allowed",
        "no_eligible_entrants": f"none of the {result.get('entrants')} entrants of {ident} is "
                                "connected",
        "not_drawn": f"giveaway {ident} is {result.get('state')}, not drawn",
    }


class GiveawayStore:
    def __init__(self, functions: ShowFunctions, fresh_ms: int, max_entries: int = MAX_ENTRIES
                 ) -> None:
        self.functions = functions
        self.fresh_ms = fresh_ms  # how old a node's room_viewers stamp may be at the draw
        self.max_entries = max_entries

    async def _call(self, name: str, room: str, ident: str, *args: str | int) -> dict[str, Any]:
        result = unpack_result(await self.functions.call(name, room, *args))
        raise_show_error(result, field="giveaway", messages=_messages(ident, result))
        return result

    async def open(self, room: str, msg: OpenGiveaway) -> dict[str, Any]:
        seed = secrets.token_hex(SEED_BYTES)
        return await self._call("giveaway_open", room, "", msg.item, seed)

    async def enter(self, room: str, who: Identity, msg: EnterGiveaway) -> dict[str, Any]:
        return await self._call("giveaway_enter", room, msg.giveaway, msg.giveaway, who.user_id,
                                who.display_name or who.user_id, self.max_entries)

    async def draw(self, room: str, msg: DrawGiveaway) -> dict[str, Any]:
        return await self._call("giveaway_draw", room, msg.giveaway, msg.giveaway, self.fresh_ms)

    async def cancel(self, room: str, msg: CancelGiveaway) -> dict[str, Any]:
        return await self._call("giveaway_cancel", room, msg.giveaway, msg.giveaway)

    async def proof(self, room: str, msg: GiveawayProof) -> dict[str, Any]:
        result = await self._call("giveaway_proof", room, msg.giveaway, msg.giveaway, msg.start,
                                  GIVEAWAY_PROOF_PAGE)
        if not isinstance(result.get("users"), list):
            result["users"] = []  # cmsgpack encodes an empty Lua table as a map
        return result

    async def room_state(self, room: str, who: Identity) -> dict[str, Any]:
        """The current giveaway (with `entered` for a signed-in user) and the reaction counts."""
        state = unpack_result(await self.functions.call("show_state", room, who.user_id))
        if not isinstance(state.get("reactions"), dict) or not state["reactions"]:
            state["reactions"] = {}
        return state
