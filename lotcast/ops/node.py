"""What the registry knows about one node: its state and its load, as published in a heartbeat.

Pure data and its Redis hash encoding; no I/O. The registry writes `NodeInfo.to_fields()` and the
placement selector reads `NodeInfo.from_fields()` back.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

NodeKind = Literal["broadcaster", "relay"]


class NodeState(enum.Enum):
    """Lifecycle of a node in the registry.

    Only SERVING and DRAINING are ever published; STARTING and STOPPED are local states of a
    `NodeRegistry` before its first and after its last heartbeat.
    """

    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


class InvalidStateError(RuntimeError):
    pass


@dataclass(frozen=True)
class NodeLoad:
    """What a node reports about itself at each heartbeat (the relay app fills this in).

    `streams` maps each stream the node carries to its depth in the distribution tree:
    0 when it pulls from the origin, 1 when it pulls from a depth-0 relay, and so on.
    """

    viewers: int = 0
    egress_bps: float = 0.0
    streams: Mapping[str, int] = field(default_factory=dict)
    # WebSocket connections (bidders/watchers) held by the node.
    sockets: int = 0


@dataclass(frozen=True)
class NodeInfo:
    """One node's last heartbeat as read from the registry."""

    node_id: str
    url: str
    kind: NodeKind = "relay"
    state: NodeState = NodeState.SERVING
    viewers: int = 0
    capacity: int = 0
    # CPU load of the node process: fraction of one core (1.0 = one core fully busy); of a
    # multi-worker node, the mean over its workers (each one process, one core at most).
    cpu: float = 0.0
    egress_bps: float = 0.0
    streams: Mapping[str, int] = field(default_factory=dict)
    sockets: int = 0
    # Wall-clock milliseconds of the heartbeat and of the node's start.
    heartbeat_ms: int = 0
    started_ms: int = 0

    @property
    def load_ratio(self) -> float:
        """viewers / capacity; a node without capacity counts as full."""
        if self.capacity <= 0:
            return float("inf")
        return self.viewers / self.capacity

    @property
    def has_room(self) -> bool:
        return self.viewers < self.capacity

    def carries(self, stream: str) -> bool:
        return stream in self.streams

    def depth_of(self, stream: str) -> int | None:
        return self.streams.get(stream)

    def to_fields(self) -> dict[str, str]:
        return {
            "node_id": self.node_id,
            "url": self.url,
            "kind": self.kind,
            "state": self.state.value,
            "viewers": str(self.viewers),
            "capacity": str(self.capacity),
            "cpu": f"{self.cpu:.4f}",
            "egress_bps": f"{self.egress_bps:.1f}",
            "streams": json.dumps(dict(self.streams), sort_keys=True),
            "sockets": str(self.sockets),
            "heartbeat_ms": str(self.heartbeat_ms),
            "started_ms": str(self.started_ms),
        }

    @classmethod
    def from_fields(cls, raw: Mapping[bytes, bytes] | Mapping[str, str]) -> NodeInfo:
        """Decode a heartbeat hash; raises ValueError on a malformed one."""
        f = {_text(k): _text(v) for k, v in raw.items()}
        try:
            kind = f.get("kind", "relay")
            if kind not in ("broadcaster", "relay"):
                raise ValueError(f"unknown node kind {kind!r}")
            streams_raw = json.loads(f.get("streams", "{}"))
            if not isinstance(streams_raw, dict):
                raise ValueError("streams is not a JSON object")
            return cls(
                node_id=f["node_id"],
                url=f["url"],
                kind="relay" if kind == "relay" else "broadcaster",
                state=NodeState(f["state"]),
                viewers=int(f.get("viewers", "0")),
                capacity=int(f.get("capacity", "0")),
                cpu=float(f.get("cpu", "0")),
                egress_bps=float(f.get("egress_bps", "0")),
                streams={str(k): int(v) for k, v in streams_raw.items()},
                sockets=int(f.get("sockets", "0")),
                heartbeat_ms=int(f.get("heartbeat_ms", "0")),
                started_ms=int(f.get("started_ms", "0")),
            )
        except KeyError as exc:
            raise ValueError(f"heartbeat is missing field {exc.args[0]!r}") from exc


def combine_workers(node_id: str, url: str, parts: Sequence[NodeInfo]) -> NodeInfo:
    """One node as placement sees it, from the heartbeats of its workers (non-empty): viewers,
    capacity, egress and sockets summed; CPU the mean; DRAINING as soon as one worker drains
    (drain is node-wide); each stream at its deepest worker's depth (a cascade child of this
    node may land on any worker, and must stay within the depth limit from each)."""
    if not parts:
        raise ValueError("combine_workers() needs at least one worker heartbeat")
    streams: dict[str, int] = {}
    for part in parts:
        for stream, depth in part.streams.items():
            streams[stream] = max(depth, streams.get(stream, depth))
    draining = any(p.state is NodeState.DRAINING for p in parts)
    return NodeInfo(
        node_id=node_id,
        url=url,
        kind=parts[0].kind,
        state=NodeState.DRAINING if draining else NodeState.SERVING,
        viewers=sum(p.viewers for p in parts),
        capacity=sum(p.capacity for p in parts),
        cpu=sum(p.cpu for p in parts) / len(parts),
        egress_bps=sum(p.egress_bps for p in parts),
        streams=streams,
        sockets=sum(p.sockets for p in parts),
        heartbeat_ms=max(p.heartbeat_ms for p in parts),
        started_ms=min(p.started_ms for p in parts),
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
