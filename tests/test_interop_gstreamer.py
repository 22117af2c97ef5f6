"""A second WebRTC stack: GStreamer's webrtcbin publishes over WHIP (its own offer, setup:actpass,
an RSA certificate, 1400-byte packets, candidates trickled by PATCH) in VP8 and in H.264; a
Chromium viewer and an aiortc viewer decode it through a relay, and keep decoding after the
publisher is restarted.

The publisher runs as its own process under Debian's python3 (python3-gi); when GStreamer or its
bindings are missing the test fails with the packages to install (it never skips).
"""

from __future__ import annotations

from typing import Any

import pytest
from browser_support import PageLog, chromium, open_page, page_state, playing_on, wait_for
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from gst_support import FrameViewer, GstPublisher
from media_support import Cluster, host_token, http_client, running_cluster

from lotcast.redis_server import RedisServer

WIDTH, HEIGHT = 640, 360  # what gst_whip_publisher.py sends
SRTP_UNSAFE = 1356  # the largest RTP packet the old forwarding path could protect


async def _stats(url: str) -> dict[str, Any]:
    async with http_client() as http:
        response = await http.get(f"{url}/api/stats")
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


async def _stream(url: str, stream: str) -> dict[str, Any]:
    found = [s for s in (await _stats(url))["streams"] if s["id"] == stream]
    assert found, f"{url} carries no stream {stream!r}"
    return found[0]


async def _frames_decoded(page: Any) -> int:
    raw = await page.evaluate("window.lotcast.rawStats()") or {}
    return int(raw.get("video", {}).get("framesDecoded", 0))


def _check_publisher_session(publisher: GstPublisher) -> None:
    """What webrtcbin did on the wire: its own actpass offer, RSA, trickle, big packets."""
    offer = publisher.of("offer")[0]["sdp"]
    assert "a=setup:actpass" in offer
    assert "a=candidate" not in offer, "the offer should carry no candidates: they are trickled"
    pem = publisher.of("certificate")[0]["pem"]
    key = x509.load_pem_x509_certificate(pem.encode()).public_key()
    assert isinstance(key, rsa.RSAPublicKey), type(key)
    patches = publisher.of("patched")
    trickled = [p for p in patches if p["candidate"]]
    assert trickled, f"no candidate was trickled\n{publisher.describe()}"
    assert any("127.0.0.1" in p["candidate"] for p in trickled)
    # a trickle repeating the session's current ice-ufrag/pwd is added, not taken for a restart
    assert [p["status"] for p in patches] == [204] * len(patches), publisher.describe()
    stats = publisher.last("stats")
    assert stats is not None and stats["max_video_packet"] > SRTP_UNSAFE, stats
    assert stats["video_packets_over_1356"] >= 50, stats


async def _publish(cluster: Cluster, stream: str, codec: str) -> GstPublisher:
    publisher = GstPublisher(f"{cluster.origin.url}/whip/{stream}", host_token(), codec).start()
    await publisher.wait_connected(timeout=40)
    await publisher.wait_for(
        "a certificate and 100 packets over 1356 bytes sent",
        lambda: publisher.of("certificate")
        and (publisher.last("stats") or {}).get("video_packets_over_1356", 0) >= 100, 30)
    return publisher


@pytest.mark.timeout(170)
@pytest.mark.parametrize("codec", ["vp8", "h264"])
async def test_gstreamer_publisher_plays_through_a_relay_in_chromium_and_aiortc(
    redis_server: RedisServer, codec: str,
) -> None:
    stream = f"gst-{codec}"
    log = PageLog()
    publishers: list[GstPublisher] = []
    with running_cluster(redis_server) as cluster:
        viewer = FrameViewer(cluster.relay.url, stream)
        try:
            async with chromium() as browser:
                publishers.append(await _publish(cluster, stream, codec))
                _check_publisher_session(publishers[0])
                origin = await _stream(cluster.origin.url, stream)
                assert origin.get("video_largest_packet", 0) > SRTP_UNSAFE, origin

                await viewer.start()
                page = await open_page(browser, f"{cluster.relay.url}/watch?stream={stream}",
                                       log, "viewer")
                await viewer.wait_frames(30, timeout=40)
                assert viewer.audio_frames > 0, "no audio decoded"
                assert set(viewer.sizes) == {(WIDTH, HEIGHT)}, set(viewer.sizes)
                await wait_for(playing_on(page, cluster.relay.url, 10), 45,
                               "Chromium decoding through the relay", log)
                first = await _frames_decoded(page)
                await wait_for(lambda: _frames_at_least(page, first + 15), 30,
                               "Chromium framesDecoded to keep growing", log)
                summary = await page.evaluate("window.lotcast.stats()")
                assert summary["codec"] == {"vp8": "video/VP8", "h264": "video/H264"}[codec]
                # the 1400-byte packets crossed the origin → relay hop too
                relay = await _stream(cluster.relay.url, stream)
                assert relay.get("video_largest_packet", 0) > SRTP_UNSAFE, relay

                # restart the publisher: SIGTERM (it DELETEs its session), then a new process
                assert publishers[0].stop() == 0, publishers[0].describe()
                assert [d["status"] for d in publishers[0].of("deleted")] == [200]
                seen = len(viewer.counters)
                chromium_seen = await _frames_decoded(page)
                sessions = (await page_state(page))["sessions"]
                publishers.append(await _publish(cluster, stream, codec))
                _check_publisher_session(publishers[1])

                await viewer.wait_frames(seen + 45, timeout=40)
                assert viewer.pc.connectionState == "connected"  # the same WHEP session
                assert set(viewer.sizes) == {(WIDTH, HEIGHT)}
                await wait_for(lambda: _frames_at_least(page, chromium_seen + 30), 40,
                               "Chromium decoding the restarted publisher", log)
                state = await page_state(page)
                assert state["relay"] == cluster.relay.url.rstrip("/")
                print(f"Chromium WHEP sessions started before/after the publisher restart: "
                      f"{sessions} / {state['sessions']}")
        except BaseException:
            for publisher in publishers:
                print(publisher.describe())
            print(log.tail(80))
            for proc in [cluster.origin, *cluster.relays]:
                print(f"--- {proc.command} ---\n" + "".join(proc.output[-40:]))
            raise
        finally:
            await viewer.stop()
            for publisher in publishers:
                publisher.stop()


async def _frames_at_least(page: Any, n: int) -> int | None:
    decoded = await _frames_decoded(page)
    return decoded if decoded >= n else None
