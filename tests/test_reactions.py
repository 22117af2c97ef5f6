"""Reactions on two real nodes: counts converge everywhere, a flood from one user is cut off by
the per-user limit in Redis (across nodes) and reaches watchers as coalesced frames only."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from show_support import show_client, state

from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive import protocol as p
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.interactive.reactions import REACTION_LIMIT
from lotcast.redis_server import RedisServer

AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
TALLY_INTERVAL = 0.2  # Settings.tally_interval_ms


@pytest.fixture(scope="module")
def nodes(redis_server: RedisServer) -> Iterator[tuple[DevServerProcess, DevServerProcess]]:
    with DevServerProcess(redis_server.url, jwt_secret=DEV_JWT_SECRET) as a, \
            DevServerProcess(redis_server.url, jwt_secret=DEV_JWT_SECRET) as b:
        yield a, b


def user(url: str, room: str, name: str) -> RoomClient:
    return show_client(url, room, AUTHORITY.mint(Role.BIDDER, name, name))


async def burst(client: RoomClient, reactions: list[str]) -> list[dict[str, Any]]:
    """Send every reaction at once (no waiting between taps), then collect every answer."""
    replies: list[dict[str, Any]] = []

    def seen() -> bool:
        got = [m for _, m in client.received
               if m["type"] in ("ack", "error") and str(m.get("cid", "")).startswith("t")]
        replies[:] = got
        return len(got) == len(reactions)

    for i, name in enumerate(reactions):
        await client.send_raw(p.encode_client("react", cid=f"t{i}", reaction=name))
    async with asyncio.timeout(20):
        while not seen():
            await client.wait_for(lambda s: True, within=1)
            await asyncio.sleep(0.02)
    return replies


@pytest.mark.timeout(60)
async def test_counts_converge_on_both_nodes(nodes: tuple[DevServerProcess, DevServerProcess]
                                             ) -> None:
    a, b = nodes
    room = f"r-{uuid.uuid4().hex[:8]}"
    watch_a, watch_b = show_client(a.url, room), show_client(b.url, room)
    alice, bob = user(a.url, room, "alice"), user(b.url, room, "bob")
    host = show_client(a.url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
    for c in (watch_a, watch_b, alice, bob, host):
        await c.connect()
    want = {"heart": 4, "fire": 2, "laugh": 0, "clap": 3}
    acks = [await alice.request("react", reaction="heart") for _ in range(4)]
    acks += [await bob.request("react", reaction=r) for r in ("fire", "fire", "clap", "clap")]
    acks.append(await host.request("react", reaction="clap"))  # any signed-in role may react
    assert all(m["type"] == "ack" and m["for"] == "react" for m in acks), acks
    assert [m["count"] for m in acks[:4]] == [1, 2, 3, 4]
    for w in (watch_a, watch_b):
        await w.wait_for(lambda s: s.reactions == want)  # type: ignore[attr-defined]
    frames = [m for _, m in watch_b.received if m["type"] == "reactions"]
    assert frames[-1]["total"] == 9 and set(frames[-1]["counts"]) == set(p.REACTIONS)

    # A late joiner gets the counts in its snapshot; a resume gets a `reactions` frame.
    late = show_client(b.url, room)
    await late.connect()
    await late.wait_for(lambda s: s.snapshots == 1)
    assert state(late).reactions == want
    position = (late.state.epoch, late.state.offset)
    await late.close()
    again = show_client(a.url, room)
    await again.connect(resume=position)
    await again.wait_for(lambda s: s.reaction_frames >= 1)  # type: ignore[attr-defined]
    assert state(again).snapshots == 0 and state(again).reactions == want
    for c in (watch_a, watch_b, alice, bob, host, again):
        await c.close()


@pytest.mark.timeout(60)
async def test_flood_is_rate_limited_across_nodes_and_coalesced(
        nodes: tuple[DevServerProcess, DevServerProcess]) -> None:
    a, b = nodes
    room = f"r-{uuid.uuid4().hex[:8]}"
    watcher = show_client(b.url, room)
    flooder_a, flooder_b = user(a.url, room, "mallory"), user(b.url, room, "mallory")
    for c in (watcher, flooder_a, flooder_b):
        await c.connect()
    taps = 50  # under the per-connection flood guard (60 burst): every refusal is the user limit
    started = time.monotonic()
    replies = await burst(flooder_a, ["fire"] * taps) + await burst(flooder_b, ["heart"] * taps)
    elapsed = time.monotonic() - started
    accepted = [m for m in replies if m["type"] == "ack"]
    limited = [m for m in replies if m["type"] == "error"]
    assert {m["code"] for m in limited} == {"rate_limited"}
    assert all(m["retry_ms"] > 0 and m["for"] == "react" for m in limited)
    # one bucket for the user on both nodes: burst plus what refilled meanwhile
    assert REACTION_LIMIT.burst <= len(accepted) <= (REACTION_LIMIT.burst + 1
                                                     + elapsed * REACTION_LIMIT.per_second)
    assert any(m["type"] == "error" for m in replies[taps:])  # the second node refused too
    total = len(accepted)
    await watcher.wait_for(lambda s: sum(s.reactions.values()) == total)  # type: ignore[attr-defined]
    await asyncio.sleep(3 * TALLY_INTERVAL)  # anything still coalescing arrives
    watched = time.monotonic() - started
    frames = [m for _, m in watcher.received if m["type"] == "reactions"]
    # coalesced: never a frame per tap, at most one per tally interval (plus the leading one)
    assert len(frames) < total
    assert len(frames) <= watched / TALLY_INTERVAL + 2
    assert frames[-1]["total"] == total
    for c in (watcher, flooder_a, flooder_b):
        await c.close()


@pytest.mark.timeout(30)
async def test_anonymous_may_not_react(nodes: tuple[DevServerProcess, DevServerProcess]) -> None:
    viewer = show_client(nodes[0].url, f"r-{uuid.uuid4().hex[:8]}")
    await viewer.connect()
    refused = await viewer.request("react", reaction="heart")
    assert (refused["type"], refused["code"], refused["for"]) == ("error", "forbidden", "react")
    await viewer.close()


def frame(**fields: Any) -> bytes:
    return p.encode_client("react", cid=1, **fields)


@pytest.mark.parametrize(("raw", "code", "field"), [
    (frame(), p.ErrorCode.MISSING_FIELD, "reaction"),
    (frame(reaction="smile"), p.ErrorCode.INVALID_FIELD, "reaction"),
    (frame(reaction="HEART"), p.ErrorCode.INVALID_FIELD, "reaction"),
    (frame(reaction="❤️"), p.ErrorCode.INVALID_FIELD, "reaction"),
    (frame(reaction=1), p.ErrorCode.WRONG_TYPE, "reaction"),
    (frame(reaction="fire", count=3), p.ErrorCode.UNKNOWN_FIELD, "count"),
])
def test_react_bad_input(raw: bytes, code: p.ErrorCode, field: str) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.parse_client_frame(raw)
    assert (info.value.code, info.value.field, info.value.request) == (code, field, "react")
    assert msgpack.unpackb(raw)["type"] == "react"
