"""Real Chromium, real services: the host page publishes three simulcast layers (RFC 8853) over
WHIP; aiortc viewers pinned to a layer each with the WHEP layer POST decode three different
resolutions on the origin, through a relay and across a cascade hop; one aiortc viewer switched
h -> l -> m -> h decodes each layer's size after each switch, its RTP continuous; the watch
page's quality menu switches Chromium's decode with no key-frame request and no freeze over
200 ms of its own; the host's encoder gets at most one key-frame request per switch (issue 11)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
import redis.asyncio as aioredis
from aiortc import RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from browser_support import PageLog, chromium, cluster, open_page, page_state, playing_on, wait_for
from media_support import Viewer, http_client
from sse_support import Session, parse_links, subscribed

from lotcast.media.aiortc_hooks import drop_incoming_rtp, negotiated_codecs
from lotcast.media.forwarder import KEYFRAME_REQUEST_INTERVAL
from lotcast.ops.registry import read_live_nodes
from lotcast.redis_server import RedisServer


class SizedViewer:
    """A WHEP viewer (aiortc) that records the size of every decoded video frame."""

    def __init__(self, base_url: str, stream: str) -> None:
        self.viewer = Viewer(base_url, stream)
        self.sizes: list[tuple[int, int]] = []
        self.times: list[float] = []  # when each of them was decoded (monotonic)
        self.session: Session | None = None
        self.wire: list[tuple[int, int]] = []  # (seq, timestamp) of each video RTP datagram

    async def start(self) -> Session:
        v = self.viewer
        v.pc.addTransceiver("audio", direction="recvonly")
        v.pc.addTransceiver("video", direction="recvonly")

        @v.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video":
                v._tasks.append(asyncio.ensure_future(self._video(track)))

        await v.pc.setLocalDescription(await v.pc.createOffer())
        async with http_client() as http:
            response = await http.post(v.url, content=v.pc.localDescription.sdp,
                                       headers={"Content-Type": "application/sdp"})
        assert response.status_code == 201, (response.status_code, response.text)
        v.resource = urljoin(str(response.url), response.headers["Location"])
        await v.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
        video = next(t for t in v.pc.getTransceivers() if t.kind == "video")
        video_pts = {c.payloadType for c in negotiated_codecs(video)}

        def record(data: bytes) -> bool:  # a probe on the wire, before SRTP: drops nothing
            if data[1] & 0x7F in video_pts:
                self.wire.append(((data[2] << 8) | data[3], int.from_bytes(data[4:8], "big")))
            return False

        drop_incoming_rtp(video.receiver.transport, record)
        self.session = Session(v, parse_links(response.headers.get("Link", ""), v.resource))
        return self.session

    async def _video(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await track.recv()
                self.sizes.append((frame.width, frame.height))  # type: ignore[attr-defined]
                self.times.append(time.monotonic())

    async def pin(self, rid: str | None) -> None:
        assert self.session is not None
        body = {"encodingId": rid} if rid is not None else {}
        async with http_client() as http:
            response = await http.post(self.session.layer, json=body)
        assert response.status_code == 204, (response.status_code, response.text)

    async def stop(self) -> None:
        await self.viewer.stop()


def decoding(viewer: SizedViewer, base_url: str, stream: str, rid: str, frames: int) -> Any:
    """Until the last ``frames`` frames decoded from now on have layer ``rid``'s size, as the
    node serving the viewer last saw it in that layer's key frames (Chromium may scale a
    layer down under CPU load, always with a new key frame)."""
    start = len(viewer.sizes)

    async def check() -> tuple[int, int] | NotYet:
        layers = await stream_layers(base_url, stream)
        sizes = {r: tuple(v["size"]) for r, v in layers.items() if v.get("size")}
        recent = viewer.sizes[start:][-frames:]
        want = sizes.get(rid)
        if (len(recent) == frames and want is not None and len(set(sizes.values())) == 3
                and all(s == want for s in recent)):
            return want
        flow = {r: (v["packets_in"], v["keyframe_requests"], v["switches_in"], v["viewers"])
                for r, v in layers.items()}
        return NotYet(f"layer sizes {sizes}, (packets in, key-frame requests, switches in, viewers) "
                      f"{flow}, frames decoded {len(viewer.sizes)}, last {viewer.sizes[-3:]}")

    return check


def wire_problems(wire: list[tuple[int, int]]) -> list[str]:
    """What breaks continuity in the video RTP one viewer received (in arrival order): a
    sequence number used again for another packet (another timestamp), timestamps going back
    in sequence order, a run of more than 20 sequence numbers missing (skipped: a loss that
    NACKs did not repair is a few, on loopback)."""
    problems: list[str] = []
    first_ts: dict[int, int] = {}
    by_ext: dict[int, int] = {}
    ext = None
    last = 0
    for seq, ts in wire:
        if seq in first_ts and first_ts[seq] != ts:
            problems.append(f"seq {seq} came with timestamp {first_ts[seq]}, then with {ts}")
        first_ts.setdefault(seq, ts)
        ext = seq if ext is None else ext + ((seq - last + 0x8000) % 0x10000 - 0x8000)
        last = seq
        by_ext.setdefault(ext, ts)
    ordered = sorted(by_ext.items())
    for (seq_a, ts_a), (seq_b, ts_b) in itertools.pairwise(ordered):
        if (ts_b - ts_a) % (1 << 32) >= 1 << 31:
            problems.append(f"timestamp {ts_b} (seq {seq_b % 0x10000}) before {ts_a}")
        if seq_b - seq_a > 21:
            problems.append(f"{seq_b - seq_a - 1} seqs missing after {seq_a % 0x10000}")
    return problems


async def host_keyframe_requests(host: Any) -> dict[str, int]:
    """PLIs + FIRs each of the host page's layers has received (Chromium's outbound-rtp)."""
    return dict(await host.evaluate("""async () => {
        const out = {};
        (await window.lotcast.publisher.pc.getStats()).forEach((s) => {
            if (s.type === 'outbound-rtp' && s.kind === 'video') {
                out[s.rid || ''] = (s.pliCount || 0) + (s.firCount || 0);
            }
        });
        return out;
    }"""))


def requests_since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {rid: count - before.get(rid, 0) for rid, count in after.items()}


def repeats_allowed(waited: float) -> int:
    """Key-frame requests a switch may repeat: a forwarder asks again when no key frame came
    within KEYFRAME_REQUEST_INTERVAL of its request (the host slow to encode or send one, as
    under CPU load), so at most once per interval of the time from the layer POST (or menu
    choice) to the viewer's first frame of the new layer, an upper bound on each node's wait."""
    return int(waited / KEYFRAME_REQUEST_INTERVAL)


class NotYet:
    """A falsy poll result that says what was seen (wait_for prints it on a timeout)."""

    def __init__(self, seen: str) -> None:
        self.seen = seen

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return self.seen
# The watch page's inbound video as getStats has it (window.__inbound()); the freezes Chromium
# counted since this ran (window.__freezes: [count added, seconds added, page ms] per 50 ms
# sample that saw freezeCount grow); each presented frame of another size than the one before
# (window.__resized: [page ms, ms since the frame before, width, height], from
# requestVideoFrameCallback); the switches asked for (window.__mark: [choice, page ms]).
WATCH_FREEZES = """() => {
    const inbound = async () => {
        let out = null;
        (await window.lotcast.pc.getStats()).forEach((s) => {
            if (s.type === 'inbound-rtp' && s.kind === 'video') out = s;
        });
        return out;
    };
    window.__freezes = [];
    let last = null;
    setInterval(async () => {
        const s = await inbound();
        if (!s) return;
        if (last && s.freezeCount > last.freezeCount) {
            window.__freezes.push([s.freezeCount - last.freezeCount,
                                   s.totalFreezesDuration - last.totalFreezesDuration,
                                   Math.round(performance.now())]);
        }
        last = s;
    }, 50);
    window.__marks = [];
    window.__mark = (what) => window.__marks.push([what, Math.round(performance.now())]);
    window.__resized = [];
    window.__gaps = [];  // for failure messages: gaps over 100 ms between presented frames
    const video = document.getElementById('video');
    let previous = null;
    const onFrame = (now, meta) => {
        if (previous !== null) {
            const gap = Math.round(now - previous[0]);
            if (meta.width !== previous[1] || meta.height !== previous[2]) {
                window.__resized.push([Math.round(now), gap, meta.width, meta.height]);
            }
            if (gap > 100) window.__gaps.push([gap, Math.round(now), meta.width, meta.height]);
        }
        previous = [now, meta.width, meta.height];
        video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
    window.__inbound = async () => {
        const s = await inbound();
        return {framesDecoded: s.framesDecoded, keyFramesDecoded: s.keyFramesDecoded,
                pliCount: s.pliCount || 0, firCount: s.firCount || 0,
                freezeCount: s.freezeCount || 0, totalFreezesDuration: s.totalFreezesDuration || 0,
                framesDropped: s.framesDropped || 0, nackCount: s.nackCount || 0};
    };
}"""


async def stream_layers(base_url: str, stream: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"{base_url}/api/stats")
    for s in response.json().get("streams", []):
        if s.get("id") == stream:
            return dict(s.get("layers") or {})
    return {}


async def stream_counter(base_url: str, stream: str, name: str) -> int:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"{base_url}/api/stats")
    entry = next(s for s in response.json()["streams"] if s["id"] == stream)
    return int(entry.get(name, 0))


async def outbound(host: Any) -> Any:
    """The host page's video layers as Chromium sends them (for failure messages)."""
    return await host.evaluate("""async () => {
        const out = [];
        (await window.lotcast.publisher.pc.getStats()).forEach((s) => {
            if (s.type === 'outbound-rtp' && s.kind === 'video') out.push([s.rid, s.frameWidth,
                s.framesPerSecond, s.qualityLimitationReason, s.bytesSent]);
        });
        return out;
    }""")


async def carried_by(redis_url: str, node_id: str, stream: str) -> bool:
    """``node_id``'s heartbeat says it carries ``stream`` and would take a cascade child (below
    placement's CPU limit: the heartbeat after three viewers' handshakes can be above it on a
    slow machine, and a child then rightly pulls from the origin)."""
    redis = aioredis.from_url(redis_url)
    try:
        nodes = await read_live_nodes(redis)
    finally:
        await redis.aclose()
    return any(n.node_id == node_id and n.carries(stream) and n.cpu < 0.9 for n in nodes)


async def relay_stats(base_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"{base_url}/api/stats")
    return dict(response.json())


async def pinned(base_url: str, stream: str, rids: list[str | None], log: PageLog,
                 upstream_url: str, host: Any) -> None:
    """Viewers of ``base_url`` pinned to ``rids`` (None: the default, the top layer) each
    decode their layer's size."""
    viewers = [SizedViewer(base_url, stream) for _ in rids]
    try:
        for rid, viewer in zip(rids, viewers, strict=True):
            await viewer.start()
            if rid is not None:
                await viewer.pin(rid)
        for rid, viewer in zip(rids, viewers, strict=True):
            try:
                await wait_for(decoding(viewer, base_url, stream, rid or "h", 10), 45,
                               f"{base_url} viewer on {rid or 'default'} decodes it", log)
            except AssertionError as exc:
                mine = await relay_stats(base_url)
                raise AssertionError(
                    f"{exc}\nits node's pulls {mine.get('upstreams')}, streams "
                    f"{mine.get('streams')}\nupstream's layers "
                    f"{await stream_layers(upstream_url, stream)}\nhost outbound "
                    f"{await outbound(host)}") from None
    finally:
        for viewer in viewers:
            await viewer.stop()


@pytest.mark.timeout(300)
async def test_simulcast_layers_pinned_per_viewer_decode_three_sizes(
        redis_server: RedisServer) -> None:
    stream = "browser-simulcast"
    log = PageLog()
    # origin fan-out 1: relay-0 pulls from the origin, relay-1 cascades from relay-0
    with cluster(redis_server.url, relays=2, relay_args=["--origin-fanout", "1"]) as c:
        async with chromium() as browser:
            # simulcast is the host page's default (?simulcast=0 for one layer)
            host_url = f"{c.origin.url}/host?stream={stream}#token={c.host_token()}"
            host = await open_page(browser, host_url, log, "host")
            await host.click("#go-live")

            async def three_layers() -> dict[str, Any] | None:
                layers = await stream_layers(c.origin.url, stream)
                sized = {rid: v for rid, v in layers.items() if v.get("size")}
                return layers if len(sized) == 3 else None

            layers = await wait_for(three_layers, 60, "three layers with key frames", log)
            assert list(layers) == ["h", "m", "l"], layers
            sizes = {rid: tuple(v["size"]) for rid, v in layers.items()}
            assert len(set(sizes.values())) == 3, sizes
            assert sizes["h"][0] > sizes["m"][0] > sizes["l"][0], sizes
            # its send estimate starts at what the three layers take (whip.js), not at
            # Chromium's 300 kb/s, from which the top layer took ~11 s to start on a clean path
            start = await host.evaluate("""() => {
                const m = /x-google-start-bitrate=(\\d+)/.exec(
                    window.lotcast.publisher?.pc?.remoteDescription?.sdp || '');
                return m ? Number(m[1]) : null;
            }""")
            assert start == 2250, start

            viewers = {rid: SizedViewer(c.origin.url, stream) for rid in ("h", "m", "l")}
            try:
                for rid, viewer in viewers.items():
                    session = await viewer.start()
                    if rid == "h":  # the default is the top layer; the others pin theirs
                        async with httpx.AsyncClient(timeout=10) as http, \
                                subscribed(http, session, ["layers"]) as events:
                            await events.wait("layers")
                            event = dict(events.events[-1][1])
                        listed = event["video"]["layers"]  # type: ignore[index]
                        assert [x.get("encodingId") for x in listed] == ["h", "m", "l"], event
                    else:
                        await viewer.pin(rid)
                for rid, viewer in viewers.items():
                    await wait_for(decoding(viewer, c.origin.url, stream, rid, 10), 45,
                                   f"viewer pinned to {rid} decodes it", log)
                # switch the top viewer down, across and back up, each at a key frame of the
                # target layer after a frame of the old one ended, so its decoder goes on
                top = viewers["h"]
                asked_before = await host_keyframe_requests(host)
                wire_start = len(top.wire)
                switches = ("l", "m", "h")
                allowed = dict.fromkeys(switches, 0)
                for rid in switches:
                    since = len(top.sizes)
                    asked_at = time.monotonic()
                    await top.pin(rid)
                    log.add(f"host outbound before the switch to {rid}: {await outbound(host)}")
                    try:
                        size = await wait_for(decoding(top, c.origin.url, stream, rid, 15), 45,
                                              f"switched viewer decodes {rid}", log)
                    except AssertionError as exc:
                        raise AssertionError(f"{exc}\nhost outbound now: {await outbound(host)}"
                                             ) from None
                    first = since + top.sizes[since:].index(size)
                    allowed[rid] += 1 + repeats_allowed(top.times[first] - asked_at)
                stats = await stream_layers(c.origin.url, stream)
                # the pinned viewers' own switches from the top layer, then this viewer's; plus,
                # if Chromium paused its top layer meanwhile (a low bandwidth estimate or CPU),
                # the moves of its viewers to the middle layer and back (layer_fallback.py)
                fallbacks = await stream_counter(c.origin.url, stream, "layer_fallbacks")
                returns = await stream_counter(c.origin.url, stream, "layer_fallback_returns")
                counts = (stats["l"]["switches_in"], stats["m"]["switches_in"],
                          stats["h"]["switches_in"])
                if fallbacks == 0:
                    assert counts == (2, 2, 1), stats
                else:
                    assert counts[0] >= 2 and counts[1] >= 2 and counts[2] >= 1, stats
                    assert sum(counts) == 5 + fallbacks + returns, (stats, fallbacks, returns)
                # its RTP across the three switches: one numbering, time never going back
                assert wire_problems(top.wire[wire_start:]) == [], len(top.wire)
                # the host's encoder was asked for one key frame per switch, by the layer (and
                # again only while one had not come: repeats_allowed); a fallback off the paused
                # top layer asks the middle one, its return the top one (each with one repeat)
                if fallbacks:
                    allowed["m"] = allowed.get("m", 0) + 2 * fallbacks
                    allowed["h"] = allowed.get("h", 0) + 2 * returns
                asked = requests_since(asked_before, await host_keyframe_requests(host))
                assert all(asked[rid] <= allowed.get(rid, 0) for rid in asked), (
                    asked, allowed, stats)
            finally:
                for viewer in viewers.values():
                    await viewer.stop()

            # through a relay: it pulls every layer from the origin (one pull per lower layer)
            relay0, relay1 = c.relays
            # one viewer stays on relay-0 throughout, so it keeps carrying the stream (without
            # one its pull lingers out 10 s after the pinned viewers leave, and relay-1 would
            # rightly pull from the origin instead: a slow CI machine got there)
            keeper = SizedViewer(relay0.url, stream)
            await keeper.start()
            try:
                await pinned(relay0.url, stream, ["m", "l", None], log, c.origin.url, host)
                stats = await relay_stats(relay0.url)
                (mine,) = [s for s in stats["streams"] if s["id"] == stream]
                assert list(mine["layers"]) == ["h", "m", "l"], mine
                # and across a cascade hop: relay-1 pulls the layers from relay-0, unchanged (once
                # relay-0's heartbeat says it carries the stream, relay-1 cascades from it)
                await wait_for(lambda: carried_by(c.redis_url, "relay-0", stream), 30,
                               "relay-0 registered as carrying the stream", log)
                await pinned(relay1.url, stream, ["l", "m", None], log, relay0.url, host)
                stats = await relay_stats(relay1.url)
                (pull,) = stats["upstreams"]
                assert pull["depth"] == 1 and pull["url"] == relay0.url, pull
            finally:
                await keeper.stop()

            # the watch page on the cascade child: its quality menu lists the layers, and Low /
            # High / Medium switch what Chromium decodes
            page = await open_page(browser, f"{relay1.url}/watch?stream={stream}", log, "viewer")
            await wait_for(playing_on(page, relay1.url, 10), 60, "watch page playing", log)
            await wait_for(lambda: page.is_visible("#quality-wrap"), 20, "quality menu shown", log)
            sizes = {rid: tuple(v["size"]) for rid, v in (await stream_layers(
                relay1.url, stream)).items()}
            await page.evaluate(WATCH_FREEZES)
            before = await page.evaluate("window.__inbound()")
            asked_before = await host_keyframe_requests(host)
            choices = (("low", "l"), ("high", "h"), ("medium", "m"))
            for choice, rid in choices:
                await page.evaluate(f"window.__mark('{choice}')")
                await page.select_option("#quality", choice)

                async def shows(rid: str = rid) -> bool:
                    state = await page_state(page)
                    return (state.get("videoWidth"), state.get("videoHeight")) == sizes[rid]

                await wait_for(shows, 45, f"watch page decodes {choice} {sizes[rid]}", log)
                # 30 frames on: a freeze is counted when the frame after it is rendered
                shown = (await page.evaluate("window.__inbound()"))["framesDecoded"]

                async def decoded_on(shown: int = shown) -> bool:
                    return bool((await page.evaluate("window.__inbound()"))["framesDecoded"]
                                >= shown + 30)

                await wait_for(decoded_on, 30, f"30 frames decoded after {choice}", log)
            after = await page.evaluate("window.__inbound()")
            freezes = await page.evaluate("window.__freezes")
            asked = requests_since(asked_before, await host_keyframe_requests(host))
            layers = await stream_layers(relay1.url, stream)
            marks, resized, gaps = await page.evaluate(
                "[window.__marks, window.__resized, window.__gaps]")
            seen = (f"inbound before {before}, after {after}, freezes [count, s, at ms] {freezes},"
                    f" host asked {asked}, switches asked [choice, at ms] {marks}, frames of a "
                    f"new size [at ms, ms after the one before, width, height] {resized}, "
                    f"gaps over 100 ms [ms, at ms, width, height] {gaps}")
            # each switch started at a key frame of the new layer
            assert after["keyFramesDecoded"] - before["keyFramesDecoded"] >= len(choices), seen
            # no decode error: Chromium asks for a key frame (PLI, or FIR) whenever it cannot
            # decode what it got (a frame without its references, a corrupt one); it asked none
            assert (after["pliCount"], after["firCount"]) == (before["pliCount"],
                                                              before["firCount"]), seen
            # no freeze over 200 ms at a switch. Chromium counts a freeze (freezeCount, its
            # length in totalFreezesDuration) when it renders a frame that comes max(3 x, +150 ms)
            # later than the average frame interval, the freeze being that interval. The switch's
            # own gap ends at the first frame of the new layer's size: a freeze counted by a
            # 50 ms stats sample from 100 ms before that frame to 250 ms after it (frame
            # callbacks and stats each lag a little) is the switch's, and each sample whose
            # count went up by one gives that freeze's exact length (two in one sample: their
            # sum, an upper bound for each). Freezes later on are the new layer's own frame rate
            # (Chromium lowers the top layer's under CPU or bandwidth limits), not the switch.
            allowed = {rid: 0 for _, rid in choices}
            for (choice, asked_at), (_, rid) in zip(marks, choices, strict=True):
                shown_at = next((at for at, _gap, width, height in resized
                                 if at >= asked_at and (width, height) == sizes[rid]), None)
                assert shown_at is not None, f"{choice}: {seen}"
                at_switch = [duration for _count, duration, at in freezes
                             if shown_at - 100 <= at <= shown_at + 250]
                assert all(duration <= 0.2 for duration in at_switch), f"{choice}: {seen}"
                allowed[rid] += 1 + repeats_allowed((shown_at - asked_at) / 1000)
            # the host's encoder: one key-frame request per switch, to the layer switched to
            # (relay-1 asks relay-0, which asks the origin, which asks the host; each again
            # only while none has come: repeats_allowed)
            assert all(asked[rid] <= allowed.get(rid, 0) for rid in asked), (
                f"allowed {allowed}, {seen}, relay-1's layers' key-frame requests "
                f"{ {rid: v['keyframe_requests'] for rid, v in layers.items()} }")

