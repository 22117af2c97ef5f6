"""Fan-out benchmark: one publisher (~1.5 Mbps VP8 + Opus) → broadcaster → relay → N viewers.

Prints, for each N: the relay's CPU per viewer-second, packets/s it sends, glass-to-glass p50/p95
through the relay and directly from the origin (same run), time to first frame p95, and the ratio
of the relay's CPU per viewer-second to a raw floor (SRTP protect + sendto of the same packets in
a tight loop, measured here). Most viewers only count packets; two decode and read the capture
time painted into each frame.

    .venv/bin/python load/fanout_bench.py --viewers 10 50 100 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pylibsrtp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from media_support import Publisher, Viewer, host_token, http_client, running_cluster

from lotcast.media.aiortc_hooks import fast_protect, set_encoder_bitrate
from lotcast.redis_server import RedisServer

HERE = Path(__file__).resolve().parent

STREAM = "bench"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def srtp_send_floor(packet_size: int, count: int = 20000) -> float:
    """CPU seconds per packet to SRTP-protect and sendto one packet on loopback."""
    key = os.urandom(30)
    policy = pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
                              srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80)
    session = pylibsrtp.Session(policy)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    addr = sink.getsockname()
    header = bytes([0x80, 96])
    payload = os.urandom(packet_size - 12)
    packets = [header + (i & 0xFFFF).to_bytes(2, "big") + bytes(8) + payload for i in range(count)]
    start = time.process_time()
    protect, sendto = fast_protect(session), sender.sendto  # the relay's own protect path
    for packet in packets:
        sendto(protect(packet), addr)
    elapsed = time.process_time() - start
    sink.close()
    sender.close()
    return elapsed / count


async def measure(relay_url: str, origin_url: str, n: int, seconds: float) -> dict[str, float]:
    relay_proc = psutil.Process(_PIDS[relay_url])
    farm = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "viewer_farm.py"), relay_url, STREAM, str(max(0, n - 1)),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    assert farm.stdout is not None and farm.stdin is not None
    ready = await asyncio.wait_for(farm.stdout.readline(), 120)
    assert ready.strip() == b"READY", ready
    async with http_client() as http:
        decoding_relay = Viewer(relay_url, STREAM)
        decoding_origin = Viewer(origin_url, STREAM)
        await decoding_relay.start()
        await decoding_origin.start()
        await asyncio.sleep(3.0)  # settle: ICE, key frames
        stats_before = (await http.get(f"{relay_url}/api/stats")).json()
        cpu_before = relay_proc.cpu_times()
        wall_before = time.monotonic()
        decoding_relay.delays_ms.clear()
        decoding_origin.delays_ms.clear()
        await asyncio.sleep(seconds)
        cpu_after = relay_proc.cpu_times()
        wall = time.monotonic() - wall_before
        stats_after = (await http.get(f"{relay_url}/api/stats")).json()
    cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    farm.stdin.close()
    farm_result = json.loads(await asyncio.wait_for(farm.stdout.readline(), 60))
    await farm.wait()
    ttff = list(farm_result["ttff"])
    if decoding_relay.first_frame_at is not None:
        ttff.append(decoding_relay.first_frame_at - decoding_relay.started_at)
    await decoding_relay.stop()
    await decoding_origin.stop()

    def counter(stats: dict[str, Any], suffix: str) -> int:
        stream = next(s for s in stats["streams"] if s["id"] == STREAM)
        return sum(int(v) for k, v in stream.items() if k.endswith(suffix))

    return {
        "viewers": n,
        "relay_cpu_s": cpu,
        "wall_s": wall,
        "cpu_ms_per_viewer_s": 1000 * cpu / (n * wall),
        "packets_sent_per_s": (counter(stats_after, "_packets_sent")
                               - counter(stats_before, "_packets_sent")) / wall,
        "packets_in_per_s": (counter(stats_after, "_packets_in")
                             - counter(stats_before, "_packets_in")) / wall,
        "g2g_relay_p50": pct(decoding_relay.delays_ms, 0.5),
        "g2g_relay_p95": pct(decoding_relay.delays_ms, 0.95),
        "g2g_direct_p50": pct(decoding_origin.delays_ms, 0.5),
        "g2g_direct_p95": pct(decoding_origin.delays_ms, 0.95),
        "ttff_p95_s": pct(ttff, 0.95),
    }


_PIDS: dict[str, int] = {}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--viewers", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--bitrate", type=int, default=1_500_000, help="publisher video bits/s")
    args = parser.parse_args()

    with RedisServer() as redis, running_cluster(redis, relay_args=["--max-viewers", "5000"]) as cluster:
        _PIDS[cluster.relay.url] = cluster.relay.pid
        publisher = Publisher(cluster.origin.url, STREAM, host_token())
        publisher.video.__init__(fps=30, width=320, height=240, noisy=True)  # type: ignore[misc]
        await publisher.start()
        video_sender = next(s for s in publisher.pc.getSenders() if s.track and s.track.kind == "video")
        for _ in range(100):
            await asyncio.sleep(0.1)
            if set_encoder_bitrate(video_sender, args.bitrate):
                break
        await asyncio.sleep(3.0)
        rows = []
        try:
            for n in args.viewers:
                rows.append(await measure(cluster.relay.url, cluster.origin.url, n, args.seconds))
                await asyncio.sleep(2.0)
        except Exception:
            print("".join(cluster.relay.output[-30:]), file=sys.stderr)
            raise
        await publisher.stop()

    in_pps = statistics.mean(r["packets_in_per_s"] for r in rows)
    floor_per_packet = srtp_send_floor(1100)
    print()
    print(f"source: ~{in_pps:.0f} packets/s into the relay (video+audio)")
    print(f"raw floor: SRTP protect + sendto = {floor_per_packet * 1e6:.2f} µs/packet "
          f"→ {floor_per_packet * in_pps * 1000:.2f} ms CPU per viewer-second at this packet rate")
    header = (f"{'viewers':>7} {'relay CPU ms/viewer-s':>22} {'x floor':>8} {'pkts sent/s':>12} "
              f"{'g2g relay p50/p95 ms':>21} {'g2g direct p50/p95 ms':>22} {'relay adds p95':>15} "
              f"{'TTFF p95 s':>11}")
    print(header)
    for r in rows:
        floor_ms = floor_per_packet * r["packets_in_per_s"] * 1000
        print(f"{r['viewers']:>7} {r['cpu_ms_per_viewer_s']:>22.2f} "
              f"{r['cpu_ms_per_viewer_s'] / floor_ms:>8.2f} {r['packets_sent_per_s']:>12.0f} "
              f"{r['g2g_relay_p50']:>10.0f}/{r['g2g_relay_p95']:<10.0f} "
              f"{r['g2g_direct_p50']:>11.0f}/{r['g2g_direct_p95']:<10.0f} "
              f"{r['g2g_relay_p95'] - r['g2g_direct_p95']:>14.1f} {r['ttff_p95_s']:>11.3f}")
    print("targets: ≤ 2x floor at 100 viewers; relay adds ≤ 10 ms p95; TTFF ≤ 0.5 s p95")


if __name__ == "__main__":
    asyncio.run(main())
