"""A busy hub never sends batches above its batch rate.

Each batch's fan-out takes ~0.8 of the flush interval here (every socket write is slow and each
takes its own loop turn), the first one longer than the interval, while events keep arriving.
A flush timer left pending when a batch went out directly (after a fan-out) used to fire right
after it, so batches followed each other at the fan-out's pace, above the rate (seen at 2,000
watchers in load/ws_bench.py: 13.7 and 24 batches/s with a 100 ms interval).
"""

from __future__ import annotations

import asyncio
import itertools
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
SOCKETS = 5


class SlowSocket:
    """A socket whose writes take `cost` seconds of CPU (the first batch's take `first`); every
    socket notes, in the shared `starts`, when each batch's first copy was handed to a socket."""

    user_id = ""

    def __init__(self, first: float, cost: float, starts: dict[bytes, float]) -> None:
        self.first, self.cost, self.starts = first, cost, starts

    def push(self, frame: bytes) -> None:
        if b"events" not in frame:
            return
        self.starts.setdefault(frame, time.perf_counter())
        cost = self.first if len(self.starts) == 1 else self.cost
        began = time.perf_counter()
        while time.perf_counter() - began < cost:
            pass

    def close_soon(self, code: CloseCode, reason: str) -> None:
        pass


@pytest.mark.timeout(60)
async def test_a_busy_hub_keeps_its_batch_rate(redis_client: aioredis.Redis,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "FANOUT_CHUNK", 1)  # every socket write takes a loop turn
    functions = RoomFunctions(redis_client, 100)
    hub = RoomHub("rate", RoomLog(redis_client, functions), INTERVAL, 0.2)
    starts: dict[bytes, float] = {}  # batch -> when its fan-out began (dicts keep order)
    socks = [SlowSocket(0.03, 0.8 * INTERVAL / SOCKETS, starts) for _ in range(SOCKETS)]
    for s in socks:
        hub.attach(s)
    await hub.start()
    for offset in range(1, 701):  # an event about every millisecond
        hub._append(offset, msgpack.packb({"type": "x", "offset": offset}))
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.3)  # the last batch goes out
    assert len(starts) >= 10
    gaps_ms = [round((b - a) * 1000, 1) for a, b in itertools.pairwise(starts.values())]
    assert min(gaps_ms) >= 0.9 * INTERVAL * 1000, sorted(gaps_ms)[:10]
    await hub.close()
