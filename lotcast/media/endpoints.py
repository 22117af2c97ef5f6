"""WHIP (RFC 9725) and WHEP HTTP endpoints, shared by the broadcaster and the relay.

    POST    /whip/{stream}            publish (host token)      201 + SDP answer, Location, ETag
    POST    /whep/{stream}            play                      201 | 409/503 + Retry-After
    HEAD    /whep/{stream}            is it playable here?      200 | 409/503 + Retry-After
    PATCH   /whi[pe]/{stream}/{id}    trickle ICE (sdpfrag)     204 | 412/428/422
    DELETE  /whi[pe]/{stream}/{id}    end the session           200 | 404
    OPTIONS (any of the above)        CORS, Accept-Post/-Patch  204
    POST    /whep/{stream}/{id}/sse   SSE subscription (JSON)    201 + Location of the event stream
    GET     /whep/{stream}/{id}/sse/{sub}   the text/event-stream   200 | 404
    POST    /whep/{stream}/{id}/layer layer choice (JSON)        204 | 400

(the WHEP extensions live in lotcast/media/whep_events.py)

A session is reached only through its own route (a WHIP session via /whip/..., a WHEP session via
/whep/...) and changed or ended only by the token that created it or a host token; a WHEP session
created without a token is reached by whoever holds its (unguessable) URL. docs/http-api.md is
the contract; every status this module answers is listed there.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from lotcast.auth import AuthError, Identity, Role, TokenAuthority
from lotcast.config import Settings
from lotcast.ids import STREAM_ID_RULE, is_valid_stream_id
from lotcast.media.peer import EgressSession, IngestSession, PeerSession
from lotcast.media.sdp import SdpError, check_offer, parse_trickle
from lotcast.media.stream import LAYERS_HEADER, MediaStream, StreamRouter
from lotcast.media.upstream import NotLiveError
from lotcast.media.whep_events import JSON, ExtensionError, WhepEvents, link_headers, read_json_body
from lotcast.tasks import cancel_and_wait
from lotcast.turn import check_turn_settings, mint_credentials

logger = logging.getLogger(__name__)

SDP = "application/sdp"
SDPFRAG = "application/trickle-ice-sdpfrag"
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
    "Access-Control-Expose-Headers": "Location, ETag, Link, Retry-After, Accept-Post, Accept-Patch",
}
NOT_LIVE_RETRY = 2
# An unexpected error (a bug, not the client's fault) is answered 503 + Retry-After, and logged.
INTERNAL_RETRY = 2
SESSION_METHODS = "PATCH, DELETE, OPTIONS"
EXTENSION_METHODS = "POST, OPTIONS"
EVENT_STREAM_METHODS = "GET, DELETE, OPTIONS"

StreamProvider = Callable[[str], Awaitable[MediaStream]]
Kind = Literal["whip", "whep"]


class HttpError(Exception):
    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


def error_response(status: int, reason: str, headers: dict[str, str] | None = None) -> Response:
    return Response(reason + "\n", status_code=status, media_type="text/plain",
                    headers={**CORS, **(headers or {})})


@dataclass(frozen=True)
class SessionGrant:
    """How a session was created: through which route, and by which token (None: no token)."""

    kind: Kind
    owner: Identity | None


def authorize(grant: SessionGrant, presented: Identity | None) -> None:
    """May the bearer of ``presented`` change or end the session of ``grant``? Raises if not.

    A WHIP session: any host token. A WHEP session created with a token: that token's user
    (same role and subject) or a host token. A WHEP session created without one: its URL is the
    capability, as WHEP clients expect.
    """
    if grant.kind == "whep" and grant.owner is None:
        return
    if presented is None:
        raise AuthError(401, "missing Authorization: Bearer token")
    if presented.role is Role.HOST:
        return
    if grant.kind == "whip":
        raise AuthError(403, f"token role {presented.role.value!r} may not do this; needs 'host'")
    owner = grant.owner
    assert owner is not None
    if presented.role is owner.role and presented.user_id == owner.user_id:
        return
    raise AuthError(403, "this session was created with another token; use that token or a "
                    "host token")


class SessionTable:
    """Every live WHIP/WHEP session of this node, and the reaper that times them out."""

    def __init__(self, session_timeout: float, connect_timeout: float | None = None,
                 on_closed: Callable[[PeerSession], None] | None = None) -> None:
        self._sessions: dict[str, PeerSession] = {}
        self._grants: dict[str, SessionGrant] = {}
        self._on_closed = on_closed
        self.session_timeout = session_timeout
        # a peer that never completes ICE/DTLS gets as long as a silent one
        self.connect_timeout = connect_timeout if connect_timeout is not None else session_timeout
        self._reaper: asyncio.Task[None] | None = None
        self._shutdown: list[Callable[[], Awaitable[None]]] = []

    def on_shutdown(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Await ``closer`` when the table closes, after every session has closed."""
        self._shutdown.append(closer)

    def add(self, session: PeerSession, grant: SessionGrant | None = None) -> None:
        self._sessions[session.id] = session
        if grant is not None:
            self._grants[session.id] = grant
        session.on_close(self._forget)

    def _forget(self, session: PeerSession) -> None:
        self._sessions.pop(session.id, None)
        self._grants.pop(session.id, None)
        if self._on_closed is not None:
            self._on_closed(session)

    def get(self, session_id: str) -> PeerSession | None:
        return self._sessions.get(session_id)

    def grant(self, session_id: str) -> SessionGrant | None:
        return self._grants.get(session_id)

    def sessions(self, kind: type[PeerSession] = PeerSession) -> list[PeerSession]:
        return [s for s in self._sessions.values() if isinstance(s, kind)]

    def count(self, kind: type[PeerSession] = PeerSession) -> int:
        return sum(1 for s in self._sessions.values() if isinstance(s, kind))

    def start(self) -> None:
        self._reaper = asyncio.ensure_future(self._reap_forever())

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.reap(time.monotonic())

    def reap(self, now: float) -> None:
        for session in list(self._sessions.values()):
            if session.connected_at is None:
                if now - session.created > self.connect_timeout:
                    session.close_soon("ICE/DTLS did not connect in time")
                continue
            last = session.last_alive
            if isinstance(session, IngestSession):
                last = max(last, session.last_media)
            if now - last > self.session_timeout:
                session.close_soon(f"no RTCP or media for {self.session_timeout:.0f}s")

    async def close(self) -> None:
        await cancel_and_wait(self._reaper)
        await asyncio.gather(*(s.close() for s in list(self._sessions.values())))
        for closer in self._shutdown:
            await closer()


class WebRtcEndpoints:
    """The HTTP side of WHIP/WHEP for one node."""

    def __init__(self, settings: Settings, authority: TokenAuthority, router: StreamRouter,
                 sessions: SessionTable, provide_stream: StreamProvider, accept_publish: bool,
                 accepting_viewers: Callable[[], str | None] | None = None,
                 on_first_frame: Callable[[float], None] | None = None,
                 count_viewers: Callable[[str], int] | None = None,
                 on_estimate: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self.authority = authority
        self.router = router
        self.sessions = sessions
        self.provide_stream = provide_stream
        self.accept_publish = accept_publish
        self.accepting_viewers = accepting_viewers or (lambda: None)
        self.on_first_frame = on_first_frame
        self.on_estimate = on_estimate  # each viewer REMB (bits/s), for the metrics
        # WHEP SSE and layer selection; `count_viewers(stream)` is the `viewercount` event's
        # number (default: this node's WHEP sessions of the stream)
        self.events = WhepEvents(count_viewers or self._stream_sessions)
        sessions.on_shutdown(self.events.close)
        check_turn_settings(settings.turn_urls, settings.turn_secret, settings.turn_ttl)

    @property
    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [
            Route("/whep/{stream}", self.play, methods=["POST"]),
            Route("/whep/{stream}", self.probe, methods=["HEAD", "GET"]),
            Route("/whep/{stream}", self.options, methods=["OPTIONS"]),
            Route("/whep/{stream}/{session}", self.session_resource,
                  methods=["PATCH", "DELETE", "OPTIONS", "GET", "POST", "PUT"]),
            Route("/whep/{stream}/{session}/sse", self.sse_subscribe,
                  methods=["POST", "OPTIONS", "GET", "PATCH", "PUT", "DELETE"]),
            Route("/whep/{stream}/{session}/sse/{sub}", self.sse_stream,
                  methods=["GET", "DELETE", "OPTIONS", "POST", "PATCH", "PUT"]),
            Route("/whep/{stream}/{session}/layer", self.layer,
                  methods=["POST", "OPTIONS", "GET", "PATCH", "PUT", "DELETE"]),
        ]
        if self.accept_publish:
            routes += [
                Route("/whip/{stream}", self.publish, methods=["POST"]),
                Route("/whip/{stream}", self.options, methods=["OPTIONS"]),
                Route("/whip/{stream}/{session}", self.session_resource,
                      methods=["PATCH", "DELETE", "OPTIONS", "GET", "POST", "PUT"]),
            ]
        return routes

    def _stream_sessions(self, stream_id: str) -> int:
        return sum(1 for s in self.sessions.sessions(EgressSession) if s.stream.id == stream_id)

    def _link_headers(self, extra: list[str] | None = None) -> dict[str, str]:
        """`Link: rel="ice-server"` (RFC 9725 §4.6): the configured STUN/TURN URLs, then the TURN
        servers with a credential pair minted for this answer alone. The user part is random, not
        the session id: STUN carries the username in clear, and a WHEP session URL is a capability.
        """
        links = [f'<{url}>; rel="ice-server"' for url in self.settings.ice_servers]
        if self.settings.turn_urls:
            s = self.settings
            creds = mint_credentials(s.turn_secret, secrets.token_urlsafe(9), s.turn_ttl)
            links += [f'<{url}>; rel="ice-server"; username="{creds.username}"; '
                      f'credential="{creds.credential}"; credential-type="password"'
                      for url in s.turn_urls]
        links += extra or []
        return {"Link": ", ".join(links)} if links else {}

    async def options(self, request: Request) -> Response:
        # Allow: what this URL takes. Access-Control-Allow-Methods also covers the session
        # resources created here (PATCH for trickle, DELETE), as Accept-Patch announces.
        endpoint = "POST, OPTIONS" + (", HEAD, GET" if request.url.path.startswith("/whep/") else "")
        return Response(status_code=204, headers={
            **CORS, **self._link_headers(),
            "Accept-Post": SDP, "Accept-Patch": SDPFRAG, "Allow": endpoint,
            "Access-Control-Allow-Methods": f"{endpoint}, PATCH, DELETE",
        })

    async def _read_offer(self, request: Request) -> str:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != SDP:
            raise HttpError(415, f"Content-Type must be {SDP}, got {content_type or 'nothing'!r}",
                            {"Accept-Post": SDP})
        body = await _read_limited(request, self.settings.max_sdp_bytes)
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HttpError(400, "malformed SDP: body is not UTF-8") from exc

    def _identity(self, request: Request, required: Role | None) -> Identity:
        return self.authority.from_authorization(request.headers.get("authorization"), required)

    def _presented(self, request: Request) -> Identity | None:
        """The request's token, None without one; a present but broken token is refused (401)."""
        header = request.headers.get("authorization")
        if header is None:
            return None
        return self.authority.from_authorization(header, None)

    def _viewer(self, request: Request) -> Identity | None:
        """The viewer's token (any role); required when the node serves private streams."""
        presented = self._presented(request)
        if presented is None and self.settings.private_streams:
            raise AuthError(401, "missing Authorization: Bearer token")
        return presented

    async def publish(self, request: Request) -> Response:
        return await self._guard(self._publish(request))

    async def _publish(self, request: Request) -> Response:
        stream_id = _stream_id(request)
        identity = self._identity(request, Role.HOST)
        offer = await self._read_offer(request)
        summary = check_offer(offer, "publish")
        claim = object()
        stream = self.router.claim_publisher(stream_id, claim)
        if stream is None:
            raise HttpError(409, f"stream {stream_id!r} already has a publisher")
        router = self.router
        try:
            session = IngestSession(stream, summary)
        except BaseException:
            router.release_publisher(stream, claim)
            raise
        # released when the session ends, including when negotiation fails just below
        session.on_close(lambda _: router.release_publisher(stream, claim))
        answer = await session.answer(offer)
        return await self._created(request, "whip", session, answer, identity)

    async def play(self, request: Request) -> Response:
        return await self._guard(self._play(request))

    async def _play(self, request: Request) -> Response:
        stream_id = _stream_id(request)
        identity = self._viewer(request)
        refusal = self.accepting_viewers()
        if refusal is not None:
            raise HttpError(503, refusal, {"Retry-After": "2"})
        offer = await self._read_offer(request)
        summary = check_offer(offer, "play")
        stream = await self._playable(stream_id)
        # ?layer=<rid>: one lower simulcast layer only (a relay's layer pull, docs/http-api.md)
        # ?auto=0: no automatic layer choice (a relay's main pull: its top layer as it is)
        session = EgressSession(stream, summary, self.on_first_frame,
                                layer=request.query_params.get("layer") or None,
                                auto_layer=request.query_params.get("auto") != "0",
                                on_estimate=self.on_estimate)
        answer = await session.answer(offer)
        response = await self._created(request, "whep", session, answer, identity)
        if stream.layers:  # the simulcast layers, top first: a relay pulls the others too
            response.headers[LAYERS_HEADER] = ",".join(stream.layers)
        return response

    async def _playable(self, stream_id: str) -> MediaStream:
        try:
            return await self.provide_stream(stream_id)
        except NotLiveError as exc:
            raise HttpError(409, f"stream {stream_id!r} is not live: {exc.reason}",
                            {"Retry-After": str(exc.retry_after)}) from exc

    async def probe(self, request: Request) -> Response:
        async def check() -> Response:
            stream_id = _stream_id(request)
            self._viewer(request)
            refusal = self.accepting_viewers()
            if refusal is not None:
                raise HttpError(503, refusal, {"Retry-After": "2"})
            await self._playable(stream_id)
            return Response(status_code=200, headers={**CORS, "Accept-Post": SDP})

        return await self._guard(check())

    async def _created(self, request: Request, kind: Kind, session: PeerSession, answer: str,
                       owner: Identity | None) -> Response:
        if await request.is_disconnected():
            # nobody will ever read the answer: the session would only wait to be reaped
            await session.close()
            raise ClientDisconnect()
        self.sessions.add(session, SessionGrant(kind, owner))
        location = f"/{kind}/{session.stream.id}/{session.id}"
        extensions: list[str] = []
        if kind == "whep":
            session.on_close(self.events.session_closed)
            extensions = link_headers(location)
        return Response(answer, status_code=201, media_type=SDP, headers={
            **CORS, **self._link_headers(extensions),
            "Location": location, "ETag": session.etag, "Accept-Patch": SDPFRAG,
        })

    async def session_resource(self, request: Request) -> Response:
        return await self._guard(self._session_resource(request))

    async def _session_resource(self, request: Request) -> Response:
        method = request.method
        if method == "OPTIONS":
            return Response(status_code=204, headers={
                **CORS, "Allow": SESSION_METHODS, "Access-Control-Allow-Methods": SESSION_METHODS,
                "Accept-Patch": SDPFRAG})
        if method not in ("PATCH", "DELETE"):
            raise HttpError(405, f"{method} is not supported on a session; use PATCH or DELETE",
                            {"Allow": SESSION_METHODS})
        kind: Kind = "whip" if request.url.path.startswith("/whip/") else "whep"
        session = self._own_session(request, kind, authorized=True)
        if method == "DELETE":
            await session.close()
            return Response(status_code=200, headers=CORS)
        return await self._patch(request, session)

    def _own_session(self, request: Request, kind: Kind, authorized: bool) -> PeerSession:
        """The session the path names, on its own route; with ``authorized``, the request's
        token must be allowed to change it (see `authorize`)."""
        stream_id = _stream_id(request)
        presented = self._presented(request)
        session_id = str(request.path_params["session"])
        session = self.sessions.get(session_id)
        grant = self.sessions.grant(session_id)
        # a session answers only on its own route: a WHIP session is not a WHEP resource
        if session is None or grant is None or grant.kind != kind or session.stream.id != stream_id:
            raise HttpError(404, "no such session (ended, timed out or never existed)")
        if authorized:
            authorize(grant, presented)
        return session

    @staticmethod
    def _extension_options(request: Request, allow: str) -> Response | None:
        if request.method == "OPTIONS":
            return Response(status_code=204, headers={
                **CORS, "Allow": allow, "Access-Control-Allow-Methods": allow,
                **({"Accept-Post": JSON} if "POST" in allow else {})})
        if request.method not in allow.split(", "):
            raise HttpError(405, f"{request.method} is not supported here; use "
                            f"{allow.replace(', OPTIONS', '')}", {"Allow": allow})
        return None

    async def _extension_post(self, request: Request,
                              handle: Callable[[PeerSession, bytes], Response]) -> Response:
        """A WHEP extension's POST (or OPTIONS) on a session: the caller's JSON body to `handle`."""
        async def work() -> Response:
            early = self._extension_options(request, EXTENSION_METHODS)
            if early is not None:
                return early
            session = self._own_session(request, "whep", authorized=True)
            body = await read_json_body(request.stream(), request.headers.get("content-type", ""))
            return handle(session, body)

        return await self._guard(work())

    async def sse_subscribe(self, request: Request) -> Response:
        """POST {session}/sse: subscribe to events (draft-ietf-wish-whep server-sent events)."""
        def subscribe(session: PeerSession, body: bytes) -> Response:
            sub = self.events.subscribe(session, body)
            return Response(status_code=201, headers={
                **CORS, "Location": f"{request.url.path}/{sub.id}"})

        return await self._extension_post(request, subscribe)

    async def sse_stream(self, request: Request) -> Response:
        """GET {session}/sse/{sub}: the event stream (its unguessable URL is the capability)."""
        async def work() -> Response:
            early = self._extension_options(request, EVENT_STREAM_METHODS)
            if early is not None:
                return early
            session = self._own_session(request, "whep", authorized=False)
            sub = self.events.subscription(str(request.path_params["sub"]))
            if sub is None or sub.session is not session:
                raise HttpError(404, "no such event stream (its session ended, or it was "
                                "closed or never existed)")
            if request.method == "DELETE":
                self.events.close_subscription(sub)
                return Response(status_code=200, headers=CORS)
            return StreamingResponse(self.events.stream_events(sub),
                                     media_type="text/event-stream",
                                     headers={**CORS, "Cache-Control": "no-store",
                                              "X-Accel-Buffering": "no"})

        return await self._guard(work())

    async def layer(self, request: Request) -> Response:
        """POST {session}/layer: the viewer's layer choice (draft-ietf-wish-whep layer)."""
        def choose(session: PeerSession, body: bytes) -> Response:
            self.events.choose_layer(session, body)
            return Response(status_code=204, headers=CORS)

        return await self._extension_post(request, choose)

    async def _patch(self, request: Request, session: PeerSession) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != SDPFRAG:
            raise HttpError(415, f"PATCH needs Content-Type {SDPFRAG}", {"Accept-Patch": SDPFRAG})
        if_match = request.headers.get("if-match")
        if if_match is None:
            raise HttpError(428, "PATCH needs If-Match with the session's ETag (or *)")
        if if_match.strip() not in ("*", session.etag):
            raise HttpError(412, "If-Match does not match the session's ETag")
        body = await _read_limited(request, self.settings.max_sdp_bytes)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HttpError(400, "malformed trickle fragment: body is not UTF-8") from exc
        fragment = parse_trickle(text)
        if fragment.restarts(session.remote_ice):
            raise HttpError(422, "ICE restart is not supported; DELETE this session and POST a new offer")
        await session.add_trickle(fragment)
        return Response(status_code=204, headers=CORS)

    async def _guard(self, work: Awaitable[Response]) -> Response:
        try:
            return await work
        except HttpError as exc:
            return error_response(exc.status, exc.reason, exc.headers)
        except SdpError as exc:
            return error_response(exc.status, exc.reason)
        except ExtensionError as exc:
            return error_response(exc.status, exc.reason, exc.headers)
        except AuthError as exc:
            headers = {"WWW-Authenticate": 'Bearer realm="lotcast"'} if exc.status == 401 else {}
            return error_response(exc.status, exc.reason, headers)
        except ClientDisconnect:
            return error_response(400, "request body incomplete: the client went away")
        except Exception:
            # A bug of ours, not the client's: say so honestly, log it, never a bare 500.
            logger.exception("signaling request failed unexpectedly")
            return error_response(503, "internal error while handling this request; retry",
                                  {"Retry-After": str(INTERNAL_RETRY)})


def _stream_id(request: Request) -> str:
    stream_id = str(request.path_params["stream"])
    if not is_valid_stream_id(stream_id):
        raise HttpError(400, STREAM_ID_RULE)
    return stream_id


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"body of {declared} bytes exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)
