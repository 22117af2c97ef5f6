"""The several-origins tests (tests/test_origins.py) against a 3-primary Redis Cluster too: the
binding scripts, the MGET of bindings (one hash tag) and the drain notices over cluster pub/sub."""

from __future__ import annotations

import pytest
from test_origins import (
    test_sigterm_origin_moves_its_stream_make_before_break_and_exits_when_empty as drain_test,
)
from test_origins import (
    test_streams_spread_over_two_origins_and_relays_pull_each_from_its_own as spread_test,
)

from lotcast.redis_cluster import LocalRedisCluster


@pytest.fixture
def redis_server(redis_cluster: LocalRedisCluster) -> LocalRedisCluster:
    return redis_cluster


test_spread_on_a_cluster = pytest.mark.timeout(150)(spread_test)
test_drain_on_a_cluster = pytest.mark.timeout(150)(drain_test)
