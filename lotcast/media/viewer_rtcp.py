"""A viewer's RTCP on the lean path: Sender Reports from one clock per process, feedback read by
our own parser.

aiortc runs one RTCP task per RTCRtpSender (two per viewer) that wakes every 0.5-1.5 s to build
and send a Sender Report, and parses every RTCP packet a viewer sends into dataclasses and stats
objects. For a relay with hundreds of idle viewers that is most of its CPU. Here instead:

- `ReportClock` (one per event loop) is a timing wheel of 100 ms slots: each tick sends the
  reports of the viewers due in that slot, then reschedules each 0.5-1.5 s ahead (RFC 3550's
  randomised interval, as aiortc). No task and no timer per viewer.
- `ViewerRtcp` (one per egress session) builds one compound packet for all of its viewer's
  tracks (SR per track, one SDES), protected and sent once; and reads the viewer's RTCP with
  `lotcast.media.rtcp.parse_feedback`: NACKs answered from the forwarder's history, PLI/FIR
  collapsed into the forwarder's throttled upstream request, receiver reports kept as loss,
  jitter and RTT per track, the packets resent on its NACKs counted, REMB as the viewer's
  bandwidth estimate; `on_feedback` (the automatic layer choice, auto_layer.py) hears of each
  report, NACK or REMB.

LOTCAST_LEAN_RTCP=0 keeps aiortc's own RTCP (the old path; benchmarks compare the two).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable

from lotcast.media.forwarder import ForwardSink, TrackForwarder
from lotcast.media.rtcp import RtcpError, SenderInfo, ntp_middle, parse_feedback, sender_reports

logger = logging.getLogger(__name__)

ENV = "LOTCAST_LEAN_RTCP"
ESTIMATE_ENV = "LOTCAST_VIEWER_ESTIMATE"
_OFF = {"0", "false", "no", "off"}

TICK = 0.1  # seconds per wheel slot
SLOTS = 16  # > the longest interval in ticks
MIN_TICKS, MAX_TICKS = 5, 15  # a report every 0.5-1.5 s
SR_KEPT = 4  # our last Sender Reports a receiver report may answer (RTT)
# A packet is resent to a viewer at most once per RESEND_RTTS of its RTT (at least
# RESEND_MIN_S): a receiver that retries NACKs faster than its path's queue delivers would
# otherwise fill that queue with copies of the same packets, and it never drains.
RESEND_RTTS = 1.5
RESEND_MIN_S = 0.03
ESTIMATE_SAMPLE_S = 0.5  # a viewer's REMBs counted in the metric at most this often
RESENT_KEPT = 512  # remembered resends per track before the old ones are dropped


def viewer_estimate_enabled() -> bool:
    """Viewers' REMB estimates steer their automatic layer, with abs-send-time stamped on
    their video (unless LOTCAST_VIEWER_ESTIMATE=0)."""
    return os.environ.get(ESTIMATE_ENV, "1").strip().lower() not in _OFF


def lean_rtcp_enabled() -> bool:
    """The lean path serves new egress sessions (unless LOTCAST_LEAN_RTCP=0)."""
    return os.environ.get(ENV, "1").strip().lower() not in _OFF


class TrackFeedback:
    """What one viewer reported about one of our tracks."""

    __slots__ = ("clock_rate", "forwarder", "fraction_lost", "jitter", "last_rtt",
                 "last_rtt_sent", "last_sr_at", "last_sr_lsr", "nacks_served", "packets_lost",
                 "receiver_reports", "remb_bps", "report_base", "resent_at", "rtt",
                 "rtt_samples", "sink", "sr_sent")

    def __init__(self, forwarder: TrackForwarder, sink: ForwardSink) -> None:
        self.forwarder = forwarder
        self.sink = sink
        codec = getattr(forwarder, "codec", None)  # (stand-ins in tests have none)
        self.clock_rate: int = codec.clockRate if codec is not None else 90000
        # the sink's report as first sent, and when: later reports move both of its clocks on
        self.report_base: tuple[tuple[int, int, int, int], float] | None = None
        self.last_sr_lsr = -1
        self.last_sr_at = 0.0
        # (lsr, monotonic time sent) of our last SR_KEPT Sender Reports: a report may answer
        # one before the newest (reports cross on the wire), which still gives an RTT
        self.sr_sent: deque[tuple[int, float]] = deque(maxlen=SR_KEPT)
        self.rtt: float | None = None  # smoothed
        self.last_rtt: float | None = None  # the newest sample
        self.last_rtt_sent = 0.0  # when the Sender Report it answered was sent (monotonic)
        self.rtt_samples = 0
        # packets resent on its NACKs: lost on its path (a gap we never had is not resent)
        self.nacks_served = 0
        self.resent_at: dict[int, float] = {}  # seq -> when it was last resent (monotonic)
        self.fraction_lost = 0
        self.packets_lost = 0
        self.jitter = 0
        self.receiver_reports = 0
        self.remb_bps: int | None = None


    def due_for_resend(self, sequence_numbers: list[int]) -> list[int]:
        """The NACKed ``sequence_numbers`` not resent within the last RESEND_RTTS RTTs."""
        now = time.monotonic()
        rtt = max(self.rtt or 0.0, self.last_rtt or 0.0)
        recent = now - max(RESEND_MIN_S, RESEND_RTTS * rtt)
        resent = self.resent_at
        if len(resent) > RESENT_KEPT:
            for seq in [s for s, at in resent.items() if at < recent]:
                del resent[seq]
        due = [seq for seq in sequence_numbers if resent.get(seq, -1.0) < recent]
        for seq in due:
            resent[seq] = now
        return due


class ViewerRtcp:
    """RTCP of one egress session: its reports out, its feedback in."""

    def __init__(self, on_alive: Callable[[], None]) -> None:
        self._on_alive = on_alive
        # called after a packet with reports, NACKs or REMB (the automatic layer choice)
        self.on_feedback: Callable[[], None] | None = None
        self.on_estimate: Callable[[int], None] | None = None  # REMBs about our tracks
        self._estimate_sampled = -1e9
        self.tracks: dict[int, TrackFeedback] = {}  # by our output SSRC
        self._send: Callable[[bytes], None] | None = None
        self._cname: bytes | None = None
        self.reports_sent = 0
        self.malformed = 0
        self.slot = -1  # ReportClock bookkeeping

    def add_track(self, forwarder: TrackForwarder, sink: ForwardSink) -> None:
        self.tracks[forwarder.output_ssrc] = TrackFeedback(forwarder, sink)

    def start(self, send: Callable[[bytes], None], cname: str | None) -> None:
        """Begin sending reports through ``send`` (protect + sendto of one RTCP packet)."""
        self._send = send
        self._cname = cname.encode() if cname else None
        report_clock().add(self)

    def stop(self) -> None:
        report_clock().remove(self)
        self._send = None
        self.tracks.clear()

    # --- out ----------------------------------------------------------------------------

    def send_report(self) -> None:
        send = self._send
        if send is None:
            return
        infos: list[SenderInfo] = []
        now = time.time()
        for ssrc, track in self.tracks.items():
            report = track.sink.report
            if report is None or track.sink.closed:
                continue
            ntp, rtp_ts, packets, octets = report
            # The forwarder sets a report per source SR (seconds apart). Each one we send
            # moves its NTP and RTP clocks on together by the time since it was first sent,
            # as a sender's own reports do: so no two carry the same LSR (a receiver report
            # then names the one it answers: the RTT) and lip-sync stays on the same line.
            base = track.report_base
            if base is None or base[0] is not report:
                track.report_base = (report, now)
            else:
                elapsed = now - base[1]
                ntp = (ntp + int(elapsed * (1 << 32))) & 0xFFFFFFFFFFFFFFFF
                rtp_ts = (rtp_ts + int(elapsed * track.clock_rate)) & 0xFFFFFFFF
            infos.append(SenderInfo(ssrc, ntp, rtp_ts, packets, octets))
        if not infos:
            return
        sent = time.monotonic()
        for info in infos:
            track = self.tracks[info.ssrc]
            track.last_sr_lsr = ntp_middle(info.ntp_timestamp)
            track.last_sr_at = now
            track.sr_sent.append((track.last_sr_lsr, sent))
        send(sender_reports(infos, self._cname))
        self.reports_sent += 1

    # --- in -----------------------------------------------------------------------------

    def on_rtcp(self, data: bytes) -> None:
        """One decrypted RTCP compound packet from the viewer."""
        self._on_alive()
        try:
            feedback = parse_feedback(data)
        except RtcpError:
            self.malformed += 1
            return
        tracks = self.tracks
        if feedback.reports:
            now = time.monotonic()
            for block in feedback.reports:
                track = tracks.get(block.ssrc)
                if track is None:
                    continue
                track.receiver_reports += 1
                track.fraction_lost = block.fraction_lost
                track.packets_lost = block.packets_lost
                track.jitter = block.jitter
                if block.lsr:
                    sent_at = next((at for lsr, at in reversed(track.sr_sent)
                                    if lsr == block.lsr), None)
                    rtt = -1.0 if sent_at is None else now - sent_at - block.dlsr / 65536
                    if rtt >= 0 and sent_at is not None:
                        track.rtt = rtt if track.rtt is None else 0.85 * track.rtt + 0.15 * rtt
                        track.last_rtt = rtt
                        track.last_rtt_sent = sent_at
                        track.rtt_samples += 1
        for media_ssrc, sequence_numbers in feedback.nacks:
            track = tracks.get(media_ssrc)
            if track is not None:
                due = track.due_for_resend(sequence_numbers)
                if not due:
                    continue
                forwarder = track.forwarder
                served = getattr(forwarder, "nack_packets_served", 0)
                forwarder.retransmit(track.sink, due)
                track.nacks_served += getattr(forwarder, "nack_packets_served", 0) - served
        for media_ssrc in feedback.keyframe_requests:
            track = tracks.get(media_ssrc)
            if track is not None:
                track.forwarder.request_keyframe_for(track.sink)
        if feedback.remb is not None:
            bitrate, ssrcs = feedback.remb
            ours = False
            for ssrc in ssrcs:
                track = tracks.get(ssrc)
                if track is not None:
                    track.remb_bps = bitrate
                    ours = True
            if ours and self.on_estimate is not None:
                now = time.monotonic()
                # a client may send REMB with every packet (aiortc's, once behind): the metric
                # takes at most one per ESTIMATE_SAMPLE_S from each viewer
                if now - self._estimate_sampled >= ESTIMATE_SAMPLE_S:
                    self._estimate_sampled = now
                    self.on_estimate(bitrate)
        if self.on_feedback is not None and (feedback.reports or feedback.nacks
                                             or feedback.remb is not None):
            self.on_feedback()


class ReportClock:
    """Sends every registered viewer's Sender Reports from one timer (a wheel of TICK slots)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._wheel: list[set[ViewerRtcp]] = [set() for _ in range(SLOTS)]
        self._at = 0
        self._count = 0
        self._handle: asyncio.TimerHandle | None = None
        self.ticks = 0
        self.errors = 0

    @property
    def viewers(self) -> int:
        return self._count

    def add(self, viewer: ViewerRtcp) -> None:
        if viewer.slot >= 0:
            return
        self._place(viewer, random.randint(MIN_TICKS, MAX_TICKS))
        self._count += 1
        if self._handle is None:
            self._handle = self.loop.call_later(TICK, self._tick)

    def remove(self, viewer: ViewerRtcp) -> None:
        if viewer.slot < 0:
            return
        self._wheel[viewer.slot].discard(viewer)
        viewer.slot = -1
        self._count -= 1
        if self._count == 0 and self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _place(self, viewer: ViewerRtcp, ticks: int) -> None:
        slot = (self._at + ticks) % SLOTS
        viewer.slot = slot
        self._wheel[slot].add(viewer)

    def _tick(self) -> None:
        self.ticks += 1
        self._at = (self._at + 1) % SLOTS
        due = self._wheel[self._at]
        self._wheel[self._at] = set()
        for viewer in due:
            viewer.slot = -1
            try:
                viewer.send_report()
            except Exception as exc:  # one viewer's failed send must not stop the others'
                self.errors += 1
                if self.errors <= 3 or self.errors % 1000 == 0:
                    logger.warning("sender report failed (%d so far): %r", self.errors, exc)
            self._place(viewer, random.randint(MIN_TICKS, MAX_TICKS))
        self._handle = self.loop.call_later(TICK, self._tick) if self._count else None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        for slot in self._wheel:
            for viewer in slot:
                viewer.slot = -1
            slot.clear()
        self._count = 0


_clock: ReportClock | None = None


def report_clock() -> ReportClock:
    """This event loop's clock (a new loop, as in tests, gets a new one)."""
    global _clock
    loop = asyncio.get_running_loop()
    if _clock is None or _clock.loop is not loop:
        _clock = ReportClock(loop)
    return _clock
