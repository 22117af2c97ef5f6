"""One publisher per stream: of many concurrent WHIP POSTs, exactly one wins (the others 409)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from urllib.parse import urljoin

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack
from media_support import Cluster, Viewer, host_token, http_client, running_cluster

from lotcast.media.testsource import CounterVideoTrack
from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(180)
RACERS = 40


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer) -> Iterator[Cluster]:
    with running_cluster(redis_server) as c:
        yield c


async def publisher_pc() -> RTCPeerConnection:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(AudioStreamTrack())
    pc.addTrack(CounterVideoTrack(30))
    await pc.setLocalDescription(await pc.createOffer())
    return pc


async def test_forty_concurrent_publishers_one_wins(cluster: Cluster) -> None:
    origin = cluster.origin.url
    url = f"{origin}/whip/race"
    pcs = [await publisher_pc() for _ in range(RACERS)]
    token = host_token()
    try:
        async with http_client() as http:
            responses = await asyncio.gather(*(
                http.post(url, content=pc.localDescription.sdp,
                          headers={"Content-Type": "application/sdp",
                                   "Authorization": f"Bearer {token}"})
                for pc in pcs))
            statuses = [r.status_code for r in responses]
            assert sorted(statuses) == [201] + [409] * (RACERS - 1), statuses
            for r in responses:
                if r.status_code == 409:
                    assert "already has a publisher" in r.text
            stats = (await http.get(f"{origin}/api/stats")).json()
            assert stats["publishers"] == 1
            assert [(s["id"], s["state"]) for s in stats["streams"]] == [("race", "live")]

            # the winner is the stream's publisher: viewers see its frames
            index = statuses.index(201)
            winner = responses[index]
            await pcs[index].setRemoteDescription(RTCSessionDescription(winner.text, "answer"))
            viewer = Viewer(cluster.relay.url, "race")
            await viewer.start()
            await viewer.wait_frames(10, timeout=30)
            await viewer.stop()

            # once it leaves, the next publisher gets the stream
            resource = urljoin(url, winner.headers["Location"])
            response = await http.delete(resource, headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200
            late = await publisher_pc()
            pcs.append(late)
            response = await http.post(url, content=late.localDescription.sdp,
                                       headers={"Content-Type": "application/sdp",
                                                "Authorization": f"Bearer {token}"})
            assert response.status_code == 201, response.text
            await http.delete(urljoin(url, response.headers["Location"]),
                              headers={"Authorization": f"Bearer {token}"})
    finally:
        await asyncio.gather(*(pc.close() for pc in pcs))
