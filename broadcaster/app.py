"""The origin node: WHIP ingest from the host, WHEP egress to relays, host console, pages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

from redis.exceptions import RedisError
from starlette.applications import Starlette

from broadcaster.drain import OriginDrainer
from broadcaster.ingest import IngestPlacer
from broadcaster.notices import OriginNotices
from lotcast import redisconn
from lotcast.auth import Role, TokenAuthority
from lotcast.config import Settings
from lotcast.interactive.protocol import encode_republish
from lotcast.interactive.service import InteractiveService
from lotcast.interactive.session import ClientSession
from lotcast.media.aiortc_hooks import close_udp_mux, current_udp_mux, open_udp_mux, udp_mux_enabled
from lotcast.media.endpoints import SessionTable, WebRtcEndpoints
from lotcast.media.mux_metrics import UdpMuxCollector
from lotcast.media.peer import EgressSession, IngestSession
from lotcast.media.stream import MediaStream, StreamRouter
from lotcast.media.upstream import NotLiveError
from lotcast.node.routes import health_routes, page_routes, stats_route, udp_socket_count
from lotcast.node.telemetry import MediaTelemetry
from lotcast.ops.metrics import NodeMetrics
from lotcast.ops.node import NodeLoad, NodeState
from lotcast.ops.origins import StreamBindings, pick_origin, whip_url
from lotcast.ops.placement_http import Placer, selector_for
from lotcast.ops.registry import NodeRegistry, read_live_nodes
from lotcast.tasks import cancel_and_wait

logger = logging.getLogger(__name__)


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
    if udp_mux_enabled():  # --udp-port: the origin's one media port
        metrics.registry.register(UdpMuxCollector(current_udp_mux))
    endpoints = WebRtcEndpoints(settings, authority, router, sessions, live_stream,
                                accept_publish=True,
                                on_first_frame=metrics.first_frame_seconds.observe,
                                on_estimate=metrics.viewer_estimate_bps.observe)
    interactive = InteractiveService(settings, authority, "broadcaster")
    interactive.bid_ack_observers.append(metrics.bid_ack_latency_seconds.observe)
    interactive.ack_write_observers.append(metrics.ack_write_seconds.observe)
    interactive.http.count_observers.append(metrics.room_http_sessions.set)
    # Placement answers here too: a viewer may ask any node where to play.
    redis = redisconn.connect(settings.redis_url, cluster=settings.redis_cluster)
    placer = Placer(redis, selector_for(settings))
    # --- several origins (issue 13): registry entry, stream bindings, WHIP placement, drain
    ttl = 3 * settings.heartbeat_interval
    bindings = StreamBindings(redis, settings.node_id, ttl)

    def load() -> NodeLoad:
        return NodeLoad(viewers=len(bindings.held), streams=dict.fromkeys(bindings.held, 0),
                        sockets=sum(len(hub.sockets) for hub in interactive.hubs.values()))

    registry = NodeRegistry(redis, node_id=settings.node_id, url=settings.public_url,
                            kind="broadcaster", capacity=settings.max_streams,
                            heartbeat_interval=settings.heartbeat_interval, ttl=ttl,
                            load_probe=load)

    async def load_changed() -> None:
        with contextlib.suppress(RedisError, OSError):
            if registry.state in (NodeState.SERVING, NodeState.DRAINING):
                await registry.beat()

    def publishing() -> list[str]:
        return sorted({s.stream.id for s in sessions.sessions(IngestSession)})

    async def notify(stream: str) -> bool:
        """Ask the stream's host to publish to another origin (False: none to go to, or the
        stream has moved already)."""
        if await bindings.holder(stream) not in (settings.node_id, None):
            return False
        target = pick_origin(await read_live_nodes(redis), int(time.time() * 1000), ttl,
                             exclude={settings.node_id})
        if target is None:
            return False
        url = f"{whip_url(target, quote(stream, safe=''))}?from={quote(settings.node_id, safe='')}"
        await notices.publish(stream, url)
        return True

    def deliver(stream: str, url: str) -> int:
        hub = interactive.hubs.get(stream)
        if hub is None:
            return 0
        frame = encode_republish(stream=stream, whip_url=url)
        told = 0
        for sub in list(hub.sockets):
            if isinstance(sub, ClientSession) and sub.identity.role is Role.HOST:
                sub.push(frame)
                told += 1
        return told

    async def end_moved() -> int:
        """End the ingest sessions of streams that moved to another origin and that no relay
        (or viewer) pulls from here any more."""
        pulled = {s.stream.id for s in sessions.sessions(EgressSession)}
        ended = 0
        for session in sessions.sessions(IngestSession):
            stream = session.stream.id
            if stream in pulled or await bindings.holder(stream) in (settings.node_id, None):
                continue
            logger.warning("stream %s moved and no relay pulls it here: ending its old session",
                           stream)
            await session.close()
            ended += 1
        return ended

    notices = OriginNotices(redis, deliver)
    drainer = OriginDrainer(registry, publishing, lambda: sessions.count(EgressSession), notify,
                            end_moved, settings.drain_timeout)
    ingest = IngestPlacer(redis, bindings, router, endpoints.publish, authority,
                          node_id=settings.node_id,
                          stale_after=ttl, capacity=settings.max_streams,
                          draining=lambda: drainer.draining, load_changed=load_changed,
                          public_url=settings.public_url)

    registered = True

    async def keep_bindings() -> None:
        while True:
            await asyncio.sleep(settings.heartbeat_interval)
            try:
                if not registered:  # the first heartbeat failed: the registry never started beating
                    await load_changed()
                for stream in await bindings.refresh():
                    logger.warning("stream %s: now bound to another origin", stream)
            except (RedisError, OSError) as exc:
                logger.warning("binding refresh failed: %r", exc)
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
            "state": registry.state.value,
            "draining": drainer.draining,
            "bound": sorted(bindings.held),
            "whip_redirects": ingest.redirects,
            "republish_notices": drainer.notices,
            "moved_sessions_ended": drainer.ended,
            "republish_delivered": notices.delivered,
        }

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await open_udp_mux()  # a taken --udp-port fails the start, not the first publisher
        sessions.start()
        await interactive.start()
        nonlocal registered
        try:
            await registry.start()
        except (RedisError, OSError) as exc:  # one origin still serves without the registry
            logger.warning("origin not registered (%r): WHIP placement sees only itself", exc)
            registered = False
        notices.start()
        refresher = asyncio.ensure_future(keep_bindings())
        try:
            yield
        finally:
            await cancel_and_wait(refresher)
            await notices.close()
            with contextlib.suppress(RedisError, OSError):
                await bindings.release_all()
            await registry.close(deregister=True)
            await interactive.close()
            await sessions.close()
            router.close()
            close_udp_mux()
            await redis.aclose()

    app = Starlette(
        routes=[*ingest.routes, *endpoints.routes, *interactive.routes, *page_routes(),
                *health_routes(drainer.readiness), stats_route(stats),
                placer.route(), telemetry.route()],
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.router = router
    app.state.sessions = sessions
    app.state.drain = drainer.run
    app.state.drainer = drainer
    return app
