"""The Python room client's state keeps reading past events it has no rules for (chat,
moderation, giveaways): a client written before them must not lose its reader."""

from __future__ import annotations

from lotcast.interactive.client import RoomState


def test_events_without_a_lot_are_kept_and_do_not_stop_the_state() -> None:
    state = RoomState()
    state.apply({"type": "snapshot", "epoch": "e1", "offset": 0, "lots": [
        {"lot": "L1", "status": "open", "price": 100}], "polls": [], "viewers": 1})
    state.apply({"type": "events", "epoch": "e1", "events": [
        {"type": "chat", "offset": 1, "id": "m1", "user": "u", "text": "hi", "ts": 1},
        {"type": "giveaway_opened", "offset": 2, "giveaway": "G1", "ts": 2},
        {"type": "lot_unsold", "offset": 3, "lot": "L1", "reason": "no_bids", "ts": 3},
    ]})
    assert state.offset == 3
    assert [e["type"] for e in state.applied] == ["chat", "giveaway_opened", "lot_unsold"]
    assert state.lots["L1"]["status"] == "unsold"
