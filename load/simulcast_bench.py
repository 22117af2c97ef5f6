"""Simulcast benchmark (issue 11): what three layers cost the server, how fast a viewer's layer
switch lands, and how many key-frame requests reach the host with lossy viewers.

One Redis, one origin (broadcaster) and one relay (one worker, the default native fan-out), all
on loopback. The publisher is load/simulcast_publisher.py: three real VP8 layers (h 320x240
1.5 Mbps, m 160x120 500 kbps, l 80x60 150 kbps, one libvpx encoder each) plus Opus, sent over
WHIP as a browser sends simulcast (one m-line, rid header extensions); with one layer the same
publisher is the single-layer one. It runs in this process: its CPU is not the server's. The
viewers are farm processes (load/simulcast_farm.py, at most fanout_bench.FARM_SIZE each) that
print their own CPU. Phases, in this order, each with a fresh publisher and farm:

1. single layer: N viewers of the one-layer publisher; one window: the relay's and the whole
   server's (relay + origin + Redis) CPU per packet the farm received.
2. simulcast: N viewers of the three-layer publisher, 10 % of them on Auto (the lossy ones
   later, viewer numbers 9 mod 10) and the rest pinned in turn to h, m, l with the WHEP layer
   POST of their session; the same CPU window; its ratio to phase 1 (target <= 1.10). The
   same window counts the PLI/FIR the publisher receives per layer: the key-frame requests per
   minute with no lossy viewer.
3. the same viewers, the lossy 10 % now dropping --loss of their RTP datagrams before SRTP
   (a fault injector in the farm's receive path: no root, no tc; aiortc NACKs the gaps and the
   viewer sends a PLI for a gap still open after 250 ms, at most one per 500 ms): key-frame
   requests reaching the publisher per minute, and what the lossy viewers sent.
4. every farm viewer POSTs the top layer: one more CPU window, as many packets as one layer
   sends, so the ratio to phase 1 isolates what the lower layers and their pulls cost.
5. layer switches, the farm still watching (no loss): --switchers aiortc viewers that decode,
   on the same relay, each POSTing a new layer --switches times; latency = from just before
   the POST to the first decoded frame of the new layer's size (its key frame, asked of the
   publisher by the relay).

Saturation: a window is marked SATURATED when the relay or a farm process used more than 90 % of
a core, or the farm received under 97 % of what the relay says it delivered; then measure at a
smaller --viewers (the largest that does not saturate) and say so.

    flock /tmp/bench.lock .venv/bin/python load/simulcast_bench.py --viewers 100 --seconds 20
    flock /tmp/bench.lock .venv/bin/python load/simulcast_bench.py --viewers 100 --profile py-spy
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import psutil
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fanout_bench import FARM_SIZE, _cpu_of, _start_profile, pct, summarize_profile
from media_support import host_token, running_cluster
from simulcast_publisher import LAYERS, SimulcastPublisher
from sse_support import LAYER_REL, parse_links

from lotcast.redis_server import RedisServer

HERE = Path(__file__).resolve().parent
SATURATED_CPU = 0.90  # of one core, for the relay and for each farm process
DELIVERY_FLOOR = 0.97  # farm received / relay delivered


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(verify=False, trust_env=False, timeout=30)


class Farm:
    """The farm processes of one phase (viewers numbered across them)."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, base_url: str, stream: str, n: int, pins: str) -> None:
        for first in range(0, n, FARM_SIZE):
            self.procs.append(await asyncio.create_subprocess_exec(
                sys.executable, str(HERE / "simulcast_farm.py"), base_url, stream,
                str(min(FARM_SIZE, n - first)), str(first), pins,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE))
        for proc in self.procs:  # they all join at once
            assert proc.stdout is not None
            ready = await asyncio.wait_for(proc.stdout.readline(), 300)
            if ready.strip() != b"READY":
                raise RuntimeError(f"farm: {ready!r}")

    async def command(self, line: str) -> list[dict[str, Any]]:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(line.encode() + b"\n")
            await proc.stdin.drain()
        out = []
        for proc in self.procs:
            assert proc.stdout is not None
            out.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), 60)))
        return out

    async def stop(self) -> list[dict[str, Any]]:
        results = []
        for proc in self.procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.close()
            results.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), 120)))
            await proc.wait()
        self.procs = []
        return results

    def kill(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


def _stream_stats(stats: dict[str, Any], stream: str) -> list[dict[str, Any]]:
    return [s for w in stats.get("workers", [stats]) for s in w.get("streams", [])
            if s["id"] == stream]


def _delivered(stats: dict[str, Any], stream: str) -> int:
    """Packets the relay sent its viewers of ``stream`` (audio + every video layer)."""
    total = 0
    for s in _stream_stats(stats, stream):
        total += s.get("audio_packets_sent", 0) - s.get("audio_send_drops", 0)
        layers = s.get("layers") or {}
        total += (sum(x["packets_sent"] for x in layers.values()) if layers
                  else s.get("video_packets_sent", 0))
        total -= s.get("video_send_drops", 0) + s.get("video_send_errors", 0)
    return total


def _counter(stats: dict[str, Any], stream: str, suffix: str) -> int:
    return sum(int(v) for s in _stream_stats(stats, stream) for k, v in s.items()
               if k.endswith(suffix))


async def _estimates(http: httpx.AsyncClient, url: str) -> float | None:
    """REMB estimates the relay took from its viewers so far (the lotcast_viewer_estimate_bps
    histogram's count in /metrics; None: not exposed)."""
    answer = await http.get(f"{url}/metrics")
    if answer.status_code != 200:
        return None
    counts = [float(line.rsplit(" ", 1)[1]) for line in answer.text.splitlines()
              if line.startswith("lotcast_viewer_estimate_bps_count")]
    return sum(counts) if counts else None


def _layers(stats: dict[str, Any], stream: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for s in _stream_stats(stats, stream):
        out.update(s.get("layers") or {})
    return out


class Servers:
    def __init__(self, relay_url: str, origin_url: str, relay_pid: int, whole: list[int]) -> None:
        self.relay_url, self.origin_url = relay_url, origin_url
        self.relay = [psutil.Process(relay_pid)]
        self.whole = self.relay + [psutil.Process(p) for p in whole]


async def window(servers: Servers, farm: Farm, stream: str, publisher: SimulcastPublisher,
                 seconds: float, profile: tuple[str, str] | None = None) -> dict[str, Any]:
    """One measured window; ``profile``: (relay's, origin's) profile outputs, both sampled
    through the window."""
    async with _client() as http:
        relay_before = (await http.get(f"{servers.relay_url}/api/stats")).json()
        origin_before = (await http.get(f"{servers.origin_url}/api/stats")).json()
        marks_before = await farm.command("MARK")
        estimates_before = await _estimates(http, servers.relay_url)
        cpu_before, whole_before = _cpu_of(servers.relay), _cpu_of(servers.whole)
        origin_cpu_before = _cpu_of(servers.whole[1:2])
        t0 = time.monotonic()
        profilers = [await _start_profile(out, proc, seconds) for out, proc in
                     zip(profile, [servers.relay[0], servers.whole[1]], strict=True)
                     ] if profile else []
        await asyncio.sleep(seconds)
        cpu, whole = _cpu_of(servers.relay) - cpu_before, _cpu_of(servers.whole) - whole_before
        origin_cpu = _cpu_of(servers.whole[1:2]) - origin_cpu_before
        marks_after = await farm.command("MARK")
        t1 = time.monotonic()
        relay_after = (await http.get(f"{servers.relay_url}/api/stats")).json()
        origin_after = (await http.get(f"{servers.origin_url}/api/stats")).json()
        estimates_after = await _estimates(http, servers.relay_url)
        for profiler in profilers:
            if profiler is not None:
                await asyncio.wait_for(profiler.wait(), 120)
    wall = t1 - t0
    farm_packets = sum(a["packets"] - b["packets"] for a, b in zip(marks_after, marks_before,
                                                                     strict=True))
    farm_cpu = [(a["cpu_s"] - b["cpu_s"]) / wall for a, b in zip(marks_after, marks_before,
                                                                  strict=True)]
    delivered = _delivered(relay_after, stream) - _delivered(relay_before, stream)
    origin_layers_before = _layers(origin_before, stream)
    origin_kf = {rid: x["keyframe_requests"] - origin_layers_before.get(rid, {}).get(
        "keyframe_requests", 0) for rid, x in _layers(origin_after, stream).items()}
    at_publisher = publisher.keyframe_requests(t0, t1)
    result = {
        "wall_s": wall,
        "relay_cpu": cpu / wall,
        "whole_cpu": whole / wall,
        "origin_cpu": origin_cpu / wall,
        "farm_cpu": farm_cpu,
        "farm_packets_per_s": farm_packets / wall,
        "relay_delivered_per_s": delivered / wall,
        "us_relay": 1e6 * cpu / max(1, farm_packets),
        "us_whole": 1e6 * whole / max(1, farm_packets),
        "us_relay_counted": 1e6 * cpu / max(1, delivered),
        "nacks_served_per_s": (_counter(relay_after, stream, "_nacks_served")
                               - _counter(relay_before, stream, "_nacks_served")) / wall,
        "keyframe_requests_at_publisher": at_publisher,
        "keyframe_requests_per_min": 60 * sum(at_publisher.values()) / wall,
        "origin_keyframe_requests": origin_kf,
        "farm_plis_per_min": 60 * sum(a["plis"] - b["plis"] for a, b in
                                      zip(marks_after, marks_before, strict=True)) / wall,
        "dropped_per_s": sum(a["dropped"] - b["dropped"] for a, b in
                             zip(marks_after, marks_before, strict=True)) / wall,
        "relay_layer_viewers": {rid: x["viewers"] for rid, x in
                                _layers(relay_after, stream).items()},
        "relay_viewers": sum(w.get("viewers", 0) for w in relay_after.get("workers",
                                                                         [relay_after])),
        "load_avg": psutil.getloadavg()[0],
        # REMBs from the viewers (aiortc's viewers send one per packet while their estimator
        # sees overuse, e.g. a farm process that falls behind)
        "rembs_per_s": (None if estimates_before is None or estimates_after is None
                        else (estimates_after - estimates_before) / wall),
    }
    reasons = []
    if result["relay_cpu"] > SATURATED_CPU:
        reasons.append(f"relay {100 * result['relay_cpu']:.0f}% of a core")
    if farm_cpu and max(farm_cpu) > SATURATED_CPU:
        reasons.append(f"a farm process {100 * max(farm_cpu):.0f}% of a core")
    if delivered and farm_packets < DELIVERY_FLOOR * delivered:
        reasons.append(f"farm received {farm_packets / delivered:.1%} of the relay's packets")
    result["saturated"] = "; ".join(reasons)
    return result


def _check_viewers(result: dict[str, Any], n: int) -> None:
    if result["relay_viewers"] < n:
        more = f"the relay has {result['relay_viewers']} of the {n} viewers"
        result["saturated"] = "; ".join(x for x in (result["saturated"], more) if x)


async def layer_sizes(base_url: str, stream: str, timeout: float = 30) -> dict[str, tuple[int, int]]:
    deadline = time.monotonic() + timeout
    async with _client() as http:
        while True:
            stats = (await http.get(f"{base_url}/api/stats")).json()
            sizes = {rid: tuple(x["size"]) for rid, x in _layers(stats, stream).items()
                     if x.get("size")}
            if len(sizes) == len(LAYERS) or time.monotonic() > deadline:
                return sizes  # type: ignore[return-value]
            await asyncio.sleep(0.3)


class SwitchingViewer:
    """An aiortc WHEP viewer that decodes video and records (time, size) of every frame."""

    def __init__(self, base_url: str, stream: str) -> None:
        self.url = f"{base_url}/whep/{stream}"
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.frames: list[tuple[float, int, int]] = []
        self.resource: str | None = None
        self.layer_url: str | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, http: httpx.AsyncClient) -> None:
        self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.addTransceiver("video", direction="recvonly")

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video":
                self._tasks.append(asyncio.ensure_future(self._video(track)))

        await self.pc.setLocalDescription(await self.pc.createOffer())
        response = await http.post(self.url, content=self.pc.localDescription.sdp,
                                   headers={"Content-Type": "application/sdp"})
        if response.status_code != 201:
            raise RuntimeError(f"WHEP {response.status_code}: {response.text}")
        self.resource = urljoin(self.url, response.headers["Location"])
        self.layer_url = parse_links(response.headers.get("Link", ""), self.resource)[LAYER_REL]
        await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))

    async def _video(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await track.recv()
                self.frames.append((time.monotonic(), frame.width, frame.height))  # type: ignore[attr-defined]

    async def switch(self, http: httpx.AsyncClient, rid: str, size: tuple[int, int],
                     timeout: float) -> float | None:
        """Seconds from the layer POST to the first decoded frame of ``size``; None: none came."""
        assert self.layer_url is not None
        start = time.monotonic()
        seen = len(self.frames)
        try:
            response = await http.post(self.layer_url, json={"encodingId": rid})
        except (httpx.ReadError, httpx.RemoteProtocolError):
            # a pooled keep-alive connection the server closed meanwhile: the POST is
            # idempotent, send it again on a new one
            response = await http.post(self.layer_url, json={"encodingId": rid})
        if response.status_code != 204:
            raise RuntimeError(f"layer POST {response.status_code}: {response.text}")
        while time.monotonic() - start < timeout:
            for at, width, height in self.frames[seen:]:
                if (width, height) == size:
                    return at - start
            seen = max(seen, len(self.frames) - 1)
            await asyncio.sleep(0.005)
        return None

    async def stop(self, http: httpx.AsyncClient) -> None:
        if self.resource:
            with contextlib.suppress(httpx.HTTPError):
                await http.delete(self.resource)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pc.close()


async def switch_latencies(relay_url: str, stream: str, sizes: dict[str, tuple[int, int]],
                           switchers: int, switches: int, timeout: float) -> dict[str, Any]:
    """Each viewer starts on the top layer, then cycles l, m, h, l, ... with a pause between.
    A viewer whose switch brings no frame of the new layer in ``timeout`` is counted as stuck
    and replaced by a fresh one (so the run still gets its samples)."""
    rids = [x.rid for x in LAYERS]
    order = rids[::-1]  # from the top: l, m, h, l, m, h ...
    latencies: dict[str, list[float]] = {rid: [] for rid in rids}
    stuck: list[str] = []
    async with _client() as http:

        async def one(index: int) -> None:
            viewer = SwitchingViewer(relay_url, stream)
            await viewer.start(http)
            try:
                deadline = time.monotonic() + 20
                while not viewer.frames and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                for k in range(switches):
                    rid = order[(k + index) % len(order)]
                    if k and viewer.frames and viewer.frames[-1][1:] == sizes[rid]:
                        rid = order[(k + index + 1) % len(order)]
                    await asyncio.sleep(1.0 + 0.3 * index)
                    latency = await viewer.switch(http, rid, sizes[rid], timeout)
                    if latency is None:
                        last = viewer.frames[-1] if viewer.frames else None
                        stuck.append(f"switch {k} to {rid}: no frame of {sizes[rid]} in "
                                     f"{timeout:.0f} s ({len(viewer.frames)} frames decoded, "
                                     f"last {last and last[1:]})")
                        await viewer.stop(http)
                        viewer = SwitchingViewer(relay_url, stream)
                        await viewer.start(http)
                        await asyncio.sleep(2.0)
                    else:
                        latencies[rid].append(latency)
            finally:
                await viewer.stop(http)

        await asyncio.gather(*(one(i) for i in range(switchers)))
    return {"latencies": latencies, "stuck": stuck}


async def phase(servers: Servers, stream: str, simulcast: bool, n: int, seconds: float,
                losses: list[float], profile: tuple[str, str] | None, switchers: int,
                switches: int) -> dict[str, Any]:
    publisher = SimulcastPublisher(servers.origin_url, stream, host_token(), simulcast=simulcast)
    await publisher.start()
    farm = Farm()
    out: dict[str, Any] = {}
    try:
        sizes = await layer_sizes(servers.origin_url, stream) if simulcast else {}
        await asyncio.sleep(2.0)
        pins = ",".join(x.rid for x in LAYERS) if simulcast else "auto"
        joined = time.monotonic()
        await farm.start(servers.relay_url, stream, n, pins)
        out["join_s"] = time.monotonic() - joined
        await asyncio.sleep(4.0)  # settle: ICE, the pinned viewers' first key frames
        out["clean"] = await window(servers, farm, stream, publisher, seconds, profile)
        _check_viewers(out["clean"], n)
        for fraction in losses if simulcast else []:
            await farm.command(f"LOSS {fraction}")
            await asyncio.sleep(2.0)
            out[f"lossy {fraction}"] = await window(servers, farm, stream, publisher, seconds)
            _check_viewers(out[f"lossy {fraction}"], n)
            await farm.command("LOSS 0")
        if simulcast:  # every viewer on the top layer: as many packets as one layer sends
            pinned = await farm.command(f"PIN {LAYERS[0].rid}")
            codes: dict[str, int] = {}
            for answer in pinned:
                for code, count in answer["codes"].items():
                    codes[code] = codes.get(code, 0) + count
            out["pin_codes"] = codes  # status -> viewers; anything but 204 is a finding
            await asyncio.sleep(4.0)
            out["all top"] = await window(servers, farm, stream, publisher, seconds)
            _check_viewers(out["all top"], n)
        if simulcast and switchers:  # with the farm still watching, its loss off
            out["sizes"] = sizes
            out["switch"] = await switch_latencies(servers.relay_url, stream, sizes, switchers,
                                                   switches, timeout=5.0)
        results = await farm.stop()
        out["without_video"] = sum(r["without_video"] for r in results)
        out["ttff_p95"] = pct([t for r in results for t in r["ttff"]], 0.95)
        out["lossy_viewers"] = sum(r["lossy"] for r in results)
        out["nacked_at_publisher"] = {x.spec.rid: x.nacked for x in publisher.layers}
    finally:
        farm.kill()
        await publisher.stop()
    return out


IDLE_LEAVES = ("epoll_pwait", "epoll_wait", "select", "poll", "__futex_abstimed_wait_common",
               "futex_wait", "pthread_cond_timedwait", "sem_timedwait")
# threads parked on a queue or lock (aiortc's idle decoder threads, the executor's workers)
IDLE_FRAMES = {"Condition.wait (threading.py)", "Queue.get (queue.py)",
               "_worker (concurrent/futures/thread.py)"}
BUSY = "(all busy samples)"


def profile_rates(profile: str, seconds: float, sample_ms: float = 10.0) -> dict[str, float]:
    """ms of CPU per second of the window, inclusive, per Python function (``name (file)``) of a
    py-spy raw profile (100 samples/s; stacks ending in an idle wait left out)."""
    rates: dict[str, float] = {}
    for line in Path(profile.partition(":")[2]).read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        frames = [f.rsplit(":", 1)[0] + ")" if ".py:" in f else f.split(" (")[0]
                  for f in stack.split(";")[1:]]
        if not frames or frames[-1] in IDLE_LEAVES or IDLE_FRAMES & set(frames):
            continue
        rate = int(count_text) * sample_ms / seconds
        rates[BUSY] = rates.get(BUSY, 0.0) + rate
        for frame in set(frames):
            rates[frame] = rates.get(frame, 0.0) + rate
    return rates


def print_profile_diff(profiles: dict[str, str], one: dict[str, Any], sim: dict[str, Any]) -> None:
    """Where the simulcast CPU goes: per node, the functions whose inclusive CPU grew most
    from the single-layer window to the simulcast one."""
    for node in ("relay", "origin"):
        single = profile_rates(profiles[f"{node}, single"], one["clean"]["wall_s"])
        simul = profile_rates(profiles[f"{node}, simulcast"], sim["clean"]["wall_s"])
        print(f"\n{node}: sampled busy CPU {single.get(BUSY, 0.0):.0f} ms/s single layer -> "
              f"{simul.get(BUSY, 0.0):.0f} ms/s simulcast (process CPU "
              f"{1000 * one['clean'][node + '_cpu']:.0f} -> {1000 * sim['clean'][node + '_cpu']:.0f}"
              " ms/s); the functions that grew most (inclusive ms of CPU per second):")
        grown = sorted(set(single) | set(simul),
                       key=lambda f: simul.get(f, 0.0) - single.get(f, 0.0), reverse=True)
        for frame in grown[:25]:
            print(f"  {single.get(frame, 0.0):7.1f} -> {simul.get(frame, 0.0):7.1f}  {frame}")


def _row(label: str, w: dict[str, Any]) -> str:
    farm = "/".join(f"{100 * c:.0f}" for c in w["farm_cpu"])
    return (f"{label:>22} {w['us_relay']:>9.2f} {w['us_whole']:>9.2f} {w['us_relay_counted']:>9.2f} "
            f"{w['farm_packets_per_s']:>10.0f} {w['relay_delivered_per_s']:>10.0f} "
            f"{w['nacks_served_per_s']:>7.0f} {100 * w['relay_cpu']:>6.0f}% "
            f"{100 * w['whole_cpu']:>6.0f}% {farm:>9}% {w['load_avg']:>5.1f}  {w['saturated'] or 'no'}")


def report(n: int, one: dict[str, Any], sim: dict[str, Any], profiles: dict[str, str]) -> None:
    lossy = {key: w for key, w in sim.items() if key.startswith("lossy ")}
    print(f"\n{n} viewers (farm processes of at most {FARM_SIZE}); simulcast: "
          f"{n - sim['lossy_viewers']} pinned in turn to h/m/l, {sim['lossy_viewers']} on Auto "
          f"(the lossy ones in the lossy windows)")
    print("µs of server CPU per packet the farm received (whole = relay + origin + Redis; "
          "'relay/sent': per packet the relay counts sent; 'NACK h+a': packets/s the relay resent "
          "on NACKs, top layer and audio)")
    print(f"{'window':>22} {'relay µs':>9} {'whole µs':>9} {'relay/sent':>9} {'farm pkt/s':>10} "
          f"{'relay pkt/s':>10} {'NACK h+a':>7} {'relay':>7} {'whole':>7} {'farm CPU':>10} "
          f"{'load':>5}  saturated")
    print(_row("single layer", one["clean"]))
    print(_row("simulcast", sim["clean"]))
    for key, w in lossy.items():
        print(_row(f"simulcast, {float(key.split()[1]):.0%} loss", w))
    print(_row("simulcast, all on h", sim["all top"]))
    if set(sim["pin_codes"]) != {"204"}:
        print(f"  the layer POSTs to h answered {sim['pin_codes']} (status: viewers)")
    rembs = [(label, w.get("rembs_per_s")) for label, w in
             (("single layer", one["clean"]), ("simulcast", sim["clean"]),
              ("all on h", sim["all top"]))]
    print("REMB estimates reaching the relay per second: " + ", ".join(
        f"{label} {'n/a' if value is None else f'{value:.0f}'}" for label, value in rembs))
    print(f"simulcast viewers per layer on the relay at the end of each window: "
          f"{sim['clean']['relay_layer_viewers']}, "
          + ", ".join(f"{k}: {w['relay_layer_viewers']}" for k, w in lossy.items()))
    for what in ("us_relay", "us_whole"):
        ratio = sim["clean"][what] / one["clean"][what]
        name = "relay" if what == "us_relay" else "whole server"
        print(f"CPU per delivered packet, {name}: simulcast {sim['clean'][what]:.2f} µs vs "
              f"single layer {one['clean'][what]:.2f} µs = {ratio:.2f}x "
              f"(target <= 1.10: {'met' if ratio <= 1.10 else 'MISSED'})")
    for what in ("us_relay", "us_whole"):
        ratio = sim["all top"][what] / one["clean"][what]
        name = "relay" if what == "us_relay" else "whole server"
        print(f"  the same {n} viewers all on h (as many packets as one layer): {name} "
              f"{sim['all top'][what]:.2f} µs = {ratio:.2f}x single layer")
    print(f"CPU per viewer-second, whole server: simulcast "
          f"{1000 * sim['clean']['whole_cpu'] / n:.3f} ms vs single layer "
          f"{1000 * one['clean']['whole_cpu'] / n:.3f} ms")
    print(f"CPU per viewer-second, whole server, all on h: "
          f"{1000 * sim['all top']['whole_cpu'] / n:.3f} ms")
    if one["clean"]["saturated"] or sim["clean"]["saturated"]:
        print(f"SATURATED at {n} viewers: measure at fewer")
    print(f"time to first frame p95: single {one['ttff_p95']:.2f} s, simulcast "
          f"{sim['ttff_p95']:.2f} s; viewers without video: {one['without_video']} / "
          f"{sim['without_video']}")
    windows = [("single layer, no lossy viewer", one["clean"]),
               ("simulcast, no lossy viewer", sim["clean"])]
    windows += [(f"simulcast, {sim['lossy_viewers']} viewers ({sim['lossy_viewers'] / n:.0%}) "
                 f"losing {float(k.split()[1]):.0%}", w) for k, w in lossy.items()]
    print("key-frame requests (PLI/FIR) reaching the publisher:")
    for label, w in windows:
        print(f"  {label}: {w['keyframe_requests_per_min']:.1f}/min "
              f"{w['keyframe_requests_at_publisher']} in {w['wall_s']:.0f} s; the origin asked "
              f"{w['origin_keyframe_requests']}; the farm's viewers sent "
              f"{w['farm_plis_per_min']:.1f} PLI/min")
    if "switch" in sim:
        lat = sim["switch"]["latencies"]
        every = [x for v in lat.values() for x in v]
        print(f"layer switch, WHEP layer POST -> first decoded frame of the new layer "
              f"({len(every)} switches; sizes {sim['sizes']}): p50 {1000 * pct(every, 0.5):.0f} ms, "
              f"p95 {1000 * pct(every, 0.95):.0f} ms, "
              f"max {1000 * max(every, default=float('nan')):.0f} ms")
        for rid, values in lat.items():
            print(f"  to {rid}: {len(values)} switches, p50 {1000 * pct(values, 0.5):.0f} ms, "
                  f"p95 {1000 * pct(values, 0.95):.0f} ms")
        for line in sim["switch"]["stuck"]:
            print(f"  STUCK: {line}")
    print(f"NACKed packets resent by the publisher: single {one['nacked_at_publisher']}, "
          f"simulcast {sim['nacked_at_publisher']}")
    for name, profile in profiles.items():
        print(f"\n--- profile of the {name} ({profile}) ---")
        print(summarize_profile(profile))
    if profiles and all(p.startswith("py-spy:") for p in profiles.values()):
        print_profile_diff(profiles, one, sim)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--viewers", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0, help="each window")
    parser.add_argument("--loss", type=float, nargs="*", default=[0.05, 0.4],
                        help="fraction of RTP datagrams a lossy viewer drops: a window each "
                             "(none: --loss alone, for a CPU-only run)")
    parser.add_argument("--switchers", type=int, default=3)
    parser.add_argument("--switches", type=int, default=10, help="per switching viewer")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--profile", choices=("py-spy", "perf"),
                        help="profile the relay and the origin in both CPU windows")
    args = parser.parse_args()
    relay_args = ["--max-viewers", "5000", "--workers", "1"]
    profiles: dict[str, str] = {}
    with RedisServer() as redis, running_cluster(redis, relay_args=relay_args) as cluster:
        servers = Servers(cluster.relay.url, cluster.origin.url, cluster.relay.pid,
                          [cluster.origin.pid, redis._proc.pid])  # type: ignore[union-attr]
        try:
            suffix = "txt" if args.profile == "py-spy" else "data"
            for name in ("single", "simulcast"):
                for node in ("relay", "origin"):
                    if args.profile:
                        profiles[f"{node}, {name}"] = (f"{args.profile}:/tmp/simulcast-{node}-"
                                                       f"{name}.{suffix}")

            def of(name: str) -> tuple[str, str] | None:
                return ((profiles[f"relay, {name}"], profiles[f"origin, {name}"])
                        if args.profile else None)

            one = await phase(servers, "bench-one", False, args.viewers, args.seconds, args.loss,
                              of("single"), 0, 0)
            await asyncio.sleep(2.0)
            sim = await phase(servers, "bench-sim", True, args.viewers, args.seconds, args.loss,
                              of("simulcast"), args.switchers, args.switches)
        except Exception:
            print("".join(cluster.relay.output[-30:]), file=sys.stderr)
            print("".join(cluster.origin.output[-30:]), file=sys.stderr)
            raise
    report(args.viewers, one, sim, profiles)
    if args.json:
        args.json.write_text(json.dumps({"viewers": args.viewers, "single": one, "simulcast": sim},
                                        default=list))


if __name__ == "__main__":
    asyncio.run(main())
