"""Real Chromium, real services: the watch page subscribes to the WHEP session's server-sent
events, shows the viewer count they carry, lists one layer (quality menu hidden, stats say
"auto (single layer)"), and follows a `reconnect` when its relay drains."""

from __future__ import annotations

import signal
from typing import Any

import pytest
from browser_support import PageLog, chromium, cluster, open_page, page_state, playing_on, wait_for
from media_support import Viewer

from lotcast.redis_server import RedisServer


def state_is(page: Any, **want: Any) -> Any:
    async def check() -> dict[str, Any] | None:
        s = await page_state(page)
        return s if all(s.get(k) == v for k, v in want.items()) else None
    return check


def text_is(page: Any, selector: str, text: str) -> Any:
    async def check() -> bool:
        return bool(await page.text_content(selector) == text)
    return check


@pytest.mark.timeout(180)
async def test_watch_page_shows_the_sse_viewer_count_and_its_one_layer(
        redis_server: RedisServer) -> None:
    stream = "browser-sse"
    log = PageLog()
    with cluster(redis_server.url, relays=1) as c:
        async with chromium() as browser:
            # one layer: the host page without simulcast (as OBS or GStreamer publish)
            host = await open_page(
                browser, f"{c.origin.url}/host?stream={stream}&simulcast=0#token={c.host_token()}",
                log, "host")
            await host.click("#go-live")
            viewer = await open_page(browser, f"{c.relay.url}/watch?stream={stream}", log, "viewer")
            await wait_for(playing_on(viewer, c.relay.url, 10), 60, "playing on the relay", log)
            await wait_for(state_is(viewer, events="open", sseViewers=1, streamActive=True), 20,
                           "SSE open, one viewer, stream active", log)
            rooms = (await page_state(viewer))["viewers"]  # room sockets (host page and this one)
            # two more WHEP viewers without a room socket: only the SSE count can know them
            others = [Viewer(c.relay.url, stream) for _ in range(2)]
            try:
                for other in others:
                    await other.start()
                s = await wait_for(state_is(viewer, sseViewers=3), 20, "viewercount 3", log)
                assert s["viewers"] == rooms, s
                await wait_for(text_is(viewer, "#viewer-count", "3"), 10, "#viewer-count 3", log)
            finally:
                for other in others:
                    await other.stop()
            # the room still counts its sockets; the page shows the SSE count
            await wait_for(text_is(viewer, "#viewer-count", "1"), 20, "#viewer-count 1", log)
            assert rooms != 1, rooms
            s = await page_state(viewer)
            assert s["layers"] == [{"spatialLayerId": 0, "temporalLayerId": 0}], s
            assert await viewer.is_hidden("#quality-wrap")
            assert await viewer.text_content("#stat-layer") == "auto (single layer)"
            # Auto is the one meaningful choice today: the POST is accepted
            status = await viewer.evaluate("window.lotcast.player.chooseLayer(null)")
            assert status == 204


@pytest.mark.timeout(180)
async def test_watch_page_follows_sse_reconnect_on_relay_drain(redis_server: RedisServer) -> None:
    stream = "browser-sse-drain"
    log = PageLog()
    with cluster(redis_server.url, relays=2, relay_args=["--drain-timeout", "20"]) as c:
        relay_a, relay_b = c.relays
        async with chromium() as browser:
            # one layer: the host page without simulcast (as OBS or GStreamer publish)
            host = await open_page(
                browser, f"{c.origin.url}/host?stream={stream}&simulcast=0#token={c.host_token()}",
                log, "host")
            await host.click("#go-live")
            viewer = await open_page(browser, f"{relay_a.url}/watch?stream={stream}", log, "viewer")
            await wait_for(playing_on(viewer, relay_a.url, 10), 60, "playing on relay A", log)
            await wait_for(state_is(viewer, events="open"), 20, "SSE open", log)
            relay_a.signal(signal.SIGTERM)
            s = await wait_for(state_is(viewer, reconnectEvents=1), 20, "reconnect event", log)
            assert s["reconnectUrl"] == f"{relay_b.url}/whep/{stream}", s
            await wait_for(playing_on(viewer, relay_b.url, 10), 60, "playing on relay B", log)
            await wait_for(state_is(viewer, events="open", sseViewers=1), 20,
                           "SSE open on relay B", log)
