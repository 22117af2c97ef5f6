"""RTCP on the forwarding path: NACKs answered from the relay's history, Sender Reports mapped
from the publisher's, and keyframe requests from many viewers collapsed into few."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiortc import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket
from media_support import (
    Publisher,
    Viewer,
    host_token,
    http_client,
    lose_every_20th_video_packet_once,
    running_cluster,
)

from lotcast.media.forwarder import ForwardSink, TrackForwarder
from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)


async def test_lost_packets_are_retransmitted_from_the_relay_history(redis_server: RedisServer) -> None:
    with running_cluster(redis_server) as cluster:
        publisher = Publisher(cluster.origin.url, "lossy", host_token())
        await publisher.start()
        viewer = Viewer(cluster.relay.url, "lossy")
        await viewer.start()
        loss = lose_every_20th_video_packet_once(viewer)
        dropped, recovered = loss.dropped, loss.recovered
        try:
            await viewer.wait_frames(90, timeout=40)
            async with http_client() as http:
                stats = (await http.get(f"{cluster.relay.url}/api/stats")).json()
            assert len(dropped) >= 3
            # every loss but the most recent few was NACKed and resent from the relay's history
            assert len(recovered) >= len(dropped) - 2, (sorted(dropped), sorted(recovered))
            # (or in the key frame the viewer started on, sent again on its PLI)
            stream = stats["streams"][0]
            assert (stream["video_nacks_served"] + stream["video_keyframe_resent_packets"]
                    >= len(recovered)), stream
            # (aiortc's own jitter buffer may re-emit frames when a late packet lands, so frame
            # order is not asserted here; the fan-out tests assert it on a clean network)
        finally:
            await viewer.stop()
            await publisher.stop()


async def test_viewers_get_sender_reports_mapped_from_the_publisher(redis_server: RedisServer) -> None:
    with running_cluster(redis_server) as cluster:
        publisher = Publisher(cluster.origin.url, "sr", host_token())
        await publisher.start()
        viewer = Viewer(cluster.relay.url, "sr")
        await viewer.start()
        try:
            await viewer.wait_frames(10, timeout=30)
            deadline = time.monotonic() + 10
            reports: list[Any] = []
            while not any(r.packetsSent > 0 for r in reports) and time.monotonic() < deadline:
                await asyncio.sleep(0.3)
                for transceiver in viewer.pc.getTransceivers():
                    stats = await transceiver.receiver.getStats()
                    reports += [s for s in stats.values() if s.type == "remote-outbound-rtp"]
            assert any(r.packetsSent > 0 for r in reports), "no mapped Sender Report reached the viewer"
            for report in reports:
                # NTP time from the publisher's clock (same machine), never a zero placeholder
                assert abs(report.remoteTimestamp.timestamp() - time.time()) < 30
        finally:
            await viewer.stop()
            await publisher.stop()


async def test_keyframe_requests_are_throttled() -> None:
    codec = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
    forwarder = TrackForwarder("video", codec, output_ssrc=1234)
    requests: list[float] = []

    def requester() -> bool:
        requests.append(time.monotonic())
        return True

    forwarder.keyframe_requester = requester
    for _ in range(50):  # fifty viewers (or a child relay's many) asking at once
        forwarder.request_keyframe()
    assert len(requests) == 1
    # the ones inside the interval are not lost: one more request when it ends
    await asyncio.sleep(0.8)
    assert len(requests) == 2
    assert requests[1] - requests[0] >= 0.45
    # a viewer still waiting for a key frame keeps asking, once per interval
    forwarder.add_sink(ForwardSink(cast(Any, None), cast(Any, None), 96))
    await asyncio.sleep(0.4)
    assert len(requests) == 3
    assert requests[2] - requests[1] >= 0.45
    await asyncio.sleep(1.2)
    assert 4 <= len(requests) <= 6  # bounded: ~1 per 500 ms while it waits
    forwarder.close()


async def test_keyframe_requests_wait_for_a_known_source() -> None:
    codec = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
    forwarder = TrackForwarder("video", codec, output_ssrc=1234)
    known = False
    sent: list[float] = []

    def requester() -> bool:
        if known:
            sent.append(time.monotonic())
        return known

    forwarder.keyframe_requester = requester
    forwarder.request_keyframe()  # source SSRC not known yet: nothing sent, not forgotten
    assert sent == [] and forwarder.keyframe_requests_sent == 0
    known = True
    await asyncio.sleep(0.3)
    assert len(sent) == 1 and forwarder.keyframe_requests_sent == 1
    forwarder.close()


class CapturingSender:
    """Stands in for a peer's SRTP+socket pair: records what the forwarder would send."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.protect = lambda data: data
        self.sendto = lambda data, addr: self.sent.append(data)
        self.addr = ("127.0.0.1", 9)

    def send(self, data: bytes) -> None:
        self.sent.append(data)


def vp8_packet(seq: int, keyframe: bool) -> RtpPacket:
    packet = RtpPacket(payload_type=96, sequence_number=seq, timestamp=seq * 3000, ssrc=42)
    packet.payload = bytes([0x10, 0x00 if keyframe else 0x01]) + b"x" * 100
    return packet


async def test_a_viewer_joining_just_after_a_keyframe_gets_it_replayed() -> None:
    codec = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
    forwarder = TrackForwarder("video", codec, output_ssrc=1234)
    forwarder.keyframe_requester = lambda: True
    early = CapturingSender()
    forwarder.add_sink(ForwardSink(cast(Any, early), cast(Any, SimpleNamespace()), 96))
    for seq, key in ((1, False), (2, True), (3, False), (4, False)):
        forwarder.on_source_packet(vp8_packet(seq, key))
    await asyncio.sleep(0.05)
    # the early viewer waited for the key frame: packets 2..4, not 1
    assert [int.from_bytes(p[2:4], "big") for p in early.sent] == [2, 3, 4]
    late = CapturingSender()
    late_sink = ForwardSink(cast(Any, late), cast(Any, SimpleNamespace()), 100)
    forwarder.add_sink(late_sink)
    # replayed at once from the cache, rewritten to the late viewer's payload type
    assert [int.from_bytes(p[2:4], "big") for p in late.sent] == [2, 3, 4]
    assert all(p[1] & 0x7F == 100 for p in late.sent)
    assert not late_sink.waiting_keyframe and forwarder.keyframe_replays == 1
    forwarder.on_source_packet(vp8_packet(5, False))
    await asyncio.sleep(0.05)
    assert int.from_bytes(late.sent[-1][2:4], "big") == 5
    forwarder.close()
