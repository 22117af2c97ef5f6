"""Acks first, never out of order: a personal ack goes out between fan-out chunks (not after
the whole room's fan-out), yet never ahead of a frame already handed to its own socket.

The node's `ack_write` counters (Function reply -> ack write, docs: lotcast/interactive/
ackwrite.py) are checked too. Real devserver nodes, real Redis, real sockets.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import msgpack
import pytest
from ws_support import Watcher, node_stats, until

from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive import wswrite
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.interactive.outbox import SNDBUF_ENV
from lotcast.redis_server import RedisServer

AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
NAME = "A" * 1000  # fat bid events fill a paused reader's buffers sooner


def started(redis_url: str, env: dict[str, str], *args: str) -> DevServerProcess:
    """A devserver that inherits `env` on top of ours (this process's environment restored)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return DevServerProcess(redis_url, "--bid-rate", "0", "--ws-msg-rate", "0", *args,
                                jwt_secret=DEV_JWT_SECRET).start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def node(redis_server: RedisServer) -> Iterator[DevServerProcess]:
    srv = started(redis_server.url, {SNDBUF_ENV: "4096"})
    try:
        yield srv
    finally:
        srv.stop()


async def open_lot(url: str, room: str) -> tuple[RoomClient, str]:
    host = RoomClient(url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
    await host.connect()
    lot = (await host.request("lot_create", title="T", start_price=10, increments=[[0, 10]],
                              duration_ms=600_000, soft_close_ms=0))["lot"]
    await host.request("lot_open", lot=lot)
    return host, lot


@pytest.mark.timeout(120)
async def test_an_ack_follows_every_event_already_handed_to_its_socket(
        node: DevServerProcess) -> None:
    """A bidder that stops reading: its socket's frames back up in the transport and outbox.
    Each bid is sent only once the previous events reached another socket of the node (so they
    were handed to the bidder's socket too, in the same fan-out): its ack must come after them,
    whatever "acks first" does for other sockets."""
    room = "ack-order"
    host, lot = await open_lot(node.url, room)
    reader = Watcher(node.url, room)
    await reader.open()
    other = RoomClient(node.url, room, AUTHORITY.mint(Role.BIDDER, "other", NAME))
    await other.connect()
    me = Watcher(node.url, room, rcvbuf=2048, token=AUTHORITY.mint(Role.BIDDER, "me", NAME))
    await me.open()
    before = (await node_stats(node.url))["ack_write"]
    me.pause()
    price = 10
    seen_at_send: dict[str, int] = {}
    for i in range(30):
        price += 20
        cid = f"c{i}"
        seen_at_send[cid] = reader.offsets()[-1] if reader.offsets() else 0
        await me.ws.send(msgpack.packb({"type": "bid", "cid": cid, "lot": lot, "amount": price}))
        ack = await other.request("bid", lot=lot, amount=price + 10)
        # the reader has both bids' events: the batch holding them was handed to `me` too
        await until(lambda o=ack["offset"]: bool(reader.offsets())  # type: ignore[misc]
                    and reader.offsets()[-1] >= o)
    head = reader.offsets()[-1]
    me.resume()
    await until(lambda: bool(me.offsets()) and me.offsets()[-1] >= head
                and sum(1 for m in me.messages() if m["type"] == "ack") == 30)
    messages = me.messages()  # every frame decodes whole: no bytes interleaved
    newest = 0  # the newest event offset before each position of the stream
    acks = []
    for m in messages:
        if m["type"] == "events":
            offsets = [int(e["offset"]) for e in m["events"]]
            # no gap (a live batch may overlap the snapshot right after connecting)
            assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
            assert newest == 0 or offsets[0] <= newest + 1, (offsets, newest)
            newest = max(newest, *offsets)
        elif m["type"] == "snapshot":
            newest = max(newest, int(m["offset"]))
        elif m["type"] in ("ack", "error") and m.get("for") == "bid":
            acks.append(m["cid"])
            assert m["type"] == "ack", m
            # every event handed to this socket before the ack was produced precedes it
            assert newest >= seen_at_send[m["cid"]], (m["cid"], newest, seen_at_send[m["cid"]])
    assert acks == [f"c{i}" for i in range(30)]
    assert me.offsets()[-1] == head
    after = (await node_stats(node.url))["ack_write"]
    assert after["total"] - before["total"] >= 60  # ours and the other bidder's
    assert after["queued"] - before["queued"] >= 1  # ours waited behind our own frames
    assert sum(after["counts"]) == after["total"]
    await me.close()
    await reader.close()
    await other.close()
    await host.close()


# --- an ack between fan-out chunks -----------------------------------------------------------

SLICE_DELAY_S = 0.15  # fault: each native slice (128 sockets) of a fan-out takes this long
WATCHERS = 1100  # about 9 slices: a fan-out of one batch lasts ~1.3 s


class RawWatcher(asyncio.Protocol):
    """An anonymous room socket at the cost of a few lines: handshake, hello, then it only
    notes (by a counter shared with the test) when a frame holding a live bid arrives."""

    def __init__(self, host: str, room: str, clock: list[int]) -> None:
        self.request = (f"GET /ws/{room} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        "Sec-WebSocket-Version: 13\r\n\r\n").encode()
        self.clock = clock
        self.buf = bytearray()
        self.upgraded = asyncio.get_running_loop().create_future()
        self.welcomed = asyncio.get_running_loop().create_future()
        self.bid_at: int | None = None  # the clock when the first bid frame arrived
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded.done():
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            assert self.buf.startswith(b"HTTP/1.1 101"), bytes(self.buf[:80])
            del self.buf[:end + 4]
            self.upgraded.set_result(None)
            hello = msgpack.packb({"type": "hello", "cid": "h"})
            # one masked binary frame (a zero mask: the payload goes as is)
            self.transport.write(bytes((0x82, 0x80 | len(hello))) + b"\0\0\0\0" + hello)
        while len(self.buf) >= 2:
            n, head = self.buf[1] & 0x7F, 2
            if n == 126:
                if len(self.buf) < 4:
                    return
                n, head = int.from_bytes(self.buf[2:4], "big"), 4
            elif n == 127:
                if len(self.buf) < 10:
                    return
                n, head = int.from_bytes(self.buf[2:10], "big"), 10
            if len(self.buf) < head + n:
                return
            payload = bytes(self.buf[head:head + n])
            del self.buf[:head + n]
            if not self.welcomed.done():
                self.welcomed.set_result(None)
            elif self.bid_at is None and b"\xa3bid" in payload:
                self.clock[0] += 1
                self.bid_at = self.clock[0]


@pytest.mark.timeout(180)
async def test_an_ack_goes_out_between_chunks_of_other_sockets_fan_out(
        redis_server: RedisServer) -> None:
    srv = started(redis_server.url, {wswrite.FAULT_SLICE_ENV: str(SLICE_DELAY_S)})
    room = "ack-first"
    clock = [0]
    watchers: list[RawWatcher] = []
    try:
        host, lot = await open_lot(srv.url, room)
        first = RoomClient(srv.url, room, AUTHORITY.mint(Role.BIDDER, "first", "First"))
        await first.connect()
        me = Watcher(srv.url, room, token=AUTHORITY.mint(Role.BIDDER, "me", "Me"))
        await me.open()
        parsed = urlparse(srv.url)
        loop = asyncio.get_running_loop()
        for _ in range(WATCHERS // 100):
            batch = [RawWatcher(parsed.netloc, room, clock) for _i in range(100)]
            for w in batch:
                await loop.create_connection(lambda w=w: w,  # type: ignore[misc]
                                             parsed.hostname, parsed.port)
            async with asyncio.timeout(60):
                await asyncio.gather(*(w.welcomed for w in batch))
            watchers += batch
        await asyncio.sleep(1.0)  # join `viewers` frames go out (slowly, like everything now)
        await until(lambda: (sum(1 for m in me.messages() if m["type"] == "viewers") > 0),
                    within=30)
        body0 = await node_stats(srv.url)
        stats0 = body0["hubs"][room]
        await first.request("bid", lot=lot, amount=20)  # its batch: a ~1.3 s fan-out
        await until(lambda: any(w.bid_at is not None for w in watchers), within=30)
        # the fan-out has started; our bid's reply comes back in the middle of it
        await me.ws.send(msgpack.packb({"type": "bid", "cid": "mine", "lot": lot, "amount": 30}))
        ack_at = None
        async with asyncio.timeout(60):
            while ack_at is None:
                if any(m["type"] == "ack" and m["cid"] == "mine" for m in me.messages()):
                    clock[0] += 1
                    ack_at = clock[0]
                await asyncio.sleep(0.002)
        await until(lambda: all(w.bid_at is not None for w in watchers), within=60)
        later = sum(1 for w in watchers if w.bid_at is not None and w.bid_at > ack_at)
        body1 = await node_stats(srv.url)
        stats1 = body1["hubs"][room]
        # the ack went out before the batch's last slices reached their sockets, and the
        # batch took several turns (slices)
        assert later >= 128, (later, ack_at)
        assert stats1["fanout_turns"] - stats0["fanout_turns"] >= WATCHERS // 128
        # both bids' replies were timed (Function reply -> write)
        assert body1["ack_write"]["total"] - body0["ack_write"]["total"] >= 2
        await me.close()
        await first.close()
        await host.close()
    finally:
        for w in watchers:
            if w.transport is not None:
                w.transport.abort()
        srv.stop()
