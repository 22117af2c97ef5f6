"""The launcher: picks the node app a command runs and starts it (the layer above both apps).

`lotcast broadcaster` and `lotcast relay` come here from the CLI. Only this module imports the
node apps (broadcaster/, relay/); tests/test_layering.py keeps it that way.
"""

from __future__ import annotations

from lotcast.config import Settings
from lotcast.media.aiortc_hooks import check_hooks, configure_udp_mux, restrict_host_addresses
from lotcast.service import AppFactory, run_app
from lotcast.workers import (
    WorkerSpec,
    bind_worker_listener,
    bind_worker_socket,
    resolve_workers,
    run_workers,
)


def prepare_media(settings: Settings, worker: int = 0) -> None:
    check_hooks()
    restrict_host_addresses([settings.ice_ip])
    if settings.udp_port:
        configure_udp_mux(settings.ice_ip, settings.udp_port + worker)


def app_factory(kind: str) -> AppFactory:
    if kind == "broadcaster":
        from broadcaster.app import create_app

        return create_app
    if kind == "relay":
        from relay.app import create_app as create_relay_app

        return create_relay_app
    raise ValueError(f"unknown node kind {kind!r}")


def run_node(kind: str, settings: Settings) -> None:
    """Run one node until it stops: in this process, or (a relay with --workers > 1) as the
    parent of its workers (lotcast/workers.py)."""
    if kind == "relay":
        spec = WorkerSpec.from_env()
        if spec is not None:
            _run_worker(settings, spec)
            return
        count = resolve_workers(settings.workers)
        if count > 1:
            raise SystemExit(run_workers(settings, count))
        settings.workers = 1
    prepare_media(settings)
    run_app(kind, settings, app_factory(kind))


def _run_worker(settings: Settings, spec: WorkerSpec) -> None:
    from relay.app import create_app as create_relay_app

    prepare_media(settings, spec.index)
    listen = bind_worker_listener(settings.host, settings.port)
    private = bind_worker_socket(spec.socket_path())
    run_app("relay", settings, lambda s: create_relay_app(s, worker=spec), listen=listen,
            extra=[private], label=f"relay {spec.name}", ready_info={"worker": spec.index})
