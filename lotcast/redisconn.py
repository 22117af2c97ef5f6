"""One Redis client factory: a standalone/Sentinel-fronted Redis or a Redis Cluster, from the URL.

``redis://host:port/0`` (or ``rediss://``) is one Redis; ``redis+cluster://h1:p1,h2:p2`` (or
``rediss+cluster://``) is a Redis Cluster reached through any of the listed nodes, as is a plain
``redis://`` URL with ``cluster=True`` (the ``--redis-cluster`` flag, ``LOTCAST_REDIS_CLUSTER``).
Like encode/broadcaster, the scheme picks the backend; callers get one client type either way.

`redis.asyncio.RedisCluster` has the command API of `redis.asyncio.Redis` (same mixins) but is
not its subclass, so the factory returns it typed as `Redis`: code that must know the difference
(per-node Function loading, sharded pub/sub, WAIT on the node of a call) asks `is_cluster`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


class RedisMode(enum.Enum):
    SINGLE = "single"
    CLUSTER = "cluster"


@dataclass(frozen=True)
class RedisTarget:
    mode: RedisMode
    url: str  # a plain redis:// URL of the first node (what redis-py's from_url parses)
    nodes: tuple[tuple[str, int], ...]  # every listed host:port (cluster seeds)
    username: str | None
    password: str | None
    tls: bool


def parse_redis_url(url: str, *, cluster: bool = False) -> RedisTarget:
    """Raise ValueError with the reason for a URL neither redis-py nor we can use."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in CLUSTER_SCHEMES:
        mode, base = RedisMode.CLUSTER, CLUSTER_SCHEMES[scheme]
    elif scheme in ("redis", "rediss"):
        mode, base = (RedisMode.CLUSTER if cluster else RedisMode.SINGLE), scheme
    else:
        raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} (redis://, rediss://, "
                         "redis+cluster://, rediss+cluster://)")
    auth, _, hosts = parts.netloc.rpartition("@")
    username, _, password = auth.partition(":") if auth else ("", "", "")
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, sep, port = item.rpartition(":")
        if not sep:
            host, port = item, "6379"
        if not host or not port.isdigit():
            raise ValueError(f"bad Redis node {item!r} in {url!r} (want host:port)")
        nodes.append((host.strip("[]"), int(port)))
    if mode is RedisMode.SINGLE and len(nodes) != 1:
        raise ValueError(f"{url!r} lists {len(nodes)} nodes; a list needs redis+cluster://")
    first = f"{auth + '@' if auth else ''}{nodes[0][0]}:{nodes[0][1]}"
    plain = f"{base}://{first}{parts.path}{'?' + parts.query if parts.query else ''}"
    return RedisTarget(mode, plain, tuple(nodes), unquote(username) or None,
                       unquote(password) or None, base == "rediss")


def connect(url: str, *, cluster: bool = False, max_connections: int | None = None,
            **options: Any) -> aioredis.Redis:
    """A client for `url`. On a cluster, `max_connections` bounds each node's pool."""
    target = parse_redis_url(url, cluster=cluster)
    if target.mode is RedisMode.CLUSTER:
        kwargs: dict[str, Any] = {"username": target.username, "password": target.password,
                                  "ssl": target.tls, **options}
        if max_connections is not None:
            kwargs["max_connections"] = max_connections
        client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.nodes],
                              **kwargs)
        return cast("aioredis.Redis", client)
    if max_connections is None:
        return aioredis.Redis.from_url(target.url, **options)
    # A blocking pool queues commands when every connection is busy (a bid burst) instead of
    # failing them with "Too many connections".
    pool = aioredis.BlockingConnectionPool.from_url(
        target.url, max_connections=max_connections, timeout=5, **options)
    return aioredis.Redis(connection_pool=pool)


def is_cluster(client: aioredis.Redis) -> bool:
    return isinstance(client, RedisCluster)


def as_cluster(client: aioredis.Redis) -> RedisCluster:
    if not isinstance(client, RedisCluster):
        raise TypeError("not a Redis Cluster client")
    return client


def node_client(cluster: RedisCluster, node: ClusterNode) -> aioredis.Redis:
    """A plain client of one cluster node (a sharded pub/sub connection, for one), with the
    cluster client's credentials."""
    kw = node.connection_kwargs
    return aioredis.Redis(host=node.host, port=int(node.port), username=kw.get("username"),
                          password=kw.get("password"),
                          ssl=issubclass(node.connection_class, aioredis.SSLConnection))
