"""Table tests for the pure relay selector (no Redis, no clock)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lotcast.ops.node import NodeInfo, NodeState
from lotcast.ops.placement import (
    Placement,
    PlacementDecision,
    RelaySelector,
    SelectionPolicy,
)

pytestmark = pytest.mark.timeout(10)

NOW = 1_000_000
SERVE, ATTACH, FULL = PlacementDecision.SERVE, PlacementDecision.ATTACH, PlacementDecision.FULL


def relay(
    node_id: str,
    viewers: int = 0,
    capacity: int = 10,
    state: NodeState = NodeState.SERVING,
    cpu: float = 0.1,
    age_ms: int = 0,
    streams: dict[str, int] | None = None,
    kind: str = "relay",
) -> NodeInfo:
    return NodeInfo(
        node_id=node_id,
        url=f"http://{node_id}:8080",
        kind="relay" if kind == "relay" else "broadcaster",
        state=state,
        viewers=viewers,
        capacity=capacity,
        cpu=cpu,
        streams={"s": 0} if streams is None else streams,
        heartbeat_ms=NOW - age_ms,
    )


SELECTOR = RelaySelector(stale_after=3.0, cpu_limit=0.9, max_depth=2)

# (case, nodes, exclude, expected decision, expected relay id, expected upstream id, depth)
CASES: list[tuple[str, list[NodeInfo], tuple[str, ...], PlacementDecision, str | None,
                  str | None, int]] = [
    ("no nodes at all", [], (), FULL, None, None, 0),
    ("least loaded wins", [relay("a", 5), relay("b", 2), relay("c", 7)], (), SERVE, "b", None, 0),
    ("ratio not count", [relay("a", 5, 100), relay("b", 2, 4)], (), SERVE, "a", None, 0),
    ("tie breaks on cpu", [relay("a", 3, cpu=0.5), relay("b", 3, cpu=0.2)], (), SERVE, "b",
     None, 0),
    ("tie breaks on id", [relay("b", 3), relay("a", 3)], (), SERVE, "a", None, 0),
    ("skips draining", [relay("a", 0, state=NodeState.DRAINING), relay("b", 8)], (), SERVE, "b",
     None, 0),
    ("skips stale", [relay("a", 0, age_ms=3001), relay("b", 8)], (), SERVE, "b", None, 0),
    ("fresh at the limit", [relay("a", 0, age_ms=3000), relay("b", 8)], (), SERVE, "a", None, 0),
    ("skips full", [relay("a", 10), relay("b", 9)], (), SERVE, "b", None, 0),
    ("skips zero capacity", [relay("a", 0, 0), relay("b", 9)], (), SERVE, "b", None, 0),
    ("skips hot cpu", [relay("a", 0, cpu=0.95), relay("b", 9)], (), SERVE, "b", None, 0),
    ("skips broadcaster", [relay("o", 0, kind="broadcaster"), relay("b", 9)], (), SERVE, "b",
     None, 0),
    ("skips excluded", [relay("a", 0), relay("b", 9)], ("a",), SERVE, "b", None, 0),
    ("serves at depth", [relay("a", 1, streams={"s": 1})], (), SERVE, "a", None, 1),
    ("carrier preferred over idle", [relay("a", 9), relay("idle", 0, streams={})], (), SERVE,
     "a", None, 0),
    ("all full, nothing else", [relay("a", 10), relay("b", 10)], (), FULL, None, None, 0),
    ("all draining", [relay("a", 0, state=NodeState.DRAINING)], (), FULL, None, None, 0),
    ("nobody carries: attach to origin", [relay("a", 3, streams={}), relay("b", 1, streams={})],
     (), ATTACH, "b", None, 0),
    ("carriers full: cascade from carrier",
     [relay("a", 10, streams={"s": 0}), relay("b", 2, streams={})], (), ATTACH, "b", "a", 1),
    ("cascade prefers shallow parent",
     [relay("deep", 10, streams={"s": 1}), relay("top", 10, cpu=0.5, streams={"s": 0}),
      relay("new", 0, streams={})], (), ATTACH, "new", "top", 1),
    ("cascade parent among equals: least cpu",
     [relay("p1", 10, cpu=0.5, streams={"s": 0}), relay("p2", 10, cpu=0.2, streams={"s": 0}),
      relay("new", 0, streams={})], (), ATTACH, "new", "p2", 1),
    ("depth bound: parent at max depth is skipped -> origin",
     [relay("d2", 10, streams={"s": 2}), relay("new", 0, streams={})], (), ATTACH, "new", None,
     0),
    ("draining carrier is no parent",
     [relay("a", 10, state=NodeState.DRAINING), relay("new", 0, streams={})], (), ATTACH, "new",
     None, 0),
    ("stale carrier is no parent",
     [relay("a", 10, age_ms=9000), relay("new", 0, streams={})], (), ATTACH, "new", None, 0),
    ("excluded carrier is no parent",
     [relay("a", 10), relay("new", 0, streams={})], ("a",), ATTACH, "new", None, 0),
    ("hot carrier is no parent",
     [relay("a", 10, cpu=0.99), relay("new", 0, streams={})], (), ATTACH, "new", None, 0),
    ("other streams do not count",
     [relay("a", 0, streams={"other": 0}), relay("b", 5)], (), SERVE, "b", None, 0),
]


@pytest.mark.parametrize(
    ("nodes", "exclude", "decision", "relay_id", "upstream_id", "depth"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_least_loaded_table(
    nodes: list[NodeInfo],
    exclude: tuple[str, ...],
    decision: PlacementDecision,
    relay_id: str | None,
    upstream_id: str | None,
    depth: int,
) -> None:
    placement = SELECTOR.place(nodes, "s", NOW, exclude=exclude)
    assert placement.decision is decision
    assert (placement.relay.node_id if placement.relay else None) == relay_id
    assert (placement.upstream.node_id if placement.upstream else None) == upstream_id
    assert placement.depth == depth


def test_full_has_no_relay() -> None:
    assert SELECTOR.place([relay("a", 10)], "s", NOW) == Placement(PlacementDecision.FULL)


def test_input_order_does_not_matter() -> None:
    nodes = [relay(f"n{i}", viewers=i % 4) for i in range(12)]
    rng = random.Random(7)
    first = SELECTOR.place(nodes, "s", NOW)
    for _ in range(20):
        rng.shuffle(nodes)
        assert SELECTOR.place(nodes, "s", NOW) == first


def test_two_choices_never_picks_the_most_loaded_and_spreads() -> None:
    selector = RelaySelector(stale_after=3.0, policy=SelectionPolicy.TWO_CHOICES)
    nodes = [relay("a", 1), relay("b", 2), relay("c", 3), relay("d", 4)]
    rng = random.Random(42)
    picks = Counter(
        p.relay.node_id
        for p in (selector.place(nodes, "s", NOW, rng=rng) for _ in range(2000))
        if p.relay is not None
    )
    assert "d" not in picks  # the most loaded loses every pairing
    assert set(picks) == {"a", "b", "c"}
    # P(a) = 1/2, P(b) = 1/3, P(c) = 1/6 for two distinct samples out of four.
    assert picks["a"] > picks["b"] > picks["c"]


def test_two_choices_single_candidate_and_seeded() -> None:
    selector = RelaySelector(stale_after=3.0, policy=SelectionPolicy.TWO_CHOICES)
    only = [relay("a", 9), relay("b", 10)]
    assert selector.place(only, "s", NOW).relay == only[0]
    nodes = [relay(f"n{i}", viewers=i) for i in range(6)]
    a = [selector.place(nodes, "s", NOW, rng=random.Random(3)).relay for _ in range(5)]
    assert len({n.node_id for n in a if n}) == 1  # same seed, same answer


def test_choose_needs_candidates() -> None:
    with pytest.raises(ValueError):
        SELECTOR.choose([])


def test_load_ratio_and_room() -> None:
    assert relay("a", 5, 10).load_ratio == 0.5
    assert relay("a", 0, 0).load_ratio == float("inf")
    assert not relay("a", 10, 10).has_room


def test_ops_package_imports_no_media_or_interactive_layer() -> None:
    import subprocess
    import sys

    code = (
        "import sys, lotcast.ops, lotcast.ops.hpa_sim\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('aiortc', 'aioice', 'av')"
        " or m.startswith(('lotcast.media', 'lotcast.interactive'))]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
