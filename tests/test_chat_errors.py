"""Bad input for every chat, moderation and Q&A message over a real WebSocket: each gets its
exact error code and field, the connection stays open, and the node logs no traceback."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from chat_support import client

from lotcast.auth import Role
from lotcast.interactive import protocol as p
from lotcast.interactive.devserver import DevServerProcess
from lotcast.redis_server import RedisServer


@pytest.fixture(scope="module")
def server(redis_server: RedisServer) -> Iterator[DevServerProcess]:
    with DevServerProcess(redis_server.url, "--ws-msg-rate", "0",
                          jwt_secret="lotcast-dev-secret-change-me-0123456789") as srv:
        yield srv


# (message, expected code, expected field)
SCHEMA_CASES: list[tuple[dict[str, Any], str, str | None]] = [
    ({"type": "chat"}, "missing_field", "text"),
    ({"type": "chat", "text": 5}, "wrong_type", "text"),
    ({"type": "chat", "text": b"hi"}, "wrong_type", "text"),
    ({"type": "chat", "text": ""}, "invalid_field", "text"),
    ({"type": "chat", "text": "x" * 501}, "invalid_field", "text"),
    ({"type": "chat", "text": "   "}, "invalid_field", "text"),
    ({"type": "chat", "text": "two\nlines"}, "invalid_field", "text"),
    ({"type": "chat", "text": "hi", "to": "u1"}, "unknown_field", "to"),
    ({"type": "chat_delete"}, "missing_field", "message"),
    ({"type": "chat_delete", "message": 7}, "wrong_type", "message"),
    ({"type": "chat_delete", "message": "M" * 65}, "invalid_field", "message"),
    ({"type": "user_mute", "user": "u1"}, "missing_field", "duration_ms"),
    ({"type": "user_mute", "user": "u1", "duration_ms": 999}, "invalid_field", "duration_ms"),
    ({"type": "user_mute", "user": "u1", "duration_ms": 7 * 86_400_000 + 1}, "invalid_field",
     "duration_ms"),
    ({"type": "user_mute", "user": "u1", "duration_ms": 5000.0}, "wrong_type", "duration_ms"),
    ({"type": "user_mute", "user": "", "duration_ms": 5000}, "invalid_field", "user"),
    ({"type": "user_unmute", "user": ["u1"]}, "wrong_type", "user"),
    ({"type": "user_ban"}, "missing_field", "user"),
    ({"type": "user_ban", "user": True}, "wrong_type", "user"),
    ({"type": "user_unban", "user": "x" * 65}, "invalid_field", "user"),
    ({"type": "moderator_grant", "user": 1}, "wrong_type", "user"),
    ({"type": "moderator_revoke"}, "missing_field", "user"),
    ({"type": "slow_mode", "seconds": -1}, "invalid_field", "seconds"),
    ({"type": "slow_mode", "seconds": 3601}, "invalid_field", "seconds"),
    ({"type": "slow_mode", "seconds": "5"}, "wrong_type", "seconds"),
    ({"type": "slow_mode", "seconds": True}, "wrong_type", "seconds"),
    ({"type": "blocked_words", "words": "spam"}, "wrong_type", "words"),
    ({"type": "blocked_words", "words": ["ok", 3]}, "wrong_type", "words[1]"),
    ({"type": "blocked_words", "words": ["ok", ""]}, "invalid_field", "words[1]"),
    ({"type": "blocked_words", "words": ["x" * 51]}, "invalid_field", "words[0]"),
    ({"type": "blocked_words", "words": ["!!!"]}, "invalid_field", "words[0]"),
    ({"type": "blocked_words", "words": ["w"] * 201}, "invalid_field", "words"),
    ({"type": "question_mark"}, "missing_field", "message"),
    ({"type": "question_mark", "message": 1.5}, "wrong_type", "message"),
    ({"type": "question_upvote", "question": ""}, "invalid_field", "question"),
    ({"type": "question_upvote", "question": {"id": "M1"}}, "wrong_type", "question"),
    ({"type": "question_answer", "question": None}, "missing_field", "question"),
]


@pytest.mark.timeout(60)
async def test_schema_errors_for_every_new_type(server: DevServerProcess) -> None:
    room = f"ce-{uuid.uuid4().hex[:8]}"
    host = client(server.url, room, Role.HOST, "host", "Host")
    await host.connect()
    for i, (msg, code, field) in enumerate(SCHEMA_CASES):
        await host.send_raw(msgpack.packb({"cid": f"s{i}", **msg}, use_bin_type=True))
        reply = await host.next_reply()
        assert (reply["type"], reply["code"], reply.get("field"), reply["cid"],
                reply["for"]) == ("error", code, field, f"s{i}", msg["type"]), (msg, reply)
    assert (await host.request("ping"))["type"] == "pong"
    await host.close()
    assert {k for k in p.SCHEMAS} >= {m["type"] for m, _, _ in SCHEMA_CASES}


@pytest.mark.timeout(60)
async def test_unknown_ids_and_wrong_roles(server: DevServerProcess) -> None:
    room = f"ce-{uuid.uuid4().hex[:8]}"
    host = client(server.url, room, Role.HOST, "host", "Host")
    bidder = client(server.url, room, Role.BIDDER, "bea", "Bea")
    mod = client(server.url, room, Role.MODERATOR, "mo", "Mo")
    for c in (host, bidder, mod):
        await c.connect()
    cases: list[tuple[Any, str, dict[str, Any], str, str | None]] = [
        (host, "chat_delete", {"message": "M99"}, "unknown_message", "message"),
        (mod, "chat_delete", {"message": "nope"}, "unknown_message", "message"),
        (bidder, "question_mark", {"message": "M99"}, "unknown_message", "message"),
        (bidder, "question_upvote", {"question": "M99"}, "unknown_question", "question"),
        (host, "question_answer", {"question": "M99"}, "unknown_question", "question"),
        # static role checks: host-only types
        (mod, "slow_mode", {"seconds": 5}, "forbidden", None),
        (mod, "question_answer", {"question": "M1"}, "forbidden", None),
        (bidder, "moderator_grant", {"user": "bea"}, "forbidden", None),
        # a moderator token may chat and moderate but not bid
        (mod, "bid", {"lot": "L1", "amount": 100}, "forbidden", None),
    ]
    for c, kind, fields, code, field in cases:
        reply = await c.request(kind, **fields)
        assert (reply["type"], reply["code"], reply.get("field"), reply["for"]) == (
            "error", code, field, kind), (kind, reply)
    # a moderator's own message carries its role; moderators and the host may chat
    said = await mod.request("chat", text="rules: be nice")
    assert said["type"] == "ack"
    assert (await host.request("question_mark", message=said["message"]))["type"] == "ack"
    for c in (host, bidder, mod):
        assert (await c.request("ping"))["type"] == "pong"
        await c.close()
    assert mod.welcome["role"] == "moderator"
    problems = [line for line in server.output if "Traceback" in line or "ERROR" in line]
    assert not problems, "".join(server.output[-40:])
