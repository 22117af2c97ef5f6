"""Placement over the live registry: which relay a viewer of a stream should use.

Any node (broadcaster or relay) answers `GET /api/streams/{id}/edge` with a 307 to the chosen
relay's WHEP URL (or, for `Accept: application/json`, 200 with the same answer as JSON), or 503 +
Retry-After when no relay can take the viewer. Every answer also lists the serving relays
(`Lotcast-Nodes` header and, in JSON, `nodes`), so a viewer page learns where else it can ask for
placement when its own relay dies; `?peek=1` answers only that list and places nobody. The
choice itself is the pure `lotcast.ops.placement.RelaySelector`; this module only feeds it the
registry snapshot.

Heartbeats lag: a burst of placements from one snapshot would all pick the same "least loaded"
relay. The placer counts the viewers it has sent to each relay since that relay's last heartbeat
and adds them to the snapshot, so consecutive placements spread as the load would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import replace
from urllib.parse import quote

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lotcast.config import Settings
from lotcast.ids import STREAM_ID_RULE, is_valid_stream_id
from lotcast.ops.node import NodeInfo, NodeState
from lotcast.ops.placement import Placement, PlacementDecision, RelaySelector
from lotcast.ops.registry import read_live_nodes

logger = logging.getLogger(__name__)

CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Location, Retry-After, Lotcast-Nodes",
    "Cache-Control": "no-store",
}
FULL_RETRY_AFTER = 2
NODES_HEADER = "Lotcast-Nodes"
# How long a placement counts against a relay if no newer heartbeat arrives (seconds).
PENDING_HORIZON = 10.0
# A placed viewer's WHEP POST reaches the relay a little after the placement: a heartbeat taken
# this soon after a placement may not count that viewer yet, so the placement still counts.
PENDING_LAG_MS = 750


def selector_for(settings: Settings) -> RelaySelector:
    """The selector every node uses: a heartbeat is stale after the registry TTL."""
    return RelaySelector(stale_after=3 * settings.heartbeat_interval,
                         cpu_limit=settings.placement_cpu_limit,
                         max_depth=settings.max_cascade_depth)


def whep_url(node: NodeInfo, stream: str) -> str:
    return f"{node.url.rstrip('/')}/whep/{quote(stream, safe='')}"


class Placer:
    """Places viewers on relays from the registry (shared by relay and broadcaster apps)."""

    def __init__(self, redis: aioredis.Redis, selector: RelaySelector) -> None:
        self.redis = redis
        self.selector = selector
        # node id -> wall-clock ms of placements made here, newest last
        self._pending: dict[str, list[int]] = {}

    async def nodes(self) -> list[NodeInfo]:
        return await read_live_nodes(self.redis)

    def _with_pending(self, nodes: list[NodeInfo], now_ms: int) -> list[NodeInfo]:
        out: list[NodeInfo] = []
        horizon = now_ms - int(PENDING_HORIZON * 1000)
        for node in nodes:
            stamps = [t for t in self._pending.get(node.node_id, []) if t > horizon]
            if stamps:
                self._pending[node.node_id] = stamps
            else:
                self._pending.pop(node.node_id, None)
            extra = sum(1 for t in stamps if t >= node.heartbeat_ms - PENDING_LAG_MS)
            out.append(replace(node, viewers=node.viewers + extra) if extra else node)
        return out

    def serving_urls(self, nodes: list[NodeInfo], now_ms: int) -> list[str]:
        """Base URLs of the relays that are serving now (fresh heartbeat, not draining)."""
        return [n.url.rstrip("/") for n in nodes
                if self.selector.is_live(n, now_ms) and n.state is NodeState.SERVING]

    async def place(self, stream: str, exclude: Collection[str] = (),
                    snapshot: list[NodeInfo] | None = None) -> Placement:
        """A placement decision; a SERVE/ATTACH counts as one pending viewer on that relay."""
        now_ms = int(time.time() * 1000)
        nodes = self._with_pending(await self.nodes() if snapshot is None else snapshot, now_ms)
        placement = self.selector.place(nodes, stream, now_ms, exclude=exclude)
        if placement.relay is not None:
            self._pending.setdefault(placement.relay.node_id, []).append(now_ms)
        return placement

    def route(self) -> Route:
        return Route("/api/streams/{stream}/edge", self.edge, methods=["GET"])

    async def edge(self, request: Request) -> Response:
        stream = str(request.path_params["stream"])
        if not is_valid_stream_id(stream):
            return Response(f"{STREAM_ID_RULE}\n", 400, headers=CORS, media_type="text/plain")
        exclude = {x for x in request.query_params.get("exclude", "").split(",") if x}
        peek = request.query_params.get("peek") in ("1", "true")
        try:
            now_ms = int(time.time() * 1000)
            nodes = await self.nodes()
            serving = self.serving_urls(nodes, now_ms)
            placement = None if peek else await self.place(stream, exclude, nodes)
        except (RedisError, OSError) as exc:
            logger.warning("placement failed: registry unavailable: %r", exc)
            return Response("placement unavailable (registry down)\n", 503,
                            headers={**CORS, "Retry-After": str(FULL_RETRY_AFTER)},
                            media_type="text/plain")
        listed = {**CORS, NODES_HEADER: ", ".join(serving)}
        if placement is None:
            return JSONResponse({"nodes": serving}, headers=listed)
        if placement.decision is PlacementDecision.FULL or placement.relay is None:
            return Response("no relay can take a viewer now\n", 503,
                            headers={**listed, "Retry-After": str(FULL_RETRY_AFTER)},
                            media_type="text/plain")
        target = whep_url(placement.relay, stream)
        body = {
            "whep_url": target,
            "relay": placement.relay.url,
            "node_id": placement.relay.node_id,
            "decision": placement.decision.value,
            "depth": placement.depth,
            "upstream": placement.upstream.node_id if placement.upstream else None,
            "nodes": serving,
        }
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse(body, headers=listed)
        return JSONResponse(body, status_code=307, headers={**listed, "Location": target})
