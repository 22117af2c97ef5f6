"""Auction additions over a real node and Redis: pre-bids applied in received order at lot_open
with the proxy rules, sudden-death lots never extend, lot_rerun makes an openable lot."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from show_support import show_client

from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive import protocol as p
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.redis_server import RedisServer

AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
LOT = {"title": "Lamp", "start_price": 100, "increments": [[0, 10]], "duration_ms": 60000,
       "soft_close_ms": 0}


@pytest.fixture(scope="module")
def server(redis_server: RedisServer) -> Iterator[DevServerProcess]:
    with DevServerProcess(redis_server.url, "--bid-rate", "0",
                          jwt_secret=DEV_JWT_SECRET) as srv:
        yield srv


@pytest.fixture
def room() -> str:
    return f"pb-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def host(server: DevServerProcess, room: str) -> AsyncIterator[RoomClient]:
    client = show_client(server.url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
    await client.connect()
    yield client
    await client.close()


async def bidders(server: DevServerProcess, room: str, *names: str) -> dict[str, RoomClient]:
    out = {}
    for name in names:
        out[name] = show_client(server.url, room, AUTHORITY.mint(Role.BIDDER, name, name.upper()))
        await out[name].connect()
    return out


@pytest.mark.timeout(60)
async def test_prebids_apply_in_received_order_with_proxy_rules(
        server: DevServerProcess, room: str, host: RoomClient) -> None:
    lot = (await host.request("lot_create", **LOT))["lot"]
    people = await bidders(server, room, "a", "b", "c", "d", "e")
    watcher = show_client(server.url, room)
    await watcher.connect()
    # a 300, b 250, c 300 (ties a: a was first), d 105 (passed by its turn), e 200 then 400
    # (a changed max goes to the end of the order)
    for name, maximum in (("a", 300), ("e", 200), ("b", 250), ("c", 300), ("d", 105),
                          ("e", 400)):
        ack = await people[name].request("prebid", lot=lot, max=maximum)
        assert (ack["type"], ack["for"], ack["lot"], ack["max"], ack["duplicate"]) == \
            ("ack", "prebid", lot, maximum, False), ack
    same = await people["a"].request("prebid", lot=lot, max=300)
    assert (same["type"], same["duplicate"], same["prebids"]) == ("ack", True, 5)
    await watcher.wait_for(lambda s: s.lots[lot].get("prebids") == 5)

    opened = await host.request("lot_open", lot=lot)
    assert opened["type"] == "ack", opened
    assert (opened["prebids"], opened["prebids_skipped"]) == (4, 1), opened  # d is skipped
    await watcher.wait_for(lambda s: s.lots[lot]["bids"] == 4)
    bids = [e for e in watcher.state.applied if e["type"] == "bid" and e["lot"] == lot]
    assert [e["bidder"] for e in bids] == ["a", "b", "c", "e"]
    assert all(e["prebid"] is True for e in bids)
    # a leads at the start price; b is outbid at 260; c ties a's max (300) and loses;
    # d (105) is below the minimum by then; e's 400 beats 300 by one increment.
    assert [(e["leader"], e["price"]) for e in bids] == [("a", 100), ("a", 260), ("a", 300),
                                                          ("e", 310)]
    state = watcher.state.lots[lot]
    assert (state["price"], state["leader"], state["next_min"]) == (310, "e", 320)
    assert not any(e["type"] == "lot_extended" for e in watcher.state.applied)

    # the proxy rules go on live: a live bid by a at 320 with max 350 stays under e.s max (400),
    # so e keeps the lead at 350 + 10.
    live = await people["a"].request("bid", lot=lot, amount=320, max=350)
    assert (live["status"], live["price"], live["leader"]) == ("outbid", 360, "e")
    late = await people["b"].request("prebid", lot=lot, max=500)
    assert (late["code"], late["state"]) == ("invalid_state", "open")
    for c in (*people.values(), watcher):
        await c.close()


@pytest.mark.timeout(60)
async def test_prebid_refusals(server: DevServerProcess, room: str, host: RoomClient) -> None:
    lot = (await host.request("lot_create", **LOT))["lot"]
    people = await bidders(server, room, "x")
    x = people["x"]
    low = await x.request("prebid", lot=lot, max=99)
    assert (low["code"], low["min"], low["field"], low["for"]) == ("bid_too_low", 100, "max",
                                                                   "prebid")
    assert (await x.request("prebid", lot="L999", max=500))["code"] == "unknown_lot"
    assert (await host.request("prebid", lot=lot, max=500))["code"] == "forbidden"
    viewer = show_client(server.url, room)
    await viewer.connect()
    assert (await viewer.request("prebid", lot=lot, max=500))["code"] == "forbidden"
    await viewer.close()
    # no pre-bids: the lot opens as before
    opened = await host.request("lot_open", lot=lot)
    assert opened["type"] == "ack" and opened["prebids"] == 0
    await x.close()


@pytest.mark.timeout(60)
async def test_sudden_death_lot_never_extends(server: DevServerProcess, room: str,
                                              host: RoomClient) -> None:
    sudden = dict(LOT, duration_ms=1500, sudden_death=True)
    created = await host.request("lot_create", **sudden)
    lot = created["lot"]
    soft = await host.request("lot_create", **dict(sudden, soft_close_ms=1000))
    assert (soft["code"], soft["field"]) == ("invalid_field", "soft_close_ms")
    await host.wait_for(lambda s: lot in s.lots)
    assert host.state.lots[lot]["sudden_death"] is True
    plain = (await host.request("lot_create", **LOT))["lot"]
    await host.wait_for(lambda s: plain in s.lots)
    assert host.state.lots[plain]["sudden_death"] is False
    ends_at = (await host.request("lot_open", lot=lot))["ends_at"]
    people = await bidders(server, room, "y", "z")
    price = 100
    for _ in range(6):  # bids up to the end: none moves it
        for who in ("y", "z"):
            reply = await people[who].request("bid", lot=lot, amount=price)
            if reply["type"] == "error":
                assert reply["code"] in ("lot_ended", "lot_closed")
                break
            price = reply["next_min"]
    await host.wait_for(lambda s: s.lots[lot]["status"] == "sold", within=15)
    events = [e for e in host.state.applied if e.get("lot") == lot]
    assert not any(e["type"] == "lot_extended" for e in events)
    assert all(e["ends_at"] == ends_at for e in events if e["type"] == "bid")
    sold = next(e for e in events if e["type"] == "lot_sold")
    assert sold["by"] == "time" and sold["ts"] >= ends_at
    # the snapshot shows the option too
    late = show_client(server.url, room)
    await late.connect()
    await late.wait_for(lambda s: s.snapshots == 1)
    assert late.state.lots[lot]["sudden_death"] is True
    for c in (*people.values(), late):
        await c.close()


@pytest.mark.timeout(60)
async def test_rerun_an_unsold_lot(server: DevServerProcess, room: str, host: RoomClient
                                   ) -> None:
    lot = (await host.request("lot_create", **dict(LOT, reserve=500, sudden_death=True)))["lot"]
    assert (await host.request("lot_rerun", lot=lot))["code"] == "invalid_state"  # draft
    await host.request("lot_open", lot=lot)
    people = await bidders(server, room, "v")
    await people["v"].request("bid", lot=lot, amount=100)
    closed = await host.request("lot_close", lot=lot)
    assert closed["status"] == "unsold"
    assert (await people["v"].request("lot_rerun", lot=lot))["code"] == "forbidden"
    rerun = await host.request("lot_rerun", lot=lot)
    assert (rerun["type"], rerun["rerun_of"], rerun["status"]) == ("ack", lot, "draft"), rerun
    fresh = rerun["lot"]
    assert fresh != lot and "ends_at" not in rerun
    twice = await host.request("lot_rerun", lot=lot)
    assert (twice["code"], twice["rerun"]) == ("already_rerun", fresh)
    await host.wait_for(lambda s: fresh in s.lots)
    new = host.state.lots[fresh]
    old = host.state.lots[lot]
    for term in ("title", "start_price", "increments", "duration_ms", "soft_close_ms",
                 "has_reserve", "sudden_death"):
        assert new[term] == old[term], term
    assert (new["status"], new["bids"], new["rerun_of"]) == ("draft", 0, lot)
    # openable, biddable, and it takes pre-bids first
    assert (await people["v"].request("prebid", lot=fresh, max=600))["type"] == "ack"
    opened = await host.request("lot_open", lot=fresh)
    assert (opened["type"], opened["prebids"]) == ("ack", 1)
    await host.wait_for(lambda s: s.lots[fresh].get("leader") == "v")
    assert host.state.lots[fresh]["price"] == 500  # the max covers the reserve
    sold = await host.request("lot_close", lot=fresh)
    assert sold["status"] == "sold"
    assert (await host.request("lot_rerun", lot=fresh))["code"] == "invalid_state"
    assert (await host.request("lot_rerun", lot="L999"))["code"] == "unknown_lot"
    # the late joiner's snapshot links both ways
    late = show_client(server.url, room)
    await late.connect()
    await late.wait_for(lambda s: s.snapshots == 1)
    assert late.state.lots[lot]["rerun"] == fresh and late.state.lots[fresh]["rerun_of"] == lot
    for c in (*people.values(), late):
        await c.close()


@pytest.mark.timeout(60)
async def test_rerun_and_open_in_one_action(server: DevServerProcess, room: str,
                                            host: RoomClient) -> None:
    lot = (await host.request("lot_create", **dict(LOT, duration_ms=1000)))["lot"]
    await host.request("lot_open", lot=lot)
    await host.wait_for(lambda s: s.lots[lot]["status"] == "unsold", within=15)
    rerun = await host.request("lot_rerun", lot=lot, open=True)
    assert (rerun["type"], rerun["status"]) == ("ack", "open"), rerun
    assert rerun["ends_at"] > 0
    people = await bidders(server, room, "w")
    bid = await people["w"].request("bid", lot=rerun["lot"], amount=100)
    assert bid["type"] == "ack" and bid["status"] == "winning"
    await people["w"].close()


def frame(kind: str, **fields: Any) -> bytes:
    return p.encode_client(kind, cid=1, **fields)


@pytest.mark.parametrize(("raw", "code", "field"), [
    (frame("prebid", lot="L1"), p.ErrorCode.MISSING_FIELD, "max"),
    (frame("prebid", max=100), p.ErrorCode.MISSING_FIELD, "lot"),
    (frame("prebid", lot="L1", max=10.5), p.ErrorCode.AMOUNT_NOT_INTEGER, "max"),
    (frame("prebid", lot="L1", max=0), p.ErrorCode.AMOUNT_NOT_POSITIVE, "max"),
    (frame("prebid", lot="L1", max=10**13), p.ErrorCode.AMOUNT_TOO_LARGE, "max"),
    (frame("prebid", lot="L1", max=True), p.ErrorCode.AMOUNT_NOT_INTEGER, "max"),
    (frame("prebid", lot="L1", max=100, amount=100), p.ErrorCode.UNKNOWN_FIELD, "amount"),
    (frame("lot_rerun"), p.ErrorCode.MISSING_FIELD, "lot"),
    (frame("lot_rerun", lot="L1", open=1), p.ErrorCode.WRONG_TYPE, "open"),
    (frame("lot_rerun", lot=""), p.ErrorCode.INVALID_FIELD, "lot"),
    (frame("lot_create", **dict(LOT, sudden_death="yes")), p.ErrorCode.WRONG_TYPE,
     "sudden_death"),
    (frame("lot_create", **dict(LOT, sudden_death=True, soft_close_ms=5)),
     p.ErrorCode.INVALID_FIELD, "soft_close_ms"),
])
def test_bad_input(raw: bytes, code: p.ErrorCode, field: str) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.parse_client_frame(raw)
    assert (info.value.code, info.value.field) == (code, field)
