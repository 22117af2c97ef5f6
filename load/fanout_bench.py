"""Fan-out benchmark: one publisher (~1.5 Mbps VP8 + Opus) → broadcaster → relay → N viewers.

Relays pull the same stream from the same origin, one per --paths entry: the native fan-out
path (lotcast/media/_fanout.c, lean RTCP: the default), the Python path (LOTCAST_NATIVE_FANOUT=0)
the native path with aiortc's own per-viewer RTCP (aiortc-rtcp: LOTCAST_LEAN_RTCP=0), and the
default with one UDP port for all its viewers (mux: --udp-port). For each N all are measured at
once, each with its own farm of N viewers (same farm code, same source
packets, same machine load; --one-at-a-time measures them in turn), and the bench prints: the
relay's CPU per
delivered packet and per viewer-second, packets/s it delivers, the farm's own CPU (when the farm
is near a full core, the farm, not the relay, was the limit), glass-to-glass p50/p95 through the
relay and directly from the origin (same run), time to first frame p95, and ratios to two floors
measured here: SRTP protect + sendto of same-sized packets in a plain C loop (the C floor,
libsrtp from pylibsrtp, compiled with the extension) and in a tight Python loop; and the
forwarder's per-packet loop alone on both paths. Most viewers only count packets; per relay two
decode and read the capture time painted into each frame (one through it, one from the origin).

--paths workers2 adds the default relay with 2 worker processes (--workers 2). --janus adds Janus
1.1.2's streaming plugin (load/janus_peer.py; scripts/bench-setup.sh installs it, as root, when
missing; the test suite never needs it), fed the very RTP packets the origin sends our relays and
watched by the same farm code through Janus's HTTP API. Every server is then also measured by the
packets its farm received (the farm's MARK counts) over the same window as its process CPU, and
printed with its ratio to Janus (same viewer count, same run) and to the C floor; ours both as the
relay alone and as the whole server (relay + broadcaster + Redis). Farms are processes of at most
FARM_SIZE viewers. Use --one-at-a-time with --janus on a small machine (three farms at once
measure the farms).

    .venv/bin/python load/fanout_bench.py --viewers 30 60 --seconds 15
    flock /tmp/bench.lock .venv/bin/python load/fanout_bench.py --paths native workers2 --janus \
        --viewers 60 --seconds 15 --one-at-a-time
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pylibsrtp
from aiortc import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from media_support import Publisher, Viewer, host_token, http_client, running_cluster

sys.path.insert(0, str(Path(__file__).resolve().parent))

from janus_peer import JanusServer, OriginFeed

from lotcast.media import native
from lotcast.media.aiortc_hooks import (
    _widen_srtp_session,
    fast_protect,
    native_target,
    set_encoder_bitrate,
)
from lotcast.media.forwarder import ForwardSink, TrackForwarder
from lotcast.media.viewer_rtcp import ENV as LEAN_RTCP_ENV
from lotcast.redis_server import RedisServer
from lotcast.supervisor import ServiceProcess

HERE = Path(__file__).resolve().parent

STREAM = "bench"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _bench_session() -> Any:
    policy = pylibsrtp.Policy(key=os.urandom(30), ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
                              srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80)
    session = pylibsrtp.Session(policy)
    _widen_srtp_session(session)
    return session


def _loopback_sink() -> socket.socket:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sink.setblocking(False)
    return sink


def _empty(sink: socket.socket) -> None:
    """Read what arrived (untimed), so every timed send is a delivery, not a full-queue drop."""
    with contextlib.suppress(BlockingIOError):
        while True:
            sink.recv(65536)


def _floor_packets(packet_size: int, chunk: int = 100) -> list[bytes]:
    return [bytes([0x80, 96]) + i.to_bytes(2, "big") + bytes(8) + os.urandom(packet_size - 12)
            for i in range(chunk)]


def c_floor(packet_size: int, count: int = 20000) -> float:
    """CPU seconds per packet to SRTP-protect and sendto one packet on loopback, in C."""
    if not native.available():
        return float("nan")
    sink, sender = _loopback_sink(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    packets = _floor_packets(packet_size)
    target = native_target(_bench_session(), sender.fileno(), sink.getsockname())
    native.protect_send_loop(target, packets[:1], 1, 0xFFFF)  # the session's stream set up
    elapsed, sent = 0.0, 0
    for chunk in range(count // len(packets)):
        start = time.process_time()
        sent += native.protect_send_loop(target, packets, 1, chunk * len(packets))
        elapsed += time.process_time() - start
        _empty(sink)
    sink.close()
    sender.close()
    return elapsed / max(1, sent)


def srtp_send_floor(packet_size: int, count: int = 20000) -> float:
    """CPU seconds per packet to SRTP-protect and sendto one packet on loopback (Python)."""
    sink, sender = _loopback_sink(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    addr = sink.getsockname()
    template = _floor_packets(packet_size)
    protect, sendto = fast_protect(_bench_session()), sender.sendto  # the relay's own path
    protect(template[0][:2] + b"\xff\xff" + template[0][4:])  # the session's stream set up
    elapsed, sent = 0.0, 0
    for chunk in range(count // len(template)):
        packets = [p[:2] + ((chunk * len(template) + i) & 0xFFFF).to_bytes(2, "big") + p[4:]
                   for i, p in enumerate(template)]
        start = time.process_time()
        for packet in packets:
            sendto(protect(packet), addr)
        elapsed += time.process_time() - start
        sent += len(packets)
        _empty(sink)
    sink.close()
    sender.close()
    return elapsed / max(1, sent)


class _BenchSender:
    """A viewer's send side without a peer connection: its own SRTP session and UDP socket,
    with the same fast_protect and native target a resolved PacketSender has."""

    def __init__(self, dest: tuple[str, int], sock: socket.socket | None = None) -> None:
        self.session = _bench_session()
        self.sock = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.addr = dest
        self.protect = fast_protect(self.session)
        self.sendto = self.sock.sendto
        self.native = native_target(self.session, self.sock.fileno(), dest)

    def send(self, data: bytes) -> None:
        self.sendto(self.protect(data), self.addr)

    def alive(self) -> bool:
        return True


async def fanout_loop_cost(viewers: int, path: str, size: int, packets: int = 400,
                           shared: bool = False) -> float:
    """CPU seconds per packet-copy of TrackForwarder's per-packet loop alone (no RTCP, no
    receive path), on one path, with ``viewers`` sinks of their own session and socket (or,
    ``shared``, one socket for all: what one UDP port per worker gives, sendmmsg)."""
    os.environ[native.ENV] = "1" if path == "native" else "0"
    try:
        codec = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2,
                                      payloadType=111)
        forwarder = TrackForwarder("audio", codec, output_ssrc=1)
        sink_socket = _loopback_sink()
        one = socket.socket(socket.AF_INET, socket.SOCK_DGRAM) if shared else None
        senders = [_BenchSender(sink_socket.getsockname(), one) for _ in range(viewers)]
        for sender in senders:
            forwarder.add_sink(ForwardSink(sender, SimpleNamespace(), 111))  # type: ignore[arg-type]
        payload = os.urandom(size - 12)
        elapsed = 0.0
        for seq in range(packets):
            forwarder.on_source_packet(RtpPacket(payload_type=111, sequence_number=seq,
                                                 timestamp=960 * seq, ssrc=7, payload=payload))
            start = time.process_time()
            forwarder._drain()
            elapsed += time.process_time() - start
            _empty(sink_socket)
        forwarder.close()
        for sender in senders:
            sender.sock.close()
        sink_socket.close()
        return elapsed / (forwarder.packets_sent or 1)
    finally:
        os.environ.pop(native.ENV, None)


def _tree_cpu(proc: psutil.Process) -> float:
    """CPU seconds of a node and its worker processes (a relay may run its workers as children)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


FARM_SIZE = 50  # viewers per farm process: one Python process cannot read 200 viewers' packets


async def _farm_mark(farms: list[asyncio.subprocess.Process]) -> dict[str, float]:
    total = {"packets": 0.0, "cpu_s": 0.0}
    for farm in farms:
        assert farm.stdin is not None and farm.stdout is not None
        farm.stdin.write(b"MARK\n")
        await farm.stdin.drain()
    for farm in farms:
        assert farm.stdout is not None
        mark = json.loads(await asyncio.wait_for(farm.stdout.readline(), 60))
        total["packets"] += mark["packets"]
        total["cpu_s"] += mark["cpu_s"]
    return total


def _cpu_of(procs: list[psutil.Process]) -> float:
    return sum(_tree_cpu(p) for p in procs)


async def measure(relay_url: str | None, origin_url: str, n: int, seconds: float,
                  profile: str | None = None, janus: Any = None) -> dict[str, float]:
    """One window of one server with a farm of its own: our relay (relay_url), or Janus
    (relay_url None, ``janus`` a JanusServer: the farm watches its mountpoint and there are no
    decoding viewers). Delivered packets are counted at the farm for both (for ours also from
    the relay's own counters); the farm of a relay has n - 1 viewers (the n-th decodes), so its
    count is scaled by n / (n - 1)."""
    if relay_url is not None:
        server_procs = [psutil.Process(_PIDS[relay_url])]
        target, stream, count = relay_url, STREAM, max(0, n - 1)
    else:
        server_procs = [psutil.Process(janus.pid)]
        target, stream, count = f"janus:{janus.ice_ip}:{janus.url}", "1", n
    whole_procs = server_procs + ([psutil.Process(pid) for pid in _WHOLE_SERVER_PIDS]
                                  if relay_url else [])
    sizes = [FARM_SIZE] * (count // FARM_SIZE) + ([count % FARM_SIZE] if count % FARM_SIZE else [])
    farms = [await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "viewer_farm.py"), target, stream, str(size),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    ) for size in sizes or [0]]
    for farm in farms:  # they all join at once: first frame with N viewers joining
        assert farm.stdout is not None
        ready = await asyncio.wait_for(farm.stdout.readline(), 300)
        assert ready.strip() == b"READY", ready
    decoding_relay = Viewer(relay_url, STREAM) if relay_url else None
    decoding_origin = Viewer(origin_url, STREAM) if relay_url else None
    async with http_client() as http:
        for viewer in (decoding_relay, decoding_origin):
            if viewer is not None:
                await viewer.start()
        await asyncio.sleep(3.0)  # settle: ICE, key frames

        async def stats() -> dict[str, Any]:
            return (await http.get(f"{relay_url}/api/stats")).json() if relay_url else {}

        stats_before = await stats()
        mark_before = await _farm_mark(farms)
        cpu_before, whole_before = _cpu_of(server_procs), _cpu_of(whole_procs)
        wall_before = time.monotonic()
        for viewer in (decoding_relay, decoding_origin):
            if viewer is not None:
                viewer.delays_ms.clear()
        profiler = await _start_profile(profile, server_procs[0], seconds)
        await asyncio.sleep(seconds)
        cpu_after, whole_after = _cpu_of(server_procs), _cpu_of(whole_procs)
        mark_after = await _farm_mark(farms)
        wall = time.monotonic() - wall_before
        stats_after = await stats()
        if profiler is not None:
            await asyncio.wait_for(profiler.wait(), 120)
    cpu = cpu_after - cpu_before
    whole = whole_after - whole_before
    farm_cpu = mark_after["cpu_s"] - mark_before["cpu_s"]
    ttff: list[float] = []
    without_video = 0
    for farm in farms:
        assert farm.stdin is not None and farm.stdout is not None
        farm.stdin.close()
        farm_result = json.loads(await asyncio.wait_for(farm.stdout.readline(), 120))
        await farm.wait()
        ttff += farm_result["ttff"]
        without_video += farm_result.get("without_video", 0)
    farm_packets = mark_after["packets"] - mark_before["packets"]
    if relay_url is not None and n > 1:
        farm_packets *= n / (n - 1)
    result = {
        "viewers": n,
        "relay_cpu_s": cpu,
        "wall_s": wall,
        "relay_cpu_pct": 100 * cpu / wall,
        "whole_cpu_pct": 100 * whole / wall,
        "farm_cpu_pct": 100 * farm_cpu / wall,
        "farm_delivered_per_s": farm_packets / wall,
        "us_per_farm_packet": 1e6 * cpu / max(1, farm_packets),
        "us_whole_per_farm_packet": 1e6 * whole / max(1, farm_packets),
        "without_video": without_video,
        "farm_procs": len(farms),
        "cpu_ms_per_viewer_s": 1000 * cpu / (n * wall),
        "g2g_relay_p50": float("nan"), "g2g_relay_p95": float("nan"),
        "g2g_direct_p50": float("nan"), "g2g_direct_p95": float("nan"),
    }
    if decoding_relay is not None and decoding_origin is not None:
        if decoding_relay.first_frame_at is not None:
            ttff.append(decoding_relay.first_frame_at - decoding_relay.started_at)
        await decoding_relay.stop()
        await decoding_origin.stop()
        result.update({
            "g2g_relay_p50": pct(decoding_relay.delays_ms, 0.5),
            "g2g_relay_p95": pct(decoding_relay.delays_ms, 0.95),
            "g2g_direct_p50": pct(decoding_origin.delays_ms, 0.5),
            "g2g_direct_p95": pct(decoding_origin.delays_ms, 0.95),
        })
    result["ttff_p95_s"] = pct(ttff, 0.95)
    if relay_url is None:
        result["us_per_delivered"] = result["us_per_farm_packet"]
        result["delivered_per_s"] = result["farm_delivered_per_s"]
        return result

    def counter(stats: dict[str, Any], suffix: str) -> int:
        # a relay with workers answers with every worker's own stats under "workers"
        streams = [s for w in stats.get("workers", [stats]) for s in w.get("streams", [])
                   if s["id"] == STREAM]
        # <kind>_native_packets_sent is a subset of <kind>_packets_sent, not more packets
        return sum(int(v) for stream in streams for k, v in stream.items()
                   if k.endswith(suffix) and not k.endswith("_native" + suffix))

    def delta(suffix: str) -> int:
        return counter(stats_after, suffix) - counter(stats_before, suffix)

    delivered = delta("_packets_sent") - delta("_send_drops") - delta("_send_errors")
    result.update({
        "us_per_delivered": 1e6 * cpu / max(1, delivered),
        "delivered_per_s": delivered / wall,
        "packets_sent_per_s": delta("_packets_sent") / wall,
        "packets_in_per_s": delta("_packets_in") / wall,
    })
    return result


_PIDS: dict[str, int] = {}
# the rest of our server (broadcaster and Redis), added to a relay's CPU for the whole-server
# figure; Janus's own process does all of it (it ingests plain RTP, we ingest WHIP over SRTP)
_WHOLE_SERVER_PIDS: list[int] = []
# each path is a relay of its own: native fan-out + lean RTCP (the default), the Python fan-out
# (LOTCAST_NATIVE_FANOUT=0), and native fan-out with aiortc's own RTCP per viewer
# (LOTCAST_LEAN_RTCP=0: an RTCP task per sender, aiortc's parser; the per-viewer path before it)
# and the default with one UDP port for all its viewers (mux: --udp-port, sendmmsg)
# and the default with 2 worker processes (workers2: --workers 2, one UDP port per worker)
PATHS = ("native", "python", "aiortc-rtcp", "mux", "workers2")
PATH_ENV = {"native": {}, "python": {native.ENV: "0"}, "aiortc-rtcp": {LEAN_RTCP_ENV: "0"},
            "mux": {}, "workers2": {}}
FANOUT_OF = {"native": "native", "python": "python", "aiortc-rtcp": "native", "mux": "native",
             "workers2": "native"}


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _start_profile(profile: str | None, proc: psutil.Process,
                         seconds: float) -> asyncio.subprocess.Process | None:
    """py-spy (Python stacks with native frames) or perf (C and kernel symbols) on the relay
    and its worker processes."""
    if profile is None:
        return None
    kind, _, out = profile.partition(":")
    pids = ",".join(str(p.pid) for p in [proc, *proc.children(recursive=True)])
    if kind == "py-spy":
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        command = [py_spy, "record", "--pid", str(proc.pid), "--subprocesses",
                   "--duration", str(int(seconds)),
                   "--rate", "100", "--native", "--format", "raw", "--output", out]
    else:
        # DWARF unwinding: libpython and the extension have no frame pointers
        command = ["perf", "record", "-F", "199", "--call-graph", "dwarf,16384", "-p", pids,
                   "-o", out, "--", "sleep", str(int(seconds))]
    return await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)


def summarize_profile(profile: str) -> str:
    """Top frames of a finished profile, as text for docs/benchmarks.md."""
    kind, _, out = profile.partition(":")
    if kind == "perf":
        lines = []
        for title, sort, children, limit in (("self time by object", "dso", "--no-children", "0.5"),
                                             ("self time by symbol", "dso,sym", "--no-children", "1.5"),
                                             ("inclusive by symbol", "sym", "--children", "4")):
            report = subprocess.run(["perf", "report", "-i", out, "--stdio", children, "--sort", sort,
                                     "-g", "none", "--percent-limit", limit],
                                    capture_output=True, text=True, timeout=600, check=False)
            lines.append(f"{title}:")
            lines += [line.rstrip() for line in report.stdout.splitlines()
                      if line.strip() and not line.startswith("#")][:30]
        return "\n".join(lines)
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in Path(out).read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [f.split(" (")[0] for f in stack.split(";")]
        self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples; self time:"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in self_time.most_common(20)]
    lines.append("inclusive:")
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in inclusive.most_common(30)]
    return "\n".join(lines)


def print_farm_counted(rows: list[tuple[str, dict[str, float]]], floor_c: float) -> None:
    """Every server, Janus included, by the packets its farm received: server CPU (ours: the
    relay, and the whole server = relay + broadcaster + Redis; Janus: its one process) per packet,
    ratios to Janus (same viewer count, same run) and to the C floor, and viewers per core at
    the measured cost (an extrapolation: this machine's farms saturate before the servers)."""
    floor_us = floor_c * 1e6
    janus = {int(r["viewers"]): r for path, r in rows if path == "janus"}
    print("\ncounted at the farm (packets the viewers received), µs of server CPU per packet:")
    print(f"{'server':>11} {'viewers':>7} {'server µs':>9} {'whole µs':>8} {'x floor':>7} "
          f"{'whole x floor':>13} {'whole x Janus':>13} {'relay x Janus':>13} "
          f"{'farm pkts/s':>11} {'server CPU':>10} {'whole CPU':>9} {'farm CPU':>8} "
          f"{'no video':>8} {'TTFF p95':>8} {'viewers/core':>12}")
    cost: dict[tuple[str, int], float] = {}
    for path, r in rows:
        n = int(r["viewers"])
        whole = r["us_per_farm_packet"] if path == "janus" else r["us_whole_per_farm_packet"]
        jr = janus.get(n)
        vs_janus = (f"{whole / jr['us_per_farm_packet']:.2f}" if jr and path != "janus"
                    else "-")
        relay_vs_janus = (f"{r['us_per_farm_packet'] / jr['us_per_farm_packet']:.2f}"
                          if jr and path != "janus" else "-")
        per_viewer_s = r["relay_cpu_s"] / (n * r["wall_s"])
        cost[(path, n)] = per_viewer_s
        print(f"{path:>11} {n:>7} {r['us_per_farm_packet']:>9.2f} {whole:>8.2f} "
              f"{r['us_per_farm_packet'] / floor_us:>7.2f} {whole / floor_us:>13.2f} "
              f"{vs_janus:>13} {relay_vs_janus:>13} {r['farm_delivered_per_s']:>11.0f} "
              f"{r['relay_cpu_pct']:>9.0f}% {r['whole_cpu_pct']:>8.0f}% "
              f"{r['farm_cpu_pct']:>7.0f}% {int(r['without_video']):>8} "
              f"{r['ttff_p95_s']:>7.3f}s {1 / per_viewer_s if per_viewer_s else 0:>12.0f}")
    for (path, n), c in cost.items():
        if path == "workers2" and ("native", n) in cost:
            one = cost[("native", n)]
            print(f"{n} viewers: 2 workers cost {1000 * c:.2f} vs 1 worker {1000 * one:.2f} ms CPU "
                  f"per viewer-second: 2 workers on 2 cores would serve {2 / c:.0f} viewers, "
                  f"{(2 / c) / (2 / one):.2f} x 2 x one worker's {1 / one:.0f} (target >= 0.9)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--viewers", type=int, nargs="+", default=[30, 60])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--bitrate", type=int, default=1_500_000, help="publisher video bits/s")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=["native", "python"],
                        help="fan-out paths to measure (each on its own relay, same farm)")
    parser.add_argument("--floor-size", type=int, default=1100, help="floor packet bytes")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="measure the relays one after the other (default: both at once)")
    parser.add_argument("--profile", choices=("py-spy", "perf"),
                        help="profile the relay during the last viewer count, each path")
    parser.add_argument("--janus", action="store_true",
                        help="also Janus 1.1.2's streaming plugin (installed by "
                             "scripts/bench-setup.sh when missing), fed the same RTP, same farm")
    parser.add_argument("--janus-event-loops", type=int, default=0,
                        help="Janus's event_loops (0, its default: a loop and thread per viewer)")
    args = parser.parse_args()
    os.environ.pop(native.ENV, None)  # the native relay must not inherit an off switch
    if "native" in args.paths and not native.available():
        raise SystemExit(f"native fan-out not built here: {native.IMPORT_ERROR}")

    relay_args = ["--max-viewers", "5000"]
    if "--workers" in subprocess.run([sys.executable, "-m", "lotcast", "relay", "--help"],
                                     capture_output=True, text=True, check=False).stdout:
        relay_args += ["--workers", "1"]  # one event loop per relay: the paths compared alike
    profiles: dict[str, str] = {}
    with RedisServer() as redis, running_cluster(redis, relay_args=relay_args) as cluster:
        relays = {"native": cluster.relay}
        for path in args.paths:
            if path == "native":
                continue
            extra = ["--udp-port", str(_free_udp_port())] if path == "mux" else []
            path_args = relay_args
            if path == "workers2":
                path_args = [a if a != "1" or relay_args[i - 1] != "--workers" else "2"
                             for i, a in enumerate(relay_args)]
            relay = ServiceProcess("relay", ["--port", "0", "--origin-url", cluster.origin.url,
                                             "--node-id", f"relay-{path}", *path_args, *extra],
                                   env={**cluster.env, **PATH_ENV[path]}).start()
            cluster.extra.append(relay)
            relays[path] = relay
        for relay in relays.values():
            _PIDS[relay.url] = relay.pid
        _WHOLE_SERVER_PIDS[:] = [cluster.origin.pid, redis._proc.pid]  # type: ignore[union-attr]
        janus = JanusServer(args.janus_event_loops).start() if args.janus else None
        feed: OriginFeed | None = None
        feed_pli: asyncio.Task[None] | None = None
        publisher = Publisher(cluster.origin.url, STREAM, host_token())
        publisher.video.__init__(fps=30, width=320, height=240, noisy=True)  # type: ignore[misc]
        await publisher.start()
        video_sender = next(s for s in publisher.pc.getSenders() if s.track and s.track.kind == "video")
        for _ in range(100):
            await asyncio.sleep(0.1)
            if set_encoder_bitrate(video_sender, args.bitrate):
                break
        await asyncio.sleep(3.0)
        if janus is not None:
            feed = OriginFeed(cluster.origin.url, STREAM, janus)
            await feed.start()
            feed_pli = asyncio.create_task(feed.request_keyframes(2.0))
            await asyncio.sleep(3.0)
        rows: list[tuple[str, dict[str, float]]] = []
        try:
            for n in args.viewers:
                runs = {}
                if janus is not None:
                    profile = None
                    if args.profile == "perf" and n == args.viewers[-1]:
                        profile = profiles["janus"] = f"perf:/tmp/fanout-janus-{n}.data"
                    runs["janus"] = measure(None, cluster.origin.url, n, args.seconds,
                                            profile, janus=janus)
                for path in args.paths:
                    profile = None
                    if args.profile and n == args.viewers[-1]:
                        suffix = "txt" if args.profile == "py-spy" else "data"
                        profile = f"{args.profile}:/tmp/fanout-{path}-{n}.{suffix}"
                        profiles[path] = profile
                    runs[path] = measure(relays[path].url, cluster.origin.url, n, args.seconds,
                                         profile)
                if args.one_at_a_time:
                    results = [await run for run in runs.values()]
                else:
                    # both relays at once, one farm each: the same source packets and the same
                    # machine load for both paths (the machine's noise cancels in the ratio)
                    results = list(await asyncio.gather(*runs.values()))
                rows += zip(runs, results, strict=True)
                await asyncio.sleep(2.0)
        except Exception:
            for relay in relays.values():
                print("".join(relay.output[-30:]), file=sys.stderr)
            if janus is not None:
                print(janus.log_tail(), file=sys.stderr)
            raise
        finally:
            if feed_pli is not None:
                feed_pli.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feed_pli
            if feed is not None:
                print(f"Janus feed: {feed.forwarded} RTP packets forwarded", file=sys.stderr)
                await feed.stop()
            if janus is not None:
                janus.stop()
        await publisher.stop()

    # a relay with N workers pulls the stream N times
    in_pps = statistics.mean(r["packets_in_per_s"] / (2 if p == "workers2" else 1)
                             for p, r in rows if p != "janus")
    # the least of three: other processes on a shared machine only ever add to a CPU figure
    floor_c = min(c_floor(args.floor_size) for _ in range(3))
    floor_py = min(srtp_send_floor(args.floor_size) for _ in range(3))
    fanouts = sorted({FANOUT_OF[path] for path in args.paths})
    loop_costs = {(n, path): min([await fanout_loop_cost(n, path, args.floor_size)
                                  for _ in range(3)])
                  for n in args.viewers for path in fanouts}
    shared_costs = {n: min([await fanout_loop_cost(n, "native", args.floor_size, shared=True)
                            for _ in range(3)]) for n in args.viewers} if native.available() else {}
    print()
    print(f"source: ~{in_pps:.0f} packets/s into each relay (video+audio); "
          f"{args.seconds:.0f} s windows; relays on uvloop")
    print(f"C floor: memcpy + srtp_protect + sendto of {args.floor_size}-byte packets in C "
          f"= {floor_c * 1e6:.2f} µs/packet; the same in a Python loop (fast_protect + "
          f"socket.sendto) = {floor_py * 1e6:.2f} µs/packet")
    print(f"TrackForwarder's per-packet loop alone ({args.floor_size}-byte packets, a socket and "
          "an SRTP session per sink), µs CPU per packet-copy:")
    for (n, path), cost in loop_costs.items():
        print(f"  {path:>6} {n:>4} sinks: {cost * 1e6:5.2f} µs ({cost / floor_c:.2f}x C floor)")
    for n, cost in shared_costs.items():
        print(f"  native {n:>4} sinks on one shared socket (sendmmsg): {cost * 1e6:5.2f} µs "
              f"({cost / floor_c:.2f}x C floor)")
    header = (f"{'path':>11} {'viewers':>7} {'µs CPU/delivered pkt':>21} {'x C floor':>9} "
              f"{'ms/viewer-s':>11} {'delivered/s':>11} {'relay CPU':>9} {'farm CPU':>8} "
              f"{'g2g relay p50/p95':>18} {'direct p50/p95':>15} {'adds p95':>8} {'TTFF p95':>8}")
    print(header)
    for path, r in rows:
        if path == "janus":
            continue
        print(f"{path:>11} {r['viewers']:>7} {r['us_per_delivered']:>21.2f} "
              f"{r['us_per_delivered'] / (floor_c * 1e6):>9.2f} {r['cpu_ms_per_viewer_s']:>11.2f} "
              f"{r['delivered_per_s']:>11.0f} {r['relay_cpu_pct']:>8.0f}% {r['farm_cpu_pct']:>7.0f}% "
              f"{r['g2g_relay_p50']:>8.0f}/{r['g2g_relay_p95']:<9.0f} "
              f"{r['g2g_direct_p50']:>6.0f}/{r['g2g_direct_p95']:<8.0f} "
              f"{r['g2g_relay_p95'] - r['g2g_direct_p95']:>8.1f} {r['ttff_p95_s']:>7.3f}s")
    by_n: dict[int, dict[str, float]] = {}
    for path, r in rows:
        by_n.setdefault(int(r["viewers"]), {})[path] = r["us_per_delivered"]
    for n, per in sorted(by_n.items()):
        if "native" in per and "python" in per:
            print(f"{n} viewers: native path {per['native']:.2f} µs vs Python path "
                  f"{per['python']:.2f} µs per delivered packet ({per['native'] / per['python']:.2f}x)")
        if "native" in per and "aiortc-rtcp" in per:
            print(f"{n} viewers: lean RTCP {per['native']:.2f} µs vs aiortc's RTCP "
                  f"{per['aiortc-rtcp']:.2f} µs per delivered packet "
                  f"({per['native'] / per['aiortc-rtcp']:.2f}x), both on the native fan-out")
    print_farm_counted(rows, floor_c)
    print(f"farm CPU: summed over its processes ({FARM_SIZE} viewers each at most); a farm that "
          "reads fewer packets than the relay counts sent, or near 100% of a core per process, "
          "was the limit, not the server")
    for path, profile in profiles.items():
        print(f"\n--- profile of the {path} relay at {args.viewers[-1]} viewers ({profile}) ---")
        print(summarize_profile(profile))


if __name__ == "__main__":
    asyncio.run(main())
