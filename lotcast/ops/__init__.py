"""Scale-out and operations: node registry, relay placement, metrics, autoscaling model.

Imports nothing from lotcast.media or lotcast.interactive (nor aiortc): the relay app wires
these pieces to the media path.
"""

from lotcast.ops.metrics import LOAD_RATIO_METRIC, EgressRate, NodeMetrics
from lotcast.ops.node import InvalidStateError, NodeInfo, NodeKind, NodeLoad, NodeState
from lotcast.ops.placement import (
    Placement,
    PlacementDecision,
    RelaySelector,
    SelectionPolicy,
)
from lotcast.ops.registry import (
    NodeRegistry,
    place_viewer,
    process_cpu_probe,
    read_live_nodes,
)

__all__ = [
    "LOAD_RATIO_METRIC",
    "EgressRate",
    "InvalidStateError",
    "NodeInfo",
    "NodeKind",
    "NodeLoad",
    "NodeMetrics",
    "NodeRegistry",
    "NodeState",
    "Placement",
    "PlacementDecision",
    "RelaySelector",
    "SelectionPolicy",
    "place_viewer",
    "process_cpu_probe",
    "read_live_nodes",
]
