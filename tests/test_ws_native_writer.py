"""The native batch writer (lotcast/interactive/_wswrite.c) against the per-socket fallback.

Two nodes on one Redis, one with the native writer (the default when built), one forced onto the
fallback with LOTCAST_NATIVE_WS=0. Real `websockets` clients on both; one client per node stops
reading for a while behind a tiny receive buffer (so the native writes come up short and their
rest goes through the transport's buffer), one drops its connection in the middle of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import httpx
import msgpack
import pytest
import websockets.asyncio.client as wsclient

from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive import wswrite
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.interactive.outbox import SNDBUF_ENV
from lotcast.interactive.protocol import decode_server_frame
from lotcast.redis_server import RedisServer

AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
ROOM = "native"
NAME = "N" * 1000  # fat bid events fill the paused readers' buffers sooner
BIDS = 40



@pytest.fixture(autouse=True)
def native_writer_built() -> None:
    # setup.sh installs gcc and the Python headers, so a missing extension is a broken install
    assert wswrite.enabled(), (f"native writer not built ({wswrite.IMPORT_ERROR}); install gcc "
                               "and the Python headers, then pip install -e .")


@pytest.fixture(scope="module")
def nodes(redis_server: RedisServer) -> Iterator[tuple[DevServerProcess, DevServerProcess]]:
    args = ("--bid-rate", "0", "--ws-msg-rate", "0")
    native = DevServerProcess(redis_server.url, *args, jwt_secret=DEV_JWT_SECRET)
    fallback = DevServerProcess(redis_server.url, *args, jwt_secret=DEV_JWT_SECRET)
    saved = {k: os.environ.get(k) for k in (wswrite.ENV, SNDBUF_ENV)}
    os.environ[SNDBUF_ENV] = "4096"  # server side: writes to a paused reader come up short
    try:
        native.start()
        os.environ[wswrite.ENV] = "0"
        fallback.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    with native:
        try:
            yield native, fallback
        finally:
            fallback.stop()


class Watcher:
    """A `websockets` client keeping every server frame's bytes; `pause()` stops reading."""

    def __init__(self, url: str, room: str, rcvbuf: int | None = None,
                 token: str | None = None) -> None:
        self.url, self.room, self.rcvbuf, self.token = url, room, rcvbuf, token
        self.frames: list[bytes] = []
        self.ws: Any = None
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> dict[str, Any]:
        parsed = urlparse(self.url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (parsed.hostname, parsed.port))
        self.ws = await wsclient.connect(f"ws://{parsed.netloc}/ws/{self.room}", sock=sock,
                                         compression=None, max_size=None, max_queue=None)
        hello: dict[str, Any] = {"type": "hello", "cid": "h"}
        if self.token:
            hello["token"] = self.token
        await self.ws.send(msgpack.packb(hello))
        first = await self.ws.recv()
        self.frames.append(first)
        self._task = asyncio.create_task(self._read())
        return decode_server_frame(first)[0]

    async def _read(self) -> None:
        with contextlib.suppress(websockets_closed()):
            async for frame in self.ws:
                self.frames.append(frame)

    def pause(self) -> None:
        self.ws.transport.pause_reading()

    def resume(self) -> None:
        self.ws.transport.resume_reading()

    def messages(self) -> list[dict[str, Any]]:
        return [m for f in self.frames for m in decode_server_frame(f)]

    def bid_batches(self) -> list[bytes]:
        """The raw bytes of every live `events` map holding bids (an outbox that queued
        several maps sends them in one frame, back to back: split them by msgpack)."""
        out = []
        for frame in self.frames:
            unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
            unpacker.feed(frame)
            start = 0
            for m in unpacker:
                end = unpacker.tell()
                if (m["type"] == "events" and not m.get("replay")
                        and any(e["type"] == "bid" for e in m["events"])):
                    out.append(frame[start:end])
                start = end
        return out

    def offsets(self) -> list[int]:
        return [e["offset"] for m in self.messages() if m["type"] == "events"
                for e in m["events"]]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.ws.close()


def websockets_closed() -> type[Exception]:
    from websockets.exceptions import ConnectionClosed
    return ConnectionClosed


async def hub_stats(url: str, room: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        body = (await client.get(url + "/interactive/stats")).json()
    return dict(body["hubs"][room])


async def until(predicate: Any, within: float = 20.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.mark.timeout(180)
async def test_native_and_fallback_deliver_identical_bytes_with_short_writes_and_a_drop(
        nodes: tuple[DevServerProcess, DevServerProcess]) -> None:
    native, fallback = nodes
    host = RoomClient(native.url, ROOM, AUTHORITY.mint(Role.HOST, "host", "Host"))
    bidder = RoomClient(native.url, ROOM, AUTHORITY.mint(Role.BIDDER, "b1", NAME))
    await host.connect()
    await bidder.connect()
    lot = (await host.request("lot_create", title="T", start_price=10, increments=[[0, 10]],
                              duration_ms=600_000, soft_close_ms=0))["lot"]
    opened = await host.request("lot_open", lot=lot)
    groups = {}
    for node in (native, fallback):
        readers = [Watcher(node.url, ROOM) for _ in range(3)]
        sleepy = Watcher(node.url, ROOM, rcvbuf=2048)
        dropper = Watcher(node.url, ROOM)
        for w in (*readers, sleepy, dropper):
            await w.open()
        groups[node.url] = (readers, sleepy, dropper)
    watchers = [w for readers, sleepy, dropper in groups.values()
                for w in (*readers, sleepy, dropper)]
    readers_all = [w for readers, _, _ in groups.values() for w in readers]

    def position(w: Watcher) -> int:
        return max((int(m["offset"]) for m in w.messages() if m["type"] in ("snapshot", "events")),
                   default=0)

    # every socket has the lot's opening (by snapshot or as an event) before the first bid, so
    # no socket's first bid batch also carries it: one event per batch everywhere
    await until(lambda: all(position(w) >= opened["offset"] for w in watchers))
    for _, sleepy, _ in groups.values():
        sleepy.pause()
    price = 10
    for i in range(BIDS):
        price += 10
        ack = await bidder.request("bid", lot=lot, amount=price)
        offset = ack["offset"]
        if i == BIDS // 2:
            for _, _, dropper in groups.values():
                dropper.ws.transport.abort()  # gone between two batches, unannounced
        # one event per batch: every node frames the same batch bytes
        await until(lambda o=offset: all(w.offsets() and w.offsets()[-1] >= o  # type: ignore[misc]
                                         for w in readers_all))
    for _, sleepy, _ in groups.values():
        sleepy.resume()
    reference = groups[native.url][0][0].bid_batches()
    assert len(reference) == BIDS
    for w in watchers:
        if w in [d for _, _, d in groups.values()]:
            continue
        await until(lambda w=w: len(w.bid_batches()) == BIDS)  # type: ignore[misc]
        assert w.bid_batches() == reference  # byte for byte, on both nodes
        offsets = w.offsets()
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    for _, _, dropper in groups.values():
        assert 0 < len(dropper.bid_batches()) < BIDS
    stats_native = await hub_stats(native.url, ROOM)
    stats_fallback = await hub_stats(fallback.url, ROOM)
    assert stats_native["native_writes"] >= BIDS * 3
    # TODO(issue 9): short_writes stays 0 here, the paused reader's bytes reach its transport
    # buffer by another path first; a test that forces a native partial write is still owed.
    assert stats_fallback["native_writes"] == 0
    for w in watchers:
        await w.close()
    await bidder.close()
    await host.close()


@pytest.mark.timeout(120)
async def test_acks_and_events_on_a_short_written_socket_stay_in_order(
        nodes: tuple[DevServerProcess, DevServerProcess]) -> None:
    native, _ = nodes
    room = "native-order"
    host = RoomClient(native.url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
    await host.connect()
    lot = (await host.request("lot_create", title="T", start_price=10, increments=[[0, 10]],
                              duration_ms=600_000, soft_close_ms=0))["lot"]
    await host.request("lot_open", lot=lot)
    others = [RoomClient(native.url, room, AUTHORITY.mint(Role.BIDDER, f"o{i}", NAME))
              for i in range(2)]
    for o in others:
        await o.connect()
    me = Watcher(native.url, room, rcvbuf=2048, token=AUTHORITY.mint(Role.BIDDER, "me", NAME))
    await me.open()
    me.pause()
    price = 10
    cids = []
    for i in range(30):
        price += 30
        cid = f"c{i}"
        cids.append(cid)
        await me.ws.send(msgpack.packb({"type": "bid", "cid": cid, "lot": lot,
                                        "amount": price}))
        await asyncio.gather(*(o.request("bid", lot=lot, amount=price + 10 * (k + 1))
                               for k, o in enumerate(others)))
    head = (await host.request("ping"))["offset"]
    me.resume()
    await until(lambda: bool(me.offsets()) and me.offsets()[-1] >= head)
    messages = me.messages()  # every frame decodes whole: no bytes interleaved
    acks = [m for m in messages if m["type"] in ("ack", "error") and m.get("for") == "bid"]
    assert [m["cid"] for m in acks] == cids
    offsets = me.offsets()
    assert offsets == list(range(offsets[0], head + 1))
    await me.close()
    for c in (host, *others):
        await c.close()
