"""Per-viewer fixed costs: what an (almost) idle WHEP viewer costs a relay per second.

One publisher sends a near-paused source (2 video frames and 2 audio frames a second, so the
stream stays live and the relay's stall detector never re-pulls, but forwarding costs next to
nothing) to the origin. Two relays pull it: one on the lean RTCP path (lotcast/media/
viewer_rtcp.py: one Sender Report clock, our own RTCP parser) and one on aiortc's own
(LOTCAST_LEAN_RTCP=0: an RTCP task per sender, aiortc's parser and stats). Both are measured in
the same windows: first with one viewer each (the relay's baseline: its pull of the stream),
then with N more aiortc viewers each (one viewer farm process per relay, load/viewer_farm.py).
The per-viewer cost is

    (relay CPU with N + 1 viewers - relay CPU with 1) / (N x window)

printed in ms of CPU per viewer-second, with what the relay still forwarded meanwhile and the
farms' own CPU (near 100% of a core: the farm, not the relay, was the limit).

    flock /tmp/bench.lock .venv/bin/python load/idle_viewer_bench.py --viewers 100 --seconds 20
    ... --profile py-spy      # py-spy of both relays during the viewer window
    ... --compare consent     # the second relay keeps aioice's consent task per connection
                              # (LOTCAST_LEAN_CONSENT=0) instead of aiortc's RTCP
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import psutil
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fanout_bench import _start_profile, _tree_cpu, summarize_profile
from media_support import Publisher, host_token, http_client, running_cluster

from lotcast.media.testsource import CounterVideoTrack
from lotcast.media.viewer_rtcp import ENV as LEAN_ENV
from lotcast.redis_server import RedisServer
from lotcast.supervisor import ServiceProcess

HERE = Path(__file__).resolve().parent
STREAM = "idle"
FPS = 2


class SlowAudio(AudioStreamTrack):
    """aiortc's silence, FPS frames a second (each 20 ms long, timestamps jump between them)."""

    def __init__(self) -> None:
        super().__init__()
        self._pts = 0

    async def recv(self) -> Any:
        frame = await super().recv()
        await asyncio.sleep(1 / FPS)
        self._pts += 48000 // FPS
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, 48000)
        return frame


async def stream_counters(http: Any, url: str) -> dict[str, int]:
    stats = (await http.get(f"{url}/api/stats")).json()
    stream = next((s for s in stats["streams"] if s["id"] == STREAM), {})
    return {k: int(v) for k, v in stream.items() if isinstance(v, int)}


async def window(relays: dict[str, ServiceProcess], seconds: float,
                 profile: str | None = None) -> dict[str, dict[str, float]]:
    procs = {path: psutil.Process(r.pid) for path, r in relays.items()}
    async with http_client() as http:
        before = {path: await stream_counters(http, r.url) for path, r in relays.items()}
        cpu0 = {path: _tree_cpu(p) for path, p in procs.items()}
        wall0 = time.monotonic()
        profilers = []
        if profile:
            for path, p in procs.items():
                suffix = "txt" if profile == "py-spy" else "data"
                profilers.append(await _start_profile(f"{profile}:/tmp/idle-{path}.{suffix}", p,
                                                      seconds))
        await asyncio.sleep(seconds)
        cpu1 = {path: _tree_cpu(p) for path, p in procs.items()}
        wall = time.monotonic() - wall0
        after = {path: await stream_counters(http, r.url) for path, r in relays.items()}
        for profiler in profilers:
            if profiler is not None:
                await asyncio.wait_for(profiler.wait(), 120)
    out = {}
    for path in relays:
        sent = sum(after[path].get(k, 0) - before[path].get(k, 0)
                   for k in ("audio_packets_sent", "video_packets_sent"))
        out[path] = {"cpu_s": cpu1[path] - cpu0[path], "wall_s": wall, "sent_per_s": sent / wall}
    return out


async def start_farm(url: str, n: int) -> tuple[asyncio.subprocess.Process, psutil.Process]:
    farm = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "viewer_farm.py"), url, STREAM, str(n),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert farm.stdout is not None
    ready = await asyncio.wait_for(farm.stdout.readline(), 300)
    assert ready.strip() == b"READY", ready
    return farm, psutil.Process(farm.pid)


async def stop_farm(farm: asyncio.subprocess.Process) -> None:
    assert farm.stdin is not None and farm.stdout is not None
    farm.stdin.close()
    json.loads(await asyncio.wait_for(farm.stdout.readline(), 120))
    await farm.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--viewers", type=int, default=100, help="viewers per relay")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--profile", choices=("py-spy", "perf"))
    parser.add_argument("--compare", choices=("rtcp", "consent"), default="rtcp",
                        help="what the second relay does the old way: its RTCP "
                             "(LOTCAST_LEAN_RTCP=0) or its ICE consent checks "
                             "(LOTCAST_LEAN_CONSENT=0, one aioice task per connection)")
    args = parser.parse_args()
    old_env, old_name = ((LEAN_ENV, "aiortc") if args.compare == "rtcp"
                         else ("LOTCAST_LEAN_CONSENT", "aioice"))
    relay_args = ["--max-viewers", "5000", "--workers", "1"]
    with RedisServer() as redis, running_cluster(redis, relay_args=relay_args) as cluster:
        relays = {"lean": cluster.relay}
        old = ServiceProcess("relay", ["--port", "0", "--origin-url", cluster.origin.url,
                                       "--node-id", f"relay-{old_name}-{args.compare}",
                                       *relay_args],
                             env={**cluster.env, old_env: "0"}).start()
        cluster.extra.append(old)
        relays[old_name] = old
        publisher = Publisher(cluster.origin.url, STREAM, host_token())
        await publisher.pc.close()  # replaced by one with the slow tracks
        publisher.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        publisher.video = CounterVideoTrack(FPS)
        publisher.pc.addTrack(SlowAudio())
        publisher.pc.addTrack(publisher.video)
        await _start_without_tracks(publisher)
        try:
            # each relay pulls the stream with its first viewer, who stays for the whole run:
            # the baseline is a relay serving the stream to one viewer
            first = [await start_farm(r.url, 1) for r in relays.values()]
            await asyncio.sleep(2.0)
            base = await window(relays, args.seconds)
            farms = {}
            for path, relay in relays.items():
                farms[path] = await start_farm(relay.url, args.viewers)
            await asyncio.sleep(3.0)
            farm_cpu0 = {p: sum(f[1].cpu_times()[:2]) for p, f in farms.items()}
            loaded = await window(relays, args.seconds, args.profile)
            farm_cpu = {p: sum(f[1].cpu_times()[:2]) - farm_cpu0[p] for p, f in farms.items()}
            for farm, _ in [*farms.values(), *first]:
                await stop_farm(farm)
        finally:
            await publisher.stop()
    n = args.viewers
    print(f"\n{n} viewers per relay, near-idle source ({FPS} video + {FPS} audio frames/s), "
          f"{args.seconds:.0f} s windows, both relays measured at once")
    print(f"{args.compare + ' path':>12} {'relay CPU idle':>14} {'with viewers':>12} "
          f"{'ms CPU/viewer-s':>15} {'pkts sent/s':>11} {'farm CPU':>8}")
    per: dict[str, float] = {}
    for path in relays:
        b, r = base[path], loaded[path]
        idle_pct = 100 * b["cpu_s"] / b["wall_s"]
        load_pct = 100 * r["cpu_s"] / r["wall_s"]
        per[path] = 1000 * (r["cpu_s"] / r["wall_s"] - b["cpu_s"] / b["wall_s"]) / n
        print(f"{path:>12} {idle_pct:>13.1f}% {load_pct:>11.1f}% {per[path]:>15.3f} "
              f"{r['sent_per_s']:>11.0f} {100 * farm_cpu[path] / r['wall_s']:>7.0f}%")
    if per.get(old_name):
        print(f"lean / {old_name} {args.compare} per-viewer cost: "
              f"{per['lean'] / per[old_name]:.2f}x")
    if args.profile:
        for path in relays:
            suffix = "txt" if args.profile == "py-spy" else "data"
            print(f"\n--- profile of the {path} relay with {n} viewers ---")
            print(summarize_profile(f"{args.profile}:/tmp/idle-{path}.{suffix}"))


async def _start_without_tracks(publisher: Publisher) -> None:
    """Publisher.start() without adding its own tracks (ours are already on the pc)."""
    pc = publisher.pc
    await pc.setLocalDescription(await pc.createOffer())
    async with http_client() as http:
        response = await http.post(publisher.url, content=pc.localDescription.sdp,
                                   headers={"Content-Type": "application/sdp",
                                            "Authorization": f"Bearer {publisher.token}"})
    assert response.status_code == 201, (response.status_code, response.text)
    publisher.resource = urljoin(publisher.url, response.headers["Location"])
    await pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))


if __name__ == "__main__":
    asyncio.run(main())
