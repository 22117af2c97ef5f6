"""A live stream on one node: its track forwarders, its source and its lifecycle."""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Callable, Iterator

from aiortc import RTCRtpCodecParameters, RTCRtpReceiver

from lotcast.media.aiortc_hooks import request_keyframe, tap_receiver
from lotcast.media.forwarder import TrackForwarder

logger = logging.getLogger(__name__)


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


class MediaStream:
    """Forwarders for the audio and video of one stream id, fed by one source at a time."""

    def __init__(self, stream_id: str, grace: float, on_ended: Callable[[MediaStream], None]) -> None:
        self.id = stream_id
        self.state = StreamState.IDLE
        self.tracks: dict[str, TrackForwarder] = {}
        self._grace = grace
        self._grace_timer: asyncio.TimerHandle | None = None
        self._output_ssrcs = {"audio": random.getrandbits(32), "video": random.getrandbits(32)}
        self._on_ended = on_ended
        self._end_callbacks: list[Callable[[], None]] = []
        self.source_generation = 0

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

    def codecs(self) -> dict[str, RTCRtpCodecParameters]:
        return {kind: fwd.codec for kind, fwd in self.tracks.items()}

    def attach_source(self, receivers: dict[str, tuple[RTCRtpReceiver, RTCRtpCodecParameters]]) -> int:
        """Feed this stream from these receivers; returns the source generation for detach."""
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        self.source_generation += 1
        for kind, (receiver, codec) in receivers.items():
            forwarder = self.tracks.get(kind)
            if forwarder is None:
                forwarder = TrackForwarder(kind, codec, self._output_ssrcs[kind])
                self.tracks[kind] = forwarder
            tap_receiver(receiver, forwarder.on_source_packet, forwarder.on_source_sender_report)
            forwarder.keyframe_requester = _keyframe_requester(receiver, forwarder)
        self._set_state(StreamState.LIVE)
        for forwarder in self.tracks.values():
            forwarder.resync_all()
        return self.source_generation

    def detach_source(self, generation: int) -> None:
        """The source of ``generation`` left; keep viewers for the grace period."""
        if generation != self.source_generation or self.state is not StreamState.LIVE:
            return
        for forwarder in self.tracks.values():
            forwarder.keyframe_requester = None
        self._set_state(StreamState.ORPHANED)
        loop = asyncio.get_running_loop()
        self._grace_timer = loop.call_later(self._grace, self.end)

    def counters(self) -> dict[str, object]:
        """What /api/stats shows for this stream: state and per-track packet counters."""
        out: dict[str, object] = {"id": self.id, "state": self.state.value}
        for kind, t in self.tracks.items():
            out[f"{kind}_packets_in"] = t.packets_in
            out[f"{kind}_packets_sent"] = t.packets_sent
            out[f"{kind}_nacks_served"] = t.nack_packets_served
            out[f"{kind}_keyframe_requests"] = t.keyframe_requests_sent
            out[f"{kind}_keyframe_replays"] = t.keyframe_replays
            out[f"{kind}_send_drops"] = t.send_drops
            out[f"{kind}_send_errors"] = t.send_errors
            out[f"{kind}_largest_packet"] = t.largest_packet
            out[f"{kind}_native_packets_sent"] = t.native_packets_sent
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
        self._set_state(StreamState.ENDED)
        for forwarder in self.tracks.values():
            forwarder.close()
        for callback in list(self._end_callbacks):
            callback()
        self._end_callbacks.clear()
        self._on_ended(self)


def _keyframe_requester(receiver: RTCRtpReceiver, forwarder: TrackForwarder) -> Callable[[], bool]:
    def request() -> bool:
        ssrc = forwarder.mapper.source_ssrc
        if ssrc is None:
            return False
        request_keyframe(receiver, ssrc)
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
