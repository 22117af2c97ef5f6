"""A relay worker's siblings: the other worker processes of the same node (lotcast/workers.py).

Connections reach the workers of a node at random (SO_REUSEPORT), but state is per worker: a
WHEP session, an HTTP-fallback room session. So a worker forwards to its siblings, over their
private unix sockets, what it cannot answer itself:

- a WHEP POST when it is full: a sibling with room serves the viewer (its 201 is returned as is;
  the media then flows between the viewer and that sibling's UDP socket);
- PATCH/DELETE of a WHEP session, the WHEP extensions' POSTs (`{session}/sse`, `{session}/layer`)
  and POST /room/{room}/send of a room session it does not hold: the sibling holding it answers
  (404 only when none does); a GET of a session's event stream (`{session}/sse/{id}`) is passed
  through from that sibling as it is written;
- /api/stats and /metrics: the node as a whole (every worker's stats; every worker's series
  with a `worker` label).

A request that arrived over a worker's unix socket came from a sibling: it is answered locally
and never forwarded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lotcast.interactive.protocol import SESSION_HEADER
from lotcast.ops.metrics import LOAD_RATIO_METRIC
from lotcast.workers import WorkerSpec

log = logging.getLogger(__name__)

# Response headers that describe the hop, not the answer.
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "date",
               "server"}
FORWARD_TIMEOUT = 15.0
# Summed over the workers in the node's /api/stats.
SUMMED_STATS = ("viewers", "capacity", "sessions", "websockets", "forwarded_packets",
                "udp_sockets", "reparents", "stall_repulls")


def via_sibling(scope: Scope) -> bool:
    """True for a request that came in over this worker's unix socket (from a sibling)."""
    server = scope.get("server")
    return server is not None and server[1] is None


class Siblings:
    """HTTP clients of the other workers of this node, one per sibling unix socket."""

    def __init__(self, spec: WorkerSpec, tls: bool, timeout: float = FORWARD_TIMEOUT) -> None:
        self.spec = spec
        scheme = "https" if tls else "http"
        # the socket lives in the parent's 0700 run directory: the peer is our sibling, and a
        # TLS listener there presents the node's public certificate, not one for "w<i>"
        self._clients = {
            i: httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(spec.socket_path(i))),
                                 base_url=f"{scheme}://w{i}", verify=False, timeout=timeout)
            for i in spec.siblings()}

    async def ask(self, worker: int, method: str, path: str, headers: Mapping[str, str],
                  body: bytes = b"") -> httpx.Response | None:
        """One sibling's answer, or None when it cannot be reached (dead, restarting)."""
        try:
            return await self._clients[worker].request(method, path, headers=_forwarded(headers),
                                                       content=body)
        except httpx.HTTPError as exc:
            log.info("worker w%d unreachable for %s %s: %r", worker, method, path, exc)
            return None

    async def first(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
                    accept: Callable[[int], bool]) -> httpx.Response | None:
        """The first sibling answer whose status `accept`s, asking them in turn."""
        for worker in self.spec.siblings():
            answer = await self.ask(worker, method, path, headers, body)
            if answer is not None and accept(answer.status_code):
                return answer
        return None

    async def open_stream(self, method: str, path: str,
                          headers: Mapping[str, str]) -> httpx.Response | None:
        """The first sibling answer other than 404, its body not read yet (an event stream):
        the caller reads it with ``aiter_raw`` and must ``aclose`` it."""
        sent = _forwarded(headers)
        for worker in self.spec.siblings():
            client = self._clients[worker]
            try:
                # no read timeout: an idle event stream only sends a keepalive every 15 s
                request = client.build_request(method, path, headers=sent,
                                               timeout=httpx.Timeout(FORWARD_TIMEOUT, read=None))
                answer = await client.send(request, stream=True)
            except httpx.HTTPError as exc:
                log.info("worker w%d unreachable for %s %s: %r", worker, method, path, exc)
                continue
            if answer.status_code != 404:
                return answer
            await answer.aclose()
        return None

    async def gather(self, path: str) -> list[tuple[int, httpx.Response]]:
        """GET `path` from every sibling at once; unreachable ones and non-200s are left out."""
        workers = list(self.spec.siblings())
        answers = await asyncio.gather(*(self.ask(w, "GET", path, {}) for w in workers))
        return [(w, a) for w, a in zip(workers, answers, strict=True)
                if a is not None and a.status_code == 200]

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()


def _forwarded(headers: Mapping[str, str]) -> dict[str, str]:
    """A client's request headers as sent on to a sibling (which sets its own host and length)."""
    return {k: v for k, v in headers.items() if k.lower() not in ("host", "content-length")}


def relayed(answer: httpx.Response) -> Response:
    """A sibling's answer, returned to our client unchanged."""
    headers = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS}
    return Response(answer.content, status_code=answer.status_code, headers=headers)


def node_stats(node_id: str, workers: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The node's /api/stats from its workers' own: counts summed, every worker listed."""
    listed = sorted(workers, key=lambda w: int(w["worker"]))
    body: dict[str, Any] = {"node_id": node_id, "kind": "relay"}
    for key in SUMMED_STATS:
        body[key] = sum(int(w.get(key, 0)) for w in listed)
    body["draining"] = any(w.get("draining") for w in listed)
    body["state"] = "draining" if body["draining"] else "serving"
    body["children"] = sorted({c for w in listed for c in w.get("children", [])})
    body["workers"] = listed
    return body


def node_metrics(texts: Iterable[tuple[int, str]]) -> bytes:
    """Every worker's exposition merged: each series gets `worker="<i>"`. The HPA's load ratio
    is the node's (summed viewers / summed capacity), one unlabelled series as from a
    one-process relay, so the autoscaler sees one value per pod."""
    families: dict[str, Metric] = {}
    viewers = capacity = 0.0
    for worker, text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation,
                                                        family.type, family.unit)
            for sample in family.samples:
                if sample.name == "lotcast_viewers":
                    viewers += sample.value
                elif sample.name == "lotcast_relay_capacity":
                    capacity += sample.value
                if family.name == LOAD_RATIO_METRIC:
                    continue
                merged.samples.append(Sample(sample.name, {**sample.labels, "worker": str(worker)},
                                             sample.value, sample.timestamp, sample.exemplar))
    ratio = families.get(LOAD_RATIO_METRIC)
    if ratio is not None:
        ratio.samples.append(Sample(LOAD_RATIO_METRIC, {},
                                    viewers / capacity if capacity > 0 else 0.0))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


class SiblingRouter:
    """ASGI middleware: requests for a session this worker does not hold go to the sibling that
    does (see the module doc). `holds_whep(session_id)` / `holds_room(session_id)` say whether
    a session is local."""

    def __init__(self, app: ASGIApp, siblings: Siblings, holds_whep: Callable[[str], bool],
                 holds_room: Callable[[str], bool]) -> None:
        self.app = app
        self.siblings = siblings
        self.holds_whep = holds_whep
        self.holds_room = holds_room

    def _foreign(self, scope: Scope) -> bool:
        """A request naming a session that is not ours (so a sibling may hold it)."""
        if scope["type"] != "http" or via_sibling(scope):
            return False
        parts = scope["path"].strip("/").split("/")
        method = scope["method"]
        if method in ("PATCH", "DELETE") and len(parts) == 3 and parts[0] == "whep":
            return not self.holds_whep(parts[2])
        if method == "POST" and len(parts) == 4 and parts[0] == "whep" and parts[3] in WHEP_EXTENSIONS:
            return not self.holds_whep(parts[2])
        if _event_stream(scope):
            return not self.holds_whep(parts[2])
        if method == "POST" and len(parts) == 3 and parts[0] == "room" and parts[2] == "send":
            wanted = SESSION_HEADER.lower().encode()
            session = next((v.decode("latin-1") for k, v in scope["headers"] if k == wanted), "")
            return bool(session) and not self.holds_room(session)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._foreign(scope):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        path = scope["path"] + (f"?{scope['query_string'].decode()}"
                                if scope.get("query_string") else "")
        if _event_stream(scope):
            await self._pass_stream(scope, receive, send, path, request)
            return
        body = await request.body()
        answer = await self.siblings.first(scope["method"], path, request.headers, body,
                                           accept=lambda status: status != 404)
        if answer is not None:
            await relayed(answer)(scope, receive, send)
            return
        # nobody holds it: our own answer (the precise 404) with the body we already read
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _pass_stream(self, scope: Scope, receive: Receive, send: Send, path: str,
                           request: Request) -> None:
        """A sibling's event stream, relayed chunk by chunk until either side ends it."""
        answer = await self.siblings.open_stream("GET", path, request.headers)
        if answer is None:
            await self.app(scope, receive, send)  # nobody holds it: our own precise 404
            return
        try:
            headers = [(k.encode("latin-1"), v.encode("latin-1"))
                       for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS]
            await send({"type": "http.response.start", "status": answer.status_code,
                        "headers": headers})

            async def pump() -> None:
                async for chunk in answer.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})

            async def client_gone() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass

            tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(client_gone())]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await answer.aclose()


# The WHEP extension resources of a session (lotcast/media/whep_events.py).
WHEP_EXTENSIONS = ("sse", "layer")


def _event_stream(scope: Scope) -> bool:
    """GET /whep/{stream}/{session}/sse/{id}: a session's event stream."""
    parts = scope["path"].strip("/").split("/")
    return (scope["method"] == "GET" and len(parts) == 5 and parts[0] == "whep"
            and parts[3] == "sse")
