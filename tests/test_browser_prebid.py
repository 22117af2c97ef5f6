"""Real Chromium, real nodes and Redis: pre-bids on the viewer page (issue 10, pages) and the
host's reaction bar. Viewers pre-bid on a draft lot from the keyboard (a too-low max and a muted
viewer are refused with the reason shown, a good one is acked and raised), the host opens the lot
and each page says what its pre-bid did (leading at the proxy price, or outbid); the host page's
reaction counts rise (and float) as a viewer taps."""

from __future__ import annotations

from typing import Any

import pytest
from browser_support import PageLog, chromium, cluster, open_page, wait_for

from lotcast.redis_server import RedisServer

STREAM = "browser-prebid"


def attr_is(page: Any, selector: str, name: str, want: str) -> Any:
    async def check() -> bool:
        return await page.get_attribute(selector, name) == want
    return check


def text_has(page: Any, selector: str, want: str) -> Any:
    async def check() -> bool:
        return want in (await page.text_content(selector) or "")
    return check


async def prebid_by_keyboard(page: Any, lot: str, amount: str) -> None:
    """Type the max into the lot's field and press Enter on the button (Tab from the field)."""
    await page.fill(f"#prebid-max-{lot}", "")
    await page.focus(f"#prebid-max-{lot}")
    await page.keyboard.type(amount)
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.id") == f"prebid-submit-{lot}"
    await page.keyboard.press("Enter")


@pytest.mark.timeout(180)
async def test_prebid_on_the_viewer_page_and_host_reactions(redis_server: RedisServer) -> None:
    log = PageLog()
    with cluster(redis_server.url, relays=1) as c:
        async with chromium() as browser:
            host = await open_page(
                browser, f"{c.origin.url}/host?stream={STREAM}#token={c.host_token()}", log, "host")
            pages = {"host": host}
            for user, name in (("u-alice", "Alice"), ("u-bob", "Bob"), ("u-carol", "Carol")):
                pages[name] = await open_page(
                    browser,
                    f"{c.relay.url}/watch?stream={STREAM}#token={c.bidder_token(user, name)}",
                    log, name)
            alice, bob, carol = pages["Alice"], pages["Bob"], pages["Carol"]
            for name, page in pages.items():
                await wait_for(attr_is(page, "#room-state", "data-state", "open"), 30,
                               f"{name} room open", log)
            assert await alice.is_hidden("#prebid")  # no draft lot yet

            # The host creates a draft lot: start 10.00, increment 1.00.
            await host.fill("#lot-title-input", "Vintage camera")
            await host.fill("#lot-start-price", "10.00")
            await host.fill("#lot-increments", "0: 1.00")
            await host.fill("#lot-duration", "120")
            await host.click("#lot-create")

            async def draft() -> str | None:
                state = await host.evaluate("window.lotcast.roomState()")
                found = [x for x in state["lots"] if x["status"] == "draft"]
                return found[0]["lot"] if found else None
            lot = await wait_for(draft, 20, "lot created", log)
            item = f'#prebid-list li.prebid-lot[data-lot="{lot}"]'
            for name in ("Alice", "Bob", "Carol"):
                await wait_for(lambda p=pages[name]: p.is_visible(item), 20,
                               f"{name} sees the draft lot", log)
            assert await alice.get_attribute(item, "data-state") == "none"
            assert await alice.get_attribute(f"{item} .prebid-count", "data-count") == "0"
            assert await alice.text_content(f"#prebid-submit-{lot}") == "Pre-bid"
            assert "Vintage camera" in (await alice.text_content(item) or "")
            # labelled: the field's label, and it is described by the lot title and its status
            assert await alice.evaluate(
                f"document.getElementById('prebid-max-{lot}').labels[0].textContent") == "Your max bid"
            assert await alice.get_attribute(f"#prebid-max-{lot}", "aria-describedby") == \
                f"prebid-title-{lot} prebid-status-{lot}"
            assert await alice.get_attribute(f"#prebid-status-{lot}", "role") == "status"

            # Too low (below the start price): refused by the server, the reason shown.
            await prebid_by_keyboard(alice, lot, "5.00")
            await wait_for(attr_is(alice, item, "data-state", "refused"), 20, "too low refused", log)
            status = await alice.text_content(f"#prebid-status-{lot}") or ""
            assert "start price 10.00" in status and "(bid_too_low)" in status, status
            last = await alice.evaluate("window.lotcast.prebids.last")
            assert last["ok"] is False and last["code"] == "bid_too_low"

            # A good one: acked (the count reaches every page, never the amount).
            await prebid_by_keyboard(alice, lot, "30.00")
            await wait_for(attr_is(alice, item, "data-state", "placed"), 20, "alice placed", log)
            assert await alice.get_attribute(item, "data-max") == "3000"
            assert "Your pre-bid: max 30.00." in (await alice.text_content(f"#prebid-status-{lot}") or "")
            assert await alice.text_content(f"#prebid-submit-{lot}") == "Raise pre-bid"
            # the keyboard focus stayed on the button through pending -> placed
            assert await alice.evaluate("document.activeElement.id") == f"prebid-submit-{lot}"
            last = await alice.evaluate("window.lotcast.prebids.last")
            assert last["ok"] is True and last["max"] == 3000 and last["prebids"] == 1
            assert last["duplicate"] is False

            await prebid_by_keyboard(bob, lot, "20.00")
            await wait_for(attr_is(bob, item, "data-state", "placed"), 20, "bob placed", log)
            for name, page in (("Alice", alice), ("Carol", carol)):
                await wait_for(attr_is(page, f"{item} .prebid-count", "data-count", "2"), 20,
                               f"{name} sees 2 pre-bids", log)
            await wait_for(attr_is(host, f"#lot-prebids-{lot}", "data-count", "2"), 20,
                           "host sees 2 pre-bids", log)

            # Alice raises hers (it moves to the end of the order: Bob's now applies first).
            await prebid_by_keyboard(alice, lot, "40.00")
            await wait_for(attr_is(alice, item, "data-max", "4000"), 20, "alice raised", log)
            assert await alice.get_attribute(item, "data-state") == "placed"
            assert "max 40.00" in (await alice.text_content(f"#prebid-status-{lot}") or "")
            assert await alice.get_attribute(f"{item} .prebid-count", "data-count") == "2"

            # A muted viewer is refused with `muted` and the reason on the page.
            muted = await host.evaluate(
                "window.lotcast.room.request('user_mute', {user: 'u-carol', duration_ms: 600000})")
            assert muted["user"] == "u-carol"
            await prebid_by_keyboard(carol, lot, "50.00")
            await wait_for(attr_is(carol, item, "data-state", "refused"), 20, "carol refused", log)
            status = await carol.text_content(f"#prebid-status-{lot}") or ""
            assert "You are muted until" in status and "(muted)" in status, status
            assert (await carol.evaluate("window.lotcast.prebids.last"))["code"] == "muted"
            assert await carol.get_attribute(item, "data-max") is None
            await wait_for(attr_is(carol, f"{item} .prebid-count", "data-count", "2"), 10,
                           "carol's refused pre-bid not counted", log)

            # The host page's reaction bar: counts rise as Alice taps, and each tap floats up over
            # the preview (the snapshot's zero counts are the base).
            heart = '#hreact-bar button[data-reaction="heart"]'
            assert await host.get_attribute(heart, "aria-label") == "React with a heart"
            assert await host.get_attribute(heart, "data-count") == "0"
            await alice.click('#react-bar button[data-reaction="heart"]')
            await wait_for(attr_is(host, heart, "data-count", "1"), 20, "host sees 1 heart", log)
            await alice.click('#react-bar button[data-reaction="heart"]')
            await alice.click('#react-bar button[data-reaction="heart"]')
            await wait_for(attr_is(host, heart, "data-count", "3"), 20, "host sees 3 hearts", log)
            assert (await host.text_content(f"{heart} .count")) == "3"
            floated = (await host.evaluate("window.lotcast.console.reactions.stats()"))["floated"]
            assert floated == 3
            assert await host.get_attribute('#hreact-bar button[data-reaction="fire"]',
                                            "data-count") == "0"

            # The host opens the lot: Bob's pre-bid (max 20) leads at 10.00, then Alice's (max 40)
            # takes the lead at Bob's max + one increment.
            await host.click(f"#lot-open-{lot}")
            await wait_for(attr_is(host, f'#lots .item[data-lot="{lot}"]', "data-status", "open"),
                           20, "lot open", log)
            ack = await host.evaluate("window.lotcast.console.lastAck")
            assert ack["lot"] == lot and ack["prebids"] == 2
            assert ack["prebids_skipped"] == 0
            await wait_for(attr_is(alice, "#my-status", "data-status", "winning"), 20,
                           "alice leads", log)
            assert await alice.text_content("#my-status-text") == "You're winning at 21.00"
            assert await alice.text_content("#my-status-reason") == \
                "Your pre-bid (max 40.00) made you the leader."
            assert await alice.text_content("#lot-price") == "21.00"
            await wait_for(attr_is(bob, "#my-status", "data-status", "outbid"), 20, "bob outbid", log)
            assert await bob.text_content("#my-status-reason") == \
                "Your pre-bid (max 20.00) was outbid: Alice leads at 21.00."
            assert await carol.get_attribute("#my-status", "data-status") == "none"
            for name, page in (("Alice", alice), ("Bob", bob)):
                await wait_for(lambda p=page: p.is_hidden("#prebid"), 10,
                               f"{name}: no draft lot left", log)
            state = await alice.evaluate("window.lotcast.roomState()")
            opened = next(x for x in state["lots"] if x["lot"] == lot)
            assert opened["leader"] == "u-alice" and opened["price"] == 2100 and opened["bids"] == 2

            # A reload keeps what Alice pre-bid (the server never says it back).
            await alice.reload()
            await wait_for(attr_is(alice, "#my-status", "data-status", "winning"), 30,
                           "alice still leads after a reload", log)
            assert await alice.text_content("#my-status-reason") == \
                "Your pre-bid (max 40.00) made you the leader."
            for page in pages.values():
                await page.context.close()
