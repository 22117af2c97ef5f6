"""Runs one Starlette app (a node, or one worker of a relay node) under uvicorn on pre-bound
sockets: TLS with live renewal, the drain-on-SIGTERM server, the ready line.

Which app runs is the launcher's choice (lotcast.launch); this module imports no node app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from lotcast.config import Settings
from lotcast.netutil import bind_tcp
from lotcast.node.routes import ca_route
from lotcast.supervisor import announce_ready
from lotcast.tls import CertificateReloader, server_context

AppFactory = Callable[[Settings], Starlette]


def prepare_tls(settings: Settings) -> CertificateReloader | None:
    """The node's TLS context wrapped in its reloader, or None for plain HTTP.

    `ca_file` becomes SSL_CERT_FILE, the CA bundle httpx (and Python's default contexts) verify
    this process's own HTTPS requests against: the relay's WHEP pulls from an https origin or
    parent relay.
    """
    if settings.ca_file:
        os.environ["SSL_CERT_FILE"] = settings.ca_file
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise SystemExit("TLS needs both --cert (LOTCAST_TLS_CERT) and --key (LOTCAST_TLS_KEY)")
    if not settings.tls_cert:
        return None
    try:
        context = server_context(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise SystemExit(f"cannot load TLS certificate {settings.tls_cert} / key "
                         f"{settings.tls_key}: {exc}") from exc
    return CertificateReloader(context, settings.tls_cert, settings.tls_key,
                               settings.tls_reload_interval)


def node_url(settings: Settings, port: int) -> str:
    """The public URL once the port is bound: a configured URL ending in ":0" gets the port."""
    scheme = "https" if settings.tls_cert else "http"
    if not settings.public_url:
        return f"{scheme}://{settings.host}:{port}"
    if settings.public_url.endswith(":0"):
        return f"{settings.public_url[:-2]}:{port}"
    return settings.public_url


def run_app(kind: str, settings: Settings, factory: AppFactory, *,
            listen: socket.socket | None = None, extra: Sequence[socket.socket] = (),
            label: str | None = None, ready_info: dict[str, Any] | None = None) -> None:
    """Serve `factory(settings)` until it stops.

    listen: the node's pre-bound TCP socket (default: bind host:port now); extra: more sockets
    served by the same app (a relay worker's private unix socket). `label` names the process
    in log lines; `ready_info` is added to its ready line.
    """
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s {label or kind} %(levelname)s %(name)s: %(message)s",
    )
    tls = prepare_tls(settings)
    sock = listen if listen is not None else bind_tcp(settings.host, settings.port)
    port = sock.getsockname()[1]
    settings.port = port
    settings.public_url = node_url(settings, port)
    if not settings.node_id:
        settings.node_id = f"{kind}-{settings.host}-{port}"
    app = factory(settings)
    if tls is not None and settings.ca_file:
        # A phone opens https://<node>/ca.crt (past one warning) to install the CA `up` made.
        app.router.routes.insert(0, ca_route(settings.ca_file))
    config = uvicorn.Config(app, log_level=settings.log_level.lower(), lifespan="on",
                            ws="websockets-sansio", timeout_graceful_shutdown=5,
                            # one frame encoding shared by every socket needs no per-socket
                            # compression; client frames are small by protocol
                            ws_per_message_deflate=False, ws_max_size=65536,
                            # the reloader's context, so renewals reach the live listener
                            ssl_context_factory=(None if tls is None
                                                 else lambda _config, _default: tls.context))
    server = DrainingServer(config, getattr(app.state, "drain", None))
    _use_uvloop()
    info = {"kind": kind, "url": settings.public_url, "node_id": settings.node_id,
            **(ready_info or {})}
    # Ctrl-C in a terminal (or `up` stopping its children) is a normal stop: uvicorn has shut
    # down cleanly by the time the interrupt surfaces, so no traceback
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(server, [sock, *extra], info, tls))


def _use_uvloop() -> None:
    """uvloop's C transports make every WebSocket and UDP write cheaper; plain asyncio if absent."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


Drain = Callable[[], Awaitable[None]]
log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains instead of shutting down at once.

    uvicorn's `capture_signals()` routes SIGINT/SIGTERM to `handle_exit`, which normally sets
    `should_exit`: the server stops accepting and closes. With a `drain` coroutine (the relay's), the
    first SIGTERM keeps the server serving while `drain()` runs (the node turns DRAINING, its
    viewers move away), then sets `should_exit` for the normal graceful shutdown and a clean exit
    (status 0). A second SIGTERM, or SIGINT, shuts down at once as before.
    """

    def __init__(self, config: uvicorn.Config, drain: Drain | None = None) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[Any] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if (sig == signal.SIGTERM and self.drain is not None and self.drain_task is None
                and self._loop is not None and self.started and not self.should_exit):
            # Runs in the main thread between bytecodes of the loop: hand over to the loop.
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        if self.drain_task is not None or self.drain is None:
            return
        self.drain_task = asyncio.ensure_future(self._drain_then_exit(self.drain))

    async def _drain_then_exit(self, drain: Drain) -> None:
        try:
            await drain()
        except Exception:
            log.exception("drain failed; shutting down")
        finally:
            self.should_exit = True


async def _serve(server: uvicorn.Server, sockets: list[socket.socket], info: dict[str, Any],
                 tls: CertificateReloader | None) -> None:
    async def announce() -> None:
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes no startup event
            await asyncio.sleep(0.02)
        announce_ready(**info, pid=os.getpid())

    announcer = asyncio.ensure_future(announce())
    if tls is not None:
        tls.start()
    try:
        await server.serve(sockets=sockets)
    finally:
        announcer.cancel()
        if tls is not None:
            await tls.close()
