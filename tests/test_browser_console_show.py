"""Real Chromium, real nodes and Redis: the auction additions in the host console (issue 10,
pages): a sudden-death lot, its pre-bid count as bidders pre-bid, and the one-click re-run of an
unsold lot."""

from __future__ import annotations

from typing import Any

import pytest
from browser_support import PageLog, chromium, cluster, open_page, wait_for

from lotcast.redis_server import RedisServer

STREAM = "browser-console-show"


def attr_is(page: Any, selector: str, name: str, want: str) -> Any:
    async def check() -> bool:
        return await page.get_attribute(selector, name) == want
    return check


async def lots(page: Any) -> list[dict[str, Any]]:
    state = await page.evaluate("window.lotcast.roomState()")
    return state["lots"]  # type: ignore[no-any-return]


@pytest.mark.timeout(150)
async def test_sudden_death_prebid_count_and_rerun(redis_server: RedisServer) -> None:
    log = PageLog()
    with cluster(redis_server.url, relays=1) as c:
        async with chromium() as browser:
            host = await open_page(
                browser, f"{c.origin.url}/host?stream={STREAM}#token={c.host_token()}", log, "host")
            alice = await open_page(
                browser,
                f"{c.relay.url}/watch?stream={STREAM}#token={c.bidder_token('u-alice', 'Alice')}",
                log, "alice")
            for name, page in (("host", host), ("alice", alice)):
                await wait_for(attr_is(page, "#room-state", "data-state", "open"), 30,
                               f"{name} room open", log)

            await host.fill("#lot-title-input", "Last-chance lamp")
            await host.fill("#lot-start-price", "10.00")
            await host.fill("#lot-duration", "60")
            await host.check("#lot-sudden-death")
            assert await host.is_disabled("#lot-soft-close")
            await host.click("#lot-create")

            async def draft() -> str | None:
                found = [lot for lot in await lots(host) if lot["status"] == "draft"]
                return found[0]["lot"] if found else None
            lot = await wait_for(draft, 20, "lot created", log)
            item = f'#lots .item[data-lot="{lot}"]'
            assert await host.get_attribute(item, "data-sudden-death") == "true"
            assert "sudden death" in (await host.text_content(item) or "")
            assert (await lots(host))[0]["soft_close_ms"] == 0
            assert await host.get_attribute(f"#lot-prebids-{lot}", "data-count") == "0"

            # Pre-bids from two bidders: the count (never the amounts) reaches the console.
            ack = await alice.evaluate(
                f"window.lotcast.room.request('prebid', {{lot: {lot!r}, max: 5000}})")
            assert ack["prebids"] == 1
            await wait_for(attr_is(host, f"#lot-prebids-{lot}", "data-count", "1"), 20,
                           "1 pre-bid", log)
            assert "1 pre-bid" in (await host.text_content(f"#lot-prebids-{lot}") or "")

            # An unsold lot to re-run: a second lot, opened and closed without bids.
            await host.fill("#lot-title-input", "Nobody wants this")
            await host.uncheck("#lot-sudden-death")
            await host.click("#lot-create")

            async def second() -> str | None:
                found = [x for x in await lots(host) if x["title"] == "Nobody wants this"]
                return found[0]["lot"] if found else None
            lot2 = await wait_for(second, 20, "second lot", log)
            await host.click(f"#lot-open-{lot2}")
            await wait_for(attr_is(host, f'#lots .item[data-lot="{lot2}"]', "data-status", "open"),
                           20, "second lot open", log)
            await host.click(f"#lot-close-{lot2}")
            await wait_for(attr_is(host, f'#lots .item[data-lot="{lot2}"]', "data-status",
                                   "unsold"), 20, "second lot unsold", log)
            assert await host.is_visible(f"#lot-rerun-{lot2}")
            assert await host.is_hidden(f"#lot-rerun-{lot}")  # a draft is not re-runnable

            # One click re-runs it as a fresh draft with the same terms; the button goes away.
            await host.click(f"#lot-rerun-{lot2}")

            async def rerun() -> dict[str, Any] | None:
                found = [x for x in await lots(host) if x.get("rerun_of") == lot2]
                return found[0] if found else None
            new = await wait_for(rerun, 20, "re-run lot", log)
            assert new["status"] == "draft" and new["title"] == "Nobody wants this"
            await wait_for(lambda: host.is_hidden(f"#lot-rerun-{lot2}"), 10, "re-run hidden", log)
            assert f"re-run as {new['lot']}" in (await host.text_content(
                f'#lots .item[data-lot="{lot2}"]') or "")
            again = await host.evaluate(
                f"window.lotcast.room.request('lot_rerun', {{lot: {lot2!r}}})"
                ".then(() => 'ok', (e) => e.code)")
            assert again == "already_rerun"
            for page in (host, alice):
                await page.context.close()


@pytest.mark.timeout(150)
async def test_giveaway_entrant_count_says_where_it_came_from(redis_server: RedisServer) -> None:
    """The server sends the host no update per giveaway entry (docs/protocol.md "Giveaways"), so
    the console shows the last known count, where it came from, and that it is not live."""
    stream = "browser-console-entrants"
    log = PageLog()
    with cluster(redis_server.url, relays=1) as c:
        async with chromium() as browser:
            host = await open_page(
                browser, f"{c.origin.url}/host?stream={stream}#token={c.host_token()}", log, "host")
            alice = await open_page(
                browser,
                f"{c.relay.url}/watch?stream={stream}#token={c.bidder_token('u-alice', 'Alice')}",
                log, "alice")
            for name, page in (("host", host), ("alice", alice)):
                await wait_for(attr_is(page, "#room-state", "data-state", "open"), 30,
                               f"{name} room open", log)
            assert await host.get_attribute("#hg-entrants", "data-source") == "none"
            await host.fill("#hg-item", "Tote bag")
            await host.click("#hg-open")
            await wait_for(attr_is(host, "#hg-entrants", "data-source", "opened"), 20,
                           "opened count", log)
            assert await host.get_attribute("#hg-entrants", "data-count") == "0"
            text = await host.text_content("#hg-entrants") or ""
            assert text.startswith("0 entered when it opened") and "Not a live count" in text, text

            await wait_for(attr_is(alice, "#giveaway", "data-state", "open"), 20, "banner", log)
            await alice.click("#giveaway-enter")
            await wait_for(attr_is(alice, "#giveaway", "data-state", "entered"), 20, "entered", log)

            # A reconnect brings the snapshot's count.
            await host.reload()
            await wait_for(attr_is(host, "#hg-entrants", "data-source", "snapshot"), 30,
                           "snapshot count", log)
            assert await host.get_attribute("#hg-entrants", "data-count") == "1"
            text = await host.text_content("#hg-entrants") or ""
            assert text.startswith("1 entered at the console's last (re)connect"), text

            await host.click("#hg-draw")
            await wait_for(attr_is(host, "#hg-current", "data-state", "drawn"), 20, "drawn", log)
            assert await host.get_attribute("#hg-entrants", "data-source") == "draw"
            assert await host.get_attribute("#hg-entrants", "data-count") == "1"
            assert await host.text_content("#hg-entrants") == ""  # the draw line says it all
            assert "(1 eligible of 1 entrants)" in (await host.text_content("#hg-text") or "")
            for page in (host, alice):
                await page.context.close()
