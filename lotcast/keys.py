"""Every Redis key and channel name the platform uses, in one place.

Room-scoped keys share the ``{room}`` hash tag so one room's keys land on one Redis Cluster slot
and a Lua script may touch all of them atomically. Every key that is not per room (registry,
placement, stream -> origin, the settle index) carries the one shared tag ``{global}``, so a
transaction over several of them is single-slot too (tests/test_redis_cluster.py checks both).
"""

from __future__ import annotations

PREFIX = "lotcast"

# Hash tag of every key that is not per room: one slot (one shard) holds them all.
GLOBAL = f"{PREFIX}:{{global}}"

# --- Relay registry and placement (lotcast/ops) -------------------------------------------

# Hash of every live node's heartbeat, one key per node, expiring after the TTL.
def node(node_id: str) -> str:
    return f"{GLOBAL}:node:{node_id}"


# Hash of a multi-worker node's per-worker heartbeats: field ``w<i>`` -> JSON of that worker's
# NodeInfo fields. `node(node_id)` then holds their sum (lotcast/ops/registry.py).
def node_workers(node_id: str) -> str:
    return f"{GLOBAL}:node-workers:{node_id}"


# Sorted set of node ids scored by last heartbeat (ms), for listing without SCAN.
NODES_INDEX = f"{GLOBAL}:nodes"


def stream_origin(stream: str) -> str:
    """String: node id of the origin (broadcaster) that holds the stream's publisher."""
    return f"{GLOBAL}:stream-origin:{stream}"

# --- Interactive layer: auction, polls, room events (lotcast/interactive) ------------------
# (owned by the interactive layer; add keys below as functions of the room id)

# Every room key starts with room_prefix(room); the Lua library (lotcast/interactive/lua) derives
# the same names from that prefix, so keep the suffixes below and the Lua in step.


def room_prefix(room: str) -> str:
    return f"{PREFIX}:{{{room}}}:"


def room_seq(room: str) -> str:
    """INCR counter: the offset of the room's newest log event."""
    return room_prefix(room) + "seq"


def room_epoch(room: str) -> str:
    """Opaque string naming this incarnation of the room log."""
    return room_prefix(room) + "epoch"


def room_log(room: str) -> str:
    """Redis Stream of log events; entry id ``0-<offset>``, field ``e`` = msgpack event."""
    return room_prefix(room) + "log"


def room_channel(room: str) -> str:
    """Pub/sub channel: ``<epoch>|<msgpack>`` for log events and ephemeral tallies."""
    return room_prefix(room) + "ch"


def room_ids(room: str) -> str:
    """Hash of id counters (fields ``lot``, ``poll``)."""
    return room_prefix(room) + "ids"


def room_lots(room: str) -> str:
    """List of lot ids in creation order."""
    return room_prefix(room) + "lots"


def room_open_lots(room: str) -> str:
    """Sorted set: open lot id scored by its end time (ms)."""
    return room_prefix(room) + "open_lots"


def lot(room: str, lot_id: str) -> str:
    return room_prefix(room) + f"lot:{lot_id}"


def lot_idempotency(room: str, lot_id: str) -> str:
    """Hash ``<user>|<key>`` -> stored bid result."""
    return room_prefix(room) + f"idem:{lot_id}"


def room_polls(room: str) -> str:
    return room_prefix(room) + "polls"


def room_open_polls(room: str) -> str:
    return room_prefix(room) + "open_polls"


def poll(room: str, poll_id: str) -> str:
    """Hash with the poll definition and counts ``c0``..``c5``."""
    return room_prefix(room) + f"poll:{poll_id}"


def poll_voters(room: str, poll_id: str) -> str:
    """Hash user id -> option: one vote per user."""
    return poll(room, poll_id) + ":voters"


def rate_bucket(room: str, action: str, user_id: str) -> str:
    """Token bucket of one user's ``bid`` / ``vote`` / ``chat`` / ``upvote`` actions in a room."""
    return room_prefix(room) + f"rl:{action}:{user_id}"


# --- chat, moderation, Q&A (lua/moderation.lua, lua/chat.lua) ---


def room_members(room: str) -> str:
    """Hash user id -> token role last seen in the room (a moderation target's role)."""
    return room_prefix(room) + "members"


def room_moderators(room: str) -> str:
    """Hash user id -> ``granted`` | ``revoked``: the host's moderator grants in this room."""
    return room_prefix(room) + "mods"


def room_token_moderators(room: str) -> str:
    """Set of users seen in the room with a ``moderator`` token."""
    return room_prefix(room) + "token_mods"


def room_muted(room: str) -> str:
    """Hash user id -> muted until (ms, server clock)."""
    return room_prefix(room) + "muted"


def room_banned(room: str) -> str:
    """Set of banned user ids."""
    return room_prefix(room) + "banned"


def chat_conf(room: str) -> str:
    """Hash: ``slow_s`` (slow mode seconds), ``words`` / ``norm`` (blocked words, msgpack)."""
    return room_prefix(room) + "chat_conf"


def chat_ids(room: str) -> str:
    """List of the newest chat message ids (oldest first)."""
    return room_prefix(room) + "chat"


def chat_messages(room: str) -> str:
    """Hash message id -> msgpack message (the `chat` event, plus ``question``)."""
    return room_prefix(room) + "chat_msgs"


def chat_deleted(room: str) -> str:
    """Sorted set: deleted message id scored by its `chat` event's offset (replay redaction)."""
    return room_prefix(room) + "chat_deleted"


def chat_last(room: str) -> str:
    """Hash user id -> ms of their last chat message (slow mode)."""
    return room_prefix(room) + "chat_last"


def questions(room: str) -> str:
    """Hash question id (= message id) -> msgpack question."""
    return room_prefix(room) + "questions"


def open_questions(room: str) -> str:
    """Sorted set: open question id scored by its upvotes."""
    return room_prefix(room) + "q_open"


def question_voters(room: str, question_id: str) -> str:
    """Set of user ids that upvoted the question (one upvote per user)."""
    return room_prefix(room) + f"qv:{question_id}"


# --- end chat, moderation, Q&A ---


def room_viewers(room: str) -> str:
    """Hash node id -> ``<sockets>:<updated ms>``; summed over fresh entries."""
    return room_prefix(room) + "viewers"


# --- reactions, giveaways, pre-bids (issue 10) -------------------------------------------

def lot_prebids(room: str, lot_id: str) -> str:
    """Hash user id -> msgpack {max, name}: each user's pre-bid on a draft lot."""
    return room_prefix(room) + f"prebids:{lot_id}"


def lot_prebid_order(room: str, lot_id: str) -> str:
    """Sorted set user id scored by the receipt sequence of their current pre-bid."""
    return room_prefix(room) + f"prebid_order:{lot_id}"


def room_reactions(room: str) -> str:
    """Hash reaction name -> cumulative count for the room."""
    return room_prefix(room) + "reactions"


def room_giveaways(room: str) -> str:
    """List of giveaway ids in creation order (the last one is the current giveaway)."""
    return room_prefix(room) + "giveaways"


def giveaway(room: str, giveaway_id: str) -> str:
    """Hash: id, item, status, seed (secret until drawn), commitment, and the draw's record."""
    return room_prefix(room) + f"giveaway:{giveaway_id}"


def giveaway_entries(room: str, giveaway_id: str) -> str:
    """Hash user id -> display name: one entry per user."""
    return giveaway(room, giveaway_id) + ":entries"


def giveaway_eligible(room: str, giveaway_id: str) -> str:
    """Sorted set (all scores 0, so byte-ordered) of the entrants eligible at the draw."""
    return giveaway(room, giveaway_id) + ":eligible"


def room_online(room: str, node_id: str) -> str:
    """Set of user ids with at least one open session of the room on that node; trusted only
    while the node's room_viewers entry is fresh (a crashed node's set is ignored)."""
    return room_prefix(room) + f"online:{node_id}"


def room_lib(room: str) -> str:
    """String: the Function library version that owns the room (rolling upgrades)."""
    return room_prefix(room) + "lib"


def room_due(room: str) -> str:
    """String: the room's next lot/poll deadline (ms); absent when nothing is open. Written only
    by the room Functions (touch_active in lua/common.lua), in the room's slot."""
    return room_prefix(room) + "due"


# Sorted set of rooms with open lots/polls, scored by (a lower bound of) their next deadline (ms):
# the settle loop's work list. It is in the {global} slot, so the room Functions cannot write it
# (a Function touches one slot); the node that opens a lot or poll adds the room with `ZADD LT`
# from the room's `due` key, and the settle loop sets the exact score after each settle
# (lotcast/interactive/deadlines.py). A score too low only costs one early settle call.
ACTIVE_ROOMS = f"{GLOBAL}:interactive:active_rooms"
# Where ACTIVE_ROOMS lived before the {global} tag (a non-cluster Redis may still hold it).
LEGACY_ACTIVE_ROOMS = f"{PREFIX}:interactive:active_rooms"

# Names of the Redis Function libraries. Every function is registered as ``<library>_<name>``,
# so two versions can be loaded side by side during a rolling upgrade; bump the version when the
# Lua or its calling convention changes (docs/operations.md, "Redis Cluster").
# A room belongs to the version that last wrote it while idle (`room_lib`, lua/common.lua).
FUNCTION_VERSION = "2"
FUNCTION_LIBRARY = f"lotcast_v{FUNCTION_VERSION}"
SHOW_FUNCTION_LIBRARY = f"lotcast_show_v{FUNCTION_VERSION}"


# --- Several origins (issue 13, broadcaster/notices.py; stream_origin is above) --------------
# Pub/sub channel: a draining origin asks the host page of a stream (whose room socket may be on
# any origin) to publish elsewhere: msgpack {"stream": ..., "whip_url": ...}.
ORIGIN_NOTICES = f"{GLOBAL}:origin-notices"
