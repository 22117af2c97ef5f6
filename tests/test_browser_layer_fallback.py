"""A simulcast layer the publisher stops sending: its viewers move to the best layer below that
still flows, and back when it returns (lotcast/media/layer_fallback.py).

Real parts: a Chromium host page publishing three layers, which turns its top layer off and on
again as Chromium itself does under a low bandwidth estimate or CPU pressure
(`RTCRtpSender.setParameters`, `active: false`); the broadcaster; two aiortc viewers, one on
the automatic choice and one pinned to the top layer (the WHEP layer POST)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from browser_support import PageLog, chromium, cluster, open_page, wait_for
from test_browser_simulcast import SizedViewer, decoding, stream_layers

from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(240)

SET_TOP_LAYER = """async (active) => {
    const sender = window.lotcast.pc.getSenders().find((s) => s.track && s.track.kind === 'video');
    const params = sender.getParameters();
    params.encodings[0].active = active;
    await sender.setParameters(params);
    return sender.getParameters().encodings.map((e) => e.active);
}"""


async def _stream(base_url: str, stream: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as http:
        stats = (await http.get(f"{base_url}/api/stats")).json()
    return dict(next(s for s in stats["streams"] if s["id"] == stream))


async def test_viewers_of_a_layer_the_host_turns_off_move_down_and_back(
        redis_server: RedisServer) -> None:
    stream = "layer-off"
    log = PageLog()
    with cluster(redis_server.url, relays=0) as c:
        async with chromium() as browser:
            host = await open_page(
                browser, f"{c.origin.url}/host?stream={stream}&simulcast=1#token={c.host_token()}",
                log, "host")
            await host.click("#go-live")

            async def three_layers() -> bool:
                layers = await stream_layers(c.origin.url, stream)
                return len([v for v in layers.values() if v.get("size")]) == 3

            await wait_for(three_layers, 90, "three layers with key frames", log)
            automatic, pinned = SizedViewer(c.origin.url, stream), SizedViewer(c.origin.url, stream)
            try:
                await automatic.start()
                await pinned.start()
                await pinned.pin("h")
                for viewer in (automatic, pinned):
                    await wait_for(decoding(viewer, c.origin.url, stream, "h", 10), 60,
                                   "a viewer decodes the top layer", log)

                assert await host.evaluate(SET_TOP_LAYER, False) == [False, True, True]
                # both leave the silent top layer for the middle one (the highest that flows)
                for viewer in (automatic, pinned):
                    await wait_for(decoding(viewer, c.origin.url, stream, "m", 10), 45,
                                   "a viewer of the turned-off layer decodes the middle one", log)
                moved = await _stream(c.origin.url, stream)
                assert moved["layer_fallbacks"] == 2, moved

                assert await host.evaluate(SET_TOP_LAYER, True) == [True, True, True]
                # and both go back to it once it flows again, the pinned one included
                for viewer in (automatic, pinned):
                    await wait_for(decoding(viewer, c.origin.url, stream, "h", 10), 60,
                                   "a viewer back on the top layer", log)
                back = await _stream(c.origin.url, stream)
                assert back["layer_fallback_returns"] == 2, back
            finally:
                await automatic.stop()
                await pinned.stop()
