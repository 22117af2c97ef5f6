"""A real Redis Cluster on loopback: N primaries + N replicas this process starts and owns.

`lotcast up --redis-cluster N` and the tests use it. Each node is a `RedisServer` (same AOF
durability settings) with ``--cluster-enabled yes`` on a port of its own and its own data dir
(its ``nodes.conf`` there, so a restarted node rejoins with its identity and role); the cluster
is formed once with ``redis-cli --cluster create ... --cluster-replicas 1`` and is ready when
every node reports ``cluster_state:ok`` with every slot served. Closing stops every node.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

import redis

from lotcast.netutil import free_tcp_port
from lotcast.redis_server import RedisServer

if TYPE_CHECKING:
    from lotcast.supervisor import Supervisor

# `lotcast up --redis-cluster N`: node i on UP_BASE_PORT + i (bus port + 10000), so a second `up`
# with the same data dir finds its cluster again.
UP_BASE_PORT = 7000

# Short enough that a killed primary's replica takes over within a few seconds (the default,
# 15 s, is a long gap for a live auction); long enough not to fail over on a busy machine.
NODE_TIMEOUT_MS = 3000
SLOTS = 16384


class RedisClusterNode(RedisServer):
    """One cluster member; `name` tells the supervisor which one restarted."""

    def __init__(self, index: int, data_dir: Path, port: int | None = None,
                 supervised: bool = False) -> None:
        super().__init__(data_dir=data_dir, port=port, supervised=supervised)
        self.index = index
        self.name = f"redis-{index}"
        # The bus port: port + 10000 for fixed ports (stable across restarts, nodes.conf keeps
        # the addresses), else a free one (port + 10000 may be taken or beyond 65535).
        self.bus_port = port + 10000 if port and port + 10000 < 65536 else free_tcp_port()

    def extra_args(self) -> list[str]:
        return ["--cluster-enabled", "yes", "--cluster-port", str(self.bus_port),
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                # The other shards keep serving while one fails over.
                "--cluster-require-full-coverage", "no",
                # A replica promotes itself however long its primary has been away (tests kill
                # primaries on a loaded machine, where replication may lag).
                "--cluster-replica-validity-factor", "0"]

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def info(self) -> dict[str, str]:
        with self.client() as c:
            raw = c.execute_command("CLUSTER", "INFO")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(line.split(":", 1) for line in text.split() if ":" in line)


@dataclass(frozen=True)
class ShardView:
    """One primary and the slot ranges it serves (from CLUSTER SHARDS on a live node)."""

    primary_port: int
    replica_ports: tuple[int, ...]
    slots: tuple[tuple[int, int], ...]


class LocalRedisCluster:
    """`primaries` shards of `1 + replicas` redis-server processes on 127.0.0.1."""

    def __init__(self, primaries: int = 3, replicas: int = 1, data_dir: Path | None = None,
                 base_port: int = 0, supervised: bool = False) -> None:
        if primaries < 3:
            raise ValueError("a Redis Cluster needs at least 3 primaries")
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lotcast-redis-cluster-")
            data_dir = Path(self._tmp.name)
        self.data_dir = data_dir
        self.primaries = primaries
        self.replicas = replicas
        count = primaries * (1 + replicas)
        self.nodes = [
            RedisClusterNode(i, data_dir / f"node-{i}",
                             port=(base_port + i) if base_port else free_tcp_port(),
                             supervised=supervised)
            for i in range(count)]

    @property
    def url(self) -> str:
        """What `lotcast.redisconn.connect` takes: every node is a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 60.0) -> None:
        try:
            for node in self.nodes:
                node.start()
            self.form(timeout)
        except BaseException:
            self.stop()
            raise

    def form(self, timeout: float = 60.0) -> None:
        """With every node running (started here or by a supervisor): create the cluster unless
        the nodes already form one, then wait until it is ok."""
        if not self._formed():
            self._create()
        self.wait_ok(timeout)

    def _formed(self) -> bool:
        """True when the nodes already know each other (a restart with the same data dirs)."""
        try:
            return int(self.nodes[0].info().get("cluster_known_nodes", "1")) > 1
        except redis.RedisError:
            return False

    def _create(self) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli not found (apt-get install redis-tools)")
        args = [cli, "--cluster", "create",
                *[f"127.0.0.1:{n.port}" for n in self.nodes],
                "--cluster-replicas", str(self.replicas), "--cluster-yes"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed ({done.returncode}): "
                               f"{(done.stdout + done.stderr)[-2000:]}")

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every live node says cluster_state:ok and every slot is assigned and ok, and
        each shard has its replicas attached (replication up, so WAIT can be satisfied)."""
        deadline = time.monotonic() + timeout
        last: object = None
        # with a node down (a failover test) its shard may be one replica short
        wanted = self.replicas if all(n.alive() for n in self.nodes) else 0
        while time.monotonic() < deadline:
            try:
                infos = [n.info() for n in self.nodes if n.alive()]
                shards = self.shards()
                if (infos and all(i.get("cluster_state") == "ok"
                                  and i.get("cluster_slots_ok") == str(SLOTS) for i in infos)
                        and len(shards) == self.primaries
                        and all(len(s.replica_ports) >= wanted for s in shards)
                        and all(self._online_replicas(s.primary_port) >= wanted
                                for s in shards)):
                    return
                last = infos
            except redis.RedisError as exc:
                last = exc
            time.sleep(0.1)
        raise RuntimeError(f"Redis Cluster not ok after {timeout}s: {last!r}")

    def _online_replicas(self, port: int) -> int:
        """Replicas streaming from this primary (the initial sync done): what WAIT counts."""
        with self.node_on_port(port).client() as c:
            info = c.info("replication")
        return sum(1 for k, v in info.items()
                   if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online")

    def shards(self) -> list[ShardView]:
        """Primaries (with slots) and their replicas whose link is up, as a live node sees it."""
        node = next(n for n in self.nodes if n.alive())
        with node.client() as c:
            raw = c.execute_command("CLUSTER", "NODES")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        by_id: dict[str, list[str]] = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 8:
                by_id[parts[0]] = parts
        views = []
        for node_id, parts in by_id.items():
            flags = parts[2].split(",")
            if "master" not in flags or "fail" in flags or len(parts) < 9:
                continue
            slots = []
            for item in parts[8:]:
                if item.startswith("["):
                    continue  # a slot being migrated
                lo, _, hi = item.partition("-")
                slots.append((int(lo), int(hi or lo)))
            replicas = tuple(_port(p[1]) for p in by_id.values()
                             if p[3] == node_id and "fail" not in p[2].split(",")
                             and p[7] == "connected")
            views.append(ShardView(_port(parts[1]), replicas, tuple(slots)))
        return views

    def node_on_port(self, port: int) -> RedisClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def primary_for(self, key: str) -> RedisClusterNode:
        """The node serving `key`'s slot now."""
        node = next(n for n in self.nodes if n.alive())
        with node.client() as c:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
        for shard in self.shards():
            if any(lo <= slot <= hi for lo, hi in shard.slots):
                return self.node_on_port(shard.primary_port)
        raise RuntimeError(f"no primary serves slot {slot}")

    def flushall(self) -> None:
        """Empty every primary (replicas follow); Function libraries stay."""
        for shard in self.shards():
            with self.node_on_port(shard.primary_port).client() as c:
                c.flushall()

    def stop(self) -> None:
        for node in self.nodes:  # SIGTERM to all first: they shut down in parallel
            if node.alive() and node._proc is not None:
                node._proc.terminate()
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        self.stop()
        for node in self.nodes:
            node.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def describe(self) -> str:
        return f"{self.primaries} primaries + {self.primaries * self.replicas} replicas: " + \
            ", ".join(str(n.port) for n in self.nodes)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _port(address: str) -> int:
    """``127.0.0.1:7000@17000`` -> 7000."""
    return int(address.split("@", 1)[0].rsplit(":", 1)[1])


def start_supervised(primaries: int, data_dir: Path, supervisor: Supervisor,
                     base_port: int = UP_BASE_PORT) -> tuple[str, str]:
    """`lotcast up --redis-cluster N`: every node a supervised child (restarted on the same port
    and data dir if it dies, rejoining as whatever the cluster made it), the cluster formed once.
    Returns (url, what to print: the URL, then one line per node)."""
    if primaries < 3:
        raise RuntimeError(f"--redis-cluster {primaries}: a Redis Cluster needs 3 primaries or more")
    cluster = LocalRedisCluster(primaries, 1, data_dir=data_dir / "redis-cluster",
                                base_port=base_port, supervised=True)
    for node in cluster.nodes:
        supervisor.start(node)
    cluster.form()
    lines = [f"  Redis Cluster: {cluster.url} ({cluster.describe()}; AOF in {cluster.data_dir})"]
    lines += [f"  {node.name + ':':<13} 127.0.0.1:{node.port} (pid {node.pid})"
              for node in cluster.nodes]
    return cluster.url, "\n".join(lines)
