"""Table tests for the relay's upstream choice (relay/cascade.py `CascadePlanner.plan`), pure."""

from __future__ import annotations

import pytest

from lotcast.ops.node import NodeInfo, NodeState
from lotcast.ops.placement import RelaySelector
from relay.cascade import CascadePlanner, child_headers, verified_child

pytestmark = pytest.mark.timeout(10)

NOW = 1_000_000
ORIGIN = "http://origin:8080"


def relay(node_id: str, viewers: int = 0, capacity: int = 5, depth: int | None = 0,
          state: NodeState = NodeState.SERVING, age_ms: int = 0, cpu: float = 0.1) -> NodeInfo:
    return NodeInfo(node_id=node_id, url=f"http://{node_id}:8081", state=state, viewers=viewers,
                    capacity=capacity, cpu=cpu, streams={} if depth is None else {"s": depth},
                    heartbeat_ms=NOW - age_ms)


def planner(origin_fanout: int = 0, max_depth: int = 2, origin: str = ORIGIN) -> CascadePlanner:
    selector = RelaySelector(stale_after=1.5, cpu_limit=0.9, max_depth=max_depth)
    return CascadePlanner(None, selector, "me", origin, origin_fanout)  # type: ignore[arg-type]


# (case, planner, nodes, exclude, below_depth, expected url host or "origin", expected depth)
CASES: list[tuple[str, CascadePlanner, list[NodeInfo], tuple[str, ...], int | None, str, int]] = [
    ("nobody carries it: origin", planner(), [relay("a", depth=None)], (), None, "origin", 0),
    ("a carrier has room: origin", planner(), [relay("a", 3)], (), None, "origin", 0),
    ("every carrier full: cascade from it", planner(), [relay("a", 5)], (), None, "a", 1),
    ("shallowest full carrier is the parent", planner(),
     [relay("a", 5, depth=1), relay("b", 5, depth=0)], (), None, "b", 1),
    ("depth bound: a depth-2 parent is too deep", planner(max_depth=2),
     [relay("a", 5, depth=2)], (), None, "origin", 0),
    ("max depth 0 means flat", planner(max_depth=0), [relay("a", 5)], (), None, "origin", 0),
    ("draining carriers neither count nor parent", planner(),
     [relay("a", 5, state=NodeState.DRAINING)], (), None, "origin", 0),
    ("stale carriers neither count nor parent", planner(),
     [relay("a", 5, age_ms=1600)], (), None, "origin", 0),
    ("a hot parent is skipped", planner(), [relay("a", 5, cpu=0.95)], (), None, "origin", 0),
    ("origin fan-out reached: cascade although a has room", planner(origin_fanout=1),
     [relay("a", 1)], (), None, "a", 1),
    ("origin fan-out not reached", planner(origin_fanout=2), [relay("a", 1)], (), None,
     "origin", 0),
    ("itself is never its parent", planner(), [relay("me", 5)], (), None, "origin", 0),
    ("re-parent: excluded old parent", planner(),
     [relay("a", 5), relay("b", 5, depth=1)], ("a",), None, "b", 2),
    ("re-parent: only shallower than itself (no loops)", planner(),
     [relay("a", 5, depth=0), relay("b", 5, depth=2)], ("a",), 1, "origin", 0),
    ("static chain: origin_url names a relay", planner(origin="http://a:8081"),
     [relay("a", 0, depth=1)], (), None, "a", 2),
]


@pytest.mark.parametrize(("case", "plan", "nodes", "exclude", "below", "host", "depth"), CASES,
                         ids=[c[0] for c in CASES])
def test_upstream_choice(case: str, plan: CascadePlanner, nodes: list[NodeInfo],
                         exclude: tuple[str, ...], below: int | None, host: str,
                         depth: int) -> None:
    upstream = plan.plan(nodes, "s", NOW, exclude, below)
    if host == "origin":
        assert upstream.url == plan.origin_url and upstream.node_id is None
    else:
        assert upstream.url == f"http://{host}:8081" and upstream.node_id == host
    assert upstream.depth == depth


def test_child_relay_headers_are_signed() -> None:
    headers = child_headers("secret", "relay-3")
    assert verified_child("secret", headers["x-lotcast-relay"],
                          headers["x-lotcast-relay-auth"]) == "relay-3"
    assert verified_child("other", headers["x-lotcast-relay"],
                          headers["x-lotcast-relay-auth"]) is None
    assert verified_child("secret", "relay-4", headers["x-lotcast-relay-auth"]) is None
    assert verified_child("secret", None, None) is None
