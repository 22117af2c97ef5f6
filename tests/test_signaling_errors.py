"""Bad WHIP/WHEP input gets the exact status and a readable reason; everyone else keeps playing."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from media_support import (
    SECRET,
    Cluster,
    Publisher,
    Viewer,
    host_token,
    http_client,
    running_cluster,
)

from lotcast.auth import Role, TokenAuthority
from lotcast.ids import STREAM_ID_RULE
from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)


@dataclass
class Live:
    cluster: Cluster
    publisher: Publisher
    viewer: Viewer
    offer: str  # a valid sendrecv audio+video offer


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer) -> Iterator[Cluster]:
    with running_cluster(redis_server) as c:
        yield c


@pytest.fixture
async def live(cluster: Cluster) -> AsyncIterator[Live]:
    publisher = Publisher(cluster.origin.url, "errors", host_token())
    await publisher.start()
    viewer = Viewer(cluster.relay.url, "errors")
    await viewer.start()
    await viewer.wait_frames(5, timeout=30)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    pc.addTransceiver("video")
    await pc.setLocalDescription(await pc.createOffer())
    offer = pc.localDescription.sdp
    await pc.close()
    yield Live(cluster, publisher, viewer, offer)
    # the good viewer kept decoding through every bad request
    seen = len(viewer.counters)
    await viewer.wait_frames(seen + 10, timeout=15)
    await viewer.stop()
    await publisher.stop()


def auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def post(url: str, body: str | bytes, content_type: str = "application/sdp",
               token: str | None = None) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(url, content=body,
                               headers={"Content-Type": content_type, **auth(token)})


def datachannel_only_offer() -> str:
    return (
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\n"
        "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuv\r\n"
        "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\n"
        "a=setup:actpass\r\na=mid:0\r\na=sctp-port:5000\r\n"
    )


@pytest.mark.parametrize(
    ("body", "content_type", "token_role", "status", "reason"),
    [
        ("hello", "application/sdp", "host", 400, "malformed SDP: must start with 'v=0'"),
        ("v=0\r\nthis is not sdp\r\n", "application/sdp", "host", 400, "malformed SDP: line 2"),
        ("", "application/sdp", "host", 400, "malformed SDP: empty body"),
        ("DATACHANNEL", "application/sdp", "host", 422, "offer has no media we accept"),
        ("OFFER", "text/plain", "host", 415, "Content-Type must be application/sdp"),
        ("OFFER", "application/sdp", None, 401, "missing Authorization: Bearer token"),
        ("OFFER", "application/sdp", "garbage", 401, "invalid token"),
        ("OFFER", "application/sdp", "expired", 401, "token expired"),
        ("OFFER", "application/sdp", "bidder", 403, "needs 'host'"),
        ("OFFER", "application/sdp", "host", 409, "already has a publisher"),
        ("HUGE", "application/sdp", "host", 413, "exceeds the 65536-byte limit"),
    ],
)
async def test_whip_rejects_bad_publish(live: Live, body: str, content_type: str,
                                        token_role: str | None, status: int, reason: str) -> None:
    authority = TokenAuthority(SECRET)
    token = {
        None: None, "garbage": "not.a.jwt", "host": host_token(),
        "expired": authority.mint(Role.HOST, ttl=-10),
        "bidder": authority.mint(Role.BIDDER, "u1", "Bidder"),
    }[token_role]
    payload = {"OFFER": live.offer, "DATACHANNEL": datachannel_only_offer(),
               "HUGE": live.offer + "a=x-padding:" + "x" * 70000 + "\r\n"}.get(body, body)
    response = await post(f"{live.cluster.origin.url}/whip/errors", payload, content_type, token)
    assert response.status_code == status, response.text
    assert reason in response.text
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_whep_not_live_gets_409_with_retry_after(live: Live) -> None:
    response = await post(f"{live.cluster.relay.url}/whep/nobody-here", live.offer)
    assert response.status_code == 409
    assert "is not live" in response.text
    assert int(response.headers["Retry-After"]) > 0
    async with httpx.AsyncClient() as http:
        head = await http.head(f"{live.cluster.relay.url}/whep/nobody-here")
        assert head.status_code == 409 and "Retry-After" in head.headers
        head = await http.head(f"{live.cluster.relay.url}/whep/errors")
        assert head.status_code == 200


async def test_whep_rejects_publish_offer_and_bad_stream_id(live: Live) -> None:
    relay = live.cluster.relay.url
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    sendonly = pc.localDescription.sdp  # what a publisher would send
    await pc.close()
    response = await post(f"{relay}/whep/errors", sendonly)
    assert response.status_code == 422
    assert "playing needs recvonly or sendrecv" in response.text
    response = await post(f"{relay}/whep/bad%20id!", live.offer)
    assert response.status_code == 400
    assert STREAM_ID_RULE in response.text


async def test_unknown_session_and_patch_preconditions(live: Live) -> None:
    origin, relay = live.cluster.origin.url, live.cluster.relay.url
    frag = {"Content-Type": "application/trickle-ice-sdpfrag"}
    async with httpx.AsyncClient() as http:
        r = await http.delete(f"{relay}/whep/errors/no-such-session")
        assert r.status_code == 404 and "no such session" in r.text
        r = await http.patch(f"{origin}/whip/errors/no-such-session", content="a=mid:0\r\n",
                             headers={**frag, "If-Match": "*", **auth(host_token())})
        assert r.status_code == 404
        assert live.viewer.resource is not None
        r = await http.patch(live.viewer.resource, content="a=mid:0\r\n", headers=frag)
        assert r.status_code == 428 and "If-Match" in r.text
        r = await http.patch(live.viewer.resource, content="a=mid:0\r\n",
                             headers={**frag, "If-Match": '"stale"'})
        assert r.status_code == 412
        r = await http.patch(live.viewer.resource, content="a=ice-ufrag:new\r\na=ice-pwd:x\r\n",
                             headers={**frag, "If-Match": "*"})
        assert r.status_code == 422 and "ICE restart is not supported" in r.text
        r = await http.patch(live.viewer.resource, content="a=mid:0\r\n",
                             headers={"Content-Type": "text/plain", "If-Match": "*"})
        assert r.status_code == 415
        r = await http.patch(
            live.viewer.resource,
            content="a=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\n",
            headers={**frag, "If-Match": "*"})
        assert r.status_code == 204
        r = await http.get(live.viewer.resource)
        assert r.status_code == 405


async def test_options_advertises_whip(live: Live) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.options(f"{live.cluster.origin.url}/whip/errors")
    assert r.status_code == 204
    assert r.headers["Accept-Post"] == "application/sdp"
    assert "Location" in r.headers["Access-Control-Expose-Headers"]


async def test_link_ice_server_header(redis_server: RedisServer) -> None:
    with running_cluster(redis_server, origin_args=["--ice-servers", "stun:stun.example.test:3478"]) as c:
        async with httpx.AsyncClient() as http:
            r = await http.options(f"{c.origin.url}/whip/any")
        assert r.headers["Link"] == '<stun:stun.example.test:3478>; rel="ice-server"'


async def stats(base_url: str) -> dict[str, Any]:
    async with http_client() as http:
        response = await http.get(f"{base_url}/api/stats")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


def stream_states(snapshot: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted((s["id"], s["state"]) for s in snapshot["streams"])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def settled_fds(pid: int, baseline: int) -> int:
    """The node's open fds once the test's HTTP connections have been closed on its side."""
    count = fd_count(pid)
    for _ in range(100):
        if count <= baseline:
            break
        await asyncio.sleep(0.05)
        count = fd_count(pid)
    return count


@pytest.mark.parametrize("stream_id", ["caf%C3%A9", "%E2%85%AB", "a.b", "x" * 65])
async def test_stream_ids_outside_the_rule_are_refused_everywhere(live: Live, stream_id: str) -> None:
    origin, relay = live.cluster.origin.url, live.cluster.relay.url
    before = await stats(origin)
    token = {"Authorization": f"Bearer {host_token()}"}
    sdp = {"Content-Type": "application/sdp"}
    frag = {"Content-Type": "application/trickle-ice-sdpfrag", "If-Match": "*"}
    async with http_client() as http:
        answers = [
            await http.post(f"{origin}/whip/{stream_id}", content=live.offer, headers={**sdp, **token}),
            await http.post(f"{origin}/whep/{stream_id}", content=live.offer, headers=sdp),
            await http.post(f"{relay}/whep/{stream_id}", content=live.offer, headers=sdp),
            await http.head(f"{relay}/whep/{stream_id}"),
            await http.delete(f"{origin}/whip/{stream_id}/some-session", headers=token),
            await http.patch(f"{relay}/whep/{stream_id}/some-session", content="a=mid:0\r\n",
                             headers=frag),
            await http.get(f"{relay}/api/streams/{stream_id}/edge"),
        ]
    for response in answers:
        assert response.status_code == 400, (response.request.method, response.request.url,
                                             response.status_code, response.text)
        if response.request.method != "HEAD":
            assert response.text.strip() == STREAM_ID_RULE
    after = await stats(origin)
    assert stream_states(after) == stream_states(before)
    assert after["publishers"] == before["publishers"] == 1


def without_first_m_section(offer: str) -> str:
    """The offer with its first m-section (mid 0) deleted; a=group:BUNDLE still names it."""
    head, *sections = offer.split("m=")
    assert "a=group:BUNDLE 0 1" in head
    return head + "m=" + "m=".join(sections[1:])


async def test_bundle_naming_a_deleted_m_line_is_a_400(live: Live) -> None:
    origin = live.cluster.origin.url
    before = await stats(origin)
    response = await post(f"{origin}/whip/bundle-gone", without_first_m_section(live.offer),
                          token=host_token())
    assert response.status_code == 400, response.text
    assert "BUNDLE names mid '0', which no m-line has" in response.text
    response = await post(f"{live.cluster.relay.url}/whep/errors",
                          without_first_m_section(live.offer))
    assert response.status_code == 400, response.text
    assert stream_states(await stats(origin)) == stream_states(before)


def no_rtcp_mux(offer: str) -> str:
    return "".join(line for line in offer.splitlines(keepends=True) if line.strip() != "a=rtcp-mux")


def many_application_lines(count: int) -> str:
    return ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
            + "".join(f"m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\n"
                      f"a=mid:{i}\r\na=sctp-port:5000\r\n" for i in range(count)))


async def test_failed_offers_leave_nothing_behind(live: Live) -> None:
    origin = live.cluster.origin
    async with http_client() as http:
        # warm up: the first requests open the server's lazily created resources
        for i in range(2):
            await http.post(f"{origin.url}/whip/warm-{i}", content=no_rtcp_mux(live.offer),
                            headers={"Content-Type": "application/sdp",
                                     "Authorization": f"Bearer {host_token()}"})
    before = await stats(origin.url)
    fds = fd_count(origin.pid)
    bodies = [no_rtcp_mux(live.offer), many_application_lines(300)]
    async with http_client() as http:
        for i in range(20):
            response = await http.post(
                f"{origin.url}/whip/failed-{i}", content=bodies[i % 2],
                headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {host_token()}"})
            assert response.status_code == 422, response.text
    after = await stats(origin.url)
    assert stream_states(after) == stream_states(before)
    assert after["publishers"] == before["publishers"]
    assert after["viewers"] == before["viewers"]
    assert after["udp_sockets"] == before["udp_sockets"]
    assert await settled_fds(origin.pid, fds) <= fds
    # the stream ids are free: a real publisher can take one at once
    publisher = Publisher(origin.url, "failed-3", host_token())
    await publisher.start()
    await publisher.stop()
