"""Polls over WebSockets: one vote per user, tallies coalesced, final counts in poll_closed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server(redis_any: RedisServer) -> RedisServer:
    """Every test here runs against one Redis and against a 3-primary Redis Cluster."""
    return redis_any


AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
VOTERS = 60


@pytest.fixture(scope="module")
def server(redis_server: RedisServer) -> Iterator[DevServerProcess]:
    with DevServerProcess(redis_server.url, jwt_secret=DEV_JWT_SECRET) as srv:
        yield srv


@pytest.mark.timeout(60)
async def test_votes_are_counted_once_and_tallies_coalesced(server: DevServerProcess) -> None:
    room = "polls"
    host = RoomClient(server.url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
    watcher = RoomClient(server.url, room)
    voters = [RoomClient(server.url, room, AUTHORITY.mint(Role.BIDDER, f"v{i}", f"V{i}"))
              for i in range(VOTERS)]
    await host.connect()
    await watcher.connect()
    await asyncio.gather(*(v.connect() for v in voters))
    poll = (await host.request("poll_open", question="Colour?", options=["red", "green", "blue"],
                               duration_ms=60_000))["poll"]

    started = time.monotonic()
    for round_ in range(3):  # spread votes over a while, twice per voter (second is a duplicate)
        batch = voters[round_ * 20:(round_ + 1) * 20]
        replies = await asyncio.gather(*(v.request("vote", poll=poll, option=i % 3)
                                         for i, v in enumerate(batch)))
        assert all(r["type"] == "ack" for r in replies)
        dups = await asyncio.gather(*(v.request("vote", poll=poll, option=0) for v in batch))
        assert {r["code"] for r in dups} == {"duplicate_vote"}
        await asyncio.sleep(0.3)
    await watcher.wait_for(lambda s: s.polls[poll]["total"] == VOTERS, within=10)
    elapsed = time.monotonic() - started
    tallies = [m for _, m in watcher.received if m["type"] == "tally" and m["poll"] == poll]
    # Coalesced: at most one tally per 200 ms interval (plus the leading one), not one per vote.
    assert len(tallies) <= elapsed / 0.2 + 2
    assert len(tallies) < VOTERS / 3
    assert watcher.state.polls[poll]["counts"] == [21, 21, 18]

    closed = await host.request("poll_close", poll=poll)
    assert closed["type"] == "ack"
    await watcher.wait_for(lambda s: s.polls[poll]["status"] == "closed")
    final = next(e for e in watcher.state.applied if e["type"] == "poll_closed")
    assert (final["counts"], final["total"], final["by"]) == ([21, 21, 18], VOTERS, "host")
    late = await voters[0].request("vote", poll=poll, option=1)
    assert late["code"] == "poll_closed"

    # A client joining now gets the same poll from the snapshot.
    late_joiner = RoomClient(server.url, room)
    await late_joiner.connect()
    await late_joiner.wait_for(lambda s: poll in s.polls)
    assert late_joiner.state.polls[poll] == watcher.state.polls[poll]
    for c in (host, watcher, late_joiner, *voters):
        await c.close()


@pytest.mark.timeout(30)
async def test_poll_closes_by_server_clock(server: DevServerProcess) -> None:
    room = "poll-clock"
    host = RoomClient(server.url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
    await host.connect()
    poll = (await host.request("poll_open", question="Quick?", options=["y", "n"],
                               duration_ms=1000))["poll"]
    await host.wait_for(lambda s: s.polls.get(poll, {}).get("status") == "closed", within=10)
    final = [e for e in host.state.applied if e["type"] == "poll_closed"]
    assert len(final) == 1 and final[0]["by"] == "time"
    await host.close()


@pytest.mark.timeout(30)
async def test_viewer_count_spans_nodes(redis_server: RedisServer,
                                        server: DevServerProcess) -> None:
    with DevServerProcess(redis_server.url, jwt_secret=DEV_JWT_SECRET) as other:
        room = "count"
        a = [RoomClient(server.url, room) for _ in range(3)]
        b = [RoomClient(other.url, room) for _ in range(2)]
        for c in a + b:
            await c.connect()
        await a[0].wait_for(lambda s: s.viewers == 5, within=10)
        await b[0].wait_for(lambda s: s.viewers == 5, within=10)
        for c in b:
            await c.close()
        await a[0].wait_for(lambda s: s.viewers == 3, within=10)
        for c in a:
            await c.close()
