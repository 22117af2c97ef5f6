"""Every Redis key and channel name the platform uses, in one place.

Room-scoped keys share the ``{room}`` hash tag so one room's keys land on one Redis Cluster slot
and a Lua script may touch all of them atomically.
"""

from __future__ import annotations

PREFIX = "lotcast"

# --- Relay registry and placement (lotcast/ops) -------------------------------------------

# Hash of every live node's heartbeat, one key per node, expiring after the TTL.
def node(node_id: str) -> str:
    return f"{PREFIX}:node:{node_id}"


# Sorted set of node ids scored by last heartbeat (ms), for listing without SCAN.
NODES_INDEX = f"{PREFIX}:nodes"

# --- Interactive layer: auction, polls, room events (lotcast/interactive) ------------------
# (owned by the interactive layer; add keys below as functions of the room id)
