"""A relay that replaces its pull of a simulcast stream hands its lower layers over make before
break: the new pull's layer pulls are attached pending, the old ones keep feeding their viewers
until each new layer's first key frame, and only then is the old pull closed (lotcast/media/
layer_feed.py; the top layer does the same through MediaStream.attach_source).

Real parts: a Chromium host page publishing three layers, an origin and two relay processes
(relay-1 cascades from relay-0), an aiortc viewer on relay-1 pinned to the lowest layer. relay-0
drains (SIGTERM): relay-1 re-parents to the origin while the viewer keeps decoding its layer."""

from __future__ import annotations

import signal
from typing import Any

import pytest
from browser_support import PageLog, chromium, cluster, open_page, wait_for
from test_browser_simulcast import SizedViewer, carried_by, relay_stats, stream_layers, wire_problems

from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(240)


def decodes_low_layer(viewer: SizedViewer, base_url: str, stream: str, frames: int) -> Any:
    """Until the last ``frames`` frames the viewer decoded from now on have the size of the low
    layer's key frames at ``base_url`` (the other layers need not flow: Chromium pauses its top
    layer when its bandwidth estimate or the CPU cannot carry it)."""
    start = len(viewer.sizes)

    async def check() -> tuple[int, int] | None:
        size = (await stream_layers(base_url, stream)).get("l", {}).get("size")
        recent = viewer.sizes[start:][-frames:]
        if size and len(recent) == frames and all(s == tuple(size) for s in recent):
            return tuple(size)
        return None

    return check


def _stream_of(stats: dict[str, Any], stream: str) -> dict[str, Any]:
    (mine,) = [s for s in stats["streams"] if s["id"] == stream]
    return mine


async def test_re_parent_hands_each_lower_layer_over_at_its_key_frame(
        redis_server: RedisServer) -> None:
    stream = "simulcast-handover"
    log = PageLog()
    with cluster(redis_server.url, relays=2, relay_args=["--origin-fanout", "1"]) as c:
        relay0, relay1 = c.relays
        async with chromium() as browser:
            host = await open_page(
                browser, f"{c.origin.url}/host?stream={stream}&simulcast=1#token={c.host_token()}",
                log, "host")
            await host.click("#go-live")

            async def three_layers() -> bool:
                layers = await stream_layers(c.origin.url, stream)
                return len([v for v in layers.values() if v.get("size")]) == 3

            await wait_for(three_layers, 60, "three layers with key frames", log)
            keeper = SizedViewer(relay0.url, stream)  # relay-0 carries the stream meanwhile
            viewer = SizedViewer(relay1.url, stream)
            try:
                await keeper.start()
                await wait_for(lambda: carried_by(c.redis_url, "relay-0", stream), 30,
                               "relay-0 registered as carrying the stream", log)
                await viewer.start()
                await viewer.pin("l")
                await wait_for(decodes_low_layer(viewer, relay1.url, stream, 10), 45,
                               "relay-1 viewer decodes the low layer", log)
                before = await relay_stats(relay1.url)
                (pull,) = before["upstreams"]
                moves = {k: before[k] for k in ("reparents", "stall_repulls", "origin_moves")}
                assert pull["depth"] == 1 and pull["url"] == relay0.url, (pull, moves)
                # each lower layer (m, l) was first fed by a pull of its own from relay-0
                assert _stream_of(before, stream)["layer_switch_ends"] == {"first": 2}, before

                wire_from = len(viewer.wire)
                relay0.signal(signal.SIGTERM)  # a draining parent: its children re-parent

                async def re_parented() -> dict[str, Any] | None:
                    stats = await relay_stats(relay1.url)
                    ends = _stream_of(stats, stream).get("layer_switch_ends", {})
                    upstreams = stats["upstreams"]
                    moved = (len(upstreams) == 1 and upstreams[0]["url"] == c.origin.url
                             and ends.get("first", 0) + ends.get("keyframe", 0)
                             + ends.get("timeout", 0) + ends.get("old_gone", 0) >= 4)
                    return stats if moved else None

                after = await wait_for(re_parented, 45, "relay-1 pulls every layer from the "
                                       "origin", log)
                ends = _stream_of(after, stream)["layer_switch_ends"]
                # make before break: the new m and l sources took over while the old ones still
                # fed (at their key frames, or at the switch bound on a slow machine), never
                # because the old one had gone first
                assert ends.get("old_gone", 0) == 0, ends
                assert ends.get("keyframe", 0) + ends.get("timeout", 0) == 2, ends
                print(f"layer handover on relay-1: {ends}")
                # the viewer goes on decoding its layer, and the RTP it got stayed continuous
                await wait_for(decodes_low_layer(viewer, relay1.url, stream, 10), 45,
                               "relay-1 viewer still decodes the low layer", log)
                assert wire_problems(viewer.wire[wire_from:]) == []
            except BaseException:
                for proc in (relay0, relay1):
                    print(f"--- {proc.command} ---\n" + "".join(proc.output[-30:]))
                raise
            finally:
                await viewer.stop()
                await keeper.stop()
