"""PollStore: polls with one vote per user, each operation one atomic Redis Function."""

from __future__ import annotations

from typing import Any

import msgpack  # type: ignore[import-untyped]

from lotcast.auth import Identity
from lotcast.interactive.functions import RoomFunctions
from lotcast.interactive.protocol import ClosePoll, OpenPoll, Vote
from lotcast.interactive.store import RateLimit, raise_lua_error, unpack_result


class PollStore:
    def __init__(self, functions: RoomFunctions, vote_limit: RateLimit) -> None:
        self.functions = functions
        self.vote_limit = vote_limit

    async def open_poll(self, room: str, msg: OpenPoll) -> dict[str, Any]:
        options = msgpack.packb(list(msg.options), use_bin_type=True)
        raw = await self.functions.call("poll_open", room, msg.question, options, msg.duration_ms)
        return unpack_result(raw)

    async def vote(self, room: str, who: Identity, msg: Vote) -> dict[str, Any]:
        raw = await self.functions.call("vote", room, msg.poll, who.user_id, msg.option,
                                        repr(self.vote_limit.per_second), self.vote_limit.burst)
        result = unpack_result(raw)
        raise_lua_error(result, what="vote", ident=msg.poll, field="poll")
        return result

    async def close_poll(self, room: str, msg: ClosePoll) -> dict[str, Any]:
        result = unpack_result(await self.functions.call("poll_close", room, msg.poll))
        raise_lua_error(result, what="poll_close", ident=msg.poll, field="poll")
        return result
