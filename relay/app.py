"""The relay node: pulls streams over WHEP and forwards them to WHEP viewers; viewer WebSocket.

Scale-out wiring (issue 4): the relay heartbeats into the Redis registry, answers placement
(`/api/streams/{id}/edge`, and 307 instead of 503 when it is full or draining), drains on SIGTERM
(`app.state.drain`, called by lotcast.service.DrainingServer) and serves Prometheus `/metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import replace
from typing import Any
from urllib.parse import quote

from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from lotcast import redisconn
from lotcast.auth import TokenAuthority
from lotcast.config import Settings
from lotcast.ids import is_valid_stream_id
from lotcast.interactive.service import InteractiveService
from lotcast.media.aiortc_hooks import close_udp_mux, current_udp_mux, open_udp_mux, udp_mux_enabled
from lotcast.media.consent import consent_clock
from lotcast.media.endpoints import CORS, SessionTable, WebRtcEndpoints
from lotcast.media.mux_metrics import UdpMuxCollector
from lotcast.media.peer import EgressSession, PeerSession
from lotcast.media.stream import StreamRouter
from lotcast.node.routes import health_routes, page_routes, udp_socket_count
from lotcast.node.telemetry import MediaTelemetry
from lotcast.ops.metrics import NodeMetrics
from lotcast.ops.node import NodeLoad
from lotcast.ops.placement_http import Placer, selector_for, whep_url
from lotcast.ops.registry import NodeRegistry
from lotcast.workers import WorkerSpec
from relay.cascade import RELAY_AUTH_HEADER, RELAY_HEADER, CascadePlanner, child_headers, verified_child
from relay.drain import Drainer
from relay.siblings import SiblingRouter, Siblings, node_metrics, node_stats, relayed, via_sibling
from relay.upstreams import PARENT_CHECK_INTERVAL_S, RelayUpstreams

# A WHEP POST bounced between full relays stops after this many redirects.
MAX_REDIRECT_HOPS = 2
logger = logging.getLogger(__name__)
# How long a draining relay keeps asking placement for where its viewers go next (seconds).
RECONNECT_PLACEMENT_WINDOW_S = 1.5
# Set while a WHEP POST from a verified child relay is handled (it skips the viewer capacity).
_child_pull: ContextVar[str | None] = ContextVar("child_pull", default=None)


def create_app(settings: Settings, worker: WorkerSpec | None = None) -> Starlette:
    """The relay app; `worker` when this process is one worker of a multi-worker node."""
    mesh = worker if worker is not None and worker.count > 1 else None
    # a worker takes its share of the node's viewers; the registry shows the node's sum
    capacity = settings.max_viewers if mesh is None else mesh.share(settings.max_viewers)
    siblings = None if mesh is None else Siblings(mesh, tls=bool(settings.tls_cert))
    authority = TokenAuthority(settings.jwt_secret)
    router = StreamRouter(grace=settings.stream_grace)
    redis = redisconn.connect(settings.redis_url, cluster=settings.redis_cluster)
    selector = selector_for(settings)
    upstreams: RelayUpstreams | None = None
    # WHEP sessions that are child relays pulling from us (session id -> child node id)
    children: dict[str, str] = {}
    registry: NodeRegistry | None = None
    beat_soon: asyncio.Task[None] | None = None

    def load_changed() -> None:
        """Publish a heartbeat now (coalesced): placement and cascade see joins at once."""
        nonlocal beat_soon
        if registry is None or (beat_soon is not None and not beat_soon.done()):
            return

        async def beat() -> None:
            with contextlib.suppress(Exception):
                if registry is not None:
                    await registry.beat()

        beat_soon = asyncio.ensure_future(beat())

    def session_closed(session: PeerSession) -> None:
        children.pop(session.id, None)
        if upstreams is not None and isinstance(session, EgressSession):
            upstreams.viewer_left(session)
            load_changed()

    sessions = SessionTable(settings.session_timeout, on_closed=session_closed)
    planner = CascadePlanner(redis, selector, settings.node_id, settings.origin_url,
                             settings.origin_fanout)
    upstreams = RelayUpstreams(router, sessions, settings.origin_url,
                               retry_window=settings.stream_grace, choose=planner.choose,
                               parent_ok=planner.parent_ok,
                               headers=child_headers(settings.jwt_secret, settings.node_id),
                               origin_of=planner.bound_origins)
    metrics = NodeMetrics(settings.node_id, "relay")
    if udp_mux_enabled():  # --udp-port: this worker's one media port
        metrics.registry.register(UdpMuxCollector(current_udp_mux))
    # room socket counts are kept per process: each worker under its own id
    interactive = InteractiveService(
        settings if mesh is None else replace(settings, node_id=mesh.worker_id(settings.node_id)),
        authority, "relay")
    interactive.bid_ack_observers.append(metrics.bid_ack_latency_seconds.observe)
    interactive.ack_write_observers.append(metrics.ack_write_seconds.observe)
    interactive.http.count_observers.append(metrics.room_http_sessions.set)

    def viewer_count() -> int:
        """Viewers (child relays pulling from us are not viewers)."""
        return sum(1 for s in sessions.sessions(EgressSession) if s.id not in children)

    def websocket_count() -> int:
        return sum(len(hub.sockets) for hub in interactive.hubs.values())

    telemetry = MediaTelemetry(router, sessions, metrics, viewers=viewer_count,
                               websockets=websocket_count, udp_sockets=udp_socket_count,
                               node=lambda: registry.last_published if registry else None,
                               outbox_drops=lambda: interactive.stats.slow_disconnects)

    def load() -> NodeLoad:
        return NodeLoad(viewers=viewer_count(), egress_bps=telemetry.egress_bps(),
                        streams=upstreams.carried(), sockets=websocket_count())

    registry = NodeRegistry(redis, node_id=settings.node_id, url=settings.public_url,
                            kind="relay", capacity=capacity,
                            heartbeat_interval=settings.heartbeat_interval, load_probe=load,
                            worker=None if mesh is None else mesh.name)
    placer = Placer(redis, selector)

    async def tell_clients() -> None:
        # Closes every room socket with 1001 (go away, reconnect anywhere) and refuses new ones.
        await interactive.close()

    # Drained means no viewer and no child relay left (children re-parent when they see us drain).
    drainer = Drainer(registry, lambda: sessions.count(EgressSession), tell_clients,
                      settings.drain_timeout)

    def accepting_viewers() -> str | None:
        if drainer.draining:
            return "relay is draining"
        if _child_pull.get() is not None:
            return None
        if viewer_count() >= capacity:
            return f"relay at capacity ({capacity} viewers)"
        return None

    def stream_viewers(stream_id: str) -> int:
        return sum(1 for s in sessions.sessions(EgressSession)
                   if s.stream.id == stream_id and s.id not in children)

    endpoints = WebRtcEndpoints(settings, authority, router, sessions, upstreams.acquire,
                                accept_publish=False, accepting_viewers=accepting_viewers,
                                on_first_frame=metrics.first_frame_seconds.observe,
                                count_viewers=stream_viewers,
                                on_estimate=metrics.viewer_estimate_bps.observe)

    async def next_relay_url(stream_id: str) -> str | None:
        """Where a viewer of this draining relay should POST next (WHEP `reconnect` event)."""
        # A sibling's heartbeat can be a moment late (a busy machine): look again for a little
        # while (within the drain listener's 2 s) before the event goes out without a URL.
        deadline = asyncio.get_running_loop().time() + RECONNECT_PLACEMENT_WINDOW_S
        while True:
            placement = await placer.place(stream_id, exclude={settings.node_id})
            if placement.relay is not None:
                return whep_url(placement.relay, stream_id)
            if asyncio.get_running_loop().time() >= deadline:
                nodes = await placer.nodes()
                logger.warning("drain: no relay to send %s's viewers to: %s", stream_id,
                               [(n.node_id, n.state.value, n.viewers, n.capacity, n.cpu,
                                 n.heartbeat_ms) for n in nodes])
                return None
            await asyncio.sleep(min(0.25, settings.heartbeat_interval))

    drainer.on_drain(lambda: endpoints.events.reconnect_all(next_relay_url))

    async def play(request: Request) -> Response:
        """WHEP POST: when this relay cannot take the viewer, 307 to one that can."""
        child = verified_child(settings.jwt_secret, request.headers.get(RELAY_HEADER),
                               request.headers.get(RELAY_AUTH_HEADER))
        if child is not None:
            token = _child_pull.set(child)
            try:
                response = await endpoints.play(request)
            finally:
                _child_pull.reset(token)
            if response.status_code == 201:
                children[response.headers["location"].rsplit("/", 1)[-1]] = child
            return response
        stream = str(request.path_params["stream"])
        # a POST a sibling forwarded is answered here, whatever the answer
        local_only = via_sibling(request.scope)
        if (siblings is not None and not local_only and not drainer.draining
                and viewer_count() >= capacity and is_valid_stream_id(stream)):
            query = request.url.query
            answer = await siblings.first("POST", request.url.path + (f"?{query}" if query else ""),
                                          request.headers, await request.body(),
                                          accept=lambda status: status == 201)
            if answer is not None:
                return relayed(answer)
        # an invalid id is not placed anywhere: endpoints.play answers it 400 right here
        if accepting_viewers() is not None and is_valid_stream_id(stream) and not local_only:
            seen = [x for x in request.query_params.get("from", "").split(",") if x]
            if len(seen) < MAX_REDIRECT_HOPS:
                try:
                    placement = await placer.place(stream, exclude={settings.node_id, *seen})
                except (RedisError, OSError):
                    placement = None
                if placement is not None and placement.relay is not None:
                    hops = quote(",".join([*seen, settings.node_id]), safe=",")
                    return Response(status_code=307, headers={
                        **CORS, "Location": f"{whep_url(placement.relay, stream)}?from={hops}",
                        "Cache-Control": "no-store"})
        response = await endpoints.play(request)
        if response.status_code == 201:
            load_changed()
        return response

    async def watch_parents() -> None:
        # a dead parent is noticed by its silence + a failed probe, well before its TTL expires
        while True:
            await asyncio.sleep(min(settings.heartbeat_interval, PARENT_CHECK_INTERVAL_S))
            try:
                await upstreams.check_parents()
            except Exception:
                logger.exception("parent check failed")

    def stats() -> dict[str, Any]:
        return {
            "node_id": settings.node_id,
            **({} if mesh is None else {"worker": mesh.index, "pid": os.getpid()}),
            "kind": "relay",
            "state": registry.state.value,
            "draining": drainer.draining,
            "viewers": viewer_count(),
            "capacity": capacity,
            "sessions": sessions.count(),
            "websockets": websocket_count(),
            "children": sorted(children.values()),
            "reparents": upstreams.reparents,
            "stall_repulls": upstreams.stall_repulls,
            "origin_moves": upstreams.origin_moves,
            "upstreams": [{"stream": p.stream.id, "state": p.state.value,
                           "url": p.upstream_url, "depth": upstreams.depth_of(p.stream.id)}
                          for p in upstreams.pulls()],
            "forwarded_packets": telemetry.forwarded_packets,
            **consent_clock().counters(),
            "streams": [s.counters() for s in router],
        }

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await open_udp_mux()  # a taken --udp-port fails the start, not the first viewer
        sessions.start()
        await interactive.start()
        await registry.start()
        telemetry.refresh_gauges(registry.last_published)
        parents = asyncio.ensure_future(watch_parents())
        try:
            yield
        finally:
            parents.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await parents
            await registry.close(deregister=True)
            await interactive.close()
            await sessions.close()
            router.close()
            await upstreams.close()
            if siblings is not None:
                await siblings.close()
            await redis.aclose()
            close_udp_mux()

    async def stats_endpoint(request: Request) -> Response:
        own = {**stats(), "udp_sockets": udp_socket_count()}
        if siblings is None or via_sibling(request.scope):
            return JSONResponse(own)
        others = [answer.json() for _, answer in await siblings.gather("/api/stats")]
        return JSONResponse(node_stats(settings.node_id, [own, *others]))

    async def metrics_endpoint(request: Request) -> Response:
        own = telemetry.render(registry.last_published)
        if siblings is None or mesh is None or via_sibling(request.scope):
            return Response(own, media_type=CONTENT_TYPE_LATEST)
        texts = [(w, answer.text) for w, answer in await siblings.gather("/metrics")]
        return Response(node_metrics([(mesh.index, own.decode()), *texts]),
                        media_type=CONTENT_TYPE_LATEST)

    routes: list[BaseRoute] = [
        Route("/whep/{stream}", play, methods=["POST"]),
        *endpoints.routes, *interactive.routes, *page_routes(),
        *health_routes(drainer.readiness), Route("/api/stats", stats_endpoint),
        placer.route(), Route("/metrics", metrics_endpoint, methods=["GET"])]
    middleware = [] if siblings is None else [Middleware(
        SiblingRouter, siblings=siblings,
        holds_whep=lambda session_id: sessions.get(session_id) is not None,
        holds_room=lambda session_id: session_id in interactive.http.streams)]

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.settings = settings
    app.state.router = router
    app.state.sessions = sessions
    app.state.registry = registry
    app.state.drain = drainer.run
    app.state.drainer = drainer
    return app
