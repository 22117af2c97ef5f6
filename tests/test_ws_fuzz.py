"""Fuzz of the room socket against a real node and a real Redis (issue 7, item 9).

Generated and mutated frames: valid messages with mutated fields, random maps, random bytes,
garbled msgpack, wrong types, huge ints, deeply nested containers, text frames (valid and invalid
UTF-8), fragmented messages, frames over the app cap and over the transport cap. Each example is
sent on a fuzz socket (a bidder or a viewer in the watched room, a host in a room of its own, or
a fresh socket that has not said hello), followed by a sentinel `ping` whose answer ends the
example. Asserted: only documented message types, error codes and close codes; every error
well-formed; no traceback in the node's log; socket counts back to baseline; and a normal bidder
and watcher in the same room served correctly throughout and after.

Bounded: a fixed number of examples, derandomized, no example database (reproducible in CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import urllib.request
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
import pytest
import websockets
from chat_support import ChatState
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive import protocol as p
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.redis_server import RedisServer

AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
EXAMPLES = 400
SERVER_TYPES = {"welcome", "snapshot", "events", "tally", "viewers", "ack", "error", "pong",
                "question_votes"}
ERROR_CODES = {str(code) for code in p.ErrorCode}
# Close codes a fuzz socket may see (docs/protocol.md, "Close codes"); 1000 is our own close.
CLOSE_CODES = {1000, 1009, 4029, 4501}
TRANSPORT_CAP = 65536
T = TypeVar("T")

# --- strategies ----------------------------------------------------------------------------------

LEAVES = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=70)
          | st.binary(max_size=40) | st.sampled_from(["L1", "L2", "L3", "P1", "", "x" * 65]))
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
KEYS = st.sampled_from(["type", "cid", "lot", "amount", "max", "key", "poll", "option", "token",
                        "epoch", "offset", "ts", "title", "increments", "start_price", "reserve",
                        "buy_now", "duration_ms", "soft_close_ms", "by_ms", "question",
                        "options", "text", "message", "user", "duration_ms", "seconds", "words",
                        "question"]) | st.text(max_size=10)
CIDS = st.one_of(st.text(min_size=1, max_size=64), st.integers(0, 2**53 - 1),
                 st.sampled_from(["c", 0, 2**53 - 1, "x" * 64]), VALUES)
# values close to the edges of the schema's rules: lengths, ranges, types that nearly fit
EDGES = st.sampled_from([0, 1, -1, 5, 6, 999, 1000, 3_600_000, 3_600_001, 86_400_001, 10**12,
                         10**12 + 1, 2**53, 1.0, 1e400, float("nan"), True, "", "L1", "a" * 64,
                         "a" * 65, "a" * 201, "é" * 64, b"L1", [], [[0, 10]], [[0, 0]],
                         [[1, 10]], [[0, 10], [0, 20]], [[0, 10, 1]], [["0", 10]], ["a"],
                         ["a", "b"], ["a"] * 7, [[i, 1] for i in range(21)]])

BASES: dict[str, dict[str, Any]] = {
    "hello": {"token": "x"},
    "ping": {"ts": 1.5},
    "bid": {"lot": "L1", "amount": 5000, "max": 9000, "key": "k1"},
    "vote": {"poll": "P1", "option": 1},
    "lot_create": {"title": "t", "start_price": 100, "increments": [[0, 10], [1000, 50]],
                   "duration_ms": 60000, "soft_close_ms": 1000, "reserve": 500, "buy_now": 900},
    "lot_open": {"lot": "L1"},
    "lot_extend": {"lot": "L1", "by_ms": 1000},
    "lot_close": {"lot": "L1"},
    "poll_open": {"question": "q", "options": ["a", "b"], "duration_ms": 60000},
    "poll_close": {"poll": "P1"},
    # chat, moderation, Q&A
    "chat": {"text": "hello"},
    "chat_delete": {"message": "M1"},
    "user_mute": {"user": "normal", "duration_ms": 1000},
    "user_unmute": {"user": "normal"},
    "user_ban": {"user": "someone"},
    "user_unban": {"user": "someone"},
    "moderator_grant": {"user": "someone"},
    "moderator_revoke": {"user": "someone"},
    "slow_mode": {"seconds": 0},
    "blocked_words": {"words": ["spam"]},
    "question_mark": {"message": "M1"},
    "question_upvote": {"question": "M1"},
    "question_answer": {"question": "M1"},
}


@st.composite
def mutated_message(draw: st.DrawFn) -> dict[Any, Any]:
    kind = draw(st.sampled_from(sorted(BASES)))
    msg: dict[Any, Any] = {"type": kind, "cid": draw(CIDS), **BASES[kind]}
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["drop", "set", "edge", "edge", "add", "huge", "type"]))
        if action == "drop" and msg:
            msg.pop(draw(st.sampled_from(sorted(msg, key=repr))))
        elif action == "set" and msg:
            msg[draw(st.sampled_from(sorted(msg, key=repr)))] = draw(VALUES)
        elif action == "edge" and msg:
            msg[draw(st.sampled_from(sorted(msg, key=repr)))] = draw(EDGES)
        elif action == "add":
            msg[draw(KEYS)] = draw(VALUES)
        elif action == "huge":
            name = draw(st.sampled_from(["amount", "max", "offset", "option", "cid", "by_ms"]))
            msg[name] = draw(st.sampled_from([2**53, 2**63 - 1, 2**64 - 1, -(2**63), 10**12 + 1,
                                              -1, 0]))
        else:
            msg["type"] = draw(st.sampled_from([*BASES, "dance", "", 5, None]))
    return msg


def pack(value: Any) -> bytes:
    frame: bytes = msgpack.packb(value, use_bin_type=True)
    return frame


@dataclass(frozen=True)
class Frame:
    data: bytes | str
    text_bytes: bool = False  # send `data` (bytes) as a text frame
    fragments: int = 1


def nested(depth: int, array: bool) -> bytes:
    return (b"\x91" if array else b"\x81\xa1k") * depth + b"\xc0"


FRAMES = st.one_of(
    mutated_message().map(lambda m: Frame(pack(m))),
    mutated_message().map(lambda m: Frame(pack(m), fragments=3)),
    st.dictionaries(KEYS, VALUES, max_size=6).map(lambda m: Frame(pack(m))),
    st.binary(max_size=200).map(Frame),
    st.tuples(mutated_message(), st.integers(0, 200), st.integers(0, 255)).map(
        lambda t: Frame(bytearray_flip(pack(t[0]), t[1], t[2]))),
    st.tuples(mutated_message(), st.integers(0, 50)).map(lambda t: Frame(pack(t[0])[:t[1]])),
    VALUES.map(lambda v: Frame(pack(v))),
    st.tuples(st.integers(1, 3000), st.booleans()).map(lambda t: Frame(nested(*t))),
    st.text(max_size=100).map(Frame),
    st.binary(min_size=1, max_size=50).map(lambda b: Frame(b"\xff" + b, text_bytes=True)),
    st.sampled_from([8193, 30_000, TRANSPORT_CAP + 1, 100_000]).map(
        lambda n: Frame(pack({"type": "ping", "cid": "big", "pad": b"x" * n}))),
)
ROLES = st.sampled_from(["bidder", "viewer", "host", "fresh"])
# Run first, whatever the generator draws: one frame per decision the server must reach, so the
# coverage check below does not depend on timing (rate limits, closes) under a loaded CPU.
SEED_FRAMES = [
    Frame(pack({"type": "ping", "cid": "seed-pong"})),
    Frame(pack({"type": "bid", "cid": "seed-ack", "lot": "L1", "amount": 5000})),
    Frame(b"\xff\xfe", text_bytes=True),  # bad_frame
    Frame(b"\xc1"),  # bad_msgpack
    Frame(pack([1, 2])),  # not_a_map
    Frame(pack({"type": "ping", "cid": "seed-unknown", "zzz": 1})),  # unknown_field
    Frame(pack({"type": "bid", "cid": "seed-missing", "lot": "L1"})),  # missing_field
    Frame(pack({"type": "bid", "cid": "seed-type", "lot": "L1", "amount": "ten"})),  # wrong_type
    Frame(pack({"type": "bid", "cid": "seed-range", "lot": "L1", "amount": 1000,
                "key": "k" * 200})),  # invalid_field
    Frame(pack({"type": "ping", "cid": "seed-big", "pad": b"x" * 9000})),  # too_large
]


def bytearray_flip(data: bytes, at: int, value: int) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    out[at % len(out)] = value
    return bytes(out)


# --- the harness ---------------------------------------------------------------------------------

class LoopThread:
    """An event loop in a thread: hypothesis drives examples synchronously, sockets live here."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def check_message(msg: dict[str, Any]) -> None:
    assert msg.get("type") in SERVER_TYPES, msg
    if msg["type"] == "error":
        assert msg["code"] in ERROR_CODES, msg
        assert isinstance(msg["message"], str) and msg["message"], msg
        assert "cid" in msg and (msg["cid"] is None or p.valid_cid(msg["cid"]) == msg["cid"]), msg
        assert msg.get("for") is None or msg["for"] in p.SCHEMAS, msg
        if msg["code"] == "rate_limited":
            assert msg["retry_ms"] > 0, msg


@dataclass
class FuzzSocket:
    url: str
    role: str
    ws: Any = None
    closes: list[int] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    async def open(self) -> None:
        self.ws = await websockets.connect(self.url, max_size=None, close_timeout=2)
        if self.role != "fresh":
            token = {"bidder": AUTHORITY.mint(Role.BIDDER, "fuzz-b", "Fuzz"),
                     "host": AUTHORITY.mint(Role.HOST, "fuzz-h", "FuzzHost")}.get(self.role)
            await self.ws.send(pack({"type": "hello", "cid": "hello",
                                     **({"token": token} if token else {})}))
            await self.until("hello")

    async def until(self, cid: str) -> bool:
        """Read until the reply carrying `cid`; False if the server closed the socket first."""
        try:
            async with asyncio.timeout(10):
                while True:
                    for msg in p.decode_server_frame(await self.ws.recv()):
                        check_message(msg)
                        if msg["type"] in ("ack", "error", "pong"):
                            key = msg.get("code") or msg["type"]
                            self.counts[key] = self.counts.get(key, 0) + 1
                        if msg.get("cid") == cid and msg["type"] in (
                                "welcome", "pong", "error", "ack"):
                            return True
        except websockets.ConnectionClosed:
            code = self.ws.close_code
            assert code in CLOSE_CODES, f"undocumented close code {code}"
            self.closes.append(code)
            self.ws = None
            return False

    async def run(self, frames: list[Frame], sentinel: str) -> None:
        if self.ws is None:
            await self.open()
            if self.ws is None:
                return
        try:
            for frame in frames:
                if frame.text_bytes:
                    await self.ws.send(frame.data, text=True)
                elif frame.fragments > 1 and isinstance(frame.data, bytes) and frame.data:
                    step = max(1, len(frame.data) // frame.fragments)
                    await self.ws.send([frame.data[i:i + step]
                                        for i in range(0, len(frame.data), step)])
                else:
                    await self.ws.send(frame.data)
            await self.ws.send(pack({"type": "ping", "cid": sentinel}))
        except websockets.ConnectionClosed:
            pass
        await self.until(sentinel)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
            self.ws = None


@dataclass
class NormalPair:
    """A bidder whose bids must be acked and a watcher that must see each of them."""

    bidder: RoomClient
    watcher: RoomClient
    lot: str
    acked: list[dict[str, Any]] = field(default_factory=list)

    async def bid(self) -> None:
        price = self.watcher.state.lots[self.lot].get("price", 0)
        reply = await self.bidder.request("bid", lot=self.lot, amount=max(1000, price + 100),
                                          key=uuid.uuid4().hex)
        assert (reply["type"], reply.get("status")) == ("ack", "winning"), reply
        self.acked.append(reply)
        await self.watcher.wait_for(lambda s: s.offset >= reply["offset"])
        event = next(e for e in self.watcher.state.applied if e["offset"] == reply["offset"])
        assert (event["type"], event["bidder"], event["price"]) == ("bid", "normal",
                                                                    reply["price"])

    async def keep_bidding(self, rounds: int) -> None:
        for _ in range(rounds):
            await self.bid()
            await asyncio.sleep(0.4)


def stats(server: DevServerProcess) -> dict[str, Any]:
    with urllib.request.urlopen(server.url + "/interactive/stats", timeout=5) as resp:
        body: dict[str, Any] = json.loads(resp.read())
        return body


@pytest.fixture(scope="module")
def server(redis_server: RedisServer) -> Iterator[DevServerProcess]:
    with DevServerProcess(redis_server.url, "--ws-msg-rate", "300", "--ws-msg-burst", "600",
                          "--bid-rate", "50", "--bid-burst", "100",
                          jwt_secret=DEV_JWT_SECRET) as srv:
        yield srv


@pytest.mark.timeout(180)
def test_room_socket_fuzz(server: DevServerProcess) -> None:
    room, host_room = f"fz-{uuid.uuid4().hex[:8]}", f"fzh-{uuid.uuid4().hex[:8]}"
    base = server.url.replace("http://", "ws://")
    runner = LoopThread()
    try:
        host = RoomClient(server.url, room, AUTHORITY.mint(Role.HOST, "host", "Host"))
        bidder = RoomClient(server.url, room, AUTHORITY.mint(Role.BIDDER, "normal", "Normal"))
        watcher = RoomClient(server.url, room)
        for normal in (host, bidder, watcher):
            normal.state = ChatState()  # the fuzz's chat/moderation events reach them too

        async def setup() -> NormalPair:
            for client in (host, bidder, watcher):
                await client.connect()
            lot = {"title": "Lot", "start_price": 1000, "increments": [[0, 100]],
                   "duration_ms": 3_600_000, "soft_close_ms": 0}
            ids = [(await host.request("lot_create", **lot))["lot"] for _ in range(4)]
            assert ids == ["L1", "L2", "L3", "L4"]
            for lot_id in ("L1", "L3", "L4"):
                await host.request("lot_open", lot=lot_id)
            await host.request("lot_close", lot="L3")
            await host.request("poll_open", question="?", options=["a", "b", "c"],
                               duration_ms=3_600_000)
            await watcher.wait_for(lambda s: "L4" in s.lots and "P1" in s.polls)
            return NormalPair(bidder, watcher, "L4")  # L4: not among the ids the fuzz favours

        pair = runner.run(setup())
        baseline = stats(server)["sockets"]
        sockets = {role: FuzzSocket(f"{base}/ws/{host_room if role == 'host' else room}", role)
                   for role in ("bidder", "viewer", "host")}
        background = asyncio.run_coroutine_threadsafe(pair.keep_bidding(12), runner.loop)
        sentinels = iter(range(10**9))
        fresh_closes: list[int] = []

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(role=ROLES, frames=st.lists(FRAMES, min_size=1, max_size=6))
        @example(role="bidder", frames=SEED_FRAMES[:5])
        @example(role="bidder", frames=SEED_FRAMES[5:])
        @example(role="fresh", frames=[Frame(pack({"type": "ping", "cid": "x", "pad": b"x" * 70_000}))])
        def example_run(role: str, frames: list[Frame]) -> None:
            sentinel = f"s{next(sentinels)}"
            if role == "fresh":
                sock = FuzzSocket(f"{base}/ws/{room}", "fresh")

                async def once() -> None:
                    await sock.run(frames, sentinel)
                    await sock.close()
                runner.run(once())
                fresh_closes.extend(sock.closes)
            else:
                runner.run(sockets[role].run(frames, sentinel))

        example_run()
        background.result(60)

        async def after() -> None:
            for sock in sockets.values():
                await sock.close()
            await pair.bid()  # still served after the run
            # The watcher's view equals a fresh snapshot: nothing was lost or reordered.
            fresh = RoomClient(server.url, room)
            await fresh.connect()
            await fresh.wait_for(lambda s: s.snapshots == 1)
            await pair.watcher.wait_for(lambda s: s.offset >= fresh.state.offset)
            assert fresh.state.lots == pair.watcher.state.lots
            assert fresh.state.lots["L4"]["leader"] == "normal"
            await fresh.close()
        runner.run(after())

        codes: dict[str, int] = {}
        for sock in sockets.values():
            for key, n in sock.counts.items():
                codes[key] = codes.get(key, 0) + n
        # The run reached the server's decisions, not only its frame checks.
        assert {"ack", "pong", "bad_frame", "bad_msgpack", "not_a_map", "unknown_field",
                "missing_field", "wrong_type", "invalid_field", "too_large"} <= set(codes), codes
        assert 1009 in [c for s in sockets.values() for c in s.closes] + fresh_closes
        assert len(pair.acked) == 13

        async def settle(expected: int) -> None:
            async with asyncio.timeout(10):
                while stats(server)["sockets"] != expected:
                    await asyncio.sleep(0.1)
        runner.run(settle(baseline))
        problems = [line for line in server.output if "Traceback" in line or "ERROR" in line
                    or "Exception" in line]
        assert not problems, "".join(server.output[-60:])

        async def teardown() -> None:
            for client in (host, bidder, watcher):
                await client.close()
        runner.run(teardown())
        runner.run(settle(baseline - 3))
        print("fuzz replies:", dict(sorted(codes.items())), "closes:",
              sorted({c for s in sockets.values() for c in s.closes} | set(fresh_closes)))
    finally:
        with contextlib.suppress(Exception):
            runner.close()
