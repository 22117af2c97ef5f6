"""AuctionStore: lots and bids, each operation one atomic Redis Function (lua/auction.lua)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]

from lotcast.auth import Identity
from lotcast.interactive.functions import RoomFunctions
from lotcast.interactive.protocol import (
    CloseLot,
    CreateLot,
    ErrorCode,
    ExtendLot,
    OpenLot,
    PlaceBid,
    ProtocolError,
)


@dataclass(frozen=True)
class RateLimit:
    per_second: float
    burst: int


@dataclass(frozen=True)
class BidOutcome:
    lot: str
    status: str  # "winning" | "outbid" | "bought"
    price: int
    leader: str
    next_min: int
    offset: int
    duplicate: bool


def unpack_result(raw: bytes) -> dict[str, Any]:
    value = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    return value if isinstance(value, dict) else {}


def raise_lua_error(result: dict[str, Any], *, what: str, ident: str, field: str,
                    amount: int | None = None) -> None:
    """Turn a Lua ``{err=code, ...}`` result into a precise ProtocolError."""
    code = result.get("err")
    if code is None:
        return
    state = result.get("state")
    if "amount" in result:  # the amount of the bid this answer was for (a replayed duplicate)
        amount = result["amount"]
    messages = {
        "unknown_lot": f"no lot {ident!r} in this room",
        "unknown_poll": f"no poll {ident!r} in this room",
        "lot_not_open": f"lot {ident} is not open yet (state {state})",
        "lot_closed": f"lot {ident} is closed (state {state})",
        "lot_ended": f"lot {ident} ended at {result.get('ends_at')} (server clock)",
        "bid_too_low": f"amount {amount} is below the minimum bid {result.get('min')}",
        "rate_limited": f"too many {what}s; retry in {result.get('retry_ms')} ms",
        "invalid_state": f"{what} not allowed: {ident} is {state}",
        "poll_closed": f"poll {ident} is closed",
        "bad_option": f"option out of range: poll {ident} has {result.get('options')} options",
        "duplicate_vote": f"you already voted in poll {ident} (option {result.get('option')})",
        # moderation (lua/moderation.lua refuses bids and votes of banned and muted users)
        "banned": "you are banned from this room",
        "muted": f"you are muted until {result.get('until')} (server clock)",
    }
    fields = {"bid_too_low": "amount", "bad_option": "option", "rate_limited": None,
              "invalid_state": None, "duplicate_vote": None, "banned": None, "muted": None}
    extra = {k: v for k, v in result.items() if k in ("min", "retry_ms", "state", "until")}
    raise ProtocolError(ErrorCode(code), messages.get(code, code),
                        field=fields.get(code, field), **extra)


class AuctionStore:
    """Lots of one Redis: create/open/extend/close (host), bid (bidder), settle (any node)."""

    def __init__(self, functions: RoomFunctions, bid_limit: RateLimit) -> None:
        self.functions = functions
        self.bid_limit = bid_limit

    async def create_lot(self, room: str, msg: CreateLot) -> dict[str, Any]:
        increments = msgpack.packb([list(row) for row in msg.increments])
        raw = await self.functions.call(
            "lot_create", room, msg.title, msg.start_price, increments, msg.reserve or 0,
            msg.buy_now or 0, msg.duration_ms, msg.soft_close_ms)
        return unpack_result(raw)

    async def open_lot(self, room: str, msg: OpenLot) -> dict[str, Any]:
        return await self._host_call("lot_open", room, msg.lot)

    async def extend_lot(self, room: str, msg: ExtendLot) -> dict[str, Any]:
        return await self._host_call("lot_extend", room, msg.lot, msg.by_ms)

    async def close_lot(self, room: str, msg: CloseLot) -> dict[str, Any]:
        return await self._host_call("lot_close", room, msg.lot)

    async def _host_call(self, name: str, room: str, lot: str, *args: int) -> dict[str, Any]:
        result = unpack_result(await self.functions.call(name, room, lot, *args))
        raise_lua_error(result, what=name, ident=lot, field="lot")
        return result

    async def place_bid(self, room: str, who: Identity, msg: PlaceBid) -> BidOutcome:
        """Acknowledged only after the bid event is in the room log (the Function's XADD)."""
        raw: bytes = await self.functions.call(
            "bid", room, msg.lot, who.user_id, who.display_name or who.user_id, msg.amount,
            msg.max if msg.max is not None else msg.amount, msg.key or "",
            repr(self.bid_limit.per_second), self.bid_limit.burst)
        duplicate = raw[:1] == b"D"
        result = unpack_result(raw[1:])
        raise_lua_error(result, what="bid", ident=msg.lot, field="lot", amount=msg.amount)
        return BidOutcome(lot=msg.lot, status=result["status"], price=result["price"],
                          leader=result["leader"], next_min=result["next_min"],
                          offset=result["offset"], duplicate=duplicate)

    async def settle(self, room: str) -> tuple[int, int]:
        """End every lot and poll of the room whose time is up. Returns (settled, next due ms|-1)."""
        settled, next_due = await self.functions.call("settle", room)
        return int(settled), int(next_due)
