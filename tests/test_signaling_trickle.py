"""Trickle ICE over WHIP/WHEP PATCH (RFC 9725 section 4.3, RFC 8840 fragments).

The peers here send their candidates only by PATCH: the offer's a=candidate lines are cut, and
the server's candidates are cut from the answer too, so the server can only reach the peer
through the candidates it was PATCHed (the peer then learns the server's address from the
server's checks, as a peer-reflexive candidate). Media flowing proves the PATCH was applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urljoin

import httpx
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, MediaStreamTrack
from media_support import Cluster, Viewer, host_token, http_client, running_cluster

from lotcast.media.testsource import CounterVideoTrack, read
from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)
SDPFRAG = "application/trickle-ice-sdpfrag"


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer) -> Iterator[Cluster]:
    with running_cluster(redis_server) as c:
        yield c


def split_candidates(sdp: str) -> tuple[str, dict[str, list[str]]]:
    """The SDP without candidates/end-of-candidates, and the cut candidates by mid."""
    kept: list[str] = []
    cut: dict[str, list[str]] = {}
    mid = ""
    for section in re.split(r"(?=^m=)", sdp, flags=re.M):
        found = re.search(r"^a=mid:(\S+)", section, flags=re.M)
        mid = found.group(1) if found else mid
        for line in section.splitlines(keepends=True):
            if line.startswith("a=candidate:"):
                cut.setdefault(mid, []).append(line.strip())
            elif not line.startswith("a=end-of-candidates"):
                kept.append(line)
    return "".join(kept), cut


def credentials(sdp: str) -> tuple[str, str]:
    ufrag = re.search(r"a=ice-ufrag:(\S+)", sdp)
    pwd = re.search(r"a=ice-pwd:(\S+)", sdp)
    assert ufrag and pwd
    return ufrag.group(1), pwd.group(1)


def fragment(sdp: str, candidates: dict[str, list[str]], only_mid: str | None = None) -> str:
    """An RFC 8840 fragment: the session's own credentials, then candidates per m-section."""
    ufrag, pwd = credentials(sdp)
    lines = [f"a=ice-ufrag:{ufrag}", f"a=ice-pwd:{pwd}"]
    for mid, lines_of_mid in candidates.items():
        target = only_mid or mid
        lines += ["m=audio 9 UDP/TLS/RTP/SAVPF 0", f"a=mid:{target}", *lines_of_mid]
        if only_mid:
            break
    lines.append("a=end-of-candidates")
    return "\r\n".join(lines) + "\r\n"


class TricklingPeer:
    """An aiortc WHIP publisher or WHEP viewer that signals its candidates only by PATCH."""

    def __init__(self, url: str, publish: bool, token: str | None = None) -> None:
        self.url = url
        self.publish = publish
        self.token = token
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.resource: str | None = None
        self.etag: str | None = None
        self.offer = ""
        self.candidates: dict[str, list[str]] = {}
        self.counters: list[int] = []
        self._tasks: list[asyncio.Task[None]] = []

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def post(self, http: httpx.AsyncClient) -> None:
        if self.publish:
            self.pc.addTrack(AudioStreamTrack())
            self.pc.addTrack(CounterVideoTrack(30))
        else:
            self.pc.addTransceiver("audio", direction="recvonly")
            self.pc.addTransceiver("video", direction="recvonly")

            @self.pc.on("track")
            def on_track(track: MediaStreamTrack) -> None:
                if track.kind == "video":
                    self._tasks.append(asyncio.ensure_future(self._decode(track)))

        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.offer, self.candidates = split_candidates(self.pc.localDescription.sdp)
        assert self.candidates and "a=candidate" not in self.offer
        response = await http.post(self.url, content=self.offer,
                                   headers={"Content-Type": "application/sdp", **self.auth()})
        assert response.status_code == 201, response.text
        assert response.headers["Accept-Patch"] == SDPFRAG
        self.resource = urljoin(self.url, response.headers["Location"])
        self.etag = response.headers["ETag"]
        answer, server_candidates = split_candidates(response.text)
        assert server_candidates, "the server's answer carries its candidates"
        await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))

    async def patch(self, http: httpx.AsyncClient, body: str, if_match: str | None = None
                    ) -> httpx.Response:
        assert self.resource is not None and self.etag is not None
        return await http.patch(self.resource, content=body, headers={
            "Content-Type": SDPFRAG, "If-Match": if_match or self.etag, **self.auth()})

    async def _decode(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await track.recv()
                self.counters.append(read(frame)[0])  # type: ignore[arg-type]

    async def wait_connected(self, timeout: float) -> None:
        for _ in range(int(timeout / 0.05)):
            if self.pc.connectionState == "connected":
                return
            await asyncio.sleep(0.05)
        assert self.pc.connectionState == "connected", self.pc.connectionState

    async def wait_frames(self, count: int, timeout: float) -> None:
        for _ in range(int(timeout / 0.05)):
            if len(self.counters) >= count:
                return
            await asyncio.sleep(0.05)
        assert len(self.counters) >= count, f"decoded {len(self.counters)} of {count} frames"

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pc.close()


@contextlib.asynccontextmanager
async def peer(url: str, publish: bool, token: str | None = None) -> AsyncIterator[TricklingPeer]:
    p = TricklingPeer(url, publish, token)
    try:
        yield p
    finally:
        await p.close()


async def test_publisher_and_viewer_connect_with_candidates_only_by_patch(cluster: Cluster) -> None:
    origin, relay = cluster.origin.url, cluster.relay.url
    async with http_client() as http, \
            peer(f"{origin}/whip/trickled", publish=True, token=host_token()) as publisher:
        await publisher.post(http)
        await asyncio.sleep(0.5)
        assert publisher.pc.connectionState != "connected"  # nothing to pair with yet
        # all candidates under the BUNDLEd video mid: the server maps them to the BUNDLE tag
        response = await publisher.patch(http, fragment(publisher.offer, publisher.candidates,
                                                        only_mid="1"))
        assert response.status_code == 204, response.text
        await publisher.wait_connected(15)

        async with peer(f"{relay}/whep/trickled", publish=False) as viewer:
            await viewer.post(http)
            response = await viewer.patch(http, fragment(viewer.offer, viewer.candidates))
            assert response.status_code == 204, response.text
            await viewer.wait_frames(10, timeout=30)

        # a plain WHEP viewer still plays alongside
        plain = Viewer(relay, "trickled")
        await plain.start()
        await plain.wait_frames(5, timeout=30)
        await plain.stop()
        response = await http.delete(publisher.resource or "", headers=publisher.auth())
        assert response.status_code == 200


async def test_trickle_pieces_and_restart(cluster: Cluster) -> None:
    """Candidates in several PATCHes, then end-of-candidates alone; new credentials = restart."""
    origin = cluster.origin.url
    async with http_client() as http, \
            peer(f"{origin}/whip/trickle-pieces", publish=True, token=host_token()) as publisher:
        await publisher.post(http)
        ufrag, pwd = credentials(publisher.offer)
        mid, lines = next(iter(publisher.candidates.items()))
        response = await publisher.patch(
            http, f"a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\na=mid:{mid}\r\n{lines[0]}\r\n")
        assert response.status_code == 204, response.text
        # a candidate alone, If-Match: *
        response = await publisher.patch(http, f"a=mid:{mid}\r\n{lines[0]}\r\n", if_match="*")
        assert response.status_code == 204, response.text
        response = await publisher.patch(http, "a=end-of-candidates\r\n")
        assert response.status_code == 204, response.text
        await publisher.wait_connected(15)
        # new credentials: an ICE restart, which the server does not do
        response = await publisher.patch(
            http, "a=ice-ufrag:fresh\r\na=ice-pwd:freshfreshfreshfreshfr\r\n"
                  f"a=mid:{mid}\r\n{lines[0]}\r\n")
        assert response.status_code == 422, response.text
        assert "ICE restart is not supported" in response.text
        # a mid the session lacks; a candidate that is not an address
        response = await publisher.patch(http, f"a=mid:9\r\n{lines[0]}\r\n")
        assert response.status_code == 422 and "mid '9'" in response.text
        response = await publisher.patch(
            http, f"a=mid:{mid}\r\na=candidate:1 1 udp 2130706431 example.com 9 typ host\r\n")
        assert response.status_code == 400 and "not an IP address" in response.text
        assert publisher.pc.connectionState == "connected"
        await http.delete(publisher.resource or "", headers=publisher.auth())


@pytest.mark.parametrize("path", ["/whip/opts", "/whip/opts/some-session"])
async def test_options_advertise_patch(cluster: Cluster, path: str) -> None:
    async with http_client() as http:
        response = await http.options(f"{cluster.origin.url}{path}")
    assert response.status_code == 204
    assert response.headers["Accept-Patch"] == SDPFRAG
    assert "PATCH" in response.headers["Access-Control-Allow-Methods"].split(", ")
    allow = response.headers["Allow"].split(", ")
    if path.endswith("some-session"):
        assert allow == ["PATCH", "DELETE", "OPTIONS"]
    else:
        assert allow == ["POST", "OPTIONS"]
        assert response.headers["Accept-Post"] == "application/sdp"
