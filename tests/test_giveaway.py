"""Giveaways on two real nodes and a real Redis: one entry per user, only entrants connected at
the draw are eligible, the logged record re-derives the winner, no draw while a lot is open."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import redis.asyncio as aioredis
from show_support import eventually, show_client, state

from lotcast import keys
from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive import protocol as p
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.redis_server import RedisServer

AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
LOT = {"title": "Poster", "start_price": 1000, "increments": [[0, 100]], "duration_ms": 60000,
       "soft_close_ms": 0}


@pytest.fixture(scope="module")
def nodes(redis_server: RedisServer) -> Iterator[tuple[DevServerProcess, DevServerProcess]]:
    with DevServerProcess(redis_server.url, jwt_secret=DEV_JWT_SECRET) as a, \
            DevServerProcess(redis_server.url, jwt_secret=DEV_JWT_SECRET) as b:
        yield a, b


def bidder(url: str, room: str, user: str) -> RoomClient:
    return show_client(url, room, AUTHORITY.mint(Role.BIDDER, user, user.upper()))


def recheck(opened: dict[str, Any], drawn: dict[str, Any], users: list[str]) -> str:
    """docs/protocol.md, "Re-checking a draw": returns the winner the record implies."""
    seed = bytes.fromhex(drawn["seed"])
    assert hashlib.sha256(seed).hexdigest() == opened["commitment"] == drawn["commitment"]
    assert users == sorted(users, key=lambda u: u.encode())
    assert len(users) == drawn["eligible"]
    assert hashlib.sha1("\n".join(users).encode()).hexdigest() == drawn["eligible_sha1"]
    mac = hmac.new(seed, drawn["giveaway"].encode(), hashlib.sha256).digest()
    index = int.from_bytes(mac, "big") % len(users)
    assert index == drawn["index"]
    return users[index]


async def offline(redis: aioredis.Redis, room: str, node: str, user: str) -> bool:
    return not await redis.sismember(keys.room_online(room, node), user)  # type: ignore[misc]


@pytest.mark.timeout(90)
async def test_giveaway_entries_eligibility_and_proof(
        nodes: tuple[DevServerProcess, DevServerProcess], redis_client: aioredis.Redis) -> None:
    a, b = nodes
    room = f"g-{uuid.uuid4().hex[:8]}"
    host = show_client(a.url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
    watcher_b = show_client(b.url, room)
    users = {"u1": a, "u2": b, "u3": a, "u4": b, "u5": a}
    clients = {u: bidder(node.url, room, u) for u, node in users.items()}
    u3_second = bidder(b.url, room, "u3")  # u3 also connected on the other node
    for c in (host, watcher_b, *clients.values(), u3_second):
        await c.connect()

    opened = await host.request("giveaway_open", item="Signed poster")
    assert opened["type"] == "ack" and opened["for"] == "giveaway_open", opened
    gid = opened["giveaway"]
    assert len(opened["commitment"]) == 64
    again = await host.request("giveaway_open", item="Another")
    assert (again["code"], again["giveaway"]) == ("giveaway_in_progress", gid)
    await watcher_b.wait_for(lambda s: s.giveaway is not None and s.giveaway["status"] == "open")
    assert "seed" not in state(watcher_b).giveaway  # type: ignore[operator]

    for i, c in enumerate(clients.values()):
        entered = await c.request("giveaway_enter", giveaway=gid)
        assert (entered["type"], entered["giveaway"], entered["entrants"]) == ("ack", gid, i + 1)
    dup = await u3_second.request("giveaway_enter", giveaway=gid)
    assert (dup["type"], dup["code"], dup["for"]) == ("error", "duplicate_entry", "giveaway_enter")
    assert (await watcher_b.request("giveaway_enter", giveaway=gid))["code"] == "forbidden"
    assert (await host.request("giveaway_enter", giveaway=gid))["code"] == "forbidden"
    assert (await clients["u1"].request("giveaway_enter", giveaway="G999"))["code"] == \
        "unknown_giveaway"
    assert (await clients["u1"].request("giveaway_draw", giveaway=gid))["code"] == "forbidden"

    # A lot is open: no draw (and no new giveaway) until it ends.
    lot = (await host.request("lot_create", **LOT))["lot"]
    assert (await host.request("lot_open", lot=lot))["type"] == "ack"
    refused = await host.request("giveaway_draw", giveaway=gid)
    assert (refused["type"], refused["code"], refused["lot"]) == ("error", "lot_is_open", lot)
    assert (await host.request("lot_close", lot=lot))["status"] == "unsold"

    # u4 leaves entirely; u3 closes one of its two sockets; u5 leaves and comes back.
    for c in (clients["u4"], clients["u3"], clients["u5"]):
        await c.close()
    await eventually(lambda: offline(redis_client, room, watcher_b.welcome["node"], "u4"))
    await eventually(lambda: offline(redis_client, room, host.welcome["node"], "u5"))
    assert not await offline(redis_client, room, watcher_b.welcome["node"], "u3")
    back = bidder(a.url, room, "u5")
    await back.connect()
    await back.wait_for(lambda s: s.snapshots == 1)
    snap_entered = state(back).giveaway
    assert snap_entered is not None and snap_entered["entered"] is True
    assert snap_entered["entrants"] == 5

    drawn = await host.request("giveaway_draw", giveaway=gid)
    assert drawn["type"] == "ack", drawn
    assert (drawn["entrants"], drawn["eligible"]) == (5, 4)
    assert drawn["winner"] in {"u1", "u2", "u3", "u5"}
    await watcher_b.wait_for(lambda s: s.giveaway is not None and s.giveaway["status"] == "drawn")
    event = next(e for e in state(watcher_b).applied if e["type"] == "giveaway_drawn")
    assert (event["winner"], event["winner_name"]) == (drawn["winner"], drawn["winner"].upper())

    proof = await watcher_b.request("giveaway_proof", giveaway=gid)
    assert proof["type"] == "ack" and proof["users"] == ["u1", "u2", "u3", "u5"], proof
    assert "next" not in proof
    assert recheck(opened, event, proof["users"]) == drawn["winner"] == proof["winner"]

    for late in ("giveaway_enter", "giveaway_draw", "giveaway_cancel"):
        c = clients["u1"] if late == "giveaway_enter" else host
        err = await c.request(late, giveaway=gid)
        assert (err["code"], err["state"]) == ("giveaway_closed", "drawn"), late

    joiner = show_client(b.url, room)
    await joiner.connect()
    await joiner.wait_for(lambda s: s.snapshots == 1)
    snap = state(joiner).giveaway
    assert snap is not None and snap["status"] == "drawn" and snap["winner"] == drawn["winner"]
    assert snap["seed"] == event["seed"] and "entered" not in snap
    for c in (host, watcher_b, clients["u1"], clients["u2"], u3_second, back, joiner):
        await c.close()


@pytest.mark.timeout(60)
async def test_draw_with_nobody_connected_then_cancel(
        nodes: tuple[DevServerProcess, DevServerProcess], redis_client: aioredis.Redis) -> None:
    a, b = nodes
    room = f"g-{uuid.uuid4().hex[:8]}"
    host = show_client(a.url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
    await host.connect()
    gid = (await host.request("giveaway_open", item="Mug"))["giveaway"]
    early = await host.request("giveaway_proof", giveaway=gid)
    assert (early["code"], early["state"]) == ("not_drawn", "open")
    entrant = bidder(b.url, room, "solo")
    await entrant.connect()
    assert (await entrant.request("giveaway_enter", giveaway=gid))["type"] == "ack"
    node_b = entrant.welcome["node"]
    await entrant.close()
    await eventually(lambda: offline(redis_client, room, node_b, "solo"))
    none = await host.request("giveaway_draw", giveaway=gid)
    assert (none["code"], none["entrants"]) == ("no_eligible_entrants", 1)
    cancelled = await host.request("giveaway_cancel", giveaway=gid)
    assert cancelled["type"] == "ack"
    await host.wait_for(lambda s: s.giveaway is not None and s.giveaway["status"] == "cancelled")
    assert (await host.request("giveaway_proof", giveaway=gid))["code"] == "not_drawn"
    # the next giveaway may open now
    assert (await host.request("giveaway_open", item="Mug 2"))["type"] == "ack"
    await host.close()


def frame(kind: str, **fields: Any) -> bytes:
    return p.encode_client(kind, cid=1, **fields)


@pytest.mark.parametrize(("raw", "code", "field"), [
    (frame("giveaway_open"), p.ErrorCode.MISSING_FIELD, "item"),
    (frame("giveaway_open", item=""), p.ErrorCode.INVALID_FIELD, "item"),
    (frame("giveaway_open", item="x" * 201), p.ErrorCode.INVALID_FIELD, "item"),
    (frame("giveaway_open", item=5), p.ErrorCode.WRONG_TYPE, "item"),
    (frame("giveaway_open", item="x", duration_ms=5), p.ErrorCode.UNKNOWN_FIELD, "duration_ms"),
    (frame("giveaway_enter"), p.ErrorCode.MISSING_FIELD, "giveaway"),
    (frame("giveaway_enter", giveaway="g" * 65), p.ErrorCode.INVALID_FIELD, "giveaway"),
    (frame("giveaway_draw", giveaway=["G1"]), p.ErrorCode.WRONG_TYPE, "giveaway"),
    (frame("giveaway_cancel", giveaway=""), p.ErrorCode.INVALID_FIELD, "giveaway"),
    (frame("giveaway_proof", giveaway="G1", start=-1), p.ErrorCode.INVALID_FIELD, "start"),
    (frame("giveaway_proof", giveaway="G1", start="0"), p.ErrorCode.WRONG_TYPE, "start"),
])
def test_giveaway_bad_input(raw: bytes, code: p.ErrorCode, field: str) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.parse_client_frame(raw)
    assert (info.value.code, info.value.field) == (code, field)
    assert info.value.request == msgpack_type(raw)


def msgpack_type(raw: bytes) -> str:
    return str(msgpack.unpackb(raw)["type"])
