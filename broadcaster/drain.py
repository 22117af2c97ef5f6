"""Origin drain: what SIGTERM starts on a broadcaster (lotcast.service.DrainingServer calls `run`).

1. The origin turns DRAINING in the registry: WHIP placement sends no new stream here, and a
   WHIP POST that reaches it is redirected (307) to a serving origin.
2. For each stream still published here, the host page is told over its room socket
   (`republish`, via broadcaster/notices.py) to publish to the least-loaded serving origin; it
   does so make-before-break, and the new origin takes the stream's binding over, so relays
   switch their pull (relay/upstreams.py). Repeated every `notice_interval` until it has moved.
3. Once a stream has moved (its binding names another origin) and no relay pulls it from here
   any more, its old ingest session is ended here (`end_moved`): the break of make-before-break
   comes after every relay has switched, whatever the host does.
4. It returns when no publisher and no relay pull is left here, or at `timeout`: third-party WHIP
   publishers (OBS) cannot be told and keep their session until then.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable

from lotcast.ops.registry import NodeRegistry

logger = logging.getLogger(__name__)


class DrainState(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"
    DONE = "done"


class OriginDrainer:
    def __init__(self, registry: NodeRegistry, publishing: Callable[[], list[str]],
                 relay_pulls: Callable[[], int], notify: Callable[[str], Awaitable[bool]],
                 end_moved: Callable[[], Awaitable[int]], timeout: float,
                 poll_interval: float = 0.1, notice_interval: float = 1.0) -> None:
        self.registry = registry
        self.publishing = publishing
        self.relay_pulls = relay_pulls
        self.notify = notify
        self.end_moved = end_moved
        self.ended = 0
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.notice_interval = notice_interval
        self.state = DrainState.SERVING
        self.notices = 0
        self.timed_out = False

    @property
    def draining(self) -> bool:
        return self.state is not DrainState.SERVING

    def readiness(self) -> str | None:
        return "draining" if self.draining else None

    def _set_state(self, new: DrainState) -> None:
        logger.warning("origin drain: %s -> %s", self.state.value, new.value)
        self.state = new

    async def run(self) -> None:
        """Drain; returns when empty or at the timeout (never raises)."""
        if self.draining:
            return
        self._set_state(DrainState.DRAINING)
        started = time.monotonic()
        try:
            await asyncio.wait_for(self.registry.drain(), timeout=2.0)
        except Exception as exc:  # the registry entry still expires by TTL
            logger.warning("could not publish draining state: %r", exc)
        deadline = started + self.timeout
        told: dict[str, float] = {}
        while time.monotonic() < deadline:
            try:
                self.ended += await self.end_moved()
            except Exception as exc:
                logger.warning("could not end moved sessions: %r", exc)
            streams = self.publishing()
            if not streams and self.relay_pulls() == 0:
                break
            now = time.monotonic()
            for stream in streams:
                if now - told.get(stream, -self.notice_interval) < self.notice_interval:
                    continue
                told[stream] = now
                try:
                    if await self.notify(stream):
                        self.notices += 1
                except Exception as exc:
                    logger.warning("stream %s: could not tell its host to move: %r", stream, exc)
            await asyncio.sleep(self.poll_interval)
        self.timed_out = bool(self.publishing()) or self.relay_pulls() > 0
        self._set_state(DrainState.DONE)
        logger.warning("origin drain %s after %.2fs (%d publishers, %d relay pulls left)",
                       "timed out" if self.timed_out else "done", time.monotonic() - started,
                       len(self.publishing()), self.relay_pulls())
