"""Recovery: a client resumes with (epoch, offset) and ends exactly like one that never left."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive.client import RoomClient, RoomState
from lotcast.interactive.devserver import DevServerProcess
from lotcast.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server(redis_any: RedisServer) -> RedisServer:
    """Every test here runs against one Redis and against a 3-primary Redis Cluster."""
    return redis_any


AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
HISTORY = 50


@pytest.fixture(scope="module")
def server(redis_server: RedisServer) -> Iterator[DevServerProcess]:
    with DevServerProcess(redis_server.url, "--room-history", str(HISTORY), "--bid-rate", "0",
                          "--ws-msg-rate", "0", jwt_secret=DEV_JWT_SECRET) as srv:
        yield srv


class Room:
    def __init__(self, url: str, name: str) -> None:
        self.url, self.name = url, name
        self.host = RoomClient(url, name, AUTHORITY.mint(Role.HOST, "host", "Host"))
        self.bidders = [RoomClient(url, name, AUTHORITY.mint(Role.BIDDER, f"b{i}", f"B{i}"))
                        for i in range(3)]
        self.stayer = RoomClient(url, name)
        self.lot = ""
        self.poll = ""

    async def start(self) -> None:
        for c in (self.host, *self.bidders, self.stayer):
            await c.connect()
        self.lot = (await self.host.request(
            "lot_create", title="Vase", start_price=100, increments=[[0, 5]],
            duration_ms=600_000, soft_close_ms=0, reserve=400))["lot"]
        await self.host.request("lot_open", lot=self.lot)
        self.poll = (await self.host.request("poll_open", question="?", options=["a", "b"],
                                             duration_ms=600_000))["poll"]
        await self.stayer.wait_for(lambda s: self.lot in s.lots and self.poll in s.polls)

    async def activity(self, bids: int) -> None:
        price = int(self.stayer.state.lots[self.lot].get("price", 95))
        for i in range(bids):
            price += 5
            await self.bidders[i % 3].request("bid", lot=self.lot, amount=price)
        await self.host.request("lot_extend", lot=self.lot, by_ms=1000)

    async def settled(self, client: RoomClient) -> None:
        target = (await self.host.request("ping"))["offset"]
        await self.stayer.wait_for(lambda s: s.offset >= target)
        await client.wait_for(lambda s: s.offset >= target)

    async def close(self) -> None:
        for c in (self.host, *self.bidders, self.stayer):
            await c.close()


@pytest.fixture
async def room(server: DevServerProcess, request: pytest.FixtureRequest) -> AsyncIterator[Room]:
    name = request.node.name.replace("_", "-").replace("[", "-").rstrip("]")
    r = Room(server.url, name[-40:])
    await r.start()
    yield r
    await r.close()


def same_state(a: RoomState, b: RoomState) -> None:
    assert (a.epoch, a.offset) == (b.epoch, b.offset)
    assert a.lots == b.lots
    assert a.polls == b.polls


async def test_resume_replays_the_gap(server: DevServerProcess, room: Room) -> None:
    leaver = RoomClient(server.url, room.name)
    await leaver.connect()
    await room.activity(3)
    await room.settled(leaver)
    await leaver.close()
    epoch, offset = leaver.state.epoch, leaver.state.offset

    await room.activity(20)  # the gap: bids, an extension ...
    await room.bidders[0].request("vote", poll=room.poll, option=1)  # ... and a vote (not logged)
    await room.stayer.wait_for(lambda s: s.polls[room.poll]["total"] == 1)

    back = RoomClient(server.url, room.name)
    back.state = leaver.state  # keep what it had; only the gap may arrive
    await back.connect(resume=(epoch, offset))
    await room.settled(back)
    await back.wait_for(lambda s: s.polls[room.poll]["total"] == 1)
    assert back.state.snapshots == 1  # only the one from its first connection
    assert back.state.replayed >= 21
    same_state(back.state, room.stayer.state)
    await back.close()


async def test_too_old_offset_gets_snapshot(server: DevServerProcess, room: Room) -> None:
    leaver = RoomClient(server.url, room.name)
    await leaver.connect()
    await room.settled(leaver)
    await leaver.close()
    await room.activity(HISTORY * 5)  # far more than the room history keeps

    back = RoomClient(server.url, room.name)
    back.state = leaver.state
    await back.connect(resume=(leaver.state.epoch, leaver.state.offset))
    await room.settled(back)
    assert back.state.snapshots == 2
    same_state(back.state, room.stayer.state)
    await back.close()


async def test_unknown_epoch_gets_snapshot(server: DevServerProcess, room: Room) -> None:
    await room.activity(3)
    back = RoomClient(server.url, room.name)
    await back.connect(resume=("some-old-epoch", 2))
    await room.settled(back)
    assert back.state.snapshots == 1
    same_state(back.state, room.stayer.state)
    await back.close()


async def test_resume_while_bids_keep_coming(server: DevServerProcess, room: Room) -> None:
    """Replay and live batches overlap at the seam; offsets make the overlap harmless."""
    leaver = RoomClient(server.url, room.name)
    await leaver.connect()
    await room.settled(leaver)
    await leaver.close()
    busy = asyncio.create_task(room.activity(40))
    await asyncio.sleep(0.05)
    back = RoomClient(server.url, room.name)
    back.state = leaver.state
    await back.connect(resume=(leaver.state.epoch, leaver.state.offset))
    await busy
    await room.settled(back)
    same_state(back.state, room.stayer.state)
    await back.close()
