"""The automatic simulcast layer of one viewer, from its RTCP feedback (pure).

Down fast: one receiver report with loss >= DOWN_LOSS, or a bandwidth estimate (REMB) below the
current layer's measured bitrate, moves the viewer one layer down at once. Up conservatively:
only after UP_STABLE_S of reports all below UP_LOSS (and an estimate, if any, with headroom for
the layer above), and never within the hold-off after a move down, which doubles (up to
HOLD_MAX_S) each time a move down follows soon after a move up, so a link that cannot carry a
layer stops being offered it: no oscillation.
"""

from __future__ import annotations

from dataclasses import dataclass

DOWN_LOSS = 26  # of 256: ~10 % of packets lost in the report's interval
UP_LOSS = 5  # of 256: ~2 %
UP_STABLE_S = 6.0
HOLD_S = 8.0
HOLD_MAX_S = 64.0
RELAPSE_S = 30.0  # a move down this soon after a move up doubles the hold-off
UP_HEADROOM = 1.3


@dataclass
class LayerChoiceState:
    hold_until: float = 0.0
    hold: float = HOLD_S
    clean_since: float | None = None
    last_up: float = -1e9
    reports_seen: int = 0


def next_layer(state: LayerChoiceState, now: float, current: int, count: int, reports: int,
               fraction_lost: int, remb_bps: int | None,
               bitrates: list[int | None]) -> int:
    """The layer index (0: top) the viewer should be on; ``reports`` counts its receiver
    reports so far (only a new one is news), ``bitrates`` each layer's measured bits/s."""
    if count < 2:
        return current
    fresh = reports != state.reports_seen
    state.reports_seen = reports
    own = bitrates[current] if current < len(bitrates) else None
    too_slow = remb_bps is not None and own is not None and remb_bps < own
    if current < count - 1 and ((fresh and fraction_lost >= DOWN_LOSS) or too_slow):
        if now - state.last_up < RELAPSE_S:
            state.hold = min(state.hold * 2, HOLD_MAX_S)
        state.hold_until = now + state.hold
        state.clean_since = None
        return current + 1
    if fresh:
        if fraction_lost >= UP_LOSS:
            state.clean_since = None
        elif state.clean_since is None:
            state.clean_since = now
    if (current > 0 and now >= state.hold_until and state.clean_since is not None
            and now - state.clean_since >= UP_STABLE_S):
        above = bitrates[current - 1] if current - 1 < len(bitrates) else None
        if remb_bps is None or above is None or remb_bps >= above * UP_HEADROOM:
            state.last_up = now
            state.clean_since = now
            return current - 1
    return current
