"""AckWriteDelays: how long a reply waited between its Redis Function's answer and its write.

Measured per `ack`/`error` that answers a Function call: from the moment the session's task has
the decoded reply to the moment the reply's bytes are in the socket's transport (written at once
on the direct path, or by the outbox's send when earlier frames of the same socket were still
queued: order on one socket comes first). The wait between the reply reaching the node and the
session's task resuming is one event-loop turn at most; the hubs' `fanout_turn_max_ms` bounds it.

Kept as fixed buckets in the node's `/interactive/stats` (`ack_write`), so a reader computes
percentiles from the difference of two snapshots (load/ws_bench.py does). `Delays` is the same
histogram for other waits (the hubs' `flush_late`: how late their batch timer fired, i.e. the
node's event-loop lag, sampled at the batch rate).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# upper bounds in ms; the last bucket is everything above the last bound
BOUNDS_MS = (0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0,
             1000.0)


@dataclass
class Delays:
    """Fixed-bucket delays (ms): counts per bucket of BOUNDS_MS, total, sum and max."""

    bounds_ms: list[float] = field(default_factory=lambda: list(BOUNDS_MS))
    counts: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS_MS) + 1))
    total: int = 0
    sum_ms: float = 0.0
    max_ms: float = 0.0

    def add(self, seconds: float) -> None:
        ms = seconds * 1000
        self.counts[bisect.bisect_left(self.bounds_ms, ms)] += 1
        self.total += 1
        self.sum_ms += ms
        if ms > self.max_ms:
            self.max_ms = ms


@dataclass
class AckWriteDelays(Delays):
    queued: int = 0  # of which waited in the outbox behind earlier frames of the same socket

    def observe(self, seconds: float, queued: bool) -> None:
        self.add(seconds)
        if queued:
            self.queued += 1
