"""The room protocol over the HTTP fallback transport (issue 12 item 3), against a real node and
Redis: exact record framing, the hub's bytes unchanged, acks by cid, refusals, resume, flood and
slow-consumer closes, HTTP statuses for bad input (never a 500)."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlparse

import httpx
import msgpack
import pytest
import websockets

from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive import protocol as p
from lotcast.interactive.client import HttpRoomClient, RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.redis_server import RedisServer

AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
LOT: dict[str, Any] = {"title": "Poster", "start_price": 1000, "increments": [[0, 100]],
                       "duration_ms": 600_000,
                       "soft_close_ms": 0}
OUTBOX = 256 * 1024


@pytest.fixture(scope="module")
def server(redis_server: RedisServer) -> Iterator[DevServerProcess]:
    with DevServerProcess(redis_server.url, "--ws-msg-rate", "20", "--ws-msg-burst", "40",
                          "--bid-rate", "0", "--ws-outbox-bytes", str(OUTBOX),
                          jwt_secret=DEV_JWT_SECRET) as srv:
        yield srv


@pytest.fixture
def room() -> str:
    return f"h-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def host(server: DevServerProcess, room: str) -> AsyncIterator[RoomClient]:
    client = RoomClient(server.url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
    await client.connect()
    yield client
    await client.close()


@pytest.fixture
async def bidder(server: DevServerProcess, room: str) -> AsyncIterator[HttpRoomClient]:
    client = HttpRoomClient(server.url, room, AUTHORITY.mint(Role.BIDDER, "alice", "Alice"))
    await client.connect()
    yield client
    await client.close()


async def open_lot(host: RoomClient) -> str:
    lot: str = (await host.request("lot_create", **LOT))["lot"]
    assert (await host.request("lot_open", lot=lot))["type"] == "ack"
    return lot


def raw_messages(frame: bytes) -> list[bytes]:
    """The exact bytes of each msgpack map of a server frame."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(frame)
    out, start = [], 0
    for _ in unpacker:
        end = unpacker.tell()
        out.append(frame[start:end])
        start = end
    return out


async def stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        body: dict[str, Any] = (await client.get(url + "/interactive/stats")).json()
        return body


async def test_records_carry_the_websocket_frames_byte_for_byte(
        server: DevServerProcess, room: str, host: RoomClient) -> None:
    ws = await websockets.connect(server.url.replace("http://", "ws://") + f"/ws/{room}")
    ws_frames: list[bytes] = []

    async def read_ws() -> None:
        async for frame in ws:
            assert isinstance(frame, bytes)
            ws_frames.append(frame)

    await ws.send(p.encode_client("hello", cid="w"))
    ws_reader = asyncio.create_task(read_ws())
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as http:
        request = http.build_request("POST", f"{server.url}/room/{room}/stream",
                                     content=p.encode_client("hello", cid="h"))
        response = await http.send(request, stream=True)
        try:
            assert response.status_code == 200
            assert response.headers["content-type"] == p.STREAM_CONTENT_TYPE
            assert response.headers["cache-control"] == "no-store, no-transform"
            assert response.headers["access-control-allow-origin"] == "*"
            raw = bytearray()
            records: list[bytes] = []
            lot = await open_lot(host)
            bidder = HttpRoomClient(server.url, room, AUTHORITY.mint(Role.BIDDER, "b", "B"))
            await bidder.connect()
            for amount in (1000, 1100, 1200):
                assert (await bidder.request("bid", lot=lot, amount=amount))["status"] == "winning"
            target = (await host.request("ping"))["offset"]
            await bidder.close()

            def have_offset(chunks: list[bytes]) -> bool:
                return any(m.get("type") == "events" and m["offset"] >= target
                           for c in chunks for m in p.decode_server_frame(c) if c)

            chunks = response.aiter_raw()
            async with asyncio.timeout(20):
                while not have_offset(records):
                    raw += await anext(chunks)
                    # split by hand: 4-byte big-endian length, then the payload
                    while len(raw) >= 4 and len(raw) >= 4 + int.from_bytes(raw[:4], "big"):
                        size = int.from_bytes(raw[:4], "big")
                        records.append(bytes(raw[4:4 + size]))
                        del raw[:4 + size]
                while not have_offset(ws_frames):
                    await asyncio.sleep(0.05)
        finally:
            await response.aclose()
    await ws.close()
    ws_reader.cancel()
    await asyncio.gather(ws_reader, return_exceptions=True)

    session = p.decode_server_frame(records[0])
    assert len(session) == 1
    assert set(session[0]) == {"type", "session", "keepalive_ms", "version"}
    assert session[0]["type"] == "session" and len(session[0]["session"]) >= 32
    welcome = p.decode_server_frame(records[1])[0]
    assert (welcome["type"], welcome["cid"], welcome["room"]) == ("welcome", "h", room)

    def live_events(frames: list[bytes]) -> list[bytes]:
        return [m for f in frames for m in raw_messages(f)
                if p.decode_server_frame(m)[0]["type"] == "events"]

    # The hub encoded each batch once; the stream carries those very bytes, as the socket does.
    http_events, ws_events = live_events(records[1:]), live_events(ws_frames)
    assert http_events and http_events == ws_events
    offsets = [e["offset"] for m in http_events for e in p.decode_server_frame(m)[0]["events"]]
    assert offsets == list(range(1, target + 1))


async def test_bids_acks_and_refusals(server: DevServerProcess, room: str, host: RoomClient,
                                      bidder: HttpRoomClient) -> None:
    assert bidder.welcome["role"] == "bidder" and bidder.welcome["user"] == "alice"
    lot = await open_lot(host)
    ack = await bidder.request("bid", lot=lot, amount=1000, key="k1")
    assert (ack["type"], ack["for"], ack["status"], ack["price"]) == ("ack", "bid", "winning", 1000)
    low = await bidder.request("bid", lot=lot, amount=1050)
    assert (low["code"], low["min"], low["field"]) == ("bid_too_low", 1100, "amount")
    again = await bidder.request("bid", lot=lot, amount=5000, key="k1")
    assert (again["type"], again["duplicate"], again["price"]) == ("ack", True, 1000)
    bad = await bidder.request("bid", lot=lot, amount=10.5)
    assert (bad["code"], bad["field"]) == ("amount_not_integer", "amount")
    assert (await bidder.request("dance"))["code"] == "unknown_type"
    assert (await bidder.request("lot_close", lot=lot))["code"] == "forbidden"
    assert (await bidder.request("hello"))["code"] == "duplicate_hello"
    # undecodable and oversize bodies: 202, the refusal is on the stream (cid nil)
    response = await bidder.post(b"\xc1")
    assert response.status_code == 202
    assert (await bidder.next_reply())["code"] == "bad_msgpack"
    response = await bidder.post(msgpack.packb({"type": "ping", "cid": "x", "ts": "y" * 9000}))
    assert response.status_code == 202
    assert (await bidder.next_reply())["code"] == "too_large"
    response = await bidder.post(b"\x00" * (p.TRANSPORT_CAP_BYTES + 1))
    assert response.status_code == 413
    assert response.json()["code"] == "too_large"
    reply = await bidder.next_reply()
    assert (reply["code"], reply["cid"]) == ("too_large", None)
    assert "refused unread" in reply["message"]
    assert (await bidder.request("ping"))["type"] == "pong"  # the session goes on

    anon = HttpRoomClient(server.url, room)
    assert (await anon.connect())["role"] == "viewer"
    refused = await anon.request("bid", lot=lot, amount=2000)
    assert refused["code"] == "forbidden"
    assert refused["message"] == "'bid' needs role 'bidder'; this connection is 'viewer'"
    await anon.close()
    await bidder.wait_for(lambda s: s.lots.get(lot, {}).get("price") == 1000)


async def test_http_statuses_for_bad_requests(server: DevServerProcess, room: str,
                                              bidder: HttpRoomClient) -> None:
    base = server.url
    session = bidder.session_id
    assert session
    async with httpx.AsyncClient() as http:
        send = f"{base}/room/{room}/send"
        cases: list[tuple[httpx.Response, int, str | None]] = [
            (await http.post(send, content=b"x"), 400, "missing_session"),
            (await http.post(send, content=b"x", headers={p.SESSION_HEADER: "nope"}), 404,
             "unknown_session"),
            (await http.post(f"{base}/room/other-room/send", content=b"x",
                             headers={p.SESSION_HEADER: session}), 404, "unknown_session"),
            (await http.post(f"{base}/room/caf%C3%A9/stream", content=b""), 400, "bad_room"),
            (await http.post(f"{base}/room/{room}/stream",
                             content=b"\x00" * (p.TRANSPORT_CAP_BYTES + 1)), 413, "too_large"),
            (await http.get(f"{base}/room/{room}/stream"), 405, None),
            (await http.get(send), 405, None),
        ]
        for response, status, code in cases:
            assert response.status_code == status, (response.request.url, response.text)
            if code is not None:
                assert response.json()["code"] == code
        preflight = await http.options(send, headers={
            "Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, lotcast-session"})
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "*"
        assert p.SESSION_HEADER in preflight.headers["access-control-allow-headers"]
    assert (await bidder.request("ping"))["type"] == "pong"


async def test_auth_failure_closes_4501_and_the_session_is_gone(server: DevServerProcess,
                                                                  room: str) -> None:
    client = HttpRoomClient(server.url, room, "not-a-jwt")
    reply = await client.connect()
    assert (reply["type"], reply["code"], reply["field"]) == ("error", "auth_failed", "token")
    assert await client.wait_closed() == 4501
    assert client.ended
    last = p.decode_server_frame(client.records[-1])
    assert last == [{"type": "close", "code": 4501, "reason": "auth failed"}]
    response = await client.post(p.encode_client("ping", cid="late"))
    assert response.status_code == 404
    await client.close()


async def test_hello_can_follow_as_a_post(server: DevServerProcess, room: str) -> None:
    client = HttpRoomClient(server.url, room)
    response = await client.open(b"")
    assert response.status_code == 200 and client.session_id
    assert (await client.request("ping"))["code"] == "hello_required"
    welcome = await client.request("hello")
    assert (welcome["type"], welcome["role"]) == ("welcome", "viewer")
    await client.close()


async def test_resume_after_a_dropped_stream(server: DevServerProcess, room: str,
                                             host: RoomClient, bidder: HttpRoomClient) -> None:
    stayer = RoomClient(server.url, room)
    await stayer.connect()
    lot = await open_lot(host)
    assert (await bidder.request("bid", lot=lot, amount=1000))["status"] == "winning"
    mark = (await host.request("ping"))["offset"]
    await bidder.wait_for(lambda s: s.offset >= mark)
    before = (await stats(server.url))["http_sessions"]
    await bidder.drop()
    for _ in range(100):
        if (await stats(server.url))["http_sessions"] == before - 1:
            break
        await asyncio.sleep(0.05)
    assert (await stats(server.url))["http_sessions"] == before - 1
    gone = await bidder.post(p.encode_client("ping", cid="old"))
    assert gone.status_code == 404  # the dropped stream's session ended with it

    for _ in range(3):
        assert (await host.request("lot_extend", lot=lot, by_ms=1000))["type"] == "ack"
    other = RoomClient(server.url, room, AUTHORITY.mint(Role.BIDDER, "bob", "Bob"))
    await other.connect()
    assert (await other.request("bid", lot=lot, amount=1500))["status"] == "winning"
    await other.close()
    target = (await host.request("ping"))["offset"]

    await bidder.connect(resume=(bidder.state.epoch, bidder.state.offset))
    await bidder.wait_for(lambda s: s.offset >= target)
    await stayer.wait_for(lambda s: s.offset >= target)
    assert bidder.state.snapshots == 1  # the first connection's; the resume replayed the gap
    assert bidder.state.replayed == target - mark
    assert (bidder.state.epoch, bidder.state.lots) == (stayer.state.epoch, stayer.state.lots)
    assert [e["offset"] for e in bidder.state.applied] == list(range(1, target + 1))
    await stayer.close()


async def test_flood_is_refused_then_closed_4029(server: DevServerProcess, room: str) -> None:
    client = HttpRoomClient(server.url, room)
    await client.connect()
    frame = p.encode_client("ping", cid="f")
    statuses: set[int] = set()
    for _ in range(400):
        response = await client.post(frame)
        statuses.add(response.status_code)
        if response.status_code == 404:
            break
    assert await client.wait_closed() == 4029
    assert statuses <= {202, 429, 404} and 202 in statuses
    codes = {m.get("code") for _, m in client.received if m["type"] == "error"}
    assert codes == {"rate_limited"}
    assert (await client.post(frame)).status_code == 404
    await client.close()


def open_never_reading_stream(url: str, room: str) -> socket.socket:
    parsed = urlparse(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect((parsed.hostname, parsed.port))
    body = p.encode_client("hello", cid="slow")
    sock.sendall((f"POST /room/{room}/stream HTTP/1.1\r\nHost: {parsed.netloc}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    return sock


@pytest.mark.timeout(150)
async def test_never_reading_stream_is_cut_4008_and_metrics_count_streams(
        server: DevServerProcess, room: str, host: RoomClient) -> None:
    lot = await open_lot(host)
    bidders = [RoomClient(server.url, room, AUTHORITY.mint(Role.BIDDER, f"b{i}", "N" * 1000))
               for i in range(4)]
    for b in bidders:
        await b.connect()
    watcher = HttpRoomClient(server.url, room)
    await watcher.connect()
    before = await stats(server.url)
    slow = await asyncio.to_thread(open_never_reading_stream, server.url, room)
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(100):
                metrics = (await http.get(server.url + "/metrics")).text
                if f"lotcast_room_http_sessions {before['http_sessions'] + 1}.0" in metrics:
                    break
                await asyncio.sleep(0.05)
            assert f"lotcast_room_http_sessions {before['http_sessions'] + 1}.0" in metrics
        price, rounds = 1000, 0
        while (await stats(server.url))["slow_disconnects"] == before["slow_disconnects"]:
            for _ in range(10):
                price += 400
                await asyncio.gather(*(b.request("bid", lot=lot, amount=price + i * 100)
                                       for i, b in enumerate(bidders)))
                await asyncio.sleep(0.06)  # under the per-connection message rate
            rounds += 1
            assert rounds < 150, "the never-reading stream was not cut"
        for _ in range(100):  # the close record gets ~1 s, then the connection is aborted
            if (await stats(server.url))["http_sessions"] == before["http_sessions"]:
                break
            await asyncio.sleep(0.1)
        assert (await stats(server.url))["http_sessions"] == before["http_sessions"]
        # the watcher that reads is not affected and saw every bid
        target = (await host.request("ping"))["offset"]
        await watcher.wait_for(lambda s: s.offset >= target, within=30)
        assert watcher.close_code is None and not watcher.ended
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
                break
            ended = not chunk
            received += chunk
        assert received.startswith(b"HTTP/1.1 200 ")
    finally:
        slow.close()
        await watcher.close()
        for b in bidders:
            await b.close()
