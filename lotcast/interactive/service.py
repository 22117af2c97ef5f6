"""The interactive layer as one component a node mounts: WebSocket route plus its lifecycle."""

from __future__ import annotations

from typing import Literal

from starlette.routing import BaseRoute

from lotcast.auth import TokenAuthority
from lotcast.config import Settings

NodeKind = Literal["broadcaster", "relay"]


class InteractiveService:
    """Owns the node's Redis connection for bids/polls, its RoomHub and the `/ws/{room}` route."""

    def __init__(self, settings: Settings, authority: TokenAuthority, node_kind: NodeKind) -> None:
        self.settings = settings
        self.authority = authority
        self.node_kind = node_kind

    @property
    def routes(self) -> list[BaseRoute]:
        return []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass
