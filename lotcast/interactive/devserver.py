"""A minimal node serving only the interactive layer (tests and local development).

    python -m lotcast.interactive.devserver --port 0 --redis-url redis://127.0.0.1:6379/0

Prints the supervisor ready line (`LOTCAST_READY {"url": ...}`) once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette

from lotcast.auth import TokenAuthority
from lotcast.config import Settings
from lotcast.interactive.service import InteractiveService
from lotcast.netutil import bind_tcp
from lotcast.supervisor import announce_ready


def build_app(settings: Settings) -> tuple[Starlette, InteractiveService]:
    service = InteractiveService(settings, TokenAuthority(settings.jwt_secret), "relay")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.close()

    return Starlette(routes=service.routes, lifespan=lifespan), service


async def serve(settings: Settings) -> None:
    app, service = build_app(settings)
    sock = bind_tcp(settings.host, settings.port)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=settings.log_level, lifespan="on",
                            ws_max_size=64 * 1024)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task
            return
        await asyncio.sleep(0.01)
    announce_ready(url=f"http://{settings.host}:{port}", node=service.node_id, pid_port=port)
    await task


def main() -> None:
    parser = argparse.ArgumentParser(prog="lotcast-interactive-dev")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--node-id", default=None)
    parser.add_argument("--log-level", default="warning")
    for name in ("bid_rate", "vote_rate", "ws_msg_rate"):
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=float, default=None)
    for name in ("bid_burst", "vote_burst", "ws_msg_burst", "ws_outbox_bytes", "room_history",
                 "ws_flush_interval_ms"):
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None)
    args = parser.parse_args()
    settings = Settings.from_env(**vars(args))
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
