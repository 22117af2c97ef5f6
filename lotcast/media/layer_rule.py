"""The automatic simulcast layer of one viewer, from its feedback (pure: no I/O, no clocks).

`LayerRule` decides; lotcast/media/auto_layer.py feeds it one `Observation` per burst of a
viewer's RTCP and applies the `Move` it returns. Signals, all per viewer:

- loss: the share of the packets sent to it that it NACKed and we resent (loss on its own path:
  gaps we never had upstream are not resent), or its receiver reports' fraction lost (what the
  resends did not repair), whichever is larger;
- RTT: from our Sender Reports and its receiver reports, against the lowest RTT it had in the
  last BASE_WINDOW_S (the base): a queue building on its path shows as RTT growth;
- a REMB bandwidth estimate, if the caller passes one (auto_layer.py does for viewers that
  negotiated abs-send-time, which the forwarder stamps on their video).

Down fast: one observation with loss >= DOWN_LOSS, RTT samples all RTT_RISE_S above the base for
RTT_HIGH_SPAN_S (a queue that stays; one late report, as when this process or the viewer's was
off the CPU for a moment, is not congestion), or a REMB that fell below REMB_DOWN_FRACTION of
the layer's bitrate and stayed there for REMB_LOW_SPAN_S moves it one layer down (a receive-side
estimator that sees a queue grow sets its estimate to 0.85x the throughput it measures: below
0.8x of what we send means the path delivers less than we send, not a moment of jitter on one
that carries it); the lowest layer congested pauses its video (audio goes on). After a move down
takes effect (`settle`) the rule judges again only once the RTT of a report sent since then
shows the queue drained (the old layer's packets, and reports about them, are still arriving
until then), or after SETTLE_MAX_S without one: a queue that does not drain on the lower layer
means that layer does not fit either.

Up conservatively: after UP_STABLE_S of clean observations (loss < UP_LOSS, RTT near the base,
a REMB, if any, with UP_HEADROOM for the layer above or at least REMB_FREE_RATIO of the
current layer's bitrate: a receive-side estimate never exceeds ~1.5x what it receives, so it can
show no room for a layer several times larger, and after a fall it climbs back slowly; one still
below the current layer says the path is the limit), and not within the hold-down, one layer
up (or video resumed). The hold-down is HOLD_S after a move down and doubles, up to HOLD_MAX_S,
each time a move down follows a move up (or resume) within RELAPSE_S: a path that cannot carry
a layer is offered it ever more rarely, so the choice never oscillates.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

DOWN_LOSS = 0.10
UP_LOSS = 0.02
RTT_RISE_S = 0.15  # above the base RTT (or the base itself, when larger): a queue
RTT_HIGH_SPAN_S = 1.0
RTT_ELEVATED_SPAN_S = 0.5  # samples above half the rise this long: not clean (no move up)
BASE_WINDOW_S = 30.0
SETTLE_MAX_S = 4.0
UP_STABLE_S = 3.0
HOLD_S = 4.0
HOLD_MAX_S = 64.0
RELAPSE_S = 10.0
UP_HEADROOM = 1.3
REMB_DOWN_FRACTION = 0.8
REMB_LOW_SPAN_S = 0.5
REMB_FREE_RATIO = 1.0
REMB_CHANGE = 1.03  # a new estimate this much above (below) the previous one: it rose (fell)


class Move(enum.Enum):
    STAY = "stay"
    DOWN = "down"  # one layer down
    UP = "up"  # one layer up
    PAUSE = "pause"  # video off, audio on: not even the lowest layer fits
    RESUME = "resume"  # video on again, at the lowest layer


class Mode(enum.Enum):
    PLAYING = "playing"
    PAUSED = "paused"


class Verdict(enum.Enum):
    CONGESTED = "congested"
    CLEAN = "clean"
    MIXED = "mixed"  # neither: no move up counts it as clean, no move down follows
    NO_NEWS = "no news"


@dataclass(frozen=True, slots=True)
class Observation:
    """What a viewer's feedback said since the previous observation."""

    now: float
    index: int  # its layer, 0: the top
    count: int  # layers the stream has
    loss: float | None = None  # 0..1 (None: no new report or too few packets to tell)
    # new RTT samples: (when the Sender Report it answers was sent, RTT), seconds
    rtts: tuple[tuple[float, float], ...] = ()
    remb_bps: int | None = None
    bitrates: tuple[int | None, ...] = ()  # each layer's measured bits/s


@dataclass
class LayerRule:
    """One viewer's automatic layer: feed `observe`, apply the `Move` it returns."""

    mode: Mode = Mode.PLAYING
    hold: float = HOLD_S
    hold_until: float = 0.0
    settle_until: float = 0.0
    clean_since: float | None = None
    last_up: float = -1e9  # the last move up or resume (a move down soon after is a relapse)
    # since when every RTT sample has been above base + rise (high) / base + rise / 2
    # (elevated); None: the last one was not
    high_since: float | None = None
    elevated_since: float | None = None
    # since when the REMB has been below the down fraction (after falling there); the last one
    remb_low_since: float | None = None
    _last_remb: int | None = None
    reasons: tuple[str, ...] = ()  # what the last observation found congested: loss, rtt, estimate
    settle_from: float = 0.0  # a move down took effect: an RTT of a later report shows the drain
    drained: bool = False  # the last observation had such a sample near the base
    # (bucket start, lowest RTT in it): the base is the lowest of the last BASE_WINDOW_S
    _rtt_buckets: deque[tuple[float, float]] = field(default_factory=deque)

    @property
    def base_rtt(self) -> float | None:
        return min((low for _, low in self._rtt_buckets), default=None)

    def settle(self, now: float) -> None:
        """A move down took effect now (the switch reached its key frame): judge again once
        the queue drained (or SETTLE_MAX_S from now)."""
        self.settle_until = max(self.settle_until, now + SETTLE_MAX_S)
        self.settle_from = now
        self.high_since = self.elevated_since = None

    def observe(self, obs: Observation) -> Move:
        if obs.count < 2:
            return Move.STAY
        verdict = self._judge(obs)
        now = obs.now
        if now < self.settle_until:
            if verdict is not Verdict.NO_NEWS:
                self.clean_since = None
            if self.drained:  # from the next observation on, it counts
                self.settle_until = now
            return Move.STAY
        if verdict is Verdict.CONGESTED:
            return self._down(obs)
        if verdict is Verdict.MIXED:
            self.clean_since = None
        elif verdict is Verdict.CLEAN and self.clean_since is None:
            self.clean_since = now
        if (self.clean_since is None or now < self.hold_until
                or now - self.clean_since < UP_STABLE_S):
            return Move.STAY
        if self.mode is Mode.PAUSED:
            self.mode = Mode.PLAYING
            move = Move.RESUME
        elif obs.index > 0 and self._room_above(obs):
            move = Move.UP
        else:
            return Move.STAY
        self.last_up = now
        self.clean_since = None
        return move

    def _down(self, obs: Observation) -> Move:
        now = obs.now
        self.clean_since = None
        self.high_since = self.elevated_since = self.remb_low_since = None
        if self.mode is Mode.PAUSED:
            self.hold_until = max(self.hold_until, now + self.hold)
            return Move.STAY
        relapse = now - self.last_up < RELAPSE_S
        self.hold = min(self.hold * 2, HOLD_MAX_S) if relapse else HOLD_S
        self.hold_until = now + self.hold
        self.settle_until = now + SETTLE_MAX_S
        self.settle_from = now
        if obs.index < obs.count - 1:
            return Move.DOWN
        self.mode = Mode.PAUSED
        return Move.PAUSE

    def _room_above(self, obs: Observation) -> bool:
        if obs.remb_bps is None:
            return True
        above = obs.bitrates[obs.index - 1] if obs.index - 1 < len(obs.bitrates) else None
        own = obs.bitrates[obs.index] if obs.index < len(obs.bitrates) else None
        return (above is None or obs.remb_bps >= above * UP_HEADROOM
                or (own is not None and obs.remb_bps >= own * REMB_FREE_RATIO))

    def _judge(self, obs: Observation) -> Verdict:
        congested = clean = mixed = False
        self.drained = False
        why: list[str] = []
        if obs.loss is not None:
            if obs.loss >= DOWN_LOSS:
                why.append("loss")
            congested |= obs.loss >= DOWN_LOSS
            clean |= obs.loss < UP_LOSS
            mixed |= UP_LOSS <= obs.loss < DOWN_LOSS
        now = obs.now
        for sent, rtt in obs.rtts:
            base = self._add_rtt(now, rtt)
            rise = max(RTT_RISE_S, base)
            if rtt > base + rise:
                self.high_since = now if self.high_since is None else self.high_since
                if now - self.high_since >= RTT_HIGH_SPAN_S:
                    congested = True
                    why.append("rtt")
            else:
                self.high_since = None
            if rtt > base + rise / 2:
                self.elevated_since = now if self.elevated_since is None else self.elevated_since
                mixed |= now - self.elevated_since >= RTT_ELEVATED_SPAN_S
            else:
                self.elevated_since = None
                clean = True
                self.drained |= sent >= self.settle_from
        own = obs.bitrates[obs.index] if obs.index < len(obs.bitrates) else None
        if (obs.remb_bps is not None and own and self.mode is Mode.PLAYING
                and self._remb_low(now, obs.remb_bps, own)):
            congested = True
            why.append("estimate")
        self.reasons = tuple(dict.fromkeys(why))
        if congested:
            return Verdict.CONGESTED
        if mixed:
            return Verdict.MIXED
        return Verdict.CLEAN if clean else Verdict.NO_NEWS

    def _remb_low(self, now: float, remb: int, own: int) -> bool:
        """The estimate fell below the layer (and has not risen since) for the span. Only a
        fall counts: after a move up the estimate lags what we send for several seconds
        while it ramps (~8 %/s), which is no sign of a queue."""
        previous, self._last_remb = self._last_remb, remb
        if remb >= own * REMB_DOWN_FRACTION or (previous is not None
                                                and remb > previous * REMB_CHANGE):
            self.remb_low_since = None
        elif (self.remb_low_since is None and previous is not None
              and remb * REMB_CHANGE < previous):
            self.remb_low_since = now
        return self.remb_low_since is not None and now - self.remb_low_since >= REMB_LOW_SPAN_S

    def _add_rtt(self, now: float, rtt: float) -> float:
        buckets = self._rtt_buckets
        width = BASE_WINDOW_S / 3
        if buckets and now - buckets[-1][0] < width:
            start, low = buckets[-1]
            if rtt < low:
                buckets[-1] = (start, rtt)
        else:
            buckets.append((now, rtt))
        while buckets and now - buckets[0][0] >= BASE_WINDOW_S:
            buckets.popleft()
        return min(low for _, low in buckets)

