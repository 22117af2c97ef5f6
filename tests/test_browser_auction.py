"""Real browser, real services: the host console runs a lot and a poll; two bidder pages on two
different relays bid against each other and vote (issue 3)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from browser_support import PageLog, chromium, cluster, open_page, wait_for

from lotcast.auth import Role, TokenAuthority
from lotcast.redis_server import RedisServer

STREAM = "browser-auction"
LOT_FIELDS = ("lot", "status", "price", "leader", "leader_name", "next_min", "bids", "ends_at",
              "reserve_met", "winner", "winner_name")


async def _attr(page: Any, selector: str, name: str) -> str | None:
    return await page.get_attribute(selector, name)  # type: ignore[no-any-return]


async def _text(page: Any, selector: str) -> str:
    return ((await page.text_content(selector)) or "").strip()


def attr_is(page: Any, selector: str, name: str, want: str) -> Any:
    async def check() -> bool:
        return await _attr(page, selector, name) == want
    return check


def text_matches(page: Any, selector: str, pattern: str) -> Any:
    async def check() -> str | None:
        text = await _text(page, selector)
        return text if re.search(pattern, text) else None
    return check


async def _room(page: Any) -> dict[str, Any]:
    return await page.evaluate("window.lotcast.roomState()")  # type: ignore[no-any-return]


def _lot_view(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: lot.get(k) for k in LOT_FIELDS} for lot in state["lots"]]


@pytest.mark.timeout(180)
async def test_bidding_outbid_and_poll_bars_across_relays(redis_server: RedisServer) -> None:
    log = PageLog()
    with cluster(redis_server.url, relays=2) as c:
        async with chromium() as browser:
            try:
                host = await open_page(
                    browser, f"{c.origin.url}/host?stream={STREAM}#token={c.host_token()}", log, "host"
                )
                alice = await open_page(
                    browser,
                    f"{c.relays[0].url}/watch?stream={STREAM}#token={c.bidder_token('u-alice', 'Alice')}",
                    log, "alice",
                )
                bob = await open_page(
                    browser,
                    f"{c.relays[1].url}/watch?stream={STREAM}#token={c.bidder_token('u-bob', 'Bob')}",
                    log, "bob",
                )
                anon = await open_page(browser, f"{c.relays[0].url}/watch?stream={STREAM}", log, "anon")
                for name, page in (("host", host), ("alice", alice), ("bob", bob), ("anon", anon)):
                    await wait_for(attr_is(page, "#room-state", "data-state", "open"), 30,
                                   f"{name} room socket open", log)

                # --- host console: create and open a lot -------------------------------------
                await host.fill("#lot-title-input", "Signed poster")
                await host.fill("#lot-start-price", "10.00")
                await host.fill("#lot-increments", "0: 1.00\n100: 5.00")
                await host.fill("#lot-duration", "300")
                await host.fill("#lot-soft-close", "10")
                await host.click("#lot-create")
                lot_id = await wait_for(lambda: _draft_lot(host), 20, "lot created (draft)", log)
                await host.click(f"#lot-open-{lot_id}")
                await wait_for(attr_is(host, f'.item[data-lot="{lot_id}"]', "data-status", "open"), 20,
                               "lot open on the host console", log)

                for name, page in (("alice", alice), ("bob", bob), ("anon", anon)):
                    await wait_for(attr_is(page, "#lot", "data-status", "open"), 20,
                                   f"{name} sees the open lot", log)
                assert await _text(alice, "#lot-title") == "Signed poster"
                assert await _text(alice, "#bid-quick-0") == "Bid 10.00"
                # Anonymous viewers watch but cannot bid.
                assert await anon.is_disabled("#bid-quick-0")
                assert await anon.is_disabled("#bid-submit")

                # --- Alice bids, is winning ------------------------------------------------------
                await alice.click("#bid-quick-0")
                await wait_for(attr_is(alice, "#my-status", "data-status", "winning"), 20,
                               "alice winning", log)
                await wait_for(text_matches(bob, "#lot-leader", r"^Alice$"), 20, "bob sees Alice lead", log)
                await wait_for(text_matches(bob, "#lot-price", r"^10\.00$"), 20, "bob sees 10.00", log)
                await wait_for(text_matches(host, f"#lot-leader-{lot_id}", r"^Alice$"), 20,
                               "host sees Alice lead", log)
                assert await _text(bob, "#bid-quick-0") == "Bid 11.00"

                # --- Bob outbids; Alice shows outbid ---------------------------------------------
                await bob.click("#bid-quick-0")
                await wait_for(attr_is(bob, "#my-status", "data-status", "winning"), 20, "bob winning", log)
                await wait_for(attr_is(alice, "#my-status", "data-status", "outbid"), 20,
                               "alice outbid", log)
                await wait_for(text_matches(alice, "#lot-price", r"^11\.00$"), 20, "alice sees 11.00", log)
                assert await _text(alice, "#lot-leader") == "Bob"
                await wait_for(text_matches(host, "#bid-feed", r"Bob"), 20, "host bid feed shows Bob", log)

                # --- a rejected bid shows the reason ---------------------------------------------
                await alice.fill("#bid-amount", "5.00")
                await alice.click("#bid-submit")
                await wait_for(attr_is(alice, "#my-status", "data-status", "rejected"), 20,
                               "alice's low bid rejected", log)
                reason = await _text(alice, "#my-status-reason")
                assert "bid_too_low" in reason and "12.00" in reason, reason

                # --- a dropped socket resumes to exactly the state it would have had -------------
                # While Alice is offline: Bob (the leader) raises his proxy ceiling twice (bid events;
                # the price stays) and the host extends the lot (a lot_extended event).
                ends_before = (await _room(bob))["lots"][-1]["ends_at"]
                await alice.evaluate("window.lotcast.room.dropFor(4000)")
                await wait_for(attr_is(alice, "#room-state", "data-state", "reconnecting"), 10,
                               "alice offline", log)
                await bob.fill("#bid-amount", "20.00")
                await bob.click("#bid-submit")
                await wait_for(text_matches(bob, "#lot-bids", r"^3$"), 20, "bob's second bid logged", log)
                await bob.fill("#bid-amount", "25.00")
                await bob.click("#bid-submit")
                await wait_for(text_matches(bob, "#lot-bids", r"^4$"), 20, "bob's third bid logged", log)
                await host.fill("#lot-extend-by", "60")
                await host.click(f"#lot-extend-{lot_id}")
                await wait_for(lambda: _ends_after(bob, ends_before), 20, "bob sees the extension", log)
                assert await _text(alice, "#lot-bids") == "2"  # offline: still the old state
                await wait_for(lambda: _resumed(alice), 20, "alice resumed from her offset", log)
                await wait_for(text_matches(alice, "#lot-bids", r"^4$"), 20, "alice caught up", log)
                a_state, b_state = await _room(alice), await _room(bob)
                assert a_state["epoch"] == b_state["epoch"]
                assert a_state["offset"] == b_state["offset"]
                assert _lot_view(a_state) == _lot_view(b_state)
                assert a_state["snapshots"] == 1  # the first connect; the reconnect replayed the gap
                assert await _attr(alice, "#my-status", "data-status") == "outbid"
                assert await _text(alice, "#lot-price") == "11.00"

                # A reload starts from a snapshot; the page still knows Alice bid (outbid, not none).
                await alice.reload()
                await wait_for(attr_is(alice, "#room-state", "data-state", "open"), 30,
                               "alice's reloaded page connected", log)
                await wait_for(attr_is(alice, "#my-status", "data-status", "outbid"), 20,
                               "alice still outbid after reload", log)
                assert _lot_view(await _room(alice)) == _lot_view(await _room(bob))

                # --- a proxy (max) bid: Alice's ceiling 30.00 beats Bob's 25.00 -----------------
                # price = min(her ceiling, his ceiling + increment) = 25.00 + 1.00
                await alice.fill("#bid-amount", "12.00")
                await alice.fill("#bid-max", "30.00")
                await alice.click("#bid-submit")
                await wait_for(attr_is(alice, "#my-status", "data-status", "winning"), 20,
                               "alice winning by proxy", log)
                await wait_for(attr_is(bob, "#my-status", "data-status", "outbid"), 20, "bob outbid", log)
                await wait_for(text_matches(bob, "#lot-price", r"^26\.00$"), 20, "bob sees 26.00", log)
                assert await _text(bob, "#lot-leader") == "Alice"

                # --- poll: one vote each, bars move on every page ------------------------------
                await host.fill("#poll-question-input", "Next lot?")
                await host.fill("#poll-option-0", "Camera")
                await host.fill("#poll-option-1", "Guitar")
                await host.fill("#poll-option-2", "Lamp")
                await host.fill("#poll-duration", "120")
                await host.click("#poll-create")
                for name, page in (("alice", alice), ("bob", bob)):
                    await wait_for(attr_is(page, "#poll", "data-status", "open"), 20,
                                   f"{name} sees the poll", log)
                assert await _text(alice, "#poll-question") == "Next lot?"
                await alice.click("#poll-vote-0")
                await bob.click("#poll-vote-1")
                for name, page in (("alice", alice), ("bob", bob), ("anon", anon)):
                    await wait_for(attr_is(page, "#poll-fill-0", "data-count", "1"), 20,
                                   f"{name} bar 0 at one vote", log)
                    await wait_for(attr_is(page, "#poll-fill-1", "data-count", "1"), 20,
                                   f"{name} bar 1 at one vote", log)
                    assert await _attr(page, "#poll-fill-0", "data-pct") == "50"
                    assert await _attr(page, "#poll-fill-2", "data-pct") == "0"
                    assert await _text(page, "#poll-total") == "2"
                poll_id = await _attr(alice, "#poll", "data-poll")
                await wait_for(attr_is(host, f"#hpoll-{poll_id}-fill-1", "data-count", "1"), 20,
                               "host tally bars", log)
                # One vote per user: Alice's buttons are disabled now, her choice is marked.
                assert await alice.is_disabled("#poll-vote-1")
                mine = '#poll-options .poll-option[data-option="0"]'
                assert await _attr(alice, mine, "data-mine") == "true"
                await host.click(f"#poll-close-{poll_id}")
                await wait_for(attr_is(bob, "#poll", "data-status", "closed"), 20, "poll closed", log)

                # --- the host closes the lot early: sold to Alice --------------------------------
                await host.click(f"#lot-close-{lot_id}")
                await wait_for(text_matches(host, f"#lot-result-{lot_id}", r"Sold to Alice at 26\.00"),
                               20, "host sees sold to Alice", log)
                await wait_for(attr_is(alice, "#my-status", "data-status", "won"), 20, "alice won", log)
                await wait_for(attr_is(bob, "#my-status", "data-status", "lost"), 20, "bob lost", log)
                assert "Sold to Alice at 26.00" in await _text(anon, "#lot-result")

                # The viewer count covers sockets on every node (host + 3 viewers).
                await wait_for(text_matches(anon, "#viewer-count", r"^[4-9]$"), 20, "viewer count", log)
            except BaseException:
                print(log.tail(150))
                print(c.logs())
                raise


async def _draft_lot(page: Any) -> str | None:
    return await page.evaluate(  # type: ignore[no-any-return]
        "(() => { const el = document.querySelector('#lots .item[data-status=\"draft\"]');"
        " return el ? el.dataset.lot : null; })()"
    )


async def _ends_after(page: Any, ends_at: int) -> bool:
    return bool((await _room(page))["lots"][-1]["ends_at"] > ends_at)


async def _resumed(page: Any) -> bool:
    s = await _room(page)
    return s["status"] == "open" and s["resumes"] >= 1


@pytest.mark.timeout(120)
async def test_rejected_token_falls_back_to_watching_and_a_new_token_signs_in(
    redis_server: RedisServer,
) -> None:
    forged = TokenAuthority("x" * 40).mint(Role.BIDDER, "u-mallory", "Mallory")
    log = PageLog()
    with cluster(redis_server.url) as c:
        async with chromium() as browser:
            try:
                page = await open_page(
                    browser, f"{c.relay.url}/watch?stream=browser-auth#token={forged}", log, "page"
                )
                await wait_for(text_matches(page, "#identity", r"token rejected"), 30,
                               "the page reports the refused token", log)
                await wait_for(attr_is(page, "#room-state", "data-state", "open"), 30,
                               "room open anonymously", log)
                assert (await _room(page))["identity"]["role"] == "viewer"
                # The fragment is gone from the address bar either way.
                assert "token=" not in page.url
                # Paste a valid bidder token: the socket signs in again.
                await page.fill("#token-input", c.bidder_token("u-erin", "Erin"))
                await page.click("#token-apply")
                await wait_for(text_matches(page, "#identity", r"^Erin \(bidder\)$"), 30,
                               "signed in as Erin", log)

                async def welcomed_as_erin() -> bool:
                    # the label shows the token's claims at once; the server's welcome follows
                    return bool((await _room(page))["identity"].get("user") == "u-erin")

                await wait_for(welcomed_as_erin, 30, "the server welcomed Erin", log)
            except BaseException:
                print(log.tail(150))
                print(c.logs())
                raise
