"""Many cheap WHEP viewers in one process: they count RTP packets at the jitter buffer (after
SRTP, RTX and NACK handling, so they still send receiver reports and NACKs like a real player) and
never decode them. Used by fanout_bench.py so its own process keeps CPU for the decoding viewers.

    python load/viewer_farm.py BASE_URL STREAM COUNT
    python load/viewer_farm.py janus:ICE_IP:JANUS_URL MOUNTPOINT_ID COUNT  # viewers of Janus's streaming
                                                                   # plugin (load/janus_peer.py)
Prints READY once every viewer is connected (or after 20 s), then for each line MARK on stdin one
JSON line {"packets", "cpu_s", "t"} (packets counted so far, the farm's own CPU, monotonic time:
a window's delivered packets and farm CPU are the difference of two marks), and, when stdin
closes, one JSON line of results.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rtp import RtpPacket

sys.path.insert(0, str(Path(__file__).resolve().parent))

from janus_peer import JanusViewer

from lotcast.media.aiortc_hooks import restrict_host_addresses, tap_receiver

FARM_ESTIMATE_BPS = 10_000_000  # above every layer: REMB never moves a farm viewer down
REMB_EVERY_MS = 1000


class PacedRemb:
    """Stands in for aiortc's RemoteBitrateEstimator in a farm viewer's video receiver: the
    same call per stamped packet, a fixed estimate once per REMB_EVERY_MS."""

    def __init__(self) -> None:
        self._last_ms: int | None = None

    @staticmethod
    def install(receiver: Any) -> None:
        if not hasattr(receiver, "_RTCRtpReceiver__remote_bitrate_estimator"):
            raise RuntimeError("aiortc's receiver has no remote bitrate estimator to replace")
        receiver._RTCRtpReceiver__remote_bitrate_estimator = PacedRemb()

    def add(self, arrival_time_ms: int, abs_send_time: int, payload_size: int,
            ssrc: int) -> tuple[int, list[int]] | None:
        if self._last_ms is not None and arrival_time_ms - self._last_ms < REMB_EVERY_MS:
            return None
        self._last_ms = arrival_time_ms
        return FARM_ESTIMATE_BPS, [ssrc]


class CountingViewer:
    def __init__(self, base_url: str, stream: str) -> None:
        self.url = f"{base_url}/whep/{stream}"
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.packets = 0
        self.started = 0.0
        self.first_video: float | None = None
        self.resource: str | None = None

    def _on_video(self, packet: RtpPacket) -> None:
        self.packets += 1
        if self.first_video is None:
            self.first_video = time.monotonic()

    def _on_audio(self, packet: RtpPacket) -> None:
        self.packets += 1

    async def start(self, http: httpx.AsyncClient) -> None:
        audio = self.pc.addTransceiver("audio", direction="recvonly")
        video = self.pc.addTransceiver("video", direction="recvonly")
        tap_receiver(audio.receiver, self._on_audio, lambda *_: None)
        tap_receiver(video.receiver, self._on_video, lambda *_: None)
        PacedRemb.install(video.receiver)  # (the relay stamps abs-send-time on its video)
        self.started = time.monotonic()
        await self.pc.setLocalDescription(await self.pc.createOffer())
        response = await http.post(self.url, content=self.pc.localDescription.sdp,
                                   headers={"Content-Type": "application/sdp"})
        if response.status_code != 201:
            raise RuntimeError(f"WHEP {response.status_code}: {response.text}")
        self.resource = urljoin(self.url, response.headers["Location"])
        await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))

    async def stop(self, http: httpx.AsyncClient) -> None:
        if self.resource:
            await http.delete(self.resource)
        await self.pc.close()


def _mark(farm: list[CountingViewer] | list[JanusViewer]) -> str:
    times = os.times()
    return json.dumps({"packets": sum(v.packets for v in farm),
                       "cpu_s": times.user + times.system, "t": time.monotonic()})


async def main(base_url: str, stream: str, count: int) -> None:
    farm: list[CountingViewer] | list[JanusViewer]
    if base_url.startswith("janus:"):
        # janus:ICE_IP:URL: Janus gathers only on that local address (never on lo), so do we
        ice_ip, _, janus_url = base_url.removeprefix("janus:").partition(":")
        restrict_host_addresses([ice_ip])
        farm = [JanusViewer(janus_url, int(stream)) for _ in range(count)]
    else:
        restrict_host_addresses(["127.0.0.1"])
        farm = [CountingViewer(base_url, stream) for _ in range(count)]
    limits = httpx.Limits(max_connections=max(100, 2 * count))
    async with httpx.AsyncClient(verify=False, trust_env=False, timeout=30, limits=limits) as http:
        for batch in range(0, count, 10):
            await asyncio.gather(*(v.start(http) for v in farm[batch:batch + 10]))
        deadline = time.monotonic() + 20
        while any(v.first_video is None for v in farm) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        print("READY", flush=True)
        loop = asyncio.get_running_loop()
        while (line := await loop.run_in_executor(None, sys.stdin.readline)):
            if line.strip() == "MARK":
                print(_mark(farm), flush=True)
        result = {
            "ttff": [v.first_video - v.started for v in farm if v.first_video is not None],
            "packets": sum(v.packets for v in farm),
            "viewers": count,
            "without_video": sum(v.first_video is None for v in farm),
        }
        await asyncio.gather(*(v.stop(http) for v in farm), return_exceptions=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
