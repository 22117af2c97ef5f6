"""Q&A on two real nodes and one real Redis: one upvote per user, counts coalesced and
converging on every node, open questions sorted by votes, answered ones leave the list."""

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

VOTERS = 24


@pytest.fixture(scope="module")
def nodes(redis_server: RedisServer) -> Iterator[tuple[DevServerProcess, DevServerProcess]]:
    with two_nodes(redis_server.url, "--ws-msg-rate", "0") as pair:
        yield pair


@pytest.mark.timeout(90)
async def test_one_upvote_per_user_counts_converge_on_every_node(
        nodes: tuple[DevServerProcess, DevServerProcess], redis_server: RedisServer) -> None:
    a, b = nodes
    room = f"qna-{uuid.uuid4().hex[:8]}"
    host = client(a.url, room, Role.HOST, "host", "Host")
    asker = client(b.url, room, Role.BIDDER, "ann", "Ann")
    watchers = [client(n.url, room) for n in (a, b)]
    voters = [client((a, b)[i % 2].url, room, Role.BIDDER, f"v{i}") for i in range(VOTERS)]
    for c in (host, asker, *watchers, *voters):
        await c.connect()
    q1 = (await asker.request("chat", text="Is it signed?"))["message"]
    q2 = (await asker.request("chat", text="Does it ship abroad?"))["message"]
    plain = (await voters[0].request("chat", text="nice"))["message"]
    marked = await asker.request("question_mark", message=q1)
    assert (marked["type"], marked["question"]) == ("ack", q1)
    assert (await asker.request("question_mark", message=q2))["type"] == "ack"
    again = await asker.request("question_mark", message=q1)
    assert (again["code"], again["state"]) == ("invalid_state", "question")
    # only the author, a moderator or the host marks a message as a question
    assert (await asker.request("question_mark", message=plain))["code"] == "forbidden"
    own = await asker.request("question_upvote", question=q1)
    assert (own["code"], own["field"]) == ("own_question", "question")

    started = time.monotonic()
    first = await asyncio.gather(*(v.request("question_upvote", question=q1) for v in voters))
    assert [r["type"] for r in first] == ["ack"] * VOTERS
    assert sorted(r["votes"] for r in first) == list(range(1, VOTERS + 1))
    dups = await asyncio.gather(*(v.request("question_upvote", question=q1) for v in voters))
    assert {r["code"] for r in dups} == {"duplicate_upvote"}
    some = await asyncio.gather(*(v.request("question_upvote", question=q2)
                                  for v in voters[:5]))
    assert [r["type"] for r in some] == ["ack"] * 5

    for w in (*watchers, host):
        await w.wait_for(lambda s: s.questions.get(q1, {}).get("votes") == VOTERS
                         and s.questions.get(q2, {}).get("votes") == 5, within=10)
    elapsed = time.monotonic() - started
    for w in watchers:
        frames = [m for _, m in w.received if m["type"] == "question_votes"]
        # coalesced like poll tallies: at most one frame per 200 ms, not one per upvote
        assert len(frames) <= elapsed / 0.2 + 2 and len(frames) < VOTERS, len(frames)
        assert frames[-1]["votes"][q1] == VOTERS

    # a new socket sees open questions sorted by votes; a resumed one gets the counts
    fresh = client(b.url, room, Role.HOST, "host", "Host")
    await fresh.connect()
    await fresh.wait_for(lambda s: s.snapshots == 1)
    snap = next(m for _, m in fresh.received if m["type"] == "snapshot")
    assert [(q["question"], q["votes"], q["text"], q["user"]) for q in snap["questions"]] == [
        (q1, VOTERS, "Is it signed?", "ann"), (q2, 5, "Does it ship abroad?", "ann")]
    assert [m["question"] for m in snap["chat"] if m["id"] in (q1, q2)] == [True, True]

    leaver = watchers[0]
    await caught_up(redis_server.url, room, leaver)
    await leaver.close()
    more = await asyncio.gather(*(v.request("question_upvote", question=q2)
                                  for v in voters[5:9]))
    assert [r["type"] for r in more] == ["ack"] * 4
    back = RoomClient(a.url, room)
    back.state = leaver.state
    await back.connect(resume=(leaver.state.epoch, leaver.state.offset))
    await back.wait_for(lambda s: s.questions[q2]["votes"] == 9)
    assert back.state.snapshots == 1

    # the host answers: it leaves the open list everywhere; no more upvotes
    answered = await host.request("question_answer", question=q1)
    assert (answered["type"], answered["votes"]) == ("ack", VOTERS)
    late = await voters[0].request("question_upvote", question=q2)
    assert late["code"] == "duplicate_upvote"
    closed = await voters[-1].request("question_upvote", question=q1)
    assert (closed["code"], closed["state"]) == ("invalid_state", "answered")
    twice = await host.request("question_answer", question=q1)
    assert (twice["code"], twice["state"]) == ("invalid_state", "answered")
    assert (await asker.request("question_answer", question=q2))["code"] == "forbidden"
    await caught_up(redis_server.url, room, watchers[1], back)
    for w in (watchers[1], back):
        assert list(state(w).questions) == [q2]
        ev = next(e for e in state(w).log if e["type"] == "question_answered")
        assert (ev["question"], ev["votes"], ev["by"]) == (q1, VOTERS, "host")
    for c in (host, asker, watchers[1], back, fresh, *voters):
        await c.close()
