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
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urljoin

import httpx
import psutil
import pylibsrtp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from media_support import Publisher, Viewer, host_token, running_cluster

from lotcast.media.aiortc_hooks import count_rtp_instead_of_parsing, set_encoder_bitrate
from lotcast.redis_server import RedisServer

STREAM = "bench"


class CountingViewer:
    """A WHEP viewer that counts decrypted RTP packets and never parses or decodes them."""

    def __init__(self, base_url: str) -> None:
        self.url = f"{base_url}/whep/{STREAM}"
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.packets = 0
        self.started = 0.0
        self.first_packet: float | None = None
        self.resource: str | None = None

    def _on_packet(self, data: bytes) -> None:
        self.packets += 1
        if self.first_packet is None and (data[1] & 0x7F) != 111:  # first video packet
            self.first_packet = time.monotonic()

    async def start(self, http: httpx.AsyncClient) -> None:
        self.pc.addTransceiver("audio", direction="recvonly")
        video = self.pc.addTransceiver("video", direction="recvonly")
        self.started = time.monotonic()
        await self.pc.setLocalDescription(await self.pc.createOffer())
        response = await http.post(self.url, content=self.pc.localDescription.sdp,
                                   headers={"Content-Type": "application/sdp"})
        assert response.status_code == 201, response.text
        self.resource = urljoin(self.url, response.headers["Location"])
        count_rtp_instead_of_parsing(video.receiver.transport, self._on_packet)
        await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))

    async def stop(self, http: httpx.AsyncClient) -> None:
        if self.resource:
            await http.delete(self.resource)
        await self.pc.close()


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
    protect, sendto = session.protect, sender.sendto
    for packet in packets:
        sendto(protect(packet), addr)
    elapsed = time.process_time() - start
    sink.close()
    sender.close()
    return elapsed / count


async def measure(cluster_relay: str, cluster_origin: str, n: int, seconds: float) -> dict[str, float]:
    relay_proc = psutil.Process(int(_pid_of(cluster_relay)))
    async with httpx.AsyncClient(timeout=30) as http:
        counting = [CountingViewer(cluster_relay) for _ in range(max(0, n - 1))]
        decoding_relay = Viewer(cluster_relay, STREAM)
        decoding_origin = Viewer(cluster_origin, STREAM)
        for batch in range(0, len(counting), 10):
            await asyncio.gather(*(v.start(http) for v in counting[batch:batch + 10]))
        await decoding_relay.start()
        await decoding_origin.start()
        await asyncio.sleep(3.0)  # settle: ICE, key frames, bitrate ramp
        stats_before = (await http.get(f"{cluster_relay}/api/stats")).json()
        cpu_before = relay_proc.cpu_times()
        wall_before = time.monotonic()
        decoding_relay.delays_ms.clear()
        decoding_origin.delays_ms.clear()
        await asyncio.sleep(seconds)
        cpu_after = relay_proc.cpu_times()
        wall = time.monotonic() - wall_before
        stats_after = (await http.get(f"{cluster_relay}/api/stats")).json()
        cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)

        def sent(stats: dict[str, object]) -> int:
            stream = next(s for s in stats["streams"] if s["id"] == STREAM)  # type: ignore[attr-defined]
            return int(stream.get("video_packets_sent", 0)) + int(stream.get("audio_packets_sent", 0))

        def received(stats: dict[str, object]) -> int:
            stream = next(s for s in stats["streams"] if s["id"] == STREAM)  # type: ignore[attr-defined]
            return int(stream.get("video_packets_in", 0)) + int(stream.get("audio_packets_in", 0))

        packets_sent = sent(stats_after) - sent(stats_before)
        packets_in = received(stats_after) - received(stats_before)
        ttff = [v.first_packet - v.started for v in counting if v.first_packet is not None]
        if decoding_relay.first_frame_at is not None:
            ttff.append(decoding_relay.first_frame_at - decoding_relay.started_at)
        result = {
            "viewers": n,
            "relay_cpu_s": cpu,
            "wall_s": wall,
            "cpu_ms_per_viewer_s": 1000 * cpu / (n * wall),
            "packets_sent_per_s": packets_sent / wall,
            "packets_in_per_s": packets_in / wall,
            "g2g_relay_p50": pct(decoding_relay.delays_ms, 0.5),
            "g2g_relay_p95": pct(decoding_relay.delays_ms, 0.95),
            "g2g_direct_p50": pct(decoding_origin.delays_ms, 0.5),
            "g2g_direct_p95": pct(decoding_origin.delays_ms, 0.95),
            "ttff_p95_s": pct(ttff, 0.95),
            "ttff_n": len(ttff),
        }
        await asyncio.gather(*(v.stop(http) for v in counting))
        await decoding_relay.stop()
        await decoding_origin.stop()
        return result


_PIDS: dict[str, int] = {}


def _pid_of(url: str) -> int:
    return _PIDS[url]


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
