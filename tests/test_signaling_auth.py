"""Who may change or end a WHIP/WHEP session: every route x session kind x token.

A session answers only on its own route (a WHIP session is no WHEP resource, and sessions are
node-local) and only to the token that created it or a host token; a WHEP session created
without a token is reached by whoever holds its URL (docs/http-api.md, "Session resources").
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from media_support import SECRET, Cluster, Publisher, host_token, http_client, running_cluster

from lotcast.auth import Role, TokenAuthority
from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(180)

STREAM = "auth"
AUTHORITY = TokenAuthority(SECRET)
TOKENS: dict[str, str | None] = {
    "none": None,
    "broken": "not.a.jwt",
    "wrong_role": AUTHORITY.mint(Role.VIEWER, "u1", "U1 as a viewer"),
    "other_user": AUTHORITY.mint(Role.BIDDER, "u2", "U2"),
    "creator_bidder": AUTHORITY.mint(Role.BIDDER, "u1", "U1"),
    "host": AUTHORITY.mint(Role.HOST, "host-2", "Another host"),
}
KINDS = ("whip", "whep_open", "whep_token")
CREATOR = {"whip": "creator_host", "whep_open": "none", "whep_token": "creator_bidder"}


@dataclass
class Offers:
    publish: str
    play: str

    def credentials(self, kind: str) -> tuple[str, str]:
        offer = self.publish if kind == "whip" else self.play
        ufrag = re.search(r"a=ice-ufrag:(\S+)", offer)
        pwd = re.search(r"a=ice-pwd:(\S+)", offer)
        assert ufrag and pwd
        return ufrag.group(1), pwd.group(1)


@dataclass
class Env:
    cluster: Cluster
    offers: Offers
    creator_host: str


async def make_offer(direction: str) -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction=direction)
    pc.addTransceiver("video", direction=direction)
    await pc.setLocalDescription(await pc.createOffer())
    sdp: str = pc.localDescription.sdp
    await pc.close()
    return sdp


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer) -> Iterator[Cluster]:
    with running_cluster(redis_server) as c:
        yield c


@pytest.fixture
async def env(cluster: Cluster) -> AsyncIterator[Env]:
    publisher = Publisher(cluster.origin.url, STREAM, host_token())
    await publisher.start()
    offers = Offers(await make_offer("sendonly"), await make_offer("recvonly"))
    yield Env(cluster, offers, host_token())
    await publisher.stop()


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def token_of(env: Env, name: str) -> str | None:
    return env.creator_host if name == "creator_host" else TOKENS[name]


async def create(http: httpx.AsyncClient, env: Env, kind: str) -> tuple[str, str]:
    """A fresh session of ``kind``; returns (stream, session id)."""
    origin = env.cluster.origin.url
    if kind == "whip":
        stream = f"auth-{uuid.uuid4().hex[:8]}"
        response = await http.post(f"{origin}/whip/{stream}", content=env.offers.publish,
                                   headers={"Content-Type": "application/sdp",
                                            **bearer(env.creator_host)})
    else:
        stream = STREAM
        response = await http.post(f"{origin}/whep/{stream}", content=env.offers.play,
                                   headers={"Content-Type": "application/sdp",
                                            **bearer(token_of(env, CREATOR[kind]))})
    assert response.status_code == 201, response.text
    location = response.headers["Location"]
    route = "whip" if kind == "whip" else "whep"
    assert location.startswith(f"/{route}/{stream}/")
    return stream, location.rsplit("/", 1)[1]


def own_url(env: Env, kind: str, stream: str, session: str) -> str:
    return f"{env.cluster.origin.url}/{'whip' if kind == 'whip' else 'whep'}/{stream}/{session}"


def route_url(env: Env, route: str, kind: str, stream: str, session: str) -> str:
    if route == "own":
        return own_url(env, kind, stream, session)
    if route == "other_kind":  # the same node, the other protocol's route
        return f"{env.cluster.origin.url}/{'whep' if kind == 'whip' else 'whip'}/{stream}/{session}"
    return f"{env.cluster.relay.url}/whep/{stream}/{session}"  # another node


def expected(kind: str, route: str, token: str) -> int:
    """The status a DELETE gets (a PATCH gets 204 where a DELETE gets 200)."""
    if token == "broken":
        return 401  # a present but broken token is refused before anything else
    if route != "own":
        return 404
    if kind == "whep_open":
        return 200  # the URL is the capability
    if token == "none":
        return 401
    if token in ("host", CREATOR[kind]):
        return 200
    return 403


def trickle(env: Env, kind: str) -> str:
    """A trickle that repeats the session's own ICE credentials (not a restart)."""
    ufrag, pwd = env.offers.credentials(kind)
    return (f"a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\na=mid:0\r\n"
            "a=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\n")


async def alive(http: httpx.AsyncClient, env: Env, kind: str, stream: str, session: str) -> bool:
    """Probe with a no-op trickle by the host: 204 while the session exists, 404 after."""
    response = await http.patch(own_url(env, kind, stream, session), content="a=mid:0\r\n",
                                headers={"Content-Type": "application/trickle-ice-sdpfrag",
                                         "If-Match": "*", **bearer(TOKENS["host"])})
    assert response.status_code in (204, 404), response.text
    return response.status_code == 204


@pytest.mark.parametrize("route", ["own", "other_kind", "other_node"])
@pytest.mark.parametrize("kind", KINDS)
async def test_session_resource_authorization(env: Env, kind: str, route: str) -> None:
    tokens = [*TOKENS.keys(), CREATOR[kind]]
    async with http_client() as http:
        for token_name in dict.fromkeys(tokens):
            token = token_of(env, token_name)
            want = expected(kind, route, token_name)
            case = f"{kind} via {route} with {token_name}"

            stream, session = await create(http, env, kind)
            url = route_url(env, route, kind, stream, session)
            response = await http.patch(url, content=trickle(env, kind), headers={
                "Content-Type": "application/trickle-ice-sdpfrag", "If-Match": "*", **bearer(token)})
            assert response.status_code == (204 if want == 200 else want), (case, response.text)
            assert await alive(http, env, kind, stream, session), case

            response = await http.delete(url, headers=bearer(token))
            assert response.status_code == want, (case, response.text)
            if want == 401:
                assert response.headers["WWW-Authenticate"].startswith("Bearer"), case
            assert await alive(http, env, kind, stream, session) == (want != 200), case
            if want != 200:
                response = await http.delete(own_url(env, kind, stream, session),
                                             headers=bearer(TOKENS["host"]))
                assert response.status_code == 200, (case, response.text)


async def test_whep_delete_cannot_end_the_broadcast(env: Env) -> None:
    """The reported hole: DELETE /whep/<stream>/<whip-session> with no token ended the show."""
    async with http_client() as http:
        stream, session = await create(http, env, "whip")
        for method in ("DELETE", "PATCH"):
            response = await http.request(
                method, f"{env.cluster.origin.url}/whep/{stream}/{session}", content=trickle(env, "whip"),
                headers={"Content-Type": "application/trickle-ice-sdpfrag", "If-Match": "*"})
            assert response.status_code == 404, (method, response.text)
        stats = (await http.get(f"{env.cluster.origin.url}/api/stats")).json()
        assert {s["id"]: s["state"] for s in stats["streams"]}[stream] == "live"
        response = await http.delete(f"{env.cluster.origin.url}/whip/{stream}/{session}",
                                     headers=bearer(env.creator_host))
        assert response.status_code == 200
