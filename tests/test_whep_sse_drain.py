"""WHEP SSE `reconnect` when a relay drains: a viewer of the relay that gets SIGTERM is told the
WHEP URL placement picked for it (another relay), plays from there, and the old session's event
stream ends when the drained relay exits."""

from __future__ import annotations

import asyncio
import signal

import pytest
from cluster_support import scaled_cluster
from media_support import Publisher, host_token, http_client
from sse_support import Session, play, subscribed

from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)

async def test_draining_relay_sends_reconnect_with_the_placed_url(redis_server: RedisServer) -> None:
    with scaled_cluster(redis_server, relays=2, capacity=5, drain_timeout=20) as cluster:
        publisher = Publisher(cluster.origin.url, "drain", host_token())
        await publisher.start()
        sessions: list[Session] = []
        try:
            victim, other = cluster.relays["relay-0"], cluster.relays["relay-1"]
            first = await play(victim.url, "drain")
            sessions.append(first)
            async with http_client() as http, subscribed(
                    http, first, ["active", "reconnect"]) as reader:
                await reader.wait("active")
                await first.viewer.wait_frames(5, timeout=30)
                victim.signal(signal.SIGTERM)
                await reader.wait("reconnect", timeout=20)
                url = next(data for name, data in reader.events if name == "reconnect")["url"]
                assert url == f"{other.url}/whep/drain"
                # the player follows it: a new session there, then the old one is let go
                moved = await play(str(url).removesuffix("/whep/drain"), "drain")
                sessions.append(moved)
                await moved.viewer.wait_frames(5, timeout=30)
                assert (await http.delete(first.viewer.resource or "")).status_code == 200
                await reader.wait("ended", timeout=20)
                code = await asyncio.to_thread(victim.wait, 25)
                assert code == 0, victim.output[-10:]
        finally:
            await publisher.stop()
            for session in sessions:
                await session.viewer.stop(delete=False)
