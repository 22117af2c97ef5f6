"""Placement of WHIP POSTs over several origins (issue 13), in front of the WHIP endpoint.

A WHIP POST to any origin is answered here first:
- the stream is bound (lotcast/ops/origins.py) to another origin that is alive and serving:
  `307` to it (it answers 409 itself when the stream has a publisher there);
- bound to an origin that is dead or draining, or unbound: the least-loaded serving origin with
  room takes it; when that is another origin, `307` there (`?from=<this node>`: the target serves
  it without redirecting again), otherwise the binding is claimed here (atomically, in Redis) and
  the POST goes on to the WHIP endpoint;
- this origin is draining and no other can take it: `503` + Retry-After.

A holder that still looks alive in the registry (its entry lasts 3 heartbeats after a crash) is
probed with a TCP connect to its URL before a POST is sent to it: one that refuses or does not
answer within `HOLDER_PROBE_TIMEOUT_S` is treated as dead at once, so a crashed origin's
publisher that republishes here is served here instead of being sent back to the dead origin
until its entry expires.

`GET /api/streams/{stream}/ingest` answers the same decision as JSON without claiming anything
(the host page asks it before POSTing: browsers drop Authorization on a cross-origin redirect).

Every 201 and every JSON answer lists the serving origins (`Lotcast-Origins`), so the host page
knows where else to publish when its origin dies. With Redis unreachable the POST is served here
(one origin keeps working without the registry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lotcast.auth import AuthError, Role, TokenAuthority
from lotcast.ids import STREAM_ID_RULE, is_valid_stream_id
from lotcast.media.endpoints import CORS, error_response
from lotcast.media.stream import StreamRouter
from lotcast.ops.node import NodeInfo, NodeState
from lotcast.ops.origins import StreamBindings, origins, pick_origin, whip_url
from lotcast.ops.registry import read_live_nodes

logger = logging.getLogger(__name__)

ORIGINS_HEADER = "Lotcast-Origins"
RETRY_AFTER = 2
HOLDER_PROBE_TIMEOUT_S = 1.0
_EXPOSE = CORS["Access-Control-Expose-Headers"] + f", {ORIGINS_HEADER}"


@dataclass(frozen=True)
class Decision:
    """Serve here (`local`), redirect to `target`, or refuse with `status` + `reason`."""

    local: bool = False
    target: NodeInfo | None = None
    status: int = 0
    reason: str = ""
    take_over: str | None = None  # the dead/draining origin whose binding we may take


def decide(nodes: list[NodeInfo], me: str, holder: str | None, draining: bool, placed: bool,
           has_room: bool, now_ms: int, stale_after: float) -> Decision:
    """Pure: where a WHIP POST for a stream bound to `holder` (None: unbound) goes.
    `placed`: another origin already sent it here (never bounce it on)."""
    live = origins(nodes, now_ms, stale_after)
    take_over: str | None = None
    if holder is not None and holder != me:
        bound = live.get(holder)
        if bound is not None and bound.state is NodeState.SERVING:
            return Decision(target=bound)
        take_over = holder  # dead or draining: its stream may move
    if draining:
        best = pick_origin(nodes, now_ms, stale_after,
                           exclude={me} if holder is None else {me, holder})
        if best is None:
            return Decision(status=503, reason="origin is draining and no other origin has room")
        return Decision(target=best)
    if placed or holder == me:
        return Decision(local=True, take_over=take_over)
    best = pick_origin(nodes, now_ms, stale_after, exclude={take_over} if take_over else ())
    if best is None or best.node_id == me:
        if not has_room and best is None:
            return Decision(status=503, reason="no origin has room for another stream")
        return Decision(local=True, take_over=take_over)
    return Decision(target=best)


async def reachable(url: str) -> bool:
    """Whether a node's URL accepts a TCP connection (liveness only, so no TLS: a crashed origin
    refuses it, a lost machine does not answer)."""
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        async with asyncio.timeout(HOLDER_PROBE_TIMEOUT_S):
            _, writer = await asyncio.open_connection(parts.hostname, port)
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class IngestPlacer:
    def __init__(self, redis: aioredis.Redis, bindings: StreamBindings, router: StreamRouter,
                 publish: Callable[[Request], Awaitable[Response]], authority: TokenAuthority,
                 *, node_id: str,
                 stale_after: float, capacity: int, draining: Callable[[], bool],
                 load_changed: Callable[[], Awaitable[None]], public_url: str) -> None:
        self.redis = redis
        self.public_url = public_url.rstrip("/")
        self.bindings = bindings
        self.router = router
        self.publish_here = publish
        self.authority = authority
        self.node_id = node_id
        self.stale_after = stale_after
        self.capacity = capacity
        self.draining = draining
        self.load_changed = load_changed
        self._watched: set[str] = set()  # streams whose end releases the binding
        self.redirects = 0

    @property
    def routes(self) -> list[Route]:
        return [Route("/whip/{stream}", self.post, methods=["POST"]),
                Route("/api/streams/{stream}/ingest", self.ingest, methods=["GET"])]

    async def _decide(self, stream: str, placed: bool) -> tuple[Decision, list[NodeInfo]]:
        nodes = await read_live_nodes(self.redis)
        holder = await self.bindings.holder(stream)
        if holder is not None and holder != self.node_id:
            nodes = await self._without_dead(nodes, holder)
        decision = decide(nodes, self.node_id, holder, self.draining(), placed,
                          len(self.bindings.held) < self.capacity, int(time.time() * 1000),
                          self.stale_after)
        return decision, nodes

    async def _without_dead(self, nodes: list[NodeInfo], holder: str) -> list[NodeInfo]:
        """`nodes` without the holder when its registry entry outlived it (it does not answer).
        Only a holder `decide` would send the POST to is probed (fresh and serving)."""
        live = origins(nodes, int(time.time() * 1000), self.stale_after)
        bound = live.get(holder)
        if bound is None or bound.state is not NodeState.SERVING or await reachable(bound.url):
            return nodes
        logger.warning("origin %s holds a stream but does not answer at %s: treated as dead",
                       holder, bound.url)
        return [n for n in nodes if n is not bound]

    def serving_urls(self, nodes: list[NodeInfo]) -> list[str]:
        now_ms = int(time.time() * 1000)
        return [n.url.rstrip("/") for n in origins(nodes, now_ms, self.stale_after).values()
                if n.state is NodeState.SERVING]

    def _redirect(self, target: NodeInfo, stream: str) -> Response:
        self.redirects += 1
        return Response(status_code=307, headers={
            **CORS, "Location": self._target_url(target, stream), "Cache-Control": "no-store"})

    def _target_url(self, target: NodeInfo, stream: str) -> str:
        return f"{whip_url(target, quote(stream, safe=''))}?from={quote(self.node_id, safe='')}"

    async def post(self, request: Request) -> Response:
        stream = str(request.path_params["stream"])
        if not is_valid_stream_id(stream):
            return await self.publish_here(request)  # the endpoint answers 400 with the rule
        try:  # the token before placement, as the endpoint checks it (docs/http-api.md)
            self.authority.from_authorization(request.headers.get("authorization"), Role.HOST)
        except AuthError as exc:
            headers = {"WWW-Authenticate": 'Bearer realm="lotcast"'} if exc.status == 401 else {}
            return error_response(exc.status, exc.reason, headers)
        placed = bool(request.query_params.get("from"))
        try:
            decision, nodes = await self._decide(stream, placed)
            for attempt in range(2):
                if not decision.local:
                    break
                claim = await self.bindings.claim(stream, decision.take_over)
                if claim.mine:
                    break
                # lost a race: the stream is bound to another origin now; decide again
                decision, nodes = await self._decide(stream, placed)
                if decision.local and attempt == 1:
                    decision = Decision(status=409, reason=f"stream {stream!r} is being "
                                        f"published on origin {claim.holder}")
        except (RedisError, OSError) as exc:
            logger.warning("stream %s: origin placement unavailable (%r); serving here", stream, exc)
            return await self.publish_here(request)
        if decision.target is not None:
            return self._redirect(decision.target, stream)
        if not decision.local:
            return Response(decision.reason + "\n", status_code=decision.status,
                            media_type="text/plain",
                            headers={**CORS, "Retry-After": str(RETRY_AFTER)})
        await self.load_changed()
        response = await self.publish_here(request)
        media = self.router.get(stream)
        if response.status_code == 201 and media is not None:
            if stream not in self._watched:
                self._watched.add(stream)
                media.on_end(lambda: self._ended(stream))
            response.headers[ORIGINS_HEADER] = ", ".join(self.serving_urls(nodes))
            response.headers["Access-Control-Expose-Headers"] = _EXPOSE
        elif media is None and stream in self.bindings.held:
            await self._release(stream)
        return response

    def _ended(self, stream: str) -> None:
        self._watched.discard(stream)
        task = asyncio.ensure_future(self._release(stream))
        task.add_done_callback(lambda t: None if t.cancelled() else t.exception())

    async def _release(self, stream: str) -> None:
        try:
            await self.bindings.release(stream)
        except (RedisError, OSError) as exc:
            logger.warning("stream %s: binding not released (expires by TTL): %r", stream, exc)
        await self.load_changed()

    async def ingest(self, request: Request) -> Response:
        stream = str(request.path_params["stream"])
        headers = {**CORS, "Cache-Control": "no-store"}
        if not is_valid_stream_id(stream):
            return Response(f"{STREAM_ID_RULE}\n", 400, headers=headers, media_type="text/plain")
        try:
            decision, nodes = await self._decide(stream, placed=False)
        except (RedisError, OSError):
            return Response("origin placement unavailable (registry down)\n", 503,
                            headers={**headers, "Retry-After": str(RETRY_AFTER)},
                            media_type="text/plain")
        serving = self.serving_urls(nodes)
        headers[ORIGINS_HEADER] = ", ".join(serving)
        headers["Access-Control-Expose-Headers"] = _EXPOSE
        if decision.target is not None:
            target = decision.target
            url = self._target_url(target, stream)
        elif decision.local:
            target = None
            url = (f"{self.public_url}/whip/{quote(stream, safe='')}"
                   f"?from={quote(self.node_id, safe='')}")
        else:
            return Response(decision.reason + "\n", decision.status, media_type="text/plain",
                            headers={**headers, "Retry-After": str(RETRY_AFTER)})
        return JSONResponse({"whip_url": url,
                             "origin": target.node_id if target else self.node_id,
                             "origins": serving}, headers=headers)
