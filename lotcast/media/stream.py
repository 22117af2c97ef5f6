"""A live stream on one node: its track forwarders, its source and its lifecycle.

A stream is fed by one source at a time. A relay that replaces its pull (origin move, cascade
re-parent, stall re-pull) attaches the new source *pending* (``attach_source(at_keyframe=True)``):
its packets are held back while the old source keeps feeding every viewer, and at the new
source's first video key frame the stream switches in one step, so viewers' decoders go from
the old source's frames straight to a key frame of the new one (output SSRC, sequence numbers
and timestamps stay continuous, see SequenceMapper). The switch also happens when the old source
goes silent or leaves, or after SWITCH_TIMEOUT_S; then viewers wait for the new key frame as
before.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Callable, Iterator

from aiortc import RTCRtpCodecParameters, RTCRtpReceiver
from aiortc.rtp import RtpPacket

from lotcast.media.aiortc_hooks import (
    SimulcastDemux,
    request_keyframe,
    tap_receiver,
    tap_simulcast_receiver,
)
from lotcast.media.forwarder import KEYFRAME_REQUEST_INTERVAL, TrackForwarder
from lotcast.media.layer_fallback import CHECK_S as FALLBACK_CHECK_S
from lotcast.media.layer_fallback import LayerFallback
from lotcast.media.layer_feed import LayerFeeds
from lotcast.media.rtp import KeyframeTest, keyframe_detector

logger = logging.getLogger(__name__)

Receivers = dict[str, tuple[RTCRtpReceiver, RTCRtpCodecParameters]]

# A pending source that brought no key frame this long after it was attached is switched to
# anyway (viewers then wait for its key frame, as without make-before-break); it is asked for
# one (PLI) every KEYFRAME_REQUEST_INTERVAL meanwhile, once its video SSRC is known.
SWITCH_TIMEOUT_S = 2.0
# The old source's video (its audio for an audio-only stream) silent this long: it is gone or
# stalled, holding the new one back would only prolong the stall.
OLD_SILENT_S = 0.5
SWITCH_CHECK_S = 0.1
SWITCH_WAITS_KEPT = 16
# The 201 of a WHEP POST for a simulcast stream lists its layers, top first ("h,m,l"): a relay
# pulling it pulls each lower layer too (``?layer=<rid>``, relay's MediaStream.attach_layer).
LAYERS_HEADER = "Lotcast-Layers"


class StreamState(enum.Enum):
    IDLE = "idle"  # exists, no source attached yet
    LIVE = "live"  # a source is attached
    ORPHANED = "orphaned"  # the source left; viewers stay for the grace period
    ENDED = "ended"


_TRANSITIONS = {
    StreamState.IDLE: {StreamState.LIVE, StreamState.ENDED},
    StreamState.LIVE: {StreamState.ORPHANED, StreamState.ENDED},
    StreamState.ORPHANED: {StreamState.LIVE, StreamState.ENDED},
    StreamState.ENDED: set(),
}


class SwitchState(enum.Enum):
    STEADY = "steady"  # at most one source: the one feeding viewers
    PENDING = "pending"  # a new source is attached and held back until it can take over


class SwitchEnd(enum.Enum):
    """Why a pending source stopped being pending."""

    KEYFRAME = "keyframe"  # its first video key frame arrived: switched at that frame
    AUDIO_ONLY = "audio_only"  # nothing to wait for: switched at once
    OLD_SILENT = "old_silent"  # the old source stopped sending: switched
    OLD_GONE = "old_gone"  # the old source left: switched
    TIMEOUT = "timeout"  # no key frame within SWITCH_TIMEOUT_S: switched
    ABANDONED = "abandoned"  # it left, was superseded, or the stream ended: not switched


class _Role(enum.Enum):
    PENDING = "pending"
    FEEDING = "feeding"
    RETIRED = "retired"


class _Source:
    """One attached set of receivers and what the stream does with their packets."""

    __slots__ = ("attached_at", "demux", "generation", "is_keyframe", "last_keyframe_request",
                 "receivers", "rids", "role", "ssrcs")

    def __init__(self, generation: int, receivers: Receivers, role: _Role,
                 rids: tuple[str, ...] = ()) -> None:
        self.generation = generation
        self.rids = rids  # simulcast video layers, top first (empty: one layer)
        self.demux: SimulcastDemux | None = None
        self.receivers = receivers
        self.role = role
        self.attached_at = time.monotonic()
        self.last_keyframe_request = 0.0
        self.ssrcs: dict[str, int] = {}  # kind -> media SSRC, learned from SRs and held packets
        video = receivers.get("video")
        self.is_keyframe: KeyframeTest | None = (
            keyframe_detector(video[1].mimeType) if video is not None else None)


class MediaStream:
    """Forwarders for the audio and video of one stream id, fed by one source at a time."""

    def __init__(self, stream_id: str, grace: float, on_ended: Callable[[MediaStream], None]) -> None:
        self.id = stream_id
        self.state = StreamState.IDLE
        self.switch_state = SwitchState.STEADY
        self.tracks: dict[str, TrackForwarder] = {}
        self._grace = grace
        self._grace_timer: asyncio.TimerHandle | None = None
        self._output_ssrcs = {"audio": random.getrandbits(32), "video": random.getrandbits(32)}
        self._on_ended = on_ended
        self._end_callbacks: list[Callable[[], None]] = []
        self.source_generation = 0
        self._feeding: _Source | None = None
        self._pending: _Source | None = None
        self._switch_check: asyncio.TimerHandle | None = None
        self._switch_waiters: dict[int, list[asyncio.Future[bool]]] = {}
        # counters: switches made, by how they ended, and how long each waited (ms)
        self.switch_ends: dict[str, int] = {end.value: 0 for end in SwitchEnd}
        self.switch_waits_ms: list[float] = []
        self._layers: dict[str, TrackForwarder] = {}
        self._layer_feeds = LayerFeeds()  # a relay's layer pulls, make before break
        # viewers of a layer the publisher stopped sending go to one below that flows
        self._fallback = LayerFallback(lambda: self._layers)
        self._fallback_timer: asyncio.TimerHandle | None = None
        # rid -> (width, height) the simulcast offer declared (a=rid max-width/max-height)
        self.layer_sizes: dict[str, tuple[int, int]] = {}

    @property
    def live(self) -> bool:
        return self.state is StreamState.LIVE

    def _set_state(self, new: StreamState) -> None:
        if new is self.state:
            return
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"stream {self.id}: illegal transition {self.state.value} -> {new.value}")
        logger.info("stream %s: %s -> %s", self.id, self.state.value, new.value)
        self.state = new

    @property
    def layers(self) -> dict[str, TrackForwarder]:
        """Simulcast video: rid -> its forwarder, top layer first (that one is also
        ``tracks["video"]``); empty for a single-layer stream."""
        return self._layers

    def codecs(self) -> dict[str, RTCRtpCodecParameters]:
        return {kind: fwd.codec for kind, fwd in self.tracks.items()}

    def attach_source(self, receivers: Receivers, at_keyframe: bool = False,
                      rids: tuple[str, ...] = (), keep_layers: bool = False) -> int:
        """Feed this stream from these receivers; returns the source generation for detach.

        With ``at_keyframe`` and a live source feeding, the new one is pending: it takes over
        at its first video key frame (see the module docstring; ``wait_switched``). With
        ``rids`` the video receiver carries these simulcast layers (top first), each fed to a
        forwarder of its own (``layers``). With ``keep_layers`` (a relay's pull, whose other
        layers come from pulls of their own: ``set_layer_order``, ``attach_layer``) the
        stream's layers stay as they are."""
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        self.source_generation += 1
        make_before_break = (at_keyframe and self.state is StreamState.LIVE
                             and self._feeding is not None)
        source = _Source(self.source_generation, receivers,
                         _Role.PENDING if make_before_break else _Role.FEEDING,
                         rids if "video" in receivers else ())
        if self._pending is not None:  # superseded before it took over
            self._end_pending(SwitchEnd.ABANDONED)
        for kind, (receiver, codec) in receivers.items():
            forwarder = self.tracks.get(kind)
            if forwarder is None:
                forwarder = TrackForwarder(kind, codec, self._output_ssrcs[kind])
                self.tracks[kind] = forwarder
            if kind == "video" and source.rids:
                self._tap_layers(source, receiver, codec, forwarder)
            else:
                self._tap(source, kind, receiver, forwarder)
        if not source.rids and self._layers and not make_before_break and not keep_layers:
            self._drop_layers(())
        if not make_before_break:
            self._feed_from(source)
            self._set_state(StreamState.LIVE)
            for forwarder in self._all_forwarders():
                forwarder.resync_all()
            return source.generation
        self._pending = source
        self._set_switch_state(SwitchState.PENDING)
        end = self._switch_now()
        if end is not None:
            self._end_pending(end)
        else:
            self._switch_check = asyncio.get_running_loop().call_later(
                SWITCH_CHECK_S, self._check_pending)
        return source.generation

    def _tap(self, source: _Source, kind: str, receiver: RTCRtpReceiver,
             forwarder: TrackForwarder) -> None:
        forward = forwarder.on_source_packet
        forward_report = forwarder.on_source_sender_report
        feeding = _Role.FEEDING
        pending = _Role.PENDING

        def on_packet(packet: RtpPacket) -> None:
            role = source.role
            if role is feeding:
                forward(packet)
            elif role is pending:
                self._held(source, kind, packet)

        def on_report(ssrc: int, ntp: int, rtp_timestamp: int) -> None:
            source.ssrcs[kind] = ssrc
            if source.role is feeding:
                forward_report(ssrc, ntp, rtp_timestamp)

        tap_receiver(receiver, on_packet, on_report)

    def _tap_layers(self, source: _Source, receiver: RTCRtpReceiver, codec: RTCRtpCodecParameters,
                    top: TrackForwarder) -> None:
        """A simulcast video receiver: each layer's packets to that layer's forwarder (the
        top one is ``tracks["video"]``; all share the stream's output SSRC)."""
        self._drop_layers(source.rids)
        layers: dict[str, TrackForwarder] = {}
        for index, rid in enumerate(source.rids):
            forwarder = top if index == 0 else self._layers.get(rid)
            if forwarder is None or forwarder.codec.mimeType != codec.mimeType:
                forwarder = TrackForwarder("video", codec, self._output_ssrcs["video"])
            layers[rid] = forwarder
        self._layers = layers
        self._arm_fallback()
        top_rid = source.rids[0]
        feeding = _Role.FEEDING

        def on_packet(rid: str, packet: RtpPacket) -> None:
            role = source.role
            if role is feeding:
                layers[rid].on_source_packet(packet)
            elif role is _Role.PENDING and rid == top_rid:
                self._held(source, "video", packet)

        def on_report(rid: str, ssrc: int, ntp: int, rtp_timestamp: int) -> None:
            if rid == top_rid:
                source.ssrcs["video"] = ssrc
            if source.role is feeding:
                layers[rid].on_source_sender_report(ssrc, ntp, rtp_timestamp)

        source.demux = tap_simulcast_receiver(receiver, source.rids, on_packet, on_report)

    # --- a relay's simulcast layers: one pull per layer below the top (relay/upstreams.py) ---

    def set_layer_order(self, order: tuple[str, ...]) -> None:
        """The layers the upstream carries, top first (its ``Lotcast-Layers``): the top one is
        ``tracks["video"]`` (the main pull), the others get forwarders fed by `attach_layer`;
        viewers of a layer that is gone move to the top one. Empty: one layer."""
        top = self.tracks.get("video")
        if top is None or len(order) < 2:
            self._drop_layers(())
            return
        self._drop_layers(order)
        self._layers = {rid: top if index == 0 else (self._layers.get(rid) or TrackForwarder(
            "video", top.codec, self._output_ssrcs["video"])) for index, rid in enumerate(order)}
        self._arm_fallback()

    def _arm_fallback(self) -> None:
        if self._fallback_timer is None and len(self._layers) > 1 \
                and self.state is not StreamState.ENDED:
            self._fallback_timer = asyncio.get_running_loop().call_later(
                FALLBACK_CHECK_S, self._fallback_tick)

    def _fallback_tick(self) -> None:
        self._fallback_timer = None
        self._fallback.check()
        self._arm_fallback()

    def attach_layer(self, rid: str, receiver: RTCRtpReceiver) -> int:
        """Feed layer ``rid`` (not the top one) from this receiver; returns its generation for
        `detach_layer`. A layer already fed keeps its source until the new one's first key
        frame (make before break, lotcast/media/layer_feed.py)."""
        forwarder = self._layers.get(rid)
        if forwarder is None or forwarder is self.tracks.get("video"):
            raise ValueError(f"stream {self.id} has no lower layer {rid!r}")
        self.source_generation += 1
        self._layer_feeds.attach(rid, receiver, forwarder, self.source_generation)
        return self.source_generation

    def detach_layer(self, rid: str, generation: int) -> None:
        self._layer_feeds.detach(rid, generation, self._layers.get(rid))

    def layer_switched(self, rid: str, generation: int) -> bool:
        """Whether layer ``rid`` is fed by source ``generation`` now (no longer pending)."""
        return self._layer_feeds.feeding_generation(rid) == generation

    @property
    def layer_switch_ends(self) -> dict[str, int]:
        return dict(self._layer_feeds.ends)

    def _drop_layers(self, keep: tuple[str, ...]) -> None:
        """Layers the new source lacks: their viewers move to the top layer, at its next key
        frame; the layer's forwarder is dropped (unfed from now on)."""
        top = self.tracks.get("video")
        for rid, forwarder in list(self._layers.items()):
            if rid in keep or forwarder is top:
                continue
            if top is not None:
                for sink in forwarder.sinks():
                    top.switch_in(sink, forwarder)
            self._layers.pop(rid)
            self._layer_feeds.drop(rid)
        if not keep:
            self._layers = {}

    def _feed_from(self, source: _Source) -> None:
        """Make ``source`` the one feeding viewers; the previous one's packets are dropped from
        now on (its connection may still deliver some before it closes)."""
        old = self._feeding
        if old is not None and old is not source:
            old.role = _Role.RETIRED
        source.role = _Role.FEEDING
        self._feeding = source
        for kind, (receiver, _codec) in source.receivers.items():
            forwarder = self.tracks[kind]
            forwarder.keyframe_requester = _keyframe_requester(receiver, forwarder, source, kind)
            if old is not None and old is not source:
                # a new pull of the same upstream has the same SSRC but numbers on its own way
                forwarder.new_source()
        demux = source.demux
        if demux is not None:
            receiver = source.receivers["video"][0]
            for rid, forwarder in self._layers.items():
                forwarder.keyframe_requester = _layer_requester(receiver, demux, rid)
                if old is not None and old is not source:
                    forwarder.new_source()

    def _held(self, source: _Source, kind: str, packet: RtpPacket) -> None:
        """A packet of the pending source: dropped, unless it starts the video key frame that
        the stream switches at."""
        source.ssrcs[kind] = packet.ssrc
        if kind != "video" or source.is_keyframe is None:
            return
        if not source.is_keyframe(packet.payload):
            if not source.last_keyframe_request:  # its video began mid-frame: ask at once
                self._request_pending_keyframe(source, time.monotonic())
            return
        forwarder = self.tracks[kind]
        self._end_pending(SwitchEnd.KEYFRAME)
        # This packet is the key frame the viewers are resynced to (the forwarder sees a new
        # SSRC): no key frame request for it, the one asked for is here.
        requester, forwarder.keyframe_requester = forwarder.keyframe_requester, None
        try:
            forwarder.on_source_packet(packet)
        finally:
            forwarder.keyframe_requester = requester

    def _switch_now(self) -> SwitchEnd | None:
        """Whether the pending source should take over now (without its key frame)."""
        pending = self._pending
        assert pending is not None
        if pending.is_keyframe is None or "video" not in self.tracks:
            return SwitchEnd.AUDIO_ONLY
        now = time.monotonic()
        watched = self.tracks.get("video") or self.tracks.get("audio")
        if watched is None or now - watched.last_packet_time > OLD_SILENT_S:
            return SwitchEnd.OLD_SILENT
        if now - pending.attached_at >= SWITCH_TIMEOUT_S:
            return SwitchEnd.TIMEOUT
        return None

    def _check_pending(self) -> None:
        self._switch_check = None
        pending = self._pending
        if pending is None:
            return
        end = self._switch_now()
        if end is not None:
            self._end_pending(end)
            return
        now = time.monotonic()
        if now - pending.last_keyframe_request >= KEYFRAME_REQUEST_INTERVAL:
            self._request_pending_keyframe(pending, now)
        self._switch_check = asyncio.get_running_loop().call_later(SWITCH_CHECK_S,
                                                                   self._check_pending)

    def _request_pending_keyframe(self, pending: _Source, now: float) -> None:
        ssrc = pending.ssrcs.get("video")
        if ssrc is not None:  # not known before its first video packet or Sender Report
            pending.last_keyframe_request = now
            request_keyframe(pending.receivers["video"][0], ssrc)

    def _end_pending(self, end: SwitchEnd) -> None:
        """The pending source takes over (every end but ABANDONED) or is dropped."""
        pending = self._pending
        assert pending is not None
        self._pending = None
        if self._switch_check is not None:
            self._switch_check.cancel()
            self._switch_check = None
        waited_ms = (time.monotonic() - pending.attached_at) * 1000
        self.switch_ends[end.value] += 1
        if end is SwitchEnd.ABANDONED:
            pending.role = _Role.RETIRED
        else:
            self._feed_from(pending)
            self.switch_waits_ms.append(round(waited_ms, 1))
            del self.switch_waits_ms[:-SWITCH_WAITS_KEPT]
            if end is not SwitchEnd.KEYFRAME:
                for forwarder in self._all_forwarders():
                    forwarder.resync_all()
        logger.info("stream %s: source %d %s after %.0f ms", self.id, pending.generation,
                    "dropped" if end is SwitchEnd.ABANDONED else f"took over ({end.value})",
                    waited_ms)
        self._set_switch_state(SwitchState.STEADY)
        for future in self._switch_waiters.pop(pending.generation, []):
            if not future.done():
                future.set_result(end is not SwitchEnd.ABANDONED)

    def _set_switch_state(self, new: SwitchState) -> None:
        if new is self.switch_state:
            raise RuntimeError(f"stream {self.id}: switch already {new.value}")
        logger.debug("stream %s switch: %s -> %s", self.id, self.switch_state.value, new.value)
        self.switch_state = new

    async def wait_switched(self, generation: int) -> bool:
        """True once source ``generation`` feeds the stream; False if it never will (it left,
        was superseded, or the stream ended). Returns within SWITCH_TIMEOUT_S of its attach."""
        if self._feeding is not None and self._feeding.generation == generation:
            return self.state is StreamState.LIVE
        if self._pending is None or self._pending.generation != generation:
            return False
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._switch_waiters.setdefault(generation, []).append(future)
        return await future

    def detach_source(self, generation: int) -> None:
        """The source of ``generation`` left; keep viewers for the grace period."""
        if self._pending is not None and self._pending.generation == generation:
            self._end_pending(SwitchEnd.ABANDONED)
            return
        feeding = self._feeding
        if feeding is None or generation != feeding.generation or self.state is not StreamState.LIVE:
            return
        if self._pending is not None:
            self._end_pending(SwitchEnd.OLD_GONE)
            return
        feeding.role = _Role.RETIRED
        self._feeding = None
        for forwarder in self._all_forwarders():
            forwarder.keyframe_requester = None
        self._set_state(StreamState.ORPHANED)
        loop = asyncio.get_running_loop()
        self._grace_timer = loop.call_later(self._grace, self.end)

    def _all_forwarders(self) -> list[TrackForwarder]:
        out = list(self.tracks.values())
        out += [f for f in self._layers.values() if f not in out]
        return out

    def counters(self) -> dict[str, object]:
        """What /api/stats shows for this stream: state, per-track packet counters and the
        source switches (how each ended, how long the last ones waited for a key frame)."""
        out: dict[str, object] = {"id": self.id, "state": self.state.value}
        for kind, t in self.tracks.items():
            out[f"{kind}_packets_in"] = t.packets_in
            out[f"{kind}_packets_sent"] = t.packets_sent
            out[f"{kind}_nacks_served"] = t.nack_packets_served
            out[f"{kind}_keyframe_requests"] = t.keyframe_requests_sent
            out[f"{kind}_keyframe_replays"] = t.keyframe_replays
            out[f"{kind}_keyframe_resends"] = t.keyframe_resends
            out[f"{kind}_keyframe_resent_packets"] = t.keyframe_resent_packets
            out[f"{kind}_send_drops"] = t.send_drops
            out[f"{kind}_send_errors"] = t.send_errors
            out[f"{kind}_largest_packet"] = t.largest_packet
            out[f"{kind}_native_packets_sent"] = t.native_packets_sent
        if self._layers:
            out["layers"] = {rid: {"packets_in": f.packets_in, "packets_sent": f.packets_sent,
                                   "viewers": f.sink_count, "keyframe_requests":
                                   f.keyframe_requests_sent, "keyframe_resends":
                                   f.keyframe_resends, "switches_in": f.layer_switches,
                                   "size": list(f.frame_size) if f.frame_size else None}
                             for rid, f in self._layers.items()}
        out["switch_state"] = self.switch_state.value
        out["switches"] = sum(n for end, n in self.switch_ends.items()
                              if end != SwitchEnd.ABANDONED.value)
        out["switch_ends"] = dict(self.switch_ends)
        out["switch_waits_ms"] = list(self.switch_waits_ms)
        if self._layer_feeds.ends:  # a relay's lower-layer pulls: how each source took over
            out["layer_switch_ends"] = self.layer_switch_ends
        if self._layers:
            out.update(self._fallback.counters())
        return out

    def on_end(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when the stream ends; returns a function that cancels that."""
        self._end_callbacks.append(callback)

        def cancel() -> None:
            if callback in self._end_callbacks:
                self._end_callbacks.remove(callback)

        return cancel

    def end(self) -> None:
        if self.state is StreamState.ENDED:
            return
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        if self._pending is not None:
            self._end_pending(SwitchEnd.ABANDONED)
        self._set_state(StreamState.ENDED)
        if self._fallback_timer is not None:
            self._fallback_timer.cancel()
            self._fallback_timer = None
        for forwarder in self._all_forwarders():
            forwarder.close()
        for callback in list(self._end_callbacks):
            callback()
        self._end_callbacks.clear()
        self._on_ended(self)


def _keyframe_requester(receiver: RTCRtpReceiver, forwarder: TrackForwarder, source: _Source,
                        kind: str) -> Callable[[], bool]:
    def request() -> bool:
        # the source's own SSRC once known: right after a switch the forwarder's mapper may
        # still hold the previous source's
        ssrc = source.ssrcs.get(kind, forwarder.mapper.source_ssrc)
        if ssrc is None:
            return False
        request_keyframe(receiver, ssrc)
        return True

    return request


def _layer_requester(receiver: RTCRtpReceiver, demux: SimulcastDemux,
                     rid: str) -> Callable[[], bool]:
    def request() -> bool:
        ssrc = demux.ssrc_of.get(rid)
        if ssrc is None:
            return False
        request_keyframe(receiver, ssrc)  # a PLI for this layer's SSRC only
        return True

    return request


class StreamRouter:
    """All streams this node carries, by id."""

    def __init__(self, grace: float) -> None:
        self._grace = grace
        self._streams: dict[str, MediaStream] = {}
        # stream id -> the one publisher negotiating or feeding it (see claim_publisher)
        self._publishers: dict[str, object] = {}

    def get(self, stream_id: str) -> MediaStream | None:
        return self._streams.get(stream_id)

    def get_or_create(self, stream_id: str) -> MediaStream:
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = MediaStream(stream_id, self._grace, self._forget)
            self._streams[stream_id] = stream
        return stream

    def claim_publisher(self, stream_id: str, claimant: object) -> MediaStream | None:
        """Make ``claimant`` the stream's one publisher, or None if it already has one.

        Check and claim are one synchronous step (no await), so of any number of concurrent
        publishers exactly one wins. The claim lasts until ``release_publisher``.
        """
        if stream_id in self._publishers:
            return None
        stream = self.get_or_create(stream_id)
        self._publishers[stream_id] = claimant
        return stream

    def release_publisher(self, stream: MediaStream, claimant: object) -> None:
        """Drop ``claimant``'s claim; a stream that never went live is removed with it."""
        if self._publishers.get(stream.id) is claimant:
            del self._publishers[stream.id]
        if stream.state is StreamState.IDLE and stream.id not in self._publishers:
            stream.end()

    def _forget(self, stream: MediaStream) -> None:
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]

    def __iter__(self) -> Iterator[MediaStream]:
        return iter(list(self._streams.values()))

    def __len__(self) -> int:
        return len(self._streams)

    def close(self) -> None:
        for stream in list(self._streams.values()):
            stream.end()
