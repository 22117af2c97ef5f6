"""The launcher: picks the node app a command runs and starts it (the layer above both apps).

`lotcast broadcaster` and `lotcast relay` come here from the CLI. Only this module imports the
node apps (broadcaster/, relay/); tests/test_layering.py keeps it that way.
"""

from __future__ import annotations

import ipaddress

from lotcast.config import Settings
from lotcast.media.aiortc_hooks import check_hooks, configure_udp_mux, restrict_host_addresses
from lotcast.service import AppFactory, run_app
from lotcast.workers import (
    WorkerSpec,
    bind_worker_listener,
    bind_worker_socket,
    exit_when_orphaned,
    resolve_workers,
    run_workers,
)


def announce_problem(settings: Settings) -> str | None:
    """Why ``settings.ice_announce_ip`` cannot be served, None when it can (or is unset)."""
    announce = settings.ice_announce_ip
    if not announce:
        return None
    flag = f"--ice-announce-ip {announce!r}"
    try:
        address = ipaddress.ip_address(announce)
    except ValueError:
        return f"{flag} is not an IP address (a viewer's ICE candidate needs one)"
    if address.is_unspecified or address.is_multicast:
        return f"{flag} is not a unicast address a viewer can send to"
    if not settings.udp_port:
        return (f"{flag} needs --udp-port: only the mux port is announced (a socket per peer "
                "connection has an ephemeral port nothing maps)")
    try:
        bound = ipaddress.ip_address(settings.ice_ip)
    except ValueError:
        return f"--ice-ip {settings.ice_ip!r} is not an IP address"
    if bound.version != address.version:
        return (f"{flag} is IPv{address.version} but the mux binds --ice-ip {settings.ice_ip} "
                f"(IPv{bound.version}): the announced port must reach the bound one")
    return None


def prepare_media(settings: Settings, worker: int = 0) -> None:
    problem = announce_problem(settings)
    if problem is not None:
        raise SystemExit(f"lotcast: {problem}")
    check_hooks()
    restrict_host_addresses([settings.ice_ip])
    if settings.udp_port:
        configure_udp_mux(settings.ice_ip, settings.udp_port + worker,
                          settings.ice_announce_ip or None)


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
        problem = announce_problem(settings)
        if problem is not None:  # before any worker starts
            raise SystemExit(f"lotcast: {problem}")
        count = resolve_workers(settings.workers)
        if count > 1:
            raise SystemExit(run_workers(settings, count))
        settings.workers = 1
    prepare_media(settings)
    run_app(kind, settings, app_factory(kind))


def _run_worker(settings: Settings, spec: WorkerSpec) -> None:
    from relay.app import create_app as create_relay_app

    exit_when_orphaned()
    prepare_media(settings, spec.index)
    listen = bind_worker_listener(settings.host, settings.port)
    private = bind_worker_socket(spec.socket_path())
    run_app("relay", settings, lambda s: create_relay_app(s, worker=spec), listen=listen,
            extra=[private], label=f"relay {spec.name}", ready_info={"worker": spec.index})
