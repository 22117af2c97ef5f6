"""A stretched batch's drain never blocks the event loop for its whole length.

Past BATCH_STRETCH_MAX the hub finishes the pending fan-out ahead of newer batches. It used to do
so in one loop turn: at 10,000 watchers that turn took ~0.6 s, and every ack and Redis reply on
the node waited for it. Now the drain runs in bounded turns: other callbacks (here a ticker task
standing in for acks) run between them. Counted, not timed: ticks seen while the last half of a
batch's sockets are written.
"""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
import redis.asyncio as aioredis

from lotcast.interactive import hub as hub_module
from lotcast.interactive.functions import RoomFunctions
from lotcast.interactive.hub import RoomHub
from lotcast.interactive.protocol import CloseCode
from lotcast.interactive.roomlog import RoomLog

INTERVAL = 0.05
SOCKETS = 400
COST = 0.002  # CPU seconds per socket write: one batch's fan-out ~0.8 s, far past the stretch


class SlowSocket:
    user_id = ""

    def __init__(self, pushes: dict[bytes, list[float]]) -> None:
        self.pushes = pushes

    def push(self, frame: bytes) -> None:
        if b"events" not in frame:
            return
        self.pushes.setdefault(frame, []).append(time.perf_counter())
        began = time.perf_counter()
        while time.perf_counter() - began < COST:
            pass

    def close_soon(self, code: CloseCode, reason: str) -> None:
        pass


@pytest.mark.timeout(60)
async def test_a_stretch_drain_lets_the_loop_run_between_its_turns(
        redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "BATCH_STRETCH_MAX", 0.2)
    # the turn's clock is read once per slice: slices of slow sockets as short as native ones
    monkeypatch.setattr(hub_module, "FANOUT_SLICE", 4)
    functions = RoomFunctions(redis_client, 100)
    hub = RoomHub("drain", RoomLog(redis_client, functions), INTERVAL, 0.2)
    pushes: dict[bytes, list[float]] = {}
    for _ in range(SOCKETS):
        hub.attach(SlowSocket(pushes))
    await hub.start()
    ticks: list[float] = []
    running = True

    async def ticker() -> None:
        while running:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    try:
        deadline = time.monotonic() + 30
        offset = 0
        while hub.stats.stretch_drains < 2 and time.monotonic() < deadline:
            offset += 1
            hub._append(offset, msgpack.packb({"type": "x", "offset": offset}))
            await asyncio.sleep(0.01)
        assert hub.stats.stretch_drains >= 2, hub.stats
        while hub._fanout_jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        running = False
        await task
        await hub.close()
    complete = [times for times in pushes.values() if len(times) == SOCKETS]
    assert len(complete) >= 2
    for times in complete:
        second_half = times[SOCKETS // 2], times[-1]
        between = sum(1 for t in ticks if second_half[0] < t < second_half[1])
        # one 20 ms drain turn writes ~10 sockets: ~20 turns in the second half of a batch
        assert between >= 5, (between, [round((t - times[0]) * 1000) for t in second_half])
