"""Real browser, real services: the viewer page's reconnect ladder moves the player to another relay
when its relay dies (issue 4)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from browser_support import (
    PageLog,
    chromium,
    cluster,
    open_page,
    page_state,
    player_trace,
    playing_on,
    trace_player,
    wait_for,
)

from lotcast.redis_server import RedisServer


@pytest.mark.timeout(180)
async def test_viewer_moves_to_another_relay_when_its_relay_is_killed(
    redis_server: RedisServer,
) -> None:
    stream = "browser-failover"
    log = PageLog()
    with cluster(redis_server.url, relays=2) as c:
        relay_a, relay_b = c.relays
        async with chromium() as browser:
            try:
                host = await open_page(
                    browser, f"{c.origin.url}/host?stream={stream}#token={c.host_token()}", log, "host"
                )
                await host.click("#go-live")
                # The viewer knows one more node to fall back on (?nodes=).
                viewer = await open_page(
                    browser, f"{relay_a.url}/watch?stream={stream}&nodes={relay_b.url}", log, "viewer"
                )
                await wait_for(playing_on(viewer, relay_a.url, 10), 60, "playing on relay A", log)
                before = await page_state(viewer)
                await trace_player(viewer)

                relay_a.kill()
                killed_at = time.monotonic()
                after = await wait_for(playing_on(viewer, relay_b.url, 10), 60,
                                       "playing again on relay B", log)
                recovery = time.monotonic() - killed_at
                print(f"viewer page played again on relay B {recovery:.2f} s after kill -9 of relay A")
                print("player trace (ms since page load):", await player_trace(viewer))
                assert after["reconnects"] >= 1
                assert after["sessions"] > before["sessions"]
                t0 = after["currentTime"]
                await wait_for(lambda: _advanced(viewer, t0), 20, "video time advancing on relay B", log)
            except BaseException:
                print(log.tail(150))
                print(c.logs())
                raise


async def _waiting_on(page: Any, status: int) -> bool:
    s = await page_state(page)
    return bool(s["media"] == "waiting" and s["lastStatus"] == status)


async def _advanced(page: Any, t0: float) -> bool:
    return bool((await page_state(page))["currentTime"] > t0 + 0.5)


@pytest.mark.timeout(180)
async def test_full_relay_redirects_the_viewer_page_and_its_socket_follows(
    redis_server: RedisServer,
) -> None:
    """A WHEP POST to a full relay is answered 307 to another relay (cross-origin here): the page
    follows it, plays from there and opens its room socket on that relay too."""
    stream = "browser-redirect"
    log = PageLog()
    with cluster(redis_server.url, relays=2, relay_args=["--max-viewers", "1"]) as c:
        relay_a, relay_b = c.relays
        async with chromium() as browser:
            try:
                host = await open_page(
                    browser, f"{c.origin.url}/host?stream={stream}#token={c.host_token()}", log, "host"
                )
                await host.click("#go-live")
                first = await open_page(browser, f"{relay_a.url}/watch?stream={stream}", log, "first")
                await wait_for(playing_on(first, relay_a.url, 5), 60, "first viewer on relay A", log)
                started = time.monotonic()
                second = await open_page(browser, f"{relay_a.url}/watch?stream={stream}", log, "second")
                await wait_for(playing_on(second, relay_b.url, 5), 60,
                               "second viewer redirected to relay B and playing", log)
                print(f"second viewer played on relay B {time.monotonic() - started:.2f} s after opening;"
                      f" WHEP sessions tried: {(await page_state(second))['sessions']}")
                host_b = relay_b.url.split("://", 1)[1].rstrip("/")

                async def room_on_b() -> bool:
                    room = await second.evaluate("window.lotcast.roomState()")
                    return room["status"] == "open" and f"//{host_b}/" in (room["url"] or "")

                await wait_for(room_on_b, 30, "second viewer's room socket on relay B", log)

                # Both relays full: the third page waits on 503 + Retry-After instead of failing...
                third = await open_page(browser, f"{relay_a.url}/watch?stream={stream}", log, "third")
                await wait_for(lambda: _waiting_on(third, 503), 30, "third viewer waiting on 503", log)
                # ...and plays once a seat frees up (the first page leaves: its session is DELETEd).
                await first.context.close()
                await wait_for(playing_on(third, relay_a.url, 5), 60, "third viewer playing on A", log)
            except BaseException:
                print(log.tail(150))
                print(c.logs())
                raise
