"""WHEP extensions on a relay node of two workers: a session's event-stream subscription, its
event stream and its layer choice reach the worker holding the session, whichever worker the
kernel (SO_REUSEPORT) hands each new connection to; the event stream is passed through live."""

from __future__ import annotations

import asyncio
from urllib.parse import urljoin

import pytest
from media_support import Publisher, host_token, http_client, running_cluster
from sse_support import EventReader, Session, play

from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(150)

STREAM = "workers-sse"


async def subscribe_and_choose(session: Session) -> EventReader:
    """Every request on a new connection (so on a random worker of the node)."""
    async with http_client() as http:
        answer = await http.post(session.layer, json={})
        assert answer.status_code == 204, (answer.status_code, answer.text)
    async with http_client() as http:
        answer = await http.post(session.sse, json=["active", "viewercount"])
        assert answer.status_code == 201, (answer.status_code, answer.text)
        url = urljoin(session.sse, answer.headers["Location"])
    reader = EventReader()
    async with http_client() as http:
        task = asyncio.ensure_future(reader.run(http, url))
        try:
            await reader.wait("viewercount", timeout=20)
            await reader.wait("active", timeout=20)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert reader.status == 200, reader.status
    return reader


async def test_whep_extensions_reach_the_worker_holding_the_session(
        redis_server: RedisServer) -> None:
    relay_args = ["--workers", "2", "--max-viewers", "4", "--heartbeat-interval", "0.5"]
    with running_cluster(redis_server, relay_args=relay_args) as cluster:
        publisher = Publisher(cluster.origin.url, STREAM, host_token())
        await publisher.start()
        sessions: list[Session] = []
        try:
            # 4 viewers on 2 workers of capacity 2: a full worker hands the POST to its sibling,
            # so each worker holds two sessions
            for _ in range(4):
                sessions.append(await play(cluster.relay.url, STREAM))
            await asyncio.gather(*(s.viewer.wait_frames(5, 30) for s in sessions))
            for _ in range(2):  # 2 x 4 sessions x 3 requests on fresh connections
                readers = [await subscribe_and_choose(s) for s in sessions]
                assert all(r.counts() and r.counts()[-1] >= 1 for r in readers)
        finally:
            for session in sessions:
                await session.viewer.stop()
            await publisher.stop()
