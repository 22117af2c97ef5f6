"""A relay replacing its pull switches the stream at the new source's first key frame: until then
the old source keeps feeding viewers (issue 13: "relays switch their pull to the new origin at a
key frame").

Real parts: two origin processes, aiortc publishers (one per origin, the second one's video held
back by a fault until the test lets it through: a key frame that comes late), the relay's own
RelayUpstreams/StreamRouter/EgressSession in this process (so the test reads the stream itself),
and an aiortc viewer decoding the painted frame numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import pytest
from aiortc import RTCSessionDescription
from cluster_support import TimedViewer
from media_support import assert_in_order, host_token, http_client
from origin_support import Origins, PlacedPublisher, two_origins

import lotcast.media.stream as stream_module
from lotcast.media.aiortc_hooks import negotiated_codecs
from lotcast.media.endpoints import SessionTable
from lotcast.media.peer import EgressSession
from lotcast.media.sdp import check_offer
from lotcast.media.stream import MediaStream, StreamRouter
from lotcast.redis_server import RedisServer
from lotcast.supervisor import ServiceProcess
from relay.cascade import Upstream
from relay.upstreams import RelayUpstreams

pytestmark = pytest.mark.timeout(150)

STREAM = "swap"
NEW_FIRST_FRAME = 100_000  # the new publisher's frame numbers start here
HELD_FRAMES = 20  # old-source frames the viewer must decode after the new pull exists


class LocalViewer(TimedViewer):
    """A decoding aiortc viewer fed by an EgressSession of this process's stream."""

    def __init__(self, stream: MediaStream, sessions: SessionTable) -> None:
        super().__init__("", stream.id)
        self._stream = stream
        self._sessions = sessions
        self.session: EgressSession | None = None

    async def start(self, expect: int = 201) -> None:
        self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.addTransceiver("video", direction="recvonly")

        @self.pc.on("track")
        def on_track(track: Any) -> None:
            consume = self._video if track.kind == "video" else self._audio
            self._tasks.append(asyncio.ensure_future(consume(track)))

        self.started_at = time.monotonic()
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = self.pc.localDescription.sdp
        self.session = EgressSession(self._stream, check_offer(offer, "play"))
        answer = await self.session.answer(offer)
        self._sessions.add(self.session)
        await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))

    async def stop(self, delete: bool = True) -> None:
        if self.session is not None:
            await self.session.close()
        await super().stop(delete=False)


class HeldVideo:
    """Fault: the publisher's uplink loses all its video (key frames answering PLIs included)
    until ``release``: the new source's first key frame comes as late as the test wants."""

    def __init__(self, publisher: PlacedPublisher) -> None:
        video = next(t for t in publisher.pc.getTransceivers() if t.kind == "video")
        self._pt = negotiated_codecs(video)[0].payloadType
        dtls = video.sender.transport
        original = dtls._send_rtp
        self.held = True
        self.dropped = 0

        async def send_rtp(data: bytes) -> None:
            if self.held and data[1] & 0x7F == self._pt:
                self.dropped += 1
                return
            await original(data)

        dtls._send_rtp = send_rtp

    def release(self) -> None:
        self.held = False


async def _stream_stats(url: str) -> dict[str, Any]:
    async with http_client() as http:
        response = await http.get(f"{url}/api/stats")
    assert response.status_code == 200
    data: dict[str, Any] = response.json()
    return data


async def _until(check: Callable[[], Awaitable[bool]] | Callable[[], bool], timeout: float,
                 message: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, message
        await asyncio.sleep(interval)


def _max_gap(times: list[float], start: float, end: float) -> float:
    points = [start, *(t for t in times if start < t < end), end]
    return max(b - a for a, b in itertools.pairwise(points))


@contextlib.asynccontextmanager
async def _relay_side(origin_url: str, target: dict[str, str]) -> AsyncIterator[
        tuple[StreamRouter, SessionTable, RelayUpstreams]]:
    async def choose(stream_id: str, exclude: Collection[str], below: int | None) -> Upstream:
        return Upstream(target["url"], 0)

    router = StreamRouter(grace=5.0)
    sessions = SessionTable(session_timeout=30.0)
    upstreams = RelayUpstreams(router, sessions, origin_url, retry_window=10.0, choose=choose)
    try:
        yield router, sessions, upstreams
    finally:
        await upstreams.close()
        await sessions.close()
        router.close()


async def _publish_second(cluster: Origins, first: PlacedPublisher) -> tuple[
        PlacedPublisher, ServiceProcess, ServiceProcess]:
    """Drain the first publisher's origin and publish again on the other one, as the host page
    does on the republish notice (the old session stays until the draining origin ends it)."""
    old_origin = cluster.by_url(first.origin_url)
    new_origin = cluster.other(old_origin)
    old_origin.signal(signal.SIGTERM)

    async def draining() -> bool:
        return bool((await _stream_stats(old_origin.url)).get("draining"))

    await _until(draining, 10, "the old origin did not start draining")
    second = PlacedPublisher(new_origin.url, STREAM, host_token(), first_frame=NEW_FIRST_FRAME)
    second.url = f"{new_origin.url}/whip/{STREAM}?from={old_origin.name}"
    await second.start()
    assert second.origin_url == new_origin.url
    return second, old_origin, new_origin


async def test_viewer_keeps_decoding_the_old_source_until_the_new_sources_key_frame(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # the bounded wait is not what this test is about: a loaded machine must not reach it
    monkeypatch.setattr(stream_module, "SWITCH_TIMEOUT_S", 15.0, raising=False)
    with two_origins(redis_server, relays=0) as cluster:
        first = PlacedPublisher(cluster.urls[0], STREAM, host_token())
        await first.start()
        target = {"url": first.origin_url}
        second: PlacedPublisher | None = None
        async with _relay_side(first.origin_url, target) as (_router, sessions, upstreams):
            stream = await upstreams.acquire(STREAM)
            viewer = LocalViewer(stream, sessions)
            try:
                await viewer.start()
                await viewer.wait_frames(30, timeout=30)
                second, old_origin, new_origin = await _publish_second(cluster, first)
                held = HeldVideo(second)

                async def new_origin_has_audio() -> bool:
                    stats = await _stream_stats(new_origin.url)
                    entry = next((s for s in stats["streams"] if s["id"] == STREAM), {})
                    return int(entry.get("audio_packets_in", 0)) > 50

                # > 1 s of the new publisher: its very first key frame is no longer replayed
                await _until(new_origin_has_audio, 20, "the new publisher never connected")
                target["url"] = new_origin.url
                moving = asyncio.ensure_future(upstreams.reparent(STREAM, exclude=()))

                async def pulled_there() -> bool:
                    return int((await _stream_stats(new_origin.url))["viewers"]) >= 1

                await _until(pulled_there, 20, "the relay never pulled from the new origin")
                pulled_at = time.monotonic()

                def old_frames_after(start: float) -> int:
                    return sum(1 for t, c in zip(viewer.frame_times, viewer.counters, strict=True)
                               if t > start and c < NEW_FIRST_FRAME)

                # the new pull exists and has no key frame: the viewer plays the old source
                # (bounded: the old code stops it at once, then this just runs out)
                with contextlib.suppress(AssertionError):
                    await _until(lambda: old_frames_after(pulled_at) >= HELD_FRAMES, 4,
                                 "old source stopped")
                held.release()
                released_at = time.monotonic()
                await _until(lambda: any(c >= NEW_FIRST_FRAME for c in viewer.counters), 20,
                             "the viewer never decoded the new publisher")
                new_at = next(t for t, c in zip(viewer.frame_times, viewer.counters, strict=True)
                              if c >= NEW_FIRST_FRAME)
                await asyncio.wait_for(moving, 20)
                await _until(lambda: sum(c >= NEW_FIRST_FRAME for c in viewer.counters) >= 30,
                             20, "the new publisher's frames did not keep coming")
                window = new_at - pulled_at
                gap = _max_gap(viewer.frame_times, pulled_at, new_at)
                in_window = sum(1 for t in viewer.frame_times if pulled_at < t < new_at)
                print(f"\nswitch: new pull at 0 ms, video released at "
                      f"{(released_at - pulled_at) * 1000:.0f} ms, first new frame at "
                      f"{window * 1000:.0f} ms; {in_window} frames decoded in between, longest "
                      f"decode gap {gap * 1000:.0f} ms; held back {held.dropped} video packets; "
                      f"stream counters {_switch_counters(stream)}")
                # the old source fed the viewer all the while the new one had no key frame
                assert old_frames_after(pulled_at) >= HELD_FRAMES - 2, (
                    f"{old_frames_after(pulled_at)} old frames decoded after the new pull")
                assert gap < window / 2, (gap, window)
                assert_in_order(viewer.counters)  # old frames, then new ones: no mix
                # exactly one switch, at the new source's key frame, and its wait recorded
                assert stream.switch_ends["keyframe"] == 1, stream.switch_ends
                assert sum(stream.switch_ends.values()) == 1, stream.switch_ends
                assert len(stream.switch_waits_ms) == 1 and stream.switch_waits_ms[0] > 0
                counters = stream.counters()
                assert counters["switches"] == 1 and counters["switch_state"] == "steady"
                assert upstreams.reparents == 1
                assert upstreams.pulls()[0].upstream_url == new_origin.url
                # the old pull was closed after the switch: nothing pulls from the draining
                # origin any more, so it ends the old session and exits
                assert old_origin.wait(25) == 0, "".join(old_origin.output[-20:])
            finally:
                await viewer.stop()
                if second is not None:
                    await second.stop()
                await first.stop(delete=False)


async def test_old_source_going_silent_switches_without_waiting_for_the_key_frame(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_module, "SWITCH_TIMEOUT_S", 15.0)
    with two_origins(redis_server, relays=0) as cluster:
        first = PlacedPublisher(cluster.urls[0], STREAM, host_token())
        await first.start()
        target = {"url": first.origin_url}
        second: PlacedPublisher | None = None
        async with _relay_side(first.origin_url, target) as (_router, sessions, upstreams):
            stream = await upstreams.acquire(STREAM)
            viewer = LocalViewer(stream, sessions)
            try:
                await viewer.start()
                await viewer.wait_frames(15, timeout=30)
                second, _old_origin, new_origin = await _publish_second(cluster, first)
                held = HeldVideo(second)
                target["url"] = new_origin.url
                moving = asyncio.ensure_future(upstreams.reparent(STREAM, exclude=()))
                await _until(lambda: stream.switch_state.value == "pending", 20,
                             "the new pull never became pending")
                await first.pc.close()  # the old publisher vanishes: the old pull goes silent
                await asyncio.wait_for(moving, 20)  # switched without any key frame
                assert stream.switch_ends == {**dict.fromkeys(stream.switch_ends, 0),
                                              "old_silent": 1}, stream.switch_ends
                held.release()
                await _until(lambda: any(c >= NEW_FIRST_FRAME for c in viewer.counters), 20,
                             "the viewer never decoded the new publisher")
                assert_in_order(viewer.counters)
            finally:
                await viewer.stop()
                if second is not None:
                    await second.stop()
                await first.stop(delete=False)


def _switch_counters(stream: MediaStream) -> dict[str, object]:
    counters = stream.counters() if hasattr(stream, "switch_ends") else {}
    return {k: v for k, v in counters.items() if k.startswith("switch")}


async def test_no_key_frame_within_the_bound_switches_anyway_and_viewers_wait_for_it(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_module, "SWITCH_TIMEOUT_S", 1.0)
    with two_origins(redis_server, relays=0) as cluster:
        first = PlacedPublisher(cluster.urls[0], STREAM, host_token())
        await first.start()
        target = {"url": first.origin_url}
        second: PlacedPublisher | None = None
        async with _relay_side(first.origin_url, target) as (_router, sessions, upstreams):
            stream = await upstreams.acquire(STREAM)
            viewer = LocalViewer(stream, sessions)
            try:
                await viewer.start()
                await viewer.wait_frames(15, timeout=30)
                second, _old_origin, new_origin = await _publish_second(cluster, first)
                held = HeldVideo(second)  # never released before the bound
                target["url"] = new_origin.url
                await asyncio.wait_for(upstreams.reparent(STREAM, exclude=()), 20)
                assert stream.switch_ends == {**dict.fromkeys(stream.switch_ends, 0),
                                              "timeout": 1}, stream.switch_ends
                assert len(stream.switch_waits_ms) == 1 and stream.switch_waits_ms[0] >= 1000
                # the new source's packets feed viewers now; the video ones wait for its key
                # frame (asked for by the resync), which comes once its uplink is back
                held.release()
                await _until(lambda: sum(c >= NEW_FIRST_FRAME for c in viewer.counters) >= 15,
                             20, "the viewer never played the new publisher")
                assert_in_order(viewer.counters)
                assert upstreams.pulls()[0].upstream_url == new_origin.url
            finally:
                await viewer.stop()
                if second is not None:
                    await second.stop()
                await first.stop(delete=False)
