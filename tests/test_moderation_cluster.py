"""tests/test_moderation.py against the 3-primary Redis Cluster too (tests/suite_support.py)."""

from __future__ import annotations

import pytest
import test_moderation
from suite_support import again_on_the_cluster
from test_moderation import nodes, room  # noqa: F401 (its fixtures, resolved here)

from lotcast.redis_cluster import LocalRedisCluster


@pytest.fixture(scope="module")
def redis_server(redis_cluster: LocalRedisCluster) -> LocalRedisCluster:
    return redis_cluster


again_on_the_cluster(test_moderation, globals())
