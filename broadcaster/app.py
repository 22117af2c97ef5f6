"""The origin node: WHIP ingest from the host, WHEP egress to relays, host console, pages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from starlette.applications import Starlette

from lotcast.auth import TokenAuthority
from lotcast.config import Settings
from lotcast.interactive.service import InteractiveService
from lotcast.media.endpoints import SessionTable, WebRtcEndpoints
from lotcast.media.peer import EgressSession, IngestSession
from lotcast.media.stream import MediaStream, StreamRouter
from lotcast.media.upstream import NotLiveError
from lotcast.node.routes import health_routes, page_routes, stats_route, udp_socket_count
from lotcast.node.telemetry import MediaTelemetry
from lotcast.ops.metrics import NodeMetrics
from lotcast.ops.placement_http import Placer, selector_for


def create_app(settings: Settings) -> Starlette:
    authority = TokenAuthority(settings.jwt_secret)
    router = StreamRouter(grace=settings.stream_grace)
    sessions = SessionTable(settings.session_timeout)

    async def live_stream(stream_id: str) -> MediaStream:
        stream = router.get(stream_id)
        if stream is None or not stream.live:
            raise NotLiveError("no publisher yet", retry_after=2)
        return stream

    metrics = NodeMetrics(settings.node_id, "broadcaster")
    endpoints = WebRtcEndpoints(settings, authority, router, sessions, live_stream,
                                accept_publish=True,
                                on_first_frame=metrics.first_frame_seconds.observe)
    interactive = InteractiveService(settings, authority, "broadcaster")
    interactive.bid_ack_observers.append(metrics.bid_ack_latency_seconds.observe)
    interactive.http.count_observers.append(metrics.room_http_sessions.set)
    # Placement answers here too: a viewer may ask any node where to play.
    redis = aioredis.Redis.from_url(settings.redis_url)
    placer = Placer(redis, selector_for(settings))
    telemetry = MediaTelemetry(
        router, sessions, metrics,
        websockets=lambda: sum(len(hub.sockets) for hub in interactive.hubs.values()),
        udp_sockets=udp_socket_count,
        outbox_drops=lambda: interactive.stats.slow_disconnects)

    def stats() -> dict[str, Any]:
        return {
            "node_id": settings.node_id,
            "kind": "broadcaster",
            "publishers": sessions.count(IngestSession),
            "viewers": sessions.count(EgressSession),
            "streams": [s.counters() for s in router],
        }

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sessions.start()
        await interactive.start()
        try:
            yield
        finally:
            await interactive.close()
            await sessions.close()
            router.close()
            await redis.aclose()

    app = Starlette(
        routes=[*endpoints.routes, *interactive.routes, *page_routes(),
                *health_routes(lambda: None), stats_route(stats),
                placer.route(), telemetry.route()],
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.router = router
    app.state.sessions = sessions
    return app
