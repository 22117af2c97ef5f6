"""Lean asyncio load client for the interactive WebSocket layer (docs/protocol.md).

locust (gevent, one greenlet + one websocket client per user) cannot hold 10,000 sockets on a
2-core machine, so this tool drives the big runs. It starts its own Redis (AOF, the production
durability config) and one relay (`lotcast relay --port 0`), or uses `--url`, then:

* a host connection creates and opens one lot (increment 1 cent, 1 h, no soft close);
* W watchers (anonymous) connect in batches over several worker processes (uvloop);
* B bidders place R bids/s in total, round-robin (each bidder stays under the per-user limit);
* C chatters (bidder tokens) post M chat messages/s in total during the `chat` phases;
* it measures the phases given by --phases (default `bids,chat,bids`, each --seconds long) one
  after the other on the same sockets, so "with chat" is compared with "without chat" in the same
  run, and the two `bids` windows show how much the figures move without any change (the noise);
  then it prints the figures per phase and stops everything it started.

Measuring without being the bottleneck
--------------------------------------
Watchers use `websockets`' sans-I/O ClientProtocol for the opening handshake and `hello`, then
parse the (unmasked) server frames themselves: one header check per frame. The server encodes each
batch once and sends the same bytes to every socket, so a worker decodes each distinct frame once
and only appends the receive time for every other copy. Bidders use the regular
`websockets.asyncio` client.

Latency sources:
* bid ack: the bidder's send time -> the `ack`/`error` with its cid;
* bid -> watcher: every `bid` event carries `amount`; bidders encode their wall-clock send time in
  the amount (amount = 1000 + microseconds since the run's t0, increment table [[0, 1]]), so any
  watcher in any process knows the bidder's send time of every bid it receives. This is end to end
  (client send -> Redis Function -> pub/sub -> hub batch -> every socket). The event's own `ts`
  (server time of the Function call, ms) gives the server-side part too.
  Time-ordered amounts also make almost every bid valid (only bids overtaken in flight by a later
  one are `bid_too_low`).
* chat -> watcher: the same trick; each bench message's text starts with the microseconds since
  t0 of its send time, so every watcher's receive time of every chat event is recorded (all
  watchers, no sampling: a frame is decoded once per worker and each copy costs one float).
* frames per socket: each watcher (and bidder/chatter) counts its frames per 1 s of the run;
  printed are the mean, the busiest socket's average and the most frames any socket got in any
  one second, against the batch rate 1000 / ws_flush_interval_ms.
* where an ack waits: the node's bid received -> ack written histogram (/metrics), its event-loop
  lag (how late the hub's batch timer fired), Redis's FCALL run time (INFO commandstats), and
  the acks of a few probe bidders plus a Redis PING on an idle loop in this process (--probe-rate):
  set against the load client's acks, they separate the client's loop, the node and Redis.
* fan-out CPU split (the hub's thread-CPU counters, not sampled): the per-socket eligibility
  check and the native send, per socket / per write and as shares of the relay's CPU, and the
  fan-out alone per frame against the C floor.
* CPU per phase (relay, Redis, the load client's processes, everything else on the machine) from
  /proc at the phase boundaries; relay CPU / frames delivered to all sockets = CPU per frame.
  If the load client's CPU or loop lag is high, the client, not the server, was the limit.

    .venv/bin/python load/ws_bench.py --watchers 100 --seconds 10
    .venv/bin/python load/ws_bench.py --watchers 10000 --bid-rate 200 --seconds 30 --profile
    .venv/bin/python load/ws_bench.py --watchers 2000 --bid-rate 200 --chatters 100 \
        --chat-rate 50 --phases bids,chat,bids --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import json
import multiprocessing as mp
import os
import queue
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgpack
import numpy as np
import psutil
import websockets
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lotcast.auth import Role, TokenAuthority
from lotcast.interactive.client import RoomClient

PROBE_BIDDERS = 4  # AckProbe: at 10 bids/s in total each stays under the per-user limit
BASE_AMOUNT = 1000  # start price; amount = BASE_AMOUNT + microseconds since t0
EDGES = np.concatenate(([0.0], np.logspace(-5, 2, 1401)))  # seconds, 10 us .. 100 s (~1.2 %)


# --- histogram helpers -------------------------------------------------------------------------

def hist(values: np.ndarray) -> np.ndarray:
    counts, _ = np.histogram(np.clip(values, 0.0, EDGES[-1] * 0.999), bins=EDGES)
    return counts.astype(np.int64)


def pct(counts: np.ndarray, qs: tuple[float, ...] = (50, 95, 99, 99.9)) -> dict[str, float]:
    total = int(counts.sum())
    out: dict[str, float] = {"n": float(total)}
    if total == 0:
        return out
    cum = np.cumsum(counts)
    for q in qs:
        i = int(np.searchsorted(cum, total * q / 100.0))
        out[f"p{q:g}"] = EDGES[min(i + 1, len(EDGES) - 1)] * 1000.0  # upper bin edge, ms
    nz = np.nonzero(counts)[0]
    out["max"] = EDGES[nz[-1] + 1] * 1000.0
    return out


def fmt(p: dict[str, float]) -> str:
    if not p.get("n"):
        return "n=0"
    return (f"p50 {p['p50']:8.2f} ms  p95 {p['p95']:8.2f} ms  p99 {p['p99']:8.2f} ms  "
            f"p99.9 {p['p99.9']:8.2f} ms  max {p['max']:8.1f} ms  (n={int(p['n']):,})")


# --- watcher: sans-I/O handshake, then a minimal frame parser ---------------------------------

class Sink:
    """Per worker: decodes each distinct server frame once, stores receive times of every copy."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.recording = False
        self.times: dict[bytes, array[float]] = {}
        self.info: dict[bytes, dict[str, Any]] = {}
        self.other_frames = 0
        self.bytes = 0
        self.win_start = 0.0  # per-socket frame counts: 1 s buckets from here (set at start)
        self.nsec = 0

    def frame(self, payload: bytes, now: float) -> None:
        self.bytes += len(payload)
        if not self.recording:
            self.other_frames += 1
            return
        times = self.times.get(payload)
        if times is None:
            times = self.times[payload] = array("d")
            self.info[payload] = self._decode(payload)
        times.append(now)

    def _decode(self, payload: bytes) -> dict[str, Any]:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(payload)
        bids: list[tuple[int, float, float]] = []  # (offset, client send time, server ts)
        chats: list[tuple[int, float, float]] = []  # the same for bench chat messages
        events = 0
        kinds: list[str] = []
        for msg in unpacker:
            kinds.append(msg.get("type", "?"))
            if msg.get("type") != "events" or msg.get("replay"):
                continue
            for ev in msg["events"]:
                events += 1
                kind = ev.get("type")
                if kind == "bid":
                    sent = self.t0 + (ev["amount"] - BASE_AMOUNT) / 1e6
                    bids.append((ev["offset"], sent, ev["ts"] / 1000.0))
                elif kind == "chat":
                    head = str(ev.get("text", "")).split(" ", 1)[0]
                    if head.isdigit():  # bench messages start with microseconds since t0
                        chats.append((ev["offset"], self.t0 + int(head) / 1e6, ev["ts"] / 1000.0))
        return {"bids": bids, "chats": chats, "events": events, "kinds": kinds}


class Watcher(asyncio.Protocol):
    def __init__(self, url: str, sink: Sink, stats: Counter[str]) -> None:
        self.proto = ClientProtocol(parse_uri(url))
        self.sink = sink
        self.stats = stats
        self.transport: Any = None
        self.fast = False
        self.buf = b""
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.closing = False
        self.buckets: array[int] | None = None  # frames received per 1 s of the measured run

    def connection_made(self, transport: Any) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport subclasses
        self.proto.send_request(self.proto.connect())
        self._flush_proto()

    def _flush_proto(self) -> None:
        assert self.transport is not None
        for chunk in self.proto.data_to_send():
            if chunk:
                self.transport.write(chunk)

    def data_received(self, data: bytes) -> None:
        if self.fast:
            self._frames(data)
            return
        self.proto.receive_data(data)
        self.proto.events_received()
        if self.proto.handshake_exc is not None:
            self._fail(f"handshake: {self.proto.handshake_exc!r}")
            return
        if self.proto.state is State.OPEN:
            # The server sends nothing before our hello, so no frame bytes are buffered yet.
            self.proto.send_binary(msgpack.packb({"type": "hello", "cid": 1}))
            self._flush_proto()
            self.fast = True

    def _frames(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        now = time.time()
        pos, end = 0, len(data)
        while end - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if end - pos < 4:
                    break
                length, head = int.from_bytes(data[pos + 2:pos + 4], "big"), 4
            elif length == 127:
                if end - pos < 10:
                    break
                length, head = int.from_bytes(data[pos + 2:pos + 10], "big"), 10
            stop = pos + head + length
            if stop > end:
                break
            if b0 == 0x82:  # FIN + binary: the only data frame this server sends
                payload = data[pos + head:stop]
                if not self.ready.done():
                    self.ready.set_result(None)  # welcome arrived
                self.sink.frame(payload, now)
                if self.buckets is not None:
                    since = now - self.sink.win_start
                    if 0.0 <= since < self.sink.nsec:
                        self.buckets[int(since)] += 1
            else:
                self._control(b0 & 0x0F, data[pos + head:stop])
            pos = stop
        if pos < end:
            self.buf = data[pos:]

    def _control(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        if opcode == Opcode.PING:
            self.transport.write(Frame(Opcode.PONG, payload).serialize(mask=True))
        elif opcode == Opcode.CLOSE:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.stats[f"close_{self.close_code}"] += 1
            self.transport.write(Frame(Opcode.CLOSE, payload[:2]).serialize(mask=True))
            self.transport.close()
        elif opcode != Opcode.PONG:
            self.stats[f"unexpected_opcode_{opcode}"] += 1

    def _fail(self, why: str) -> None:
        self.stats["handshake_failed"] += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.stats["disconnects"] += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"lost before welcome: {exc!r}"))

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(Frame(Opcode.CLOSE, (1000).to_bytes(2, "big")).serialize(mask=True))
            self.transport.close()


# --- bidders and chatters: the regular websockets client -------------------------------------

CHAT_FILLER = ("is the clasp original? looks great, what size is it, shipping to Lyon? "
               "love this one, how old is it, any scratches on the back? ") * 8


class Bidder:
    """A signed-in socket that sends `bid`s or `chat`s and times their ack / error."""

    def __init__(self, url: str, token: str, lot: str, stats: Counter[str], sink: Sink) -> None:
        self.url, self.token, self.lot, self.stats, self.sink = url, token, lot, stats, sink
        self.ws: Any = None
        self.sent: dict[int, tuple[str, float]] = {}  # cid -> (kind, send time)
        self.cids = itertools.count(2)
        # kind -> (send time, latency) of acked / refused requests
        self.acks: dict[str, list[tuple[float, float]]] = {"bid": [], "chat": []}
        self.rejects: dict[str, list[tuple[float, float]]] = {"bid": [], "chat": []}
        self.welcome = asyncio.get_running_loop().create_future()
        self.reader: asyncio.Task[None] | None = None
        self.buckets: array[int] | None = None

    async def connect(self) -> None:
        self.ws = await websockets.connect(self.url, max_size=None, compression=None,
                                           ping_interval=None, open_timeout=20)
        self.reader = asyncio.create_task(self._read())
        await self.ws.send(msgpack.packb({"type": "hello", "cid": 1, "token": self.token}))
        await asyncio.wait_for(self.welcome, 20)

    async def _send(self, kind: str, msg: dict[str, Any], now: float) -> None:
        cid = next(self.cids)
        self.sent[cid] = (kind, now)
        try:
            await self.ws.send(msgpack.packb({**msg, "cid": cid}))
        except websockets.ConnectionClosed:
            self.stats[f"{kind}_send_failed"] += 1

    async def bid(self, t0: float) -> None:
        now = time.time()
        await self._send("bid", {"type": "bid", "lot": self.lot,
                                 "amount": BASE_AMOUNT + int((now - t0) * 1e6)}, now)

    async def chat(self, t0: float, length: int) -> None:
        now = time.time()
        head = f"{int((now - t0) * 1e6)} "
        await self._send("chat", {"type": "chat",
                                  "text": head + CHAT_FILLER[:max(1, length - len(head))]}, now)

    async def _read(self) -> None:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        try:
            async for frame in self.ws:
                now = time.time()
                if self.buckets is not None:
                    since = now - self.sink.win_start
                    if 0.0 <= since < self.sink.nsec:
                        self.buckets[int(since)] += 1
                unpacker.feed(frame)
                for msg in unpacker:
                    kind = msg.get("type")
                    if kind == "welcome" and not self.welcome.done():
                        self.welcome.set_result(msg)
                    elif kind in ("ack", "error"):
                        entry = self.sent.pop(msg.get("cid"), None)
                        if entry is None:
                            continue
                        what, sent = entry
                        if kind == "ack":
                            self.acks[what].append((sent, now - sent))
                        else:
                            self.rejects[what].append((sent, now - sent))
                            self.stats[f"{what}_error_{msg.get('code')}"] += 1
        except websockets.ConnectionClosed:
            pass
        finally:
            code = self.ws.close_code
            if code not in (None, 1000):
                self.stats[f"bidder_close_{code}"] += 1

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 2)
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader


# --- worker process ----------------------------------------------------------------------------

async def _worker_main(cfg: dict[str, Any], out: Any, ctrl: Any) -> None:
    stats: Counter[str] = Counter()
    sink = Sink(cfg["t0"])
    loop = asyncio.get_running_loop()
    parts = urlsplit(cfg["ws_url"])
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    watchers: list[Watcher] = []
    ramp_started = time.monotonic()

    async def connect(w: Watcher, ok: list[Watcher]) -> None:
        try:
            await asyncio.wait_for(loop.create_connection(lambda: w, host, port),
                                   cfg["connect_timeout"])
            await asyncio.wait_for(asyncio.shield(w.ready), cfg["connect_timeout"])
            ok.append(w)
        except (OSError, TimeoutError, ConnectionError) as exc:
            stats[f"connect_failed_{type(exc).__name__}"] += 1
            w.close()

    # Failed connects (e.g. close 1011 when the node's Redis pool is exhausted) are retried, as a
    # real client would, within 3x the watcher count of attempts and the ramp timeout.
    attempts = 0
    while len(watchers) < cfg["watchers"] and attempts < 3 * cfg["watchers"]:
        if time.monotonic() - ramp_started > cfg["ramp_timeout"]:
            stats["ramp_timeout"] += 1
            break
        batch = [Watcher(cfg["ws_url"], sink, stats)
                 for _ in range(min(cfg["ramp_batch"], cfg["watchers"] - len(watchers)))]
        attempts += len(batch)
        ok: list[Watcher] = []
        await asyncio.gather(*(connect(w, ok) for w in batch))
        watchers.extend(ok)
        if len(ok) < len(batch):
            await asyncio.sleep(0.5)  # back off a little before retrying
    ramp_s = time.monotonic() - ramp_started
    async def join(tokens: list[str]) -> list[Bidder]:
        joined = [Bidder(cfg["ws_url"], tok, cfg["lot"], stats, sink) for tok in tokens]
        for b in joined:
            try:
                await b.connect()
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                stats[f"bidder_connect_failed_{type(exc).__name__}"] += 1
        return [b for b in joined if b.welcome.done()]

    bidders = await join(cfg["tokens"])
    chatters = await join(cfg["chat_tokens"])
    out.put(("ready", cfg["index"], len(watchers), len(bidders) + len(chatters), ramp_s))
    try:
        start_at = await loop.run_in_executor(None, ctrl.get, True, cfg["ctrl_timeout"])
    except queue.Empty:
        start_at = None
    if start_at is None:
        out.put(("result", cfg["index"], {"stats": dict(stats), "aborted": True}))
        return
    t0, warm, dur, drain = cfg["t0"], cfg["warmup"], cfg["seconds"], cfg["drain"]
    phases = [(name, start_at + i * dur, start_at + (i + 1) * dur)
              for i, name in enumerate(cfg["phases"])]
    bid_from, end = start_at - warm, phases[-1][2]
    sink.win_start, sink.nsec = start_at, round(end - start_at)
    for w in watchers:
        w.buckets = array("I", bytes(4 * sink.nsec))
    for b in bidders + chatters:
        b.buckets = array("I", bytes(4 * sink.nsec))
    lag: list[tuple[float, float]] = []  # (when, lag)

    async def probe() -> None:  # event loop lag of this worker (client-side measurement error)
        while time.time() < end + drain:
            t = loop.time()
            await asyncio.sleep(0.05)
            lag.append((time.time(), loop.time() - t - 0.05))

    async def paced(senders: list[Bidder], rate: float, frm: float, until: float,
                    send: Any) -> None:
        """Send at `rate`/s in total, round-robin over `senders`, from `frm` until `until`."""
        if not senders or rate <= 0:
            return
        await asyncio.sleep(max(0.0, frm - time.time()))
        interval = 1.0 / rate
        nxt = time.time()
        for i in itertools.count():
            if nxt >= until:
                return
            await send(senders[i % len(senders)])
            nxt += interval
            delay = nxt - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.5:  # fell far behind: do not burst to catch up
                stats["schedule_slip"] += 1
                nxt = time.time()

    async def bid_loop() -> None:
        await paced(bidders, cfg["bid_rate"], bid_from, end, lambda b: b.bid(t0))

    async def chat_loop() -> None:
        for name, p_start, p_end in phases:
            if name == "chat":
                await paced(chatters, cfg["chat_rate"], p_start, p_end,
                            lambda b: b.chat(t0, cfg["chat_len"]))

    await asyncio.sleep(max(0.0, bid_from - time.time() - 0.2))
    sink.recording = True
    cpu_marks: list[float] = []

    async def cpu_mark() -> None:  # this process's CPU at each phase boundary
        for at in [start_at] + [p[2] for p in phases]:
            await asyncio.sleep(max(0.0, at - time.time()))
            c = psutil.Process().cpu_times()
            cpu_marks.append(c.user + c.system)

    await asyncio.gather(bid_loop(), chat_loop(), probe(), cpu_mark())
    await asyncio.sleep(max(0.0, end + drain - time.time()))
    sink.recording = False
    connected_at_end = sum(1 for w in watchers if w.close_code is None and w.transport is not None
                           and not w.transport.is_closing())
    for w in watchers:
        w.close()
    await asyncio.gather(*(b.close() for b in bidders + chatters))
    result = {"stats": dict(stats), "watchers": len(watchers),
              "connected_at_end": connected_at_end, "phases": {}}
    for i, (name, p_start, p_end) in enumerate(phases):
        key = f"{i}:{name}"
        lags = [x for t, x in lag if p_start <= t < p_end]
        res = _analyse(sink, bidders + chatters, watchers, p_start, p_end, start_at)
        res["lag_p99_ms"] = float(np.percentile(lags, 99) * 1000) if lags else 0.0
        res["lag_max_ms"] = float(max(lags) * 1000) if lags else 0.0
        res["cpu_s"] = cpu_marks[i + 1] - cpu_marks[i] if len(cpu_marks) > i + 1 else 0.0
        result["phases"][key] = res
    out.put(("result", cfg["index"], result))
    await asyncio.sleep(0.2)


def _analyse(sink: Sink, talkers: list[Bidder], watchers: list[Watcher], start: float,
             end: float, win_start: float) -> dict[str, Any]:
    """The figures of one phase [start, end): requests by send time, frames by receive time."""
    zeros = np.zeros(len(EDGES) - 1, np.int64)
    deliver, server_part, chat_deliver, chat_server = (zeros.copy() for _ in range(4))
    per_offset: dict[int, list[float]] = {}  # bid offset -> [send, max recv, receipts]
    per_chat: dict[int, list[float]] = {}  # the same for chat messages
    frames = events = frame_bytes = 0
    kinds: Counter[str] = Counter()
    for payload, times in sink.times.items():
        info = sink.info[payload]
        recv = np.frombuffer(times, dtype=np.float64)
        in_window = int(((recv >= start) & (recv < end)).sum())
        frames += in_window
        frame_bytes += in_window * len(payload)
        events += in_window * info["events"]
        if in_window:
            kinds["+".join(sorted(set(info["kinds"])))] += in_window
        for key, hists, per in (("bids", (deliver, server_part), per_offset),
                                ("chats", (chat_deliver, chat_server), per_chat)):
            items = [b for b in info[key] if start <= b[1] < end]
            if not items:
                continue
            sent = np.array([b[1] for b in items])
            ts = np.array([b[2] for b in items])
            hists[0][:] += hist((recv[:, None] - sent[None, :]).ravel())
            hists[1][:] += hist((recv[:, None] - ts[None, :]).ravel())
            last = float(recv.max())
            for offset, send, _ in items:
                slot = per.setdefault(offset, [send, last, 0])
                slot[1] = max(slot[1], last)
                slot[2] += len(recv)
    lo, hi = round(start - win_start), round(end - win_start)
    per_socket = np.array([sum(w.buckets[lo:hi]) for w in watchers if w.buckets is not None],
                          dtype=np.float64) / max(1, hi - lo)
    peak_second = max((max(w.buckets[lo:hi]) for w in watchers
                       if w.buckets is not None and hi > lo), default=0)
    talker_frames = sum(sum(b.buckets[lo:hi]) for b in talkers if b.buckets is not None)
    out: dict[str, Any] = {
        "deliver_hist": deliver, "server_hist": server_part, "per_offset": per_offset,
        "chat_hist": chat_deliver, "chat_server_hist": chat_server, "per_chat": per_chat,
        "frames": frames, "frame_bytes": frame_bytes, "talker_frames": talker_frames,
        "events": events,
        "kinds": dict(kinds), "socket_fps_sum": float(per_socket.sum()),
        "socket_fps_max": float(per_socket.max()) if len(per_socket) else 0.0,
        "socket_peak_second": int(peak_second),
    }
    for what in ("bid", "chat"):
        acks = [a for b in talkers for a in b.acks[what] if start <= a[0] < end]
        rejects = [a for b in talkers for a in b.rejects[what] if start <= a[0] < end]
        out[f"{what}_ack_hist"] = hist(np.array([a[1] for a in acks]))
        out[f"{what}_reject_hist"] = hist(np.array([a[1] for a in rejects]))
        out[f"{what}_acks"], out[f"{what}_rejects"] = len(acks), len(rejects)
        out[f"{what}_unanswered"] = sum(1 for b in talkers for k, t in b.sent.values()
                                        if k == what and start <= t < end)
    return out


def worker_entry(cfg: dict[str, Any], out: Any, ctrl: Any) -> None:
    raise_nofile()
    try:
        import uvloop

        uvloop.run(_worker_main(cfg, out, ctrl))
    except ImportError:
        asyncio.run(_worker_main(cfg, out, ctrl))


# --- orchestration -----------------------------------------------------------------------------

def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


async def setup_lot(http_url: str, room: str, host_token: str) -> str:
    host = RoomClient(http_url, room, host_token)
    await host.connect()
    try:
        created = await host.request(
            "lot_create", title="bench lot", start_price=BASE_AMOUNT, increments=[[0, 1]],
            duration_ms=3_600_000, soft_close_ms=0)
        if created["type"] != "ack":
            raise RuntimeError(f"lot_create failed: {created}")
        opened = await host.request("lot_open", lot=created["lot"])
        if opened["type"] != "ack":
            raise RuntimeError(f"lot_open failed: {opened}")
        return str(created["lot"])
    finally:
        await host.close()


def server_stats(http_url: str, timeout: float = 20.0, redis_url: str = "",
                 metrics: bool = False) -> dict[str, Any]:
    """/interactive/stats, plus (keys starting with "_") Redis's FCALL counters (INFO
    commandstats) when `redis_url` is given and, with `metrics`, the node's bid-ack histogram
    from /metrics (a scrape costs the relay CPU: its media telemetry lists every socket)."""
    try:
        out = dict(httpx.get(f"{http_url}/interactive/stats", timeout=timeout).json())
    except (httpx.HTTPError, ValueError) as exc:
        return {"error": repr(exc)}
    if metrics:
        with contextlib.suppress(httpx.HTTPError):
            text = httpx.get(f"{http_url}/metrics", timeout=timeout).text
            out["_bid_ack_buckets"] = prom_buckets(text, "lotcast_bid_ack_latency_seconds")
    if redis_url:
        import redis as redis_sync

        with contextlib.suppress(Exception):
            client = redis_sync.Redis.from_url(redis_url, socket_timeout=timeout)
            stats = client.info("commandstats")
            client.close()
            fcall = stats.get("cmdstat_fcall") or {}
            out["_fcall"] = {"calls": int(fcall.get("calls", 0)),
                             "usec": float(fcall.get("usec", 0))}
    return out


def prom_buckets(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts of histogram `name` (summed over label sets), by upper bound."""
    out: dict[float, float] = {}
    prefix = name + "_bucket{"
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        labels, _, value = line[len(prefix):].rpartition("} ")
        le = next((part.split("=", 1)[1].strip('"') for part in labels.split(",")
                   if part.startswith("le=")), None)
        if le is None:
            continue
        bound = float("inf") if le == "+Inf" else float(le)
        out[bound] = out.get(bound, 0.0) + float(value)
    return out


def prom_pct(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """p50/p99 (bucket upper bounds, ms) of a cumulative histogram between two scrapes."""
    bounds = sorted(after)
    if not bounds:
        return {}
    cum = [after[b] - before.get(b, 0.0) for b in bounds]
    total = cum[-1]
    out: dict[str, float] = {"n": total}
    if total <= 0:
        return out
    for q in (50, 99):
        i = next(i for i, c in enumerate(cum) if c >= total * q / 100.0)
        out[f"p{q:g}"] = bounds[i] * 1000.0
    return out


class AckProbe:
    """A few extra bidders (and a Redis PING) on an asyncio loop in a thread of this process,
    which is otherwise idle during the windows: their ack latency is what a client whose own
    loop is not loaded sees. Set against the load client's acks (the same node, the same
    Redis), it says how much of the ack wait is the load client's own loop lag."""

    def __init__(self, ws_url: str, tokens: list[str], lot: str, rate: float, t0: float,
                 redis_url: str) -> None:
        self.ws_url, self.tokens, self.lot, self.rate, self.t0 = ws_url, tokens, lot, rate, t0
        self.redis_url = redis_url
        self.acks: list[tuple[float, float]] = []  # (send time, latency) of accepted bids
        self.pings: list[tuple[float, float]] = []  # (send time, Redis PING round trip)
        self.lag: list[tuple[float, float]] = []
        self.error = ""
        self._stop = False
        self._thread: Any = None

    def start(self) -> None:
        import threading

        self._thread = threading.Thread(target=self._entry, name="ack-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join(timeout=15)

    def _entry(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # reported, never fatal for the run
            self.error = repr(exc)

    async def _main(self) -> None:
        import redis.asyncio as aioredis

        stats: Counter[str] = Counter()
        sink = Sink(self.t0)
        bidders = [Bidder(self.ws_url, tok, self.lot, stats, sink) for tok in self.tokens]
        for b in bidders:
            await b.connect()
        redis = aioredis.Redis.from_url(self.redis_url) if self.redis_url else None
        loop = asyncio.get_running_loop()
        step = 1.0 / max(0.1, self.rate)
        nxt = loop.time()
        try:
            for i in itertools.count():
                if self._stop:
                    break
                nxt += step
                await bidders[i % len(bidders)].bid(self.t0)
                if redis is not None and i % 2 == 0:
                    sent = time.time()
                    await redis.ping()
                    self.pings.append((sent, time.time() - sent))
                late = loop.time() - nxt
                if late > 0:
                    self.lag.append((time.time(), late))
                await asyncio.sleep(max(0.0, nxt - loop.time()))
            await asyncio.sleep(0.5)
        finally:
            for b in bidders:
                self.acks += b.acks["bid"]
                await b.close()
            if redis is not None:
                await redis.aclose()

    def window(self, start: float, end: float) -> dict[str, Any]:
        acks = np.array([lat for sent, lat in self.acks if start <= sent < end])
        pings = np.array([rtt for sent, rtt in self.pings if start <= sent < end])
        return {"ack": pct(hist(acks)) if len(acks) else {},
                "redis_ping": pct(hist(pings)) if len(pings) else {}}


class CpuWatch:
    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {}
        for name, pid in pids.items():
            with contextlib.suppress(psutil.Error):
                self.procs[name] = psutil.Process(pid)
        self.start: dict[str, float] = {}
        self.samples: dict[str, list[float]] = {name: [] for name in self.procs}

    def _cpu(self, p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return 0.0

    @staticmethod
    def _schedstat(p: psutil.Process) -> tuple[int, int]:
        """(ns on CPU, ns runnable but waiting for a CPU) of the main thread, from the kernel."""
        try:
            run, wait, _ = Path(f"/proc/{p.pid}/schedstat").read_text().split()
            return int(run), int(wait)
        except (OSError, ValueError):
            return 0, 0

    def waits(self) -> dict[str, tuple[float, float]]:
        """Seconds on CPU and seconds waiting in the run queue since begin()."""
        out = {}
        for n, p in self.procs.items():
            run, wait = self._schedstat(p)
            run0, wait0 = self.sched0.get(n, (0, 0))
            out[n] = ((run - run0) / 1e9, (wait - wait0) / 1e9)
        return out

    @staticmethod
    def machine_busy() -> float:
        t = psutil.cpu_times()
        return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))

    def others(self) -> float:
        """CPU-seconds used since begin() by every process this benchmark did not start."""
        return self.machine_busy() - self.busy0 - sum(self.total().values())

    def begin(self) -> None:
        self.busy0 = self.machine_busy()
        self.sched0 = {n: self._schedstat(p) for n, p in self.procs.items()}
        self.start = {n: self._cpu(p) for n, p in self.procs.items()}
        self._last = dict(self.start)
        self._last_t = time.monotonic()

    def sample(self) -> None:
        now = time.monotonic()
        for n, p in self.procs.items():
            c = self._cpu(p)
            self.samples[n].append((c - self._last[n]) / max(1e-6, now - self._last_t))
            self._last[n] = c
        self._last_t = now

    def total(self) -> dict[str, float]:
        return {n: self._cpu(p) - self.start.get(n, 0.0) for n, p in self.procs.items()}


def wait_relay_settled(pid: int, limit_s: float, ramp_s: float) -> None:
    """Wait (at most limit_s) until the relay uses < 0.2 core over 2 s: the sockets are all
    connected, so what keeps it busy is the backlog of frames the joins caused (each join
    changes the viewer count, and each `viewers` frame goes to every socket)."""
    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return
    started = time.monotonic()
    while True:
        c0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
        time.sleep(2.0)
        used = (sum(proc.cpu_times()[:2]) - c0) / (time.monotonic() - t0)
        waited = time.monotonic() - started
        if used < 0.2 or waited > limit_s:
            print(f"relay {'settled' if used < 0.2 else 'still busy'} ({used:.2f} core) "
                  f"{waited:.0f} s after the ramp ({ramp_s:.0f} s) ended", flush=True)
            return


def wait_for_idle(limit_s: float, max_other_cores: float) -> None:
    """Wait (at most limit_s) for a 2 s window in which the whole machine uses < max_other_cores.

    The benchmark's own processes are idle here (connected, not yet bidding), so the busy CPU is
    almost all other tenants'."""
    deadline = time.monotonic() + limit_s
    while True:
        b0, t0 = CpuWatch.machine_busy(), time.monotonic()
        time.sleep(2.0)
        busy = (CpuWatch.machine_busy() - b0) / (time.monotonic() - t0)
        if busy < max_other_cores or time.monotonic() > deadline:
            print(f"machine busy {busy:.2f} cores just before the window "
                  f"({'ok' if busy < max_other_cores else 'gave up waiting'})", flush=True)
            return


def start_profile(pid: int, seconds: float, path: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        print("py-spy not found (.venv/bin/pip install py-spy); no profile", file=sys.stderr)
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                             "--rate", "100", "--format", "raw", "--nonblocking", "-o", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


HOT_PATH = (  # (label, function names in the stack); the first match counts
    ("per socket: eligibility check for the native write (native_fd/idle_fd)",
     ("native_fd", "idle_fd")),
    ("per socket: short write's rest to the transport (native_rest)", ("native_rest",)),
    ("per socket: push to a busy socket's outbox / direct write (fallback path)",
     ("ClientSession.push", "Outbox.push", "DirectSocket.__call__")),
    ("per socket: outbox sender task wake-ups (Outbox._run)", ("Outbox._run",)),
    ("per batch: the native send call (kernel work, GIL released; on the told path also the "
     "C check of each ready socket's transport) and its loop",
     ("deliver_native", "deliver_slots")),
    ("per batch: msgpack encode + framing (protocol encode_*, framed)",
     ("encode_events", "encode_viewers", "encode_tally", "_framed")),
    ("per batch: hub bookkeeping (_broadcast, _flush, _fanout_step itself)",
     ("RoomHub._broadcast", "RoomHub._flush", "RoomHub._fanout_step")),
)


def hot_path(path: Path) -> dict[str, int]:
    """Samples per HOT_PATH label: what the fan-out spends per socket and per batch."""
    counts = {label: 0 for label, _ in HOT_PATH}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        names = [frame.split(" (", 1)[0] for frame in stack.split(";")]
        for label, keys in HOT_PATH:
            if any(name.endswith(key) or name == key for name in names for key in keys):
                counts[label] += int(count)
                break
    return counts


def summarise_profile(path: Path, top: int = 18) -> list[str]:
    """py-spy raw (collapsed) stacks -> share of samples by leaf function and by module area."""
    if not path.exists():
        return ["(no profile written)"]
    leaf: Counter[str] = Counter()
    area: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf[frames[-1]] += n
        inner = " ".join(frames)
        for key, label in (("hub.py", "RoomHub fan-out (push to outboxes)"),
                           ("outbox.py", "outbox.py (Outbox, DirectSocket: per-socket writes)"),
                           ("starlette/websockets", "Starlette WebSocket send/receive"),
                           ("uvicorn/protocols/websockets", "uvicorn websocket protocol"),
                           ("websockets/", "websockets library (frames)"),
                           ("asyncio/base_events.py", "asyncio loop machinery"),
                           ("redis/", "redis client"), ("session.py", "ClientSession")):
            if key in inner:
                area[label] += n
    if total == 0:
        return ["(empty profile)"]
    lines = [f"py-spy: {total} samples; inclusive share by area (overlapping):"]
    lines += [f"  {100 * n / total:5.1f}%  {label}" for label, n in area.most_common()]
    lines.append("fan-out hot path, per socket vs per batch (issue 9 item 4; inclusive):")
    lines += [f"  {100 * n / total:5.1f}%  {label}" for label, n in hot_path(path).items()]
    lines.append("self time by leaf function:")
    lines += [f"  {100 * n / total:5.1f}%  {name[:110]}" for name, n in leaf.most_common(top)]
    return lines


# --- the kernel floor (load/ws_floor.c) and the node's ack write delays ------------------------

FLOOR_SOURCE = Path(__file__).resolve().parent / "ws_floor.c"


class Floor:
    """Compiles load/ws_floor.c once per run and measures the C floor per (sockets, frame size):
    the same frames written to the same number of loopback TCP sockets, an epoll reader
    draining them; the best of `tries` runs (the machine is shared)."""

    def __init__(self, workdir: Path) -> None:
        self.binary = workdir / "ws_floor"
        self.error = ""
        self._cache: dict[tuple[int, int], dict[str, Any]] = {}
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc is None:
            self.error = "no C compiler"
            return
        done = subprocess.run([gcc, "-O2", "-o", str(self.binary), str(FLOOR_SOURCE)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode:
            self.error = f"compile failed: {done.stderr[-300:]}"

    def measure(self, sockets: int, frame_bytes: int, tries: int = 3) -> dict[str, Any] | None:
        if self.error or sockets <= 0 or frame_bytes <= 0:
            return None
        size = max(64, round(frame_bytes / 64) * 64)
        key = (sockets, size)
        if key not in self._cache:
            rounds = max(5, 200_000 // sockets)
            best: dict[str, Any] | None = None
            for _ in range(tries):
                done = subprocess.run([str(self.binary), str(sockets), str(size), str(rounds)],
                                      capture_output=True, text=True, timeout=300)
                if done.returncode:
                    self.error = f"ws_floor failed: {done.stderr[-300:]}"
                    return None
                got = json.loads(done.stdout)
                if best is None or got["us_per_frame"] < best["us_per_frame"]:
                    best = got
            assert best is not None
            self._cache[key] = best
        return self._cache[key]


def fanout_split(hub0: dict[str, Any], hub1: dict[str, Any], relay_cpu_s: float
                 ) -> dict[str, float]:
    """The hub's own thread-CPU counters of the native path between two /interactive/stats
    snapshots: the per-socket eligibility check and the native send calls, per socket / per
    write and as a share of the relay's CPU in the same span (issue 9 item 4)."""
    def delta(name: str) -> float:
        return float(hub1.get(name, 0) or 0) - float(hub0.get(name, 0) or 0)

    probed, writes = delta("native_probed"), delta("native_writes")
    probe_ms, send_ms = delta("probe_cpu_ms"), delta("send_cpu_ms")
    if probed <= 0:
        return {}
    cpu_ms = max(1e-9, relay_cpu_s * 1000)
    return {"probed": probed, "writes": writes, "probe_ms": probe_ms, "send_ms": send_ms,
            "probe_ns": probe_ms * 1e6 / probed, "send_us": send_ms * 1e3 / max(1.0, writes),
            "probe_share": probe_ms / cpu_ms, "send_share": send_ms / cpu_ms}


def ack_write_pct(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """p50/p99 of the node's Function reply -> ack write delay between two /interactive/stats
    snapshots (fixed buckets: each percentile is its bucket's upper bound), n and queued."""
    b, a = before.get("ack_write") or {}, after.get("ack_write") or {}
    if not a:
        return {}
    counts = np.array(a["counts"]) - np.array(b.get("counts", [0] * len(a["counts"])))
    total = int(counts.sum())
    out: dict[str, float] = {"n": float(total),
                             "queued": float(a.get("queued", 0) - b.get("queued", 0))}
    if total <= 0:
        return out
    bounds = [*a["bounds_ms"], float("inf")]
    cum = np.cumsum(counts)
    for q in (50, 99, 99.9):
        out[f"p{q:g}"] = bounds[int(np.searchsorted(cum, total * q / 100.0))]
    out["mean"] = (a["sum_ms"] - b.get("sum_ms", 0.0)) / total
    return out


def fmt_bucket(ms: float) -> str:
    return "over 1 s" if ms == float("inf") else f"<= {ms:g} ms"



def run(args: argparse.Namespace) -> int:
    raise_nofile()
    secret = os.environ.get("LOTCAST_JWT_SECRET") or secrets.token_urlsafe(32)
    redis = relay = None
    tmp = tempfile.TemporaryDirectory(prefix="lotcast-wsbench-")
    pids: dict[str, int] = {}
    try:
        if args.url:
            http_url = args.url.rstrip("/")
            relay_pid = args.relay_pid
        else:
            from lotcast.redis_server import RedisServer
            from lotcast.supervisor import ServiceProcess

            redis = RedisServer(data_dir=Path(tmp.name) / "redis")
            redis.start()
            if redis._proc is not None:
                pids["redis"] = redis._proc.pid
            env = {"LOTCAST_JWT_SECRET": secret, "LOTCAST_REDIS_URL": redis.url}
            if args.flush_ms:
                env["LOTCAST_WS_FLUSH_INTERVAL_MS"] = str(args.flush_ms)
            relay = ServiceProcess("relay", ["--port", "0", "--max-viewers", "1000000",
                                             "--node-id", "bench-relay-0", "--log-level", "warning",
                                             "--workers", "1", *chat_limit_flags(args)],
                                   env=env).start()
            http_url, relay_pid = relay.url, relay.pid
        if relay_pid:
            pids["relay"] = relay_pid
        if args.serve:
            print(f"serving for {args.serve:g} s (Ctrl-C stops earlier)\n  URL: {http_url}\n"
                  f"  relay pid: {relay_pid}\n  export LOTCAST_JWT_SECRET={secret}", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(args.serve)
            return 0
        version = server_version()
        ws_url = http_url.replace("http://", "ws://").replace("https://", "wss://") + f"/ws/{args.room}"
        authority = TokenAuthority(secret)
        lot = asyncio.run(setup_lot(http_url, args.room, authority.mint(Role.HOST, "bench-host", "Host")))
        tokens = [authority.mint(Role.BIDDER, f"bidder-{i}", f"Bidder {i}") for i in range(args.bidders)]
        chat_tokens = [authority.mint(Role.BIDDER, f"chatter-{i}", f"Chatter {i}")
                       for i in range(args.chatters)]
        phases = [x.strip() for x in args.phases.split(",") if x.strip()]
        if not phases or any(x not in ("bids", "chat") for x in phases):
            raise SystemExit("--phases: a comma list of 'bids' and 'chat'")
        t0 = time.time()
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        workers, ctrls = [], []
        n = args.workers
        for i in range(n):
            cfg = {"index": i, "ws_url": ws_url, "lot": lot, "t0": t0,
                   "watchers": args.watchers // n + (1 if i < args.watchers % n else 0),
                   "tokens": tokens[i::n], "chat_tokens": chat_tokens[i::n],
                   "bid_rate": args.bid_rate * len(tokens[i::n]) / max(1, len(tokens)),
                   "chat_rate": args.chat_rate * len(chat_tokens[i::n]) / max(1, len(chat_tokens)),
                   "chat_len": args.chat_len, "phases": phases,
                   "ramp_batch": args.ramp_batch, "ramp_timeout": args.ramp_timeout,
                   "connect_timeout": args.connect_timeout,
                   "ctrl_timeout": args.ramp_timeout + 120 + args.settle + args.wait_idle,
                   "warmup": args.warmup,
                   "seconds": args.seconds, "drain": args.drain}
            ctrl = ctx.Queue()
            proc = ctx.Process(target=worker_entry, args=(cfg, out, ctrl), daemon=True)
            proc.start()
            workers.append(proc)
            ctrls.append(ctrl)
            pids[f"client-{i}"] = proc.pid
        print(f"relay {http_url} (pid {relay_pid}, code {version}); lot {lot}; "
              f"ramping {args.watchers} watchers + {args.bidders} bidders + {args.chatters} "
              f"chatters over {n} worker "
              "process(es)...", flush=True)
        ready: dict[int, tuple[int, int, float]] = {}
        deadline = time.monotonic() + args.ramp_timeout + 60
        while len(ready) < n and time.monotonic() < deadline:
            try:
                msg = out.get(timeout=1.0)
            except queue.Empty:
                if not all(p.is_alive() for p in workers):
                    raise RuntimeError("a worker process died during the ramp") from None
                continue
            if msg[0] == "ready":
                ready[msg[1]] = (msg[2], msg[3], msg[4])
        if len(ready) < n:
            raise RuntimeError("workers did not finish the ramp in time")
        connected = sum(r[0] for r in ready.values())
        ramp_s = max(r[2] for r in ready.values())
        print(f"load average {os.getloadavg()[0]:.2f}; "
              f"connected {connected} watchers, {sum(r[1] for r in ready.values())} bidders "
              "and chatters "
              f"in {ramp_s:.1f} s", flush=True)
        time.sleep(1.5)  # let the viewer count settle
        if args.settle > 0 and relay_pid:
            wait_relay_settled(relay_pid, args.settle, ramp_s)
        redis_url = redis.url if redis is not None else ""
        probe = None
        if args.probe_rate > 0:
            probe = AckProbe(ws_url, [authority.mint(Role.BIDDER, f"probe-{i}", f"Probe {i}")
                                      for i in range(PROBE_BIDDERS)],
                             lot, args.probe_rate, t0, redis_url)
            probe.start()
        if args.wait_idle > 0:
            wait_for_idle(args.wait_idle, args.idle_cores)
        stats_before = server_stats(http_url)
        start_at = time.time() + args.warmup + 0.5
        for ctrl in ctrls:
            ctrl.put(start_at)
        cpu = CpuWatch(pids)
        time.sleep(max(0.0, start_at - time.time()))
        cpu.begin()
        total_s = args.seconds * len(phases)
        prof = start_profile(relay_pid, total_s, Path(tmp.name) / "relay.prof") \
            if args.profile and relay_pid else None
        bounds = [start_at + (i + 1) * args.seconds for i in range(len(phases))]
        # At each phase boundary: CPU (cheap, on time) and the node's counters, fetched on a
        # thread so that a node too busy to answer does not delay the next CPU mark.
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(phases) + 2)
        fetch = functools.partial(server_stats, http_url, 5.0, redis_url, args.node_metrics)
        raw_marks = [(time.time(), cpu.total(), cpu.others(), pool.submit(fetch))]
        mid_future = None
        while len(raw_marks) <= len(phases):
            nxt = bounds[len(raw_marks) - 1]
            time.sleep(min(1.0, max(0.0, nxt - time.time())))
            if time.time() >= nxt:
                raw_marks.append((time.time(), cpu.total(), cpu.others(), pool.submit(fetch)))
            cpu.sample()
            if mid_future is None and time.time() > start_at + total_s / 2:
                mid_future = pool.submit(fetch)
        marks = [(t, c, o, f.result()) for t, c, o, f in raw_marks]
        if probe is not None:
            probe.stop()
        stats_mid = mid_future.result() if mid_future is not None else {}
        pool.shutdown(wait=False)
        cpu_total = cpu.total()
        sched = cpu.waits()
        cpu_total["(other processes on this machine)"] = cpu.others()
        results: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + args.drain + 120
        while len(results) < n and time.monotonic() < deadline:
            try:
                msg = out.get(timeout=1.0)
            except queue.Empty:
                continue
            if msg[0] == "result":
                results[msg[1]] = msg[2]
        stats_after = server_stats(http_url)
        profile_lines: list[str] = []
        if prof is not None:
            try:
                _, err = prof.communicate(timeout=total_s + 30)
                if prof.returncode:
                    profile_lines.append(f"py-spy failed: {err.decode(errors='replace')[-300:]}")
            except subprocess.TimeoutExpired:
                prof.kill()
            profile_lines += summarise_profile(Path(tmp.name) / "relay.prof")
            if args.json and (Path(tmp.name) / "relay.prof").exists():  # kept for later reading
                shutil.copy(Path(tmp.name) / "relay.prof", args.json + ".prof")
        for proc in workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
        floor = Floor(Path(tmp.name))
        report(args, phases, results, connected, ramp_s, stats_before, stats_mid, stats_after,
               cpu, cpu_total, sched, marks, profile_lines, floor, probe)
        if relay is not None:
            problems = [line.rstrip() for line in relay.output
                        if " WARNING " in line or " ERROR " in line or "Traceback" in line]
            if problems:
                kinds = Counter(line.split(" ", 3)[-1][:150] for line in problems)
                print(f"relay log: {len(problems)} warning/error lines (relay output kept: "
                      f"last {len(relay.output)} lines), by message:")
                for text, count in kinds.most_common(8):
                    print(f"  {count:6d} x {text}")
        return 0 if len(results) == n else 1
    finally:
        if relay is not None:
            relay.stop()
        if redis is not None:
            redis.close()
        tmp.cleanup()


def server_version() -> str:
    """The commit the node's code came from, and whether lotcast/ had local edits (same tree)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "lotcast",
                                "relay"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' + local edits in lotcast/ or relay/' if dirty else ''}"


def chat_limit_flags(args: argparse.Namespace) -> list[str]:
    """Relay flags: the per-user chat limit, explicit, with room for the bench's per-user rate."""
    per_user = args.chat_rate / max(1, args.chatters)
    return ["--chat-rate", f"{max(2.0, 2 * per_user):g}", "--chat-burst", "5"]


def _sum_phase(rs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """One phase's results of every worker, merged."""
    zeros = np.zeros(len(EDGES) - 1, np.int64)
    parts = [r["phases"][key] for r in rs]
    out: dict[str, Any] = {}
    for k in parts[0]:
        if k.endswith("_hist"):
            out[k] = sum((x[k] for x in parts), zeros)
        elif k in ("per_offset", "per_chat"):
            merged: dict[int, list[float]] = {}
            for x in parts:
                for off, (send, last, cnt) in x[k].items():
                    slot = merged.setdefault(off, [send, last, 0])
                    slot[1] = max(slot[1], last)
                    slot[2] += cnt
            out[k] = merged
        elif k == "kinds":
            c: Counter[str] = Counter()
            for x in parts:
                c.update(x[k])
            out[k] = dict(c)
        elif k in ("socket_fps_max", "socket_peak_second", "lag_p99_ms", "lag_max_ms"):
            out[k] = max(x[k] for x in parts)
        else:
            out[k] = sum(x[k] for x in parts)
    return out


def report(args: argparse.Namespace, phases: list[str], results: dict[int, dict[str, Any]],
           connected: int, ramp_s: float, before: dict[str, Any], mid: dict[str, Any],
           after: dict[str, Any], cpu: CpuWatch, cpu_total: dict[str, float],
           sched: dict[str, tuple[float, float]],
           marks: list[tuple[float, dict[str, float], float, dict[str, Any]]],
           profile_lines: list[str], floor: Floor | None = None,
           probe: AckProbe | None = None) -> None:
    rs = [r for r in results.values() if not r.get("aborted")]
    if not rs:
        print("no worker results")
        return
    zeros = np.zeros(len(EDGES) - 1, np.int64)
    secs = args.seconds
    watchers_total = sum(r["watchers"] for r in rs)
    flush_ms = args.flush_ms or 100
    batch_rate = 1000.0 / flush_ms
    stats: Counter[str] = Counter()
    for r in rs:
        stats.update(r["stats"])
    print()
    print(f"== ws_bench: {args.watchers} watchers requested, {connected} connected "
          f"(ramp {ramp_s:.1f} s), {args.bidders} bidders at {args.bid_rate:g} bids/s, "
          f"{args.chatters} chatters at {args.chat_rate:g} msgs/s ({args.chat_len} chars) in "
          f"'chat' phases; phases {','.join(phases)} of {secs:g} s each, one run; flush interval "
          f"{flush_ms} ms (batch rate {batch_rate:g}/s) ==")
    if not args.url:
        print(f"relay chat limit: {' '.join(chat_limit_flags(args))}")
    table: list[dict[str, Any]] = []
    for i, name in enumerate(phases):
        key = f"{i}:{name}"
        ph = _sum_phase(rs, key)
        t0_, cpu0, oth0, st0 = marks[i]
        t1_, cpu1, oth1, st1 = marks[i + 1]
        span = max(1e-3, t1_ - t0_)  # CPU marks are taken on time; divide by the real span
        relay_cpu = cpu1.get("relay", 0.0) - cpu0.get("relay", 0.0)
        redis_cpu = cpu1.get("redis", 0.0) - cpu0.get("redis", 0.0)
        client_cpu = sum(cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in cpu1 if k.startswith("client-"))
        others = oth1 - oth0
        per_bid = ph["per_offset"]
        last_bid = hist(np.array([v[1] - v[0] for v in per_bid.values()])) if per_bid else zeros
        complete_bids = sum(1 for v in per_bid.values() if v[2] >= watchers_total)
        per_chat = ph["per_chat"]
        last_chat = hist(np.array([v[1] - v[0] for v in per_chat.values()])) if per_chat else zeros
        complete_chats = sum(1 for v in per_chat.values() if v[2] >= watchers_total)
        all_frames = ph["frames"] + ph["talker_frames"]
        hub0 = st0.get("hubs", {}).get(args.room, {}) if isinstance(st0, dict) else {}
        hub1 = st1.get("hubs", {}).get(args.room, {}) if isinstance(st1, dict) else {}
        batches = (hub1.get("batches", 0) or 0) - (hub0.get("batches", 0) or 0)
        mean_frame = ph["frame_bytes"] / ph["frames"] if ph["frames"] else 0.0
        relay_us = relay_cpu / span * secs / all_frames * 1e6 if all_frames else 0.0
        fl = floor.measure(watchers_total, int(mean_frame)) \
            if floor is not None else None
        fan = fanout_split(hub0, hub1, relay_cpu)
        waits = {
            "probe": probe.window(t0_, t1_) if probe is not None else {},
            "node_bid_ack": prom_pct(st0.get("_bid_ack_buckets") or {},
                                     st1.get("_bid_ack_buckets") or {}),
        }
        waits["node_loop_lag"] = ack_write_pct({"ack_write": hub0.get("flush_late") or {}},
                                               {"ack_write": hub1.get("flush_late") or {}})
        f0, f1 = st0.get("_fcall") or {}, st1.get("_fcall") or {}
        if f1.get("calls", 0) > f0.get("calls", 0):
            waits["fcall_us"] = (f1["usec"] - f0.get("usec", 0)) / (f1["calls"] - f0["calls"])
        row = {
            "fanout": fan, "ack_waits": waits,
            "ack_write": ack_write_pct(st0 if isinstance(st0, dict) else {},
                                       st1 if isinstance(st1, dict) else {}),
            "mean_frame_bytes": mean_frame, "floor": fl,
            "floor_ratio": relay_us / fl["us_per_frame"] if fl and fl["us_per_frame"] else 0.0,
            "hub_turn_max_ms": hub1.get("fanout_turn_max_ms", 0.0),
            "phase": key, "bid_ack": pct(ph["bid_ack_hist"]), "bid_reject": pct(ph["bid_reject_hist"]),
            "bid_deliver": pct(ph["deliver_hist"]), "bid_last": pct(last_bid),
            "chat_ack": pct(ph["chat_ack_hist"]), "chat_deliver": pct(ph["chat_hist"]),
            "chat_server": pct(ph["chat_server_hist"]), "chat_last": pct(last_chat),
            "socket_fps_mean": ph["socket_fps_sum"] / max(1, watchers_total),
            "socket_fps_max": ph["socket_fps_max"], "socket_peak_second": ph["socket_peak_second"],
            "batches_per_s": batches / secs, "frames_per_s": all_frames / secs,
            "relay_cpu": relay_cpu / span, "redis_cpu": redis_cpu / span,
            "client_cpu": client_cpu / span, "other_cpu": others / span,
            "relay_us_per_frame": relay_us,
            "bids_answered_per_s": (ph["bid_acks"] + ph["bid_rejects"]) / secs,
            "chats_answered_per_s": (ph["chat_acks"] + ph["chat_rejects"]) / secs,
            "kinds": ph["kinds"], "lag_p99_ms": ph["lag_p99_ms"], "lag_max_ms": ph["lag_max_ms"],
        }
        table.append(row)
        print(f"\n-- phase {i + 1}/{len(phases)}: {name} "
              f"({'bids + chat' if name == 'chat' else 'bids only'}) --")
        print(f"bids: {ph['bid_acks']} acked, {ph['bid_rejects']} rejected, "
              f"{ph['bid_unanswered']} unanswered ({row['bids_answered_per_s']:.1f}/s answered)")
        print(f"bid ack latency (accepted):      {fmt(row['bid_ack'])}")
        aw = row["ack_write"]
        if aw.get("n"):
            print(f"  node: Function reply -> ack write (every ack/error): p50 "
                  f"{fmt_bucket(aw['p50'])}, p99 {fmt_bucket(aw['p99'])}, p99.9 "
                  f"{fmt_bucket(aw['p99.9'])}, mean {aw['mean']:.3f} ms (n={int(aw['n']):,}, "
                  f"{int(aw['queued'])} queued behind earlier frames of their socket); longest "
                  f"fan-out turn so far {row['hub_turn_max_ms']:.1f} ms")
        nb, pr, lag = waits["node_bid_ack"], waits["probe"], waits["node_loop_lag"]
        if nb.get("n") or pr or lag.get("n"):
            node_part = (f"node, bid received -> ack written (Redis round trips included): p50 "
                         f"<= {nb.get('p50', 0):g} ms, p99 <= {nb.get('p99', 0):g} ms; "
                         if nb.get("n") else "")
            print(f"  where an ack waits: {node_part}Redis FCALL run time "
                  f"{waits.get('fcall_us', 0):.0f} us mean")
            if lag.get("n"):
                print(f"    node event-loop lag (the hub's batch timer, n={int(lag['n'])}): p50 "
                      f"{fmt_bucket(lag['p50'])}, p99 {fmt_bucket(lag['p99'])}, mean "
                      f"{lag['mean']:.2f} ms")
            if pr:
                print(f"    idle-loop client ({PROBE_BIDDERS} probe bidders in the bench's own "
                      f"process): ack {fmt(pr['ack'])}")
                print(f"    idle-loop client: Redis PING {fmt(pr['redis_ping'])}")
        print(f"bid -> watcher delivery (each):  {fmt(row['bid_deliver'])}")
        print(f"bid -> last watcher (per bid):   {fmt(row['bid_last'])}; "
              f"{complete_bids}/{len(per_bid)} bids reached every watcher")
        if name == "chat":
            print(f"chat: {ph['chat_acks']} acked, {ph['chat_rejects']} refused, "
                  f"{ph['chat_unanswered']} unanswered ({row['chats_answered_per_s']:.1f}/s answered)")
            print(f"chat ack latency:                {fmt(row['chat_ack'])}")
            print(f"chat -> watcher delivery (each): {fmt(row['chat_deliver'])}")
            print(f"  server ts -> watcher (each):   {fmt(row['chat_server'])}")
            print(f"chat -> last watcher (per msg):  {fmt(row['chat_last'])}; "
                  f"{complete_chats}/{len(per_chat)} messages reached every watcher")
        print(f"frames per watcher socket: mean {row['socket_fps_mean']:.2f}/s, busiest socket "
              f"{row['socket_fps_max']:.2f}/s, most in any 1 s on any socket "
              f"{row['socket_peak_second']}; batch rate {batch_rate:g}/s; hub batches "
              f"{row['batches_per_s']:.2f}/s "
              f"({'<=' if row['socket_fps_max'] <= batch_rate + 1e-9 else 'ABOVE'} batch rate)")
        if row["lag_max_ms"] > 100:
            print(f"  (the 1 s peak is by client receive time: a client loop stalled "
                  f"{row['lag_max_ms']:.0f} ms reads queued frames together, so it can exceed the "
                  "batch rate when the server did not; the mean and the hub's batches/s cannot)")
        kinds = ", ".join(f"{k} {v / secs / max(1, watchers_total):.2f}/s"
                          for k, v in sorted(ph["kinds"].items(), key=lambda kv: -kv[1]))
        print(f"  frame contents per watcher socket: {kinds}")
        print(f"delivered {row['frames_per_s']:,.0f} socket frames/s (all sockets); relay "
              f"{row['relay_cpu'] * 100:.0f}% of a core = {row['relay_us_per_frame']:.1f} us CPU "
              f"per delivered frame; redis {row['redis_cpu'] * 100:.0f}%")
        if fan.get("probed"):
            print(f"  fan-out, thread CPU (exact, not sampled): per-socket eligibility check "
                  f"{fan['probe_ns']:.0f} ns per socket = {fan['probe_share'] * 100:.1f}% of the "
                  f"relay's CPU; native send {fan['send_us']:.2f} us per native write = "
                  f"{fan['send_share'] * 100:.1f}% ({int(fan['probed']):,} sockets checked, "
                  f"{int(fan['writes']):,} written natively)")
        if fl:
            print(f"C floor (load/ws_floor.c, this run): {fl['us_per_frame']:.2f} us per frame "
                  f"({fl['sockets']} sockets, {fl['frame_bytes']} B frames, best of 3); relay / "
                  f"floor = {row['floor_ratio']:.2f}x (mean frame {mean_frame:,.0f} B)")
            if fan.get("writes") and fl["us_per_frame"]:
                own = (fan["probe_ms"] + fan["send_ms"]) * 1e3 / fan["writes"]
                fan["own_us"], fan["own_ratio"] = own, own / fl["us_per_frame"]
                print(f"  the native fan-out alone (check + send, thread CPU): {own:.2f} us per "
                      f"frame = {fan['own_ratio']:.2f}x floor; the relay's other "
                      f"{max(0.0, 1 - fan['probe_share'] - fan['send_share']) * 100:.0f}% of CPU "
                      "is per bid and per socket outside the batches (requests, acks, pub/sub, "
                      "Redis calls, keepalive pings)")
        elif floor is not None and floor.error:
            print(f"C floor not measured: {floor.error}")
        print(f"load client {row['client_cpu'] * 100:.0f}% CPU over {len(rs)} process(es) "
              f"(loop lag p99 {row['lag_p99_ms']:.1f} ms, max {row['lag_max_ms']:.1f} ms); other "
              f"processes on the machine {max(0.0, row['other_cpu']) * 100:.0f}%")
    base = [r for r in table if r["phase"].endswith(":bids")]
    chat = [r for r in table if r["phase"].endswith(":chat")]
    print("\n-- same-run comparison (bid ack p50 / p99, ack write p99, bid -> watcher p99, "
          "CPU per frame / floor) --")
    for r in table:
        aw99 = r["ack_write"].get("p99")
        print(f"  {r['phase']:>8}: ack {r['bid_ack'].get('p50', 0):7.2f} / "
              f"{r['bid_ack'].get('p99', 0):7.2f} ms, ack write p99 "
              f"{fmt_bucket(aw99) if aw99 is not None else '-'}, "
              f"{r['relay_us_per_frame']:.1f} us/frame = {r['floor_ratio']:.2f}x floor, deliver p99 "
              f"{r['bid_deliver'].get('p99', 0):7.1f} ms, relay {r['relay_cpu'] * 100:3.0f}%, "
              f"client {r['client_cpu'] * 100:3.0f}%, others {r['other_cpu'] * 100:3.0f}%")
    if base and chat:
        b99 = [r["bid_ack"].get("p99", 0.0) for r in base]
        c99 = [r["bid_ack"].get("p99", 0.0) for r in chat]
        spread = max(b99) - min(b99)
        print(f"  bid ack p99 without chat {min(b99):.2f}..{max(b99):.2f} ms (spread {spread:.2f} "
              f"ms), with chat {min(c99):.2f}..{max(c99):.2f} ms")
    print(f"\nclient errors/disconnects: {({k: v for k, v in stats.items() if v}) or 'none'}")
    last = marks[-1][3] if marks and isinstance(marks[-1][3], dict) else {}
    hub = last.get("hubs", {}).get(args.room, {})  # at the last window's end (`after` may be
    # taken once the clients left and the hub was released)
    if hub:
        print(f"hub: {hub.get('native_writes', 0):,} native writes ({hub.get('short_writes', 0):,} "
              f"short), longest fan-out turn {hub.get('fanout_turn_max_ms', 0.0):.1f} ms, "
              f"{hub.get('stretch_drains', 0)} stretch drains, longest gap between batches "
              f"{hub.get('batch_gap_max_ms', 0.0):.0f} ms")
    print(f"server: slow_disconnects {after.get('slow_disconnects')}, errors {after.get('errors')}, "
          f"sockets before {before.get('sockets')}, mid {mid.get('sockets')}, "
          f"after {after.get('sockets')}")
    total_s = secs * len(phases)
    for name, total in sorted(cpu_total.items()):
        if name.startswith("("):
            print(f"cpu {name}: {total / total_s * 100:5.1f}% of one core on average")
            continue
        smp = cpu.samples.get(name, [])
        _run, wait = sched.get(name, (0.0, 0.0))
        print(f"cpu {name:>9}: {total / total_s * 100:5.1f}% of one core on average "
              f"(peak 1 s sample {max(smp) * 100 if smp else 0:5.1f}%); main thread runnable but "
              f"waiting for a CPU {wait / total_s * 100:5.1f}% of the time")
    load = os.getloadavg()
    print(f"machine load average now {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
          f"on {os.cpu_count()} cores (other processes compete for the same CPUs)")
    for line in profile_lines:
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "phases": table, "connected": connected, "stats": dict(stats), "cpu": cpu_total,
            "server_stats": after}, indent=2, default=str))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="use this node (http://host:port) instead of starting Redis + a relay; "
                    "LOTCAST_JWT_SECRET must match the node's")
    ap.add_argument("--relay-pid", type=int, default=0, help="with --url: the node's pid (CPU, py-spy)")
    ap.add_argument("--watchers", type=int, default=10000)
    ap.add_argument("--bidders", type=int, default=100, help="bids are spread round-robin; keep "
                    "bid-rate/bidders under the per-user limit (5/s)")
    ap.add_argument("--bid-rate", type=float, default=200.0, help="total bids/s")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    ap.add_argument("--phases", default="bids,chat,bids",
                    help="measured windows in order, each --seconds long, same sockets: 'bids' "
                    "(bids only) or 'chat' (bids + chat); two 'bids' windows show the noise")
    ap.add_argument("--chatters", type=int, default=100, help="signed-in users posting chat")
    ap.add_argument("--chat-rate", type=float, default=50.0, help="chat messages/s in total "
                    "during 'chat' phases (round-robin; the started relay gets a per-user limit "
                    "of max(2, 2x the per-user rate)/s, burst 5)")
    ap.add_argument("--chat-len", type=int, default=60, help="characters per message (<= 500)")
    ap.add_argument("--warmup", type=float, default=3.0, help="bidding before the measured window")
    ap.add_argument("--drain", type=float, default=2.0, help="listening after the window")
    ap.add_argument("--workers", type=int, default=2, help="client processes")
    ap.add_argument("--ramp-batch", type=int, default=40,
                    help="concurrent connects per worker (each hello uses the node's Redis pool)")
    ap.add_argument("--connect-timeout", type=float, default=30.0,
                    help="per watcher: TCP + handshake, then hello -> welcome")
    ap.add_argument("--ramp-timeout", type=float, default=300.0)
    ap.add_argument("--room", default="bench")
    ap.add_argument("--flush-ms", type=int, default=0,
                    help="started relay only: LOTCAST_WS_FLUSH_INTERVAL_MS (0 = server default, 100)")
    ap.add_argument("--profile", action="store_true", help="py-spy record the relay during the window")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--node-metrics", action="store_true",
                    help="scrape the node's /metrics at each window boundary for its bid "
                         "received -> ack written histogram (the scrape costs the relay CPU in "
                         "the windows: ~0.2 s at 2,000 sockets, its media telemetry lists them)")
    ap.add_argument("--probe-rate", type=float, default=10.0,
                    help="bids/s from probe bidders on an idle loop in this process (0: none)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="after the ramp, wait up to this long for the machine to be quiet "
                    "(shared machines: other processes skew every latency figure)")
    ap.add_argument("--settle", type=float, default=120.0, metavar="SECONDS",
                    help="after the ramp, wait up to this long for the relay to finish the frames "
                    "the joins caused (< 0.2 core over 2 s); 0 = do not wait")
    ap.add_argument("--idle-cores", type=float, default=0.5,
                    help="--wait-idle: 'quiet' means fewer busy cores than this")
    ap.add_argument("--serve", type=float, default=0.0, metavar="SECONDS",
                    help="only start Redis + the relay, print URL and JWT secret, keep them up "
                    "this long (for locust), then stop")
    return run(ap.parse_args())


if __name__ == "__main__":
    sys.exit(main())
