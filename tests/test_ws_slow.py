"""Slow consumer: a client that never reads is disconnected; the others are not delayed."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import statistics
import struct
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import httpx
import msgpack
import pytest

from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.redis_server import RedisServer

AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
ROOM = "slow"
OUTBOX = 512 * 1024
LONG_NAME = "N" * 1000  # fat bid events fill the never-read socket buffers sooner


@pytest.fixture(scope="module")
def server(redis_server: RedisServer) -> Iterator[DevServerProcess]:
    with DevServerProcess(redis_server.url, "--ws-outbox-bytes", str(OUTBOX), "--bid-rate", "0",
                          "--ws-msg-rate", "0", jwt_secret=DEV_JWT_SECRET) as srv:
        yield srv


def open_never_reading_socket(url: str, room: str) -> socket.socket:
    """A WebSocket client that says hello and then never reads (tiny receive buffer)."""
    parsed = urlparse(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect((parsed.hostname, parsed.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws/{room} HTTP/1.1\r\nHost: {parsed.netloc}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert b" 101 " in response.split(b"\r\n")[0]
    payload = msgpack.packb({"type": "hello", "cid": "slow"})
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(struct.pack("!BB", 0x82, 0x80 | len(payload)) + mask + masked)
    return sock


async def stats(url: str) -> dict[str, int]:
    async with httpx.AsyncClient() as client:
        body: dict[str, int] = (await client.get(url + "/interactive/stats")).json()
        return body


def delays(watcher: RoomClient, since: int) -> list[float]:
    """Seconds from each bid's server timestamp to its arrival at the watcher."""
    out = []
    for received_at, msg in watcher.received:
        if msg["type"] == "events":
            out += [received_at - e["ts"] / 1000 for e in msg["events"]
                    if e["type"] == "bid" and e["offset"] > since]
    return out


async def place_bids(bidders: list[RoomClient], lot: str, start: int, count: int) -> int:
    price = start
    for _ in range(count // len(bidders)):
        price += len(bidders) * 10
        await asyncio.gather(*(b.request("bid", lot=lot, amount=price + i * 10)
                               for i, b in enumerate(bidders)))
        await asyncio.sleep(0.01)
    return price + len(bidders) * 10


async def caught_up(watcher: RoomClient, host: RoomClient) -> None:
    target = (await host.request("ping"))["offset"]
    await watcher.wait_for(lambda s: s.offset >= target, within=30)


@pytest.mark.timeout(120)
async def test_never_reading_client_is_dropped_and_others_unaffected(
        server: DevServerProcess) -> None:
    host = RoomClient(server.url, ROOM, AUTHORITY.mint(Role.HOST, "host", "Host"))
    bidders = [RoomClient(server.url, ROOM, AUTHORITY.mint(Role.BIDDER, f"b{i}", LONG_NAME))
               for i in range(4)]
    watcher = RoomClient(server.url, ROOM)
    for c in (host, watcher, *bidders):
        await c.connect()
    lot = (await host.request("lot_create", title="T", start_price=10, increments=[[0, 10]],
                              duration_ms=600_000, soft_close_ms=0))["lot"]
    await host.request("lot_open", lot=lot)

    # Baseline: nobody is slow.
    price = await place_bids(bidders, lot, 10, 200)
    baseline_mark = watcher.state.offset
    await caught_up(watcher, host)
    baseline = statistics.median(delays(watcher, 0))

    slow = await asyncio.to_thread(open_never_reading_socket, server.url, ROOM)
    try:
        before = await stats(server.url)
        rounds = 0
        while (await stats(server.url))["slow_disconnects"] == before["slow_disconnects"]:
            price = await place_bids(bidders, lot, price, 200)
            rounds += 1
            assert rounds < 60, "the never-reading client was not disconnected"
        await caught_up(watcher, host)
        during = statistics.median(delays(watcher, baseline_mark))
        for _ in range(100):  # the server gives the close frame ~1 s, then aborts
            if (await stats(server.url))["sockets"] == before["sockets"] - 1:
                break
            await asyncio.sleep(0.1)
        assert (await stats(server.url))["sockets"] == before["sockets"] - 1
        # Delays with a stuck client present stay in the same range as without one.
        assert during < baseline * 5 + 0.05, (baseline, during)
        assert watcher.close_code is None
        # Once it finally reads, the stuck client finds the end of the connection: the close
        # frame (4008) if it fit in the buffers, else a reset (the server aborted the transport).
        slow.setblocking(False)
        received, ended = b"", False
        deadline = time.monotonic() + 10
        while not ended and time.monotonic() < deadline:
            try:
                chunk = slow.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            except ConnectionResetError:
                ended = True
                break
            ended = not chunk
            received += chunk
        assert ended
        assert received.startswith(b"\x82")  # it did get data before it stopped reading
    finally:
        slow.close()
    for c in (host, watcher, *bidders):
        await c.close()
