"""Which pull feeds each lower simulcast layer of a relay's stream, make before break.

A relay pulls a simulcast stream's top layer with its main pull and every lower layer with a
video-only pull of its own (lotcast/media/upstream.py). When the relay replaces its pull (origin
move, cascade re-parent, stall re-pull), the new layer pulls are attached while the old ones
still feed: a new layer source is *pending*, its packets dropped, until the first packet of a
key frame of its own (asked for at once, and again every KEYFRAME_REQUEST_INTERVAL), where the
layer switches in one step, so that layer's viewers go from the old source's frames straight to
a key frame of the new one, as MediaStream.attach_source does for the main pull. The switch also
happens when the old layer source leaves, or after SWITCH_TIMEOUT_S; then viewers wait for the
new key frame (asked for).
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from collections.abc import Callable

from aiortc import RTCRtpReceiver
from aiortc.rtp import RtpPacket

from lotcast.media.aiortc_hooks import request_keyframe, tap_receiver
from lotcast.media.forwarder import KEYFRAME_REQUEST_INTERVAL, TrackForwarder
from lotcast.media.rtp import keyframe_detector

# As stream.SWITCH_TIMEOUT_S: a pending layer source without a key frame this long takes over.
LAYER_SWITCH_TIMEOUT_S = 2.0
# As stream.OLD_SILENT_S: the old source silent this long is gone or stalled; do not wait for it.
OLD_SILENT_S = 0.5


class LayerSwitchEnd(enum.Enum):
    """How a layer's new source took over (or did not)."""

    FIRST = "first"  # nothing fed the layer: fed at once
    KEYFRAME = "keyframe"  # at its first key frame, the old source feeding until then
    OLD_GONE = "old_gone"  # the old source left or went silent: switched, viewers wait for a
    # key frame
    TIMEOUT = "timeout"  # no key frame within LAYER_SWITCH_TIMEOUT_S: switched anyway
    ABANDONED = "abandoned"  # it left (or was superseded) before taking over


class _Role(enum.Enum):
    PENDING = "pending"
    FEEDING = "feeding"
    RETIRED = "retired"


class _LayerSource:
    __slots__ = ("attached_at", "generation", "last_keyframe_request", "receiver", "role",
                 "ssrc")

    def __init__(self, generation: int, receiver: RTCRtpReceiver, role: _Role) -> None:
        self.generation = generation
        self.receiver = receiver
        self.role = role
        self.attached_at = time.monotonic()
        self.last_keyframe_request = 0.0
        self.ssrc: int | None = None


class LayerFeeds:
    """The feeding (and at most one pending) source of each lower layer, by rid."""

    def __init__(self) -> None:
        self._feeding: dict[str, _LayerSource] = {}
        self._pending: dict[str, _LayerSource] = {}
        self.ends: Counter[str] = Counter()

    def attach(self, rid: str, receiver: RTCRtpReceiver, forwarder: TrackForwarder,
               generation: int) -> None:
        """Feed layer ``rid``'s ``forwarder`` from ``receiver``: at once if nothing feeds it,
        else from the new source's first key frame (make before break)."""
        superseded = self._pending.pop(rid, None)
        if superseded is not None:
            superseded.role = _Role.RETIRED
            self.ends[LayerSwitchEnd.ABANDONED.value] += 1
        first = rid not in self._feeding
        source = _LayerSource(generation, receiver, _Role.FEEDING if first else _Role.PENDING)
        if first:
            self._feed(rid, source, forwarder, LayerSwitchEnd.FIRST)
        else:
            self._pending[rid] = source
        is_keyframe = keyframe_detector(forwarder.codec.mimeType)
        forward = forwarder.on_source_packet
        feeding, pending = _Role.FEEDING, _Role.PENDING

        def on_packet(packet: RtpPacket) -> None:
            role = source.role
            if role is feeding:
                forward(packet)
                self._check_timeout(rid, forwarder)
            elif role is pending:
                source.ssrc = packet.ssrc
                if is_keyframe is not None and is_keyframe(packet.payload):
                    self._take_over(rid, source, forwarder, LayerSwitchEnd.KEYFRAME, packet)
                    return
                now = time.monotonic()
                if now - source.attached_at >= LAYER_SWITCH_TIMEOUT_S:
                    self._take_over(rid, source, forwarder, LayerSwitchEnd.TIMEOUT, packet)
                elif now - forwarder.last_packet_time > OLD_SILENT_S:
                    self._take_over(rid, source, forwarder, LayerSwitchEnd.OLD_GONE, packet)
                elif now - source.last_keyframe_request >= KEYFRAME_REQUEST_INTERVAL:
                    source.last_keyframe_request = now
                    request_keyframe(receiver, packet.ssrc)

        def on_report(ssrc: int, ntp: int, rtp_timestamp: int) -> None:
            if source.role is feeding:
                forwarder.on_source_sender_report(ssrc, ntp, rtp_timestamp)

        tap_receiver(receiver, on_packet, on_report)

    def detach(self, rid: str, generation: int, forwarder: TrackForwarder | None) -> None:
        """Source ``generation`` of layer ``rid`` left (its pull closed or failed)."""
        pending = self._pending.get(rid)
        if pending is not None and pending.generation == generation:
            del self._pending[rid]
            pending.role = _Role.RETIRED
            self.ends[LayerSwitchEnd.ABANDONED.value] += 1
            return
        feeding = self._feeding.get(rid)
        if feeding is None or feeding.generation != generation:
            return
        if pending is not None and forwarder is not None:
            self._take_over(rid, pending, forwarder, LayerSwitchEnd.OLD_GONE, None)
            return
        del self._feeding[rid]
        feeding.role = _Role.RETIRED
        if forwarder is not None:
            forwarder.keyframe_requester = None

    def drop(self, rid: str) -> None:
        """Layer ``rid`` is gone from the stream: nothing feeds it any more."""
        for table in (self._feeding, self._pending):
            source = table.pop(rid, None)
            if source is not None:
                source.role = _Role.RETIRED

    def pending(self, rid: str) -> bool:
        return rid in self._pending

    def feeding_generation(self, rid: str) -> int | None:
        source = self._feeding.get(rid)
        return None if source is None else source.generation

    def _check_timeout(self, rid: str, forwarder: TrackForwarder) -> None:
        """The old source's packets drive the bound too (a new one that sends nothing)."""
        pending = self._pending.get(rid)
        if pending is not None and time.monotonic() - pending.attached_at >= LAYER_SWITCH_TIMEOUT_S:
            self._take_over(rid, pending, forwarder, LayerSwitchEnd.TIMEOUT, None)

    def _take_over(self, rid: str, source: _LayerSource, forwarder: TrackForwarder,
                   end: LayerSwitchEnd, packet: RtpPacket | None) -> None:
        del self._pending[rid]
        old = self._feeding.get(rid)
        if old is not None:
            old.role = _Role.RETIRED
        self._feed(rid, source, forwarder, end)
        # a new pull of the same upstream has the same SSRC but numbers on its own way
        forwarder.new_source()
        if packet is None or end is not LayerSwitchEnd.KEYFRAME:
            forwarder.resync_all()  # viewers wait for the new source's key frame
            if packet is not None:
                forwarder.on_source_packet(packet)
            return
        # this packet starts the key frame the viewers go on with: no request for it
        requester, forwarder.keyframe_requester = forwarder.keyframe_requester, None
        try:
            forwarder.on_source_packet(packet)
        finally:
            forwarder.keyframe_requester = requester

    def _feed(self, rid: str, source: _LayerSource, forwarder: TrackForwarder,
              end: LayerSwitchEnd) -> None:
        source.role = _Role.FEEDING
        self._feeding[rid] = source
        self.ends[end.value] += 1
        forwarder.keyframe_requester = _requester(source, forwarder)


def _requester(source: _LayerSource, forwarder: TrackForwarder) -> Callable[[], bool]:
    def request() -> bool:
        ssrc = forwarder.mapper.source_ssrc if source.ssrc is None else source.ssrc
        if ssrc is None or source.role is not _Role.FEEDING:
            return False
        request_keyframe(source.receiver, ssrc)
        return True
    return request
