"""The pages' ICE-server handling (viewer_web/static/js/signaling.js) in real Chromium: Link
headers parsed into RTCIceServers, and TURN REST credentials near expiry noticed before a new
session reuses them."""

from __future__ import annotations

import time

import pytest
from browser_support import PageLog, chromium, open_page, static_server

pytestmark = pytest.mark.timeout(60)


async def test_links_parse_and_expiring_turn_credentials_are_stale() -> None:
    now = int(time.time())
    log = PageLog()
    with static_server() as base:
        async with chromium() as browser:
            page = await open_page(browser, base + "/static/js/signaling.js", log, "ice")
            result = await page.evaluate(
                """async (now) => {
                    const s = await import('/static/js/signaling.js');
                    const link = '<stun:127.0.0.1:3478>; rel="ice-server", '
                      + `<turn:127.0.0.1:3478?transport=udp>; rel="ice-server"; username="${now + 60}:u1"; `
                      + 'credential="c1"; credential-type="password", '
                      + '<turn:127.0.0.1:3479>; rel="ice-server"';  // no credentials: ignored
                    const parsed = s.parseIceServerLinks(link);
                    const fresh = [{urls: 'turn:x', username: `${now + 7200}:u`, credential: 'c'}];
                    return {
                      parsed,
                      soon: s.iceServersStale(parsed),
                      fresh: s.iceServersStale(fresh),
                      stunOnly: s.iceServersStale([{urls: 'stun:x'}]),
                      none: s.iceServersStale(null),
                    };
                }""", now)
    assert result["parsed"] == [
        {"urls": "stun:127.0.0.1:3478"},
        {"urls": "turn:127.0.0.1:3478?transport=udp", "username": f"{now + 60}:u1",
         "credential": "c1"},
    ]
    assert result["soon"] is True  # expires in a minute: ask the node again
    assert (result["fresh"], result["stunOnly"], result["none"]) == (False, False, False)
