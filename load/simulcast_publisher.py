"""A WHIP publisher of VP8 simulcast (RFC 8853) without a browser, for load/simulcast_bench.py.

aiortc sends one stream per m-line (aiortc issue #676), so this publisher keeps aiortc for ICE,
DTLS, SRTP and the audio track only, and sends the video itself: one real libvpx encoder per
layer (aiortc's Vp8Encoder and packetizer, each frame of CounterVideoTrack's panning texture
plus grain, scaled down for the lower layers), each layer on its own SSRC with the `rtp-stream-id` and `mid`
header extensions (and abs-send-time, as Chromium), through the peer connection's DTLS
transport. The offer is aiortc's with the video section's `a=ssrc` lines replaced by what
Chromium's simulcast offer carries: the rid header extensions, `a=rid:<rid> send` per layer and
`a=simulcast:send h;m;l`. Per layer it answers NACKs from its own history, sends a Sender Report
every second and encodes a key frame when asked by a PLI or FIR, which it counts (the key-frame
requests reaching the host). With ``simulcast=False`` the same code sends the top layer alone
without rid or simulcast lines: the single-layer publisher to compare with.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fractions
import random
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import av
import httpx
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.clock import current_ntp_time
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.mediastreams import AudioStreamTrack
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import (
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    HeaderExtensionsMap,
    RtcpPacket,
    RtcpPsfbPacket,
    RtcpRtpfbPacket,
    RtcpSenderInfo,
    RtcpSrPacket,
    RtpPacket,
    unpack_remb_fci,
)

from lotcast.media.aiortc_hooks import negotiated_codecs, observe_rtcp
from lotcast.media.testsource import VIDEO_CLOCK, CounterVideoTrack, paint

MID_URI = "urn:ietf:params:rtp-hdrext:sdes:mid"
ABS_SEND_TIME_URI = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
RID_URI = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"
REPAIRED_RID_URI = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id"
RID_EXT_ID, REPAIRED_RID_EXT_ID = 10, 11
HISTORY = 1024  # packets kept per layer for NACKs


@dataclass(frozen=True)
class LayerSpec:
    rid: str
    width: int
    height: int
    bitrate: int


# Chromium's three layers for a 320x240 camera at its default scales (1, 1/2, 1/4), with the
# bitrates fanout_bench's single layer uses at the top
LAYERS = (LayerSpec("h", 320, 240, 1_500_000), LayerSpec("m", 160, 120, 500_000),
          LayerSpec("l", 80, 60, 150_000))


@dataclass
class _Layer:
    spec: LayerSpec
    ssrc: int
    encoder: Vp8Encoder = field(default_factory=Vp8Encoder)
    seq: int = field(default_factory=lambda: random.randint(0, 0xFFFF))
    ts_offset: int = field(default_factory=lambda: random.getrandbits(32))
    history: collections.OrderedDict[int, bytes] = field(default_factory=collections.OrderedDict)
    want_keyframe: bool = True
    keyframe_requests: list[float] = field(default_factory=list)  # monotonic times
    nacked: int = 0
    packets: int = 0
    octets: int = 0
    last_timestamp: int = 0
    last_sent_at: float = 0.0

    def __post_init__(self) -> None:
        # aiortc clamps target_bitrate to 250 kbps-1.5 Mbps; the low layers need less
        self.encoder._Vp8Encoder__target_bitrate = self.spec.bitrate  # type: ignore[attr-defined]


class GrainyCounterTrack(CounterVideoTrack):
    """CounterVideoTrack's panning texture plus a little grain that changes every frame (a
    camera's sensor noise): without it libvpx codes the texture's whole-pixel pan almost for
    free and the top layer stays near 350 kbps whatever its target; with it each layer runs at
    its target bitrate."""

    GRAIN = 6  # +- luma levels
    PLANES = 7  # pre-made grain planes, cycled (no per-frame RNG cost)

    def __init__(self, fps: int, width: int, height: int) -> None:
        super().__init__(fps, width=width, height=height, noisy=True)
        rng = np.random.default_rng(11)
        self._grain = [rng.integers(-self.GRAIN, self.GRAIN + 1, (height, width), dtype=np.int16)
                       for _ in range(self.PLANES)]

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + (self.counter - self.first) / self.fps
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        assert self._texture is not None
        shift = (self.counter * 3) % 8
        base = self._texture[shift:shift + self.height, shift:shift + self.width]
        noise = np.clip(base + self._grain[self.counter % self.PLANES], 0, 255).astype(np.uint8)
        picture = paint(self.counter, int(time.time() * 1000), self.width, self.height, noise)
        frame = av.VideoFrame.from_ndarray(picture, format="yuv420p")
        frame.pts = int((self.counter - self.first) * VIDEO_CLOCK / self.fps)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self.counter += 1
        return frame


def _munge_offer(sdp: str, rids: list[LayerSpec] | None) -> str:
    """aiortc's offer with its video section made a Chromium-like simulcast (or plain) one."""
    out: list[str] = []
    in_video = False
    for line in sdp.splitlines():
        if line.startswith("m="):
            if in_video and rids:
                out += _simulcast_lines(rids)
            in_video = line.startswith("m=video")
        if in_video and (line.startswith("a=ssrc:") or line.startswith("a=ssrc-group:")):
            continue  # our layers' SSRCs are learned from their rids, as a browser's are
        out.append(line)
    if in_video and rids:
        out += _simulcast_lines(rids)
    return "\r\n".join(out) + "\r\n"


def _simulcast_lines(layers: list[LayerSpec]) -> list[str]:
    return [f"a=extmap:{RID_EXT_ID} {RID_URI}",
            f"a=extmap:{REPAIRED_RID_EXT_ID} {REPAIRED_RID_URI}",
            *(f"a=rid:{x.rid} send max-width={x.width};max-height={x.height}" for x in layers),
            "a=simulcast:send " + ";".join(x.rid for x in layers)]


class SimulcastPublisher:
    """One WHIP session publishing audio and ``layers`` of VP8 (top first)."""

    def __init__(self, base_url: str, stream: str, token: str, *, simulcast: bool = True,
                 layers: tuple[LayerSpec, ...] = LAYERS, fps: int = 30) -> None:
        self.url = f"{base_url}/whip/{stream}"
        self.token = token
        self.simulcast = simulcast
        specs = layers if simulcast else layers[:1]
        ssrcs = random.sample(range(1, 1 << 32), len(specs))
        self.layers = [_Layer(spec, ssrc) for spec, ssrc in zip(specs, ssrcs, strict=True)]
        self._by_ssrc = {layer.ssrc: layer for layer in self.layers}
        self.fps = fps
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.resource: str | None = None
        self.remb: int | None = None  # the origin's last bandwidth estimate, bits/s
        self._task: asyncio.Task[None] | None = None
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._dtls: Any = None
        self._ext_map = HeaderExtensionsMap()
        self._pt = 0
        self._mid = ""

    async def start(self) -> None:
        self.pc.addTrack(AudioStreamTrack())
        video = self.pc.addTransceiver("video", direction="sendonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = _munge_offer(self.pc.localDescription.sdp,
                             [x.spec for x in self.layers] if self.simulcast else None)
        async with httpx.AsyncClient(verify=False, trust_env=False, timeout=30) as http:
            response = await http.post(self.url, content=offer,
                                       headers={"Content-Type": "application/sdp",
                                                "Authorization": f"Bearer {self.token}"})
        if response.status_code != 201:
            raise RuntimeError(f"WHIP {response.status_code}: {response.text}")
        self.resource = urljoin(self.url, response.headers["Location"])
        await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
        self._pt = negotiated_codecs(video)[0].payloadType
        self._mid = str(video.mid)
        ext_ids = {}
        for line in response.text.splitlines():  # the ids the answer kept (it echoes ours)
            if line.startswith("a=extmap:"):
                ext_id, _, uri = line[len("a=extmap:"):].partition(" ")
                ext_ids[uri.split()[0]] = int(ext_id.split("/")[0])
        self._ext_map.configure(RTCRtpParameters(headerExtensions=[
            RTCRtpHeaderExtensionParameters(id=i, uri=u) for u, i in ext_ids.items()
            if u in (MID_URI, ABS_SEND_TIME_URI) or (self.simulcast and u == RID_URI)]))
        if self.simulcast and RID_URI not in ext_ids:
            raise RuntimeError("the WHIP answer dropped the rid header extension")
        self._dtls = video.sender.transport
        observe_rtcp(self._dtls, self._on_rtcp)
        self._task = asyncio.create_task(self._run())

    def keyframe_requests(self, since: float = 0.0, until: float = float("inf")) -> dict[str, int]:
        """PLI/FIR received per layer between two monotonic times."""
        return {x.spec.rid: sum(since <= t < until for t in x.keyframe_requests)
                for x in self.layers}

    def _on_rtcp(self, data: bytes) -> None:
        with contextlib.suppress(ValueError):
            for packet in RtcpPacket.parse(data):
                if isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI,
                                                                         RTCP_PSFB_FIR):
                    ssrc = packet.media_ssrc
                    if packet.fmt == RTCP_PSFB_FIR and len(packet.fci) >= 4:
                        ssrc = int.from_bytes(packet.fci[:4], "big")
                    layer = self._by_ssrc.get(ssrc)
                    if layer is not None:
                        layer.keyframe_requests.append(time.monotonic())
                        layer.want_keyframe = True
                elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == 15:
                    with contextlib.suppress(ValueError):
                        self.remb = unpack_remb_fci(packet.fci)[0]
                elif isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
                    layer = self._by_ssrc.get(packet.media_ssrc)
                    if layer is not None:
                        resend = [layer.history[s] for s in packet.lost if s in layer.history]
                        layer.nacked += len(resend)
                        task = asyncio.ensure_future(self._send_all(resend))
                        self._side_tasks.add(task)
                        task.add_done_callback(self._side_tasks.discard)

    async def _send_all(self, packets: list[bytes]) -> None:
        with contextlib.suppress(ConnectionError):
            await self._send(packets)

    async def _send(self, packets: list[bytes]) -> None:
        for data in packets:
            await self._dtls._send_rtp(data)

    def _encode(self, frame: Any, keyframes: list[bool]) -> list[tuple[list[bytes], int]]:
        out = []
        for layer, key in zip(self.layers, keyframes, strict=True):
            scaled = frame
            if (frame.width, frame.height) != (layer.spec.width, layer.spec.height):
                scaled = frame.reformat(width=layer.spec.width, height=layer.spec.height)
                scaled.pts, scaled.time_base = frame.pts, frame.time_base
            out.append(layer.encoder.encode(scaled, force_keyframe=key))
        return out

    async def _run(self) -> None:
        top = self.layers[0].spec
        track = GrainyCounterTrack(self.fps, top.width, top.height)
        loop = asyncio.get_running_loop()
        last_report = 0.0
        while True:
            frame = await track.recv()
            keyframes = [x.want_keyframe for x in self.layers]
            for layer in self.layers:
                layer.want_keyframe = False
            encoded = await loop.run_in_executor(None, self._encode, frame, keyframes)
            if self._dtls.state != "connected":
                continue
            packets = []
            for layer, (payloads, timestamp) in zip(self.layers, encoded, strict=True):
                layer.last_timestamp = (timestamp + layer.ts_offset) & 0xFFFFFFFF
                layer.last_sent_at = time.time()
                for i, payload in enumerate(payloads):
                    packet = RtpPacket(payload_type=self._pt, marker=int(i == len(payloads) - 1),
                                       sequence_number=layer.seq, timestamp=layer.last_timestamp,
                                       ssrc=layer.ssrc, payload=payload)
                    packet.extensions.mid = self._mid
                    packet.extensions.abs_send_time = (current_ntp_time() >> 14) & 0x00FFFFFF
                    if self.simulcast:
                        packet.extensions.rtp_stream_id = layer.spec.rid
                    data = packet.serialize(self._ext_map)
                    layer.history[layer.seq] = data
                    if len(layer.history) > HISTORY:
                        layer.history.popitem(last=False)
                    layer.seq = (layer.seq + 1) & 0xFFFF
                    layer.packets += 1
                    layer.octets += len(payload)
                    packets.append(data)
            now = time.monotonic()
            if now - last_report >= 1.0:
                last_report = now
                packets += [bytes(self._sender_report(x)) for x in self.layers]
            try:
                await self._send(packets)
            except ConnectionError:
                return

    def _sender_report(self, layer: _Layer) -> RtcpSrPacket:
        elapsed = time.time() - layer.last_sent_at
        rtp_now = (layer.last_timestamp + int(elapsed * 90000)) & 0xFFFFFFFF
        return RtcpSrPacket(ssrc=layer.ssrc, sender_info=RtcpSenderInfo(
            ntp_timestamp=current_ntp_time(), rtp_timestamp=rtp_now,
            packet_count=layer.packets & 0xFFFFFFFF, octet_count=layer.octets & 0xFFFFFFFF))

    async def stop(self) -> None:
        for task in [*([self._task] if self._task else []), *self._side_tasks]:
            task.cancel()
        await asyncio.gather(*([self._task] if self._task else []), *self._side_tasks,
                             return_exceptions=True)
        if self.resource:
            with contextlib.suppress(httpx.HTTPError):
                async with httpx.AsyncClient(verify=False, trust_env=False, timeout=10) as http:
                    await http.delete(self.resource,
                                      headers={"Authorization": f"Bearer {self.token}"})
        await self.pc.close()

