"""H.264 is a first-class codec (OBS and many hardware encoders send nothing else over WHIP):
key-frame detection, the key-frame cache replayed to late joiners and the PLI paths, tested as
for VP8 — in the pure parts, with a real H.264 encoder's packets, and through real processes."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import urljoin

import av
import pytest
from aiortc import RTCRtpCodecParameters, RTCRtpSender, RTCSessionDescription
from aiortc.codecs.h264 import H264Decoder, H264Encoder, h264_depayload
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import AudioStreamTrack
from aiortc.rtp import RtpPacket
from media_support import (
    Publisher,
    Viewer,
    assert_in_order,
    host_token,
    http_client,
    running_cluster,
    viewers,
)

from lotcast.media.aiortc_hooks import negotiated_codecs
from lotcast.media.forwarder import ForwardSink, TrackForwarder
from lotcast.media.rtp import h264_nal_starts, keyframe_detector
from lotcast.media.testsource import CounterVideoTrack, read
from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)

H264 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=102,
                             parameters={"packetization-mode": "1",
                                         "profile-level-id": "42e01f"})

SPS = bytes([0x67, 0x42, 0xC0, 0x1F, 0xDA])
PPS = bytes([0x68, 0xCE, 0x3C, 0x80])
SEI = bytes([0x06, 0x05, 0x10])
IDR_FIRST = bytes([0x65, 0x88, 0x84])  # first_mb_in_slice 0: a new picture
IDR_LATER = bytes([0x65, 0x41, 0x9A])  # first_mb_in_slice > 0: another slice of the same
P_FIRST = bytes([0x41, 0x9A, 0x02])


def stap_a(*nals: bytes) -> bytes:
    header = max(n[0] & 0x60 for n in nals) | 24
    return bytes([header]) + b"".join(len(n).to_bytes(2, "big") + n for n in nals)


def fu_a(nal: bytes, start: bool, end: bool = False) -> bytes:
    indicator = (nal[0] & 0xE0) | 28
    header = (0x80 if start else 0) | (0x40 if end else 0) | (nal[0] & 0x1F)
    return bytes([indicator, header]) + (nal[1:] if start else b"\x11\x22")


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(IDR_FIRST, True, id="single-NAL-IDR-slice"),
        pytest.param(stap_a(SPS, PPS, IDR_FIRST), True, id="STAP-A-with-SPS-PPS-and-the-IDR"),
        pytest.param(stap_a(SPS, PPS), True, id="STAP-A-SPS-PPS-IDR-follows"),
        pytest.param(fu_a(IDR_FIRST, start=True), True, id="FU-A-start-of-an-IDR"),
        pytest.param(SPS, True, id="SPS"),
        pytest.param(P_FIRST, False, id="non-IDR-slice"),
        pytest.param(fu_a(P_FIRST, start=True), False, id="FU-A-start-of-a-non-IDR-slice"),
        pytest.param(fu_a(IDR_FIRST, start=False), False, id="FU-A-continuation-of-an-IDR"),
        pytest.param(fu_a(IDR_FIRST, start=False, end=True), False, id="FU-A-end-of-an-IDR"),
        pytest.param(stap_a(SPS, PPS, P_FIRST), False, id="parameter-sets-repeated-before-a-P-frame"),
        pytest.param(SEI, False, id="SEI"),
        pytest.param(b"", False, id="empty"),
        pytest.param(bytes([0x7C]), False, id="truncated-FU-A"),
    ],
)
def test_h264_keyframe_start_of_one_packet(payload: bytes, expected: bool) -> None:
    assert keyframe_detector("video/H264")(payload) is expected


@pytest.mark.parametrize(
    ("packets", "starts"),
    [
        # aiortc: STAP-A(SPS, PPS), then the IDR in FU-A fragments, then P-frames
        ([stap_a(SPS, PPS), fu_a(IDR_FIRST, True), fu_a(IDR_FIRST, False),
          fu_a(IDR_FIRST, False, True), P_FIRST, stap_a(SPS, PPS), fu_a(IDR_FIRST, True)],
         [True, False, False, False, False, True, False]),
        # GStreamer rtph264pay config-interval=-1: SPS, PPS and IDR in their own packets
        ([SPS, PPS, IDR_FIRST, P_FIRST, SPS, PPS, fu_a(IDR_FIRST, True)],
         [True, False, False, False, True, False, False]),
        # x264's first frame: SPS, PPS, SEI, IDR
        ([SPS, PPS, SEI, fu_a(IDR_FIRST, True), fu_a(IDR_FIRST, False, True)],
         [True, False, False, False, False]),
        # several slices per IDR picture (OpenH264 in browsers): one start per picture
        ([stap_a(SPS, PPS), IDR_FIRST, IDR_LATER, fu_a(IDR_LATER, True), P_FIRST],
         [True, False, False, False, False]),
        # IDR pictures back to back without parameter sets: each one is a start
        ([IDR_FIRST, IDR_LATER, IDR_FIRST, IDR_LATER], [True, False, True, False]),
    ],
)
def test_h264_keyframe_starts_once_per_access_unit(packets: list[bytes], starts: list[bool]) -> None:
    detect = keyframe_detector("video/H264")
    assert [detect(p) for p in packets] == starts


def test_h264_nal_starts_reads_aggregates_and_fragments() -> None:
    assert [t for t, _ in h264_nal_starts(stap_a(SPS, PPS, IDR_FIRST))] == [7, 8, 5]
    assert h264_nal_starts(fu_a(IDR_FIRST, True)) == [(5, bytes([0x88]))]
    assert h264_nal_starts(fu_a(IDR_FIRST, False)) == []
    # a STAP-A whose size field runs past the end: what is there is read, nothing raises
    assert [t for t, _ in h264_nal_starts(bytes([0x78, 0x00, 0x40, 0x67, 0x42]))] == [7]


class CapturingSender:
    """Stands in for a peer's SRTP+socket pair: records what the forwarder would send."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.protect = lambda data: data
        self.sendto = lambda data, addr: self.sent.append(data)
        self.addr = ("127.0.0.1", 9)

    def send(self, data: bytes) -> None:
        self.sent.append(data)


def seqs(packets: list[bytes]) -> list[int]:
    return [int.from_bytes(p[2:4], "big") for p in packets]


def h264_packet(seq: int, payload: bytes, timestamp: int = 0, marker: int = 0) -> RtpPacket:
    packet = RtpPacket(payload_type=102, sequence_number=seq, timestamp=timestamp, ssrc=42,
                       marker=marker)
    packet.payload = payload
    return packet


async def test_a_viewer_joining_just_after_an_h264_keyframe_gets_all_of_it_replayed() -> None:
    forwarder = TrackForwarder("video", H264, output_ssrc=1234)
    forwarder.keyframe_requester = lambda: True
    early = CapturingSender()
    forwarder.add_sink(ForwardSink(cast(Any, early), cast(Any, SimpleNamespace()), 102))
    stream = [P_FIRST, stap_a(SPS, PPS), fu_a(IDR_FIRST, True), fu_a(IDR_FIRST, False),
              fu_a(IDR_FIRST, False, True), P_FIRST]
    for seq, payload in enumerate(stream, start=1):
        forwarder.on_source_packet(h264_packet(seq, payload))
    await asyncio.sleep(0.05)
    # the early viewer waited for the key frame: from its SPS/PPS on, not the P-frame before
    assert seqs(early.sent) == [2, 3, 4, 5, 6]
    late = CapturingSender()
    late_sink = ForwardSink(cast(Any, late), cast(Any, SimpleNamespace()), 100)
    forwarder.add_sink(late_sink)
    # replayed at once from the cache, parameter sets included, rewritten to its payload type
    assert seqs(late.sent) == [2, 3, 4, 5, 6]
    assert all(p[1] & 0x7F == 100 for p in late.sent)
    assert not late_sink.waiting_keyframe and forwarder.keyframe_replays == 1
    forwarder.on_source_packet(h264_packet(7, P_FIRST))
    await asyncio.sleep(0.05)
    assert seqs(late.sent)[-1] == 7
    forwarder.close()


async def encoded_frames(count: int) -> list[tuple[list[bytes], int]]:
    """(RTP payloads, timestamp) per frame from aiortc's own H.264 encoder (libx264), the
    first a forced key frame; camera-like frames carrying testsource's painted counters."""
    encoder = H264Encoder()
    track = CounterVideoTrack(noisy=True)
    out: list[tuple[list[bytes], int]] = []
    for i in range(count):
        frame = await track.recv()
        out.append(encoder.encode(frame, force_keyframe=(i == 0)))
    return out


def decode(packets: list[bytes]) -> list[int]:
    """Counters painted in the frames a real H.264 decoder gets out of these RTP packets."""
    decoder = H264Decoder()
    counters: list[int] = []
    by_timestamp: dict[int, list[bytes]] = {}
    for data in packets:
        packet = RtpPacket.parse(data)
        by_timestamp.setdefault(packet.timestamp, []).append(h264_depayload(packet.payload))
    for timestamp, parts in by_timestamp.items():
        for frame in decoder.decode(JitterFrame(b"".join(parts), timestamp)):
            counters.append(read(cast(av.VideoFrame, frame))[0])
    return counters


async def test_the_replayed_h264_keyframe_of_a_real_encoder_decodes() -> None:
    frames = await encoded_frames(4)
    key_payloads = frames[0][0]
    # the encoder's key frame spans several packets, parameter sets first
    assert len(key_payloads) >= 2, [len(p) for p in key_payloads]
    assert {t for t, _ in h264_nal_starts(key_payloads[0])} & {7, 8}
    forwarder = TrackForwarder("video", H264, output_ssrc=1234)
    forwarder.keyframe_requester = lambda: True
    seq = 100
    for payloads, timestamp in frames[:2]:
        for index, payload in enumerate(payloads):
            forwarder.on_source_packet(h264_packet(seq, payload, timestamp,
                                                   int(index == len(payloads) - 1)))
            seq += 1
    await asyncio.sleep(0.05)
    late = CapturingSender()
    forwarder.add_sink(ForwardSink(cast(Any, late), cast(Any, SimpleNamespace()), 102))
    assert forwarder.keyframe_replays == 1
    # everything since the key frame's first packet (SPS/PPS), nothing of it missing
    assert seqs(late.sent) == list(range(100, seq))
    assert decode(late.sent) == [0, 1]
    forwarder.close()


class H264Publisher(Publisher):
    """The aiortc WHIP publisher, offering H.264 only (as OBS does)."""

    async def start(self) -> None:
        self.pc.addTrack(AudioStreamTrack())
        sender = self.pc.addTrack(self.video)
        transceiver = next(t for t in self.pc.getTransceivers() if t.sender is sender)
        capabilities = RTCRtpSender.getCapabilities("video")
        assert capabilities is not None
        transceiver.setCodecPreferences([c for c in capabilities.codecs
                                         if c.mimeType in ("video/H264", "video/rtx")])
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = self.pc.localDescription.sdp
        assert "VP8" not in offer and "H264/90000" in offer
        async with http_client() as http:
            response = await http.post(self.url, content=offer,
                                       headers={"Content-Type": "application/sdp",
                                                "Authorization": f"Bearer {self.token}"})
        assert response.status_code == 201, (response.status_code, response.text)
        self.resource = urljoin(self.url, response.headers["Location"])
        await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))


def video_codec(viewer: Viewer) -> str:
    video = next(t for t in viewer.pc.getTransceivers() if t.kind == "video")
    return negotiated_codecs(video)[0].mimeType


async def stream_stats(url: str) -> dict[str, Any]:
    async with http_client() as http:
        stats = (await http.get(f"{url}/api/stats")).json()
    return cast(dict[str, Any], stats["streams"][0])


async def test_h264_viewers_decode_the_publishers_frames_in_order(redis_server: RedisServer) -> None:
    with running_cluster(redis_server) as cluster:
        publisher = H264Publisher(cluster.origin.url, "h264-show", host_token())
        await publisher.start()
        try:
            async with viewers(cluster.relay.url, "h264-show", 2) as group:
                for viewer in group:
                    await viewer.wait_frames(45, timeout=40)
                for viewer in group:
                    assert video_codec(viewer) == "video/H264"
                    assert_in_order(viewer.counters)
                    assert viewer.audio_frames > 0, "no audio decoded"
                    assert max(viewer.counters) < publisher.video.counter
        finally:
            await publisher.stop()


async def test_h264_late_joiner_gets_a_first_frame_through_the_pli_path(
    redis_server: RedisServer,
) -> None:
    with running_cluster(redis_server) as cluster:
        publisher = H264Publisher(cluster.origin.url, "h264-late", host_token())
        await publisher.start()
        try:
            async with viewers(cluster.relay.url, "h264-late", 1) as early:
                await early[0].wait_frames(60, timeout=40)
                requests_before = (await stream_stats(cluster.origin.url))["video_keyframe_requests"]
                late = Viewer(cluster.relay.url, "h264-late")
                await late.start()
                try:
                    # x264 in aiortc makes a key frame only every 250 frames unless asked: the
                    # late viewer's first frames come from the key frame its PLI asked for
                    await late.wait_frames(5, timeout=15)
                    assert video_codec(late) == "video/H264"
                    assert late.counters[0] > early[0].counters[0] + 30
                    assert late.counters[0] < 250
                    assert_in_order(late.counters)
                    origin = await stream_stats(cluster.origin.url)
                    # the relay's request went upstream: the origin asked the publisher
                    assert origin["video_keyframe_requests"] > requests_before
                finally:
                    await late.stop()
        finally:
            await publisher.stop()


async def test_h264_viewers_resume_after_the_publisher_reconnects(redis_server: RedisServer) -> None:
    with running_cluster(redis_server) as cluster:
        first = H264Publisher(cluster.origin.url, "h264-again", host_token())
        await first.start()
        async with viewers(cluster.relay.url, "h264-again", 1) as group:
            viewer = group[0]
            await viewer.wait_frames(20, timeout=40)
            await first.stop()
            await asyncio.sleep(1.0)
            seen = len(viewer.counters)
            second = H264Publisher(cluster.origin.url, "h264-again", host_token(),
                                   first_frame=500_000)
            await second.start()
            try:
                # the new source's first key frame is found (and asked for) again
                await viewer.wait_frames(seen + 30, timeout=30)
                resumed = [c for c in viewer.counters[seen:] if c >= 500_000]
                assert len(resumed) >= 20
                assert_in_order(resumed)
                assert viewer.pc.connectionState == "connected"
            finally:
                await second.stop()
