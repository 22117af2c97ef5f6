"""The automatic simulcast layer of one viewer, applied: its RTCP in, layer switches and video
pause/resume out (the rule itself is lotcast/media/layer_rule.py).

No timer per viewer: each RTCP packet from the viewer that carries reports, NACKs or REMB
(`ViewerRtcp.on_feedback`, about once a second when all is well, more often when it loses
packets) may trigger one evaluation, at most one per EVAL_INTERVAL_S. An evaluation turns what
the viewer's tracks recorded since the previous one into an `Observation`:

- loss: the packets we resent on its NACKs over the packets its layer carried (counted only over
  EVAL_MIN_PACKETS or more), or its receiver reports' fraction lost, whichever is larger;
- RTT samples of its video and audio tracks (same path);
- every layer's measured bitrate, and the viewer's REMB with ``use_remb``: Chromium sends REMB
  (goog-remb, no transport-cc offered) from its receive-side estimator, which needs
  abs-send-time on our packets to mean anything (without it the estimate sat at 210-300 kbit/s
  on loopback while 1 Mbit/s flowed without loss): the session asks for it only when the viewer
  negotiated abs-send-time, which the forwarder then stamps on its video.

A move down is a `switch_in` to the layer below, completed at that layer's next key frame; the
rule settles from then. A pinned viewer (the WHEP layer POST) is left alone, and its paused video
resumes. While its video is paused, only the audio track's reports and RTT say when it fits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from lotcast.media.forwarder import ForwardSink, TrackForwarder
from lotcast.media.layer_fallback import flowing
from lotcast.media.layer_rule import LayerRule, Mode, Move, Observation
from lotcast.media.viewer_rtcp import TrackFeedback, ViewerRtcp

logger = logging.getLogger(__name__)

EVAL_INTERVAL_S = 0.25
EVAL_MIN_PACKETS = 50  # fewer packets since the last count say too little about NACK loss


class AutoLayer:
    """Chooses one viewer's video layer from its feedback, until closed."""

    def __init__(self, layers: Callable[[], list[TrackForwarder]], rtcp: ViewerRtcp,
                 label: str, pinned: bool = False, use_remb: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._layers = layers  # the stream's layers, top first (empty or one: nothing to do)
        self._rtcp = rtcp
        self._label = label
        self._clock = clock
        self._pinned = pinned
        self._use_remb = use_remb
        self.rule = LayerRule()
        self._last_eval = -1e9
        self._moving = False  # a switch down we asked for is pending
        # counters at the previous evaluation: NACK window (forwarder, packets in, resent),
        # receiver reports and RTT samples seen per track
        self._window: tuple[TrackForwarder | None, int, int] = (None, 0, 0)
        self._reports: dict[int, int] = {}
        self._samples: dict[int, int] = {}
        self.moves: dict[Move, int] = {}
        self.down_reasons: dict[str, int] = {}  # loss / rtt / estimate: what moved it down
        rtcp.on_feedback = self.on_feedback

    @property
    def paused(self) -> bool:
        return self.rule.mode is Mode.PAUSED

    @property
    def pinned(self) -> bool:
        return self._pinned

    @pinned.setter
    def pinned(self, value: bool) -> None:
        """The viewer pinned a layer (True) or went back to automatic (False)."""
        if value and self.paused:
            video = self._video()
            if video is not None:
                video.forwarder.resume(video.sink)
        if value != self._pinned:  # either way, a fresh start from where the viewer is
            self.rule = LayerRule()
            self._moving = False
        self._pinned = value

    def close(self) -> None:
        if self._rtcp.on_feedback == self.on_feedback:
            self._rtcp.on_feedback = None

    def on_feedback(self) -> None:
        now = self._clock()
        if now - self._last_eval < EVAL_INTERVAL_S:
            return
        self._last_eval = now
        try:
            self.evaluate(now)
        except Exception:  # the choice must never break the viewer's RTCP handling
            logger.exception("automatic layer %s: evaluation failed", self._label)

    def _video(self) -> TrackFeedback | None:
        return next((t for t in self._rtcp.tracks.values() if t.forwarder.kind == "video"), None)

    def evaluate(self, now: float) -> Move:
        layers = self._layers()
        video = self._video()
        if self._pinned or len(layers) < 2 or video is None:
            return Move.STAY
        current, sink = video.forwarder, video.sink
        if current not in layers or sink.closed:
            return Move.STAY
        if any(f.switching(sink) for f in layers):
            return Move.STAY
        if self._moving:  # the switch down reached its key frame: judge the new layer
            self._moving = False
            self.rule.settle(now)
        index = layers.index(current)
        obs = Observation(now=now, index=index, count=len(layers), loss=self._loss(video),
                          rtts=self._new_rtts(), remb_bps=video.remb_bps if self._use_remb else None,
                          bitrates=tuple(f.measure_bitrate() for f in layers))
        move = self.rule.observe(obs)
        if move is not Move.STAY:
            self._apply(move, layers, index, current, sink, obs)
        return move

    def _apply(self, move: Move, layers: list[TrackForwarder], index: int,
               current: TrackForwarder, sink: ForwardSink, obs: Observation) -> None:
        if move is Move.UP and not flowing(layers[index - 1], self._clock()):
            return  # the publisher stopped sending it (layer_fallback.py): stay
        self.moves[move] = self.moves.get(move, 0) + 1
        if move in (Move.DOWN, Move.PAUSE):
            for reason in self.rule.reasons:
                self.down_reasons[reason] = self.down_reasons.get(reason, 0) + 1
        logger.info("automatic layer %s: %s at layer %d/%d (loss %s, rtt %s, base %s, remb %s,"
                    " hold %.0f s, congested: %s)", self._label, move.value, index, len(layers),
                    "-" if obs.loss is None else f"{obs.loss:.2f}",
                    ",".join(f"{r * 1000:.0f}" for _, r in obs.rtts) or "-",
                    "-" if self.rule.base_rtt is None else f"{self.rule.base_rtt * 1000:.0f}",
                    obs.remb_bps, self.rule.hold, "+".join(self.rule.reasons) or "-")
        if move is Move.DOWN:
            self._moving = True
            layers[index + 1].switch_in(sink, current)
        elif move is Move.UP:
            layers[index - 1].switch_in(sink, current)
        elif move is Move.PAUSE:
            current.pause(sink)
        elif move is Move.RESUME:
            current.resume(sink)
        self._window = (None, 0, 0)

    def _loss(self, video: TrackFeedback) -> float | None:
        """The viewer's loss since the previous evaluation (None: nothing new to tell)."""
        out: float | None = None
        forwarder, packets, resent = self._window
        if video.sink.paused:
            self._window = (None, 0, 0)
        elif forwarder is not video.forwarder:
            self._window = (video.forwarder, video.forwarder.packets_in, video.nacks_served)
        else:
            carried = video.forwarder.packets_in - packets
            if carried >= EVAL_MIN_PACKETS:
                out = min(1.0, (video.nacks_served - resent) / carried)
                self._window = (forwarder, video.forwarder.packets_in, video.nacks_served)
        for ssrc, track in self._rtcp.tracks.items():
            if track.receiver_reports != self._reports.get(ssrc, 0):
                self._reports[ssrc] = track.receiver_reports
                if track is video and video.sink.paused:
                    continue  # reports about a track it no longer gets
                out = max(out or 0.0, track.fraction_lost / 256)
        return out

    def _new_rtts(self) -> tuple[tuple[float, float], ...]:
        out = []
        for ssrc, track in self._rtcp.tracks.items():
            if track.rtt_samples != self._samples.get(ssrc, 0):
                self._samples[ssrc] = track.rtt_samples
                if track.last_rtt is not None:
                    out.append((track.last_rtt_sent, track.last_rtt))
        return tuple(out)
