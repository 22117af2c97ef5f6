"""tests/test_chat_errors.py against the 3-primary Redis Cluster too (tests/suite_support.py)."""

from __future__ import annotations

import pytest
import test_chat_errors
from suite_support import again_on_the_cluster
from test_chat_errors import server  # noqa: F401 (its fixtures, resolved here)

from lotcast.redis_cluster import LocalRedisCluster


@pytest.fixture(scope="module")
def redis_server(redis_cluster: LocalRedisCluster) -> LocalRedisCluster:
    return redis_cluster


again_on_the_cluster(test_chat_errors, globals())
