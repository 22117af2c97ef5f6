"""The interactive layer as one component a node mounts: WebSocket route plus its lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from lotcast import keys, redisconn
from lotcast.auth import TokenAuthority
from lotcast.config import Settings
from lotcast.ids import STREAM_ID_RULE, is_valid_stream_id
from lotcast.interactive.chat import ChatStore
from lotcast.interactive.deadlines import SettleIndex
from lotcast.interactive.functions import RoomFunctions, durability_from
from lotcast.interactive.httpstream import AsgiEndpoint, HttpRoomEndpoints
from lotcast.interactive.hub import RoomHub
from lotcast.interactive.polls import PollStore
from lotcast.interactive.protocol import CloseCode
from lotcast.interactive.roomlog import RoomLog
from lotcast.interactive.session import ClientSession, InteractiveStats, SessionDeps
from lotcast.interactive.show import ShowStores
from lotcast.interactive.showlib import ShowFunctions
from lotcast.interactive.store import AuctionStore, RateLimit
from lotcast.interactive.subscriptions import Subscriptions, subscriptions_for
from lotcast.interactive.transport import RoomTransport, WebSocketTransport

log = logging.getLogger(__name__)

NodeKind = Literal["broadcaster", "relay"]
VIEWERS_INTERVAL = 1.0
VIEWERS_FRESH_MS = 5000
REDIS_CONNECTIONS = 64
# per cluster node (its pool does not block when full; RoomFunctions queues Function calls)
CLUSTER_NODE_CONNECTIONS = 256


class ServiceState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class InteractiveService:
    """Owns the node's Redis connection for bids/polls, its RoomHubs and the `/ws/{room}` route."""

    def __init__(self, settings: Settings, authority: TokenAuthority, node_kind: NodeKind) -> None:
        self.settings = settings
        self.authority = authority
        self.node_kind = node_kind
        self.node_id = settings.node_id or f"{node_kind}-{uuid.uuid4().hex[:8]}"
        self.state = ServiceState.NEW
        self.stats = InteractiveStats()
        # callbacks given each bid's arrival-to-ack time in seconds (e.g. a metrics histogram)
        self.bid_ack_observers: list[Callable[[float], None]] = []
        # ... and each reply's Function-answer-to-write delay (lotcast/interactive/ackwrite.py)
        self.ack_write_observers: list[Callable[[float], None]] = []
        self.hubs: dict[str, RoomHub] = {}
        self._hub_refs: dict[str, int] = {}
        self._hub_lock = asyncio.Lock()
        self._sessions: set[ClientSession] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._redis: aioredis.Redis | None = None
        self._subscriptions: Subscriptions | None = None
        self._index: SettleIndex | None = None
        self._deps: SessionDeps | None = None
        # the HTTP fallback transport; `http.count_observers` get its open stream count
        self.http = HttpRoomEndpoints(self.run_session,
                                      lambda: self.state is ServiceState.RUNNING, self.stats)

    def _set_state(self, new: ServiceState) -> None:
        log.debug("interactive service %s: %s -> %s", self.node_id, self.state.value, new.value)
        self.state = new

    @property
    def routes(self) -> list[BaseRoute]:
        methods = ["POST", "OPTIONS"]
        return [WebSocketRoute("/ws/{room}", self._ws_endpoint),
                Route("/room/{room}/stream", AsgiEndpoint(self.http.stream), methods=methods),
                Route("/room/{room}/send", AsgiEndpoint(self.http.post), methods=methods),
                Route("/interactive/stats", self._stats_endpoint)]

    def _bid_acked(self, seconds: float) -> None:
        for observe in self.bid_ack_observers:
            observe(seconds)

    def _ack_written(self, seconds: float) -> None:
        for observe in self.ack_write_observers:
            observe(seconds)

    async def start(self) -> None:
        if self.state is not ServiceState.NEW:
            raise RuntimeError(f"Cannot start interactive service in state {self.state.value!r}")
        s = self.settings
        cluster = redisconn.parse_redis_url(s.redis_url, cluster=s.redis_cluster).mode \
            is redisconn.RedisMode.CLUSTER
        self._redis = redisconn.connect(
            s.redis_url, cluster=s.redis_cluster, health_check_interval=10,
            max_connections=CLUSTER_NODE_CONNECTIONS if cluster else REDIS_CONNECTIONS)
        durability = durability_from(s.redis_ack, s.redis_wait_timeout_ms)
        functions = RoomFunctions(self._redis, s.room_history, durability)
        await functions.load()
        show_functions = ShowFunctions(self._redis, s.room_history)
        await show_functions.load()
        self._index = functions.index
        await self._index.migrate_legacy()
        bid_limit = RateLimit(s.bid_rate, s.bid_burst)
        roomlog = RoomLog(self._redis, functions)
        self._subscriptions = subscriptions_for(self._redis)
        self._deps = SessionDeps(
            settings=s, node_id=self.node_id, authority=self.authority,
            auctions=AuctionStore(functions, bid_limit),
            polls=PollStore(functions, RateLimit(s.vote_rate, s.vote_burst)),
            roomlog=roomlog, acquire_hub=self._acquire_hub, release_hub=self._release_hub,
            count_viewers=self._count_viewers, stats=self.stats, on_bid_ack=self._bid_acked,
            on_ack_write=self._ack_written,
            show=ShowStores.build(functions, bid_limit, self.node_id,
                                  RateLimit(s.reaction_rate, s.reaction_burst), show_functions),
            chat=ChatStore(functions, RateLimit(s.chat_rate, s.chat_burst),
                           RateLimit(s.upvote_rate, s.upvote_burst)))
        self._tasks = [asyncio.create_task(self._settle_loop(), name="interactive-settle"),
                       asyncio.create_task(self._viewers_loop(), name="interactive-viewers")]
        self._set_state(ServiceState.RUNNING)

    async def close(self) -> None:
        if self.state is ServiceState.CLOSED:
            return
        self._set_state(ServiceState.CLOSED)
        for session in list(self._sessions):
            session.close_soon(CloseCode.GOING_AWAY, "node shutting down")
        for _ in range(150):  # up to ~3 s for sessions to send their close frames
            if not self._sessions:
                break
            await asyncio.sleep(0.02)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for hub in list(self.hubs.values()):
            await hub.close()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for room in self.hubs:
                        pipe.hdel(keys.room_viewers(room), self.node_id)
                    await pipe.execute()
        self.hubs.clear()
        if self._subscriptions is not None:
            await self._subscriptions.close()
        if self._redis is not None:
            if redisconn.is_cluster(self._redis):
                await self._redis.aclose()  # closes every node's pool
            else:
                await self._redis.aclose(close_connection_pool=True)

    # --- WebSocket -----------------------------------------------------------------------------

    async def _ws_endpoint(self, websocket: WebSocket) -> None:
        room = websocket.path_params["room"]
        if not is_valid_stream_id(room):
            # before the upgrade: uvicorn answers HTTP 403
            await websocket.close(code=1008, reason=STREAM_ID_RULE)
            return
        if self.state is not ServiceState.RUNNING or self._deps is None:
            await websocket.close(code=int(CloseCode.GOING_AWAY), reason="not serving")
            return
        await self.run_session(WebSocketTransport(websocket), room)

    async def run_session(self, transport: RoomTransport, room: str) -> ClientSession | None:
        """Serve one client connection of `room` (any transport) until it ends."""
        if self.state is not ServiceState.RUNNING or self._deps is None:
            return None
        session = ClientSession(transport, room, self._deps)
        self._sessions.add(session)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
        return session

    async def _stats_endpoint(self, request: Request) -> JSONResponse:
        body = asdict(self.stats)
        body["node"] = self.node_id
        body["by_room"] = {room: len(hub.sockets) for room, hub in self.hubs.items()}
        body["hubs"] = {room: asdict(hub.stats) for room, hub in self.hubs.items()}
        return JSONResponse(body)

    # --- hubs ------------------------------------------------------------------------------------

    async def _acquire_hub(self, room: str) -> RoomHub:
        async with self._hub_lock:
            hub = self.hubs.get(room)
            if hub is None:
                assert self._deps is not None and self._subscriptions is not None
                s = self.settings
                hub = RoomHub(room, self._deps.roomlog, s.ws_flush_interval_ms / 1000,
                              s.tally_interval_ms / 1000)
                await self._subscriptions.subscribe(keys.room_channel(room), hub.feed)
                await hub.start()
                self.hubs[room] = hub
            self._hub_refs[room] = self._hub_refs.get(room, 0) + 1
            return hub

    async def _release_hub(self, room: str) -> None:
        async with self._hub_lock:
            refs = self._hub_refs.get(room, 0) - 1
            if refs > 0:
                self._hub_refs[room] = refs
                remaining = True
            else:
                remaining = False
                self._hub_refs.pop(room, None)
                hub = self.hubs.pop(room, None)
                if hub is None:
                    return
                if self._subscriptions is not None:
                    await self._subscriptions.unsubscribe(keys.room_channel(room))
                await hub.close()
                if self._redis is not None:
                    with contextlib.suppress(Exception):
                        await self._redis.hdel(keys.room_viewers(room), self.node_id)
        if remaining:
            with contextlib.suppress(Exception):  # the heartbeat corrects it within a second
                total = await self._count_viewers(room)
                if (hub := self.hubs.get(room)) is not None:
                    hub.set_viewers(total)

    # --- background loops ---------------------------------------------------------------------

    async def _settle_loop(self) -> None:
        """Any node may settle any room: the Function decides each lot's end exactly once."""
        interval = self.settings.settle_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            try:
                await self.settle_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("settle pass failed: %r", exc)

    async def settle_due(self) -> int:
        assert self._redis is not None and self._deps is not None and self._index is not None
        # Redis's clock (on a cluster, any node's: the primaries' clocks decide the deadlines,
        # and the settle Function itself checks each one against its own)
        seconds, micros = await self._redis.time()
        now_ms = seconds * 1000 + micros // 1000
        settled = 0
        for room in await self._index.due(now_ms, 200):
            try:
                count, _ = await self._deps.auctions.settle(room)  # also updates the index
            except RedisError as exc:  # that room's shard failing over, or another version's
                log.debug("room %s not settled this pass: %r", room, exc)
                continue
            settled += count
        return settled

    async def _viewers_loop(self) -> None:
        while True:
            await asyncio.sleep(VIEWERS_INTERVAL)
            try:
                await self._update_viewers()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("viewer count update failed: %r", exc)

    async def _update_viewers(self) -> None:
        """Each node writes its socket count per room; everyone sums the fresh entries."""
        rooms = list(self.hubs.items())
        if not rooms:
            return
        if self._index is not None:
            await self._index.refresh([room for room, _ in rooms])
        others = await self._write_counts(rooms)
        for (_room, hub), elsewhere in zip(rooms, others, strict=True):
            hub.set_viewers(elsewhere + len(hub.sockets))

    async def _count_viewers(self, room: str) -> int:
        """Write this node's count for `room` now (a socket joined or left) and return the sum."""
        hub = self.hubs.get(room)
        if hub is None:
            return 0
        elsewhere = (await self._write_counts([(room, hub)]))[0]
        return elsewhere + len(hub.sockets)

    async def _write_counts(self, rooms: list[tuple[str, RoomHub]]) -> list[int]:
        """Write this node's socket count of each room; return the fresh counts of the other nodes.

        Callers add this node's own count at the moment they use the sum: concurrent calls
        (a join and a leave) may complete in any order, and a count read before a local join
        must not overwrite one read after it."""
        assert self._redis is not None
        now_ms = int(time.time() * 1000)
        async with self._redis.pipeline(transaction=False) as pipe:
            for room, hub in rooms:
                pipe.hset(keys.room_viewers(room), self.node_id, f"{len(hub.sockets)}:{now_ms}")
                pipe.pexpire(keys.room_viewers(room), VIEWERS_FRESH_MS * 12)
                pipe.hgetall(keys.room_viewers(room))
            results = await pipe.execute()
        others = []
        me = self.node_id.encode()
        for i in range(len(rooms)):
            total = 0
            for node, value in results[i * 3 + 2].items():
                count, _, stamp = value.decode().partition(":")
                if node != me and now_ms - int(stamp) <= VIEWERS_FRESH_MS:
                    total += int(count)
            others.append(total)
        return others
