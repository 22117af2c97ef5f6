"""The stores of issue 10 (reactions, giveaways, pre-bids and re-runs) and room presence, built
once per node from the room library's Redis connection."""

from __future__ import annotations

from dataclasses import dataclass

from lotcast.interactive.functions import RoomFunctions
from lotcast.interactive.giveaway import GiveawayStore
from lotcast.interactive.lotextras import LotExtrasStore
from lotcast.interactive.presence import RoomPresence
from lotcast.interactive.reactions import REACTION_LIMIT, ReactionStore
from lotcast.interactive.showlib import ShowFunctions
from lotcast.interactive.store import RateLimit

# A node's room_viewers stamp older than this means the node (and its online set) is gone;
# the same freshness the viewer count uses (service.VIEWERS_FRESH_MS).
PRESENCE_FRESH_MS = 5000


@dataclass(frozen=True)
class ShowStores:
    reactions: ReactionStore
    giveaways: GiveawayStore
    lots: LotExtrasStore
    presence: RoomPresence

    @classmethod
    def build(cls, functions: RoomFunctions, bid_limit: RateLimit, node_id: str,
              reaction_limit: RateLimit = REACTION_LIMIT,
              show: ShowFunctions | None = None) -> ShowStores:
        show = show if show is not None else ShowFunctions(functions.redis, functions.history)
        return cls(reactions=ReactionStore(show, reaction_limit),
                   giveaways=GiveawayStore(show, PRESENCE_FRESH_MS),
                   lots=LotExtrasStore(functions, bid_limit),
                   presence=RoomPresence(functions.redis, node_id))
