"""Several origins (issue 13): WHIP placement over two broadcasters, the stream -> origin binding in
Redis, relays pulling each stream from its own origin, and a crashed origin's stream coming back on
the survivor. Real processes, real Redis, aiortc publishers and viewers over loopback."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time

import httpx
import pytest
import redis.asyncio as aioredis
from media_support import Viewer, host_token, http_client
from origin_support import PlacedPublisher, PublishRefused, publish_anywhere, two_origins

from lotcast import keys
from lotcast.redis_server import RedisServer


async def binding(redis: aioredis.Redis, stream: str) -> str | None:
    raw = await redis.get(keys.stream_origin(stream))
    return None if raw is None else raw.decode()


async def relay_upstream(relay_url: str, stream: str) -> str | None:
    async with http_client() as http:
        stats = (await http.get(f"{relay_url}/api/stats")).json()
    return next((u["url"] for u in stats["upstreams"] if u["stream"] == stream), None)


async def wait_until(check: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {within}s: {what}")


@pytest.mark.timeout(120)
async def test_streams_spread_over_two_origins_and_relays_pull_each_from_its_own(
        redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    token = host_token()
    with two_origins(redis_server, heartbeat=1.0) as cluster:  # TTL 3 s: no stale origin under load
        first = PlacedPublisher(cluster.urls[0], "show-a", token)
        await first.start()
        a_origin = cluster.by_url(first.origin_url)
        b_origin = cluster.other(a_origin)
        a_id, b_id = a_origin.name, b_origin.name
        assert await binding(redis_client, "show-a") == a_id
        # the second stream POSTed to the busier origin is placed on the idle one
        second = PlacedPublisher(a_origin.url, "show-b", token)
        await second.start()
        try:
            assert second.origin_url == b_origin.url, second.hops
            assert len(second.hops) == 2, second.hops
            assert second.hops[1] == f"{b_origin.url}/whip/show-b?from={a_id}"
            assert await binding(redis_client, "show-b") == b_id
            # a stream bound to a live origin goes there; that origin refuses a second publisher
            async with http_client() as http:
                r = await http.post(f"{b_origin.url}/whip/show-a", content="v=0\r\n",
                                    headers={"Content-Type": "application/sdp",
                                             "Authorization": f"Bearer {token}"})
                assert r.status_code == 307, r.text
                assert r.headers["location"] == f"{a_origin.url}/whip/show-a?from={b_id}"
                dup = PlacedPublisher(b_origin.url, "show-a", token)
                with pytest.raises(PublishRefused) as refused:
                    await dup.start()
                await dup.stop(delete=False)
                assert refused.value.status == 409
                # the placement answer the host page asks for first
                r = await http.get(f"{a_origin.url}/api/streams/show-c/ingest")
                assert r.status_code == 200, r.text
                body = r.json()
                assert sorted(body["origins"]) == sorted(cluster.urls)
                r = await http.get(f"{a_origin.url}/api/streams/bad%20id/ingest")
                assert r.status_code == 400
            # one relay, two streams, two upstreams: each from its own origin (the relay's
            # configured origin URL is origin-0 for both)
            relay = cluster.relays[0]
            viewers = [Viewer(relay.url, "show-a"), Viewer(relay.url, "show-b")]
            for v in viewers:
                await v.start()
            for v in viewers:
                await v.wait_frames(10, timeout=20)
            assert await relay_upstream(relay.url, "show-a") == a_origin.url
            assert await relay_upstream(relay.url, "show-b") == b_origin.url
            for v in viewers:
                await v.stop()
        finally:
            await second.stop()
            await first.stop()
        # the binding goes when the stream ends on its origin (grace: the publisher may return)
        async with http_client() as http:
            stats = (await http.get(f"{b_origin.url}/api/stats")).json()
        assert "show-b" in stats["bound"] or await binding(redis_client, "show-b") is None


@pytest.mark.timeout(150)
async def test_killed_origin_stream_is_live_again_on_the_other(
        redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    token = host_token()
    # the default heartbeat (Settings, k8s base): the survivor takes the binding over once the
    # dead origin's registry entry is stale (3 beats), which is most of the 5 s target
    with two_origins(redis_server, heartbeat=1.0) as cluster:
        publisher = PlacedPublisher(cluster.urls[0], "crash-show", token)
        await publisher.start()
        victim = cluster.by_url(publisher.origin_url)
        survivor = cluster.other(victim)
        relay = cluster.relays[0]
        viewer = Viewer(relay.url, "crash-show")
        await viewer.start()
        await viewer.wait_frames(15, timeout=20)
        assert await relay_upstream(relay.url, "crash-show") == victim.url
        victim.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        last_counter = viewer.counters[-1]
        await publisher.stop(delete=False)
        # the host page's retry: every origin it knows, the dead one first
        again = await publish_anywhere([victim.url, survivor.url], "crash-show", token,
                                       first_frame=last_counter + 1000, within=30)
        republished_at = time.monotonic()
        try:
            assert again.origin_url == survivor.url
            assert await binding(redis_client, "crash-show") == survivor.name

            async def back() -> bool:
                return any(c > last_counter + 1000 for c in viewer.counters)

            await wait_until(back, 40, "the viewer decodes the new publisher's frames")
            back_at = time.monotonic()
            print(f"\norigin kill -9 -> republished on the survivor in "
                  f"{republished_at - killed_at:.2f}s, live again for the relay's viewer in "
                  f"{back_at - killed_at:.2f}s (issue target: 5 s)")
            assert await relay_upstream(relay.url, "crash-show") == survivor.url
            assert viewer.pc.connectionState == "connected"
        finally:
            await viewer.stop()
            await again.stop()


@pytest.mark.timeout(90)
async def test_a_crashed_holder_is_taken_over_before_its_registry_entry_expires(
        redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    """kill -9 of the stream's origin: its registry entry and binding outlive it (3 heartbeats,
    here 30 s), but the survivor probes the holder before sending a republish there, finds it
    dead and serves the POST itself (before the probe: 307 back to the dead origin until the
    entry expired)."""
    token = host_token()
    with two_origins(redis_server, relays=0, heartbeat=10.0) as cluster:
        first = PlacedPublisher(cluster.urls[0], "probe-show", token)
        await first.start()
        victim = cluster.by_url(first.origin_url)
        survivor = cluster.other(victim)
        assert await binding(redis_client, "probe-show") == victim.name
        victim.signal(signal.SIGKILL)
        assert victim.wait(10) is not None
        await first.stop(delete=False)
        assert await redis_client.exists(keys.node(victim.name)) == 1  # still registered
        async with http_client() as http:
            r = await http.get(f"{survivor.url}/api/streams/probe-show/ingest")
        assert r.status_code == 200, r.text
        assert r.json()["origin"] == survivor.name, r.json()
        assert r.json()["origins"] == [survivor.url], r.json()
        again = PlacedPublisher(survivor.url, "probe-show", token)
        try:
            await again.start()
            assert again.hops == [f"{survivor.url}/whip/probe-show"], again.hops
            assert again.origin_url == survivor.url
            assert await binding(redis_client, "probe-show") == survivor.name
            # the dead origin's entry had not expired: the probe decided, not the TTL
            assert await redis_client.exists(keys.node(victim.name)) == 1
        finally:
            await again.stop()


@pytest.mark.timeout(60)
async def test_whip_post_with_a_bad_stream_id_or_no_token_is_refused_before_placement(
        redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    token = host_token()
    with two_origins(redis_server, relays=0) as cluster:
        async with httpx.AsyncClient(timeout=10) as http:
            for url in cluster.urls:
                r = await http.post(f"{url}/whip/bad%20id", content="v=0\r\n",
                                    headers={"Content-Type": "application/sdp",
                                             "Authorization": f"Bearer {token}"})
                assert r.status_code == 400, r.text
                r = await http.get(f"{url}/api/streams/bad%20id/ingest")
                assert r.status_code == 400, r.text
                # the token is checked before placement: never a redirect without one
                r = await http.post(f"{url}/whip/fine", content="v=0\r\n",
                                    headers={"Content-Type": "application/sdp"})
                assert r.status_code == 401, r.text
                assert r.headers["www-authenticate"] == 'Bearer realm="lotcast"'


@pytest.mark.timeout(150)
async def test_sigterm_origin_moves_its_stream_make_before_break_and_exits_when_empty(
        redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    from cluster_support import TimedViewer

    from lotcast.interactive.client import RoomClient

    token = host_token()
    with two_origins(redis_server) as cluster:
        first = PlacedPublisher(cluster.urls[0], "drain-show", token)
        await first.start()
        draining = cluster.by_url(first.origin_url)
        survivor = cluster.other(draining)
        # the host's console socket is on the other origin: the notice crosses origins
        host = RoomClient(survivor.url, "drain-show", token)
        await host.connect()
        relay = cluster.relays[0]
        viewer = TimedViewer(relay.url, "drain-show")
        await viewer.start()
        second: PlacedPublisher | None = None
        try:
            await viewer.wait_frames(15, timeout=20)
            draining.signal(signal.SIGTERM)
            term_at = time.monotonic()

            async def told() -> bool:
                return any(m.get("type") == "republish" for _, m in host.received)

            await wait_until(told, 15, "the host is told to republish")
            notice = next(m for _, m in host.received if m.get("type") == "republish")
            assert notice["stream"] == "drain-show"
            assert notice["whip_url"] == (f"{survivor.url}/whip/drain-show?from={draining.name}")
            # make before break: the new session first, the old one ended once it is connected
            last = viewer.counters[-1]
            second = PlacedPublisher(notice["whip_url"].split("/whip/")[0], "drain-show", token,
                                     first_frame=last + 1000)
            second.url = notice["whip_url"]
            await second.start()
            assert second.origin_url == survivor.url
            assert await binding(redis_client, "drain-show") == survivor.name

            async def connected() -> bool:
                return second is not None and second.pc.connectionState == "connected"

            await wait_until(connected, 15, "the new WHIP session connects")

            async def moved() -> bool:
                return any(c > last + 1000 for c in viewer.counters)

            await wait_until(moved, 20, "the viewer plays the new publisher's frames")
            # the old session is not ended by the host: the draining origin ends it once no
            # relay pulls the stream from it, and then exits (no publisher, no pull left)
            assert draining.wait(25) == 0, "".join(draining.output[-30:])
            await first.stop(delete=False)
            exited_at = time.monotonic()
            await asyncio.sleep(1.0)  # frames after the move
            gap = viewer_max_gap(viewer.frame_times, term_at, time.monotonic())
            print(f"\norigin drain: stream moved, longest gap between decoded frames at the "
                  f"relay's viewer {gap * 1000:.0f} ms; drained origin exited "
                  f"{exited_at - term_at:.2f}s after SIGTERM")
            assert await relay_upstream(relay.url, "drain-show") == survivor.url
            assert viewer.pc.connectionState == "connected"
        finally:
            await host.close()
            await viewer.stop()
            if second is not None:
                await second.stop()


def viewer_max_gap(times: list[float], start: float, end: float) -> float:
    points = [start, *(t for t in times if start <= t <= end), end]
    return max(b - a for a, b in itertools.pairwise(points))


@pytest.mark.timeout(120)
async def test_a_publisher_that_cannot_be_told_keeps_its_session_until_the_drain_timeout(
        redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    """OBS-like: no room socket, so no republish; its viewers keep playing from the draining
    origin until the drain timeout, then the origin exits."""
    token = host_token()
    with two_origins(redis_server, drain_timeout=4) as cluster:
        publisher = PlacedPublisher(cluster.urls[0], "obs-show", token)
        await publisher.start()
        draining = cluster.by_url(publisher.origin_url)
        relay = cluster.relays[0]
        viewer = Viewer(relay.url, "obs-show")
        await viewer.start()
        try:
            await viewer.wait_frames(10, timeout=20)
            draining.signal(signal.SIGTERM)
            await asyncio.sleep(2.0)  # half the drain timeout: still serving the stream
            assert draining.alive()
            assert await binding(redis_client, "obs-show") == draining.name
            async with http_client() as http:
                stats = (await http.get(f"{draining.url}/api/stats")).json()
                assert stats["draining"] is True and stats["publishers"] == 1
                assert stats["republish_notices"] >= 1  # told (nobody listens)
                # and it takes no new stream
                r = await http.get(f"{draining.url}/api/streams/new-show/ingest")
                assert r.status_code == 200 and r.json()["origin"] != draining.name
            frames = len(viewer.counters)
            await viewer.wait_frames(frames + 10, timeout=10)
            assert draining.wait(20) == 0, "".join(draining.output[-30:])
        finally:
            await viewer.stop()
            await publisher.stop(delete=False)
