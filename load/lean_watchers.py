"""Lean watcher processes spread over many rooms, for load/rooms_bench.py.

It reuses ws_bench's watcher machinery unchanged (`ws_bench.Watcher`: websockets' sans-I/O
handshake and `hello`, then a minimal parser of the unmasked server frames; `ws_bench.Sink`, here
with recording off, so a frame costs one header check and a counter) and runs it in several uvloop
worker processes, each connecting its share of the rooms' watchers. On command a worker reports
its own CPU time, its event loop lag since the previous report, the frames it received and its
connected sockets, so a bench can tell when the client, not the server, was the limit.

Protocol (multiprocessing queues): the parent puts "mark" or "stop" on a worker's own `ctrl`
queue; the worker answers on the shared `out` queue with ("ready", ...) once after its ramp,
("mark", index, report) per mark, ("done", index) after "stop".
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import psutil
from ws_bench import Sink, Watcher, raise_nofile


async def connect_all(urls: list[str], sink: Sink, stats: Counter[str], batch: int,
                      timeout: float, ramp_timeout: float) -> list[Watcher]:
    """Connect one watcher per url, `batch` at a time; failed connects are retried (within 3x
    the count of attempts and `ramp_timeout`), as in ws_bench's ramp."""
    loop = asyncio.get_running_loop()
    parts = urlsplit(urls[0]) if urls else None
    host = (parts.hostname if parts else None) or "127.0.0.1"
    port = (parts.port if parts else None) or 80
    watchers: list[Watcher] = []
    todo = list(urls)
    attempts, started = 0, time.monotonic()

    async def one(w: Watcher, url: str, ok: list[Watcher], failed: list[str]) -> None:
        try:
            await asyncio.wait_for(loop.create_connection(lambda: w, host, port), timeout)
            await asyncio.wait_for(asyncio.shield(w.ready), timeout)
            ok.append(w)
        except (OSError, TimeoutError, ConnectionError) as exc:
            stats[f"connect_failed_{type(exc).__name__}"] += 1
            w.close()
            failed.append(url)

    while todo and attempts < 3 * len(urls):
        if time.monotonic() - started > ramp_timeout:
            stats["ramp_timeout"] += 1
            break
        chunk, todo = todo[:batch], todo[batch:]
        attempts += len(chunk)
        ok: list[Watcher] = []
        failed: list[str] = []
        await asyncio.gather(*(one(Watcher(u, sink, stats), u, ok, failed) for u in chunk))
        watchers.extend(ok)
        if failed:
            todo = failed + todo
            await asyncio.sleep(0.5)
    return watchers


async def _worker_main(cfg: dict[str, Any], out: Any, ctrl: Any) -> None:
    stats: Counter[str] = Counter()
    sink = Sink(time.time())  # recording stays off: frames are counted, not decoded
    loop = asyncio.get_running_loop()
    urls = [f"{cfg['ws_base']}/ws/{room}" for room in cfg["rooms"]
            for _ in range(cfg["per_room"])]
    t = time.monotonic()
    watchers = await connect_all(urls, sink, stats, cfg["ramp_batch"], cfg["connect_timeout"],
                                 cfg["ramp_timeout"])
    out.put(("ready", cfg["index"], len(watchers), time.monotonic() - t, dict(stats)))
    lags: list[float] = []
    running = True

    async def probe() -> None:
        while running:
            t = loop.time()
            await asyncio.sleep(0.05)
            lags.append(loop.time() - t - 0.05)

    prober = asyncio.create_task(probe())
    me = psutil.Process()
    try:
        while True:
            try:
                cmd = await loop.run_in_executor(None, ctrl.get, True, cfg["ctrl_timeout"])
            except queue.Empty:
                cmd = "stop"
            if cmd == "stop":
                break
            c = me.cpu_times()
            snap, lags[:] = list(lags), []
            connected = sum(1 for w in watchers if w.close_code is None
                            and w.transport is not None and not w.transport.is_closing())
            out.put(("mark", cfg["index"], {
                "cpu_s": c.user + c.system, "frames": sink.other_frames, "bytes": sink.bytes,
                "lag_p99_ms": float(np.percentile(snap, 99) * 1000) if snap else 0.0,
                "lag_max_ms": float(max(snap) * 1000) if snap else 0.0,
                "connected": connected, "stats": dict(stats)}))
    finally:
        running = False
        prober.cancel()
        await asyncio.gather(prober, return_exceptions=True)
        for w in watchers:
            w.close()
        await asyncio.sleep(0.2)
        out.put(("done", cfg["index"]))


def worker_entry(cfg: dict[str, Any], out: Any, ctrl: Any) -> None:
    raise_nofile()
    try:
        import uvloop

        uvloop.run(_worker_main(cfg, out, ctrl))
    except ImportError:
        asyncio.run(_worker_main(cfg, out, ctrl))


class WatcherPool:
    """`workers` processes holding `per_room` lean watchers in each of `rooms` (round-robin)."""

    def __init__(self, http_url: str, rooms: list[str], per_room: int, workers: int,
                 ramp_batch: int = 40, connect_timeout: float = 30.0,
                 ramp_timeout: float = 300.0) -> None:
        ctx = mp.get_context("spawn")
        self.out: Any = ctx.Queue()
        self.ctrls: list[Any] = []
        self.procs: list[Any] = []
        self.ramp_timeout = ramp_timeout
        ws_base = http_url.replace("http://", "ws://").rstrip("/")
        workers = max(1, min(workers, len(rooms)))
        for i in range(workers):
            ctrl = ctx.Queue()
            cfg = {"index": i, "ws_base": ws_base, "rooms": rooms[i::workers],
                   "per_room": per_room, "ramp_batch": ramp_batch,
                   "connect_timeout": connect_timeout, "ramp_timeout": ramp_timeout,
                   "ctrl_timeout": 3600.0}
            proc = ctx.Process(target=worker_entry, args=(cfg, self.out, ctrl), daemon=True)
            proc.start()
            self.ctrls.append(ctrl)
            self.procs.append(proc)

    def _collect(self, kind: str, timeout: float) -> dict[int, Any]:
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.procs):
            try:
                msg = self.out.get(True, max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"watcher workers: no {kind!r} from "
                                       f"{sorted(set(range(len(self.procs))) - set(got))}") from None
                continue
            if msg[0] == kind:
                got[msg[1]] = msg[2:]
        return got

    def wait_ready(self) -> tuple[int, float, Counter[str]]:
        """(watchers connected, longest worker ramp in s, connect stats)."""
        got = self._collect("ready", self.ramp_timeout + 60)
        stats: Counter[str] = Counter()
        for _, _, s in got.values():
            stats.update(s)
        return sum(g[0] for g in got.values()), max(g[1] for g in got.values()), stats

    def mark(self) -> list[dict[str, Any]]:
        """Every worker's report, by worker index."""
        for ctrl in self.ctrls:
            ctrl.put("mark")
        got = self._collect("mark", 60)
        return [got[i][0] for i in range(len(self.procs))]

    def close(self) -> None:
        for ctrl in self.ctrls:
            ctrl.put("stop")
        try:
            self._collect("done", 10)
        except TimeoutError:
            pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
