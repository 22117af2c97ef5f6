"""Relay drain: what SIGTERM starts (lotcast.service.DrainingServer routes the signal to `Drainer.run`).

1. The node turns DRAINING: the registry shows it at once (placement skips it), /readyz answers
   503, and new WHEP POSTs are redirected to another relay (or refused with 503 + Retry-After).
2. Viewers are told to move: every WHEP session's event stream gets a `reconnect` event (the
   listeners registered with `on_drain`, e.g. `WhepEvents.reconnect_all` with the URL placement
   names), and every interactive WebSocket is closed with 1001 ("node going away, reconnect to
   any node"), which the viewer page treats as "re-run placement" for its media too.
3. It waits until no viewer session is left, or `drain_timeout` expires; then the server exits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from lotcast.ops.registry import NodeRegistry

logger = logging.getLogger(__name__)


class Drainer:
    def __init__(self, registry: NodeRegistry, viewers: Callable[[], int],
                 tell_clients: Callable[[], Awaitable[None]], timeout: float,
                 poll_interval: float = 0.1) -> None:
        self.registry = registry
        self.viewers = viewers
        self.tell_clients = tell_clients
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.draining = False
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.timed_out = False
        self._listeners: list[Callable[[], Awaitable[object]]] = []

    def on_drain(self, listener: Callable[[], Awaitable[object]]) -> None:
        """Await ``listener`` when the drain starts (after the registry shows DRAINING, before
        the room sockets close); a failing or slow one never holds the drain up."""
        self._listeners.append(listener)

    def readiness(self) -> str | None:
        return "draining" if self.draining else None

    async def run(self) -> None:
        """Drain; returns when the node is empty or the timeout expired (never raises)."""
        if self.draining:
            return
        self.draining = True
        self.started_at = time.monotonic()
        logger.warning("draining: %d viewers, timeout %.1fs", self.viewers(), self.timeout)
        try:
            await asyncio.wait_for(self.registry.drain(), timeout=2.0)
        except Exception as exc:  # the registry entry still expires by TTL
            logger.warning("could not publish draining state: %r", exc)
        # Telling clients (closing room sockets with 1001) runs beside the wait: its cleanup must
        # never hold the drain past its deadline.
        for listener in self._listeners:
            try:
                await asyncio.wait_for(listener(), timeout=2.0)
            except Exception as exc:
                logger.warning("drain listener failed: %r", exc)
        tell = asyncio.ensure_future(self.tell_clients())
        tell.add_done_callback(_log_failure)
        deadline = self.started_at + self.timeout
        while self.viewers() > 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - polled count
            await asyncio.sleep(self.poll_interval)
        if not tell.done():
            tell.cancel()
        self.timed_out = self.viewers() > 0
        self.finished_at = time.monotonic()
        logger.warning("drain %s after %.2fs (%d viewers left)",
                       "timed out" if self.timed_out else "done",
                       self.finished_at - self.started_at, self.viewers())


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("could not tell clients to move: %r", task.exception())
