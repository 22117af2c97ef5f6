"""Real Chromium, real services: a viewer page whose WebSocket upgrade is refused (as by a proxy
that blocks WebSockets) falls back to the HTTP transport, bids, sees every event in order, gets
the documented refusals and resumes after its stream is cut; a WebSocket watcher in the same room
sees the same events (issue 12 item 3)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from browser_support import PageLog, chromium, cluster, open_page, wait_for
from test_browser_auction import LOT_FIELDS, attr_is, text_matches

from lotcast.interactive.client import RoomClient
from lotcast.redis_server import RedisServer

STREAM = "browser-fallback"

# Every /ws/ upgrade goes to a server that answers 403 (a proxy refusing WebSockets). The room
# stream's fetch can be cut (__killStreams) and refused (__blockStreams) by the test.
BLOCK_WS = """(() => {
  const Real = window.WebSocket;
  window.__wsAttempts = 0;
  window.WebSocket = new Proxy(Real, { construct(target, args) {
    window.__wsAttempts += 1;
    const url = new URL(args[0]);
    url.host = "127.0.0.1:%d";
    return new target(url.href, ...args.slice(1));
  } });
  const realFetch = window.fetch.bind(window);
  window.__streams = [];
  window.__streamOpens = 0;
  window.__blockStreams = false;
  window.fetch = (input, init = {}) => {
    const url = new URL(input instanceof Request ? input.url : String(input), location.href);
    if (/^\\/room\\/[^/]+\\/stream$/.test(url.pathname)) {
      if (window.__blockStreams) return Promise.reject(new TypeError("blocked by the test"));
      window.__streamOpens += 1;
      const ctrl = new AbortController();
      if (init.signal) init.signal.addEventListener("abort", () => ctrl.abort());
      window.__streams.push(ctrl);
      return realFetch(input, { ...init, signal: ctrl.signal });
    }
    return realFetch(input, init);
  };
  window.__killStreams = () => { for (const c of window.__streams.splice(0)) c.abort(); };
})();"""

RECORD_OFFSETS = """() => {
  window.__offsets = [];
  window.lotcast.room.addEventListener("logevent", (e) => window.__offsets.push(e.detail.event.offset));
}"""


@asynccontextmanager
async def refusing_upgrades() -> AsyncIterator[int]:
    """A TCP server answering every request with 403 (what a WebSocket-blocking proxy does)."""
    refused = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal refused
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            refused += 1
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n")
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
    assert refused >= 1


async def open_blocked_page(browser: Any, url: str, port: int, log: PageLog, name: str) -> Any:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    await context.add_init_script(BLOCK_WS % port)
    page = await context.new_page()
    log.attach(page, name)
    await page.goto(url)
    return page


async def _room(page: Any) -> dict[str, Any]:
    return await page.evaluate("window.lotcast.roomState()")  # type: ignore[no-any-return]


async def _refusal(page: Any, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    return await page.evaluate(  # type: ignore[no-any-return]
        """([kind, fields]) => window.lotcast.room.request(kind, fields).then(
             (ack) => ({ok: true, ack}), (err) => ({ok: false, code: err.code,
             field: err.fields?.field ?? null, message: err.message}))""", [kind, fields])


def lot_view(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: lot.get(k) for k in LOT_FIELDS} for lot in state["lots"]]


@pytest.mark.timeout(240)
async def test_blocked_websocket_page_bids_over_http_and_resumes(
        redis_server: RedisServer) -> None:
    log = PageLog()
    with cluster(redis_server.url, relays=1) as c:
        async with refusing_upgrades() as port, chromium() as browser:
            try:
                relay = c.relay.url
                host = await open_page(
                    browser, f"{c.origin.url}/host?stream={STREAM}#token={c.host_token()}", log,
                    "host")
                alice = await open_blocked_page(
                    browser,
                    f"{relay}/watch?stream={STREAM}#token={c.bidder_token('u-alice', 'Alice')}",
                    port, log, "alice")
                anon = await open_blocked_page(browser, f"{relay}/watch?stream={STREAM}", port,
                                               log, "anon")
                watcher = await open_page(browser, f"{relay}/watch?stream={STREAM}", log,
                                          "watcher")
                for name, page in (("host", host), ("alice", alice), ("anon", anon),
                                   ("watcher", watcher)):
                    await wait_for(attr_is(page, "#room-state", "data-state", "open"), 40,
                                   f"{name} room open", log)
                for page in (alice, watcher):
                    await page.evaluate(RECORD_OFFSETS)
                a = await _room(alice)
                assert (a["transport"], a["fallbacks"]) == ("http", 1)
                assert a["identity"]["user"] == "u-alice"
                assert await alice.evaluate("window.__wsAttempts") == 1
                assert a["url"] == f"{relay}/room/{STREAM}/stream"
                assert (await _room(anon))["transport"] == "http"
                assert (await _room(watcher))["transport"] == "websocket"
                async with httpx.AsyncClient() as http:
                    stats = (await http.get(f"{relay}/interactive/stats")).json()
                assert stats["http_sessions"] == 2

                # --- the host opens a lot; Alice (HTTP) bids and wins it for now ---------------
                await host.fill("#lot-title-input", "Signed poster")
                await host.fill("#lot-start-price", "10.00")
                await host.fill("#lot-increments", "0: 1.00")
                await host.fill("#lot-duration", "300")
                await host.fill("#lot-soft-close", "0")
                await host.click("#lot-create")
                lot_id = await wait_for(lambda: _draft_lot(host), 20, "lot created", log)
                await host.click(f"#lot-open-{lot_id}")
                for name, page in (("alice", alice), ("watcher", watcher), ("anon", anon)):
                    await wait_for(attr_is(page, "#lot", "data-status", "open"), 20,
                                   f"{name} sees the open lot", log)
                await alice.click("#bid-quick-0")
                await wait_for(attr_is(alice, "#my-status", "data-status", "winning"), 20,
                               "alice winning", log)
                await wait_for(text_matches(watcher, "#lot-leader", r"^Alice$"), 20,
                               "the WebSocket watcher sees Alice lead", log)

                # --- the documented refusals, over HTTP ----------------------------------------
                await alice.fill("#bid-amount", "5.00")
                await alice.click("#bid-submit")
                await wait_for(attr_is(alice, "#my-status", "data-status", "rejected"), 20,
                               "alice's low bid rejected", log)
                assert "bid_too_low" in (await alice.text_content("#my-status-reason") or "")
                bad = await _refusal(alice, "bid", {"lot": lot_id, "amount": 10.5})
                assert (bad["ok"], bad["code"], bad["field"]) == (False, "amount_not_integer",
                                                                  "amount")
                unknown = await _refusal(alice, "dance", {})
                assert (unknown["ok"], unknown["code"]) == (False, "unknown_type")
                assert await anon.is_disabled("#bid-quick-0")
                anon_bid = await _refusal(anon, "bid", {"lot": lot_id, "amount": 2000})
                assert (anon_bid["ok"], anon_bid["code"]) == (False, "forbidden")
                host_only = await _refusal(alice, "lot_close", {"lot": lot_id})
                assert (host_only["ok"], host_only["code"]) == (False, "forbidden")

                # --- the stream is cut mid-show; the room goes on without Alice -------------------
                before = await _room(alice)
                await alice.evaluate("window.__blockStreams = true; window.__killStreams()")
                await wait_for(attr_is(alice, "#room-state", "data-state", "reconnecting"), 20,
                               "alice's stream cut", log)
                bob = RoomClient(relay, STREAM, c.bidder_token("u-bob", "Bob"))
                await bob.connect()
                try:
                    assert (await bob.request("bid", lot=lot_id, amount=1100))["status"] == \
                        "winning"
                    assert (await bob.request("bid", lot=lot_id, amount=2500))["type"] == "ack"
                finally:
                    await bob.close()
                await host.fill("#lot-extend-by", "60")
                await host.click(f"#lot-extend-{lot_id}")
                await wait_for(text_matches(watcher, "#lot-bids", r"^3$"), 20,
                               "the watcher sees Bob's bids", log)
                await wait_for(lambda: _offset_at_least(watcher, before["offset"] + 3), 20,
                               "the watcher sees the extension", log)
                assert (await _room(alice))["offset"] == before["offset"]  # offline: old state
                await alice.evaluate("window.__blockStreams = false")
                await wait_for(lambda: _resumed(alice), 40, "alice resumed over HTTP", log)
                target = (await _room(watcher))["offset"]
                await wait_for(lambda: _offset_at_least(alice, target), 20, "alice caught up",
                               log)
                a, w = await _room(alice), await _room(watcher)
                assert a["transport"] == "http"
                assert a["snapshots"] == 1  # the first connection's; the resume replayed the gap
                assert (a["epoch"], a["offset"]) == (w["epoch"], w["offset"])
                assert lot_view(a) == lot_view(w)
                await wait_for(attr_is(alice, "#my-status", "data-status", "outbid"), 20,
                               "alice outbid after the resume", log)
                # every event exactly once, in order, on both transports
                a_offsets = await alice.evaluate("window.__offsets")
                w_offsets = await watcher.evaluate("window.__offsets")
                assert a_offsets == list(range(a_offsets[0], a["offset"] + 1))
                assert a_offsets == w_offsets

                # --- and bids again after the resume ----------------------------------------------
                await alice.fill("#bid-amount", "30.00")
                await alice.fill("#bid-max", "")
                await alice.click("#bid-submit")
                await wait_for(attr_is(alice, "#my-status", "data-status", "winning"), 20,
                               "alice winning again", log)
                await wait_for(text_matches(watcher, "#lot-price", r"^30\.00$"), 20,
                               "the watcher sees 30.00", log)
            except BaseException:
                print(log.tail(200))
                print(c.logs())
                raise


async def _draft_lot(page: Any) -> str | None:
    return await page.evaluate(  # type: ignore[no-any-return]
        "(() => { const el = document.querySelector('#lots .item[data-status=\"draft\"]');"
        " return el ? el.dataset.lot : null; })()"
    )


async def _offset_at_least(page: Any, offset: int) -> bool:
    return bool(((await _room(page))["offset"] or 0) >= offset)


async def _resumed(page: Any) -> bool:
    s = await _room(page)
    return bool(s["status"] == "open" and s["resumes"] >= 1)
