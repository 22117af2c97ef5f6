"""LotExtrasStore: the auction additions of issue 10 on the room library (lua/auction.lua):
lot creation with the sudden_death option, pre-bids on draft lots, re-running an unsold lot."""

from __future__ import annotations

from typing import Any

import msgpack  # type: ignore[import-untyped]

from lotcast.auth import Identity
from lotcast.interactive.functions import RoomFunctions
from lotcast.interactive.protocol import CreateLot, PreBid, RerunLot
from lotcast.interactive.showlib import raise_show_error
from lotcast.interactive.store import RateLimit, unpack_result


class LotExtrasStore:
    def __init__(self, functions: RoomFunctions, bid_limit: RateLimit) -> None:
        self.functions = functions
        self.bid_limit = bid_limit  # pre-bids spend the user's bid tokens

    async def create_lot(self, room: str, msg: CreateLot) -> dict[str, Any]:
        increments = msgpack.packb([list(row) for row in msg.increments])
        raw = await self.functions.call(
            "lot_create", room, msg.title, msg.start_price, increments, msg.reserve or 0,
            msg.buy_now or 0, msg.duration_ms, msg.soft_close_ms, int(msg.sudden_death))
        return unpack_result(raw)

    async def prebid(self, room: str, who: Identity, msg: PreBid) -> dict[str, Any]:
        result = unpack_result(await self.functions.call(
            "prebid", room, msg.lot, who.user_id, who.display_name or who.user_id, msg.max,
            repr(self.bid_limit.per_second), self.bid_limit.burst))
        raise_show_error(result, field="lot", fields={"bid_too_low": "max"}, messages={
            "unknown_lot": f"no lot {msg.lot!r} in this room",
            "invalid_state": f"pre-bids are taken on draft lots only; lot {msg.lot} is "
                             f"{result.get('state')} (send bid instead)",
            "bid_too_low": f"max {msg.max} is below the start price {result.get('min')}",
            "rate_limited": f"too many bids; retry in {result.get('retry_ms')} ms"})
        return result

    async def rerun(self, room: str, msg: RerunLot) -> dict[str, Any]:
        result = unpack_result(await self.functions.call("lot_rerun", room, msg.lot,
                                                         "1" if msg.open else "0"))
        raise_show_error(result, field="lot", messages={
            "unknown_lot": f"no lot {msg.lot!r} in this room",
            "invalid_state": f"only an unsold lot can be re-run; lot {msg.lot} is "
                             f"{result.get('state')}",
            "lot_ended": f"lot {msg.lot} ended at {result.get('ends_at')} (server clock)",
            "already_rerun": f"lot {msg.lot} was already re-run as {result.get('rerun')}"})
        return result
