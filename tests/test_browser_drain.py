"""Real browser, real services: SIGTERM on a relay (drain) moves the viewer page's media and room
socket to another relay, and the page keeps playing and keeps its auction state (issue 4)."""

from __future__ import annotations

import signal
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


def room_on(page: Any, relay_url: str) -> Any:
    async def check() -> dict[str, Any] | None:
        room = await page.evaluate("window.lotcast.roomState()")
        host = relay_url.split("://", 1)[1].rstrip("/")
        return room if room["status"] == "open" and f"//{host}/" in (room["url"] or "") else None
    return check


@pytest.mark.timeout(180)
async def test_drained_relay_moves_viewer_media_and_socket(redis_server: RedisServer) -> None:
    stream = "browser-drain"
    log = PageLog()
    with cluster(redis_server.url, relays=2, relay_args=["--drain-timeout", "20"]) as c:
        relay_a, relay_b = c.relays
        async with chromium() as browser:
            try:
                host = await open_page(
                    browser, f"{c.origin.url}/host?stream={stream}#token={c.host_token()}", log, "host"
                )
                await host.click("#go-live")
                viewer = await open_page(
                    browser,
                    f"{relay_a.url}/watch?stream={stream}#token={c.bidder_token('u-dana', 'Dana')}",
                    log, "viewer",
                )
                await wait_for(playing_on(viewer, relay_a.url, 10), 60, "playing on relay A", log)
                await wait_for(room_on(viewer, relay_a.url), 30, "room socket on relay A", log)
                # Some auction state to carry over.
                await host.fill("#lot-title-input", "Drain lot")
                await host.click("#lot-create")
                lot_id = await wait_for(lambda: _draft_lot(host), 20, "lot created", log)
                await host.click(f"#lot-open-{lot_id}")
                await wait_for(_attr_is(viewer, "#lot", "data-status", "open"), 20, "lot open", log)
                await viewer.click("#bid-quick-0")
                await wait_for(_attr_is(viewer, "#my-status", "data-status", "winning"), 20,
                               "winning before the drain", log)
                before = await page_state(viewer)
                await trace_player(viewer)

                relay_a.signal(signal.SIGTERM)
                drained_at = time.monotonic()
                after = await wait_for(playing_on(viewer, relay_b.url, 10), 60,
                                       "playing on relay B after the drain", log)
                moved = time.monotonic() - drained_at
                print(f"viewer page moved to relay B and played {moved:.2f} s after SIGTERM")
                print("player trace (ms since page load):", await player_trace(viewer))
                assert after["sessions"] > before["sessions"]
                room = await wait_for(room_on(viewer, relay_b.url), 30, "room socket on relay B", log)
                assert await _attr(viewer, "#my-status", "data-status") == "winning"
                assert room["epoch"] is not None and room["offset"] >= 3
                # The drained relay exits once its viewer left, well before the drain timeout.
                assert relay_a.wait(15) is not None, "relay A did not exit after draining"
            except BaseException:
                print(log.tail(150))
                print(c.logs())
                raise


async def _attr(page: Any, selector: str, name: str) -> str | None:
    return await page.get_attribute(selector, name)  # type: ignore[no-any-return]


def _attr_is(page: Any, selector: str, name: str, want: str) -> Any:
    async def check() -> bool:
        return await _attr(page, selector, name) == want
    return check


async def _draft_lot(page: Any) -> str | None:
    return await page.evaluate(  # type: ignore[no-any-return]
        "(() => { const el = document.querySelector('#lots .item[data-status=\"draft\"]');"
        " return el ? el.dataset.lot : null; })()"
    )
