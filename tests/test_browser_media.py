"""Real browser, real services: the host page publishes Chromium's fake camera + mic over WHIP to
the broadcaster; the viewer page plays it through a relay over WHEP (issue 2)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from browser_support import (
    PageLog,
    chromium,
    cluster,
    open_page,
    player_trace,
    static_server,
    trace_player,
    wait_for,
)

from lotcast.redis_server import RedisServer


async def _state(page: Any) -> dict[str, Any]:
    return await page.evaluate("window.lotcast ? window.lotcast.state() : {}")  # type: ignore[no-any-return]


async def _raw(page: Any) -> dict[str, Any]:
    return await page.evaluate("window.lotcast.rawStats()") or {}  # type: ignore[no-any-return]


@pytest.mark.timeout(150)
async def test_host_page_publishes_and_viewer_page_plays_through_relay(
    redis_server: RedisServer,
) -> None:
    stream = "browser-media"
    log = PageLog()
    with cluster(redis_server.url) as c:
        async with chromium() as browser:
            try:
                # The viewer comes first: the stream is not live, so WHEP answers 409 and the page
                # waits and retries instead of failing.
                viewer = await open_page(browser, f"{c.relay.url}/watch?stream={stream}", log, "viewer")
                await wait_for(lambda: _waiting(viewer), 30, "viewer waiting on 409", log)

                host = await open_page(
                    browser, f"{c.origin.url}/host?stream={stream}#token={c.host_token()}", log, "host"
                )
                await host.click("#go-live")
                await wait_for(lambda: _published(host), 30, "host page live with frames encoded", log)
                assert await host.get_attribute("#publish-state", "data-state") == "live"

                await wait_for(lambda: _media_state(viewer, "connected"), 45, "viewer connected", log)
                first = await wait_for(lambda: _decoded(viewer, 10), 30, "10 frames decoded", log)
                t0 = (await _state(viewer))["currentTime"]
                # framesDecoded keeps growing, the element's clock advances, audio keeps arriving.
                await wait_for(
                    lambda: _decoded(viewer, first["video"]["framesDecoded"] + 15), 30,
                    "framesDecoded to keep growing", log,
                )
                await wait_for(lambda: _time_after(viewer, t0), 30, "video.currentTime to advance", log)
                audio0 = first["audio"]["packetsReceived"]
                later = await wait_for(
                    lambda: _audio_after(viewer, audio0), 30, "audio packets to keep arriving", log
                )
                assert later["audio"]["totalSamplesReceived"] > 0

                state = await _state(viewer)
                assert state["videoWidth"] > 0 and state["videoHeight"] > 0
                assert state["relay"] == c.relay.url.rstrip("/")
                # The page's own stats readout reflects getStats().
                await wait_for(lambda: _text_int(viewer, "#stat-frames"), 10, "#stat-frames > 0", log)
                summary = await viewer.evaluate("window.lotcast.stats()")
                assert summary and summary["framesDecoded"] > 0
                assert summary["codec"] in ("video/VP8", "video/H264")
                assert summary["audioCodec"] == "audio/opus"

                # Host stats: RTT from remote-inbound-rtp shows up once RTCP flows.
                host_stats = await host.evaluate("window.lotcast.stats()")
                assert host_stats["framesEncoded"] > 0 and host_stats["packetsSent"] > 0

                # Stop DELETEs the WHIP session: the origin has no publisher left.
                assert (await _origin_stats(c.origin.url))["publishers"] == 1
                await host.click("#stop")
                await wait_for(
                    lambda: _host_stopped(host), 15, "host page stopped with its session deleted", log
                )
                await wait_for(lambda: _no_publisher(c.origin.url), 15, "origin publisher gone", log)
            except BaseException:
                print(log.tail(120))
                print(c.logs())
                raise


async def _origin_stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{url}/api/stats")).json()  # type: ignore[no-any-return]


async def _no_publisher(url: str) -> bool:
    return (await _origin_stats(url))["publishers"] == 0


async def _waiting(page: Any) -> bool:
    s = await _state(page)
    return s.get("media") == "waiting" and s.get("lastStatus") == 409


async def _published(page: Any) -> bool:
    s = await _state(page)
    if s.get("publish") != "live":
        return False
    raw = await _raw(page)
    return bool(raw.get("video", {}).get("framesEncoded")) and bool(raw.get("audio", {}).get("packetsSent"))


async def _media_state(page: Any, want: str) -> bool:
    return (await _state(page)).get("media") == want


async def _decoded(page: Any, n: int) -> dict[str, Any] | None:
    raw = await _raw(page)
    if raw.get("video", {}).get("framesDecoded", 0) >= n and raw.get("audio", {}).get("packetsReceived"):
        return raw
    return None


async def _time_after(page: Any, t0: float) -> bool:
    return bool((await _state(page))["currentTime"] > t0 + 0.5)


async def _audio_after(page: Any, n: int) -> dict[str, Any] | None:
    raw = await _raw(page)
    return raw if raw.get("audio", {}).get("packetsReceived", 0) > n + 20 else None


async def _text_int(page: Any, selector: str) -> bool:
    text = (await page.text_content(selector)) or "0"
    return text.isdigit() and int(text) > 0


async def _host_stopped(page: Any) -> bool:
    s = await _state(page)
    return s.get("publish") == "stopped" and s.get("session") is None


@pytest.mark.timeout(180)
async def test_host_page_republishes_after_broadcaster_restart_and_viewer_resumes(
    redis_server: RedisServer,
) -> None:
    stream = "browser-republish"
    log = PageLog()
    with cluster(redis_server.url) as c:
        async with chromium() as browser:
            try:
                host = await open_page(
                    browser, f"{c.origin.url}/host?stream={stream}#token={c.host_token()}", log, "host"
                )
                await host.click("#go-live")
                await wait_for(lambda: _published(host), 30, "host page live", log)
                first_session = (await _state(host))["session"]
                viewer = await open_page(browser, f"{c.relay.url}/watch?stream={stream}", log, "viewer")
                await wait_for(lambda: _decoded(viewer, 10), 60, "viewer decoding", log)

                await trace_player(viewer)
                restarted = time.monotonic()
                c.restart_origin()
                # The host page notices the broken connection and publishes again by itself.
                await wait_for(lambda: _republished(host, first_session), 60,
                               "host page live again with a new WHIP session", log)
                print(f"host page live again {time.monotonic() - restarted:.2f} s after the restart")
                assert await host.get_attribute("#publish-state", "data-state") == "live"
                # The viewer (through the relay, same page) plays the new publisher's media.
                frames = ((await _raw(viewer)).get("video") or {}).get("framesDecoded", 0)
                await wait_for(lambda: _decoded(viewer, frames + 15), 90,
                               "viewer decoding the republished stream", log)
                v = await _state(viewer)
                print(f"viewer decoding again {time.monotonic() - restarted:.2f} s after the restart "
                      f"(WHEP sessions {v['sessions']}, reconnects {v['reconnects']})")
                print("viewer player trace (ms since page load):", await player_trace(viewer))
            except BaseException:
                print(log.tail(150))
                print(c.logs())
                raise


async def _republished(page: Any, old_session: str) -> bool:
    s = await _state(page)
    return s.get("publish") == "live" and s.get("session") not in (None, old_session)


@pytest.mark.timeout(60)
async def test_host_page_previews_camera_and_screen() -> None:
    """Source picker: the camera and the screen (getDisplayMedia) both preview, with audio."""
    log = PageLog()
    with static_server() as base:
        async with chromium() as browser:
            page = await open_page(browser, f"{base}/host?stream=preview", log, "host")
            tracks_js = ("document.getElementById('preview').srcObject.getTracks()"
                         ".map(t => t.kind + ':' + t.label)")
            await page.click("#preview-start")
            await wait_for(lambda: _preview_state(page), 15, "camera preview", log)
            camera = await page.evaluate(tracks_js)
            assert any(t.startswith("video:") for t in camera)
            assert any(t.startswith("audio:") for t in camera)
            await page.select_option("#source-select", "screen")
            await wait_for(lambda: _screen_track(page, tracks_js), 15, "screen preview", log)
            # Devices are listed once permission was granted.
            assert await page.locator("#camera-select option").count() >= 2


async def _preview_state(page: Any) -> bool:
    return bool((await _state(page)).get("publish") == "previewing")


async def _screen_track(page: Any, tracks_js: str) -> bool:
    tracks = await page.evaluate(tracks_js)
    return any(t.startswith("video:screen") for t in tracks)
