"""Packet-level fan-out of one track (audio or video) of one stream.

One source (a publisher's or an upstream's receiver) feeds a TrackForwarder; every viewer is a
ForwardSink on it. Each source packet is rewritten once (output SSRC, continuous seq/timestamp,
payload type, no header extensions) and then only SRTP-protected and sent per viewer: by the
native fan-out (lotcast/media/native.py: one C call per packet per payload type and
abs-send-time id, each copy's seq/timestamp shift added in C) for every sink whose sender has a
native target, else by the Python loop here (the fallback when the extension is missing or
LOTCAST_NATIVE_FANOUT=0, one rewrite per distinct shift; both produce the same SRTP bytes). Joining
video viewers wait for the next key frame; NACKs are answered from a shared history; PLI/FIR
from any number of viewers collapse into one throttled upstream request. A viewer moving to
another simulcast layer (another forwarder of the same stream) moves between two whole frames:
the new layer's key frame, after the old layer's last frame has ended, numbered on from the
newest packet it was sent (LayerSwitch); packets a source sends again are dropped, as they
would otherwise reach viewers twice and make a switch number on from an old packet.

Video to a viewer that negotiated abs-send-time (ForwardSink.abs_send_time_id) carries that
header extension, stamped when sent: once per source packet per send group (the id is part of
the group's key), and on every packet sent to one sink alone (key-frame replays, NACK answers);
the history and the key-frame cache keep the unstamped packets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from aiortc import RTCRtpCodecParameters, RTCRtpSender
from aiortc.clock import current_ntp_time
from aiortc.rtp import RtpPacket

from lotcast.media import native
from lotcast.media.aiortc_hooks import PacketSender, set_sender_report
from lotcast.media.rtp import (
    SEQ_MOD,
    TS_MOD,
    SequenceMapper,
    abs_send_time_now,
    build_packet,
    keyframe_detector,
    seq_newer,
    shifted,
    stamped,
    vp8_keyframe_size,
    with_payload_type,
)

logger = logging.getLogger(__name__)

HISTORY_SIZE = 1024  # packets kept for NACK answers: ~5 s of 1.5 Mbps video
KEYFRAME_REQUEST_INTERVAL = 0.5  # seconds between upstream PLIs
SEND_BUDGET = 2000  # packet-copies sent before yielding to the event loop
# A viewer joining this soon after a key frame gets it (and what followed) replayed at once
# instead of waiting for the next one; older than this, it waits for a fresh key frame.
KEYFRAME_REPLAY_WINDOW = 0.5
GOP_CACHE_PACKETS = 400
ERROR_LOG_INTERVAL = 5.0  # seconds between log lines about failed sends of one track
# A layer switch waits for the old layer to finish its frame for at most this many frames of
# the new layer after its key frame (a layer the publisher paused, or whose source is gone,
# finishes none). Counted in frames, not seconds: after a stall of this process both layers'
# packets come in one burst, and the old one's may be handled last.
SWITCH_WAIT_FRAMES = 5
# A viewer's PLI this soon after it started on a layer (joined, switched, resumed) is most likely
# about that first key frame, lost on its path (a switch down moves off a congested one): the
# cached key frame is sent to it again, under the numbers it was sent, at most KEYFRAME_RESENDS
# times RESEND_SPACING_S apart (PLIs in between are dropped), rather than asking the source for a
# key frame every viewer of the layer would get.
KEYFRAME_RESEND_WINDOW_S = 2.0
KEYFRAME_RESENDS = 2
RESEND_SPACING_S = 0.3

# A source packet numbered this far ahead of the newest one (more than a receiver's NACKs
# reach: aiortc tracks 128 missing packets) or behind what the history keeps starts a new
# numbering: the source restarted with the same SSRC (a new pull of the same upstream).
MAX_SEQ_JUMP = 128

SendEntry = tuple[Callable[[bytes], bytes], Callable[[bytes, Any], None], Any]


class SendGroup:
    """The sinks of one payload type and one abs-send-time extension id (0: none), prepared for
    the per-packet loop: a native SinkSet for those with a native target, each copy shifted in
    C by its sink's seq/timestamp shift (viewers that switched simulcast layers), and Python
    (protect, sendto, addr) entries for the rest, which share the group's one shift
    (``seq_delta``/``ts_delta``: Python sinks with another shift are a group of their own).
    A shifted or stamped group's packets are rewritten once in Python, then sent as they
    are (the native copies then only shifted)."""

    __slots__ = ("abs_send_time_id", "entries", "native", "native_sinks", "payload_type",
                 "seq_delta", "sinks", "ts_delta")

    def __init__(self, payload_type: int, rewrite: bool, sinks: list[ForwardSink],
                 use_native: bool, seq_delta: int = 0, ts_delta: int = 0,
                 abs_send_time_id: int = 0) -> None:
        self.payload_type = payload_type
        self.seq_delta = seq_delta
        self.ts_delta = ts_delta
        self.abs_send_time_id = abs_send_time_id
        if seq_delta or ts_delta or abs_send_time_id:
            rewrite = False
        on_native = [s for s in sinks if use_native and s.native_target() is not None]
        on_python = [s for s in sinks if not (use_native and s.native_target() is not None)]
        self.native: native.SinkSet | None = None
        if on_native:
            assert not (seq_delta or ts_delta)  # the native sets shift per copy
            targets = [t for t in (s.native_target() for s in on_native) if t is not None]
            shifts = [(s.seq_delta, s.ts_delta) for s in on_native]
            self.native = native.SinkSet(targets, payload_type if rewrite else None, shifts)
        self.native_sinks = tuple(on_native)
        self.entries = tuple(s.entry() for s in on_python)
        self.sinks = tuple(on_python)


class LayerSwitch:
    """A sink's pending move from ``source`` to ``target`` (simulcast layers of one stream).

    It completes at the first point where the viewer's decoder sees no break and waits for no
    frame: the target has a whole key frame (every packet of it) drained after the request
    (``keyframes_at_request``), and the source has just finished a frame (its newest packet
    carries the marker bit), or has finished none for SWITCH_WAIT_FRAMES of the target's. Until
    then the source keeps feeding the viewer (a big key frame takes a while to arrive: the
    viewer keeps getting frames meanwhile); then it gets the target's packets from that key
    frame on, replayed from the target's cache, numbered on from the source's newest. A key
    frame that never completes (a packet of it lost for good): the switch is made at the next
    key frame's start."""

    __slots__ = ("keyframes_at_request", "source", "target")

    def __init__(self, source: TrackForwarder, target: TrackForwarder) -> None:
        self.source = source
        self.target = target
        self.keyframes_at_request = target.keyframes_drained


class ForwardSink:
    """One viewer's copy of one track."""

    __slots__ = ("abs_send_time_id", "aiortc_reports", "base_octets", "base_packets",
                 "cancel_refresh", "closed", "first_seq", "fixed_layer", "keyframe_resends",
                 "last_resend", "on_first_packet", "on_switched", "packet_sender", "paused",
                 "paused_seq", "payload_type", "previous", "report", "rtp_sender", "seq_delta",
                 "start_keyframe", "switch", "ts_delta", "waiting_keyframe")

    def __init__(self, packet_sender: PacketSender, rtp_sender: RTCRtpSender, payload_type: int,
                 on_first_packet: Callable[[], None] | None = None,
                 aiortc_reports: bool = True, abs_send_time_id: int = 0) -> None:
        self.packet_sender = packet_sender
        # the abs-send-time extension id negotiated with this viewer (0: none): its video
        # packets carry their send time, for a receive-side bandwidth estimate (REMB)
        self.abs_send_time_id = abs_send_time_id
        self.rtp_sender = rtp_sender
        # this viewer's next Sender Report: (ntp, rtp timestamp, packets, octets), sent by the
        # lean path's clock (viewer_rtcp.py); with aiortc_reports also copied into the aiortc
        # sender, whose own RTCP task sends it (the old path)
        self.report: tuple[int, int, int, int] | None = None
        self.aiortc_reports = aiortc_reports
        self.payload_type = payload_type
        self.waiting_keyframe = False
        self.closed = False
        self.base_packets = 0
        self.base_octets = 0
        self.on_first_packet = on_first_packet
        self.cancel_refresh: Callable[[], None] | None = None
        # added to the forwarder's seq/timestamp for this viewer: nonzero once it switched
        # simulcast layers (each layer numbers its own packets)
        self.seq_delta = 0
        self.ts_delta = 0
        # the viewer's seq of the first packet from this forwarder after a layer switch: a NACK
        # for an older one asks for a packet of the layer it left (``previous``: that forwarder,
        # the sink's seq/timestamp shift there and the first seq it had there), answered from
        # that layer's history; older ones are not answered
        self.first_seq: int | None = None
        self.previous: tuple[TrackForwarder, int, int, int | None] | None = None
        self.switch: LayerSwitch | None = None  # a layer switch under way
        # called with the new forwarder when a layer switch completes
        self.on_switched: Callable[[TrackForwarder], None] | None = None
        # video paused (TrackForwarder.pause: its path carries not even the lowest layer);
        # paused_seq: the viewer's newest seq then, its resumed key frame follows on from it
        self.paused = False
        self.paused_seq: int | None = None
        # a relay's pull (or a viewer that turned the automatic choice off): it carries its
        # layer as the publisher sends it, never moved off a paused one (layer_fallback.py)
        self.fixed_layer = False
        # the key frame it started on here (joined, switched, resumed): this forwarder's seq of
        # its first packet and when; its resends of it on the viewer's PLIs (request_keyframe_for)
        self.start_keyframe: tuple[int, float] | None = None
        self.keyframe_resends = 0
        self.last_resend = 0.0

    def entry(self) -> SendEntry:
        ps = self.packet_sender
        assert ps.protect is not None and ps.sendto is not None
        return (ps.protect, ps.sendto, ps.addr)

    def native_target(self) -> native.NativeTarget | None:
        return getattr(self.packet_sender, "native", None)


class TrackForwarder:
    """Source packets in, per-viewer SRTP out, for one kind of one stream."""

    def __init__(self, kind: str, codec: RTCRtpCodecParameters, output_ssrc: int) -> None:
        self.kind = kind
        self.codec = codec
        self.output_ssrc = output_ssrc
        self.mapper = SequenceMapper(clock_rate=codec.clockRate)
        self._is_keyframe_start = keyframe_detector(codec.mimeType)
        assert codec.payloadType is not None
        self._base_pt: int = codec.payloadType
        self._base_mime = codec.mimeType.lower()
        self._sinks: list[ForwardSink] = []
        self._waiting: list[ForwardSink] = []
        self._resuming: list[ForwardSink] = []  # paused sinks back at the next key frame
        self._groups: tuple[SendGroup, ...] = ()
        self._history: list[bytes | None] = [None] * HISTORY_SIZE
        self._history_seq: list[int] = [-1] * HISTORY_SIZE
        self._pending: deque[tuple[bytes, bool]] = deque()
        # packets sent since the last key frame started (None: no usable key frame cached)
        self._gop: list[bytes] | None = None
        self._gop_started = 0.0
        self._drain_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # returns False when it could not ask (no source, or its SSRC is not known yet)
        self.keyframe_requester: Callable[[], bool] | None = None
        self._last_keyframe_request = 0.0
        self._keyframe_wanted = False
        self._deferred_request: asyncio.TimerHandle | None = None
        self._sender_report: tuple[int, int] | None = None
        # abs-send-time of a packet sent now (tests fix it to compare the two paths' bytes)
        self.send_clock: Callable[[], int] = abs_send_time_now
        # counters (read by metrics and benchmarks)
        self.packets_in = 0
        self.octets_in = 0
        self.packets_sent = 0
        self.native_packets_sent = 0  # of packets_sent, those sent by the native fan-out
        self.nack_packets_served = 0
        self.send_drops = 0
        self.send_errors = 0
        self.largest_packet = 0  # bytes of the largest (rewritten) RTP packet forwarded
        self._last_error_log = 0.0
        self._path_logged = False
        self.keyframe_requests_sent = 0
        self.keyframe_replays = 0
        self.keyframe_resends = 0  # viewers' PLIs answered with the key frame they started on
        self.keyframe_resent_packets = 0  # the packets of those answers
        self.last_packet_time = 0.0
        self.last_sender_report_time = 0.0
        # simulcast layer switches (LayerSwitch): the sinks switching into this forwarder, and
        # this forwarder's sinks switching out of it
        self._switching: dict[ForwardSink, LayerSwitch] = {}
        self._leaving: set[ForwardSink] = set()
        self.keyframes_drained = 0
        # the cached key frame: its first seq, timestamp, packets drained of it so far, last
        # seq (from its marker bit) and whether all of it is here; frames ended since it began
        self._gop_frames = 0
        self._kf_seq = 0
        self._kf_ts = 0
        self._kf_packets = 0
        self._kf_end: int | None = None
        self._kf_complete = False
        # the newest packet drained, by sequence number (a late retransmission drained after
        # it is older): a sink switching away continues its numbering from this one
        self._newest: bytes | None = None
        self.duplicates_dropped = 0  # source packets already forwarded (RTX payload padding)
        self.numbering_restarts = 0  # sources that numbered anew without a new SSRC
        self.frame_size: tuple[int, int] | None = None  # from the last VP8 key frame
        self.layer_switches = 0
        self._rate_sample = (time.monotonic(), 0)
        self.bitrate: int | None = None  # bits/s of payload, measured (`measure_bitrate`)

    # --- viewers ------------------------------------------------------------------------

    @property
    def sink_count(self) -> int:
        return len(self._sinks)

    def sinks(self) -> list[ForwardSink]:
        return list(self._sinks)

    def add_sink(self, sink: ForwardSink) -> None:
        sink.base_packets = self.packets_in
        sink.base_octets = self.octets_in
        self._sinks.append(sink)
        on_resolve = getattr(sink.packet_sender, "on_resolve", None)
        if on_resolve is not None:  # its socket or SRTP context may change: re-prepare the sets
            sink.cancel_refresh = on_resolve(self._rebuild)
        if self.kind == "video" and not self._replay_keyframe(sink):
            sink.waiting_keyframe = True
            self._waiting.append(sink)
            self.request_keyframe()
        else:
            self._rebuild()
        if self._sender_report is not None:
            self._apply_sender_report(sink)
        elif self.packets_in:
            self._apply_local_sender_report(sink)

    def _replay_keyframe(self, sink: ForwardSink) -> bool:
        """Start ``sink`` from the cached recent key frame; False if there is none."""
        gop = self._gop
        if gop is None or time.monotonic() - self._gop_started > KEYFRAME_REPLAY_WINDOW:
            return False
        self._send_alone(sink, gop)
        self.keyframe_replays += 1
        self._started_at_keyframe(sink)
        if sink.on_first_packet is not None:
            sink.on_first_packet()
            sink.on_first_packet = None
        return True

    def _send_alone(self, sink: ForwardSink, packets: list[bytes]) -> None:
        """Send cached ``packets`` to ``sink`` alone, at its current shift."""
        for data in packets:
            try:
                sink.packet_sender.send(self._for_sink(sink, data, sink.seq_delta, sink.ts_delta))
            except Exception as exc:
                self._send_failed(sink, exc)
        self.packets_sent += len(packets)

    def _for_sink(self, sink: ForwardSink, data: bytes, seq_delta: int, ts_delta: int) -> bytes:
        """``data`` (as cached: this forwarder's numbering, base payload type, unstamped) as
        ``sink`` gets it sent now, on its own (replays, NACK answers): its payload type, the
        given shift, and its abs-send-time if negotiated (video)."""
        extension_id = sink.abs_send_time_id if self.kind == "video" else 0
        if extension_id:
            return stamped(data, sink.payload_type, extension_id, self.send_clock(), seq_delta,
                           ts_delta)
        if seq_delta or ts_delta:
            return shifted(data, sink.payload_type, seq_delta, ts_delta)
        if sink.payload_type != self._base_pt:
            return with_payload_type(data, sink.payload_type)
        return data

    def remove_sink(self, sink: ForwardSink) -> None:
        sink.closed = True
        if sink.cancel_refresh is not None:
            sink.cancel_refresh()
            sink.cancel_refresh = None
        if sink in self._sinks:
            self._sinks.remove(sink)
        if sink in self._waiting:
            self._waiting.remove(sink)
        self._cancel_switch(sink)
        self._rebuild()

    def _rebuild(self) -> None:
        by_pt: dict[tuple[int, int, int, int], list[ForwardSink]] = {}
        video = self.kind == "video"  # audio is never stamped (receive-side BWE is video's)
        use_native = native.enabled()
        for sink in self._sinks:
            if not sink.waiting_keyframe and not sink.closed and not sink.paused:
                extension_id = sink.abs_send_time_id if video else 0
                if use_native and sink.native_target() is not None:  # shifted in C, per copy
                    key = (sink.payload_type, extension_id, 0, 0)
                else:
                    key = (sink.payload_type, extension_id, sink.seq_delta, sink.ts_delta)
                by_pt.setdefault(key, []).append(sink)
        self._groups = tuple(SendGroup(pt, pt != self._base_pt, sinks, use_native, dseq, dts, ext)
                             for (pt, ext, dseq, dts), sinks in by_pt.items())
        if not self._path_logged and self._groups:
            self._path_logged = True
            on_native = sum(len(g.native_sinks) for g in self._groups)
            on_python = sum(len(g.sinks) for g in self._groups)
            reason = "" if use_native else f" (native off: {native.disabled_reason()})"
            logger.info("%s fan-out: %d sinks on the native path, %d on the Python path%s",
                        self.kind, on_native, on_python, reason)

    def _admit_waiting(self) -> None:
        if self._resuming and self._gop:
            self._resume_at(self._gop[0])
        for sink in self._waiting:
            sink.waiting_keyframe = False
            self._started_at_keyframe(sink)
            if sink.on_first_packet is not None:
                sink.on_first_packet()
                sink.on_first_packet = None
        self._waiting.clear()
        self._rebuild()

    def resync_all(self) -> None:
        """Make every video viewer wait for a key frame again (the source changed)."""
        if self.kind != "video":
            return
        self._gop = None
        for sink in self._sinks:
            if not sink.waiting_keyframe:
                sink.waiting_keyframe = True
                self._waiting.append(sink)
        self._rebuild()
        self.request_keyframe()

    # --- source side --------------------------------------------------------------------

    def on_source_packet(self, packet: RtpPacket) -> None:
        mapper = self.mapper
        if mapper.started and packet.ssrc == mapper.source_ssrc:
            ahead = (packet.sequence_number + mapper.seq_offset - mapper.last_out_seq) % SEQ_MOD
            if MAX_SEQ_JUMP < ahead <= SEQ_MOD - HISTORY_SIZE:
                self.numbering_restarts += 1
                self.new_source()
        out_seq, out_ts, switched = self.mapper.map(
            packet.ssrc, packet.sequence_number, packet.timestamp
        )
        slot = out_seq % HISTORY_SIZE
        if not switched and self._history_seq[slot] == out_seq:
            kept = self._history[slot]
            if kept is not None and kept[12:] == packet.payload:
                # a packet forwarded already, received again (a publisher's RTX payload
                # padding, an answer to a NACK whose original came late): viewers that lost it
                # ask for it
                self.duplicates_dropped += 1
                return
            # another packet under a number already forwarded: the source restarted its
            # numbering with the same SSRC (a new pull of the same upstream): a new source
            self.numbering_restarts += 1
            self.new_source()
            out_seq, out_ts, switched = self.mapper.map(
                packet.ssrc, packet.sequence_number, packet.timestamp
            )
            slot = out_seq % HISTORY_SIZE
        if switched and self.packets_in:
            self.resync_all()
        payload = packet.payload
        data = build_packet(packet.marker, self._base_pt, out_seq, out_ts, self.output_ssrc,
                            payload)
        self._history[slot] = data
        self._history_seq[slot] = out_seq
        if len(data) > self.largest_packet:
            self.largest_packet = len(data)
        self.packets_in += 1
        self.octets_in += len(payload)
        if self.packets_in == 1 and self._sender_report is None:
            for sink in self._sinks:
                self._apply_local_sender_report(sink)
        self.last_packet_time = time.monotonic()
        keyframe = self.kind == "video" and self._is_keyframe_start(payload)
        if keyframe and self._base_mime == "video/vp8":
            self.frame_size = vp8_keyframe_size(payload) or self.frame_size
        self._pending.append((data, keyframe))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._drain)

    def new_source(self) -> None:
        """The next packet comes from a new source even if its SSRC is the one before (a new
        pull of the same upstream numbers its packets its own way): it is numbered on from
        the newest packet, and video viewers wait for a key frame (which that packet may be)."""
        self.mapper.source_ssrc = None

    def _drain(self) -> None:
        self._drain_scheduled = False
        budget = SEND_BUDGET
        pending = self._pending
        while pending and budget > 0:
            data, keyframe = pending.popleft()
            completed = False  # this packet made the cached key frame whole
            if keyframe:
                self.keyframes_drained += 1
                self._keyframe_wanted = False
                self._gop = [data]
                self._gop_started = time.monotonic()
                self._kf_seq = (data[2] << 8) | data[3]
                self._kf_ts = int.from_bytes(data[4:8], "big")
                self._kf_packets = 1
                self._kf_end = self._kf_seq if data[1] & 0x80 else None
                self._kf_complete = completed = self._kf_end is not None
                self._gop_frames = int(completed)
                if self._switching:
                    self._switch_at_keyframe()
                if self._waiting:
                    self._admit_waiting()
            elif self._gop is not None:
                if len(self._gop) < GOP_CACHE_PACKETS:
                    self._gop.append(data)
                    if data[1] & 0x80:
                        self._gop_frames += 1
                    if not self._kf_complete:
                        completed = self._count_keyframe_packet(data)
                else:
                    self._gop = None
            for group in self._groups:
                sink_set = group.native
                pt = group.payload_type
                if group.abs_send_time_id:  # stamped at its send time, once for the group
                    out = stamped(data, pt, group.abs_send_time_id, self.send_clock(),
                                  group.seq_delta, group.ts_delta)
                elif group.seq_delta or group.ts_delta:
                    out = shifted(data, pt, group.seq_delta, group.ts_delta)
                elif pt == self._base_pt or sink_set is not None:
                    out = data
                else:
                    out = with_payload_type(data, pt)
                if sink_set is not None:
                    result = sink_set.send(out)
                    if result is not None:
                        self._native_failed(group, result)
                    budget -= sink_set.size
                    self.packets_sent += sink_set.size
                    self.native_packets_sent += sink_set.size
                entries = group.entries
                if not entries:
                    continue
                if out is data and pt != self._base_pt:
                    out = with_payload_type(data, pt)
                for index, (protect, sendto, addr) in enumerate(entries):
                    try:
                        sendto(protect(out), addr)
                    except BlockingIOError:  # socket buffer full: a loss, as on the wire
                        self.send_drops += 1
                    except Exception as exc:  # one bad packet or dying peer must not stop the others
                        self._send_failed(group.sinks[index], exc)
                budget -= len(entries)
                self.packets_sent += len(entries)
            newest = self._newest
            if newest is None or seq_newer((data[2] << 8) | data[3], (newest[2] << 8) | newest[3]):
                self._newest = data
                if self._leaving and data[1] & 0x80:  # a frame ended: switch away after it
                    self._switch_after_frame()
            if self._switching:  # (after the groups: a replay to a sink includes this packet)
                if completed:
                    self._switch_keyframe_complete()
                elif not keyframe:
                    self._switch_if_old_stuck()
        if pending:
            self._drain_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._drain)

    def _native_failed(self, group: SendGroup, result: native.SendResult) -> None:
        """Apply the Python path's rules to what the native call reports."""
        assert result is not None
        drops, failures = result
        self.send_drops += drops
        for index, kind, code in failures:
            self._send_failed(group.native_sinks[index], native.failure_exception(kind, code))

    def _send_failed(self, sink: ForwardSink, exc: Exception) -> None:
        """A send raised. Only a dead transport loses its sink; anything else (a packet the
        SRTP context refuses, a transient socket error) is one lost packet for one viewer."""
        if sink.closed:
            return
        if not sink.packet_sender.alive():
            logger.info("dropping %s sink: its transport is gone (%r)", self.kind, exc)
            sink.closed = True
            asyncio.get_running_loop().call_soon(self.remove_sink, sink)
            return
        self.send_errors += 1
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL:
            self._last_error_log = now
            logger.warning("%s send failed (%d so far), packet skipped: %r", self.kind,
                           self.send_errors, exc)

    def on_source_sender_report(self, ssrc: int, ntp: int, rtp_timestamp: int) -> None:
        self.last_sender_report_time = time.monotonic()
        if ssrc != self.mapper.source_ssrc:
            return
        self._sender_report = (ntp, self.mapper.map_timestamp(rtp_timestamp))
        for sink in self._sinks:
            self._apply_sender_report(sink)

    def _apply_local_sender_report(self, sink: ForwardSink) -> None:
        # No SR from the source yet: until one comes, map "now" to the newest timestamp rather
        # than let aiortc report NTP zero (January 1900).
        sink.report = (current_ntp_time(), (self.mapper.last_out_ts + sink.ts_delta) % TS_MOD, 0, 0)
        if sink.aiortc_reports:
            set_sender_report(sink.rtp_sender, *sink.report)

    def _apply_sender_report(self, sink: ForwardSink) -> None:
        assert self._sender_report is not None
        ntp, rtp_ts = self._sender_report
        sink.report = (ntp, (rtp_ts + sink.ts_delta) % TS_MOD, self.packets_in - sink.base_packets,
                       self.octets_in - sink.base_octets)
        if sink.aiortc_reports:
            set_sender_report(sink.rtp_sender, *sink.report)

    # --- feedback from viewers ----------------------------------------------------------

    def retransmit(self, sink: ForwardSink, sequence_numbers: list[int]) -> None:
        if sink.closed or sink.packet_sender.protect is None:
            return
        first = sink.first_seq
        previous = sink.previous
        for wire_seq in sequence_numbers:
            if first is not None and seq_newer(first, wire_seq):
                # sent before the sink's last layer switch: the layer it left has it
                if previous is not None:
                    layer, seq_delta, ts_delta, before = previous
                    if before is None or not seq_newer(before, wire_seq):
                        layer._resend(sink, wire_seq, seq_delta, ts_delta)
                continue
            self._resend(sink, wire_seq, sink.seq_delta, sink.ts_delta)

    def _resend(self, sink: ForwardSink, wire_seq: int, seq_delta: int, ts_delta: int) -> None:
        """Send ``sink`` this forwarder's packet that it got as ``wire_seq`` (with this shift)."""
        seq = (wire_seq - seq_delta) % SEQ_MOD
        slot = seq % HISTORY_SIZE
        data = self._history[slot]
        if data is None or self._history_seq[slot] != seq:
            return
        try:
            sink.packet_sender.send(self._for_sink(sink, data, seq_delta, ts_delta))
        except Exception as exc:
            self._send_failed(sink, exc)
            return
        self.nack_packets_served += 1

    def request_keyframe_for(self, sink: ForwardSink) -> None:
        """A viewer's PLI or FIR. Within KEYFRAME_RESEND_WINDOW_S of the key frame it started
        on here, while that one is still the cached one and whole, it is sent to the viewer
        again (KEYFRAME_RESENDS times at most) instead of asking the source."""
        start = sink.start_keyframe
        now = time.monotonic()
        if (self.kind != "video" or start is None or self._gop is None or not self._kf_complete
                or start[0] != self._kf_seq or now - start[1] > KEYFRAME_RESEND_WINDOW_S
                or sink.keyframe_resends >= KEYFRAME_RESENDS or sink not in self._sinks
                or sink.paused or sink.waiting_keyframe or sink.switch is not None
                or sink.fixed_layer):  # (a relay's pull asks for its own new viewers)
            self.request_keyframe()
            return
        if now - sink.last_resend < RESEND_SPACING_S:
            return  # it asks again before the resend could reach it
        sink.keyframe_resends += 1
        sink.last_resend = now
        self.keyframe_resends += 1
        gop = self._gop
        end = next((i for i, data in enumerate(gop) if ((data[2] << 8) | data[3]) == self._kf_end),
                   len(gop) - 1)
        self._send_alone(sink, gop[:end + 1])
        self.keyframe_resent_packets += end + 1

    def request_keyframe(self) -> None:
        """Ask the source for a key frame, at most once per KEYFRAME_REQUEST_INTERVAL; a request
        inside the interval is remembered and sent when it ends (or met by a key frame first)."""
        if self.kind != "video":
            return
        self._keyframe_wanted = True
        self._try_keyframe_request()

    def _try_keyframe_request(self) -> None:
        now = time.monotonic()
        wait = self._last_keyframe_request + KEYFRAME_REQUEST_INTERVAL - now
        if wait <= 0 and self._send_keyframe_request(now):
            if not self._waiting and not self._switch_needs_keyframe():
                return
            wait = KEYFRAME_REQUEST_INTERVAL  # viewers still waiting: ask again if none comes
        if self.keyframe_requester is not None and self._deferred_request is None:
            # throttled, or the source's SSRC is not known yet: try again shortly
            loop = asyncio.get_running_loop()
            delay = max(wait, KEYFRAME_REQUEST_INTERVAL / 5)
            self._deferred_request = loop.call_later(delay, self._deferred_keyframe_request)

    def _deferred_keyframe_request(self) -> None:
        self._deferred_request = None
        if self._keyframe_wanted or self._waiting or self._switch_needs_keyframe():
            self._keyframe_wanted = True
            self._try_keyframe_request()

    def _send_keyframe_request(self, now: float) -> bool:
        if self.keyframe_requester is None or not self.keyframe_requester():
            return False
        self._last_keyframe_request = now
        self._keyframe_wanted = False
        self.keyframe_requests_sent += 1
        return True

    # --- simulcast layer switches -----------------------------------------------------------

    def switch_in(self, sink: ForwardSink, current: TrackForwarder) -> None:
        """Move ``sink`` from ``current`` (another layer of the same stream, same output SSRC)
        to this forwarder at this forwarder's next key frame, asking for one; ``current``
        keeps feeding it until then (see LayerSwitch). A switch still under way is cancelled
        first (wherever it was going); switching to ``current`` only cancels it."""
        current._cancel_switch(sink)
        if current is self:
            return
        switch = LayerSwitch(current, self)
        sink.switch = switch
        self._switching[sink] = switch
        current._leaving.add(sink)
        self.request_keyframe()

    def switching(self, sink: ForwardSink) -> bool:
        return sink in self._switching

    def _cancel_switch(self, sink: ForwardSink) -> None:
        switch = sink.switch
        if switch is not None:
            sink.switch = None
            switch.target._switching.pop(sink, None)
            switch.source._leaving.discard(sink)

    def _count_keyframe_packet(self, data: bytes) -> bool:
        """A packet drained after the cached key frame's first: True if it made it whole."""
        if int.from_bytes(data[4:8], "big") != self._kf_ts:
            return False
        self._kf_packets += 1
        if data[1] & 0x80:
            self._kf_end = (data[2] << 8) | data[3]
        end = self._kf_end
        if end is not None and self._kf_packets == (end - self._kf_seq) % SEQ_MOD + 1:
            self._kf_complete = True
        return self._kf_complete

    def _switch_ready(self, switch: LayerSwitch) -> bool:
        """A whole key frame drained since the switch was asked for is cached here."""
        return (self.keyframes_drained > switch.keyframes_at_request and self._gop is not None
                and self._kf_complete)

    def _switch_needs_keyframe(self) -> bool:
        """A switch into this forwarder has no key frame (started) since it asked for one."""
        return any(self.keyframes_drained == switch.keyframes_at_request or self._gop is None
                   for switch in self._switching.values())

    def _switch_at_keyframe(self) -> None:
        """This forwarder's key frame starts (the packet being drained). A switch that saw a
        key frame here already and still waits (it never completed, or the old layer never
        ended a frame) is made now, from this packet."""
        for sink, switch in list(self._switching.items()):
            if sink not in switch.source._sinks or sink.closed:
                self._cancel_switch(sink)
            elif self.keyframes_drained - switch.keyframes_at_request > 1:
                self._complete_switch(sink, switch, replay=False)

    def _switch_keyframe_complete(self) -> None:
        """The cached key frame is whole: sinks whose old layer is between frames (or never
        sent them anything) come here now."""
        for sink, switch in list(self._switching.items()):
            if self._switch_ready(switch) and switch.source._between_frames(sink):
                self._complete_switch(sink, switch, replay=True)

    def _switch_if_old_stuck(self) -> None:
        """A switch ready here whose old layer ended no frame for SWITCH_WAIT_FRAMES of this
        one's (paused mid-frame, or its source gone): complete it now."""
        for sink, switch in list(self._switching.items()):
            if self._switch_ready(switch) and self._gop_frames > SWITCH_WAIT_FRAMES:
                self._complete_switch(sink, switch, replay=True)
            elif self._gop is None and self.keyframes_drained > switch.keyframes_at_request:
                # its key frame left the cache before the switch could be made: another one
                self.request_keyframe()

    def _switch_after_frame(self) -> None:
        """A frame of this forwarder just ended: sinks leaving it whose new layer has its key
        frame cached go there now."""
        for sink in list(self._leaving):
            switch = sink.switch
            if switch is not None and switch.target._switch_ready(switch):
                switch.target._complete_switch(sink, switch, replay=True)

    def _between_frames(self, sink: ForwardSink) -> bool:
        newest = self._newest
        return (sink.waiting_keyframe or sink.paused or newest is None
                or bool(newest[1] & 0x80))

    def _complete_switch(self, sink: ForwardSink, switch: LayerSwitch, replay: bool) -> None:
        """Move ``sink`` here from ``switch.source``, its seq/timestamp shifted to follow on from
        the newest packet it was sent there. ``replay``: this forwarder's packets since its
        cached key frame are sent to it now (else the key frame being drained reaches it)."""
        old = switch.source
        self._cancel_switch(sink)
        if sink.closed or sink not in old._sinks:
            return
        gop = self._gop
        if gop is None:  # (the key frame being drained is always cached)
            return
        keyframe = gop[0]
        seq = (keyframe[2] << 8) | keyframe[3]
        ts = int.from_bytes(keyframe[4:8], "big")
        last = old._newest
        if last is None or sink.waiting_keyframe:
            last_seq, last_ts = old.mapper.last_out_seq, old.mapper.last_out_ts
        else:
            last_seq, last_ts = (last[2] << 8) | last[3], int.from_bytes(last[4:8], "big")
        # the key frame's timestamp follows the old layer's newest by the wall-clock time
        # between their arrivals (at least one tick: a new frame for the viewer's jitter
        # buffer; a key frame that arrived while the old layer went on is shown right after)
        arrived = self._gop_started if replay else time.monotonic()
        gap = max(1, int((arrived - old.mapper.last_wall) * self.codec.clockRate))
        viewer_seq = (last_seq + sink.seq_delta) % SEQ_MOD
        viewer_ts = (last_ts + sink.ts_delta) % TS_MOD
        if sink.paused:  # sent nothing since its pause: it goes on from there once resumed
            replay = False
            if sink.paused_seq is not None:
                viewer_seq = sink.paused_seq
        sent_packets = old.packets_in - sink.base_packets
        sent_octets = old.octets_in - sink.base_octets
        old._release(sink)
        sink.previous = (old, sink.seq_delta, sink.ts_delta, sink.first_seq)
        sink.seq_delta = (viewer_seq + 1 - seq) % SEQ_MOD
        sink.ts_delta = (viewer_ts + gap - ts) % TS_MOD
        sink.first_seq = (viewer_seq + 1) % SEQ_MOD
        sink.waiting_keyframe = False
        # the Sender Reports' counts go on from what the sink was sent on the old layer
        sink.base_packets = self.packets_in - sent_packets
        sink.base_octets = self.octets_in - sent_octets
        self._sinks.append(sink)
        on_resolve = getattr(sink.packet_sender, "on_resolve", None)
        if on_resolve is not None:
            sink.cancel_refresh = on_resolve(self._rebuild)
        self.layer_switches += 1
        if not sink.paused:
            self._started_at_keyframe(sink)
        if replay:
            self._send_alone(sink, gop)
        if self._sender_report is not None:
            self._apply_sender_report(sink)
        if sink.on_first_packet is not None:
            sink.on_first_packet()
            sink.on_first_packet = None
        if sink.on_switched is not None:
            sink.on_switched(self)
        self._rebuild()

    def _release(self, sink: ForwardSink) -> None:
        """Drop ``sink`` from this forwarder without closing it (it moves to another layer)."""
        if sink.cancel_refresh is not None:
            sink.cancel_refresh()
            sink.cancel_refresh = None
        if sink in self._sinks:
            self._sinks.remove(sink)
        if sink in self._waiting:
            self._waiting.remove(sink)
        self._rebuild()

    # --- pausing one viewer's video (lotcast/media/auto_layer.py) ----------------------------

    def pause(self, sink: ForwardSink) -> None:
        """Stop sending this track to ``sink``; it stays a sink, for a later ``resume``."""
        if sink.paused or sink not in self._sinks or sink.switch is not None:
            return
        newest = self._newest
        if sink in self._resuming:  # paused again before it came back: it still has that seq
            self._resuming.remove(sink)
        elif newest is not None and not sink.waiting_keyframe:
            sink.paused_seq = (((newest[2] << 8) | newest[3]) + sink.seq_delta) % SEQ_MOD
        if sink in self._waiting:
            self._waiting.remove(sink)
        sink.waiting_keyframe = False
        sink.paused = True
        self._rebuild()

    def resume(self, sink: ForwardSink) -> None:
        """Send to ``sink`` again from this track's next key frame (asked for), numbered on
        from the newest packet it was sent, so its decoder sees no gap to NACK."""
        if not sink.paused or sink not in self._sinks:
            return
        sink.paused = False
        sink.waiting_keyframe = True
        self._waiting.append(sink)
        self._resuming.append(sink)
        self.request_keyframe()

    def _resume_at(self, keyframe: bytes) -> None:
        seq = (keyframe[2] << 8) | keyframe[3]
        for sink in self._resuming:
            if sink.paused_seq is not None and not sink.closed:
                # NACKs for packets from before the pause: this history, at the old shift
                sink.previous = (self, sink.seq_delta, sink.ts_delta, sink.first_seq)
                sink.seq_delta = (sink.paused_seq + 1 - seq) % SEQ_MOD
                sink.first_seq = (sink.paused_seq + 1) % SEQ_MOD
                sink.paused_seq = None
        self._resuming.clear()

    def _started_at_keyframe(self, sink: ForwardSink) -> None:
        """``sink`` starts here at the cached key frame (joined, switched or resumed)."""
        sink.start_keyframe = (self._kf_seq, time.monotonic())
        sink.keyframe_resends = 0

    def measure_bitrate(self) -> int | None:
        """The payload bitrate since the previous measurement (at least 1 s apart)."""
        now = time.monotonic()
        then, octets = self._rate_sample
        if now - then >= 1.0:
            self.bitrate = int((self.octets_in - octets) * 8 / (now - then))
            self._rate_sample = (now, self.octets_in)
        return self.bitrate

    def close(self) -> None:
        for sink in [*self._switching, *self._leaving]:
            self._cancel_switch(sink)
        if self._deferred_request is not None:
            self._deferred_request.cancel()
            self._deferred_request = None
        self._pending.clear()
        self._gop = None
        for sink in self._sinks:
            sink.closed = True
            if sink.cancel_refresh is not None:
                sink.cancel_refresh()
                sink.cancel_refresh = None
        self._sinks.clear()
        self._waiting.clear()
        self._groups = ()
