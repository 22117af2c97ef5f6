"""Which streams this relay pulls, from where, and for how long."""

from __future__ import annotations

import asyncio
import logging

import httpx

from lotcast.media.endpoints import SessionTable
from lotcast.media.peer import EgressSession, PeerSession
from lotcast.media.stream import MediaStream, StreamRouter
from lotcast.media.upstream import NotLiveError, PullState, UpstreamPull

logger = logging.getLogger(__name__)


class RelayUpstreams:
    """One UpstreamPull per stream with viewers here; released after the last viewer lingers out."""

    def __init__(self, router: StreamRouter, sessions: SessionTable, upstream_url: str,
                 retry_window: float, linger: float = 10.0) -> None:
        self._router = router
        self._sessions = sessions
        self._upstream_url = upstream_url
        self._retry_window = retry_window
        self._linger = linger
        self._pulls: dict[str, UpstreamPull] = {}
        self._depths: dict[str, int] = {}
        self._release_timers: dict[str, asyncio.TimerHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.http = httpx.AsyncClient(timeout=10.0)

    def pulls(self) -> list[UpstreamPull]:
        return list(self._pulls.values())

    def depth_of(self, stream_id: str) -> int:
        """This relay's depth in the stream's tree (0 = pulls from the origin)."""
        return self._depths.get(stream_id, 0)

    def carried(self) -> dict[str, int]:
        """Streams this relay carries (a live upstream pull), with their tree depth."""
        return {sid: self.depth_of(sid) for sid, pull in self._pulls.items()
                if pull.state is PullState.CONNECTED}

    async def acquire(self, stream_id: str) -> MediaStream:
        stream = self._router.get_or_create(stream_id)
        pull = self._pulls.get(stream_id)
        if pull is None or pull.stream is not stream:
            pull = UpstreamPull(stream, self._upstream_url, self.http, self._retry_window)
            self._pulls[stream_id] = pull
            stream.on_end(lambda: self._forget(stream_id, pull))
        timer = self._release_timers.pop(stream_id, None)
        if timer is not None:
            timer.cancel()
        try:
            await pull.ensure()
        except (NotLiveError, httpx.HTTPError) as exc:
            if not any(s.stream is stream for s in self._sessions.sessions(EgressSession)):
                stream.end()
            if isinstance(exc, NotLiveError):
                raise
            raise NotLiveError(f"upstream unreachable: {exc!r}", retry_after=2) from exc
        return stream

    def viewer_left(self, session: PeerSession) -> None:
        stream_id = session.stream.id
        if any(s.stream.id == stream_id for s in self._sessions.sessions(EgressSession)
               if s is not session):
            return
        if stream_id in self._pulls and stream_id not in self._release_timers:
            loop = asyncio.get_running_loop()
            self._release_timers[stream_id] = loop.call_later(self._linger, self._release, stream_id)

    def _release(self, stream_id: str) -> None:
        self._release_timers.pop(stream_id, None)
        if any(s.stream.id == stream_id for s in self._sessions.sessions(EgressSession)):
            return
        stream = self._router.get(stream_id)
        logger.info("releasing upstream of %s: no viewers", stream_id)
        if stream is not None:
            stream.end()

    def _forget(self, stream_id: str, pull: UpstreamPull) -> None:
        if self._pulls.get(stream_id) is pull:
            del self._pulls[stream_id]
        task = asyncio.ensure_future(pull.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for timer in self._release_timers.values():
            timer.cancel()
        self._release_timers.clear()
        await asyncio.gather(*(p.close() for p in list(self._pulls.values())), *self._closing)
        self._pulls.clear()
        await self.http.aclose()
