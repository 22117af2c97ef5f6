"""Relay placement: a pure selector over registry snapshots (no I/O, no clock, no global RNG).

A viewer asks any node for a stream. The node reads the live nodes from the `NodeRegistry` and asks
`RelaySelector.place()`:

- `PlacementDecision.SERVE`: a serving relay that already carries the stream has room; redirect
  (307) the viewer to `placement.relay.url`.
- `PlacementDecision.ATTACH`: every relay carrying the stream is full (or none carries it). Another
  relay with room should start pulling the stream from `placement.upstream` (a relay, or the origin
  when `upstream is None`) at tree depth `placement.depth`, and the viewer goes there (cascade).
- `PlacementDecision.FULL`: nothing can take the viewer; answer 503 + Retry-After.

Eligible relays are relays in state SERVING whose heartbeat is fresh, below capacity and below the
CPU limit. Ties always break the same way (load, CPU, node id), so table tests are exact.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from lotcast.ops.node import NodeInfo, NodeState


class SelectionPolicy(enum.Enum):
    # The relay with the lowest viewers/capacity.
    LEAST_LOADED = "least_loaded"
    # Two random eligible relays, keep the less loaded: spreads a burst of simultaneous placements
    # made from slightly stale snapshots instead of sending all of them to one relay.
    TWO_CHOICES = "two_choices"


class PlacementDecision(enum.Enum):
    SERVE = "serve"
    ATTACH = "attach"
    FULL = "full"


@dataclass(frozen=True)
class Placement:
    decision: PlacementDecision
    # The relay the viewer goes to (None when FULL).
    relay: NodeInfo | None = None
    # ATTACH only: where the relay pulls the stream from; None means the origin.
    upstream: NodeInfo | None = None
    # The relay's depth in the stream's tree (0 = pulls from the origin).
    depth: int = 0


def load_key(node: NodeInfo) -> tuple[float, float, str]:
    """Sort key: less loaded first, then less CPU, then node id (deterministic ties)."""
    return (node.load_ratio, node.cpu, node.node_id)


@dataclass(frozen=True)
class RelaySelector:
    """Picks the relay a viewer should use.

    stale_after: seconds after which a heartbeat no longer counts (use the registry TTL).
    cpu_limit: a relay at or above this CPU load (fraction of one core) takes no new viewers.
    max_depth: the deepest tree level a cascade may create (0 = every relay pulls from origin).
    """

    stale_after: float
    cpu_limit: float = 0.9
    policy: SelectionPolicy = SelectionPolicy.LEAST_LOADED
    max_depth: int = 2

    def is_live(self, node: NodeInfo, now_ms: int) -> bool:
        """A relay whose heartbeat is fresh (any state)."""
        return node.kind == "relay" and now_ms - node.heartbeat_ms <= self.stale_after * 1000

    def is_eligible(self, node: NodeInfo, now_ms: int) -> bool:
        """A relay that may take one more viewer right now."""
        return (
            self.is_live(node, now_ms)
            and node.state is NodeState.SERVING
            and node.has_room
            and node.cpu < self.cpu_limit
        )

    def eligible(
        self, nodes: Iterable[NodeInfo], now_ms: int, exclude: Collection[str] = ()
    ) -> list[NodeInfo]:
        return sorted(
            (n for n in nodes if n.node_id not in exclude and self.is_eligible(n, now_ms)),
            key=load_key,
        )

    def choose(self, candidates: list[NodeInfo], rng: random.Random | None = None) -> NodeInfo:
        """One of `candidates` (non-empty, sorted by `load_key`) according to the policy."""
        if not candidates:
            raise ValueError("choose() needs at least one candidate")
        if self.policy is SelectionPolicy.LEAST_LOADED or len(candidates) == 1:
            return candidates[0]
        pick = (rng or random.Random()).sample(candidates, 2)
        return min(pick, key=load_key)

    def place(
        self,
        nodes: Iterable[NodeInfo],
        stream: str,
        now_ms: int,
        exclude: Collection[str] = (),
        rng: random.Random | None = None,
    ) -> Placement:
        """Where a new viewer of `stream` goes. `exclude` lists node ids the viewer just left
        (re-placement after a failure or a drain)."""
        snapshot = list(nodes)
        candidates = self.eligible(snapshot, now_ms, exclude)
        carrying = [n for n in candidates if n.carries(stream)]
        if carrying:
            relay = self.choose(carrying, rng)
            return Placement(PlacementDecision.SERVE, relay, depth=relay.streams[stream])
        if not candidates:
            return Placement(PlacementDecision.FULL)
        upstream = self.pick_upstream(snapshot, stream, now_ms, exclude)
        depth = 0 if upstream is None else upstream.streams[stream] + 1
        return Placement(PlacementDecision.ATTACH, self.choose(candidates, rng), upstream, depth)

    def pick_upstream(
        self, nodes: Iterable[NodeInfo], stream: str, now_ms: int, exclude: Collection[str] = ()
    ) -> NodeInfo | None:
        """The relay a new cascade child should pull `stream` from, or None for the origin.

        A parent must be live, serving (a draining relay is about to go away), below the CPU
        limit and shallow enough that the child stays within `max_depth`. Prefer the shallowest
        parent (fewest hops, least added latency), then the least loaded. Viewer capacity does
        not matter: a child costs its parent one outgoing copy.
        """
        parents = [
            n
            for n in nodes
            if n.node_id not in exclude
            and self.is_live(n, now_ms)
            and n.state is NodeState.SERVING
            and n.cpu < self.cpu_limit
            and n.carries(stream)
            and n.streams[stream] < self.max_depth
        ]
        if not parents:
            return None
        return min(parents, key=lambda n: (n.streams[stream], *load_key(n)))
