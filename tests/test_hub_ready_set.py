"""The hub's told path (wswrite.ReadySet): sockets that tell the hub when they may take raw writes.

Real loopback TCP connections: the hub writes through the server side's asyncio transport and a
plain socket reads the client side. The subscriber here is a test double of the session (it
tells the hub its ready flag and records what comes through its queue); the extension, the
transports and the sockets are real. Checked: a ready socket takes the frame raw; a socket that
said "not now" gets it through its queue; a socket whose transport still holds bytes never takes
the raw write (its bytes stay in order); a socket that leaves while a batch is still being written
gets nothing more and its slot is not given to a socket that joined meanwhile; a socket that never
takes raw writes gets every frame through its queue.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from ws_support import assert_native_writer_built

from lotcast.interactive import hub as hub_module
from lotcast.interactive import wswrite
from lotcast.interactive.functions import RoomFunctions
from lotcast.interactive.hub import RoomHub
from lotcast.interactive.protocol import CloseCode
from lotcast.interactive.roomlog import RoomLog


@pytest.fixture(autouse=True)
def native_writer_built() -> None:
    assert_native_writer_built()


class Server(asyncio.Protocol):
    def __init__(self, accepted: asyncio.Queue[asyncio.Transport]) -> None:
        self.accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.accepted.put_nowait(transport)


class Linked:
    """Tells the hub its ready flag; frames through its queue go to the transport (in order)."""

    user_id = ""

    def __init__(self, transport: asyncio.Transport, peer: socket.socket, *, link: bool = True
                 ) -> None:
        self.transport = transport
        self.peer = peer
        self.link = link
        self.tell: Callable[[bool], None] | None = None
        self.pushed: list[bytes] = []

    def native_link(self, ready: Callable[[bool], None]) -> tuple[int, Any] | None:
        if not self.link:
            return None
        self.tell = ready
        ready(True)
        return self.transport.get_extra_info("socket").fileno(), self.transport

    def native_rest(self, wire: bytes, result: int) -> None:
        self.transport.write(wire[result:])

    def push(self, frame: bytes) -> None:
        self.pushed.append(frame)
        self.transport.write(wswrite.framed(frame))

    def close_soon(self, code: CloseCode, reason: str) -> None:
        pass

    def received(self) -> bytes:
        got = b""
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                return got
            if not chunk:
                return got
            got += chunk


@pytest_asyncio.fixture
async def hub(redis_client: aioredis.Redis) -> AsyncIterator[RoomHub]:
    hub = RoomHub("ready", RoomLog(redis_client, RoomFunctions(redis_client, 100)), 0.05, 0.2)
    yield hub
    await hub.close()


@pytest_asyncio.fixture
async def connect() -> AsyncIterator[Callable[..., Any]]:
    accepted: asyncio.Queue[asyncio.Transport] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Server(accepted), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    made: list[Linked] = []

    async def make(*, link: bool = True, rcvbuf: int = 0) -> Linked:
        peer = socket.socket()
        if rcvbuf:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        peer.setblocking(False)
        await loop.sock_connect(peer, ("127.0.0.1", port))
        transport = await asyncio.wait_for(accepted.get(), 10)
        sub = Linked(transport, peer, link=link)
        made.append(sub)
        return sub

    yield make
    for sub in made:
        sub.transport.abort()
        sub.peer.close()
    server.close()
    await server.wait_closed()


async def drained(hub: RoomHub) -> None:
    async with asyncio.timeout(10):
        while hub._fanout_jobs:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # loopback delivery


def wire(payload: bytes) -> bytes:
    return wswrite.framed(payload)


@pytest.mark.timeout(60)
async def test_ready_sockets_take_raw_writes_and_the_others_keep_their_order(
        hub: RoomHub, connect: Callable[..., Any]) -> None:
    a, b, never = await connect(), await connect(), await connect(link=False)
    c = await connect(rcvbuf=4096)
    for sub in (a, b, never, c):
        hub.attach(sub)
    assert len(hub._ready.live) == 3 and list(hub._plain_subs) == [never]

    hub._broadcast(b"one")
    await drained(hub)
    assert [s.received() for s in (a, b, never, c)] == [wire(b"one")] * 4
    assert [s.pushed for s in (a, b, never, c)] == [[], [], [b"one"], []]
    assert hub.stats.native_writes == 3 and hub.stats.native_probed == 3

    assert b.tell is not None
    b.tell(False)  # b's own queue holds a frame: "not now"
    # c's transport holds bytes: its reader stopped and a big write went mostly to the buffer
    blob = b"x" * (8 << 20)
    c.transport.write(blob)
    assert c.transport.get_write_buffer_size() > 0
    hub._broadcast(b"two")
    await drained(hub)
    assert a.received() == wire(b"two")
    assert b.received() == wire(b"two") and b.pushed == [b"two"]
    assert c.pushed == [b"two"]  # not raw: it would have overtaken the blob
    got = b""
    async with asyncio.timeout(20):
        while len(got) < len(blob) + len(wire(b"two")):
            got += c.received()
            await asyncio.sleep(0.01)
    assert got == blob + wire(b"two")
    b.tell(True)
    hub._broadcast(b"three")
    await drained(hub)
    assert [s.received() for s in (a, b, c)] == [wire(b"three")] * 3
    assert b.pushed == [b"two"] and c.pushed == [b"two"]


@pytest.mark.timeout(60)
async def test_a_socket_that_leaves_mid_batch_gets_nothing_more_and_keeps_its_slot_until_done(
        hub: RoomHub, connect: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # one socket per loop turn, so a batch is still being written while sockets come and go
    monkeypatch.setattr(hub_module, "FANOUT_CHUNK", 1)
    monkeypatch.setattr(hub_module, "FANOUT_SLICE", 1)
    first, leaver, last = await connect(), await connect(), await connect()
    joiner = await connect()
    for sub in (first, leaver, last):
        hub.attach(sub)
    hub._broadcast(b"batch")  # the first turn runs now: `first` only
    assert hub._fanout_jobs
    hub.detach(leaver)
    hub.attach(joiner)
    assert hub._ready.live[joiner] == 3  # not the leaver's slot: the batch still names it
    await drained(hub)
    assert first.received() == wire(b"batch") and last.received() == wire(b"batch")
    assert leaver.received() == b"" and leaver.pushed == []
    assert joiner.received() == b"" and joiner.pushed == []
    later = await connect()
    hub.attach(later)
    assert hub._ready.live[later] == 1  # no batch pending: the freed slot is reused
    hub._broadcast(b"next")
    await drained(hub)
    assert [s.received() for s in (first, joiner, later, last)] == [wire(b"next")] * 4
    assert leaver.received() == b""
    assert leaver.tell is not None
    leaver.tell(True)  # a late call from a socket that left changes nothing of `later`'s slot
    later_slot = hub._ready.live[later]
    assert later.tell is not None
    later.tell(False)
    leaver.tell(True)
    assert hub._ready.ready[later_slot] == 0
