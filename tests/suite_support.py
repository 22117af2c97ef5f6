"""Running an existing test module's tests again against the 3-primary Redis Cluster (issue 13:
the whole interactive suite runs against one Redis and against the cluster).

A `test_<x>_cluster.py` module imports the source module's fixtures, defines `redis_server` as
the cluster, and calls `again_on_the_cluster(source, namespace)`: every async test of the source
is bound in the new module as `<name>_on_a_cluster` (the same function, so the same fixtures,
resolved in the new module: they follow its `redis_server`). Tests that cannot run on a cluster
are listed in `skip` with the reason in the caller.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection
from types import ModuleType
from typing import Any

import pytest


def again_on_the_cluster(source: ModuleType, namespace: dict[str, Any],
                         skip: Collection[str] = (), timeout: float = 180) -> list[str]:
    bound = []
    for name, fn in vars(source).items():
        if not name.startswith("test_") or name in skip or not inspect.iscoroutinefunction(fn):
            continue  # the pure (sync) tests do not touch Redis
        namespace[f"{name}_on_a_cluster"] = pytest.mark.timeout(timeout)(fn)
        bound.append(name)
    assert bound, f"no async test in {source.__name__}"
    return bound
