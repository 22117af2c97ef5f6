"""abs-send-time on forwarded video (issue 11: Chromium's receive-side bandwidth estimate, sent
back as REMB, needs it on the packets it receives).

What a viewer gets is decrypted with its own SRTP key and parsed by aiortc's `RtpPacket.parse`
with the extension id the viewer negotiated: video to a sink with an id carries the RFC 8285
one-byte extension with the forwarder's send clock (fixed here, so both send paths can be
compared byte for byte), stamped once per packet per send group; payload, numbering and
payload type are what they were without it; audio and sinks without an id get the old bytes;
key-frame replays, layer-switch replays, a resumed viewer and NACK answers are stamped when
sent. The end-to-end test is a real aiortc viewer of a real relay.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pylibsrtp
import pytest
from aiortc import RTCRtpCodecParameters
from aiortc.clock import current_ntp_time
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from media_support import Publisher, Viewer, host_token, running_cluster
from test_native_fanout import OPUS, SocketSender, _drain, _receiver

from lotcast.media import forwarder as forwarder_module
from lotcast.media import native
from lotcast.media.aiortc_hooks import (
    _widen_srtp_session,
    drop_incoming_rtp,
    fast_protect,
    native_target,
    negotiated_codecs,
)
from lotcast.media.forwarder import ForwardSink, TrackForwarder
from lotcast.media.rtp import abs_send_time_now, build_packet
from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)

ABS_SEND_TIME_URI = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
OUTPUT_SSRC = 0x0A0B0C0D


def extensions_map(extension_id: int) -> HeaderExtensionsMap:
    extensions = HeaderExtensionsMap()
    extensions.configure(RTCRtpParameters(headerExtensions=[
        RTCRtpHeaderExtensionParameters(id=extension_id, uri=ABS_SEND_TIME_URI)]))
    return extensions


class Clock:
    """The forwarder's send clock, fixed: each reading the next value (wrapping at 24 bits)."""

    def __init__(self, first: int = 0xFFFFF0) -> None:
        self.next = first
        self.readings: list[int] = []

    def __call__(self) -> int:
        value = self.next
        self.next = (self.next + 1) & 0xFFFFFF
        self.readings.append(value)
        return value


def _policy(key: bytes, ssrc_type: int) -> Any:
    # as aiortc's DTLS transport makes them: a NACK answer protects one index again
    policy = pylibsrtp.Policy(key=key, ssrc_type=ssrc_type,
                              srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80)
    policy.allow_repeat_tx = True
    policy.window_size = 1024
    return policy


class AiortcSocketSender(SocketSender):
    """SocketSender (PacketSender's stand-in) with aiortc's outbound SRTP policy."""

    def __init__(self, key: bytes, dest: Any) -> None:
        super().__init__(key, dest)
        self.session = pylibsrtp.Session(_policy(key, pylibsrtp.Policy.SSRC_ANY_OUTBOUND))
        _widen_srtp_session(self.session)
        self.protect = fast_protect(self.session)
        self.native = native_target(self.session, self.sock.fileno(), dest)


class Viewport:
    """One sink's viewer: a socket it receives on and its SRTP key to decrypt what came."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.rx = _receiver()
        self.sender = AiortcSocketSender(key, self.rx.getsockname())
        self.wire: list[bytes] = []  # SRTP datagrams, as received

    def receive(self) -> list[bytes]:
        """The RTP (decrypted) of the datagrams that came since the last call."""
        got = _drain(self.rx)
        self.wire.extend(got)
        # a session per datagram: a resent packet is no replay to refuse here
        return [pylibsrtp.Session(_policy(self.key, pylibsrtp.Policy.SSRC_ANY_INBOUND))
                .unprotect(data) for data in got]

    def close(self) -> None:
        self.rx.close()
        self.sender.sock.close()


def parse(data: bytes, extension_id: int) -> RtpPacket:
    return RtpPacket.parse(data, extensions_map(extension_id))


def vp8(seq: int, keyframe: bool = False, size: int = 900) -> RtpPacket:
    # VP8 payload descriptor with S=1, partition 0; payload header P bit 0 on a key frame
    body = bytes((seq * 13 + i) & 0xFF for i in range(size))
    payload = bytes((0x10, 0x00 if keyframe else 0x01)) + body
    return RtpPacket(payload_type=96, sequence_number=seq, timestamp=3000 * (seq // 2),
                     ssrc=0x77, marker=seq % 2, payload=payload)


def feed(forwarder: TrackForwarder, packets: list[RtpPacket]) -> None:
    for packet in packets:
        forwarder.on_source_packet(packet)
        forwarder._drain()


@pytest.fixture
def viewports() -> Iterator[Callable[[bytes], Viewport]]:
    made: list[Viewport] = []

    def make(key: bytes) -> Viewport:
        viewport = Viewport(key)
        made.append(viewport)
        return viewport

    yield make
    for viewport in made:
        viewport.close()


def sink(viewport: Viewport, payload_type: int, extension_id: int) -> ForwardSink:
    return ForwardSink(viewport.sender, SimpleNamespace(), payload_type,  # type: ignore[arg-type]
                       abs_send_time_id=extension_id)


def _fan_out(use_native: bool, monkeypatch: pytest.MonkeyPatch,
             make: Callable[[bytes], Viewport]) -> dict[str, Any]:
    """Four video sinks (two with id 3 on payload type 96, one with id 5 on 98, one with no
    id) and one audio sink with id 3, the same source packets; what each got."""
    monkeypatch.setenv(native.ENV, "1" if use_native else "0")
    video = TrackForwarder("video", VP8, OUTPUT_SSRC)
    audio = TrackForwarder("audio", OPUS, OUTPUT_SSRC + 1)
    clock = Clock()
    video.send_clock = audio.send_clock = clock
    ports = {name: make(bytes([n]) * 30) for n, name in enumerate(("a", "b", "c", "plain", "audio"))}
    ids = {"a": 3, "b": 3, "c": 5, "plain": 0}
    pts = {"a": 96, "b": 96, "c": 98, "plain": 96}
    for name, extension_id in ids.items():
        video.add_sink(sink(ports[name], pts[name], extension_id))
    assert OPUS.payloadType is not None
    audio.add_sink(sink(ports["audio"], OPUS.payloadType, 3))
    sources = [vp8(100, keyframe=True), *(vp8(seq) for seq in range(101, 110))]
    feed(video, sources)
    feed(audio, [RtpPacket(payload_type=111, sequence_number=seq, timestamp=960 * seq, ssrc=9,
                           payload=bytes(range(80))) for seq in range(10)])
    got = {name: port.receive() for name, port in ports.items()}
    result = {"got": got, "wire": {name: port.wire for name, port in ports.items()},
              "readings": clock.readings, "native_sent": video.native_packets_sent,
              "sources": sources}
    video.close()
    audio.close()
    return result


@pytest.mark.parametrize("use_native", [False, True], ids=["python", "native"])
async def test_video_to_a_sink_with_an_id_carries_abs_send_time_and_nothing_else_changes(
    use_native: bool, monkeypatch: pytest.MonkeyPatch, viewports: Callable[[bytes], Viewport],
) -> None:
    run = _fan_out(use_native, monkeypatch, viewports)
    got, sources = run["got"], run["sources"]
    assert run["native_sent"] == (40 if use_native else 0)
    for name in ("a", "b", "c", "plain"):
        assert len(got[name]) == len(sources), name
    # one clock reading per source packet per stamped group (a and b share one), none per copy
    assert len(run["readings"]) == 2 * len(sources)
    stamps: dict[str, list[int]] = {}
    for name, extension_id in (("a", 3), ("b", 3), ("c", 5)):
        parsed = [parse(data, extension_id) for data in got[name]]
        stamps[name] = [p.extensions.abs_send_time for p in parsed]
        # the one-byte block exactly: X bit, 0xBEDE, one word, (id << 4) | 2, 3 bytes
        for data, value in zip(got[name], stamps[name], strict=True):
            assert data[0] == 0x90
            assert data[12:20] == bytes((0xBE, 0xDE, 0, 1, (extension_id << 4) | 2)) + \
                value.to_bytes(3, "big")
        plain = [parse(data, 3) for data in got["plain"]]
        for packet, reference in zip(parsed, plain, strict=True):
            assert packet.payload == reference.payload
            assert (packet.sequence_number, packet.timestamp, packet.ssrc, packet.marker) == (
                reference.sequence_number, reference.timestamp, reference.ssrc, reference.marker)
            assert packet.payload_type == (98 if name == "c" else 96)
    assert stamps["a"] == stamps["b"]
    assert sorted(stamps["a"] + stamps["c"]) == sorted(run["readings"])
    # read at each packet's send: in order, across the 24-bit wrap the clock starts before
    assert [(v - stamps["a"][0]) % (1 << 24) for v in stamps["a"]] == list(range(0, 20, 2))
    # no id: the bytes the forwarder always sent (no X bit, no extension)
    for data, source in zip(got["plain"], sources, strict=True):
        assert data == build_packet(source.marker, 96, source.sequence_number, source.timestamp,
                                    OUTPUT_SSRC, source.payload)
    # audio is never stamped, whatever the sink's id
    assert len(got["audio"]) == 10
    for data in got["audio"]:
        assert data[0] == 0x80 and parse(data, 3).extensions.abs_send_time is None


async def test_stamped_srtp_is_byte_identical_on_the_native_and_python_paths(
    monkeypatch: pytest.MonkeyPatch, viewports: Callable[[bytes], Viewport],
) -> None:
    python_run = _fan_out(False, monkeypatch, viewports)
    native_run = _fan_out(True, monkeypatch, viewports)
    assert native_run["native_sent"] == 40 and python_run["native_sent"] == 0
    assert native_run["readings"] == python_run["readings"]
    assert len(native_run["readings"]) == 20
    for name in ("a", "b", "c", "plain", "audio"):
        assert native_run["wire"][name] == python_run["wire"][name], name
        assert len(native_run["wire"][name]) == 10
        # (SRTP leaves the header, extension block included, in the clear)
        stamped = name in ("a", "b", "c")
        assert {data[0] for data in native_run["wire"][name]} == {0x90 if stamped else 0x80}


def test_the_send_clock_is_aiortcs_abs_send_time() -> None:
    before = (current_ntp_time() >> 14) & 0xFFFFFF
    value = abs_send_time_now()
    after = (current_ntp_time() >> 14) & 0xFFFFFF
    # 6.18 fixed point: 2**18 per second; within the readings (mod the 64 s wrap)
    assert (value - before) % (1 << 24) <= (after - before) % (1 << 24) + 1


@pytest.mark.parametrize("use_native", [False, True], ids=["python", "native"])
async def test_replays_resends_and_a_resumed_viewer_are_stamped_when_sent(
    use_native: bool, monkeypatch: pytest.MonkeyPatch, viewports: Callable[[bytes], Viewport],
) -> None:
    monkeypatch.setenv(native.ENV, "1" if use_native else "0")
    # the joining viewer must get the cached key frame, however slowly this machine runs
    monkeypatch.setattr(forwarder_module, "KEYFRAME_REPLAY_WINDOW", 600.0)
    high = TrackForwarder("video", VP8, OUTPUT_SSRC)
    low = TrackForwarder("video", VP8, OUTPUT_SSRC)
    clock = Clock(first=0x400000)
    high.send_clock = low.send_clock = clock
    first, joiner, plain = viewports(b"1" * 30), viewports(b"2" * 30), viewports(b"3" * 30)
    first_sink = sink(first, 97, 7)
    high.add_sink(first_sink)
    high.add_sink(sink(plain, 96, 0))
    source = [vp8(200, keyframe=True), vp8(201), vp8(202), vp8(203)]
    feed(high, source)
    assert len(first.receive()) == 4 and len(plain.receive()) == 4

    def check(data: bytes, want_seq: int, source_packet: RtpPacket, reading: int,
              extension_id: int = 7) -> None:
        packet = parse(data, extension_id)
        assert packet.extensions.abs_send_time == reading
        assert packet.sequence_number == want_seq and packet.payload_type == 97
        assert packet.payload == source_packet.payload

    # a viewer joining just after the key frame: the cached packets replayed, each stamped
    clock.readings.clear()
    high.add_sink(sink(joiner, 97, 7))
    replayed = joiner.receive()
    assert len(replayed) == 4 and len(clock.readings) == 4
    for index, data in enumerate(replayed):
        check(data, 200 + index, source[index], clock.readings[index])
    # a NACK answered from the history: stamped now, not with its first send's time
    clock.readings.clear()
    high.retransmit(first_sink, [201])
    (resent,) = first.receive()
    check(resent, 201, source[1], clock.readings[0])
    assert plain.receive() == []
    # the sink moves to the other layer: its key frame replayed shifted and stamped
    low_source = [RtpPacket(payload_type=96, sequence_number=5000 + i, ssrc=0x88,
                            timestamp=777000 + 3000 * (i // 2), marker=i % 2,
                            payload=vp8(i, keyframe=i == 0).payload) for i in range(4)]
    low.switch_in(first_sink, high)
    clock.readings.clear()
    feed(low, low_source[:2])  # one whole key frame (marker on its second packet)
    switched = first.receive()
    assert low.layer_switches == 1 and len(switched) == 2
    assert [parse(d, 7).extensions.abs_send_time for d in switched] == clock.readings
    for index, data in enumerate(switched):
        check(data, 204 + index, low_source[index], clock.readings[index])
    # then the new layer's packets, shifted onto the viewer's numbering, stamped per packet
    clock.readings.clear()
    feed(low, low_source[2:])
    after = first.receive()
    assert len(after) == 2 and len(clock.readings) == 2
    for index, data in enumerate(after):
        check(data, 206 + index, low_source[2 + index], clock.readings[index])
    # a NACK for a packet of the layer it left: that layer's history, stamped now
    clock.readings.clear()
    low.retransmit(first_sink, [203])
    (old_layer,) = first.receive()
    check(old_layer, 203, source[3], clock.readings[0])
    # paused and resumed: the key frame it comes back at is stamped (and numbered on)
    low.pause(first_sink)
    feed(low, [RtpPacket(payload_type=96, sequence_number=5004, ssrc=0x88, timestamp=790000,
                         marker=1, payload=vp8(4).payload)])
    assert first.receive() == []
    low.resume(first_sink)
    clock.readings.clear()
    resumed_source = RtpPacket(payload_type=96, sequence_number=5005, ssrc=0x88,
                               timestamp=800000, marker=1, payload=vp8(0, keyframe=True).payload)
    feed(low, [resumed_source])
    (resumed,) = first.receive()
    check(resumed, 208, resumed_source, clock.readings[-1])
    high.close()
    low.close()


@pytest.mark.timeout(180)
async def test_an_aiortc_viewer_of_a_relay_gets_video_with_a_rising_abs_send_time(
    redis_server: RedisServer,
) -> None:
    with running_cluster(redis_server) as cluster:
        publisher = Publisher(cluster.origin.url, "abs-time", host_token())
        await publisher.start()
        viewer = Viewer(cluster.relay.url, "abs-time")
        try:
            await viewer.start()
            video = next(t for t in viewer.pc.getTransceivers() if t.kind == "video")
            audio = next(t for t in viewer.pc.getTransceivers() if t.kind == "audio")
            extension_id = next(e.id for e in video._headerExtensions
                                if e.uri == ABS_SEND_TIME_URI)
            video_pt = negotiated_codecs(video)[0].payloadType
            audio_pt = negotiated_codecs(audio)[0].payloadType
            # every SRTP datagram's header (cleartext, extensions included), as it arrives
            headers: list[tuple[float, bytes]] = []

            def record(data: bytes) -> bool:
                headers.append((time.time(), data))
                return False

            drop_incoming_rtp(video.receiver.transport, record)
            await viewer.wait_frames(60, timeout=60)
        finally:
            await viewer.stop()
            await publisher.stop()
    extensions = extensions_map(extension_id)
    video_packets: list[tuple[float, RtpPacket]] = []
    audio_packets: list[RtpPacket] = []
    for arrived, data in headers:
        header_end = 12 + 4 * (data[0] & 0x0F)
        if data[0] & 0x10:  # the extension block's own length word
            header_end += 4 + 4 * int.from_bytes(data[header_end + 2:header_end + 4], "big")
        # only the header is parsed (the payload is still encrypted)
        packet = RtpPacket.parse(bytes([data[0] & ~0x20]) + data[1:header_end], extensions)
        if packet.payload_type == video_pt:
            video_packets.append((arrived, packet))
        elif packet.payload_type == audio_pt:
            audio_packets.append(packet)
    assert len(video_packets) >= 60 and audio_packets
    values = [p.extensions.abs_send_time for _, p in video_packets]
    assert None not in values, f"{values.count(None)} of {len(values)} video packets unstamped"
    # rising in send order (mod the 64 s wrap; NACK answers are later sends of older numbers)
    stamped_values = [v for v in values if v is not None]
    steps = [(b - a) % (1 << 24) for a, b in itertools.pairwise(stamped_values)]
    assert all(step < 1 << 23 for step in steps), steps
    # the relay's NTP clock is this machine's: each stamp precedes its arrival
    for arrived, packet in video_packets:
        received = int((arrived + 2208988800) * (1 << 18)) & 0xFFFFFF
        lead = (received - (packet.extensions.abs_send_time or 0)) % (1 << 24)
        assert lead < 10 * (1 << 18), (lead / (1 << 18), packet.sequence_number)
    assert all(p.extensions.abs_send_time is None for p in audio_packets)
