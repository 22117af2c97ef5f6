"""Routes every node serves: the pages, health and readiness, /api/stats, the local CA."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import psutil
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

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


def ca_route(ca_file: str) -> BaseRoute:
    async def ca(request: Request) -> Response:
        return FileResponse(ca_file, media_type="application/x-x509-ca-cert",
                            filename="lotcast-ca.crt")

    return Route("/ca.crt", ca)
