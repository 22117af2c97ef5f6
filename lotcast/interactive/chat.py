"""ChatStore: chat, moderation and Q&A of a room, each change one atomic Redis Function
(lua/moderation.lua, lua/chat.lua); plus the reads a resume needs (redaction, question votes)."""

from __future__ import annotations

from typing import Any

import msgpack  # type: ignore[import-untyped]

from lotcast import keys
from lotcast.auth import Identity
from lotcast.interactive import chatnorm
from lotcast.interactive import protocol as p
from lotcast.interactive.functions import RoomFunctions
from lotcast.interactive.roomlog import SNAPSHOT_LOTS, SNAPSHOT_POLLS
from lotcast.interactive.store import RateLimit, unpack_result

DEFAULT_CHAT_LIMIT = RateLimit(per_second=2.0, burst=5)
DEFAULT_UPVOTE_LIMIT = RateLimit(per_second=5.0, burst=10)

# snapshot fields this module adds (docs/protocol.md, "snapshot")
SNAPSHOT_LISTS = ("chat", "questions", "moderators", "banned", "blocked_words")
SNAPSHOT_FIELDS = (*SNAPSHOT_LISTS, "muted", "slow_mode")

_ACTIONS: dict[type, str] = {p.MuteUser: "mute", p.UnmuteUser: "unmute", p.BanUser: "ban",
                             p.UnbanUser: "unban", p.GrantModerator: "grant",
                             p.RevokeModerator: "revoke"}

_FORBIDDEN = {
    "not_moderator": "needs the host or a moderator of this room",
    "not_host": "needs role 'host'",
    "target_host": "the host can't be muted, banned or made a moderator",
    "target_moderator": "only the host can act on a moderator",
    "not_author": "only its author, a moderator or the host may mark a message as a question",
}


def _raise(result: dict[str, Any], ident: str | None = None) -> None:
    code = result.get("err")
    if code is None:
        return
    extra: dict[str, Any] = {}
    field: str | None = None
    if code == "forbidden":
        message = _FORBIDDEN.get(str(result.get("reason")), "not allowed")
    elif code == "banned":
        message = "you are banned from this room"
    elif code == "muted":
        extra["until"] = result["until"]
        message = f"you are muted until {result['until']} (server clock)"
    elif code == "slow_mode":
        extra.update(retry_ms=result["retry_ms"], seconds=result["seconds"])
        message = (f"slow mode: one message per {result['seconds']} s; retry in "
                   f"{result['retry_ms']} ms")
    elif code == "rate_limited":
        extra["retry_ms"] = result["retry_ms"]
        message = f"too many messages; retry in {result['retry_ms']} ms"
    elif code == "blocked_word":
        extra["word"] = result["word"]
        field = "text"
        message = f"the message contains the blocked word {result['word']!r}"
    elif code == "unknown_message":
        field = "message"
        message = f"no message {ident!r} in this room (deleted, or too old)"
    elif code == "unknown_question":
        field = "question"
        message = f"no question {ident!r} in this room"
    elif code == "duplicate_upvote":
        message = f"you already upvoted question {ident}"
    elif code == "own_question":
        field = "question"
        message = "you can't upvote your own question"
    elif code == "invalid_state":
        extra["state"] = result["state"]
        message = f"not allowed: {ident} is {result['state']}"
    else:
        message = str(code)
    raise p.ProtocolError(p.ErrorCode(code), message, field=field, **extra)


class ChatStore:
    def __init__(self, functions: RoomFunctions, chat_limit: RateLimit = DEFAULT_CHAT_LIMIT,
                 upvote_limit: RateLimit = DEFAULT_UPVOTE_LIMIT) -> None:
        self.functions = functions
        self.chat_limit = chat_limit
        self.upvote_limit = upvote_limit

    async def join(self, room: str, who: Identity) -> None:
        """A signed-in socket's hello: records its role in the room; `banned` if it is."""
        _raise(unpack_result(await self.functions.call("member_join", room, who.user_id,
                                                       who.role.value)))

    async def handle(self, room: str, who: Identity, msg: p.ChatRequest) -> dict[str, Any]:
        """Apply one request; returns the ack's fields, or raises the refusal."""
        f = self.functions
        actor = (who.user_id, who.display_name or who.user_id, who.role.value)
        ident: str | None = None
        if isinstance(msg, p.SendChat):
            raw = await f.call("chat_post", room, *actor, msg.text, chatnorm.token_line(msg.text),
                               repr(self.chat_limit.per_second), self.chat_limit.burst)
        elif isinstance(msg, p.DeleteChat):
            ident = msg.message
            raw = await f.call("chat_delete", room, *actor, msg.message)
        elif isinstance(msg, p.MuteUser):
            raw = await f.call("moderate", room, *actor, "mute", msg.user, msg.duration_ms)
        elif isinstance(msg, p.UnmuteUser | p.BanUser | p.UnbanUser | p.GrantModerator
                        | p.RevokeModerator):
            raw = await f.call("moderate", room, *actor, _ACTIONS[type(msg)], msg.user)
        elif isinstance(msg, p.SetSlowMode):
            raw = await f.call("slow_mode", room, *actor, msg.seconds)
        elif isinstance(msg, p.SetBlockedWords):
            raw = await f.call("blocked_words", room, *actor,
                               msgpack.packb(list(msg.words), use_bin_type=True),
                               msgpack.packb([chatnorm.blocked_entry(w) for w in msg.words],
                                             use_bin_type=True))
        elif isinstance(msg, p.MarkQuestion):
            ident = msg.message
            raw = await f.call("question_mark", room, *actor, msg.message)
        elif isinstance(msg, p.UpvoteQuestion):
            ident = msg.question
            raw = await f.call("question_upvote", room, who.user_id, who.role.value,
                               msg.question, repr(self.upvote_limit.per_second),
                               self.upvote_limit.burst)
        else:
            ident = msg.question
            raw = await f.call("question_answer", room, *actor, msg.question)
        result = unpack_result(raw)
        _raise(result, ident)
        return result

    async def snapshot(self, room: str) -> dict[str, Any]:
        """The room snapshot (roomlog's) plus chat, Q&A and moderation state, in one call."""
        raw = await self.functions.call("room_snapshot", room, SNAPSHOT_LOTS, SNAPSHOT_POLLS)
        snap: dict[str, Any] = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        # cmsgpack encodes an empty Lua table as a map.
        for name in ("lots", "polls", *SNAPSHOT_LISTS):
            if not isinstance(snap.get(name), list):
                snap[name] = []
        if not isinstance(snap.get("muted"), dict):
            snap["muted"] = {}
        return snap

    async def question_votes(self, room: str) -> dict[str, int]:
        flat: list[bytes] = await self.functions.call("question_votes", room)
        return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def redact(self, room: str, events: list[tuple[int, bytes]]) -> list[bytes]:
        """The replayed events, each `chat` event of a since-deleted message replaced by a
        `chat_redacted` tombstone (same offset and ts, no text): the log stays append-only."""
        if not events:
            return []
        gone: Any = await self.functions.redis.zrangebyscore(
            keys.chat_deleted(room), events[0][0], events[-1][0], withscores=True)
        if not gone:
            return [payload for _, payload in events]
        offsets = {int(score) for _, score in gone}
        out = []
        for offset, payload in events:
            if offset in offsets:
                ev = msgpack.unpackb(payload, raw=False, strict_map_key=False)
                payload = msgpack.packb({"type": "chat_redacted", "offset": offset,
                                         "ts": ev["ts"], "message": ev["id"]},
                                        use_bin_type=True)
            out.append(payload)
        return out
