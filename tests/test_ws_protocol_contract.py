"""docs/protocol.md as a contract, over a real socket: oversize and text frames, cid/for echo,
exact error codes, idempotent replays, resume rules, viewer counts, room ids."""

from __future__ import annotations

import asyncio
import re
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import websockets

from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive import protocol as p
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.redis_server import RedisServer

AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
LOT = {"title": "Poster", "start_price": 1000, "increments": [[0, 100]], "duration_ms": 60000,
       "soft_close_ms": 0}
DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
SERVER_ARGS = ("--bid-rate", "0", "--ws-msg-rate", "20", "--ws-msg-burst", "40")


@pytest.fixture(scope="module")
def server(redis_server: RedisServer) -> Iterator[DevServerProcess]:
    with DevServerProcess(redis_server.url, *SERVER_ARGS, jwt_secret=DEV_JWT_SECRET) as srv:
        yield srv


@pytest.fixture
def room() -> str:
    return f"c-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def host(server: DevServerProcess, room: str) -> AsyncIterator[RoomClient]:
    client = RoomClient(server.url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
    await client.connect()
    yield client
    await client.close()


@pytest.fixture
async def bidder(server: DevServerProcess, room: str) -> AsyncIterator[RoomClient]:
    client = RoomClient(server.url, room, AUTHORITY.mint(Role.BIDDER, "alice", "Alice"))
    await client.connect()
    yield client
    await client.close()


def ws_url(server: DevServerProcess, room: str) -> str:
    return server.url.replace("http://", "ws://") + f"/ws/{room}"


def pack(**fields: Any) -> bytes:
    frame: bytes = msgpack.packb(fields, use_bin_type=True)
    return frame


async def drain_until_closed(ws: Any, within: float = 10.0) -> list[dict[str, Any]]:
    """Every message the server sends until it closes the socket."""
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(within):
        try:
            async for frame in ws:
                out.extend(p.decode_server_frame(frame))
        except websockets.ConnectionClosed:
            pass
    return out


def server_problems(server: DevServerProcess) -> list[str]:
    return [line for line in server.output
            if "Traceback" in line or " ERROR " in line or line.startswith("ERROR")]


# --- frames the transport used to refuse on its own ---------------------------------------------

async def test_oversize_message_after_hello_gets_welcome_then_too_large_then_1009(
        server: DevServerProcess, room: str) -> None:
    async with websockets.connect(ws_url(server, room), max_size=None) as ws:
        await ws.send(pack(type="hello", cid="h"))
        await ws.send(b"\x00" * 100_000)  # over the 64 KiB transport cap
        got = await drain_until_closed(ws)
        assert ws.close_code == 1009
    assert [m["type"] for m in got] == ["welcome", "snapshot", "error"]
    assert got[0]["cid"] == "h"
    err = got[2]
    assert (err["code"], err["cid"]) == ("too_large", None)
    assert "65536-byte transport limit" in err["message"]
    assert not server_problems(server)


async def test_oversize_message_comes_after_every_owed_reply(server: DevServerProcess,
                                                             room: str) -> None:
    async with websockets.connect(ws_url(server, room), max_size=None) as ws:
        await ws.send(pack(type="hello", cid="h"))
        for i in range(5):
            await ws.send(pack(type="ping", cid=i, ts=i))
        await ws.send(b"\x00" * 70_000)
        await ws.send(pack(type="ping", cid="never"))  # after the oversize frame: never read
        got = await drain_until_closed(ws)
        assert ws.close_code == 1009
    replies = [(m["type"], m.get("cid")) for m in got if m["type"] not in ("snapshot", "viewers")]
    assert replies == [("welcome", "h"), *[("pong", i) for i in range(5)], ("error", None)]
    assert got[-1]["code"] == "too_large"


async def test_frame_over_app_cap_below_transport_cap_keeps_connection(
        bidder: RoomClient) -> None:
    frame = pack(type="ping", cid="big", ts=0, pad=b"x" * 20_000)
    await bidder.send_raw(frame)
    reply = await bidder.next_reply()
    assert (reply["code"], reply["cid"]) == ("too_large", None)
    assert reply["message"] == f"frame is {len(frame)} bytes; limit 8192"
    assert (await bidder.request("ping"))["type"] == "pong"


async def test_invalid_utf8_text_frame_is_bad_frame_not_1007(server: DevServerProcess,
                                                             bidder: RoomClient) -> None:
    before = len(server_problems(server))
    await bidder._ws.send(b"\xff\xfe not utf-8", text=True)
    reply = await bidder.next_reply()
    assert (reply["type"], reply["code"], reply["cid"]) == ("error", "bad_frame", None)
    await bidder.send_raw("valid text")
    assert (await bidder.next_reply())["code"] == "bad_frame"
    assert (await bidder.request("ping"))["type"] == "pong"
    assert bidder.close_code is None
    assert len(server_problems(server)) == before


# --- cid and for ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("fields", "code", "field", "cid", "for_"), [
    ({"type": "ping", "cid": "x" * 65}, "invalid_field", "cid", None, "ping"),
    ({"type": "ping", "cid": ""}, "invalid_field", "cid", None, "ping"),
    ({"type": "ping", "cid": -1}, "invalid_field", "cid", None, "ping"),
    ({"type": "ping", "cid": 2**53}, "invalid_field", "cid", None, "ping"),
    ({"type": "ping", "cid": True}, "wrong_type", "cid", None, "ping"),
    ({"type": "ping", "cid": [1]}, "wrong_type", "cid", None, "ping"),
    ({"type": "dance", "cid": "y" * 100}, "unknown_type", "type", None, None),
    ({"type": "dance", "cid": "ok"}, "unknown_type", "type", "ok", None),
    ({"type": "bid", "cid": "ok", "lot": 5, "amount": 1}, "wrong_type", "lot", "ok", "bid"),
    ({"type": "bid", "cid": 7, "lot": "L1"}, "missing_field", "amount", 7, "bid"),
    ({"type": "bid", "cid": 7, "lot": "L1", "amount": 1, "x": 1}, "unknown_field", "x", 7, "bid"),
    ({"type": "bid", "cid": 7, "lot": "", "amount": 1}, "invalid_field", "lot", 7, "bid"),
    ({"type": "bid", "cid": 7, "lot": "L1", "amount": 1, "key": "k" * 65}, "invalid_field",
     "key", 7, "bid"),
    ({"type": "ping", "cid": 7, "ts": float("nan")}, "invalid_field", "ts", 7, "ping"),
    ({"type": "hello", "cid": 7}, "duplicate_hello", None, 7, "hello"),
])
async def test_error_cid_and_for(bidder: RoomClient, fields: dict[str, Any], code: str,
                                 field: str | None, cid: Any, for_: str | None) -> None:
    await bidder.send_raw(pack(**fields))
    reply = await bidder.next_reply()
    assert (reply["code"], reply.get("field"), reply["cid"], reply.get("for")) == (
        code, field, cid, for_)
    assert "cid" in reply  # nil, not absent


async def test_lot_create_rules(host: RoomClient) -> None:
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"increments": [[i * 100, 10] for i in range(21)]}, "invalid_field", "increments"),
        ({"increments": []}, "invalid_field", "increments"),
        ({"increments": [[0, 10, 5]]}, "invalid_field", "increments[0]"),
        ({"increments": [5]}, "wrong_type", "increments[0]"),
        ({"increments": "0:10"}, "wrong_type", "increments"),
        ({"reserve": 9000, "buy_now": 5000}, "invalid_field", "reserve"),
        ({"buy_now": 1000}, "invalid_field", "buy_now"),
        ({"title": "t" * 201}, "invalid_field", "title"),
    ]
    for change, code, field in cases:
        reply = await host.request("lot_create", **{**LOT, **change})
        assert (reply["type"], reply["code"], reply["field"], reply["for"]) == (
            "error", code, field, "lot_create"), change
    ok = await host.request("lot_create", **{**LOT, "increments": [[i * 100, 10]
                                                                    for i in range(20)],
                                             "reserve": 5000, "buy_now": 5000})
    assert ok["type"] == "ack"


async def test_token_length_limit(server: DevServerProcess, room: str) -> None:
    client = RoomClient(server.url, room)
    client._ws = await websockets.connect(client.url)
    client._reader = asyncio.create_task(client._read())
    reply = await client.request("hello", token="t" * (p.MAX_TOKEN_CHARS + 1))
    assert (reply["code"], reply["field"], reply["for"]) == ("invalid_field", "token", "hello")
    reply = await client.request("hello", token="t" * p.MAX_TOKEN_CHARS)
    assert (reply["code"], reply["for"]) == ("auth_failed", "hello")
    assert await client.wait_closed() == 4501


async def test_flood_refusals_carry_cid_and_for(server: DevServerProcess, room: str) -> None:
    client = RoomClient(server.url, room)
    await client.connect()
    for i in range(400):
        try:
            await client.send_raw(pack(type="ping", cid=f"f{i}"))
        except websockets.ConnectionClosed:
            break
    assert await client.wait_closed() == 4029
    limited = [m for _, m in client.received if m["type"] == "error"]
    assert limited and {m["code"] for m in limited} == {"rate_limited"}
    assert all(m["for"] == "ping" and re.fullmatch(r"f\d+", m["cid"]) and m["retry_ms"] > 0
               for m in limited)


async def test_text_frames_count_against_the_flood_guard(server: DevServerProcess,
                                                         room: str) -> None:
    client = RoomClient(server.url, room)
    await client.connect()
    for _ in range(400):
        try:
            await client.send_raw("spam")
        except websockets.ConnectionClosed:
            break
    assert await client.wait_closed() == 4029
    codes = {m["code"] for _, m in client.received if m["type"] == "error"}
    assert codes == {"bad_frame", "rate_limited"}


# --- auction answers -----------------------------------------------------------------------------

async def test_duplicate_key_replays_the_original_error_exactly(host: RoomClient,
                                                                bidder: RoomClient) -> None:
    lot = (await host.request("lot_create", **LOT))["lot"]
    await host.request("lot_open", lot=lot)
    assert (await bidder.request("bid", lot=lot, amount=1500))["status"] == "winning"
    first = await bidder.request("bid", lot=lot, amount=1550, key="k1")
    assert (first["code"], first["min"]) == ("bid_too_low", 1600)
    assert first["message"] == "amount 1550 is below the minimum bid 1600"
    again = await bidder.request("bid", lot=lot, amount=1590, key="k1")
    assert {k: v for k, v in again.items() if k not in ("cid", "offset")} == {
        k: v for k, v in first.items() if k not in ("cid", "offset")}


async def test_bid_after_the_end_lot_ended_then_lot_closed(host: RoomClient,
                                                           bidder: RoomClient) -> None:
    # lot_ended: the bid found the lot open past its end (and settled it);
    # lot_closed: the outcome was already decided.
    lot = (await host.request("lot_create", **{**LOT, "duration_ms": 1000}))["lot"]
    opened = await host.request("lot_open", lot=lot)
    assert (await bidder.request("bid", lot=lot, amount=1000))["status"] == "winning"
    pong = await bidder.request("ping")
    await asyncio.sleep(max(0.0, (opened["ends_at"] - pong["server_ts"]) / 1000) + 0.05)
    replies = [await bidder.request("bid", lot=lot, amount=2000) for _ in range(2)]
    codes = [r["code"] for r in replies]
    # the settle loop (every 500 ms by default) may have decided it before the first bid
    assert codes in (["lot_ended", "lot_closed"], ["lot_closed", "lot_closed"])
    assert replies[-1]["state"] == "sold"
    await bidder.wait_for(lambda s: s.lots[lot]["status"] == "sold")


# --- resume rules --------------------------------------------------------------------------------

async def test_resume_missing_nothing_gets_welcome_then_live_traffic_only(
        server: DevServerProcess, room: str, host: RoomClient) -> None:
    lot = (await host.request("lot_create", **LOT))["lot"]
    client = RoomClient(server.url, room)
    await client.connect()
    await client.wait_for(lambda s: lot in s.lots)
    await client.close()
    seen = len(client.received)
    welcome = await client.connect(resume=(client.state.epoch, client.state.offset))
    assert welcome["offset"] == client.state.offset
    await client.request("ping")
    after = [m for _, m in client.received[seen:]]
    # (a `viewers` change from our old socket's leave may be racing in too)
    assert [m["type"] for m in after if m["type"] != "viewers"] == ["welcome", "pong"]
    assert after[1]["type"] == "viewers"
    await client.wait_for(lambda s: s.viewers == 2)  # the host and this socket
    await host.request("lot_open", lot=lot)
    await client.wait_for(lambda s: s.lots[lot]["status"] == "open")
    assert client.state.snapshots == 1  # only the first connection's
    await client.close()


async def test_resume_from_beyond_the_newest_offset_gets_snapshot(
        server: DevServerProcess, room: str, host: RoomClient) -> None:
    await host.request("lot_create", **LOT)
    head = await host.request("ping")
    client = RoomClient(server.url, room)
    await client.connect(resume=(head["epoch"], head["offset"] + 5))
    await client.wait_for(lambda s: s.snapshots == 1)
    assert client.state.offset == head["offset"]
    await client.close()


# --- viewer count --------------------------------------------------------------------------------

async def snapshot_of(client: RoomClient) -> dict[str, Any]:
    await client.wait_for(lambda s: s.snapshots == 1)
    return next(m for _, m in client.received if m["type"] == "snapshot")


async def test_snapshot_counts_every_socket_including_its_own(server: DevServerProcess,
                                                               room: str) -> None:
    first = RoomClient(server.url, room)
    await first.connect()
    assert (await snapshot_of(first))["viewers"] == 1
    second = RoomClient(server.url, room)
    await second.connect()
    assert (await snapshot_of(second))["viewers"] == 2
    await first.wait_for(lambda s: s.viewers == 2)
    await second.close()
    await first.wait_for(lambda s: s.viewers == 1)
    await first.close()


async def test_snapshot_counts_sockets_on_other_nodes(server: DevServerProcess,
                                                      redis_server: RedisServer,
                                                      room: str) -> None:
    with DevServerProcess(redis_server.url, *SERVER_ARGS, jwt_secret=DEV_JWT_SECRET) as other:
        here = RoomClient(server.url, room)
        await here.connect()
        there = RoomClient(other.url, room)
        await there.connect()
        assert (await snapshot_of(there))["viewers"] == 2
        await here.wait_for(lambda s: s.viewers == 2)
        await there.close()
        await here.close()


# --- room ids ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["abc\n", "caf\u00e9", "\u216b", "a" * 65, "a.b", "a b"])
async def test_room_id_rule_is_the_stream_id_rule(server: DevServerProcess, bad: str) -> None:
    url = server.url.replace("http://", "ws://") + "/ws/" + urllib.parse.quote(bad, safe="")
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(url)
    assert info.value.response.status_code == 403


async def test_longest_valid_room_id_is_served(server: DevServerProcess) -> None:
    client = RoomClient(server.url, "Az09_-" + "x" * 58)
    assert (await client.connect())["room"] == "Az09_-" + "x" * 58
    await client.close()


# --- the document lists every code ---------------------------------------------------------------

def test_doc_lists_every_error_and_close_code() -> None:
    doc = DOC.read_text()
    error_rows = set(re.findall(r"^\| `([a-z_]+)`(?: / `([a-z_]+)`)? \|", doc, re.M))
    documented = {code for row in error_rows for code in row if code}
    assert documented >= {str(code) for code in p.ErrorCode}
    close_rows = {int(c) for c in re.findall(r"^\| (\d{4}) \|", doc, re.M)}
    assert close_rows >= {int(code) for code in p.CloseCode} | {1002, 1006, 1012}
