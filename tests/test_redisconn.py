"""Pure checks of the Redis Cluster groundwork (issue 13): the URL picks one Redis or a cluster
(lotcast/redisconn.py), and every key lotcast/keys.py names lands in its room's slot or in the
one {global} slot."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from lotcast import keys, redisconn
from lotcast.redisconn import RedisMode, parse_redis_url


@pytest.mark.parametrize(("url", "flag", "mode", "plain", "nodes", "user", "password", "tls"), [
    ("redis://127.0.0.1:6379/0", False, RedisMode.SINGLE, "redis://127.0.0.1:6379/0",
     (("127.0.0.1", 6379),), None, None, False),
    ("redis://redis", False, RedisMode.SINGLE, "redis://redis:6379",
     (("redis", 6379),), None, None, False),
    ("rediss://:s3cret@redis:6380/1", False, RedisMode.SINGLE, "rediss://:s3cret@redis:6380/1",
     (("redis", 6380),), None, "s3cret", True),
    # the flag makes a plain URL a cluster seed
    ("redis://127.0.0.1:7000/0", True, RedisMode.CLUSTER, "redis://127.0.0.1:7000/0",
     (("127.0.0.1", 7000),), None, None, False),
    ("redis+cluster://h1:7000,h2:7001,h3:7002", False, RedisMode.CLUSTER, "redis://h1:7000",
     (("h1", 7000), ("h2", 7001), ("h3", 7002)), None, None, False),
    ("rediss+cluster://app:p%40ss@h1:7000,[::1]:7001", False, RedisMode.CLUSTER,
     "rediss://app:p%40ss@h1:7000", (("h1", 7000), ("::1", 7001)), "app", "p@ss", True),
    ("REDIS+CLUSTER://h1:7000", False, RedisMode.CLUSTER, "redis://h1:7000",
     (("h1", 7000),), None, None, False),
])
def test_the_url_picks_the_backend(url: str, flag: bool, mode: RedisMode, plain: str,
                                   nodes: tuple[tuple[str, int], ...], user: str | None,
                                   password: str | None, tls: bool) -> None:
    target = parse_redis_url(url, cluster=flag)
    assert (target.mode, target.url, target.nodes) == (mode, plain, nodes)
    assert (target.username, target.password, target.tls) == (user, password, tls)


@pytest.mark.parametrize(("url", "reason"), [
    ("http://redis:6379", "unsupported Redis URL scheme 'http'"),
    ("unix:///tmp/redis.sock", "unsupported Redis URL scheme 'unix'"),
    ("redis://h1:7000,h2:7001", "lists 2 nodes; a list needs redis\\+cluster://"),
    ("redis+cluster://h1:7000,h2:port", "bad Redis node 'h2:port'"),
    ("redis+cluster://h1:7000,,h2:7001", "bad Redis node ''"),
])
def test_a_url_we_cannot_use_is_refused_with_the_reason(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_redis_url(url)


async def test_connect_returns_a_cluster_client_for_either_spelling() -> None:
    clients = [redisconn.connect("redis+cluster://127.0.0.1:1,127.0.0.1:2"),
               redisconn.connect("redis://127.0.0.1:1/0", cluster=True),
               redisconn.connect("redis://127.0.0.1:1/0")]
    try:
        assert [redisconn.is_cluster(c) for c in clients] == [True, True, False]
        assert isinstance(redisconn.as_cluster(clients[0]), RedisCluster)
        with pytest.raises(TypeError):
            redisconn.as_cluster(clients[2])
    finally:
        for c in clients:
            await c.aclose()


# --- every key in its call's slot ---------------------------------------------------------

NOT_KEYS = {"PREFIX", "GLOBAL", "FUNCTION_VERSION", "FUNCTION_LIBRARY", "SHOW_FUNCTION_LIBRARY",
            # where ACTIVE_ROOMS lived before the {global} tag: only read once by migrate_legacy
            # on one Redis (never on a cluster)
            "LEGACY_ACTIVE_ROOMS"}


def _key_names() -> tuple[dict[str, Callable[..., str]], dict[str, Callable[..., str]],
                          dict[str, str]]:
    room_keys: dict[str, Callable[..., str]] = {}
    global_keys: dict[str, Callable[..., str]] = {}
    constants: dict[str, str] = {}
    for name, value in vars(keys).items():
        if name.startswith("_") or name in NOT_KEYS:
            continue
        if isinstance(value, str):
            constants[name] = value
        elif inspect.isfunction(value) and value.__module__ == keys.__name__:
            params = list(inspect.signature(value).parameters)
            (room_keys if params and params[0] == "room" else global_keys)[name] = value
    return room_keys, global_keys, constants


def _call(fn: Callable[..., str], first: str) -> str:
    n = len(inspect.signature(fn).parameters)
    return fn(first, *[f"x{i}" for i in range(1, n)])


def test_every_room_key_is_in_its_rooms_slot_and_every_other_key_in_the_global_slot() -> None:
    room_keys, global_keys, constants = _key_names()
    assert {"room_seq", "room_log", "room_channel", "lot", "poll_voters", "room_lib"} <= set(
        room_keys)
    assert set(global_keys) == {"node", "node_workers", "stream_origin"}, global_keys
    assert set(constants) == {"NODES_INDEX", "ACTIVE_ROOMS", "ORIGIN_NOTICES"}, constants
    global_slot = key_slot(keys.GLOBAL.encode())
    for room in ("show-1", "a", "{weird}", "x" * 64):
        slot = key_slot(keys.room_seq(room).encode())
        for name, fn in room_keys.items():
            key = _call(fn, room)
            assert key.startswith(keys.room_prefix(room)), (name, key)
            assert key_slot(key.encode()) == slot, (name, key)
    for name, fn in global_keys.items():
        key = _call(fn, "node-or-stream-1")
        assert key.startswith(keys.GLOBAL + ":") and key_slot(key.encode()) == global_slot, name
    for name, key in constants.items():
        assert key.startswith(keys.GLOBAL + ":") and key_slot(key.encode()) == global_slot, name


def test_the_hash_tag_is_the_room_id_and_a_room_named_global_shares_no_key_name() -> None:
    """A room id is the whole hash tag (ids.py allows no braces), so "global" is a valid room id
    whose keys share the {global} slot: none of them may be a registry/placement key name."""
    for room in ("show-1", "a-b_c", "Z" * 64):
        assert key_slot(keys.room_seq(room).encode()) == key_slot(room.encode())
    room_keys, global_keys, constants = _key_names()
    room_names = {_call(fn, "global") for fn in room_keys.values()}
    other = {_call(fn, "x0") for fn in global_keys.values()} | set(constants.values())
    prefixes = {k.rsplit(":", 1)[0] + ":" for k in other if k.endswith(":x0")}
    assert not room_names & other
    assert not [k for k in room_names if any(k.startswith(p) for p in prefixes)]
