"""Chromium publishing H.264 only (as OBS does over WHIP), played through a relay by Chromium.

The host page is the real one; an init script makes its `setCodecPreferences` call keep only
H.264 constrained baseline (packetization-mode 1) for video, so the WHIP offer carries no VP8.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from browser_support import (
    PageLog,
    chromium,
    cluster,
    open_page,
    page_state,
    playing_on,
    wait_for,
)

from lotcast.redis_server import RedisServer

H264_ONLY = """(() => {
  const original = RTCRtpTransceiver.prototype.setCodecPreferences;
  RTCRtpTransceiver.prototype.setCodecPreferences = function (codecs) {
    if (!codecs.some((c) => c.mimeType.toLowerCase().startsWith("video/"))) {
      return original.call(this, codecs);
    }
    const h264 = codecs.filter((c) => c.mimeType.toLowerCase() === "video/h264"
      && /packetization-mode=1/.test(c.sdpFmtpLine || "")
      && /profile-level-id=42e01f/.test(c.sdpFmtpLine || ""));
    window.__videoCodecsOffered = h264.map((c) => `${c.mimeType} ${c.sdpFmtpLine}`);
    return original.call(this, h264);
  };
})();"""


def video_codecs(sdp: str) -> list[str]:
    """Codec names of the video m-section's rtpmap lines."""
    section = re.split(r"\r?\nm=", sdp)
    video = next(s for s in section if s.startswith("video "))
    return re.findall(r"a=rtpmap:\d+ ([^/\s]+)/", video)


async def _descriptions(page: Any) -> dict[str, str] | None:
    return await page.evaluate(  # type: ignore[no-any-return]
        "(() => { const pc = window.lotcast.pc; return pc && pc.remoteDescription ? "
        "{local: pc.localDescription.sdp, remote: pc.remoteDescription.sdp} : null; })()")


async def _host_encoding(page: Any) -> dict[str, Any] | None:
    if (await page_state(page)).get("publish") != "live":
        return None
    raw = await page.evaluate("window.lotcast.rawStats()") or {}
    return raw if raw.get("video", {}).get("framesEncoded") else None


async def _frames_at_least(page: Any, n: int) -> int | None:
    raw = await page.evaluate("window.lotcast.rawStats()") or {}
    decoded = int(raw.get("video", {}).get("framesDecoded", 0))
    return decoded if decoded >= n else None


@pytest.mark.timeout(150)
async def test_chromium_publishes_h264_only_and_chromium_plays_it_through_a_relay(
    redis_server: RedisServer,
) -> None:
    stream = "browser-h264"
    log = PageLog()
    with cluster(redis_server.url) as c:
        async with chromium() as browser:
            try:
                context = await browser.new_context(viewport={"width": 1280, "height": 900})
                await context.add_init_script(H264_ONLY)
                host = await context.new_page()
                log.attach(host, "host")
                # an H.264-only encoder publishes one layer (simulcast needs VP8)
                await host.goto(
                    f"{c.origin.url}/host?stream={stream}&simulcast=0#token={c.host_token()}")
                await host.click("#go-live")
                await wait_for(lambda: _host_encoding(host), 40, "host page live and encoding", log)
                offered = await host.evaluate("window.__videoCodecsOffered")
                assert offered, "the host page never set video codec preferences"
                sdp = await _descriptions(host)
                assert sdp is not None
                assert set(video_codecs(sdp["local"])) == {"H264"}, video_codecs(sdp["local"])
                # the broadcaster's WHIP answer negotiated H.264 (nothing else was offered)
                assert set(video_codecs(sdp["remote"])) == {"H264"}, sdp["remote"]
                async def host_codec_stats() -> dict[str, Any] | None:
                    # the page samples getStats() periodically: its first sample can predate the
                    # codec (every field None), so wait for one that names it
                    stats = await host.evaluate("window.lotcast.stats()")
                    return stats if stats and stats.get("codec") else None

                host_stats = await wait_for(host_codec_stats, 15, "host page stats with a codec",
                                            log)
                assert host_stats["codec"] == "video/H264", host_stats

                viewer = await open_page(browser, f"{c.relay.url}/watch?stream={stream}", log,
                                         "viewer")
                await wait_for(playing_on(viewer, c.relay.url, 10), 60,
                               "viewer decoding H.264 through the relay", log)
                first = await _frames_at_least(viewer, 0)
                assert first is not None
                await wait_for(lambda: _frames_at_least(viewer, first + 30), 40,
                               "viewer framesDecoded to keep growing", log)
                summary = await wait_for(lambda: viewer.evaluate("window.lotcast.stats()"), 15,
                                         "viewer page stats", log)
                assert summary["codec"] == "video/H264", summary
                assert summary["audioCodec"] == "audio/opus"
                viewer_sdp = await _descriptions(viewer)
                assert viewer_sdp is not None
                # the relay answers with what the origin carries: H.264 only
                assert set(video_codecs(viewer_sdp["remote"])) == {"H264"}
                state = await page_state(viewer)
                assert state["videoWidth"] > 0 and state["videoHeight"] > 0
            except BaseException:
                print(log.tail(120))
                print(c.logs())
                raise
