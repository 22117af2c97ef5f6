"""Many rooms at once: one Redis vs a Redis Cluster (3 primaries + 3 replicas) on this machine.

It starts the Redis it measures (one `RedisServer`, AOF as in production, or a
`LocalRedisCluster`) and one interactive node (`lotcast.interactive.devserver`, the production
InteractiveService, no media), then:

* one host per room creates and opens a lot (increment 1, 1 h, no soft close);
* W watchers per room (anonymous) connect and read every frame (not decoded: the node encodes
  each batch once; the client only has to keep up). They are ws_bench's lean watchers
  (load/lean_watchers.py: websockets' sans-I/O handshake, then raw frame parsing) in --workers
  uvloop processes, each holding its share of the rooms, so 10,000 sockets fit on this machine;
* bidders (one per room) place bids at a fixed total rate, spread over every room, in steps
  (--rates), each --seconds long; a bid's ack latency is its send -> its `ack`;
* per step: acks/s, ack p50/p99/max, and Redis CPU (utime+stime of every redis-server process
  from /proc) per acknowledged bid; the answer is the first rate whose ack p99 passes 20 ms;
* per step too, to tell when the client was the limit: the watcher processes' own CPU and event
  loop lag, frames they received, sockets still connected; the bidders' process CPU; the node's
  CPU and the share of time its main thread was runnable but waiting for a CPU (schedstat).

Measured here (2 shared vCPUs, other engineers' test runs alongside, so read the trend, not the
digits; 200 rooms x 5 watchers, 5 s steps after a warm-up, 14:20 UTC 2026-12-01):

    mode                     100/s p99   200/s p99   400/s p99   Redis CPU per bid (at 400/s)
    one Redis (AOF always)    ~1 s*       17 ms       20 ms       275 us (1 process)
    cluster, acks auto(WAIT)  51 ms       43 ms       47 ms       555 us (6 processes)
    cluster, acks off         35 ms       49 ms      194 ms       545 us (6 processes)
    (* the first step of that run still carried the join backlog: the warm-up step was added
       after it)

On one 2-core machine a cluster cannot win: six redis-servers, each with appendfsync always and
the replicas applying every write, share the two cores with the node and the load client, so the
cluster's CPU per bid is twice one Redis's and ack p99 passes 20 ms already at 100 bids/s (one
Redis: about 400 bids/s). The cluster pays off when its primaries have cores of their own; what
this run does show is that durable acks (WAIT 1 per bid) cost ~1 ms at p50 and nothing visible
at p99 here.

200 rooms x 50 watchers (10,000 sockets), 8 s steps, two runs per mode, 15:10-15:24 UTC
2026-12-01, acks auto, load average 4.3-11.4 (other sessions' Chromium tests):

    mode, run        ack p50/p99 ms at 100 / 200 / 400 / 800 bids/s    Redis CPU/bid (100, 200/s)
    one Redis, 1     2.5/37    3.8/65      928/3908    1550/8767         363, 313 us
    one Redis, 2     2.0/34    2.9/206      24/3686    6038/15724        375, 331 us
    cluster, 1        24/788    21/1943      51/293    3367/12383        850, 656 us
    cluster, 2        24/2090  3.8/50      1023/1534   5089/13834        713, 669 us

ack p99 passes 20 ms at 100 bids/s in both modes. The client was not the limit (watcher
processes 5-16 % of a core in all, bidders' process 5-17 %, 10,000 connected, 0 lost); the
node's one loop was: from 400 bids/s (~20,000 socket frames/s) it ran 39-59 % of the time and
waited for a CPU another 35-59 %, so acks queued for seconds; Redis used 4-21 %. Redis CPU per
bid: the cluster's is about twice one Redis's, as at 200 x 5.

Run it under `flock /tmp/bench.lock` on a shared machine:

    flock /tmp/bench.lock .venv/bin/python load/rooms_bench.py --redis single  # 200 x 50
    flock /tmp/bench.lock .venv/bin/python load/rooms_bench.py --redis cluster
    flock /tmp/bench.lock .venv/bin/python load/rooms_bench.py --redis single --watchers 5 \\
        --rates 100,200,400 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lean_watchers import WatcherPool
from ws_bench import wait_relay_settled

from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.redis_cluster import LocalRedisCluster
from lotcast.redis_server import RedisServer

AUTHORITY = TokenAuthority(DEV_JWT_SECRET)
P99_LIMIT_MS = 20.0
CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            total += int(parts[11]) + int(parts[12])  # utime, stime
    return total / CLK


def run_queue_wait(pid: int) -> float:
    """Seconds the process's main thread was runnable but waiting for a CPU (the kernel's
    schedstat): when it grows, the machine, not the process, was the limit."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class Step:
    rate: int
    sent: int = 0
    acks: list[float] = field(default_factory=list)  # ms
    errors: Counter[str] = field(default_factory=Counter)  # error code -> count
    redis_cpu: float = 0.0
    seconds: float = 0.0


async def run(args: argparse.Namespace) -> None:
    redis: RedisServer | LocalRedisCluster
    redis = LocalRedisCluster(3, 1) if args.redis == "cluster" else RedisServer()
    redis.start()
    try:
        pids = ([n.pid for n in redis.nodes if n.pid] if isinstance(redis, LocalRedisCluster)
                else [redis.pid] if redis.pid else [])
        extra = ("--bid-rate", "0", "--vote-rate", "0", "--ws-msg-rate", "0")
        with DevServerProcess(redis.url, *extra, jwt_secret=DEV_JWT_SECRET) as node:
            await measure(args, node.url, pids, node._proc.pid)
    finally:
        redis.close()


async def measure(args: argparse.Namespace, url: str, pids: list[int], node_pid: int) -> None:
    rooms = [f"bench-{i}" for i in range(args.rooms)]
    bidders: list[RoomClient] = []
    lots: list[str] = []
    for group in range(0, len(rooms), 50):
        hosts = [RoomClient(url, r, AUTHORITY.mint(Role.HOST, "host", "Host"))
                 for r in rooms[group:group + 50]]
        await asyncio.gather(*(h.connect() for h in hosts))
        for h in hosts:
            lot = (await h.request("lot_create", title="t", start_price=1, increments=[[0, 1]],
                                   duration_ms=3_600_000, soft_close_ms=0))["lot"]
            await h.request("lot_open", lot=lot)
            lots.append(lot)
            await h.close()
        batch = [RoomClient(url, r, AUTHORITY.mint(Role.BIDDER, f"b-{r}", "B"))
                 for r in rooms[group:group + 50]]
        await asyncio.gather(*(b.connect() for b in batch))
        bidders += batch
    pool = WatcherPool(url, rooms, args.watchers, args.workers, ramp_batch=args.ramp_batch)
    try:
        await steps_run(args, rooms, bidders, lots, pids, node_pid, pool)
    finally:
        await asyncio.to_thread(pool.close)
        for b in bidders:
            await b.close()


def watcher_line(m0: list[dict[str, Any]], m1: list[dict[str, Any]], seconds: float) -> str:
    """The watcher processes' own CPU, loop lag and frames over one step."""
    cpu = [(b["cpu_s"] - a["cpu_s"]) / seconds for a, b in zip(m0, m1, strict=True)]
    frames = sum(b["frames"] - a["frames"] for a, b in zip(m0, m1, strict=True))
    lost = sum(b["stats"].get("disconnects", 0) - a["stats"].get("disconnects", 0)
               for a, b in zip(m0, m1, strict=True))
    return (f"      watchers: {len(m1)} processes {sum(cpu) * 100:4.0f}% CPU in all (busiest "
            f"{max(cpu) * 100:3.0f}% of a core), loop lag p99 "
            f"{max(m['lag_p99_ms'] for m in m1):6.1f} ms max {max(m['lag_max_ms'] for m in m1):6.1f}"
            f" ms, {frames / seconds:8.0f} frames/s, {sum(m['connected'] for m in m1)} connected,"
            f" {lost} lost")


async def steps_run(args: argparse.Namespace, rooms: list[str], bidders: list[RoomClient],
                    lots: list[str], pids: list[int], node_pid: int, pool: WatcherPool) -> None:
    connected, ramp_s, stats = await asyncio.to_thread(pool.wait_ready)
    await asyncio.to_thread(wait_relay_settled, node_pid, 60.0, ramp_s)
    failed = {k: v for k, v in stats.items() if v}
    print(f"{args.redis} (acks: {args.ack}): {len(rooms)} rooms x {args.watchers} watchers "
          f"({connected} connected in {ramp_s:.0f} s over {len(pool.procs)} processes"
          f"{f', {failed}' if failed else ''}), {len(bidders)} bidders")
    amounts = [1] * len(rooms)
    steps = []
    rates = [int(r) for r in args.rates.split(",")]
    for i, rate in enumerate([rates[0], *rates]):
        warmup = i == 0  # the joins' backlog (viewers frames) settles; not counted
        step = Step(rate)
        pending: set[asyncio.Task[None]] = set()

        async def one(i: int, step: Step = step) -> None:
            amounts[i] += 1
            sent = time.perf_counter()
            reply = await bidders[i].request("bid", lot=lots[i], amount=amounts[i], within=30)
            if reply["type"] == "ack":
                step.acks.append((time.perf_counter() - sent) * 1000)
            else:
                step.errors[str(reply.get("code"))] += 1

        m0 = await asyncio.to_thread(pool.mark)
        own0, node0 = cpu_seconds([os.getpid()]), cpu_seconds([node_pid])
        wait0 = run_queue_wait(node_pid)
        cpu0, t0 = cpu_seconds(pids), time.perf_counter()
        total = int(rate * args.seconds)
        for n in range(total):
            due = t0 + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(n % len(rooms)))
            pending.add(task)
            task.add_done_callback(pending.discard)
            step.sent += 1
        await asyncio.gather(*pending, return_exceptions=True)
        step.seconds = time.perf_counter() - t0
        step.redis_cpu = cpu_seconds(pids) - cpu0
        own, node_cpu = cpu_seconds([os.getpid()]) - own0, cpu_seconds([node_pid]) - node0
        node_wait = run_queue_wait(node_pid) - wait0
        m1 = await asyncio.to_thread(pool.mark)
        steps.append(step)
        acks = sorted(step.acks) or [0.0]
        p50, p99 = acks[len(acks) // 2], acks[min(len(acks) - 1, int(len(acks) * 0.99))]
        cpu_us = step.redis_cpu / max(1, len(step.acks)) * 1e6
        print(f"  {'warm-up' if warmup else 'target'} {rate:5d}/s: acked "
              f"{len(step.acks) / step.seconds:7.1f}/s  ack p50 {p50:6.2f} ms  p99 {p99:7.2f} ms"
              f"  max {acks[-1]:7.1f} ms  errors {dict(step.errors) or 0}  Redis CPU {cpu_us:6.1f} us/bid",
              flush=True)
        load = os.getloadavg()
        print(f"{watcher_line(m0, m1, step.seconds)}\n      node {node_cpu / step.seconds * 100:.0f}%"
              f" CPU (runnable but waiting for a CPU {node_wait / step.seconds * 100:.0f}% of the "
              f"time), bidders' process {own / step.seconds * 100:.0f}%, Redis "
              f"{step.redis_cpu / step.seconds * 100:.0f}%; load average {load[0]:.1f}", flush=True)
        frames_total = sum(m["frames"] for m in m1)
        if warmup:
            steps.pop()
    over = next((s.rate for s in steps if s.acks and
                 sorted(s.acks)[int(len(s.acks) * 0.99)] > P99_LIMIT_MS), None)
    print(f"  watcher frames received: {frames_total}; ack p99 passes {P99_LIMIT_MS:.0f} ms at: "
          f"{f'{over} bids/s' if over else 'not within the rates tried'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis", choices=["single", "cluster"], default="single")
    parser.add_argument("--rooms", type=int, default=200)
    parser.add_argument("--watchers", type=int, default=50, help="per room")
    parser.add_argument("--rates", default="100,200,400,800", help="total bids/s per step")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--ack", choices=["off", "wait", "auto"], default="auto",
                        help="the node's redis_ack policy (durable acks wait for a replica)")
    parser.add_argument("--workers", type=int, default=2, help="watcher processes (uvloop)")
    parser.add_argument("--ramp-batch", type=int, default=40,
                        help="concurrent watcher connects per process")
    args = parser.parse_args()
    os.environ["LOTCAST_REDIS_ACK"] = args.ack  # inherited by the node process
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
