"""Publisher → broadcaster → relay → viewers, all real aiortc peers over loopback UDP."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from media_support import Publisher, Viewer, assert_in_order, host_token, running_cluster, viewers

from lotcast.netutil import free_tcp_port
from lotcast.redis_server import RedisServer
from lotcast.supervisor import ServiceProcess

pytestmark = pytest.mark.timeout(120)


async def test_three_viewers_decode_the_publishers_frames_in_order_with_audio(
    redis_server: RedisServer,
) -> None:
    with running_cluster(redis_server) as cluster:
        publisher = Publisher(cluster.origin.url, "show", host_token())
        await publisher.start()
        try:
            async with viewers(cluster.relay.url, "show", 3) as group:
                for viewer in group:
                    await viewer.wait_frames(45, timeout=30)
                for viewer in group:
                    assert_in_order(viewer.counters)
                    assert viewer.audio_frames > 0, "no audio decoded"
                    # the frames are the publisher's: counters it actually painted
                    assert max(viewer.counters) < publisher.video.counter
                async with httpx.AsyncClient() as http:
                    stats = (await http.get(f"{cluster.relay.url}/api/stats")).json()
                assert stats["viewers"] == 3
                # one upstream pull serves all three viewers
                assert len(stats["upstreams"]) == 1
                stream = stats["streams"][0]
                assert stream["video_packets_sent"] >= 3 * 40
        finally:
            await publisher.stop()


async def test_late_joiner_gets_a_first_frame(redis_server: RedisServer) -> None:
    with running_cluster(redis_server) as cluster:
        publisher = Publisher(cluster.origin.url, "late", host_token())
        await publisher.start()
        try:
            async with viewers(cluster.relay.url, "late", 1) as early:
                await early[0].wait_frames(60, timeout=30)
                late = Viewer(cluster.relay.url, "late")
                await late.start()
                try:
                    await late.wait_frames(5, timeout=10)
                    assert late.first_frame_at is not None
                    # It joined mid-GOP: it starts at a key frame the relay asked for, and
                    # what it decodes is current, not replayed from the start.
                    assert late.counters[0] > early[0].counters[0] + 30
                    assert_in_order(late.counters)
                finally:
                    await late.stop()
        finally:
            await publisher.stop()


async def test_viewers_resume_after_the_publisher_reconnects(redis_server: RedisServer) -> None:
    with running_cluster(redis_server) as cluster:
        first = Publisher(cluster.origin.url, "again", host_token())
        await first.start()
        async with viewers(cluster.relay.url, "again", 2) as group:
            for viewer in group:
                await viewer.wait_frames(20, timeout=30)
            await first.stop()
            await asyncio.sleep(1.0)
            before = [len(v.counters) for v in group]
            second = Publisher(cluster.origin.url, "again", host_token())
            await second.start()
            try:
                for viewer, seen in zip(group, before, strict=True):
                    await viewer.wait_frames(seen + 30, timeout=30)
                    counters = viewer.counters
                    # the second publisher's counter restarted: a drop marks its first frame
                    restart = next(i for i in range(1, len(counters)) if counters[i] < counters[i - 1])
                    assert restart >= seen - 2
                    assert_in_order(counters[:restart])
                    assert_in_order(counters[restart:])
                    assert len(counters) - restart >= 15
                    assert viewer.pc.connectionState == "connected"
            finally:
                await second.stop()


async def test_relay_viewers_resume_after_the_origin_restarts(redis_server: RedisServer) -> None:
    port = free_tcp_port()
    with running_cluster(redis_server, origin_args=["--port", str(port)]) as cluster:
        publisher = Publisher(cluster.origin.url, "phoenix", host_token())
        await publisher.start()
        viewer = Viewer(cluster.relay.url, "phoenix")
        await viewer.start()
        try:
            await viewer.wait_frames(20, timeout=30)
            cluster.origin.kill()  # kill -9: no DELETE, no DTLS close, no BYE
            await publisher.stop(delete=False)
            seen = len(viewer.counters)
            origin = ServiceProcess("broadcaster", ["--port", str(port)], env=cluster.env).start()
            cluster.extra.append(origin)
            second = Publisher(origin.url, "phoenix", host_token(), first_frame=500_000)
            await second.start()
            try:
                # the relay notices the silent upstream from missing Sender Reports (seconds,
                # not ICE consent's ~30 s), pulls again, and the same viewer session resumes
                await viewer.wait_frames(seen + 20, timeout=25)
                assert viewer.pc.connectionState == "connected"
                resumed = [c for c in viewer.counters[seen:] if c >= 500_000]
                assert len(resumed) >= 15  # the new publisher's frames, on the old session
                assert_in_order(resumed)
            finally:
                await second.stop()
        finally:
            await viewer.stop()
