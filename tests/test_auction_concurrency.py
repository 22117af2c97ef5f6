"""200 bidders race on one lot through two relay processes sharing one Redis."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import httpx
import msgpack
import pytest

from lotcast import keys, redisconn
from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive.client import RoomClient
from lotcast.redis_server import RedisServer
from lotcast.supervisor import ServiceProcess


@pytest.fixture(scope="module")
def redis_server(redis_any: RedisServer) -> RedisServer:
    """Every test here runs against one Redis and against a 3-primary Redis Cluster."""
    return redis_any


AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
ROOM = "race"
BIDDERS = 200


@pytest.fixture(scope="module")
def two_nodes(redis_server: RedisServer) -> Iterator[list[ServiceProcess]]:
    """Two real `lotcast relay` processes (the production app) sharing one Redis."""
    env = {"LOTCAST_REDIS_URL": redis_server.url, "LOTCAST_JWT_SECRET": DEV_JWT_SECRET,
           "LOTCAST_BID_RATE": "0", "LOTCAST_WS_MSG_RATE": "0", "LOTCAST_LOG_LEVEL": "warning"}
    nodes: list[ServiceProcess] = []
    try:
        for name in ("node-a", "node-b"):
            nodes.append(ServiceProcess("relay", ["--port", "0", "--node-id", name],
                                        env=env).start())
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.timeout(180)
async def test_two_hundred_bidders_one_winner(two_nodes: list[ServiceProcess],
                                              redis_server: RedisServer) -> None:
    rng = random.Random(7)
    host = RoomClient(two_nodes[0].url, ROOM, AUTHORITY.mint(Role.HOST, "host", "Host"))
    await host.connect()
    bidders = [RoomClient(two_nodes[i % 2].url, ROOM,
                          AUTHORITY.mint(Role.BIDDER, f"u{i}", f"User {i}"))
               for i in range(BIDDERS)]
    watchers = [RoomClient(node.url, ROOM) for node in two_nodes]
    for group in range(0, BIDDERS, 50):
        await asyncio.gather(*(c.connect() for c in bidders[group:group + 50]))
    await asyncio.gather(*(w.connect() for w in watchers))
    await asyncio.gather(*(c.wait_for(lambda s: s.snapshots == 1) for c in [*bidders, *watchers]))
    welcome_nodes = {c.welcome["node"] for c in bidders}
    assert welcome_nodes == {"node-a", "node-b"}
    async with httpx.AsyncClient() as http:
        for node in two_nodes:
            stats = (await http.get(node.url + "/interactive/stats")).json()
            # The relay's uvicorn gives every socket the synchronous fan-out write path.
            assert stats["direct_writer_sockets"] >= BIDDERS // 2 + 1

    lot = (await host.request("lot_create", title="Hot lot", start_price=100,
                              increments=[[0, 10], [2000, 50]], duration_ms=120_000,
                              soft_close_ms=0))["lot"]
    await host.request("lot_open", lot=lot)

    acks: list[tuple[str, int, dict[str, object]]] = []

    async def bid_a_few(client: RoomClient, user: str) -> None:
        for _ in range(3):
            amount = rng.randrange(100, 6000)
            extra = rng.choice([0, 0, rng.randrange(1, 3000)])
            reply = await client.request("bid", lot=lot, amount=amount, max=amount + extra)
            if reply["type"] == "ack":
                acks.append((user, amount, reply))
            else:
                assert reply["code"] == "bid_too_low", reply["message"]

    await asyncio.gather(*(bid_a_few(c, f"u{i}") for i, c in enumerate(bidders)))
    closed = await host.request("lot_close", lot=lot)
    assert closed["status"] == "sold"

    everyone = [host, *bidders, *watchers]
    await asyncio.gather(*(c.wait_for(lambda s: s.lots.get(lot, {}).get("status") == "sold",
                                      within=30) for c in everyone))

    redis = redisconn.connect(redis_server.url)
    entries = await redis.xrange(keys.room_log(ROOM))
    await redis.aclose()
    stream = [msgpack.unpackb(fields[b"e"], raw=False) for _, fields in entries]
    assert [e["offset"] for e in stream] == list(range(1, len(stream) + 1))

    # Exactly one winner, and it is the leader after the last bid.
    sold = [e for e in stream if e["type"] == "lot_sold"]
    bids = [e for e in stream if e["type"] == "bid"]
    assert len(sold) == 1 and sold[0]["winner"] == bids[-1]["leader"]
    assert sold[0]["price"] == bids[-1]["price"]

    # No acked bid is missing from the stream, and each ack names its own event.
    by_offset = {e["offset"]: e for e in stream}
    assert len(acks) == len(bids) and len({int(str(r["offset"])) for _, _, r in acks}) == len(acks)
    for user, amount, reply in acks:
        event = by_offset[int(str(reply["offset"]))]
        assert (event["type"], event["bidder"], event["amount"]) == ("bid", user, amount)

    # Every client saw the stream's events in the stream's order, from its snapshot on.
    for client in everyone:
        seen = client.state.applied
        start = seen[0]["offset"] - 1
        assert start <= 2 and seen == stream[start:]
        assert client.state.lots[lot]["winner"] == sold[0]["winner"]

    # Prices never went down along the log.
    prices = [e["price"] for e in bids]
    assert prices == sorted(prices)

    for client in everyone:
        await client.close()
