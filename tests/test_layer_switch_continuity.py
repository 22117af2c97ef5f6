"""One aiortc viewer switched between simulcast layers again and again (issue 11), without
Chromium: three layers of real VP8 (aiortc's encoder at three sizes, as a simulcast publisher
sends them: an SSRC, a numbering and a timestamp base of their own, a key frame when asked) feed
three TrackForwarders the way the simulcast ingest does, and one real aiortc viewer over
loopback SRTP is switched h -> l -> m -> h. After every switch it decodes the new layer's size
with no decode error and no key-frame request of its own, and the sequence numbers and RTP
timestamps on its wire are continuous / monotonic across every switch.

The publisher faults that broke a second switch of an aiortc viewer are injected at every
switch (each as a real publisher or network produces it):
- a copy of an older packet of the layer being left arrives just before the new layer's key
  frame (Chromium's RTX "payload padding", a retransmission of a packet already received);
- the new layer's key frame arrives while the old layer is in the middle of a frame;
- the last packet the viewer gets from the old layer is lost, so its NACK reaches the relay
  only after the switch.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import random
from collections.abc import Callable
from typing import Any

import av
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpCodecParameters
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpparameters import RTCRtpCodecCapability
from aiortc.rtp import RtpPacket

from lotcast.media.aiortc_hooks import (
    PacketSender,
    SenderFeedback,
    SilentTrack,
    drop_incoming_rtp,
    hook_sender,
    negotiated_codecs,
    new_peer_connection,
    restrict_host_addresses,
)
from lotcast.media.forwarder import ForwardSink, TrackForwarder
from lotcast.media.testsource import CounterVideoTrack

restrict_host_addresses(["127.0.0.1"])

VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
OUTPUT_SSRC = 0x5EED1234
SIZES = {"h": (640, 360), "m": (320, 180), "l": (160, 90)}
SWITCHES = ("l", "m", "h")  # from the top layer a viewer starts on
FRAMES_PER_STEP = 150  # source frames fed at most per step (5 s of 30 fps video)
DECODED_AFTER_SWITCH = 12  # consecutive frames of the new size that prove a switch


def seq_of(data: bytes) -> int:
    return (data[2] << 8) | data[3]


def ts_of(data: bytes) -> int:
    return int.from_bytes(data[4:8], "big")


class Layer:
    """One simulcast layer as a publisher sends it: its own VP8 encoder, SSRC, sequence
    numbers and timestamp base; a key frame on the next frame after a request (PLI)."""

    def __init__(self, rid: str, forwarder: TrackForwarder, rng: random.Random) -> None:
        self.rid = rid
        self.size = SIZES[rid]
        self.forwarder = forwarder
        self.encoder = Vp8Encoder()
        self.ssrc = rng.getrandbits(32)
        self.seq = rng.randrange(1 << 16)
        self.ts_base = rng.getrandbits(32)
        self.keyframe_wanted = True
        self.keyframe_requests = 0
        self.repeats = 0  # requests made while an earlier one was not met yet
        self.sent: list[RtpPacket] = []
        forwarder.keyframe_requester = self._request

    def _request(self) -> bool:
        self.keyframe_requests += 1
        self.repeats += self.keyframe_wanted
        self.keyframe_wanted = True
        return True

    def encode(self, frame: av.VideoFrame) -> list[RtpPacket]:
        width, height = self.size
        scaled = frame.reformat(width=width, height=height)
        scaled.pts, scaled.time_base = frame.pts, frame.time_base
        payloads, timestamp = self.encoder.encode(scaled, force_keyframe=self.keyframe_wanted)
        self.keyframe_wanted = False
        packets = []
        for index, payload in enumerate(payloads):
            packets.append(RtpPacket(payload_type=96, marker=int(index == len(payloads) - 1),
                                     sequence_number=self.seq, ssrc=self.ssrc,
                                     timestamp=(timestamp + self.ts_base) % (1 << 32),
                                     payload=payload))
            self.seq = (self.seq + 1) % (1 << 16)
        self.sent.extend(packets)
        del self.sent[:-100]
        return packets


class LoseLastBeforeSwitch:
    """Fault on the viewer's link: loses the last packet sent to it before each layer switch
    (held one packet back, so the switch can still decide its fate). Its NACK then reaches the
    forwarder after the switch."""

    def __init__(self, sendto: Callable[[bytes, Any], Any]) -> None:
        self._sendto = sendto
        self._held: tuple[bytes, Any] | None = None
        self.armed = False
        self.lost: list[int] = []

    def __call__(self, data: bytes, addr: Any) -> None:
        held, self._held = self._held, (data, addr)
        if held is None:
            return
        if self.armed:
            self.armed = False
            self.lost.append(seq_of(held[0]))
        else:
            self._sendto(*held)


class SwitchingViewer:
    """A real aiortc viewer fed by one ForwardSink over loopback SRTP; records the RTP header
    of every datagram on its wire (before SRTP's replay check) and each decoded frame's size."""

    def __init__(self) -> None:
        self.out_pc = new_peer_connection()
        self.in_pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.wire: list[bytes] = []  # RTP headers, in arrival order
        self.sizes: list[tuple[int, int]] = []
        self.forwarder: TrackForwarder | None = None
        self.sink: ForwardSink | None = None
        self.keyframe_requests = 0  # PLI/FIR from the viewer
        self.nacks: list[int] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def connect(self) -> None:
        transceiver = self.out_pc.addTransceiver(SilentTrack("video"), direction="sendonly")
        transceiver.setCodecPreferences([RTCRtpCodecCapability(mimeType="video/VP8",
                                                               clockRate=90000)])

        def on_nack(seqs: list[int]) -> None:
            self.nacks.extend(seqs)
            if self.forwarder is not None and self.sink is not None:
                self.forwarder.retransmit(self.sink, seqs)

        def on_keyframe_request() -> None:
            self.keyframe_requests += 1
            if self.forwarder is not None:
                self.forwarder.request_keyframe()

        hook_sender(transceiver.sender, OUTPUT_SSRC,
                    SenderFeedback(on_nack, on_keyframe_request, lambda: None))
        self.in_pc.addTransceiver("video", direction="recvonly")

        @self.in_pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._tasks.append(asyncio.ensure_future(self._frames(track)))

        await self.in_pc.setLocalDescription(await self.in_pc.createOffer())
        await self.out_pc.setRemoteDescription(self.in_pc.localDescription)
        await self.out_pc.setLocalDescription(await self.out_pc.createAnswer())
        await self.in_pc.setRemoteDescription(self.out_pc.localDescription)
        dtls = self.in_pc.getTransceivers()[0].receiver.transport

        def record(data: bytes) -> bool:
            self.wire.append(data[:12])
            return False

        drop_incoming_rtp(dtls, record)
        self.packet_sender = PacketSender(transceiver.sender.transport)
        for _ in range(200):
            if self.packet_sender.resolve():
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"viewer not connected: {self.out_pc.connectionState}")
        self.payload_type = negotiated_codecs(transceiver)[0].payloadType
        assert self.payload_type is not None
        assert self.packet_sender.sendto is not None
        self.link = LoseLastBeforeSwitch(self.packet_sender.sendto)
        self.packet_sender.sendto = self.link

    async def _frames(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                self.sizes.append((frame.width, frame.height))  # type: ignore[attr-defined]
        except (MediaStreamError, asyncio.CancelledError):
            pass

    def join(self, forwarder: TrackForwarder) -> None:
        assert self.payload_type is not None
        sink = ForwardSink(self.packet_sender, self.out_pc.getTransceivers()[0].sender,
                           self.payload_type)
        sink.on_switched = self._switched
        self.sink, self.forwarder = sink, forwarder
        forwarder.add_sink(sink)

    def _switched(self, forwarder: TrackForwarder) -> None:
        self.forwarder = forwarder
        self.link.armed = True

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.in_pc.close()
        await self.out_pc.close()


class SimulcastSource:
    """Feeds the layers' packets to their forwarders one packet per event-loop turn (as the
    receive path does), the viewer's current layer first in each round, so a new layer's key
    frame arrives in the middle of the old layer's frame."""

    def __init__(self, layers: dict[str, Layer], viewer: SwitchingViewer) -> None:
        self.layers = layers
        self.viewer = viewer
        self.video = CounterVideoTrack(30, width=SIZES["h"][0], height=SIZES["h"][1], noisy=True)
        self.duplicates = 0
        self._leaving: Layer | None = None

    def leaving(self, layer: Layer) -> None:
        """Inject an old packet of ``layer`` just before the next key frame of another layer."""
        self._leaving = layer

    async def frame(self) -> None:
        frame = await self.video.recv()
        frame.time_base = fractions.Fraction(1, 90000)
        current = self.viewer.forwarder
        order = sorted(self.layers.values(), key=lambda layer: layer.forwarder is not current)
        keyframe_due = {layer.rid: layer.keyframe_wanted for layer in order}
        queues = [(layer, layer.encode(frame)) for layer in order]
        turn = 0
        while any(packets for _, packets in queues):
            for layer, packets in queues:
                if not packets:
                    continue
                leaving = self._leaving
                if (turn == 0 and leaving is not None and leaving is not layer
                        and keyframe_due[layer.rid]):
                    # the retransmission of an older packet, received again
                    leaving.forwarder.on_source_packet(leaving.sent[-20])
                    self.duplicates += 1
                    self._leaving = None
                    await asyncio.sleep(0)
                layer.forwarder.on_source_packet(packets.pop(0))
                await asyncio.sleep(0)
            turn += 1


def check_wire(wire: list[bytes], lost: list[int]) -> tuple[list[int], list[int]]:
    """Sequence numbers and timestamps of the packets on the viewer's wire in order, first
    copies only (retransmissions of the lost ones excepted); asserts they are continuous and
    monotonic and returns them."""
    seqs: list[int] = []
    stamps: list[int] = []
    seen: set[int] = set()
    for header in wire:
        seq, ts = seq_of(header), ts_of(header)
        if seq in seen:
            raise AssertionError(f"seq {seq} sent twice (after {seqs[-5:]})")
        seen.add(seq)
        if seq in lost:
            continue  # its retransmission, late by design
        seqs.append(seq)
        stamps.append(ts)
    for index in range(1, len(seqs)):
        prev, seq = seqs[index - 1], seqs[index]
        want = (prev + 1) % (1 << 16)
        if seq != want and not (want in lost and seq == (want + 1) % (1 << 16)):
            raise AssertionError(f"seq {seq} after {prev} at packet {index}: {seqs[index - 5:]}")
        if (stamps[index] - stamps[index - 1]) % (1 << 32) >= 1 << 31:
            raise AssertionError(f"timestamp {stamps[index]} after {stamps[index - 1]} at seq "
                                 f"{seq}")
    return seqs, stamps


@pytest.mark.timeout(180)
async def test_one_aiortc_viewer_switched_h_l_m_h_decodes_each_layer_with_continuous_rtp(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # the Python send path, so the viewer's link can lose a packet (the native one sends the
    # same bytes: tests/test_native_fanout.py)
    monkeypatch.setenv("LOTCAST_NATIVE_FANOUT", "0")
    caplog.set_level(logging.WARNING, logger="aiortc.rtcrtpreceiver")
    rng = random.Random(11)
    forwarders = {rid: TrackForwarder("video", VP8, OUTPUT_SSRC) for rid in SIZES}
    layers = {rid: Layer(rid, forwarder, rng) for rid, forwarder in forwarders.items()}
    viewer = SwitchingViewer()
    try:
        await viewer.connect()
        source = SimulcastSource(layers, viewer)
        viewer.join(forwarders["h"])

        async def decodes(size: tuple[int, int], since: int) -> bool:
            for _ in range(FRAMES_PER_STEP):
                await source.frame()
                recent = viewer.sizes[since:][-DECODED_AFTER_SWITCH:]
                if len(recent) == DECODED_AFTER_SWITCH and set(recent) == {size}:
                    return True
            return False

        assert await decodes(SIZES["h"], 0), viewer.sizes[-5:]
        requests_before = {rid: layer.keyframe_requests - layer.repeats
                           for rid, layer in layers.items()}
        for rid in SWITCHES:
            old = viewer.forwarder
            assert old is not None and viewer.sink is not None
            since = len(viewer.sizes)
            source.leaving(next(layer for layer in layers.values() if layer.forwarder is old))
            forwarders[rid].switch_in(viewer.sink, old)
            ok = await decodes(SIZES[rid], since)
            assert ok, (f"after the switch to {rid}: decoded {viewer.sizes[since:][-5:]} "
                        f"({len(viewer.sizes) - since} frames), lost {viewer.link.lost}, "
                        f"NACKed {viewer.nacks[-5:]}")
            assert viewer.forwarder is forwarders[rid]
            # the sizes decoded since the switch: the old layer's, then only the new one's
            after = viewer.sizes[since:]
            first_new = after.index(SIZES[rid])
            assert set(after[first_new:]) == {SIZES[rid]}, after
            assert set(after[:first_new]) <= {SIZES[r] for r in SIZES if r != rid}, after
        assert source.duplicates == len(SWITCHES)
        assert len(viewer.link.lost) == len(SWITCHES), viewer.link.lost
        # every packet lost before a switch was NACKed and came back from its own layer
        assert set(viewer.link.lost) <= set(viewer.nacks), (viewer.link.lost, viewer.nacks)
        on_wire = {seq_of(header) for header in viewer.wire}
        assert set(viewer.link.lost) <= on_wire, "a packet lost before a switch was not resent"
        check_wire(viewer.wire, viewer.link.lost)
        decode_errors = [r.getMessage() for r in caplog.records if "decode" in r.getMessage()]
        assert decode_errors == []
        assert viewer.keyframe_requests == 0  # the viewer never had to ask for one
        # one key-frame request per switch, to the layer switched to (besides repeats of a
        # request its key frame had not met within the forwarder's interval)
        asked = {rid: layer.keyframe_requests - layer.repeats - requests_before[rid]
                 for rid, layer in layers.items()}
        assert asked == {"h": 1, "m": 1, "l": 1}, asked
        assert [forwarders[rid].layer_switches for rid in SIZES] == [1, 1, 1]
    finally:
        for forwarder in forwarders.values():
            forwarder.close()
        await viewer.close()
