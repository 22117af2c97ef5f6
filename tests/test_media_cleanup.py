"""Per-session resources are freed on DELETE, on peer failure and on timeout."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from media_support import Publisher, Viewer, host_token, running_cluster

from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)
HERE = Path(__file__).parent


async def relay_stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        return dict((await http.get(f"{url}/api/stats")).json())


async def wait_for(url: str, check: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    stats = await relay_stats(url)
    while not check(stats) and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        stats = await relay_stats(url)
    return stats


async def test_sessions_and_udp_sockets_return_to_baseline(redis_server: RedisServer) -> None:
    with running_cluster(redis_server, relay_args=["--session-timeout", "3"]) as cluster:
        publisher = Publisher(cluster.origin.url, "clean", host_token())
        await publisher.start()
        anchor = Viewer(cluster.relay.url, "clean")  # keeps the upstream pull alive throughout
        await anchor.start()
        try:
            await anchor.wait_frames(5, timeout=30)
            baseline = await relay_stats(cluster.relay.url)
            assert baseline["viewers"] == 1

            polite = [Viewer(cluster.relay.url, "clean") for _ in range(2)]
            await asyncio.gather(*(v.start() for v in polite))
            vanishing = subprocess.Popen(
                [sys.executable, str(HERE / "vanishing_viewer.py"), cluster.relay.url, "clean"],
                stdout=subprocess.PIPE, text=True, cwd=HERE,
            )
            try:
                assert vanishing.stdout is not None
                line = await asyncio.wait_for(asyncio.to_thread(vanishing.stdout.readline), 40)
                assert line.strip() == "PLAYING"
                for viewer in polite:
                    await viewer.wait_frames(5, timeout=30)
                during = await relay_stats(cluster.relay.url)
                assert during["viewers"] == 4
                assert during["udp_sockets"] > baseline["udp_sockets"]

                await asyncio.gather(*(v.stop(delete=True) for v in polite))
                after_delete = await wait_for(cluster.relay.url, lambda s: s["viewers"] == 2, 10)
                assert after_delete["viewers"] == 2

                vanishing.kill()  # no DELETE, no DTLS close: only the timeout can notice
                vanishing.wait()
                after = await wait_for(
                    cluster.relay.url,
                    lambda s: s["viewers"] == 1 and s["udp_sockets"] == baseline["udp_sockets"], 20,
                )
                assert after["viewers"] == baseline["viewers"]
                assert after["udp_sockets"] == baseline["udp_sockets"]
                assert after["sessions"] == baseline["sessions"]
                # the remaining viewer was never disturbed
                seen = len(anchor.counters)
                await anchor.wait_frames(seen + 10, timeout=10)
            finally:
                vanishing.kill()
                vanishing.wait()
        finally:
            await anchor.stop()
            await publisher.stop()


async def test_relay_releases_upstream_and_origin_frees_publisher(redis_server: RedisServer) -> None:
    with running_cluster(redis_server) as cluster:
        publisher = Publisher(cluster.origin.url, "gone", host_token())
        await publisher.start()
        viewer = Viewer(cluster.relay.url, "gone")
        await viewer.start()
        await viewer.wait_frames(5, timeout=30)
        origin = await relay_stats(cluster.origin.url)
        assert origin["publishers"] == 1 and origin["viewers"] == 1  # the relay's pull
        await viewer.stop()
        await publisher.stop()
        origin = await wait_for(cluster.origin.url, lambda s: s["publishers"] == 0, 10)
        assert origin["publishers"] == 0


async def test_a_viewer_that_never_connects_is_reaped(redis_server: RedisServer) -> None:
    with running_cluster(redis_server, relay_args=["--session-timeout", "3"]) as cluster:
        publisher = Publisher(cluster.origin.url, "ghost", host_token())
        await publisher.start()
        anchor = Viewer(cluster.relay.url, "ghost")
        await anchor.start()
        try:
            await anchor.wait_frames(5, timeout=30)
            baseline = await relay_stats(cluster.relay.url)
            ghost = Viewer(cluster.relay.url, "ghost")
            await ghost.start()
            await ghost.pc.close()  # gone before ICE could finish; no DELETE
            during = await relay_stats(cluster.relay.url)
            assert during["sessions"] == baseline["sessions"] + 1
            after = await wait_for(
                cluster.relay.url,
                lambda s: s["sessions"] == baseline["sessions"]
                and s["udp_sockets"] == baseline["udp_sockets"], 15,
            )
            assert after["sessions"] == baseline["sessions"]
            assert after["udp_sockets"] == baseline["udp_sockets"]
        finally:
            await anchor.stop()
            await publisher.stop()
