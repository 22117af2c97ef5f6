"""Runs one node (broadcaster or relay) under uvicorn on a pre-bound socket."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import psutil
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from lotcast.config import Settings
from lotcast.media.aiortc_hooks import check_hooks, restrict_host_addresses
from lotcast.netutil import bind_tcp
from lotcast.supervisor import announce_ready
from viewer_web import STATIC_DIR


def page_routes() -> list[BaseRoute]:
    """The host and viewer pages and their static assets (no build step)."""

    async def host(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "host.html")

    async def watch(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "viewer.html")

    return [
        Route("/host", host),
        Route("/watch", watch),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]


def health_routes(ready: Callable[[], str | None]) -> list[BaseRoute]:
    """/healthz: the process serves. /readyz: it takes new work (fails while draining)."""

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        problem = ready()
        if problem is not None:
            return PlainTextResponse(problem + "\n", status_code=503)
        return PlainTextResponse("ready\n")

    return [Route("/healthz", healthz), Route("/readyz", readyz)]


def udp_socket_count() -> int:
    """Open UDP sockets of this process (what per-session cleanup must give back)."""
    return sum(1 for c in psutil.Process(os.getpid()).net_connections(kind="udp"))


def stats_route(collect: Callable[[], dict[str, Any]]) -> BaseRoute:
    async def stats(request: Request) -> Response:
        return JSONResponse({**collect(), "udp_sockets": udp_socket_count()})

    return Route("/api/stats", stats)


def prepare_media(settings: Settings) -> None:
    check_hooks()
    restrict_host_addresses([settings.ice_ip])


def run_service(kind: str, settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s {kind} %(levelname)s %(name)s: %(message)s",
    )
    prepare_media(settings)
    sock = bind_tcp(settings.host, settings.port)
    port = sock.getsockname()[1]
    settings.port = port
    if not settings.public_url or settings.public_url.endswith(":0"):
        settings.public_url = f"http://{settings.host}:{port}"
    if not settings.node_id:
        settings.node_id = f"{kind}-{settings.host}-{port}"
    app: Starlette
    if kind == "broadcaster":
        from broadcaster.app import create_app

        app = create_app(settings)
    else:
        from relay.app import create_app as create_relay_app

        app = create_relay_app(settings)
    config = uvicorn.Config(app, log_level=settings.log_level.lower(), lifespan="on",
                            ws="websockets-sansio", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    asyncio.run(_serve(server, sock, kind, settings, app))


async def _serve(server: uvicorn.Server, sock: Any, kind: str, settings: Settings,
                 app: Starlette) -> None:
    async def announce() -> None:
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes no startup event
            await asyncio.sleep(0.02)
        announce_ready(kind=kind, url=settings.public_url, node_id=settings.node_id, pid=os.getpid())

    announcer = asyncio.ensure_future(announce())
    try:
        await server.serve(sockets=[sock])
    finally:
        announcer.cancel()

