"""Shared fixtures: a real redis-server per test session, flushed per test; a real 3-primary +
3-replica Redis Cluster per session (started on first use); `redis_any`, a module-scoped
parameter over both, which a test module makes its `redis_server` to run against each."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiortc.rtcrtpreceiver
import pytest
import redis.asyncio as aioredis

from lotcast import redisconn
from lotcast.redis_cluster import LocalRedisCluster
from lotcast.redis_server import RedisServer

# `lotcast relay` runs one worker per usable CPU by default; the suite's relays are one process
# each (what every existing test assumes) unless a test passes --workers (test_relay_workers.py).
# Inherited by every node a test starts (ServiceProcess copies os.environ).
os.environ.setdefault("LOTCAST_WORKERS", "1")

# The suite's aiortc viewers get abs-send-time on their video from our nodes, and aiortc's own
# receive-side estimator would run in Python per packet in this process and, once behind under CPU
# load, report overuse and send a REMB with every packet (moving automatic viewers down on an
# estimate of this process's lateness). They send one fixed REMB a second instead, as the load
# farms' viewers do (load/viewer_farm.py PacedRemb); Chromium viewers keep their real estimator.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "load"))
from viewer_farm import PacedRemb

aiortc.rtcrtpreceiver.RemoteBitrateEstimator = PacedRemb  # type: ignore[attr-defined,misc]


@pytest.fixture(scope="session")
def redis_single() -> Iterator[RedisServer]:
    # No skip: a missing redis-server must fail the run loudly (find_redis_server raises).
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_server(redis_single: RedisServer) -> RedisServer:
    return redis_single


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """3 primaries + 3 replicas on loopback (lotcast/redis_cluster.py), for the whole session."""
    cluster = LocalRedisCluster(primaries=3, replicas=1)
    cluster.start()
    yield cluster
    cluster.close()


@pytest.fixture(scope="module", params=["single", "cluster"])
def redis_any(request: pytest.FixtureRequest) -> RedisServer | LocalRedisCluster:
    """A module that defines `redis_server` as this fixture runs every test twice: against one
    Redis and against the Redis Cluster (same `.url` attribute; the URL picks the client)."""
    name = "redis_single" if request.param == "single" else "redis_cluster"
    target: RedisServer | LocalRedisCluster = request.getfixturevalue(name)
    return target


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = redisconn.connect(redis_server.url)
    await client.flushall()  # on a cluster: every primary
    yield client
    await client.aclose()
