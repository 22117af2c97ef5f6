"""The launcher: picks the node app a command runs and starts it (the layer above both apps).

`lotcast broadcaster` and `lotcast relay` come here from the CLI. Only this module imports the
node apps (broadcaster/, relay/); tests/test_layering.py keeps it that way.
"""

from __future__ import annotations

from lotcast.config import Settings
from lotcast.media.aiortc_hooks import check_hooks, restrict_host_addresses
from lotcast.service import AppFactory, run_app


def prepare_media(settings: Settings) -> None:
    check_hooks()
    restrict_host_addresses([settings.ice_ip])


def app_factory(kind: str) -> AppFactory:
    if kind == "broadcaster":
        from broadcaster.app import create_app

        return create_app
    if kind == "relay":
        from relay.app import create_app as create_relay_app

        return create_relay_app
    raise ValueError(f"unknown node kind {kind!r}")


def run_node(kind: str, settings: Settings) -> None:
    """Run one node in this process until it stops."""
    prepare_media(settings)
    run_app(kind, settings, app_factory(kind))
