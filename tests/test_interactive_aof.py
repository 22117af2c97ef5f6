"""Durability: every acknowledged bid survives `kill -9` of Redis (appendonly + appendfsync always)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import pytest
import redis.asyncio as aioredis

from lotcast import keys
from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.redis_server import DURABILITY_CONFIG, RedisServer

AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
ROOM = "aof"


@pytest.mark.timeout(120)
async def test_acked_bids_survive_redis_kill_9(tmp_path: Path) -> None:
    assert DURABILITY_CONFIG["appendonly"] == "yes"
    assert DURABILITY_CONFIG["appendfsync"] == "always"
    redis_server = RedisServer(data_dir=tmp_path / "redis")
    redis_server.start()
    node = DevServerProcess(redis_server.url, "--bid-rate", "0", "--ws-msg-rate", "0",
                            jwt_secret=DEV_JWT_SECRET)
    node.start()
    clients: list[RoomClient] = []
    try:
        host = RoomClient(node.url, ROOM, AUTHORITY.mint(Role.HOST, "host", "Host"))
        watcher = RoomClient(node.url, ROOM)
        bidders = [RoomClient(node.url, ROOM, AUTHORITY.mint(Role.BIDDER, f"b{i}", f"B{i}"))
                   for i in range(4)]
        clients = [host, watcher, *bidders]
        for c in clients:
            await c.connect()
        lot = (await host.request("lot_create", title="Safe", start_price=10,
                                  increments=[[0, 1]], duration_ms=600_000,
                                  soft_close_ms=0))["lot"]
        await host.request("lot_open", lot=lot)

        acked: list[tuple[str, int, int]] = []
        refused: list[str] = []
        killed = asyncio.Event()

        async def keep_bidding(i: int, client: RoomClient) -> None:
            amount = 10 + i
            while not killed.is_set() or len(refused) < 8:
                amount += 4
                reply = await client.request("bid", lot=lot, amount=amount)
                if reply["type"] == "ack":
                    acked.append((f"b{i}", amount, int(reply["offset"])))
                elif reply["code"] == "unavailable":
                    refused.append(reply["message"])
                    await asyncio.sleep(0.02)
                else:
                    assert reply["code"] == "bid_too_low"

        bidding = [asyncio.create_task(keep_bidding(i, c)) for i, c in enumerate(bidders)]
        while len(acked) < 200:
            await asyncio.sleep(0.01)
        redis_server.stop(kill=True)  # SIGKILL mid-stream: no clean shutdown, no final fsync
        killed.set()
        await asyncio.gather(*bidding)
        assert refused  # bids during the outage were refused, never acked
        acked_before_kill = list(acked)

        redis_server.start()
        check = aioredis.Redis.from_url(redis_server.url)
        entries = await check.xrange(keys.room_log(ROOM))
        stream = {int(eid.split(b"-")[1]): msgpack.unpackb(f[b"e"], raw=False)
                  for eid, f in entries}
        for user, amount, offset in acked_before_kill:
            event = stream[offset]
            assert (event["type"], event["bidder"], event["amount"]) == ("bid", user, amount)
        state = await check.hgetall(keys.lot(ROOM, lot))
        last_bid = stream[max(o for o, e in stream.items() if e["type"] == "bid")]
        assert int(state[b"price"]) == last_bid["price"]
        await check.aclose()

        # The node recovers by itself: bidding works again and watchers get the new events.
        reply: dict[str, object] = {}
        for _ in range(100):
            reply = await bidders[0].request("bid", lot=lot, amount=last_bid["price"] + 1000)
            if reply["type"] == "ack":
                break
            await asyncio.sleep(0.1)
        assert reply["type"] == "ack", reply
        await watcher.wait_for(lambda s: s.offset >= int(str(reply["offset"])), within=20)
        assert watcher.state.lots[lot]["price"] == reply["price"]
    finally:
        for c in clients:
            await c.close()
        node.stop()
        redis_server.close()
