"""Bad input over a real WebSocket: each gets its exact error, and the connection stays open."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgpack
import pytest
import websockets

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
LOT = {"title": "Poster", "start_price": 1000, "increments": [[0, 100]], "duration_ms": 60000,
       "soft_close_ms": 0}


@pytest.fixture(scope="module")
def server(redis_server: RedisServer) -> Iterator[DevServerProcess]:
    with DevServerProcess(redis_server.url, "--bid-rate", "2", "--bid-burst", "3",
                          "--ws-msg-rate", "20", "--ws-msg-burst", "40",
                          jwt_secret=DEV_JWT_SECRET) as srv:
        yield srv


@pytest.fixture
def room() -> str:
    return f"r-{uuid.uuid4().hex[:8]}"


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


async def raw_error(client: RoomClient, frame: bytes | str) -> dict[str, Any]:
    await client.send_raw(frame)
    return await client.next_reply()


async def still_open(client: RoomClient) -> None:
    assert (await client.request("ping"))["type"] == "pong"


async def test_malformed_frames_keep_connection(bidder: RoomClient) -> None:
    cases: list[tuple[bytes | str, str]] = [
        (b"\xc1", "bad_msgpack"),
        (msgpack.packb([1, 2]), "not_a_map"),
        ("{\"type\": \"ping\"}", "bad_frame"),
        (msgpack.packb({"cid": "x", "type": "dance"}), "unknown_type"),
        (msgpack.packb({"cid": "x", "type": "bid", "lot": "L1"}), "missing_field"),
        (msgpack.packb({"cid": "x", "type": "bid", "lot": "L1", "amount": 5, "z": 1}),
         "unknown_field"),
        (msgpack.packb({"cid": "x", "type": "bid", "lot": 1, "amount": 5}), "wrong_type"),
        (msgpack.packb({"cid": "x", "type": "bid", "lot": "L1", "amount": -5}),
         "amount_not_positive"),
        (msgpack.packb({"cid": "x", "type": "bid", "lot": "L1", "amount": 0}),
         "amount_not_positive"),
        (msgpack.packb({"cid": "x", "type": "bid", "lot": "L1", "amount": float("nan")}),
         "amount_not_integer"),
        (msgpack.packb({"cid": "x", "type": "bid", "lot": "L1", "amount": 10.5}),
         "amount_not_integer"),
        (msgpack.packb({"cid": "x", "type": "bid", "lot": "L1", "amount": 10**15}),
         "amount_too_large"),
        (msgpack.packb({"cid": "x", "type": "hello"}), "duplicate_hello"),
    ]
    for data, code in cases:
        reply = await raw_error(bidder, data)
        assert (reply["type"], reply["code"]) == ("error", code), data
        assert reply["message"]
    await still_open(bidder)


async def test_bids_on_unknown_unopened_and_closed_lots(host: RoomClient,
                                                        bidder: RoomClient) -> None:
    reply = await bidder.request("bid", lot="L404", amount=1000)
    assert (reply["code"], reply["field"]) == ("unknown_lot", "lot")
    lot = (await host.request("lot_create", **LOT))["lot"]
    reply = await bidder.request("bid", lot=lot, amount=1000)
    assert (reply["code"], reply["state"]) == ("lot_not_open", "draft")
    await host.request("lot_open", lot=lot)
    assert (await bidder.request("bid", lot=lot, amount=1000))["status"] == "winning"
    low = await bidder.request("bid", lot=lot, amount=1050)
    assert (low["code"], low["min"], low["field"]) == ("bid_too_low", 1100, "amount")
    assert low["message"] == "amount 1050 is below the minimum bid 1100"
    assert (await host.request("lot_close", lot=lot))["status"] == "sold"
    closed = await bidder.request("bid", lot=lot, amount=5000)
    assert (closed["code"], closed["state"]) == ("lot_closed", "sold")
    again = await host.request("lot_close", lot=lot)
    assert (again["code"], again["state"]) == ("invalid_state", "sold")
    await still_open(bidder)


async def test_host_only_and_bidder_only(server: DevServerProcess, room: str,
                                         bidder: RoomClient) -> None:
    reply = await bidder.request("lot_create", **LOT)
    assert reply["code"] == "forbidden"
    assert reply["message"] == "'lot_create' needs role 'host'; this connection is 'bidder'"
    for kind, fields in [("lot_open", {"lot": "L1"}), ("lot_extend", {"lot": "L1", "by_ms": 5}),
                         ("lot_close", {"lot": "L1"}), ("poll_close", {"poll": "P1"}),
                         ("poll_open", {"question": "q", "options": ["a", "b"],
                                        "duration_ms": 5000})]:
        assert (await bidder.request(kind, **fields))["code"] == "forbidden"
    anon = RoomClient(server.url, room)
    welcome = await anon.connect()
    assert welcome["role"] == "viewer" and "user" not in welcome
    assert (await anon.request("bid", lot="L1", amount=100))["code"] == "forbidden"
    assert (await anon.request("vote", poll="P1", option=0))["code"] == "forbidden"
    await anon.close()


async def test_votes_duplicate_and_bad_option(host: RoomClient, bidder: RoomClient) -> None:
    poll = (await host.request("poll_open", question="Best?", options=["a", "b", "c"],
                               duration_ms=60000))["poll"]
    assert (await bidder.request("vote", poll=poll, option=1))["type"] == "ack"
    dup = await bidder.request("vote", poll=poll, option=2)
    assert (dup["code"], dup["message"]) == ("duplicate_vote",
                                             f"you already voted in poll {poll} (option 1)")
    bad = await bidder.request("vote", poll=poll, option=3)
    assert (bad["code"], bad["field"]) == ("bad_option", "option")
    assert (await bidder.request("vote", poll="P999", option=0))["code"] == "unknown_poll"
    await host.request("poll_close", poll=poll)
    assert (await bidder.request("vote", poll=poll, option=0))["code"] == "poll_closed"


async def test_auth_failure_closes_4501(server: DevServerProcess, room: str) -> None:
    client = RoomClient(server.url, room, "not-a-jwt")
    reply = await client.connect()
    assert (reply["type"], reply["code"], reply["field"]) == ("error", "auth_failed", "token")
    assert await client.wait_closed() == 4501
    expired = RoomClient(server.url, room, AUTHORITY.mint(Role.BIDDER, "x", ttl=-10))
    assert (await expired.connect())["message"] == "token expired"
    assert await expired.wait_closed() == 4501


async def test_token_in_query_string(server: DevServerProcess, room: str) -> None:
    token = AUTHORITY.mint(Role.BIDDER, "qs-user", "Q")
    client = RoomClient(server.url + "", room)
    client.url += f"?token={token}"
    welcome = await client.connect()
    assert (welcome["role"], welcome["user"]) == ("bidder", "qs-user")
    await client.close()


async def test_hello_required_first(server: DevServerProcess, room: str) -> None:
    client = RoomClient(server.url, room)
    client._ws = await websockets.connect(client.url)
    client._reader = asyncio.create_task(client._read())
    reply = await client.request("ping")
    assert reply["code"] == "hello_required"
    assert (await client.request("hello"))["type"] == "welcome"
    await still_open(client)
    await client.close()


async def test_bid_rate_limit_is_per_user_across_connections(
        server: DevServerProcess, room: str, host: RoomClient) -> None:
    lot = (await host.request("lot_create", **LOT))["lot"]
    await host.request("lot_open", lot=lot)
    token = AUTHORITY.mint(Role.BIDDER, "rl-user", "R")
    first, second = RoomClient(server.url, room, token), RoomClient(server.url, room, token)
    await first.connect()
    await second.connect()
    replies = []
    for i in range(6):
        client = first if i % 2 else second
        replies.append(await client.request("bid", lot=lot, amount=1000 + 100 * i))
    limited = [r for r in replies if r.get("code") == "rate_limited"]
    assert len([r for r in replies if r["type"] == "ack"]) == 3  # burst 3
    assert limited and all(r["retry_ms"] > 0 for r in limited)
    await first.close()
    await second.close()


async def test_flood_is_refused_then_closed_4029(server: DevServerProcess, room: str) -> None:
    client = RoomClient(server.url, room)
    await client.connect()
    frame = msgpack.packb({"type": "ping", "cid": "f"})
    for _ in range(400):
        try:
            await client.send_raw(frame)
        except websockets.ConnectionClosed:
            break
    assert await client.wait_closed() == 4029
    codes = {m.get("code") for _, m in client.received if m["type"] == "error"}
    assert codes == {"rate_limited"}
