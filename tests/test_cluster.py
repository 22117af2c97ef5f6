"""Scale-out on one machine: real Redis, the broadcaster and 3 relays (capacity 5) as processes.

Viewers are aiortc peers placed through `/api/streams/{id}/edge` (tests/cluster_support.py); they
decode the publisher's painted frame counters, so "plays" means frames were decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter

import httpx
import pytest
import redis.asyncio as aioredis
from cluster_support import (
    LadderViewer,
    ScaledCluster,
    percentile,
    relay_stats,
    remember_node_ids,
    scaled_cluster,
)
from media_support import SECRET, Publisher, Viewer, assert_in_order, host_token

from lotcast.auth import Role, TokenAuthority
from lotcast.interactive.client import RoomClient
from lotcast.ops.registry import read_live_nodes
from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(150)

FPS = 15


async def start_viewers(cluster: ScaledCluster, stream: str, n: int,
                        room: str | None = None) -> list[LadderViewer]:
    group = [LadderViewer(cluster.entry_urls, stream, room=room, name=f"v{i}") for i in range(n)]
    for viewer in group:  # one by one, as viewers arrive; placement sees each one
        await viewer.start()
    return group


async def wait_all_frames(group: list[LadderViewer], since: float, count: int,
                          within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(v.frames_since(since) >= count for v in group):
            return
        await asyncio.sleep(0.1)
    short = {v.name: (v.frames_since(since), v.relay_url, v.moves, v.failures)
             for v in group if v.frames_since(since) < count}
    raise AssertionError(f"viewers without {count} frames since t: {short}")


async def stop_all(group: list[LadderViewer]) -> None:
    await asyncio.gather(*(v.stop() for v in group), return_exceptions=True)


async def test_placement_spreads_viewers_then_a_cascade_relay_takes_the_overflow(
    redis_server: RedisServer,
) -> None:
    with scaled_cluster(redis_server, relays=3, capacity=4) as cluster:
        await remember_node_ids(cluster)
        publisher = Publisher(cluster.origin.url, "spread", host_token(), fps=FPS)
        await publisher.start()
        group: list[LadderViewer] = []
        try:
            t0 = time.monotonic()
            group = await start_viewers(cluster, "spread", 12)
            await wait_all_frames(group, t0, 20, within=40)
            for viewer in group:
                assert_in_order(viewer.current.counters if viewer.current else [])
            per_relay = Counter(cluster.node_of(v.relay_url) for v in group)
            assert per_relay == {"relay-0": 4, "relay-1": 4, "relay-2": 4}, per_relay
            stats = await relay_stats(cluster)
            assert {k: s["viewers"] for k, s in stats.items()} == dict(per_relay)

            async with httpx.AsyncClient() as http:
                # every relay is full: placement and a direct WHEP POST answer 503 + Retry-After
                full = await http.get(f"{cluster.origin.url}/api/streams/spread/edge")
                assert full.status_code == 503 and full.headers["retry-after"]
                direct = await http.post(f"{cluster.relays['relay-0'].url}/whep/spread",
                                         content=b"v=0\r\n",
                                         headers={"Content-Type": "application/sdp"})
                assert direct.status_code == 503 and direct.headers["retry-after"]

                # scale out: a new relay pulls from a full relay (cascade), not from the origin
                cluster.add_relay("relay-3")
                t1 = time.monotonic()
                extra = await start_viewers(cluster, "spread", 3)
                group += extra
                await wait_all_frames(extra, t1, 20, within=30)
                assert {cluster.node_of(v.relay_url) for v in extra} == {"relay-3"}
                stats = await relay_stats(cluster)
                (pull,) = stats["relay-3"]["upstreams"]  # type: ignore[misc]
                assert pull["depth"] == 1 and pull["state"] == "connected", pull
                parents = [k for k, s in stats.items() if "relay-3" in s["children"]]  # type: ignore[operator]
                assert len(parents) == 1 and pull["url"] == cluster.relays[parents[0]].url
                # the parent still counts only its 4 viewers (a child pull is not a viewer)
                assert stats[parents[0]]["viewers"] == 4
                origin_stats = (await http.get(f"{cluster.origin.url}/api/stats")).json()
                assert origin_stats["viewers"] == 3  # the origin feeds 3 relays, not 4

                # the registry shows the tree (depth per stream) and each relay's load
                await asyncio.sleep(0.6)
                redis = aioredis.Redis.from_url(redis_server.url)
                try:
                    nodes = {n.node_id: n for n in await read_live_nodes(redis)}
                finally:
                    await redis.aclose()
                assert nodes["relay-3"].streams == {"spread": 1}
                assert nodes[parents[0]].streams == {"spread": 0}
                assert nodes["relay-3"].capacity == 4
                edge = await http.get(f"{cluster.origin.url}/api/streams/spread/edge",
                                      headers={"Accept": "application/json"})
                assert edge.status_code == 200, edge.text
                assert edge.json()["decision"] == "serve", edge.json()

                # /metrics on every node: media counters moved, first frames were timed
                for proc in [cluster.origin, *cluster.relays.values()]:
                    text = (await http.get(f"{proc.url}/metrics")).text
                    values = {line.split()[0]: float(line.split()[1])
                              for line in text.splitlines()
                              if line.startswith("lotcast_") and " " in line}
                    assert values["lotcast_forwarded_packets_total"] > 0, proc.url
                    assert values["lotcast_egress_bytes_total"] > 0, proc.url
                    assert values["lotcast_first_frame_seconds_count"] >= 1, proc.url
                    assert values["lotcast_streams"] == 1, proc.url
                    assert "lotcast_plis_sent_upstream_total" in values
                    assert "lotcast_nacks_served_total" in values
                    assert values["lotcast_udp_sockets"] > 0
                relay_metrics = (await http.get(f"{cluster.relays['relay-0'].url}/metrics")).text
                ratio = [line for line in relay_metrics.splitlines()
                         if line.startswith("lotcast_relay_load_ratio ")]
                assert ratio and float(ratio[0].split()[1]) == 1.0
        finally:
            await stop_all(group)
            await publisher.stop()


async def test_killed_relay_viewers_re_place_and_others_play_on(redis_server: RedisServer) -> None:
    # A flat tree (every relay pulls from the origin), so the other relays' viewers do not depend
    # on the killed relay; re-parenting of cascade children is covered by the drain test.
    with scaled_cluster(redis_server, relays=3, capacity=5,
                        relay_env={"LOTCAST_MAX_CASCADE_DEPTH": "0"}) as cluster:
        await remember_node_ids(cluster)
        publisher = Publisher(cluster.origin.url, "kill", host_token(), fps=FPS)
        await publisher.start()
        group: list[LadderViewer] = []
        try:
            t0 = time.monotonic()
            group = await start_viewers(cluster, "kill", 9)
            await wait_all_frames(group, t0, 15, within=40)
            per_relay = Counter(cluster.node_of(v.relay_url) for v in group)
            victim = per_relay.most_common(1)[0][0]
            assert victim is not None
            victims = [v for v in group if cluster.node_of(v.relay_url) == victim]
            others = [v for v in group if v not in victims]

            killed_at = time.monotonic()
            cluster.relays[victim].kill()  # SIGKILL: no goodbye
            deadline = time.monotonic() + 30
            while (any(v.played_again_at(killed_at) is None for v in victims)
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.1)
            await wait_all_frames(group, time.monotonic(), 10, within=20)
            settled = time.monotonic()

            recovery = []
            for viewer in victims:
                assert viewer.relay_url != cluster.relays[victim].url
                played = viewer.played_again_at(killed_at)
                assert played is not None, (viewer.name, viewer.failures)
                recovery.append(played - killed_at)
            print(f"killed {victim}: {len(victims)} viewers re-placed; recovery s "
                  f"p50={percentile(recovery, 50):.2f} p95={percentile(recovery, 95):.2f} "
                  f"max={max(recovery):.2f}")
            assert max(recovery) < 6.0, recovery
            for viewer in others:  # untouched: same session, no stall
                assert len(viewer.history) == 1 and not viewer.moves, viewer.name
                gap = viewer.max_gap(killed_at, settled)
                assert gap < 1.0, (viewer.name, gap)
            # the dead relay leaves the registry within its TTL (3 x 0.5 s)
            await asyncio.sleep(1.6)
            redis = aioredis.Redis.from_url(redis_server.url)
            try:
                assert victim not in {n.node_id for n in await read_live_nodes(redis)}
            finally:
                await redis.aclose()
        finally:
            await stop_all(group)
            await publisher.stop()


async def test_sigterm_drains_viewers_to_other_relays_without_a_gap(
    redis_server: RedisServer,
) -> None:
    # origin_fanout=1: one relay pulls from the origin, the others cascade from it; draining that
    # root moves its viewers and makes its child relays re-parent.
    with scaled_cluster(redis_server, relays=3, capacity=5, drain_timeout=20,
                        relay_env={"LOTCAST_ORIGIN_FANOUT": "1"}) as cluster:
        await remember_node_ids(cluster)
        publisher = Publisher(cluster.origin.url, "drain", host_token(), fps=FPS)
        await publisher.start()
        group: list[LadderViewer] = []
        try:
            t0 = time.monotonic()
            group = await start_viewers(cluster, "drain", 6, room="drainroom")
            await wait_all_frames(group, t0, 15, within=40)
            # the auction runs on the origin's socket; every viewer watches the room on its relay
            authority = TokenAuthority(SECRET)
            host = RoomClient(cluster.origin.url, "drainroom",
                              authority.mint(Role.HOST, "host", "Host"))
            bidders = [RoomClient(cluster.origin.url, "drainroom",
                                  authority.mint(Role.BIDDER, f"b{i}", f"B{i}")) for i in range(3)]
            for client in (host, *bidders):
                await client.connect()
            lot = (await host.request("lot_create", title="Vase", start_price=100,
                                      increments=[[0, 5]], duration_ms=600_000,
                                      soft_close_ms=0))["lot"]
            await host.request("lot_open", lot=lot)
            bids_done = asyncio.Event()

            accepted: list[int] = []

            async def bid_forever() -> None:
                price = 100
                i = 0
                while not bids_done.is_set():
                    price += 5
                    with contextlib.suppress(Exception):
                        reply = await bidders[i % 3].request("bid", lot=lot, amount=price)
                        if reply.get("type") == "ack":
                            accepted.append(price)
                    i += 1
                    await asyncio.sleep(0.15)

            bidding = asyncio.ensure_future(bid_forever())

            per_relay = Counter(cluster.node_of(v.relay_url) for v in group)
            stats = await relay_stats(cluster)
            for _ in range(100):  # a child's pull shows in its parent's stats once it is live
                if any(st["children"] for st in stats.values()):
                    break
                await asyncio.sleep(0.2)
                stats = await relay_stats(cluster)
            victim = next(k for k, st in stats.items() if st["children"])
            proc = cluster.relays[victim]
            movers = [v for v in group if cluster.node_of(v.relay_url) == victim]
            children_before = stats[victim]["children"]
            print(f"draining {victim}: per relay {dict(per_relay)}, children {children_before}")

            term_at = time.monotonic()
            proc.signal(signal.SIGTERM)
            # readiness fails while it drains; a drain that finishes first (every viewer moved
            # already) is seen in its log instead of by a probe of an exited process
            readiness: str | None = None
            async with httpx.AsyncClient() as http:
                for _ in range(50):
                    if not proc.alive():
                        break
                    try:
                        ready = await http.get(f"{proc.url}/readyz", timeout=1.0)
                    except httpx.HTTPError:
                        await asyncio.sleep(0.05)
                        continue
                    if ready.status_code == 503:
                        readiness = ready.text
                        break
                    await asyncio.sleep(0.05)
            code = await asyncio.to_thread(proc.wait, 25)
            if readiness is not None:
                assert "draining" in readiness
            else:
                assert any("draining:" in line for line in proc.output), proc.output[-10:]
            drained_in = time.monotonic() - term_at
            assert code == 0, proc.output[-20:]
            try:
                await wait_all_frames(group, time.monotonic(), 10, within=20)
            except AssertionError:
                print(await relay_stats(cluster))
                for p in cluster.relays.values():
                    print("".join(p.output[-30:]))
                raise
            end = time.monotonic()
            print(f"drained {victim} ({len(movers)} viewers) in {drained_in:.2f}s")
            # it exited because it was empty, not because drain_timeout expired
            assert any("drain done" in line for line in proc.output), proc.output[-10:]
            assert drained_in < 20
            gaps = {v.name: round(v.max_gap(term_at, end), 2) for v in group}
            print(f"longest stall per viewer during the drain (s): {gaps}")
            print("move failures:", {v.name: v.failures for v in group if v.failures})
            for viewer in group:
                # make-before-break: the old session plays until the new one does (the bound
                # leaves room for a CPU-starved CI box; typical stalls are well under 1 s)
                gap = viewer.max_gap(term_at, end)
                assert gap < 3.0, (viewer.name, gap, viewer.moves, viewer.failures)
            for viewer in movers:
                assert viewer.moves and viewer.moves[-1][0].startswith("relay draining")
                assert cluster.node_of(viewer.relay_url) != victim
                assert viewer.room_joins == 2, (viewer.name, viewer.failures)

            # auction events kept flowing: every viewer applied every event, none missing
            await asyncio.sleep(1.0)  # some bids after the move too
            bids_done.set()
            await bidding
            target = int((await host.request("ping"))["offset"])
            await host.wait_for(lambda st: st.offset >= target, within=10)
            reference = [ev["price"] for ev in host.state.applied if ev["type"] == "bid"]
            assert len(reference) >= len(accepted) >= 5
            for viewer in group:
                assert await viewer.room_caught_up(target, within=10), viewer.name
                state = viewer.room_state
                assert state is not None
                offsets = [ev["offset"] for ev in state.applied]
                assert offsets == list(range(offsets[0], offsets[-1] + 1)), viewer.name
                assert offsets[-1] >= target
                prices = [ev["price"] for ev in state.applied if ev["type"] == "bid"]
                assert prices == reference, viewer.name  # every bid, in order, as the host saw
            for client in (host, *bidders):
                await client.close()
            # a relay that cascaded from the drained one re-parented (before it exited)
            for name, st in (await relay_stats(cluster)).items():
                for pull in st["upstreams"]:  # type: ignore[attr-defined]
                    assert pull["url"] != proc.url, (name, pull)
            assert sum(int(s["reparents"])  # type: ignore[call-overload]
                       for s in (await relay_stats(cluster)).values()) == len(children_before)
        finally:
            await stop_all(group)
            await publisher.stop()


async def test_killed_parent_relay_its_children_re_parent_and_their_viewers_play_on(
    redis_server: RedisServer,
) -> None:
    with scaled_cluster(redis_server, relays=3, capacity=5,
                        relay_env={"LOTCAST_ORIGIN_FANOUT": "1"}) as cluster:
        await remember_node_ids(cluster)
        publisher = Publisher(cluster.origin.url, "tree", host_token(), fps=FPS)
        await publisher.start()
        group: list[LadderViewer] = []
        try:
            t0 = time.monotonic()
            group = await start_viewers(cluster, "tree", 6)
            await wait_all_frames(group, t0, 15, within=40)
            stats = await relay_stats(cluster)
            for _ in range(100):  # a child's pull shows in its parent's stats once it is live
                if any(st["children"] for st in stats.values()):
                    break
                await asyncio.sleep(0.2)
                stats = await relay_stats(cluster)
            root = next(k for k, st in stats.items() if st["children"])
            children = list(stats[root]["children"])  # type: ignore[call-overload]
            fed = [v for v in group if cluster.node_of(v.relay_url) in children]
            assert fed, "no viewer on a cascade relay"

            killed_at = time.monotonic()
            cluster.relays[root].kill()
            await wait_all_frames(group, killed_at + 3.5, 10, within=30)
            end = time.monotonic()
            stalls = [round(v.max_gap(killed_at, end), 2) for v in fed]
            print(f"killed root {root}; children {children} re-parented; "
                  f"their viewers' longest stall (s): {stalls}")
            for viewer in fed:  # the relay re-parented: the viewer did nothing
                assert not viewer.moves, (viewer.name, viewer.moves)
                assert viewer.max_gap(killed_at, end) < 3.0
            after = await relay_stats(cluster)
            for child in children:
                (pull,) = after[child]["upstreams"]  # type: ignore[misc]
                assert pull["state"] == "connected" and pull["url"] != cluster.relays[root].url
                assert after[child]["reparents"] == 1
        finally:
            await stop_all(group)
            await publisher.stop()


async def test_a_hung_parent_still_listed_is_skipped_and_concurrent_viewers_play(
    redis_server: RedisServer,
) -> None:
    """A parent relay that hangs (SIGSTOP) stays in the registry until its heartbeat is stale
    (here 3 x 3 s). A relay asked for the stream meanwhile picks it, gets no answer, and must
    pick the origin instead of failing the viewer; two viewers asking at once share that pull
    (before: one answered 409 after the 10 s timeout, the other 503 from a pull that fed an ended
    stream)."""
    with scaled_cluster(redis_server, relays=2, capacity=5, heartbeat=3.0,
                        relay_env={"LOTCAST_ORIGIN_FANOUT": "1"}) as cluster:
        publisher = Publisher(cluster.origin.url, "hang", host_token(), fps=FPS)
        await publisher.start()
        parent, child = cluster.relays["relay-0"], cluster.relays["relay-1"]
        first = Viewer(parent.url, "hang")
        late: list[Viewer] = []
        stopped = False
        try:
            await first.start()
            await first.wait_frames(10, timeout=30)
            redis = aioredis.Redis.from_url(redis_server.url)
            try:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    nodes = {n.node_id: n for n in await read_live_nodes(redis)}
                    if "relay-0" in nodes and nodes["relay-0"].carries("hang"):
                        break
                    await asyncio.sleep(0.2)
                else:
                    raise AssertionError("relay-0 never listed as carrying the stream")
            finally:
                await redis.aclose()
            os.kill(parent.pid, signal.SIGSTOP)
            stopped = True
            late = [Viewer(child.url, "hang") for _ in range(2)]
            await asyncio.gather(*(v.start() for v in late))
            for viewer in late:
                await viewer.wait_frames(10, timeout=30)
            async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
                stats = (await http.get(f"{child.url}/api/stats")).json()
            (pull,) = stats["upstreams"]
            assert pull["url"].rstrip("/") == cluster.origin.url.rstrip("/"), pull
        finally:
            if stopped:
                os.kill(parent.pid, signal.SIGCONT)
            for viewer in [first, *late]:
                with contextlib.suppress(Exception):
                    await viewer.stop()
            await publisher.stop()
