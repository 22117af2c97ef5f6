"""The origin node: WHIP ingest from the host, WHEP egress to relays, host console, pages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette

from lotcast.auth import TokenAuthority
from lotcast.config import Settings
from lotcast.interactive.service import InteractiveService
from lotcast.media.endpoints import SessionTable, WebRtcEndpoints
from lotcast.media.peer import EgressSession, IngestSession
from lotcast.media.stream import MediaStream, StreamRouter
from lotcast.media.upstream import NotLiveError
from lotcast.service import health_routes, page_routes, stats_route


def create_app(settings: Settings) -> Starlette:
    authority = TokenAuthority(settings.jwt_secret)
    router = StreamRouter(grace=settings.stream_grace)
    sessions = SessionTable(settings.session_timeout)

    async def live_stream(stream_id: str) -> MediaStream:
        stream = router.get(stream_id)
        if stream is None or not stream.live:
            raise NotLiveError("no publisher yet", retry_after=2)
        return stream

    endpoints = WebRtcEndpoints(settings, authority, router, sessions, live_stream,
                                accept_publish=True)
    interactive = InteractiveService(settings, authority, "broadcaster")

    def stats() -> dict[str, Any]:
        return {
            "node_id": settings.node_id,
            "kind": "broadcaster",
            "publishers": sessions.count(IngestSession),
            "viewers": sessions.count(EgressSession),
            "streams": [
                {"id": s.id, "state": s.state.value,
                 **{f"{k}_packets_in": t.packets_in for k, t in s.tracks.items()},
                 **{f"{k}_packets_sent": t.packets_sent for k, t in s.tracks.items()}}
                for s in router
            ],
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

    app = Starlette(
        routes=[*endpoints.routes, *interactive.routes, *page_routes(),
                *health_routes(lambda: None), stats_route(stats)],
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.router = router
    app.state.sessions = sessions
    return app
