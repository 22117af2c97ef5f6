"""Real browser, real `lotcast up` (issue 7 item 10): viewer pages opened from the URL `up` prints
play again after kill -9 of the relay that served them (and after it hangs, when only the other
relays can serve them: they learnt those from placement answers, not from the page URL);
viewers of a cascade child of the killed relay keep playing while
that child re-parents. The gaps are measured in the pages (framesDecoded) and printed."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from browser_support import PageLog, chromium, open_page, page_state, player_trace, trace_player, wait_for
from media_support import Publisher
from up_support import UpProcess

from lotcast import keys
from lotcast.auth import Role
from lotcast.ops.node import NodeInfo

STREAM = "main"

# Every 50 ms: the wall-clock time of each increase of framesDecoded, tagged with the peer
# connection it came from (a new session restarts the counter).
_FRAMES_JS = """() => {
    window.__inc = [];
    let pc = null, gen = 0, last = 0;
    setInterval(async () => {
        const cur = window.lotcast.pc;
        if (!cur) return;
        if (cur !== pc) { pc = cur; gen += 1; last = 0; }
        let decoded = 0;
        try {
            (await cur.getStats()).forEach((s) => {
                if (s.type === 'inbound-rtp' && s.kind === 'video') decoded = s.framesDecoded || 0;
            });
        } catch { return; }
        if (decoded > last) {
            window.__inc.push([performance.timeOrigin + performance.now(), gen, decoded - last]);
            last = decoded;
        }
    }, 50);
}"""


async def _increases(page: Any) -> list[list[float]]:
    return await page.evaluate("window.__inc")  # type: ignore[no-any-return]


def _frames_after(incs: list[list[float]], t_ms: float, gen_above: float = 0) -> float:
    return sum(n for t, g, n in incs if t > t_ms and g > gen_above)


def _max_gap(incs: list[list[float]], start_ms: float, end_ms: float) -> float:
    times = [t for t, _, _ in incs if start_ms <= t <= end_ms]
    return max((b - a for a, b in itertools.pairwise(times)), default=float("inf"))


def _gen_at(incs: list[list[float]], t_ms: float) -> float:
    return max((g for t, g, _ in incs if t <= t_ms), default=0)


async def _stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
        return (await http.get(f"{url}/api/stats")).json()  # type: ignore[no-any-return]


@pytest.mark.timeout(240)
async def test_pages_from_the_printed_url_survive_kill_9_of_their_relay(tmp_path: Path) -> None:
    # origin fan-out 1: the first relay carrying the stream pulls from the origin, the next one
    # from that relay, so relay-1 is a cascade child of relay-0 (the relay we kill).
    up = UpProcess(tmp_path / "data", relays=3, env={"LOTCAST_ORIGIN_FANOUT": "1"})
    log = PageLog()
    publisher: Publisher | None = None
    try:
        up.start()
        viewer_url = re.search(r"Viewer page:\s+(\S+)", up.text())
        assert viewer_url, up.text()
        relay0, relay1 = up.urls["relay-0"], up.urls["relay-1"]
        assert viewer_url.group(1) == f"{relay0}/watch?stream={STREAM}"
        publisher = Publisher(up.urls["broadcaster"], STREAM, up.authority().mint(Role.HOST, "host", "Host"))
        await publisher.start()
        relays = sorted(up.urls[f"relay-{i}"] for i in range(3))
        names = {url: name for name, url in up.urls.items()}
        async with chromium() as browser:
            pages = [await open_page(browser, viewer_url.group(1), log, f"viewer{i}") for i in range(2)]
            for i, page in enumerate(pages):
                await page.evaluate(_FRAMES_JS)
                await trace_player(page)
                await wait_for(lambda p=page: _playing(p, relay0, 20), 60, f"viewer{i} on relay-0", log)
            # relay-1 picks its upstream from the registry: wait until relay-0's heartbeat says
            # it carries the stream.
            await wait_for(lambda: _carries(up.urls["redis"], "relay-0"), 30,
                           "relay-0 listed as carrying the stream", log)
            child = await open_page(browser, f"{relay1}/watch?stream={STREAM}", log, "child")
            await child.evaluate(_FRAMES_JS)
            await wait_for(lambda: _playing(child, relay1, 20), 60, "child viewer on relay-1", log)
            upstream = (await _stats(relay1))["upstreams"]
            assert [u["url"].rstrip("/") for u in upstream] == [relay0], upstream
            # Every page has learnt every serving relay from the placement answers.
            for page in [*pages, child]:
                await wait_for(lambda p=page: _knows(p, relays), 20, "serving relays listed", log)
            sessions_before = (await page_state(child))["sessions"]

            await asyncio.sleep(1)
            killed_ms = time.time() * 1000
            mark = up.kill_child("relay-0")
            gens = [_gen_at(await _increases(p), killed_ms) for p in pages]

            async def all_playing_again() -> bool:
                for page, gen in zip(pages, gens, strict=True):
                    if _frames_after(await _increases(page), killed_ms, gen) < 30:
                        return False
                return True

            await wait_for(all_playing_again, 60, "every relay-0 page decoding again", log)
            for i, (page, gen) in enumerate(zip(pages, gens, strict=True)):
                incs = await _increases(page)
                back = min(t for t, g, _ in incs if t > killed_ms and g > gen)
                state = await page_state(page)
                print(f"viewer{i}: played again {(back - killed_ms) / 1000:.2f} s after kill -9 of "
                      f"relay-0 (longest stall {_max_gap(incs, killed_ms - 1000, back + 1) / 1000:.2f} s),"
                      f" now on {names[state['relay']]}, reconnects {state['reconnects']}")
                print(f"viewer{i} trace:", await player_trace(page))
                assert state["media"] == "connected" and state["sessions"] >= 2

            # The cascade child re-parented on its own; its viewer never left it.
            async def reparented() -> bool:
                stats = await _stats(relay1)
                ups = [u["url"].rstrip("/") for u in stats["upstreams"]]
                return bool(stats["reparents"] >= 1 and ups and relay0 not in ups)

            await wait_for(reparented, 30, "relay-1 re-parented away from relay-0", log)
            await wait_for(lambda: _frames_grew(child, killed_ms, 60), 30, "child viewer decoding", log)
            incs = await _increases(child)
            stall = _max_gap(incs, killed_ms - 1000, killed_ms + 10_000)
            state = await page_state(child)
            print(f"cascade child viewer (relay-1): longest stall {stall / 1000:.2f} s around the kill; "
                  f"relay-1 now pulls from {(await _stats(relay1))['upstreams']}")
            assert state["relay"] == relay1 and state["sessions"] == sessions_before

            # Meanwhile `up` restarted relay-0 on its port.
            await asyncio.to_thread(up.wait_restart, "relay-0", 60, mark)

            # A relay that hangs (SIGSTOP: up sees it alive, nobody restarts it): its pages can
            # only play again through the other relays they learnt about.
            hung = (await page_state(pages[0]))["relay"]
            hung_name = names[hung]
            on_hung = [p for p in pages if (await page_state(p))["relay"] == hung]
            stopped_ms = time.time() * 1000
            gens = [_gen_at(await _increases(p), stopped_ms) for p in on_hung]
            os.kill(up.pids[hung_name], signal.SIGSTOP)
            try:
                async def moved() -> bool:
                    for page, gen in zip(on_hung, gens, strict=True):
                        state = await page_state(page)
                        if state["relay"] == hung or \
                                _frames_after(await _increases(page), stopped_ms, gen) < 30:
                            return False
                    return True

                try:
                    await wait_for(moved, 60, f"pages of the hung {hung_name} playing elsewhere", log)
                except BaseException:
                    for page in on_hung:
                        print(await page_state(page), await player_trace(page))
                    raise
                for page, gen in zip(on_hung, gens, strict=True):
                    incs = await _increases(page)
                    back = min(t for t, g, _ in incs if t > stopped_ms and g > gen)
                    print(f"{hung_name} hung (SIGSTOP): page played again on "
                          f"{names[(await page_state(page))['relay']]} "
                          f"{(back - stopped_ms) / 1000:.2f} s later")
            finally:
                os.kill(up.pids[hung_name], signal.SIGCONT)
    except BaseException:
        print(log.tail(150))
        print(up.text(150))
        raise
    finally:
        if publisher is not None:
            await publisher.stop()
        up.close()


async def _playing(page: Any, relay: str, frames: int) -> bool:
    s = await page_state(page)
    incs = await _increases(page)
    return bool(s["relay"] == relay and s["media"] == "connected" and _frames_after(incs, 0) >= frames)


async def _carries(redis_url: str, node_id: str) -> bool:
    client = aioredis.Redis.from_url(redis_url)
    try:
        fields = await client.hgetall(keys.node(node_id))
    finally:
        await client.aclose()
    return bool(fields) and NodeInfo.from_fields(fields).carries(STREAM)


async def _knows(page: Any, relays: list[str]) -> bool:
    return sorted((await page_state(page))["serving"]) == relays


async def _frames_grew(page: Any, t_ms: float, frames: int) -> bool:
    return _frames_after(await _increases(page), t_ms) >= frames
