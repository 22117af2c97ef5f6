"""Real Chromium, real nodes and Redis: a giveaway from open to winner on the host console and two
viewer pages on two relays (issue 10): the banner goes open -> entered -> won / drawn, the host
panel shows the recorded draw, and that record re-derives the winner."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest
from browser_support import PageLog, chromium, cluster, open_page, wait_for

from lotcast.redis_server import RedisServer

STREAM = "browser-giveaway"


def attr_is(page: Any, selector: str, name: str, want: str) -> Any:
    async def check() -> bool:
        return await page.get_attribute(selector, name) == want
    return check


def banner_in(page: Any, states: set[str]) -> Any:
    async def check() -> str | None:
        state = await page.get_attribute("#giveaway", "data-state")
        return state if state in states else None
    return check


async def show(page: Any) -> dict[str, Any]:
    state = await page.evaluate("window.lotcast.roomState()")
    return state["show"]  # type: ignore[no-any-return]


@pytest.mark.timeout(180)
async def test_giveaway_open_enter_draw_on_every_page(redis_server: RedisServer) -> None:
    log = PageLog()
    with cluster(redis_server.url, relays=2) as c:
        async with chromium() as browser:
            host = await open_page(
                browser, f"{c.origin.url}/host?stream={STREAM}#token={c.host_token()}", log, "host")
            alice = await open_page(
                browser,
                f"{c.relays[0].url}/watch?stream={STREAM}#token={c.bidder_token('u-alice', 'Alice')}",
                log, "alice")
            bob = await open_page(
                browser,
                f"{c.relays[1].url}/watch?stream={STREAM}#token={c.bidder_token('u-bob', 'Bob')}",
                log, "bob")
            anon = await open_page(browser, f"{c.relays[1].url}/watch?stream={STREAM}", log, "anon")
            viewers = {"alice": alice, "bob": bob, "anon": anon}
            for name, page in (("host", host), *viewers.items()):
                await wait_for(attr_is(page, "#room-state", "data-state", "open"), 30,
                               f"{name} room open", log)
            for page in viewers.values():
                assert await page.get_attribute("#giveaway", "data-state") == "none"
                assert await page.is_hidden("#giveaway")

            # --- open: every page shows the banner -------------------------------------------
            await host.fill("#hg-item", "Signed vinyl")
            await host.click("#hg-open")
            await wait_for(attr_is(host, "#hg-current", "data-state", "open"), 20, "host: open", log)
            gid = await host.get_attribute("#hg-current", "data-giveaway")
            assert gid
            for name, page in viewers.items():
                await wait_for(attr_is(page, "#giveaway", "data-state", "open"), 20,
                               f"{name} sees the giveaway", log)
                assert await page.get_attribute("#giveaway", "data-giveaway") == gid
                assert (await page.text_content("#giveaway-item") or "").strip() == "Signed vinyl"
            assert await alice.is_enabled("#giveaway-enter")
            assert await anon.is_disabled("#giveaway-enter")  # entering needs a bidder token
            # While it is open, the host can't open a second one.
            assert await host.is_disabled("#hg-open")

            # --- enter: open -> entered; a second click changes nothing ----------------------
            await alice.click("#giveaway-enter")
            await bob.click("#giveaway-enter")
            for name in ("alice", "bob"):
                await wait_for(attr_is(viewers[name], "#giveaway", "data-state", "entered"), 20,
                               f"{name} entered", log)
            assert await alice.is_hidden("#giveaway-enter")
            again = await alice.evaluate(
                f"window.lotcast.room.enterGiveaway({gid!r}).then(() => 'ok', (e) => e.code)")
            assert again == "duplicate_entry"
            assert await alice.get_attribute("#giveaway", "data-state") == "entered"
            # A reload keeps "entered" (the snapshot says so).
            await bob.reload()
            await wait_for(attr_is(bob, "#giveaway", "data-state", "entered"), 30,
                           "bob still entered after a reload", log)
            assert (await show(bob))["giveaway"]["entered"] is True

            # --- draw: one winner, announced on every page -----------------------------------
            await host.click("#hg-draw")
            await wait_for(attr_is(host, "#hg-current", "data-state", "drawn"), 20, "host: drawn", log)
            finals = {}
            for name, page in viewers.items():
                finals[name] = await wait_for(banner_in(page, {"won", "drawn"}), 20,
                                              f"{name} sees the draw", log)
            g = (await show(alice))["giveaway"]
            assert g["status"] == "drawn" and g["giveaway"] == gid
            assert g["winner"] in {"u-alice", "u-bob"}
            assert g["entrants"] == 2 and g["eligible"] == 2
            winner = "alice" if g["winner"] == "u-alice" else "bob"
            loser = "bob" if winner == "alice" else "alice"
            assert finals == {winner: "won", loser: "drawn", "anon": "drawn"}
            assert "You won Signed vinyl" in (await viewers[winner].text_content("#giveaway-text") or "")
            name = "Alice" if winner == "alice" else "Bob"
            for page in (viewers[loser], anon):
                assert f"Winner: {name}" in (await page.text_content("#giveaway-text") or "")
            assert name in (await host.text_content("#hg-text") or "")
            assert await host.is_visible("#hg-proof")
            assert await host.is_enabled("#hg-open")  # the next one may open

            # The record the pages got re-derives the winner (docs/protocol.md, "Re-checking a
            # draw"): commitment = sha256(seed); index = HMAC-SHA256(seed, id) mod eligible.
            hg = (await show(host))["giveaway"]
            seed = bytes.fromhex(hg["seed"])
            assert hashlib.sha256(seed).hexdigest() == hg["commitment"]
            index = int.from_bytes(hmac.new(seed, gid.encode(), hashlib.sha256).digest(),
                                   "big") % hg["eligible"]
            assert index == hg["index"]
            assert ["u-alice", "u-bob"][index] == hg["winner"]
            for page in (host, alice, bob, anon):
                await page.context.close()
