"""Shared fixtures: a real redis-server per test session, flushed per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from lotcast.redis_server import RedisServer

# `lotcast relay` runs one worker per usable CPU by default; the suite's relays are one process
# each (what every existing test assumes) unless a test passes --workers (test_relay_workers.py).
# Inherited by every node a test starts (ServiceProcess copies os.environ).
os.environ.setdefault("LOTCAST_WORKERS", "1")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    # No skip: a missing redis-server must fail the run loudly (find_redis_server raises).
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()
