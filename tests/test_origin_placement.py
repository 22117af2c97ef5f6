"""WHIP placement over several origins (issue 13): the pure decision, table-tested."""

from __future__ import annotations

import pytest

from broadcaster.ingest import Decision, decide
from lotcast.ops.node import NodeInfo, NodeState
from lotcast.ops.origins import pick_origin

NOW = 1_000_000
STALE = 1.5


def origin(node_id: str, streams: int = 0, state: NodeState = NodeState.SERVING,
           capacity: int = 10, age_ms: int = 0, cpu: float = 0.0) -> NodeInfo:
    return NodeInfo(node_id=node_id, url=f"http://{node_id}", kind="broadcaster", state=state,
                    viewers=streams, capacity=capacity, cpu=cpu, heartbeat_ms=NOW - age_ms)


def relay(node_id: str) -> NodeInfo:
    return NodeInfo(node_id=node_id, url=f"http://{node_id}", kind="relay", capacity=100,
                    heartbeat_ms=NOW)


A, B = "a", "b"


def where(d: Decision) -> str:
    if d.local:
        return "local" + (f"+takeover:{d.take_over}" if d.take_over else "")
    if d.target is not None:
        return f"307:{d.target.node_id}"
    return str(d.status)


@pytest.mark.parametrize(("nodes", "holder", "draining", "placed", "expected"), [
    # unbound: the least-loaded origin; here when that is us
    ([origin(A, 1), origin(B, 0)], None, False, False, "307:b"),
    ([origin(A, 0), origin(B, 1)], None, False, False, "local"),
    # ties break on CPU, then node id
    ([origin(A, 0, cpu=0.5), origin(B, 0, cpu=0.1)], None, False, False, "307:b"),
    ([origin(A, 0), origin(B, 0)], None, False, False, "local"),
    # another origin already placed it here: never bounced on
    ([origin(A, 3), origin(B, 0)], None, False, True, "local"),
    # bound to a live serving origin: there, whoever asks
    ([origin(A, 0), origin(B, 5)], B, False, False, "307:b"),
    ([origin(A, 0), origin(B, 5)], B, False, True, "307:b"),
    ([origin(A, 0), origin(B, 5)], A, False, False, "local"),
    # bound to a dead (stale or missing) or draining origin: taken over where placement says
    ([origin(A, 0), origin(B, 0, age_ms=5000)], B, False, False, "local+takeover:b"),
    ([origin(A, 0)], B, False, False, "local+takeover:b"),
    ([origin(A, 0), origin(B, 0, state=NodeState.DRAINING)], B, False, True, "local+takeover:b"),
    ([origin(A, 2), origin(B, 0, state=NodeState.DRAINING), origin("c", 1)], B, False, False,
     "307:c"),
    # we drain: anywhere else, or 503
    ([origin(A, 0, state=NodeState.DRAINING), origin(B, 9)], None, True, False, "307:b"),
    ([origin(A, 0, state=NodeState.DRAINING), origin(B, 9)], A, True, True, "307:b"),
    ([origin(A, 0, state=NodeState.DRAINING)], None, True, False, "503"),
    ([origin(A, 0, state=NodeState.DRAINING), origin(B, 10)], None, True, False, "503"),
    # every origin full (ours too): 503; relays never count as origins
    ([origin(A, 10), origin(B, 10), relay("r")], None, False, False, "503"),
    ([origin(A, 10), origin(B, 9), relay("r")], None, False, False, "307:b"),
])
def test_decide(nodes: list[NodeInfo], holder: str | None, draining: bool, placed: bool,
                expected: str) -> None:
    me = next(n for n in nodes if n.node_id == A) if any(n.node_id == A for n in nodes) else None
    has_room = me is None or me.has_room
    assert where(decide(nodes, A, holder, draining, placed, has_room, NOW, STALE)) == expected


def test_pick_origin_skips_stale_draining_full_and_relays() -> None:
    nodes = [origin("x", 0, age_ms=2000), origin("y", 0, state=NodeState.DRAINING),
             origin("z", 10), relay("r"), origin("w", 4)]
    chosen = pick_origin(nodes, NOW, STALE)
    assert chosen is not None and chosen.node_id == "w"
    assert pick_origin(nodes, NOW, STALE, exclude={"w"}) is None
