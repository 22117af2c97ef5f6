"""The automatic simulcast layer without sockets (issue 11, item 3): the rule
(lotcast/media/layer_rule.py) fed observations, the forwarder pausing and resuming one viewer's
video with continuous sequence numbers, the viewer's RTCP (resends bounded by its RTT, Sender
Reports whose clocks move on) and AutoLayer turning a viewer's receiver reports into switches
and pauses on real forwarders. The end-to-end test with Chromium and tc is
tests/test_browser_layer_auto.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

from aiortc import RTCRtpCodecParameters
from aiortc.rtp import (
    RTCP_RTPFB_NACK,
    RtcpPacket,
    RtcpReceiverInfo,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSrPacket,
    RtpPacket,
)

from lotcast.media.auto_layer import AutoLayer
from lotcast.media.forwarder import ForwardSink, TrackForwarder
from lotcast.media.layer_rule import (
    HOLD_MAX_S,
    HOLD_S,
    REMB_LOW_SPAN_S,
    RTT_HIGH_SPAN_S,
    SETTLE_MAX_S,
    UP_STABLE_S,
    LayerRule,
    Mode,
    Move,
    Observation,
)
from lotcast.media.rtcp import ntp_middle
from lotcast.media.viewer_rtcp import ViewerRtcp

RATES = (1_200_000, 400_000, 120_000)


def obs(now: float, index: int, loss: float | None = None,
        rtts: tuple[tuple[float, float], ...] = (), remb: int | None = None) -> Observation:
    return Observation(now=now, index=index, count=3, loss=loss, rtts=rtts, remb_bps=remb,
                       bitrates=RATES)


def clean_until(rule: LayerRule, start: float, end: float, index: int, step: float = 0.5
                ) -> tuple[float, Move]:
    """Clean observations every ``step`` from ``start``: the time and move of the first that
    moves (or STAY at ``end``)."""
    t = start
    while t <= end:
        move = rule.observe(obs(t, index, loss=0.0, rtts=((t - 0.01, 0.002),)))
        if move is not Move.STAY:
            return t, move
        t += step
    return t, Move.STAY


# --- the rule ---------------------------------------------------------------------------------

def test_down_at_once_on_loss_up_only_after_the_hold_down_and_clean_time() -> None:
    rule = LayerRule()
    assert rule.observe(obs(0.0, 0, loss=0.0, rtts=((0.0, 0.002),))) is Move.STAY
    assert rule.observe(obs(1.0, 0, loss=0.15)) is Move.DOWN  # one observation is enough
    rule.settle(1.2)  # the switch reached its key frame
    # no RTT sample of a report sent since then: still settling, congestion ignored
    assert rule.observe(obs(1.5, 1, loss=0.5, rtts=((1.0, 0.002),))) is Move.STAY
    # a report sent after the switch, answered near the base RTT: drained, judged again
    assert rule.observe(obs(1.8, 1, loss=0.0, rtts=((1.3, 0.002),))) is Move.STAY
    t, move = clean_until(rule, 2.0, 30.0, 1)
    assert move is Move.UP
    assert t >= max(1.0 + HOLD_S, 2.0 + UP_STABLE_S), t  # conservatively
    assert t <= 2.0 + UP_STABLE_S + 0.5, t


def test_a_queue_that_stays_moves_down_a_late_report_does_not() -> None:
    rule = LayerRule()
    for i in range(10):
        rule.observe(obs(i * 0.5, 0, rtts=((i * 0.5 - 0.1, 0.002),)))
    # one report 400 ms late (the process was off the CPU), then on time again: no move
    assert rule.observe(obs(5.0, 0, rtts=((4.6, 0.4),))) is Move.STAY
    assert rule.observe(obs(5.5, 0, rtts=((5.4, 0.003),))) is Move.STAY
    # a standing queue: every sample 350 ms for RTT_HIGH_SPAN_S
    t = 6.0
    moves = []
    while t <= 6.0 + RTT_HIGH_SPAN_S + 0.5:
        moves.append((t, rule.observe(obs(t, 0, rtts=((t - 0.4, 0.35),)))))
        t += 0.5
    downs = [at for at, move in moves if move is Move.DOWN]
    assert downs and downs[0] >= 6.0 + RTT_HIGH_SPAN_S, moves


def test_failed_tries_double_the_hold_down_to_its_cap() -> None:
    rule = LayerRule()
    assert rule.observe(obs(0.0, 0, loss=0.3)) is Move.DOWN
    assert rule.hold == HOLD_S
    t, index, holds = 0.0, 1, []
    for _ in range(6):
        rule.settle(t + 0.2)
        t, move = clean_until(rule, t + 0.5, t + 200, index)
        assert move is Move.UP, t
        # the layer above fails again at once: a relapse
        assert rule.observe(obs(t + 1.0, index - 1, loss=0.3)) is Move.DOWN
        t += 1.0
        holds.append(rule.hold)
    assert holds == [2 * HOLD_S, 4 * HOLD_S, 8 * HOLD_S, HOLD_MAX_S, HOLD_MAX_S, HOLD_MAX_S]
    # the next try waits out the whole hold-down
    rule.settle(t)
    up_at, move = clean_until(rule, t + 0.5, t + 200, index)
    assert move is Move.UP and up_at >= t + HOLD_MAX_S


def test_the_lowest_layer_congested_pauses_and_resumes_once_clean() -> None:
    rule = LayerRule()
    assert rule.observe(obs(0.0, 2, loss=0.4)) is Move.PAUSE
    assert rule.mode is Mode.PAUSED
    # still congested while paused (audio reports): stays paused
    assert rule.observe(obs(SETTLE_MAX_S + 1, 2, loss=0.3)) is Move.STAY
    t, move = clean_until(rule, SETTLE_MAX_S + 2, 100, 2)
    assert move is Move.RESUME and rule.mode is Mode.PLAYING
    assert t >= SETTLE_MAX_S + 2 + UP_STABLE_S
    # failing again at once: paused again, with a longer hold-down
    assert rule.observe(obs(t + 1, 2, loss=0.4)) is Move.PAUSE
    assert rule.hold == 2 * HOLD_S


def test_a_bandwidth_estimate_moves_down_and_gates_the_way_up() -> None:
    rule = LayerRule()
    # fell below 0.8x the top's 1.2 Mbit/s (a queue seen): down once it stays so for the span
    assert rule.observe(obs(0.0, 0, remb=1_800_000)) is Move.STAY
    assert rule.observe(obs(0.25, 0, remb=900_000)) is Move.STAY
    assert rule.observe(obs(0.25 + REMB_LOW_SPAN_S, 0, remb=900_000)) is Move.DOWN
    rule.settle(REMB_LOW_SPAN_S + 0.5)
    # clean, but an estimate still below the middle layer's 400 kbit/s (not low enough to move
    # down again, no headroom for the top): stays
    t = 1.0
    while t < 60:
        move = rule.observe(obs(t, 1, loss=0.0, rtts=((t - 0.01, 0.002),), remb=380_000))
        assert move is Move.STAY, t
        t += 0.5
    # the estimate above the middle layer (it cannot show room for the top): up
    move = rule.observe(obs(t, 1, loss=0.0, rtts=((t - 0.01, 0.002),), remb=420_000))
    assert move is Move.UP


def test_a_dip_in_the_estimate_on_a_path_that_carries_the_layer_moves_nothing() -> None:
    rule = LayerRule()
    # a moment of jitter: the estimator sets 0.85x the throughput, which is what we send
    for t in (0.0, 0.5, 1.0, 5.0):
        assert rule.observe(obs(t, 0, loss=0.0, remb=int(0.85 * RATES[0]))) is Move.STAY, t
    # one low estimate that recovers before the span: no move either
    assert rule.observe(obs(6.0, 0, loss=0.0, remb=500_000)) is Move.STAY
    assert rule.observe(obs(6.0 + REMB_LOW_SPAN_S / 2, 0, loss=0.0, remb=1_300_000)) is Move.STAY
    assert rule.observe(obs(6.0 + REMB_LOW_SPAN_S, 0, loss=0.0, remb=500_000)) is Move.STAY


def test_an_estimate_ramping_up_below_the_layer_moves_nothing() -> None:
    """After a start or a move up the estimate lags what we send while it ramps (~8 %/s)."""
    rule = LayerRule()
    remb, t = 300_000.0, 0.0
    while remb < RATES[0]:
        move = rule.observe(obs(t, 0, loss=0.0, rtts=((t - 0.01, 0.002),), remb=int(remb)))
        assert move is Move.STAY, (t, remb)
        t += 0.25
        if t % 1.0 == 0:  # a new estimate a second
            remb *= 1.08


def test_one_layer_never_moves() -> None:
    rule = LayerRule()
    assert rule.observe(Observation(now=0.0, index=0, count=1, loss=0.9)) is Move.STAY


# --- the forwarder: pause and resume one viewer's video ---------------------------------------

class CapturingSender:
    """Stands in for a peer's SRTP+socket pair: records what the forwarder would send."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.protect = lambda data: data
        self.sendto = lambda data, addr: self.sent.append(data)
        self.addr = ("127.0.0.1", 9)

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def alive(self) -> bool:
        return True


def vp8(seq: int, keyframe: bool, ssrc: int = 42) -> RtpPacket:
    packet = RtpPacket(payload_type=96, sequence_number=seq, timestamp=seq * 3000, ssrc=ssrc,
                       marker=1)  # each packet a whole frame
    packet.payload = bytes([0x10, 0x00 if keyframe else 0x01]) + b"x" * 100
    return packet


def video_forwarder(ssrc: int = 1234) -> tuple[TrackForwarder, list[int]]:
    codec = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
    forwarder = TrackForwarder("video", codec, output_ssrc=ssrc)
    requests: list[int] = []
    forwarder.keyframe_requester = lambda: requests.append(1) is None
    return forwarder, requests


def seqs(sender: CapturingSender) -> list[int]:
    return [int.from_bytes(p[2:4], "big") for p in sender.sent]


async def test_a_paused_viewer_gets_nothing_and_resumes_at_a_key_frame_numbered_on() -> None:
    forwarder, requests = video_forwarder()
    paused, other = CapturingSender(), CapturingSender()
    sink = ForwardSink(cast(Any, paused), cast(Any, SimpleNamespace()), 96)
    forwarder.add_sink(sink)
    forwarder.add_sink(ForwardSink(cast(Any, other), cast(Any, SimpleNamespace()), 96))
    for seq in range(1, 6):
        forwarder.on_source_packet(vp8(seq, seq == 1))
    await asyncio.sleep(0.02)
    assert seqs(paused) == [1, 2, 3, 4, 5]
    forwarder.pause(sink)
    for seq in range(6, 30):
        forwarder.on_source_packet(vp8(seq, seq == 10))
    await asyncio.sleep(0.02)
    assert seqs(paused) == [1, 2, 3, 4, 5]  # nothing while paused, key frames neither
    before = len(requests)
    forwarder.resume(sink)
    await asyncio.sleep(0.6)  # one request per 500 ms at most
    assert len(requests) == before + 1  # asked for a key frame
    for seq in range(30, 35):
        forwarder.on_source_packet(vp8(seq, seq == 32))
    await asyncio.sleep(0.02)
    # from the key frame on, numbered on from the last packet it got: no gap to NACK
    assert seqs(paused) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert paused.sent[5][12:14] == bytes([0x10, 0x00])  # the first one is the key frame
    assert seqs(other) == list(range(1, 35))  # the other viewer never noticed
    # NACKs: one for a packet from before the pause gets that packet (not the one now
    # numbered so), one after it the source's packet 33
    forwarder.retransmit(sink, [5, 7])
    assert seqs(paused)[-2:] == [5, 7]
    assert paused.sent[-2] == paused.sent[4] and paused.sent[-1][12:] == paused.sent[6][12:]
    forwarder.close()


# --- the viewer's RTCP ------------------------------------------------------------------------

def _rr(ssrc: int, fraction: int, lsr: int = 0, dlsr: int = 0) -> bytes:
    block = RtcpReceiverInfo(ssrc=ssrc, fraction_lost=fraction, packets_lost=0,
                             highest_sequence=1, jitter=0, lsr=lsr, dlsr=dlsr)
    return bytes(RtcpRrPacket(ssrc=99, reports=[block]))


def _nack(ssrc: int, lost: list[int]) -> bytes:
    nack = RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=99, media_ssrc=ssrc)
    nack.lost = lost
    return bytes(nack)


async def test_a_packet_is_resent_once_per_rtt_and_counted_as_loss() -> None:
    forwarder, _ = video_forwarder()
    sender = CapturingSender()
    sink = ForwardSink(cast(Any, sender), cast(Any, SimpleNamespace()), 96)
    forwarder.add_sink(sink)
    for seq in range(1, 11):
        forwarder.on_source_packet(vp8(seq, seq == 1))
    await asyncio.sleep(0.02)
    rtcp = ViewerRtcp(on_alive=lambda: None)
    rtcp.add_track(forwarder, sink)
    sent = len(sender.sent)
    rtcp.on_rtcp(_nack(1234, [4, 5]))
    rtcp.on_rtcp(_nack(1234, [4, 5, 6]))  # a retry at once: only 6 is new
    assert seqs(sender)[sent:] == [4, 5, 6]
    assert rtcp.tracks[1234].nacks_served == 3
    await asyncio.sleep(0.05)  # > RESEND_MIN_S, the RTT being unknown
    rtcp.on_rtcp(_nack(1234, [4]))
    assert seqs(sender)[sent:] == [4, 5, 6, 4]
    rtcp.on_rtcp(_nack(1234, [77]))  # never had it: nothing resent, no loss counted
    assert rtcp.tracks[1234].nacks_served == 4
    forwarder.close()


async def test_each_sender_report_moves_both_clocks_on() -> None:
    forwarder, _ = video_forwarder()
    sink = ForwardSink(cast(Any, CapturingSender()), cast(Any, SimpleNamespace()), 96)
    sink.report = (1 << 32, 90_000, 5, 500)
    out: list[bytes] = []
    rtcp = ViewerRtcp(on_alive=lambda: None)
    rtcp.add_track(forwarder, sink)
    rtcp.start(out.append, "cname")
    try:
        rtcp.send_report()
        await asyncio.sleep(0.2)
        rtcp.send_report()
    finally:
        rtcp.stop()
    (first,), (second,) = ([p for p in RtcpPacket.parse(d) if isinstance(p, RtcpSrPacket)]
                           for d in out)
    a, b = first.sender_info, second.sender_info
    assert (a.ntp_timestamp, a.rtp_timestamp) == (1 << 32, 90_000)
    ntp_s = (b.ntp_timestamp - a.ntp_timestamp) / (1 << 32)
    rtp_s = (b.rtp_timestamp - a.rtp_timestamp) / 90_000
    assert 0.15 < ntp_s < 2.0 and abs(ntp_s - rtp_s) < 0.001, (ntp_s, rtp_s)
    assert ntp_middle(a.ntp_timestamp) != ntp_middle(b.ntp_timestamp)  # an RR names which


# --- AutoLayer on real forwarders -------------------------------------------------------------

async def test_auto_layer_switches_down_on_reported_loss_and_pauses_at_the_bottom() -> None:
    layers = [video_forwarder(1234)[0] for _ in range(3)]  # one output SSRC, like simulcast
    sender = CapturingSender()
    sink = ForwardSink(cast(Any, sender), cast(Any, SimpleNamespace()), 96)
    layers[0].add_sink(sink)
    rtcp = ViewerRtcp(on_alive=lambda: None)
    rtcp.add_track(layers[0], sink)
    sink.on_switched = lambda forwarder: setattr(rtcp.tracks[1234], "forwarder", forwarder)
    clock = [100.0]
    auto = AutoLayer(lambda: layers, rtcp, "test/viewer", clock=lambda: clock[0])
    for index, forwarder in enumerate(layers):
        for seq in range(1, 4):
            forwarder.on_source_packet(vp8(seq + 10 * index, seq == 1, ssrc=50 + index))
    await asyncio.sleep(0.02)

    rtcp.on_rtcp(_rr(1234, fraction=0))
    assert not layers[1].switching(sink)
    clock[0] += 1
    rtcp.on_rtcp(_rr(1234, fraction=64))  # 25 % lost: down at once
    assert layers[1].switching(sink) and auto.moves == {Move.DOWN: 1}
    layers[1].on_source_packet(vp8(20, True, ssrc=51))  # its key frame: the switch completes
    await asyncio.sleep(0.02)
    assert rtcp.tracks[1234].forwarder is layers[1] and sink in layers[1].sinks()
    # pinned: its reports move nothing
    auto.pinned = True
    clock[0] += SETTLE_MAX_S + 1
    rtcp.on_rtcp(_rr(1234, fraction=128))
    assert not layers[2].switching(sink)
    auto.pinned = False
    clock[0] += 1
    rtcp.on_rtcp(_rr(1234, fraction=128))
    assert layers[2].switching(sink)
    layers[2].on_source_packet(vp8(30, True, ssrc=52))
    await asyncio.sleep(0.02)
    assert rtcp.tracks[1234].forwarder is layers[2]
    clock[0] += 1
    rtcp.on_rtcp(_rr(1234, fraction=0))  # the switch took effect: settling
    clock[0] += SETTLE_MAX_S + 0.5
    rtcp.on_rtcp(_rr(1234, fraction=100))  # the lowest layer does not fit: video paused
    assert sink.paused and auto.paused and auto.moves[Move.PAUSE] == 1
    sent = len(sender.sent)
    layers[2].on_source_packet(vp8(31, False, ssrc=52))
    await asyncio.sleep(0.02)
    assert len(sender.sent) == sent
    auto.pinned = True  # a pinned layer resumes the video
    assert not sink.paused
    auto.close()
    assert rtcp.on_feedback is None
    for forwarder in layers:
        forwarder.close()
