"""A chat-aware client state (the docs/protocol.md chat, moderation and Q&A rules) and helpers
for tests that run two real nodes on one real Redis."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import redis

from lotcast import keys, redisconn
from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive.client import RoomClient, RoomState
from lotcast.interactive.devserver import DevServerProcess

AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
CHAT_EVENTS = {"chat", "chat_deleted", "chat_redacted", "user_muted", "user_unmuted",
               "user_banned", "user_unbanned", "moderator_granted", "moderator_revoked",
               "slow_mode", "blocked_words", "question", "question_answered"}


class ChatState(RoomState):
    """RoomState plus the chat transcript, questions and moderation state."""

    def __init__(self) -> None:
        super().__init__()
        self.chat: dict[str, dict[str, Any]] = {}  # id -> message, in log order
        self.questions: dict[str, dict[str, Any]] = {}  # open questions
        self.moderation: dict[str, Any] = {"slow_mode": 0, "blocked_words": [], "muted": {},
                                           "banned": set(), "moderators": set()}
        self.log: list[dict[str, Any]] = []  # every chat/moderation event applied

    def apply(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "snapshot":
            self.chat = {m["id"]: dict(m) for m in msg["chat"]}
            self.questions = {q["question"]: dict(q) for q in msg["questions"]}
            self.moderation = {"slow_mode": msg["slow_mode"],
                               "blocked_words": list(msg["blocked_words"]),
                               "muted": dict(msg["muted"]), "banned": set(msg["banned"]),
                               "moderators": set(msg["moderators"])}
        elif kind == "question_votes":
            for qid, votes in msg["votes"].items():
                q = self.questions.get(qid)
                if q is not None and votes > q["votes"]:
                    q["votes"] = votes
            return
        super().apply(msg)

    def _apply_event(self, ev: dict[str, Any]) -> None:
        kind = ev["type"]
        if kind not in CHAT_EVENTS:
            super()._apply_event(ev)
            return
        self.applied.append(ev)
        self.log.append(ev)
        mod = self.moderation
        if kind == "chat":
            self.chat[ev["id"]] = {k: v for k, v in ev.items() if k != "type"}
        elif kind == "chat_deleted":
            self.chat.pop(ev["message"], None)
            self.questions.pop(ev["message"], None)
        elif kind == "question":
            if ev["question"] in self.chat:
                self.chat[ev["question"]]["question"] = True
            self.questions[ev["question"]] = {
                "question": ev["question"], "user": ev["user"], "name": ev["name"],
                "text": ev["text"], "votes": 0, "status": "open"}
        elif kind == "question_answered":
            self.questions.pop(ev["question"], None)
        elif kind == "user_muted":
            mod["muted"][ev["user"]] = ev["until"]
        elif kind == "user_unmuted":
            mod["muted"].pop(ev["user"], None)
        elif kind == "user_banned":
            mod["banned"].add(ev["user"])
        elif kind == "user_unbanned":
            mod["banned"].discard(ev["user"])
        elif kind == "moderator_granted":
            mod["moderators"].add(ev["user"])
        elif kind == "moderator_revoked":
            mod["moderators"].discard(ev["user"])
        elif kind == "slow_mode":
            mod["slow_mode"] = ev["seconds"]
        elif kind == "blocked_words":
            mod["blocked_words"] = list(ev["words"])

    def transcript(self) -> list[tuple[str, str, str]]:
        return [(m["id"], m["user"], m["text"]) for m in self.chat.values()]


def client(url: str, room: str, role: Role | None = None, user: str = "",
           name: str = "") -> RoomClient:
    token = AUTHORITY.mint(role, user, name or user) if role is not None else None
    c = RoomClient(url, room, token)
    c.state = ChatState()
    return c


def state(c: RoomClient) -> ChatState:
    assert isinstance(c.state, ChatState)
    return c.state


@contextlib.contextmanager
def two_nodes(redis_url: str, *args: str) -> Iterator[tuple[DevServerProcess, DevServerProcess]]:
    with DevServerProcess(redis_url, "--node-id", "node-a", *args,
                          jwt_secret=DEV_JWT_SECRET) as a, \
            DevServerProcess(redis_url, "--node-id", "node-b", *args,
                             jwt_secret=DEV_JWT_SECRET) as b:
        yield a, b


def room_head(redis_url: str, room: str) -> int:
    """The offset of the room's newest log event, read from Redis."""
    target = redisconn.parse_redis_url(redis_url)
    r: redis.Redis | redis.RedisCluster = (
        redis.RedisCluster(host=target.nodes[0][0], port=target.nodes[0][1])
        if target.mode is redisconn.RedisMode.CLUSTER else redis.Redis.from_url(redis_url))
    try:
        return int(r.get(keys.room_seq(room)) or 0)  # type: ignore[arg-type]
    finally:
        r.close()


async def caught_up(redis_url: str, room: str, *readers: RoomClient,
                    within: float = 10.0) -> int:
    """Wait until every reader applied the room log up to its newest event now."""
    target = room_head(redis_url, room)
    for r in readers:
        await r.wait_for(lambda s: s.offset >= target, within=within)
    return target
