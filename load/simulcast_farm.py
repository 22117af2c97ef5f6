"""A farm of cheap WHEP viewers of a simulcast stream, for load/simulcast_bench.py: viewer_farm's
CountingViewer (counts packets at the jitter buffer after SRTP, RTX and NACK handling; never
decodes), pinned to a layer with the WHEP layer POST of its session, and with a fault injector
for a lossy path.

    python load/simulcast_farm.py BASE_URL STREAM COUNT FIRST PINS

Viewer number FIRST + i (numbered across all farms of a run) is *lossy* when that number is
9 mod 10 (10 % of the viewers): it stays on Auto (the server's automatic layer choice, as a
player's default), and once told ``LOSS <fraction>`` its network drops that random fraction of
the RTP datagrams it receives, before SRTP decryption, so aiortc's receiver NACKs the gaps as
over a real lossy link (drop_incoming_rtp; no root, no tc). Like a player that cannot complete
a frame, every viewer asks for a key frame (PLI) when a video packet is still missing 250 ms
after it noticed the gap, at most once per 500 ms (aiortc's own receiver asks only when 512
packets behind, and these viewers bypass its jitter buffer). The other viewers are pinned in
turn to the rids of PINS (comma-separated; ``auto``: no pin). The relay stamps abs-send-time on
the video of viewers that negotiated it (these do, as Chromium does) and steers their
automatic layer by their REMB; each viewer here sends one REMB a second, of a fixed
FARM_ESTIMATE_BPS (PacedRemb): aiortc's own estimator, in Python, cost the farm half again its
CPU and, once a farm fell behind and saw "overuse", sent a REMB per packet (6,400 a second
reached the relay from 100 viewers), which Chromium's native one does not. Prints READY once every viewer
has video (or after 20 s); then reads commands on stdin: ``MARK`` prints one JSON line
{"packets", "cpu_s", "t", "plis", "dropped"} (a window is the difference of two marks),
``LOSS <fraction>`` (0: off), ``PIN <rid>`` (every viewer to that layer); on EOF it prints one
JSON line of results.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from urllib.parse import urljoin

import httpx
from aiortc import RTCSessionDescription
from aiortc.rtp import RtpPacket

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from sse_support import LAYER_REL, parse_links
from viewer_farm import CountingViewer, PacedRemb

from lotcast.media.aiortc_hooks import (
    drop_incoming_rtp,
    request_keyframe,
    restrict_host_addresses,
    tap_receiver,
)

GAP_PLI_AFTER_S = 0.25
PLI_EVERY_S = 0.5
def is_lossy(number: int) -> bool:
    return number % 10 == 9


class FarmViewer(CountingViewer):
    def __init__(self, base_url: str, stream: str, pin: str | None, lossy: bool) -> None:
        super().__init__(base_url, stream)
        self.pin = pin
        self.lossy = lossy
        self.loss = 0.0  # of RTP datagrams dropped, for a lossy viewer, once told
        self.plis = 0
        self.dropped = 0  # RTP datagrams the fault injector dropped
        self.layer_url: str | None = None
        self._video_receiver: object | None = None
        self._highest: int | None = None
        self._missing: dict[int, float] = {}  # seq -> when the gap was noticed
        self._last_pli = 0.0
        self._ssrc = 0

    async def start(self, http: httpx.AsyncClient) -> None:
        audio = self.pc.addTransceiver("audio", direction="recvonly")
        video = self.pc.addTransceiver("video", direction="recvonly")
        tap_receiver(audio.receiver, self._on_audio, lambda *_: None)
        tap_receiver(video.receiver, self._on_video_packet, lambda *_: None)
        PacedRemb.install(video.receiver)
        self._video_receiver = video.receiver
        self.started = time.monotonic()
        await self.pc.setLocalDescription(await self.pc.createOffer())
        response = await http.post(self.url, content=self.pc.localDescription.sdp,
                                   headers={"Content-Type": "application/sdp"})
        if response.status_code != 201:
            raise RuntimeError(f"WHEP {response.status_code}: {response.text}")
        self.resource = urljoin(self.url, response.headers["Location"])
        self.layer_url = parse_links(response.headers.get("Link", ""),
                                     self.resource).get(LAYER_REL)
        await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
        if self.lossy:  # on the bundled transport, known once the answer is set
            rng = random.Random()
            drop_incoming_rtp(video.receiver.transport, lambda _: self._drop(rng.random()))
        if self.pin is not None and self.layer_url is not None:
            pinned = await http.post(self.layer_url, json={"encodingId": self.pin})
            if pinned.status_code != 204:
                raise RuntimeError(f"layer POST {pinned.status_code}: {pinned.text}")

    async def pin_to(self, http: httpx.AsyncClient, rid: str) -> int:
        """The layer POST's status (0: no layer link; -1: the request failed)."""
        if self.layer_url is None:
            return 0
        self.pin = rid
        try:
            return (await http.post(self.layer_url, json={"encodingId": rid})).status_code
        except httpx.HTTPError:
            return -1

    def _drop(self, draw: float) -> bool:
        if draw < self.loss:
            self.dropped += 1
            return True
        return False

    def _on_video_packet(self, packet: RtpPacket) -> None:
        self._on_video(packet)
        # a player's key-frame request: a gap the NACKs did not fill in time
        now = time.monotonic()
        seq, self._ssrc = packet.sequence_number, packet.ssrc
        if self._highest is None or (seq - self._highest) & 0xFFFF > 0x8000:
            self._missing.pop(seq, None)
            self._highest = self._highest if self._highest is not None else seq
        else:
            for missed in range(self._highest + 1, self._highest + ((seq - self._highest) & 0xFFFF)):
                self._missing[missed & 0xFFFF] = now
            self._highest = seq
        if self._missing and now - min(self._missing.values()) > GAP_PLI_AFTER_S:
            self._missing.clear()
            if now - self._last_pli >= PLI_EVERY_S and self._video_receiver is not None:
                self._last_pli = now
                self.plis += 1
                request_keyframe(self._video_receiver, self._ssrc)  # type: ignore[arg-type]


def _mark(farm: list[FarmViewer]) -> str:
    times = os.times()
    return json.dumps({"packets": sum(v.packets for v in farm), "cpu_s": times.user + times.system,
                       "t": time.monotonic(), "plis": sum(v.plis for v in farm),
                       "dropped": sum(v.dropped for v in farm)})


async def main(base_url: str, stream: str, count: int, first: int, pins: list[str | None]) -> None:
    restrict_host_addresses(["127.0.0.1"])
    farm: list[FarmViewer] = []
    pinned = 0
    for number in range(first, first + count):
        lossy = is_lossy(number)
        pin = None if lossy else pins[pinned % len(pins)]
        pinned += not lossy
        farm.append(FarmViewer(base_url, stream, pin, lossy))
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
            command = line.strip()
            if command == "MARK":
                print(_mark(farm), flush=True)
            elif command.startswith("PIN "):  # every viewer, the lossy ones too
                rid = command.split()[1]
                codes = await asyncio.gather(*(v.pin_to(http, rid) for v in farm))
                print(json.dumps({"pinned": rid, "codes": {str(c): codes.count(c)
                                                           for c in set(codes)}}), flush=True)
            elif command.startswith("LOSS "):
                for viewer in farm:
                    viewer.loss = float(command.split()[1])
                print(json.dumps({"loss": command}), flush=True)
        result = {
            "ttff": [v.first_video - v.started for v in farm if v.first_video is not None],
            "packets": sum(v.packets for v in farm),
            "viewers": count,
            "lossy": sum(v.lossy for v in farm),
            "without_video": sum(v.first_video is None for v in farm),
        }
        await asyncio.gather(*(v.stop(http) for v in farm), return_exceptions=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    pin_list = [None if p == "auto" else p for p in sys.argv[5].split(",")]
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), pin_list))
