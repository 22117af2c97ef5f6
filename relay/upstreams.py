"""Which streams this relay pulls, from where, and for how long.

The upstream of each stream is chosen when its pull starts (`choose`, see relay/cascade.py: the
origin, or a parent relay for a cascade) and re-chosen when that parent drains or disappears from
the registry (`check_parents`, run at every heartbeat): the new pull is connected before the old
one is closed; the stream switches to it at its first key frame while the old one still feeds
viewers (MediaStream.attach_source), so viewers see no stall. A stream pulled from its origin moves
the same way when its binding names another origin (`origin_of`, issue 13: the origin drained or
crashed and the publisher moved).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection

import httpx

from lotcast.media.endpoints import SessionTable
from lotcast.media.peer import EgressSession, PeerSession
from lotcast.media.stream import MediaStream, StreamRouter, StreamState
from lotcast.media.upstream import NotLiveError, PullState, UpstreamPull
from relay.cascade import Upstream

logger = logging.getLogger(__name__)

# A cascade child notices a dead parent from this much silence on every track (audio alone
# arrives every 20 ms) plus a failed /healthz probe, checked every PARENT_CHECK_INTERVAL_S: its
# viewers' stall is about this + one check + a new pull + a key frame (target: 0.5 s).
PARENT_STALL_S = 0.25
PARENT_CHECK_INTERVAL_S = 0.1
PARENT_PROBE_TIMEOUT_S = 0.5
# A parent relay carries the stream already, so it answers a WHEP POST at once; one that does
# not within this is hung (SIGSTOP, a wedged loop) while its heartbeat has not yet expired.
# The origin may be busier (every publisher), so it keeps the client's 10 s.
PARENT_ANSWER_TIMEOUT_S = 4.0
# How often the origin bindings of origin-fed streams are compared with their pulls.
ORIGIN_CHECK_INTERVAL_S = 0.25
# A replaced pull keeps feeding its lower simulcast layers at most this long while the new pull's
# layer pulls connect (one WHEP exchange each) and switch at their key frames.
LAYER_HANDOVER_TIMEOUT_S = 6.0
# (stream, exclude node ids, below depth) -> where to pull from
Chooser = Callable[[str, Collection[str], "int | None"], Awaitable[Upstream]]
ParentCheck = Callable[[str, str], Awaitable[bool]]
OriginLookup = Callable[[Collection[str]], Awaitable[dict[str, Upstream]]]


class RelayUpstreams:
    """One UpstreamPull per stream with viewers here; released after the last viewer lingers out."""

    def __init__(self, router: StreamRouter, sessions: SessionTable, upstream_url: str,
                 retry_window: float, linger: float = 10.0, *, choose: Chooser | None = None,
                 parent_ok: ParentCheck | None = None,
                 headers: dict[str, str] | None = None,
                 origin_of: OriginLookup | None = None) -> None:
        self._router = router
        self._sessions = sessions
        self._upstream_url = upstream_url
        self._retry_window = retry_window
        self._linger = linger
        self._choose = choose
        self._parent_ok = parent_ok
        self._origin_of = origin_of
        self._origin_checked = 0.0
        self.origin_moves = 0
        self._pulls: dict[str, UpstreamPull] = {}
        self._upstreams: dict[str, Upstream] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._release_timers: dict[str, asyncio.TimerHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.reparents = 0
        self.stall_repulls = 0
        self.http = httpx.AsyncClient(timeout=10.0, headers=headers)

    def pulls(self) -> list[UpstreamPull]:
        return list(self._pulls.values())

    def depth_of(self, stream_id: str) -> int:
        """This relay's depth in the stream's tree (0 = pulls from the origin)."""
        upstream = self._upstreams.get(stream_id)
        return upstream.depth if upstream is not None else 0

    def upstream_of(self, stream_id: str) -> Upstream | None:
        return self._upstreams.get(stream_id)

    async def _pick(self, stream_id: str, exclude: Collection[str] = (),
                    below_depth: int | None = None) -> Upstream:
        if self._choose is None:
            return Upstream(self._upstream_url.rstrip("/"), 0)
        return await self._choose(stream_id, exclude, below_depth)

    def carried(self) -> dict[str, int]:
        """Streams this relay carries (a live upstream pull), with their tree depth."""
        return {sid: self.depth_of(sid) for sid, pull in self._pulls.items()
                if pull.state is PullState.CONNECTED}

    async def acquire(self, stream_id: str) -> MediaStream:
        """The stream, fed by a connected pull. A parent relay that fails to answer (hung, or
        lost the stream) is skipped for one more pick, so a viewer does not wait for the
        registry to notice it."""
        failed: set[str] = set()
        while True:
            stream = self._router.get_or_create(stream_id)
            lock = self._locks.setdefault(stream_id, asyncio.Lock())
            pull = self._pulls.get(stream_id)
            if pull is None or pull.stream is not stream or pull.state is not PullState.CONNECTED:
                # (a connected pull serves at once, even while a replacement holds the lock
                # waiting for its switch)
                async with lock:
                    pull = self._pulls.get(stream_id)
                    if pull is None or pull.stream is not stream:
                        upstream = await self._pick(stream_id, failed)
                        logger.info("stream %s: pulling from %s (depth %d)", stream_id,
                                    upstream.url, upstream.depth)
                        pull = self._start_pull(stream, upstream)
            parent = self._upstreams[stream_id].node_id
            timer = self._release_timers.pop(stream_id, None)
            if timer is not None:
                timer.cancel()
            try:
                await pull.ensure()
            except (NotLiveError, httpx.HTTPError) as exc:
                if not any(s.stream is stream for s in self._sessions.sessions(EgressSession)):
                    stream.end()
                if parent is not None and parent not in failed and stream.state is StreamState.ENDED:
                    logger.warning("stream %s: parent %s failed (%r); picking another", stream_id,
                                   parent, exc)
                    failed.add(parent)
                    continue
                if isinstance(exc, NotLiveError):
                    raise
                raise NotLiveError(f"upstream unreachable: {exc!r}", retry_after=2) from exc
            break
        if not any(s.stream is stream for s in self._sessions.sessions(EgressSession)):
            # the viewer that asked may still fail to negotiate and never become a session:
            # then nothing would ever release this pull (the timer finds the viewer if it came)
            self._arm_release(stream_id)
        return stream

    def _start_pull(self, stream: MediaStream, upstream: Upstream) -> UpstreamPull:
        pull = UpstreamPull(stream, upstream.url, self.http, self._retry_window,
                            on_stall=self._stalled, answer_timeout=_answer_timeout(upstream))
        self._pulls[stream.id] = pull
        self._upstreams[stream.id] = upstream
        stream.on_end(lambda: self._forget(stream.id, pull))
        return pull

    async def check_parents(self) -> None:
        """Re-parent every stream whose parent relay is gone, draining or lost the stream, and
        move every origin-fed stream whose binding names another origin."""
        await self._check_origins()
        if self._parent_ok is None:
            return
        parent_ok = self._parent_ok

        async def check(stream_id: str, upstream: Upstream) -> None:
            pull = self._pulls.get(stream_id)
            if upstream.node_id is None or pull is None:
                return
            if (await parent_ok(stream_id, upstream.node_id)
                    and not await self._parent_silent(pull)):
                return
            try:
                await self.reparent(stream_id, exclude={upstream.node_id})
            except Exception as exc:
                logger.warning("stream %s: re-parenting failed: %r", stream_id, exc)

        # a re-parent waits for its new source's key frame: streams move side by side
        await asyncio.gather(*(check(sid, up) for sid, up in list(self._upstreams.items())))

    async def _check_origins(self) -> None:
        now = time.monotonic()
        if self._origin_of is None or now - self._origin_checked < ORIGIN_CHECK_INTERVAL_S:
            return
        self._origin_checked = now
        fed = {sid: up for sid, up in self._upstreams.items() if up.node_id is None}
        if not fed:
            return
        try:
            bound = await self._origin_of(list(fed))
        except Exception as exc:  # the registry is down: keep every pull as it is
            logger.debug("origin bindings unavailable: %r", exc)
            return

        async def move(stream_id: str, target: Upstream) -> None:
            pull = self._pulls.get(stream_id)
            if pull is None or target.url == fed[stream_id].url:
                return
            if not await self._playable(target.url, stream_id):
                return  # the new origin's publisher is still connecting: next check
            try:
                if await self._replace_pull(stream_id, (), expected=pull):
                    self.origin_moves += 1
            except Exception as exc:  # the new origin's stream is not live yet: next check
                logger.info("stream %s: not moved to origin %s yet: %r", stream_id,
                            target.origin, exc)

        # each move waits for its new source's key frame: streams move side by side
        await asyncio.gather(*(move(sid, target) for sid, target in bound.items()))

    async def _playable(self, base_url: str, stream_id: str) -> bool:
        """HEAD /whep: is the stream live there (no peer connection spent on asking)?"""
        try:
            response = await self.http.head(f"{base_url}/whep/{stream_id}",
                                            timeout=PARENT_PROBE_TIMEOUT_S)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _parent_silent(self, pull: UpstreamPull) -> bool:
        """No media from the parent for PARENT_STALL_S and it does not answer /healthz: it died
        (the registry would only notice at TTL expiry)."""
        if pull.state is not PullState.CONNECTED or not pull.stream.tracks:
            return False
        last = max(t.last_packet_time for t in pull.stream.tracks.values())
        if time.monotonic() - last < PARENT_STALL_S:
            return False
        try:
            response = await self.http.get(f"{pull.upstream_url}/healthz",
                                           timeout=PARENT_PROBE_TIMEOUT_S)
            return response.status_code != 200
        except httpx.HTTPError:
            return True

    async def reparent(self, stream_id: str, exclude: Collection[str]) -> None:
        """Make before break: connect a new pull from another upstream, then close the old."""
        if await self._replace_pull(stream_id, exclude, None):
            self.reparents += 1

    async def _replace_pull(self, stream_id: str, exclude: Collection[str],
                            expected: UpstreamPull | None) -> bool:
        """Replace the stream's pull (only if it still is ``expected``, when given) by a new one
        from the chooser's pick, make before break: the new pull is connected and attached
        pending, the old one keeps feeding viewers until the stream switches to the new one (at
        its first video key frame, see MediaStream.attach_source), and only then is it closed."""
        lock = self._locks.setdefault(stream_id, asyncio.Lock())
        async with lock:
            old = self._pulls.get(stream_id)
            old_upstream = self._upstreams.get(stream_id)
            if (old is None or old.state is PullState.CLOSED or old_upstream is None
                    or (expected is not None and old is not expected)):
                return False
            upstream = await self._pick(stream_id, exclude, below_depth=old_upstream.depth)
            logger.warning("stream %s: pulling from %s instead of %s (depth %d)", stream_id,
                           upstream.url, old_upstream.url, upstream.depth)
            new = UpstreamPull(old.stream, upstream.url, self.http, self._retry_window,
                               on_stall=self._stalled,
                               consecutive_stalls=old.consecutive_stalls,
                               answer_timeout=_answer_timeout(upstream))
            try:
                await new.ensure()
                generation = new.generation
                switched = generation is not None and await old.stream.wait_switched(generation)
            except BaseException:
                await new.close()
                raise
            if not switched:  # the new pull left (or the stream ended) before it fed anyone
                await new.close()
                raise NotLiveError("the new upstream went away before the switch")
            self._pulls[stream_id] = new
            self._upstreams[stream_id] = upstream
            old.stream.on_end(lambda: self._forget(stream_id, new))
        # the old pull's lower simulcast layers feed their viewers until the new ones take over
        if not await new.wait_layers(LAYER_HANDOVER_TIMEOUT_S):
            logger.warning("stream %s: lower layers of the new pull not all feeding after %.0f s",
                           stream_id, LAYER_HANDOVER_TIMEOUT_S)
        await old.close()
        return True

    def _stalled(self, pull: UpstreamPull, reason: str) -> None:
        """The pull's media stopped (see UpstreamPull._watch): pull again, make before break,
        from wherever the chooser says now; if that fails, the pull reconnects in place."""
        async def replace() -> None:
            try:
                if await self._replace_pull(pull.stream.id, (), expected=pull):
                    self.stall_repulls += 1
            except Exception as exc:
                logger.warning("stream %s: pulling again after a stall failed (%r); reconnecting",
                               pull.stream.id, exc)
                pull.stalled_fallback()

        task = asyncio.ensure_future(replace())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def viewer_left(self, session: PeerSession) -> None:
        stream_id = session.stream.id
        if any(s.stream.id == stream_id for s in self._sessions.sessions(EgressSession)
               if s is not session):
            return
        self._arm_release(stream_id)

    def _arm_release(self, stream_id: str) -> None:
        """Release the stream's pull after the linger period unless a viewer uses it by then."""
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
            self._upstreams.pop(stream_id, None)
            lock = self._locks.get(stream_id)
            if lock is not None and not lock.locked():
                del self._locks[stream_id]
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


def _answer_timeout(upstream: Upstream) -> float:
    return 10.0 if upstream.node_id is None else PARENT_ANSWER_TIMEOUT_S

