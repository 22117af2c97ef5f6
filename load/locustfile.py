"""locust load test of the interactive WebSocket layer (docs/protocol.md), run headless.

Users:
* `WatcherUser` (anonymous): only receives. Per `events` frame it reports "WS events batch"
  (response time = receive time - newest event's `ts`, the server clock at the Redis Function call;
  response length = events in the batch) and counts events (printed as events/s at the end). One
  watcher in `--measure-every` (default 10) also reports "WS bid->viewer" for every `bid` event
  (receive time - the bidder's own send time, see below).
* `BidderUser` (bidder token): places bids on the benchmark lot at `--bid-rate-per-user` and reports
  "WS bid ack" (accepted), "WS bid rejected <code>" (a valid refusal, e.g. overtaken by another
  bid) and failures (anything else, timeouts, closes).
* `ChatterUser` (bidder token): posts chat messages at `--chat-rate-per-user` and reports
  "WS chat ack" (accepted), "WS chat refused <code>" (`rate_limited`, `slow_mode`: a valid
  refusal) and failures. Watchers measuring bids also report "WS chat->viewer" for every chat
  event (the message text starts with its send time, microseconds since 00:00 UTC today).

Bid -> viewer latency without a shared clock message: bidders set
`amount = 1000 + microseconds since 00:00 UTC today` (increment table [[0, 1]]), so every receiver
knows the bidder's wall-clock send time of every bid (same machine / NTP-synced hosts). Do not run
across midnight UTC (amounts would drop and be refused as too low).

Start a node first (Redis + one relay, stops by itself after --serve seconds):

    .venv/bin/python load/ws_bench.py --serve 120      # prints the URL and the JWT secret

then

    LOTCAST_JWT_SECRET=<secret> .venv/bin/locust -f load/locustfile.py --headless \\
        -u 200 -r 50 -t 30s --host http://127.0.0.1:<port> --bidders 20 --bid-rate-per-user 2 \
        --chatters 20 --chat-rate-per-user 0.5

locust (gevent, one blocking websocket-client per user) tops out at a few hundred sockets and a
few thousand events/s per process on this machine; use load/ws_bench.py for 10,000 watchers.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import gevent
import msgpack
import websocket  # websocket-client: plain blocking sockets, cooperative under gevent
from locust import User, events, task
from locust.env import Environment
from locust.exception import StopUser

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET

BASE_AMOUNT = 1000
ROOM_DEFAULT = "locust"
_state: dict[str, Any] = {"lot": None}
_ids = itertools.count(1)


def day_start_us() -> int:
    today = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return int(today.timestamp() * 1_000_000)


T0_US = day_start_us()


def bid_amount(now: float) -> int:
    return BASE_AMOUNT + int(now * 1_000_000) - T0_US


def bid_sent_at(amount: int) -> float:
    return (amount - BASE_AMOUNT + T0_US) / 1_000_000


@events.init_command_line_parser.add_listener
def _args(parser: Any) -> None:
    parser.add_argument("--room", default=ROOM_DEFAULT, help="room (stream id)")
    parser.add_argument("--bidders", type=int, default=10,
                        help="how many of the -u users are bidders (the rest watch)")
    parser.add_argument("--bid-rate-per-user", type=float, default=2.0,
                        help="bids/s per bidder (server limit: 5/s per user, burst 10)")
    parser.add_argument("--chatters", type=int, default=5,
                        help="how many of the -u users post chat (the rest watch)")
    parser.add_argument("--chat-rate-per-user", type=float, default=0.5,
                        help="messages/s per chatter (server default limit: 2/s per user, burst 5)")
    parser.add_argument("--chat-len", type=int, default=60, help="characters per message (<= 500)")
    parser.add_argument("--measure-every", type=int, default=10,
                        help="1 watcher in N reports every bid's bid->viewer latency")
    parser.add_argument("--jwt-secret", default=os.environ.get("LOTCAST_JWT_SECRET", DEV_JWT_SECRET),
                        help="the node's LOTCAST_JWT_SECRET (mints host and bidder tokens)")


def ws_url(host: str, room: str) -> str:
    return host.rstrip("/").replace("http://", "ws://").replace("https://", "wss://") + f"/ws/{room}"


def decode(frame: bytes) -> list[dict[str, Any]]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(frame)
    return list(unpacker)


def request(ws: websocket.WebSocket, cid: Any, within: float = 10.0, **msg: Any) -> dict[str, Any]:
    ws.send_binary(msgpack.packb({**msg, "cid": cid}))
    deadline = time.time() + within
    while time.time() < deadline:
        for reply in decode(ws.recv()):
            if reply.get("cid") == cid or (msg["type"] == "hello" and reply["type"] == "welcome"):
                return reply
    raise TimeoutError(f"no reply to {msg['type']}")


@events.test_start.add_listener
def _create_lot(environment: Environment, **_: Any) -> None:
    """One fresh open lot per test run (host token), shared by all users of this process."""
    opts = environment.parsed_options
    assert opts is not None and environment.host
    authority = TokenAuthority(opts.jwt_secret)
    ws = websocket.create_connection(ws_url(environment.host, opts.room), timeout=10)
    try:
        hello = request(ws, "h0", type="hello", token=authority.mint(Role.HOST, "locust-host"))
        if hello["type"] != "welcome":
            raise RuntimeError(f"host hello refused: {hello}")
        created = request(ws, "h1", type="lot_create", title="locust lot", start_price=BASE_AMOUNT,
                          increments=[[0, 1]], duration_ms=3_600_000, soft_close_ms=0)
        opened = request(ws, "h2", type="lot_open", lot=created["lot"])
        if opened["type"] != "ack":
            raise RuntimeError(f"lot_open failed: {opened}")
        _state["lot"] = created["lot"]
    finally:
        ws.close()


@events.init.add_listener
def _user_mix(environment: Environment, **_: Any) -> None:
    if environment.parsed_options is not None:
        BidderUser.fixed_count = environment.parsed_options.bidders
        ChatterUser.fixed_count = environment.parsed_options.chatters


def _fetch_node_stats(host: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{host}/interactive/stats", timeout=5) as resp:
        return dict(json.load(resp))


def _poll_node_stats(environment: Environment) -> None:
    """Every 2 s: the node's own counters; keeps the sample with the most sockets."""
    assert environment.host
    for _ in range(100_000):  # bounded; the greenlet is killed at test stop anyway
        try:
            body = _fetch_node_stats(environment.host)
        except OSError:
            body = {}
        if body.get("sockets", 0) >= _state.get("peak", {}).get("sockets", 0):
            _state["peak"] = body
        _state["last"] = body
        gevent.sleep(2.0)


@events.test_start.add_listener
def _start_polling(environment: Environment, **_: Any) -> None:
    _state["poller"] = gevent.spawn(_poll_node_stats, environment)
    _state["started"] = time.time()


@events.test_stop.add_listener
def _node_stats(environment: Environment, **_: Any) -> None:
    """Connected sockets per node (peak during the run), from the node's own counters."""
    poller = _state.get("poller")
    if poller is not None:
        poller.kill()
    started = _state.get("started")
    if started:
        took = time.time() - started
        print(f"log events delivered to watchers: {_state.get('events', 0):,} in {took:.0f} s = "
              f"{_state.get('events', 0) / took:,.0f} events/s (this locust process)", flush=True)
    peak, last = _state.get("peak", {}), _state.get("last", {})
    print(f"node {peak.get('node')}: peak connected sockets {peak.get('sockets')} "
          f"(by room {peak.get('by_room')}); slow_disconnects {last.get('slow_disconnects')}, "
          f"auth_failures {last.get('auth_failures')}, errors sent {last.get('errors')}, "
          f"hub {peak.get('hubs')}", flush=True)


class _WsUser(User):
    abstract = True
    role: Role | None = None

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        assert opts is not None and self.host
        self.opts = opts
        self.measure = next(_ids) % max(1, opts.measure_every) == 0
        start = time.time()
        hello: dict[str, Any] = {"type": "hello"}
        uid = f"locust-{os.getpid()}-{next(_ids)}"
        if self.role is not None:
            hello["token"] = TokenAuthority(opts.jwt_secret).mint(self.role, uid, uid)
        try:
            self.ws = websocket.create_connection(ws_url(self.host, opts.room), timeout=10)
            welcome = request(self.ws, 0, **hello)
            if welcome["type"] != "welcome":
                raise RuntimeError(f"hello refused: {welcome}")
        except Exception as exc:
            self._fire("WS connect", start, exc=exc)
            raise StopUser() from exc
        self._fire("WS connect", start)
        self.ws.settimeout(1.0)

    def on_stop(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()

    def _fire(self, name: str, start: float, length: int = 0, exc: Exception | None = None,
              rt_ms: float | None = None) -> None:
        self.environment.events.request.fire(
            request_type="WS", name=name, response_length=length, exception=exc, context={},
            response_time=rt_ms if rt_ms is not None else (time.time() - start) * 1000)

    def _consume(self, frame: bytes) -> list[dict[str, Any]]:
        """Count and time the log events in a server frame; return the other maps.

        Every watcher reports one "WS events batch" per frame (latency of the newest event from its
        server `ts`) and counts events; one watcher in `--measure-every` also reports
        "WS bid->viewer" for every bid (all watchers get the same batches, so the sample is
        unbiased, and locust's own per-sample cost stays below the node's).
        """
        now = time.time()
        rest = []
        for msg in decode(frame):
            if msg.get("type") != "events" or msg.get("replay") or not self.deliveries:
                rest.append(msg)
                continue
            evs = msg["events"]
            _state["events"] = _state.get("events", 0) + len(evs)
            if evs:
                self._fire("WS events batch", 0, length=len(evs),
                           rt_ms=max(0.0, now * 1000 - evs[-1]["ts"]))
            if self.measure:
                for ev in evs:
                    if ev["type"] == "bid":
                        self._fire("WS bid->viewer", 0,
                                   rt_ms=max(0.0, (now - bid_sent_at(ev["amount"])) * 1000))
                    elif ev["type"] == "chat":
                        head = str(ev.get("text", "")).split(" ", 1)[0]
                        if head.isdigit():
                            sent = (int(head) + T0_US) / 1_000_000
                            self._fire("WS chat->viewer", 0, rt_ms=max(0.0, (now - sent) * 1000))
        return rest

    deliveries = True

    def _recv(self) -> bytes | None:
        try:
            data = self.ws.recv()
        except websocket.WebSocketTimeoutException:
            return None
        except (websocket.WebSocketConnectionClosedException, OSError) as exc:
            self._fire("WS closed", time.time(), exc=exc)
            raise StopUser() from exc
        if not isinstance(data, bytes):
            self._fire("WS text frame", time.time(), exc=RuntimeError("unexpected text frame"))
            return None
        return data


class WatcherUser(_WsUser):
    weight = 1

    @task
    def watch(self) -> None:
        frame = self._recv()
        if frame is not None:
            for msg in self._consume(frame):
                if msg.get("type") == "error":
                    self._fire("WS error", time.time(), exc=RuntimeError(str(msg.get("code"))))


class BidderUser(_WsUser):
    role = Role.BIDDER
    fixed_count = 10
    deliveries = False  # watchers report deliveries; bidders only their acks

    def on_start(self) -> None:
        super().on_start()
        self.cids = itertools.count(1)
        self.next_at = time.time() + 1.0 / self.opts.bid_rate_per_user * (next(_ids) % 7) / 7

    @task
    def bid(self) -> None:
        gevent.sleep(max(0.0, self.next_at - time.time()))
        self.next_at = max(self.next_at + 1.0 / self.opts.bid_rate_per_user, time.time() - 1.0)
        cid = next(self.cids)
        sent = time.time()
        self.ws.send_binary(msgpack.packb({"type": "bid", "cid": cid, "lot": _state["lot"],
                                           "amount": bid_amount(sent)}))
        while time.time() - sent < 10:
            frame = self._recv()
            if frame is None:
                continue
            for msg in self._consume(frame):
                if msg.get("cid") != cid:
                    continue
                if msg["type"] == "ack":
                    self._fire("WS bid ack", sent)
                elif msg["code"] in ("bid_too_low", "rate_limited"):
                    self._fire(f"WS bid rejected {msg['code']}", sent)
                else:
                    self._fire("WS bid ack", sent, exc=RuntimeError(msg["code"]))
                return
        self._fire("WS bid ack", sent, exc=TimeoutError("no reply in 10 s"))


CHAT_FILLER = ("is the clasp original? looks great, what size is it, shipping to Lyon? "
               "love this one, how old is it, any scratches on the back? ") * 8


class ChatterUser(_WsUser):
    role = Role.BIDDER
    fixed_count = 5
    deliveries = False  # watchers report deliveries; chatters only their acks

    def on_start(self) -> None:
        super().on_start()
        self.cids = itertools.count(1)
        period = 1.0 / self.opts.chat_rate_per_user
        self.next_at = time.time() + period * (next(_ids) % 7) / 7

    @task
    def chat(self) -> None:
        gevent.sleep(max(0.0, self.next_at - time.time()))
        self.next_at = max(self.next_at + 1.0 / self.opts.chat_rate_per_user, time.time() - 1.0)
        cid = next(self.cids)
        sent = time.time()
        head = f"{int(sent * 1_000_000) - T0_US} "
        text = head + CHAT_FILLER[:max(1, min(500, self.opts.chat_len) - len(head))]
        self.ws.send_binary(msgpack.packb({"type": "chat", "cid": cid, "text": text}))
        while time.time() - sent < 10:
            frame = self._recv()
            if frame is None:
                continue
            for msg in self._consume(frame):
                if msg.get("cid") != cid:
                    continue
                if msg["type"] == "ack":
                    self._fire("WS chat ack", sent)
                elif msg["code"] in ("rate_limited", "slow_mode"):
                    self._fire(f"WS chat refused {msg['code']}", sent)
                else:
                    self._fire("WS chat ack", sent, exc=RuntimeError(msg["code"]))
                return
        self._fire("WS chat ack", sent, exc=TimeoutError("no reply in 10 s"))
