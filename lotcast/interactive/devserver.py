"""A minimal node serving only the interactive layer (tests and local development).

    python -m lotcast.interactive.devserver --port 0 --redis-url redis://127.0.0.1:6379/0

Prints the supervisor ready line (`LOTCAST_READY {"url": ...}`) once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette

from lotcast.auth import TokenAuthority
from lotcast.config import Settings
from lotcast.interactive.service import InteractiveService
from lotcast.netutil import bind_tcp
from lotcast.ops.metrics import NodeMetrics
from lotcast.supervisor import READY_PREFIX, announce_ready


def build_app(settings: Settings) -> tuple[Starlette, InteractiveService]:
    service = InteractiveService(settings, TokenAuthority(settings.jwt_secret), "relay")
    metrics = NodeMetrics(service.node_id, "interactive-dev")
    service.http.count_observers.append(metrics.room_http_sessions.set)
    service.bid_ack_observers.append(metrics.bid_ack_latency_seconds.observe)
    service.ack_write_observers.append(metrics.ack_write_seconds.observe)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.close()

    return Starlette(routes=[*service.routes, metrics.route()], lifespan=lifespan), service


async def serve(settings: Settings) -> None:
    app, service = build_app(settings)
    sock = bind_tcp(settings.host, settings.port)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=settings.log_level, lifespan="on", ws="websockets-sansio",
                            ws_max_size=64 * 1024, ws_per_message_deflate=False)
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


class DevServerProcess:
    """Runs the devserver as a child process (tests): `with DevServerProcess(redis_url) as srv`."""

    def __init__(self, redis_url: str, *args: str, jwt_secret: str | None = None) -> None:
        self.redis_url = redis_url
        self.args = list(args)
        self.jwt_secret = jwt_secret
        self.url = ""
        self.output: list[str] = []
        self._proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 20.0) -> DevServerProcess:
        env = dict(os.environ)
        if self.jwt_secret:
            env["LOTCAST_JWT_SECRET"] = self.jwt_secret
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "lotcast.interactive.devserver", "--port", "0",
             "--redis-url", self.redis_url, *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout
        for line in self._proc.stdout:
            self.output.append(line)
            if line.startswith(READY_PREFIX):
                self.url = json.loads(line[len(READY_PREFIX):])["url"]
                break
            if time.monotonic() > deadline:
                break
        if not self.url:
            self.stop()
            raise RuntimeError("devserver did not start:\n" + "".join(self.output[-40:]))
        threading.Thread(target=self._drain, daemon=True).start()
        return self

    def _drain(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self.output.append(line)

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> DevServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
