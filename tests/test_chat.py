"""Chat on two real nodes and one real Redis: order, batching, recovery, deletion, limits."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
from chat_support import caught_up, client, state, two_nodes

from lotcast.auth import Role
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server(redis_any: RedisServer) -> RedisServer:
    """Every test here runs against one Redis and against a 3-primary Redis Cluster."""
    return redis_any


@pytest.fixture(scope="module")
def nodes(redis_server: RedisServer) -> Iterator[tuple[DevServerProcess, DevServerProcess]]:
    with two_nodes(redis_server.url, "--ws-msg-rate", "0") as pair:
        yield pair


@pytest.fixture
def room() -> str:
    return f"chat-{uuid.uuid4().hex[:8]}"


async def _close(*clients: RoomClient) -> None:
    for c in clients:
        await c.close()


def chat_frames(c: RoomClient) -> int:
    return sum(1 for _, m in c.received if m["type"] == "events" and not m.get("replay")
               and any(e["type"] == "chat" for e in m["events"]))


@pytest.mark.timeout(90)
async def test_order_identical_on_every_socket_across_nodes(
        nodes: tuple[DevServerProcess, DevServerProcess], room: str,
        redis_server: RedisServer) -> None:
    a, b = nodes
    watchers = [client(n.url, room) for n in (a, b, a, b)]
    chatters = [client((a, b)[i % 2].url, room, Role.BIDDER, f"u{i}", f"User {i}")
                for i in range(6)]
    host = client(a.url, room, Role.HOST, "host", "Host")
    for c in (*watchers, *chatters, host):
        await c.connect()
    started = time.monotonic()
    acks = await asyncio.gather(*(c.request("chat", text=f"{c.welcome['user']} says {n}")
                                  for n in range(5) for c in chatters))
    assert [r["type"] for r in acks] == ["ack"] * 30
    assert len({r["message"] for r in acks}) == 30
    assert all(r["for"] == "chat" and r["offset"] > 0 and r["ts"] > 0 for r in acks)
    await caught_up(redis_server.url, room, *watchers, *chatters)
    elapsed = time.monotonic() - started

    reference = state(watchers[0]).transcript()
    assert len(reference) == 30
    for c in (*watchers, *chatters):
        assert state(c).transcript() == reference  # same order on every socket, both nodes
    by_id = {r["message"]: r for r in acks}
    for msg in state(watchers[1]).chat.values():
        assert set(msg) >= {"id", "user", "name", "role", "text", "ts", "offset"}
        assert msg["role"] == "bidder" and msg["name"] == "User " + msg["user"][1:]
        assert by_id[msg["id"]]["offset"] == msg["offset"]
    # batched into the room's frames: at most one batch per 100 ms, never one per message
    for w in watchers:
        frames = chat_frames(w)
        assert frames <= elapsed / 0.1 + 2 and frames < 30, frames
    # the host's message carries its role
    ack = await host.request("chat", text="welcome all")
    await caught_up(redis_server.url, room, watchers[1])
    assert state(watchers[1]).chat[ack["message"]]["role"] == "host"
    await _close(*watchers, *chatters, host)


@pytest.mark.timeout(90)
async def test_resume_gives_the_transcript_of_a_socket_that_never_left(
        nodes: tuple[DevServerProcess, DevServerProcess], room: str,
        redis_server: RedisServer) -> None:
    a, b = nodes
    host = client(a.url, room, Role.HOST, "host", "Host")
    stayer = client(b.url, room)
    users = [client((a, b)[i % 2].url, room, Role.BIDDER, f"u{i}") for i in range(3)]
    for c in (host, stayer, *users):
        await c.connect()
    seen = [await users[i % 3].request("chat", text=f"before {i}") for i in range(6)]
    leaver = client(a.url, room)
    await leaver.connect()
    await caught_up(redis_server.url, room, leaver, stayer)
    assert len(state(leaver).chat) == 6
    await leaver.close()
    epoch, offset = leaver.state.epoch, leaver.state.offset

    # the gap: new messages, one of them deleted, and a deletion of one the leaver had seen
    gap = [await users[i % 3].request("chat", text=f"secret {i}" if i == 2 else f"gap {i}")
           for i in range(6)]
    assert (await host.request("chat_delete", message=gap[2]["message"]))["type"] == "ack"
    assert (await host.request("chat_delete", message=seen[1]["message"]))["type"] == "ack"
    await caught_up(redis_server.url, room, stayer)

    back = RoomClient(b.url, room)
    back.state = leaver.state
    await back.connect(resume=(epoch, offset))
    await caught_up(redis_server.url, room, back)
    assert back.state.snapshots == 1 and back.state.replayed >= 8
    assert state(back).transcript() == state(stayer).transcript()
    assert [t for _, _, t in state(back).transcript()] == [
        "before 0", "before 2", "before 3", "before 4", "before 5",
        "gap 0", "gap 1", "gap 3", "gap 4", "gap 5"]
    # the deleted message's text never reached the resumed socket: a tombstone holds its offset
    replayed = [e for _, m in back.received if m["type"] == "events" for e in m["events"]]
    assert not any(e.get("text") == "secret 2" for e in replayed)
    tomb = next(e for e in replayed if e["offset"] == gap[2]["offset"])
    assert tomb["type"] == "chat_redacted" and tomb["message"] == gap[2]["message"]
    assert set(tomb) == {"type", "offset", "ts", "message"}
    await _close(host, stayer, back, *users)


@pytest.mark.timeout(90)
async def test_snapshot_holds_the_last_100_and_never_a_deleted_message(
        nodes: tuple[DevServerProcess, DevServerProcess], room: str,
        redis_server: RedisServer) -> None:
    a, b = nodes
    host = client(a.url, room, Role.HOST, "host", "Host")
    await host.connect()
    users = [client((a, b)[i % 2].url, room, Role.BIDDER, f"u{i}") for i in range(22)]
    for c in users:
        await c.connect()
    acks = []
    for n in range(5):  # 110 messages, within every user's burst
        acks += await asyncio.gather(*(c.request("chat", text=f"m {n} {c.welcome['user']}")
                                       for c in users))
    assert all(r["type"] == "ack" for r in acks)
    ordered = sorted(acks, key=lambda r: r["offset"])
    deleted = [ordered[-1]["message"], ordered[-50]["message"]]
    for mid in deleted:
        assert (await host.request("chat_delete", message=mid))["type"] == "ack"
    again = await host.request("chat_delete", message=deleted[0])
    assert again["code"] == "unknown_message" and again["field"] == "message"

    fresh = client(b.url, room)
    await fresh.connect()
    await fresh.wait_for(lambda s: s.snapshots == 1)
    snap = next(m for _, m in fresh.received if m["type"] == "snapshot")
    ids = [m["id"] for m in snap["chat"]]
    expected = [r["message"] for r in ordered if r["message"] not in deleted][-100:]
    assert ids == expected
    assert not set(deleted) & set(ids)
    assert [m["offset"] for m in snap["chat"]] == sorted(m["offset"] for m in snap["chat"])
    await _close(host, fresh, *users)


@pytest.mark.timeout(60)
async def test_rate_limit_slow_mode_and_blocked_words(
        nodes: tuple[DevServerProcess, DevServerProcess], room: str,
        redis_server: RedisServer) -> None:
    a, b = nodes
    host = client(a.url, room, Role.HOST, "host", "Host")
    alice_a = client(a.url, room, Role.BIDDER, "alice", "Alice")
    alice_b = client(b.url, room, Role.BIDDER, "alice", "Alice")
    watcher = client(b.url, room)
    for c in (host, alice_a, alice_b, watcher):
        await c.connect()
    assert alice_a.welcome["limits"]["chat_per_s"] == 2.0
    assert alice_a.welcome["limits"]["chat_burst"] == 5

    # per user across nodes: the burst is shared by both of alice's sockets
    replies = await asyncio.gather(*(c.request("chat", text=f"hi {i}")
                                     for i in range(8) for c in (alice_a, alice_b)))
    limited = [r for r in replies if r["type"] == "error"]
    assert limited and {r["code"] for r in limited} == {"rate_limited"}
    assert all(r["retry_ms"] > 0 and r["for"] == "chat" for r in limited)
    assert len(replies) - len(limited) <= 5 + 2 * 10  # burst + refill over a generous 10 s

    # blocked words, normalized for case, accents and compatibility forms
    set_words = await host.request("blocked_words", words=["Spam", "buy now"])
    assert set_words["type"] == "ack" and set_words["count"] == 2
    bob = client(a.url, room, Role.BIDDER, "bob", "Bob")
    await bob.connect()
    for text, word in [("SPÁM here", "spam"), ("\uff53\uff50\uff41\uff4d", "spam"), ("Buy   NÓW!", "buy now"),
                       ("\u017fpam", "spam")]:
        r = await bob.request("chat", text=text)
        assert (r["type"], r["code"], r["word"], r["field"]) == ("error", "blocked_word", word,
                                                                 "text"), (text, r)
    assert (await bob.request("chat", text="spammer and buynow are fine"))["type"] == "ack"

    # slow mode: one message per user per N s; the host is exempt
    assert (await host.request("slow_mode", seconds=30))["seconds"] == 30
    carol = client(b.url, room, Role.BIDDER, "carol", "Carol")
    await carol.connect()
    assert (await carol.request("chat", text="first"))["type"] == "ack"
    slow = await carol.request("chat", text="second")
    assert slow["code"] == "slow_mode" and slow["seconds"] == 30
    assert 25_000 < slow["retry_ms"] <= 30_000
    assert (await host.request("chat", text="host one"))["type"] == "ack"
    assert (await host.request("chat", text="host two"))["type"] == "ack"
    assert (await host.request("slow_mode", seconds=0))["seconds"] == 0
    assert (await carol.request("chat", text="second"))["type"] == "ack"

    await caught_up(redis_server.url, room, watcher)
    log = [(e["type"], e.get("by")) for e in state(watcher).log if e["type"] != "chat"]
    assert log == [("blocked_words", "host"), ("slow_mode", "host"), ("slow_mode", "host")]
    assert state(watcher).moderation["blocked_words"] == ["Spam", "buy now"]
    assert not any(m["text"].startswith(("SPÁM", "second")) and m["user"] == "bob"
                   for m in state(watcher).chat.values())
    await _close(host, alice_a, alice_b, watcher, bob, carol)
