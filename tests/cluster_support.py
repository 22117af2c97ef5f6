"""Multi-process scale-out helpers: a cluster of real processes and a viewer that re-places itself.

`scaled_cluster` starts the broadcaster and N relays (each a `python -m lotcast` process) against a
real Redis, with a small capacity and a fast heartbeat. `LadderViewer` is what the viewer page does
(viewer_web/static/js/whep.js): ask `/api/streams/{id}/edge` on any node, play from the relay it
names over WHEP, and when the media stalls and the relay does not answer (or the room socket closes
with 1001 because the relay drains), ask for placement again — excluding that relay — and start a
new WHEP session there. A drain move is make-before-break: the new session plays before the old one
is let go.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from media_support import SECRET, Viewer

from lotcast.interactive.client import RoomClient, RoomState
from lotcast.media.testsource import decode_delay_ms, read
from lotcast.redis_server import RedisServer
from lotcast.supervisor import ServiceProcess

STALL_S = 1.0  # no decoded frame for this long: probe the relay (as whep.js does)
PROBE_TIMEOUT_S = 1.0
FIRST_FRAME_STALL_S = 3.0  # before the first frame the relay may still wait for a key frame


@dataclass
class ScaledCluster:
    origin: ServiceProcess
    env: dict[str, str]
    capacity: int
    drain_timeout: float
    relays: dict[str, ServiceProcess] = field(default_factory=dict)

    def add_relay(self, node_id: str, origin_url: str | None = None,
                  extra_env: dict[str, str] | None = None) -> ServiceProcess:
        """Start one more relay (scale-out); `origin_url` pins its upstream (a static chain)."""
        proc = ServiceProcess("relay", ["--port", "0", "--origin-url",
                                        origin_url or self.origin.url,
                                        "--node-id", node_id, "--max-viewers", str(self.capacity),
                                        "--drain-timeout", str(self.drain_timeout)],
                              env={**self.env, **(extra_env or {})}).start()
        self.relays[node_id] = proc
        _NODE_IDS[proc.url] = node_id
        return proc

    @property
    def entry_urls(self) -> list[str]:
        """Every node a viewer may ask for placement (the origin first)."""
        return [self.origin.url, *(p.url for p in self.relays.values())]

    def node_of(self, url: str) -> str | None:
        for node_id, proc in self.relays.items():
            if url.startswith(proc.url):
                return node_id
        return None


def cluster_env(redis: RedisServer, heartbeat: float) -> dict[str, str]:
    return {"LOTCAST_JWT_SECRET": SECRET, "LOTCAST_REDIS_URL": redis.url,
            "LOTCAST_LOG_LEVEL": "warning", "LOTCAST_HEARTBEAT_INTERVAL": str(heartbeat),
            # one process per relay (also when load/cluster_bench.py runs this outside pytest)
            "LOTCAST_WORKERS": os.environ.get("LOTCAST_WORKERS", "1")}


@contextlib.contextmanager
def scaled_cluster(redis: RedisServer, relays: int = 3, capacity: int = 5, heartbeat: float = 0.5,
                   drain_timeout: float = 20.0,
                   relay_env: dict[str, str] | None = None) -> Iterator[ScaledCluster]:
    env = cluster_env(redis, heartbeat)
    origin = ServiceProcess("broadcaster", ["--port", "0"], env=env).start()
    cluster = ScaledCluster(origin, env, capacity, drain_timeout)
    try:
        for i in range(relays):
            cluster.add_relay(f"relay-{i}", extra_env=relay_env)
        yield cluster
    finally:
        for proc in reversed(list(cluster.relays.values())):
            proc.kill()  # SIGKILL: teardown speed matters more than a graceful exit here
        origin.stop()


class TimedViewer(Viewer):
    """A media_support Viewer that also records when each frame was decoded."""

    def __init__(self, base_url: str, stream: str) -> None:
        super().__init__(base_url, stream)
        self.frame_times: list[float] = []

    async def _video(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await track.recv()
                counter, wall_ms = read(frame)  # type: ignore[arg-type]
                now = time.monotonic()
                if self.first_frame_at is None:
                    self.first_frame_at = now
                self.frame_times.append(now)
                self.counters.append(counter)
                self.delays_ms.append(decode_delay_ms(wall_ms))

    @property
    def last_frame_at(self) -> float:
        return self.frame_times[-1] if self.frame_times else self.started_at


class PlacementError(Exception):
    pass


class LadderViewer:
    """One viewer that plays via placement and re-places itself on relay failure or drain."""

    def __init__(self, entry_urls: list[str], stream: str, room: str | None = None,
                 name: str = "") -> None:
        self.entry_urls = list(entry_urls)
        self.stream = stream
        self.room = room
        self.name = name
        self.current: TimedViewer | None = None
        self.relay_url = ""
        self.history: list[tuple[str, TimedViewer]] = []  # (relay url, session), oldest first
        self.moves: list[tuple[str, float, float | None]] = []  # (reason, started, playing at)
        self.failures: list[str] = []
        self._watchdog: asyncio.Task[None] | None = None
        self._room_task: asyncio.Task[None] | None = None
        self._room_client: RoomClient | None = None
        self._moving = False
        self._stopped = False
        self.room_joins = 0
        self.http = httpx.AsyncClient(timeout=3.0)

    # --- placement --------------------------------------------------------------------------

    async def place(self, exclude: set[str], within: float = 15.0) -> str:
        """The WHEP URL placement gives us, asking the entry nodes in turn (honours Retry-After)."""
        deadline = time.monotonic() + within
        query = f"?exclude={','.join(sorted(exclude))}" if exclude else ""
        while time.monotonic() < deadline:
            retry = 0.5
            for entry in self.entry_urls:
                try:
                    r = await self.http.get(f"{entry}/api/streams/{self.stream}/edge{query}")
                except httpx.HTTPError:
                    continue  # that node is down: ask another
                if r.status_code == 307:
                    return str(r.headers["location"])
                if r.status_code == 503:
                    retry = min(float(r.headers.get("retry-after", "1")), 1.0)
                    break
            await asyncio.sleep(retry)
        raise PlacementError(f"{self.name}: no placement within {within}s")

    async def _open(self, exclude: set[str]) -> TimedViewer:
        whep = await self.place(exclude)
        base = whep.split("/whep/")[0]
        viewer = TimedViewer(base, self.stream)
        viewer.url = whep
        await viewer.start()
        # a full relay may have sent us on (307): the session lives where the POST ended up
        assert viewer.resource is not None
        relay_url = viewer.resource.split("/whep/")[0]
        self.history.append((relay_url, viewer))
        return viewer

    async def start(self) -> None:
        self.current = await self._open(set())
        self.relay_url = self.history[-1][0]
        self._watchdog = asyncio.ensure_future(self._watch())
        if self.room is not None:
            await self._join_room()

    # --- the ladder ---------------------------------------------------------------------------

    def node_id(self, url: str | None = None) -> str:
        """The relay's node id as the registry knows it (from its /api/stats, cached by url)."""
        return _NODE_IDS.get(url or self.relay_url, "")

    async def _relay_alive(self, url: str) -> bool:
        try:
            r = await self.http.get(f"{url}/healthz", timeout=PROBE_TIMEOUT_S)
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    async def _watch(self) -> None:
        while not self._stopped:
            await asyncio.sleep(0.1)
            viewer = self.current
            if viewer is None or self._moving:
                continue
            broken = viewer.pc.connectionState in ("failed", "closed")
            stall = STALL_S if viewer.frame_times else FIRST_FRAME_STALL_S
            if not broken and time.monotonic() - viewer.last_frame_at > stall:
                broken = not await self._relay_alive(self.relay_url)
            if broken and not self._moving and viewer is self.current:
                await self.move("relay unreachable", break_first=True)

    async def move(self, reason: str, break_first: bool) -> None:
        """Re-place on another relay. `break_first`: the old session is already dead."""
        if self._moving or self._stopped:
            return
        self._moving = True
        started = time.monotonic()
        old, old_url = self.current, self.relay_url
        self.moves.append((reason, started, None))
        try:
            if break_first and old is not None:
                await old.stop(delete=False)
            exclude = {await _node_id_of(self.http, old_url)} - {""}
            new: TimedViewer | None = None
            for _attempt in range(5):
                try:
                    new = await self._open(exclude)
                except (PlacementError, AssertionError, httpx.HTTPError) as exc:
                    self.failures.append(f"{reason}: {exc!r}")
                    await asyncio.sleep(0.5)
                    continue
                deadline = time.monotonic() + FIRST_FRAME_STALL_S * 2
                while new.first_frame_at is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                if new.first_frame_at is not None:
                    break
                # a session that never plays: drop it and ask for placement again
                self.failures.append(f"{reason}: no first frame from {self.history[-1][0]}")
                await new.stop(delete=True)
                new = None
            if new is None:
                return
            self.current, self.relay_url = new, self.history[-1][0]
            self.moves[-1] = (reason, started, new.first_frame_at)
            if not break_first and old is not None:
                await old.stop(delete=True)
            if self.room is not None:
                await self._join_room()
        finally:
            self._moving = False

    # --- the room socket (drain notice) -------------------------------------------------------

    async def _join_room(self) -> None:
        """Join the room on the current relay; after a move, resume from the last offset seen
        (the server replays what was missed), keeping the same RoomState."""
        assert self.room is not None
        if self._room_task is not None and self._room_task is not asyncio.current_task():
            self._room_task.cancel()  # (a drain move runs in the room task itself)
        old = self._room_client
        client = RoomClient(self.relay_url, self.room)
        resume = None
        if old is not None:
            client.state = old.state
            if old.state.epoch:
                resume = (old.state.epoch, old.state.offset)
            with contextlib.suppress(Exception):
                await old.close()
        try:
            await client.connect(resume=resume)
        except Exception as exc:
            self.failures.append(f"room connect: {exc!r}")
            return
        self.room_joins += 1
        self._room_client = client
        self._room_task = asyncio.ensure_future(self._room_watch(client))

    @property
    def room_state(self) -> RoomState | None:
        return self._room_client.state if self._room_client is not None else None

    async def room_caught_up(self, offset: int, within: float) -> bool:
        client = self._room_client
        if client is None:
            return False
        try:
            await client.wait_for(lambda s: s.offset >= offset, within=within)
        except TimeoutError:
            return False
        return True

    async def _room_watch(self, client: RoomClient) -> None:
        code = await client.wait_closed(within=3600)
        if code == 1001 and client is self._room_client and not self._stopped:
            await self.move("relay draining (ws 1001)", break_first=False)

    # --- results ------------------------------------------------------------------------------

    @property
    def frame_times(self) -> list[float]:
        return sorted(t for _, v in self.history for t in v.frame_times)

    def played_again_at(self, t: float) -> float | None:
        """When a session started after `t` (a re-placement) decoded its first frame."""
        firsts = [v.first_frame_at for _, v in self.history
                  if v.started_at > t and v.first_frame_at is not None]
        return min(firsts) if firsts else None

    def frames_since(self, t: float) -> int:
        return sum(1 for x in self.frame_times if x >= t)

    def max_gap(self, start: float, end: float) -> float:
        """Longest time without a decoded frame (any session) within [start, end]."""
        times = [t for t in self.frame_times if start <= t <= end]
        points = [start, *times, end]
        return max(b - a for a, b in itertools.pairwise(points))

    def delays_ms(self) -> list[float]:
        return [d for _, v in self.history for d in v.delays_ms]

    async def stop(self) -> None:
        self._stopped = True
        for task in (self._watchdog, self._room_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._room_client is not None:
            with contextlib.suppress(Exception):
                await self._room_client.close()
        for _, viewer in self.history:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(viewer.stop(delete=viewer is self.current), 3)
        await self.http.aclose()


_NODE_IDS: dict[str, str] = {}


async def _node_id_of(http: httpx.AsyncClient, relay_url: str) -> str:
    """A relay's node id (asked once, while it is alive; cached for when it is not)."""
    if relay_url in _NODE_IDS:
        return _NODE_IDS[relay_url]
    try:
        r = await http.get(f"{relay_url}/api/stats", timeout=PROBE_TIMEOUT_S)
        _NODE_IDS[relay_url] = str(r.json()["node_id"])
    except (httpx.HTTPError, ValueError, KeyError):
        return ""
    return _NODE_IDS[relay_url]


async def remember_node_ids(cluster: ScaledCluster) -> None:
    async with httpx.AsyncClient() as http:
        for node_id, proc in cluster.relays.items():
            _NODE_IDS[proc.url] = node_id
            await _node_id_of(http, proc.url)


async def relay_stats(cluster: ScaledCluster) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    async with httpx.AsyncClient(timeout=3) as http:
        for node_id, proc in cluster.relays.items():
            if not proc.alive():
                continue
            with contextlib.suppress(httpx.HTTPError):
                out[node_id] = (await http.get(f"{proc.url}/api/stats")).json()
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
