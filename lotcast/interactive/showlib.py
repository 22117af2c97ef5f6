"""The Redis Function library of reactions and giveaways (lua/common.lua + reactions.lua +
giveaway.lua), loaded beside the room library (functions.py) and called the same way."""

from __future__ import annotations

from typing import Any

from lotcast import keys
from lotcast.interactive.functions import RoomFunctions, library_source
from lotcast.interactive.protocol import ErrorCode, ProtocolError

SHOW_LUA_FILES = ("common.lua", "reactions.lua", "giveaway.lua")


def show_library_source(sharded: bool = False) -> str:
    return library_source(SHOW_LUA_FILES, keys.SHOW_FUNCTION_LIBRARY, sharded)


class ShowFunctions(RoomFunctions):
    """Same calling convention as RoomFunctions; loads its own library (on first use too: a
    missing library is loaded and the call retried once, as RoomFunctions does)."""

    LIBRARY = keys.SHOW_FUNCTION_LIBRARY
    FILES = SHOW_LUA_FILES


def raise_show_error(result: dict[str, Any], *, field: str | None,
                     messages: dict[str, str], fields: dict[str, str] | None = None) -> None:
    """Turn a Lua ``{err=code, ...}`` result into a ProtocolError carrying its extra fields."""
    code = result.get("err")
    if code is None:
        return
    extra = {k: v for k, v in result.items() if k != "err"}
    per_code: dict[str, str | None] = {"rate_limited": None, "duplicate_entry": None, "lot_is_open": None,
              "giveaway_in_progress": None, "no_eligible_entrants": None, "giveaway_full": None,
              "already_rerun": None, "invalid_state": None, "not_drawn": None, **(fields or {})}
    raise ProtocolError(ErrorCode(code), messages.get(code, code),
                        field=per_code.get(code, field), **extra)
