"""Cluster benchmark: Redis + broadcaster + relays as processes, aiortc viewers placed by the registry.

Prints:
- viewers served per relay, and each relay's CPU per viewer (psutil over a steady window);
- glass-to-glass p50/p95 at depth 0, 1 and 2 of the tree (a static chain origin -> relay-0 ->
  chain-1 -> chain-2, one decoding viewer per level), and the latency each hop adds: the same frame
  decoded at depth d+1 minus depth d, and (without decoder noise) the same RTP payload received at
  depth d+1 minus depth d, p50/p95;
- the time a killed relay's viewers take to play again (SIGKILL -> first frame on the new relay,
  p50/p95), with the longest stall seen by the other relays' viewers;
- the drain time (SIGTERM -> process exit) and the longest stall of the viewers that moved;
- the origin drain (issue 13): two origins, 20 viewers over two relays, SIGTERM on the stream's
  origin while a host (aiortc, its console socket on the other origin) follows the `republish`
  notice make-before-break: each viewer's longest stall (p50/p95/max), the time the host took to
  move and the drained origin's exit time.

    .venv/bin/python load/cluster_bench.py --viewers 9 --capacity 4 --seconds 6
    .venv/bin/python load/cluster_bench.py --scenario origin-drain --drain-viewers 20
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rtp import RtpPacket

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cluster_support import (
    LadderViewer,
    ScaledCluster,
    TimedViewer,
    percentile,
    relay_stats,
    remember_node_ids,
    scaled_cluster,
)
from media_support import Publisher, host_token
from origin_support import PlacedPublisher, two_origins

from lotcast.interactive.client import RoomClient
from lotcast.media.aiortc_hooks import tap_receiver
from lotcast.redis_server import RedisServer
from lotcast.supervisor import ServiceProcess

STREAM = "bench"


def fmt(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"p50 {percentile(values, 50):7.1f}  p95 {percentile(values, 95):7.1f}  n={len(values)}"


class PacketProbe:
    """A WHEP client that never decodes: it records when each video payload arrives. Payloads
    cross relays byte for byte (only headers are rewritten), so the same payload's arrival at
    depth d and d+1 gives that hop's delay without decoder noise."""

    def __init__(self, base_url: str) -> None:
        self.url = f"{base_url}/whep/{STREAM}"
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.arrivals: dict[bytes, float] = {}

    def _on_packet(self, packet: RtpPacket) -> None:
        self.arrivals.setdefault(bytes(packet.payload), time.monotonic())

    async def start(self) -> None:
        self.pc.addTransceiver("audio", direction="recvonly")
        video = self.pc.addTransceiver("video", direction="recvonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with httpx.AsyncClient() as http:
            r = await http.post(self.url, content=self.pc.localDescription.sdp,
                                headers={"Content-Type": "application/sdp"})
        assert r.status_code == 201, (r.status_code, r.text)
        tap_receiver(video.receiver, self._on_packet, lambda *_: None)
        await self.pc.setRemoteDescription(RTCSessionDescription(r.text, "answer"))

    async def stop(self) -> None:
        await self.pc.close()


async def wait_frames(viewers: list[TimedViewer], count: int, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(len(v.counters) < count for v in viewers):
        await asyncio.sleep(0.1)


async def depth_latency(cluster: ScaledCluster, seconds: float) -> None:
    """Depth 0/1/2 through a static chain of relays; one decoding viewer per depth."""
    relay0 = cluster.relays["relay-0"]
    chain1 = cluster.add_relay("chain-1", origin_url=relay0.url)
    chain2 = cluster.add_relay("chain-2", origin_url=chain1.url)
    levels = [relay0, chain1, chain2]
    viewers = [TimedViewer(proc.url, STREAM) for proc in levels]
    for viewer in viewers:
        await viewer.start()
    await wait_frames(viewers, 10, within=20)
    skip = [len(v.counters) for v in viewers]  # steady state only
    await asyncio.sleep(seconds)
    stats = await relay_stats(cluster)
    print("\n== glass-to-glass by tree depth (ms, painted capture time -> decoded) ==")
    decoded: list[dict[int, float]] = []
    for depth, (viewer, first) in enumerate(zip(viewers, skip, strict=True)):
        node = cluster.node_of(viewer.url)
        pulls = stats.get(node or "", {}).get("upstreams", [])
        reported = pulls[0]["depth"] if pulls else "?"  # type: ignore[index]
        delays = viewer.delays_ms[first:]
        print(f"depth {depth} ({node}, registry depth {reported}): {fmt(delays)}")
        decoded.append({c: t for c, t in zip(viewer.counters[first:], viewer.frame_times[first:],
                                              strict=True)})
    print("== latency added per hop (ms, same frame decoded one level deeper) ==")
    for depth in (1, 2):
        upper, lower = decoded[depth - 1], decoded[depth]
        diffs = [(lower[c] - upper[c]) * 1000 for c in lower if c in upper]
        print(f"hop {depth - 1} -> {depth}: {fmt(diffs)}")
    for viewer in viewers:
        await viewer.stop()
    probes = [PacketProbe(proc.url) for proc in levels]
    for probe in probes:
        await probe.start()
    await asyncio.sleep(seconds)
    for probe in probes:
        await probe.stop()
    print("== latency added per hop (ms, same RTP payload received one level deeper) ==")
    for depth in (1, 2):
        upper_a, lower_a = probes[depth - 1].arrivals, probes[depth].arrivals
        diffs = [(lower_a[k] - upper_a[k]) * 1000 for k in lower_a if k in upper_a]
        print(f"hop {depth - 1} -> {depth}: {fmt(diffs)}")
    for name in ("chain-2", "chain-1"):
        proc = cluster.relays.pop(name)
        proc.signal(signal.SIGTERM)  # empty: drains at once and deregisters
        await asyncio.to_thread(proc.wait, 10)


async def cpu_per_viewer(cluster: ScaledCluster, group: list[LadderViewer],
                         seconds: float) -> None:
    procs = {name: psutil.Process(p.pid) for name, p in cluster.relays.items()}
    for proc in procs.values():
        proc.cpu_percent(None)
    await asyncio.sleep(seconds)
    cpu = {name: proc.cpu_percent(None) for name, proc in procs.items()}
    stats = await relay_stats(cluster)
    per_relay = Counter(cluster.node_of(v.relay_url) for v in group)
    print("\n== viewers per relay, CPU per viewer ==")
    for name in sorted(procs):
        viewers = int(stats.get(name, {}).get("viewers", 0))  # type: ignore[call-overload]
        per = f"{cpu[name] / viewers:5.2f} %/viewer" if viewers else "   -"
        print(f"{name}: {viewers:3d} viewers (placement: {per_relay.get(name, 0)}), "
              f"CPU {cpu[name]:5.1f} % of a core, {per}")


async def kill_one(cluster: ScaledCluster, group: list[LadderViewer]) -> str:
    per_relay = Counter(cluster.node_of(v.relay_url) for v in group)
    victim = per_relay.most_common(1)[0][0]
    assert victim is not None
    victims = [v for v in group if cluster.node_of(v.relay_url) == victim]
    others = [v for v in group if v not in victims]
    stats = await relay_stats(cluster)
    children = {k for k, st in stats.items()
                if any(cluster.relays[victim].url in str(p["url"])  # type: ignore[index]
                       for p in st.get("upstreams", []))}  # type: ignore[union-attr]
    killed_at = time.monotonic()
    cluster.relays[victim].kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
            any(v.played_again_at(killed_at) is None for v in victims)
            or any(v.frames_since(killed_at + 1) < 5 for v in group)):
        await asyncio.sleep(0.1)
    end = time.monotonic()
    recovery = [(v.played_again_at(killed_at) or end) - killed_at for v in victims]
    fed = [v for v in others if cluster.node_of(v.relay_url) in children]
    apart = [v for v in others if v not in fed]
    print(f"\n== kill -9 {victim} ({len(victims)} viewers; cascade children {sorted(children)}) ==")
    print(f"time to play again (s): {fmt(recovery)}  max {max(recovery):.2f}")
    print(f"viewers of relays fed by it: longest stall "
          f"{max((v.max_gap(killed_at, end) for v in fed), default=0):.2f} s (n={len(fed)}); "
          f"other viewers: longest stall "
          f"{max((v.max_gap(killed_at, end) for v in apart), default=0):.2f} s (n={len(apart)}), "
          f"re-placed {sum(1 for v in others if v.moves)}")
    cluster.relays.pop(victim)
    return victim


async def drain_one(cluster: ScaledCluster, group: list[LadderViewer]) -> None:
    per_relay = Counter(cluster.node_of(v.relay_url) for v in group)
    victim = per_relay.most_common(1)[0][0]
    assert victim is not None
    movers = [v for v in group if cluster.node_of(v.relay_url) == victim]
    proc = cluster.relays[victim]
    term_at = time.monotonic()
    proc.signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, cluster.drain_timeout + 10)
    drained = time.monotonic() - term_at
    await asyncio.sleep(2)
    end = time.monotonic()
    gaps = [v.max_gap(term_at, end) for v in movers]
    print(f"\n== SIGTERM {victim} ({len(movers)} viewers) ==")
    print(f"drain time {drained:.2f} s (exit status {code}); moved viewers' longest stall "
          f"{max(gaps, default=0):.2f} s; viewers without frames after: "
          f"{sum(1 for v in group if v.frames_since(end - 1.0) == 0)}")


BASELINE_S = 4.0


async def origin_drain(args: argparse.Namespace) -> None:
    """SIGTERM the stream's origin; the host follows `republish`; stall per viewer."""
    stream, token = "origin-drain", host_token()
    with RedisServer() as redis, two_origins(redis, relays=2) as cluster:
        first = PlacedPublisher(cluster.urls[0], stream, token)
        await first.start()
        draining = cluster.by_url(first.origin_url)
        survivor = cluster.other(draining)
        host = RoomClient(survivor.url, stream, token)
        await host.connect()
        viewers = [TimedViewer(cluster.relays[i % 2].url, stream) for i in range(args.drain_viewers)]
        second: PlacedPublisher | None = None
        try:
            for viewer in viewers:
                await viewer.start()
            await wait_frames(viewers, 15, 60)
            # the same viewers' longest stall over a stretch with no drain: what this loaded
            # machine and one process decoding every viewer give without any move
            calm_from = time.monotonic()
            await asyncio.sleep(BASELINE_S)
            calm_to = time.monotonic()
            calm = [1000 * max(b - a for a, b in itertools.pairwise([calm_from, *(
                t for t in v.frame_times if calm_from <= t <= calm_to), calm_to]))
                for v in viewers]
            term_at = time.monotonic()
            draining.signal(signal.SIGTERM)
            deadline = term_at + 20
            notice = None
            while notice is None and time.monotonic() < deadline:
                notice = next((m for _, m in host.received if m.get("type") == "republish"), None)
                await asyncio.sleep(0.02)
            if notice is None:
                print("\n== origin drain: no republish notice within 20 s ==")
                return
            second = PlacedPublisher(survivor.url, stream, token, first_frame=100_000)
            second.url = notice["whip_url"]
            await second.start()
            while second.pc.connectionState != "connected" and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            moved = time.monotonic() - term_at
            # the old session is left to the draining origin: it ends it once every relay has
            # switched its pull (the host page's own DELETE comes 10 s later, as a fallback)
            code = await asyncio.to_thread(draining.wait, 30)
            exited = time.monotonic() - term_at
            await asyncio.sleep(2)
            end = time.monotonic()
            stalls = [1000 * max(b - a for a, b in itertools.pairwise([term_at, *(
                t for t in v.frame_times if term_at <= t <= end), end])) for v in viewers]
            resumed = sum(1 for v in viewers if any(c >= 100_000 for c in v.counters))
            print(f"\n== origin drain: SIGTERM {draining.name}, {len(viewers)} viewers over "
                  f"2 relays ==")
            print(f"host moved (new session connected) {moved:.2f} s after SIGTERM; drained "
                  f"origin exited after {exited:.2f} s (status {code}); viewers playing the new "
                  f"publisher: {resumed}/{len(viewers)}")
            print(f"longest stall per viewer (ms): p50 {percentile(stalls, 50):.0f}  "
                  f"p95 {percentile(stalls, 95):.0f}  max {max(stalls):.0f}")
            print(f"  without a drain ({BASELINE_S:.0f} s before SIGTERM): p50 "
                  f"{percentile(calm, 50):.0f}  p95 {percentile(calm, 95):.0f}  "
                  f"max {max(calm):.0f}")
            switch = [1000 * switch_gap(v) for v in viewers if switch_gap(v) is not None]
            if switch:
                print(f"  last old frame -> first new publisher's frame (ms): p50 "
                      f"{percentile(switch, 50):.0f}  p95 {percentile(switch, 95):.0f}  "
                      f"max {max(switch):.0f}")
            await print_switches(cluster.relays, stream)
        finally:
            await host.close()
            await asyncio.gather(*(v.stop() for v in viewers), return_exceptions=True)
            if second is not None:
                await second.stop()
            await first.stop(delete=draining.alive())  # the drained origin is gone


def switch_gap(viewer: TimedViewer) -> float | None:
    """Seconds between the viewer's last decoded frame of the first publisher and its first of
    the second (frame numbers from 100,000)."""
    frames = list(zip(viewer.frame_times, viewer.counters, strict=True))
    first_new = next((i for i, (_, c) in enumerate(frames) if c >= 100_000), None)
    if not first_new:
        return None
    return frames[first_new][0] - frames[first_new - 1][0]


async def print_switches(relays: list[ServiceProcess], stream: str) -> None:
    """Each relay's pull moves and its stream's source switches (how they ended, how long each
    waited for the new source's key frame; absent on a relay without make-before-break)."""
    async with httpx.AsyncClient(timeout=5) as http:
        for index, relay in enumerate(relays):
            stats = (await http.get(f"{relay.url}/api/stats")).json()
            for worker in stats.get("workers", [stats]):  # a node of several workers
                entry = next((s for s in worker["streams"] if s["id"] == stream), None)
                if entry is None:
                    continue
                ends = {k: v for k, v in entry.get("switch_ends", {}).items() if v}
                print(f"relay-{index} worker {worker.get('worker', 0)}: origin moves "
                      f"{worker.get('origin_moves')}, stall re-pulls {worker.get('stall_repulls')}"
                      f", switches {ends or 'not counted'}, waited for the key frame (ms) "
                      f"{entry.get('switch_waits_ms', '-')}")


async def main(args: argparse.Namespace) -> None:
    if args.scenario in ("all", "relays"):
        await relays_scenarios(args)
    if args.scenario in ("all", "origin-drain"):
        await origin_drain(args)


async def relays_scenarios(args: argparse.Namespace) -> None:
    with RedisServer() as redis, scaled_cluster(redis, relays=args.relays,
                                                 capacity=args.capacity) as cluster:
        await remember_node_ids(cluster)
        publisher = Publisher(cluster.origin.url, STREAM, host_token(), fps=args.fps)
        await publisher.start()
        group: list[LadderViewer] = []
        try:
            await depth_latency(cluster, args.seconds)
            await asyncio.sleep(2 * 0.5 * 3)  # chain relays gone from the registry
            group = [LadderViewer(cluster.entry_urls, STREAM, room="benchroom", name=f"v{i}")
                     for i in range(args.viewers)]
            for viewer in group:
                await viewer.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(len(v.frame_times) < 10 for v in group):
                await asyncio.sleep(0.1)
            await cpu_per_viewer(cluster, group, args.seconds)
            await kill_one(cluster, group)
            await drain_one(cluster, group)
        finally:
            await asyncio.gather(*(v.stop() for v in group), return_exceptions=True)
            await publisher.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--relays", type=int, default=4)
    parser.add_argument("--capacity", type=int, default=4)
    parser.add_argument("--viewers", type=int, default=8)
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--scenario", choices=["all", "relays", "origin-drain"], default="all")
    parser.add_argument("--drain-viewers", type=int, default=20,
                        help="viewers (over two relays) of the origin drain scenario")
    asyncio.run(main(parser.parse_args()))
