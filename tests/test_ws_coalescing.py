"""Personal acks are immediate; watchers' lot updates are coalesced batches holding every bid."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.redis_server import RedisServer

AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
FLUSH_MS = 500


@pytest.fixture(scope="module")
def server(redis_server: RedisServer) -> Iterator[DevServerProcess]:
    with DevServerProcess(redis_server.url, "--ws-flush-interval-ms", str(FLUSH_MS),
                          "--bid-rate", "0", jwt_secret=DEV_JWT_SECRET) as srv:
        yield srv


@pytest.mark.timeout(60)
async def test_acks_are_not_held_back_by_coalescing(server: DevServerProcess) -> None:
    room = "coalesce-ws"
    host = RoomClient(server.url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
    bidder = RoomClient(server.url, room, AUTHORITY.mint(Role.BIDDER, "b", "B"))
    watcher = RoomClient(server.url, room)
    for c in (host, bidder, watcher):
        await c.connect()
    lot = (await host.request("lot_create", title="t", start_price=10, increments=[[0, 1]],
                              duration_ms=600_000, soft_close_ms=0))["lot"]
    await host.request("lot_open", lot=lot)
    await watcher.wait_for(lambda s: lot in s.lots and s.lots[lot]["status"] == "open")

    acks = []
    for amount in range(10, 50):
        reply = await bidder.request("bid", lot=lot, amount=amount)
        assert reply["status"] == "winning"
        acks.append(reply)
    await watcher.wait_for(lambda s: s.lots[lot]["bids"] == 40)
    await bidder.wait_for(lambda s: s.lots[lot]["bids"] == 40)

    # The bidder got 40 acks one by one, while its own and the watcher's copies of the 40 bid
    # events came in a few batches: at most one per flush interval after the leading one.
    def arrival(client: RoomClient, offset: int) -> float:
        return next(t for t, m in client.received if m["type"] == "events"
                    and any(e["offset"] == offset for e in m["events"]))

    ack_times = [next(t for t, m in bidder.received if m is ack) for ack in acks]
    span = ack_times[-1] - ack_times[0]
    batches = [m for _, m in watcher.received if m["type"] == "events"
               and any(e["type"] == "bid" for e in m["events"])]
    assert len(batches) <= span / (FLUSH_MS / 1000) + 2
    assert len(batches) < len(acks) / 4
    assert sum(len([e for e in b["events"] if e["type"] == "bid"]) for b in batches) == 40
    # Later acks were not queued behind a batch: each arrived before the batch with its event.
    for ack, at in list(zip(acks, ack_times, strict=True))[1:]:
        assert at <= arrival(bidder, int(ack["offset"]))
    for c in (host, bidder, watcher):
        await c.close()
