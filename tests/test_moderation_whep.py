"""A ban closes the user's room sockets but not their WHEP playback (docs/protocol.md,
"Moderation"): a real broadcaster and relay, a real aiortc publisher and viewer, private streams
so the WHEP sessions carry the banned user's own token."""

from __future__ import annotations

import asyncio
from urllib.parse import urljoin

import pytest
from aiortc import RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from media_support import SECRET, Publisher, Viewer, host_token, http_client, running_cluster

from lotcast.auth import Role, TokenAuthority
from lotcast.interactive.client import RoomClient
from lotcast.redis_server import RedisServer

AUTHORITY = TokenAuthority(SECRET)


class TokenViewer(Viewer):
    """A media_support Viewer whose WHEP POST carries a bearer token."""

    def __init__(self, base_url: str, stream: str, token: str) -> None:
        super().__init__(base_url, stream)
        self.token = token

    async def start(self, expect: int = 201) -> None:
        self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.addTransceiver("video", direction="recvonly")

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            consume = self._video if track.kind == "video" else self._audio
            self._tasks.append(asyncio.ensure_future(consume(track)))

        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with http_client() as http:
            response = await http.post(self.url, content=self.pc.localDescription.sdp,
                                       headers={"Content-Type": "application/sdp",
                                                "Authorization": f"Bearer {self.token}"},
                                       follow_redirects=True)
        self.status = response.status_code
        assert response.status_code == expect, (response.status_code, response.text)
        self.resource = urljoin(str(response.url), response.headers["Location"])
        await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))


@pytest.mark.timeout(120)
async def test_banned_users_whep_playback_continues(redis_server: RedisServer) -> None:
    stream = "banwhep"
    troll_token = AUTHORITY.mint(Role.BIDDER, "troll", "Troll")
    # the relay serves private streams (its upstream, the origin, stays public to it)
    with running_cluster(redis_server, relays=1, relay_args=["--private-streams"]) as cluster:
        publisher = Publisher(cluster.origin.url, stream, host_token())
        await publisher.start()
        anonymous = Viewer(cluster.relay.url, stream)
        await anonymous.start(expect=401)  # private: a WHEP session needs a token
        viewer = TokenViewer(cluster.relay.url, stream, troll_token)
        host = RoomClient(cluster.origin.url, stream, host_token())
        troll = RoomClient(cluster.relay.url, stream, troll_token)
        later: TokenViewer | None = None
        try:
            await viewer.start()
            await viewer.wait_frames(5, timeout=30)
            await host.connect()
            await troll.connect()
            assert (await host.request("user_ban", user="troll"))["type"] == "ack"
            assert await troll.wait_closed(within=10) == 4503
            refused = RoomClient(cluster.relay.url, stream, troll_token)
            assert (await refused.connect())["code"] == "banned"
            await refused.close()
            # the session made before the ban goes on playing ...
            seen = len(viewer.counters)
            await viewer.wait_frames(seen + 15, timeout=30)
            # ... and a new one with the banned user's token is admitted
            later = TokenViewer(cluster.relay.url, stream, troll_token)
            await later.start()
            await later.wait_frames(5, timeout=30)
        finally:
            for c in (host, troll):
                await c.close()
            for v in (viewer, later):
                if v is not None:
                    await v.stop()
            await publisher.stop()
