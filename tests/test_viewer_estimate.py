"""Viewers' bandwidth estimates (issue 11: "a bandwidth estimate (negotiate REMB with
abs-send-time ...; stamp the extension on forwarded packets)"), end to end through real nodes:
a viewer that negotiated abs-send-time gets it on its video, and its REMBs (aiortc's receiver
sends them once our packets carry it) reach the relay's `lotcast_viewer_estimate_bps`
histogram; a viewer that did not negotiate it, or a relay with LOTCAST_VIEWER_ESTIMATE=0,
sends video with no header extension at all."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest
from media_support import Publisher, Viewer, host_token, running_cluster
from prometheus_client.parser import text_string_to_metric_families

from lotcast.media.aiortc_hooks import drop_incoming_rtp, negotiated_codecs
from lotcast.media.sdp import ABS_SEND_TIME_URI
from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)

STREAM = "estimate"


async def estimate_count(node_url: str) -> float:
    """How many viewer REMBs the node has counted."""
    async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
        text = (await http.get(f"{node_url}/metrics")).text
    for family in text_string_to_metric_families(text):
        if family.name == "lotcast_viewer_estimate_bps":
            return next(s.value for s in family.samples if s.name.endswith("_count"))
    raise AssertionError("no lotcast_viewer_estimate_bps histogram in /metrics")


def without_abs_send_time(sdp: str) -> str:
    return re.sub(rf"a=extmap:\d+ {re.escape(ABS_SEND_TIME_URI)}\r\n", "", sdp)


async def watch(relay_url: str, viewer: Viewer) -> tuple[int, int]:
    """Play until 30 frames are decoded: (video packets, those with a header extension)."""
    await viewer.start()
    video = next(t for t in viewer.pc.getTransceivers() if t.kind == "video")
    video_pt = negotiated_codecs(video)[0].payloadType
    seen = [0, 0]

    def record(data: bytes) -> bool:
        if data[1] & 0x7F == video_pt:
            seen[0] += 1
            seen[1] += bool(data[0] & 0x10)
        return False

    drop_incoming_rtp(video.receiver.transport, record)
    await viewer.wait_frames(30, timeout=60)
    return seen[0], seen[1]


async def test_a_viewer_with_abs_send_time_gets_it_and_its_estimates_are_counted(
        redis_server: RedisServer) -> None:
    with running_cluster(redis_server) as cluster:
        publisher = Publisher(cluster.origin.url, STREAM, host_token())
        await publisher.start()
        viewer = Viewer(cluster.relay.url, STREAM)
        try:
            packets, stamped = await watch(cluster.relay.url, viewer)
            assert packets >= 30 and stamped == packets, (packets, stamped)
            deadline = time.monotonic() + 20
            while await estimate_count(cluster.relay.url) == 0:
                assert time.monotonic() < deadline, "no viewer REMB counted in 20 s"
                await asyncio.sleep(0.25)
        finally:
            await viewer.stop()
            await publisher.stop()


@pytest.mark.parametrize("switched_off", [False, True], ids=["not-negotiated", "estimate-off"])
async def test_video_goes_out_without_extensions_when_not_negotiated_or_switched_off(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, switched_off: bool) -> None:
    if switched_off:
        monkeypatch.setenv("LOTCAST_VIEWER_ESTIMATE", "0")
    with running_cluster(redis_server) as cluster:
        publisher = Publisher(cluster.origin.url, STREAM, host_token())
        await publisher.start()
        viewer = Viewer(cluster.relay.url, STREAM,
                        offer_filter=None if switched_off else without_abs_send_time)
        try:
            packets, stamped = await watch(cluster.relay.url, viewer)
            assert packets >= 30 and stamped == 0, (packets, stamped)
            await asyncio.sleep(2.0)  # (aiortc sends REMB only with abs-send-time: none come)
            assert await estimate_count(cluster.relay.url) == 0
        finally:
            await viewer.stop()
            await publisher.stop()
