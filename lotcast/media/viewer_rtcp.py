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
  jitter and RTT per track, REMB as the viewer's bandwidth estimate.

LOTCAST_LEAN_RTCP=0 keeps aiortc's own RTCP (the old path; benchmarks compare the two).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable

from lotcast.media.forwarder import ForwardSink, TrackForwarder
from lotcast.media.rtcp import RtcpError, SenderInfo, ntp_middle, parse_feedback, sender_reports

logger = logging.getLogger(__name__)

ENV = "LOTCAST_LEAN_RTCP"
_OFF = {"0", "false", "no", "off"}

TICK = 0.1  # seconds per wheel slot
SLOTS = 16  # > the longest interval in ticks
MIN_TICKS, MAX_TICKS = 5, 15  # a report every 0.5-1.5 s


def lean_rtcp_enabled() -> bool:
    """The lean path serves new egress sessions (unless LOTCAST_LEAN_RTCP=0)."""
    return os.environ.get(ENV, "1").strip().lower() not in _OFF


class TrackFeedback:
    """What one viewer reported about one of our tracks."""

    __slots__ = ("forwarder", "fraction_lost", "jitter", "last_sr_at", "last_sr_lsr",
                 "packets_lost", "receiver_reports", "remb_bps", "rtt", "sink")

    def __init__(self, forwarder: TrackForwarder, sink: ForwardSink) -> None:
        self.forwarder = forwarder
        self.sink = sink
        self.last_sr_lsr = -1
        self.last_sr_at = 0.0
        self.rtt: float | None = None
        self.fraction_lost = 0
        self.packets_lost = 0
        self.jitter = 0
        self.receiver_reports = 0
        self.remb_bps: int | None = None


class ViewerRtcp:
    """RTCP of one egress session: its reports out, its feedback in."""

    def __init__(self, on_alive: Callable[[], None]) -> None:
        self._on_alive = on_alive
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
        for ssrc, track in self.tracks.items():
            report = track.sink.report
            if report is None or track.sink.closed:
                continue
            ntp, rtp_ts, packets, octets = report
            infos.append(SenderInfo(ssrc, ntp, rtp_ts, packets, octets))
        if not infos:
            return
        now = time.time()
        for info in infos:
            track = self.tracks[info.ssrc]
            track.last_sr_lsr = ntp_middle(info.ntp_timestamp)
            track.last_sr_at = now
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
            now = time.time()
            for block in feedback.reports:
                track = tracks.get(block.ssrc)
                if track is None:
                    continue
                track.receiver_reports += 1
                track.fraction_lost = block.fraction_lost
                track.packets_lost = block.packets_lost
                track.jitter = block.jitter
                if block.lsr and block.lsr == track.last_sr_lsr:
                    rtt = now - track.last_sr_at - block.dlsr / 65536
                    if rtt >= 0:
                        track.rtt = rtt if track.rtt is None else 0.85 * track.rtt + 0.15 * rtt
        for media_ssrc, sequence_numbers in feedback.nacks:
            track = tracks.get(media_ssrc)
            if track is not None:
                track.forwarder.retransmit(track.sink, sequence_numbers)
        for media_ssrc in feedback.keyframe_requests:
            track = tracks.get(media_ssrc)
            if track is not None:
                track.forwarder.request_keyframe()
        if feedback.remb is not None:
            bitrate, ssrcs = feedback.remb
            for ssrc in ssrcs:
                track = tracks.get(ssrc)
                if track is not None:
                    track.remb_bps = bitrate


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
