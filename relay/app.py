"""The relay node: pulls streams over WHEP and forwards them to WHEP viewers; viewer WebSocket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette

from lotcast.auth import TokenAuthority
from lotcast.config import Settings
from lotcast.interactive.service import InteractiveService
from lotcast.media.endpoints import SessionTable, WebRtcEndpoints
from lotcast.media.peer import EgressSession, PeerSession
from lotcast.media.stream import StreamRouter
from lotcast.service import health_routes, page_routes, stats_route
from relay.upstreams import RelayUpstreams


def create_app(settings: Settings) -> Starlette:
    authority = TokenAuthority(settings.jwt_secret)
    router = StreamRouter(grace=settings.stream_grace)
    upstreams: RelayUpstreams | None = None

    def session_closed(session: PeerSession) -> None:
        if upstreams is not None and isinstance(session, EgressSession):
            upstreams.viewer_left(session)

    sessions = SessionTable(settings.session_timeout, on_closed=session_closed)
    upstreams = RelayUpstreams(router, sessions, settings.origin_url,
                               retry_window=settings.stream_grace)

    def accepting_viewers() -> str | None:
        if sessions.count(EgressSession) >= settings.max_viewers:
            return f"relay at capacity ({settings.max_viewers} viewers)"
        return None

    endpoints = WebRtcEndpoints(settings, authority, router, sessions, upstreams.acquire,
                                accept_publish=False, accepting_viewers=accepting_viewers)
    interactive = InteractiveService(settings, authority, "relay")

    def stats() -> dict[str, Any]:
        return {
            "node_id": settings.node_id,
            "kind": "relay",
            "viewers": sessions.count(EgressSession),
            "sessions": sessions.count(),
            "upstreams": [{"stream": p.stream.id, "state": p.state.value} for p in upstreams.pulls()],
            "streams": [
                {"id": s.id, "state": s.state.value,
                 **{f"{k}_packets_in": t.packets_in for k, t in s.tracks.items()},
                 **{f"{k}_packets_sent": t.packets_sent for k, t in s.tracks.items()},
                 **{f"{k}_nacks_served": t.nack_packets_served for k, t in s.tracks.items()},
                 **{f"{k}_keyframe_requests": t.keyframe_requests_sent for k, t in s.tracks.items()}}
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
            await upstreams.close()

    app = Starlette(
        routes=[*endpoints.routes, *interactive.routes, *page_routes(),
                *health_routes(lambda: None), stats_route(stats)],
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.router = router
    app.state.sessions = sessions
    return app
