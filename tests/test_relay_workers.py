"""A relay node with two worker processes (`lotcast relay --workers 2`), real processes all along:
viewers on both workers, one node in the registry and in /metrics, room sockets on both, a
killed worker restarted while the other keeps forwarding, SIGTERM draining both."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import psutil
import pytest
import redis.asyncio as aioredis

from lotcast import keys
from lotcast.auth import Role, TokenAuthority
from lotcast.interactive.client import HttpRoomClient, RoomClient
from lotcast.ops.node import NodeState
from lotcast.ops.registry import read_live_nodes
from lotcast.redis_server import RedisServer
from lotcast.supervisor import ServiceProcess
from lotcast.workers import WorkerSpec, usable_cpus
from tests.media_support import SECRET, Publisher, Viewer, host_token, http_client, running_cluster

NODE = "relay-0"
STREAM = "workers"
ROOM = "workers"
AUTHORITY = TokenAuthority(SECRET)


async def wait_until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not within {within}s: {what}")


async def node_stats(http: httpx.AsyncClient, relay: ServiceProcess) -> dict[str, object]:
    response = await http.get(relay.url + "/api/stats")
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def workers_of(stats: dict[str, object]) -> dict[int, dict[str, object]]:
    listed = stats["workers"]
    assert isinstance(listed, list)
    return {int(w["worker"]): w for w in listed}


def udp_ports(pid: int) -> set[int]:
    return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="udp")}


def served_port(viewer: Viewer) -> int:
    """The relay UDP port in the viewer's answer (its one host candidate)."""
    remote = viewer.pc.remoteDescription
    assert remote is not None
    ports = {int(m) for m in re.findall(r"a=candidate:\S+ 1 udp \d+ 127\.0\.0\.1 (\d+) typ host",
                                        remote.sdp)}
    assert len(ports) == 1, remote.sdp
    return ports.pop()


def test_worker_count_follows_affinity_and_cgroup_quota(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    assert usable_cpus(quota) == cpus  # no cgroup v2 file: the affinity mask
    quota.write_text("max 100000\n")
    assert usable_cpus(quota) == cpus
    quota.write_text("150000 100000\n")  # a 1.5 CPU limit: one whole core per worker
    assert usable_cpus(quota) == 1
    quota.write_text("50000 100000\n")
    assert usable_cpus(quota) == 1
    quota.write_text(f"{200000 * cpus} 100000\n")  # more quota than CPUs
    assert usable_cpus(quota) == cpus
    spec = [WorkerSpec(i, 3, Path("/x")) for i in range(3)]
    assert [s.share(500) for s in spec] == [167, 167, 166]
    assert [list(s.siblings()) for s in spec] == [[1, 2], [2, 0], [0, 1]]


@pytest.mark.timeout(150)
async def test_two_workers_one_node(redis_server: RedisServer,
                                    redis_client: aioredis.Redis) -> None:
    relay_args = ["--workers", "2", "--max-viewers", "4", "--heartbeat-interval", "0.5",
                  "--drain-timeout", "30"]
    with running_cluster(redis_server, relay_args=relay_args) as cluster:
        relay = cluster.relay
        assert relay.info["workers"] == 2 and len(relay.info["worker_pids"]) == 2
        publisher = Publisher(cluster.origin.url, STREAM, host_token())
        await publisher.start()
        viewers = [Viewer(relay.url, STREAM) for _ in range(4)]
        async with http_client() as http:
            try:
                # -- WHEP: 4 viewers on a node of 2 workers x 2: a full worker hands the POST
                # to its sibling, so each worker ends with exactly 2 whatever the kernel chose
                for viewer in viewers:
                    await viewer.start()
                await asyncio.gather(*(v.wait_frames(10, 30) for v in viewers))
                stats = await node_stats(http, relay)
                per_worker = workers_of(stats)
                assert {i: w["viewers"] for i, w in per_worker.items()} == {0: 2, 1: 2}
                assert {i: w["capacity"] for i, w in per_worker.items()} == {0: 2, 1: 2}
                assert (stats["viewers"], stats["capacity"]) == (4, 4)
                pids = {i: int(str(w["pid"])) for i, w in per_worker.items()}
                assert sorted(pids.values()) == sorted(relay.info["worker_pids"])
                # each viewer's media is served by a UDP socket of the worker that answered it
                owner = {}
                for n, viewer in enumerate(viewers):
                    port = served_port(viewer)
                    owner[n] = next(i for i, pid in pids.items() if port in udp_ports(pid))
                assert sorted(owner.values()) == [0, 0, 1, 1]
                # the whole node is full now: no sibling and no other relay can take a viewer
                extra = Viewer(relay.url, STREAM)
                await extra.start(expect=503)

                # -- the registry sees one node with the summed load and capacity
                async def registered(viewers: int, capacity: int) -> bool:
                    nodes = [n for n in await read_live_nodes(redis_client) if n.kind == "relay"]
                    return ([(n.node_id, n.viewers, n.capacity) for n in nodes]
                            == [(NODE, viewers, capacity)])

                await wait_until(lambda: registered(4, 4), 10, "node relay-0 with 4/4 viewers")
                assert await redis_client.hlen(keys.node_workers(NODE)) == 2

                # -- /metrics: every worker's series, labelled, and the node's load ratio
                text = (await http.get(relay.url + "/metrics")).text
                assert 'lotcast_viewers{worker="0"} 2.0' in text
                assert 'lotcast_viewers{worker="1"} 2.0' in text
                assert re.search(r"^lotcast_relay_load_ratio 1\.0$", text, re.M), text

                # -- a session's DELETE reaches the worker holding it, whichever gets it
                for _ in range(2):
                    gone, viewers = viewers[0], viewers[1:]
                    owner = {n - 1: w for n, w in owner.items() if n}
                    assert gone.resource is not None
                    deleted = await http.delete(gone.resource)
                    assert deleted.status_code == 200, deleted.text
                    await gone.stop(delete=False)
                    missing = await http.delete(gone.resource)
                    assert missing.status_code == 404, missing.text
                assert (await node_stats(http, relay))["viewers"] == 2

                # -- room sockets on both workers see one auction
                host = RoomClient(relay.url, ROOM, AUTHORITY.mint(Role.HOST, "host", "Host"))
                await host.connect()
                watchers: list[RoomClient] = []
                while len({w.welcome["node"] for w in watchers}) < 2 and len(watchers) < 24:
                    watcher = RoomClient(relay.url, ROOM, AUTHORITY.mint(
                        Role.BIDDER, f"u{len(watchers)}", f"User {len(watchers)}"))
                    await watcher.connect()
                    watchers.append(watcher)
                assert {w.welcome["node"] for w in watchers} == {f"{NODE}/w0", f"{NODE}/w1"}
                fallback = HttpRoomClient(relay.url, ROOM)
                await fallback.connect()
                for _ in range(6):  # each POST lands on either worker; the stream's owner answers
                    assert (await fallback.request("ping", ts=1))["type"] == "pong"
                created = await host.request("lot_create", title="Lamp", start_price=100,
                                             increments=[[0, 10]], duration_ms=60_000,
                                             soft_close_ms=0)
                assert created["type"] == "ack", created
                lot = created["lot"]
                await host.request("lot_open", lot=lot)
                bids = [await w.request("bid", lot=lot, amount=100 + 10 * i)
                        for i, w in enumerate(watchers[-2:])]
                assert [b["type"] for b in bids] == ["ack", "ack"], bids
                assert (await host.request("lot_close", lot=lot))["status"] == "sold"
                everyone = [host, *watchers]
                await asyncio.gather(*(c.wait_for(
                    lambda s: s.lots.get(lot, {}).get("status") == "sold") for c in everyone))
                assert {c.state.lots[lot]["winner"] for c in everyone} == {
                    f"u{len(watchers) - 1}"}
                await fallback.close()

                # -- kill -9 one worker: the parent restarts it; the other never stalls
                # the victim: the worker holding fewer of the viewers left (maybe none)
                victim = min((0, 1), key=lambda w: (list(owner.values()).count(w), w))
                survivors = [v for n, v in enumerate(viewers) if owner[n] != victim]
                assert survivors
                os.kill(pids[victim], signal.SIGKILL)
                samples = [[len(v.counters) for v in survivors]]

                async def restarted() -> bool:
                    samples.append([len(v.counters) for v in survivors])
                    try:
                        listed = workers_of(await node_stats(http, relay))
                    except httpx.TransportError:  # landed in the killed worker's accept queue
                        return False
                    return (victim in listed and int(str(listed[victim]["pid"])) != pids[victim]
                            and listed[victim]["state"] == "serving")

                await wait_until(restarted, 60, f"worker w{victim} restarted")
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    samples.append([len(v.counters) for v in survivors])
                # frames kept coming on the surviving worker all along (sampled ~5 per second)
                stalls = [(a, b) for a, b in zip(samples[::5], samples[5::5], strict=False)
                          if any(y <= x for x, y in zip(a, b, strict=True))]
                assert stalls == [], samples
                await wait_until(lambda: registered(len(survivors), 4), 10,
                                 "node back to capacity 4 with the survivors' viewers")

                # -- SIGTERM to the parent drains both workers, then it exits 0
                last_pids = [int(str(w["pid"]))
                             for w in workers_of(await node_stats(http, relay)).values()]
                assert len(last_pids) == 2
                relay.signal(signal.SIGTERM)

                async def draining() -> bool:
                    ready = await http.get(relay.url + "/readyz")
                    stats = await node_stats(http, relay)
                    return (ready.status_code == 503 and bool(stats["draining"])
                            and all(w["draining"] for w in workers_of(stats).values()))

                await wait_until(draining, 15, "both workers draining")
                nodes = await read_live_nodes(redis_client)
                assert [n.state for n in nodes if n.node_id == NODE] == [NodeState.DRAINING]
                # room sockets: the killed worker's were cut (1006), the rest are told to move
                on_victim = [w for w in watchers if w.welcome["node"] == f"{NODE}/w{victim}"]
                assert on_victim and {await w.wait_closed(10) for w in on_victim} == {1006}
                assert {await w.wait_closed(10) for w in watchers if w not in on_victim} == {1001}
                assert relay.returncode is None  # still draining: viewers are left
                for viewer in viewers:
                    await viewer.stop()
                viewers = []
                code = relay.wait(30)
                assert code == 0, "".join(relay.output[-60:])
                assert [pid for pid in last_pids if psutil.pid_exists(pid)] == []
                assert not [n for n in await read_live_nodes(redis_client) if n.node_id == NODE]
                await host.close()
            finally:
                await asyncio.gather(*(v.stop() for v in viewers), return_exceptions=True)
                await publisher.stop()


@pytest.mark.timeout(90)
async def test_kill_9_of_the_node_parent_leaves_no_worker_behind(redis_server: RedisServer) -> None:
    """A worker outliving its parent would keep heartbeating as the node (seen in CI: an orphan
    relay-0 worker in the registry for minutes). Each worker gets SIGINT when its parent dies
    and exits at the latest ORPHAN_EXIT_S after noticing the parent is gone."""
    with running_cluster(redis_server, relay_args=["--workers", "2"]) as cluster:
        relay = cluster.relay
        workers = [psutil.Process(pid) for pid in relay.info["worker_pids"]]
        assert len(workers) == 2 and all(w.is_running() for w in workers)
        relay.kill()  # SIGKILL of the parent: it stops nothing itself
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
                w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers):
            await asyncio.sleep(0.2)
        left = [w.pid for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
        assert left == [], f"workers {left} outlived their parent"
