"""`lotcast up --redis-cluster 3`: a real 3-primary + 3-replica cluster under `up`, the nodes
on it, a killed cluster node restarted and rejoined, and everything stopped on Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from up_support import CHILD_LINE, UpProcess

from lotcast import redisconn
from lotcast.auth import Role
from lotcast.interactive.client import RoomClient

CLUSTER_LINE = re.compile(r"^\s+Redis Cluster: (redis\+cluster://\S+) ")
NODE_LINE = re.compile(r"^\s+(redis-\d+):\s+127\.0\.0\.1:(\d+) \(pid (\d+)\)")


class ClusterUp(UpProcess):
    def start(self, timeout: float = 120.0) -> ClusterUp:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "lotcast", "up", "--broadcaster-port", "0", "--relay-port", "0",
             "--relays", "1", "--data-dir", str(self.data_dir), "--redis-cluster", "3",
             "--redis-cluster-port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_line(re.compile(r"Press Ctrl-C to stop"), timeout)
        for line in self.snapshot():
            if m := CHILD_LINE.match(line):
                if m.group(1) != "Redis":
                    self.urls[m.group(1)] = m.group(2)
                    self.pids[m.group(1)] = int(m.group(3))
            elif m := CLUSTER_LINE.match(line):
                self.urls["cluster"] = m.group(1)
            elif m := NODE_LINE.match(line):
                self.pids[m.group(1)] = int(m.group(3))
        self.every_pid |= set(self.pids.values())
        return self


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.timeout(240)
async def test_up_runs_on_a_redis_cluster_and_restarts_a_killed_node(tmp_path: Path) -> None:
    up = ClusterUp(tmp_path / "data").start()
    try:
        nodes = sorted(n for n in up.pids if n.startswith("redis-"))
        assert nodes == [f"redis-{i}" for i in range(6)], up.text()
        assert {"broadcaster", "relay-0", "cluster"} <= set(up.pids) | set(up.urls), up.text()
        client = redisconn.connect(up.urls["cluster"])
        try:
            raw = await client.execute_command("CLUSTER", "NODES")  # type: ignore[no-untyped-call]
            flags = [str(v.get("flags", "")) for v in raw.values()] if isinstance(raw, dict) \
                else [line.split()[2] for line in raw.decode().splitlines()]
            assert sum("master" in f for f in flags) == 3, flags
            assert sum("slave" in f for f in flags) == 3, flags
        finally:
            await client.aclose()
        authority = up.authority()
        relay = up.urls["relay-0"]
        host = RoomClient(relay, "up-cluster", authority.mint(Role.HOST, "host", "Host"))
        bidder = RoomClient(relay, "up-cluster", authority.mint(Role.BIDDER, "b", "B"))
        await host.connect()
        await bidder.connect()
        lot = (await host.request("lot_create", title="t", start_price=10, increments=[[0, 1]],
                                  duration_ms=60_000, soft_close_ms=0))["lot"]
        assert (await host.request("lot_open", lot=lot))["type"] == "ack"
        reply = await bidder.request("bid", lot=lot, amount=10)
        assert reply["type"] == "ack" and reply["status"] == "winning", reply
        # kill -9 a cluster node: up restarts it on its port, it rejoins from its nodes.conf
        mark = up.kill_child("redis-4")
        pid, _ = await asyncio.to_thread(up.wait_restart, "redis-4", 60, mark)
        assert alive(pid)
        for _ in range(100):  # the room keeps answering (its shard may be failing over)
            reply = await bidder.request("bid", lot=lot, amount=11 + _)
            if reply["type"] == "ack":
                break
            assert reply["code"] == "unavailable", reply
            await asyncio.sleep(0.2)
        assert reply["type"] == "ack", reply
        await host.close()
        await bidder.close()
    finally:
        code = up.stop()
    assert code == 0, up.text()
    for name, pid in up.pids.items():
        assert not alive(pid), f"{name} (pid {pid}) outlived up"
