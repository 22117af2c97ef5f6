"""ICE consent freshness (RFC 7675) for every viewer of a process on one clock.

A sender must keep checking that its peer still wants the media: a Binding request on the
selected pair every ~5 s, and consent expires after 30 s without an answer. aioice does this
with a task per connection that sleeps, builds the request through its generic `Message` and
waits in a `Transaction` (a future and a timer per check). With thousands of viewers that is
the largest per-viewer fixed cost left (docs/benchmarks.md, "idle viewer"). Here one timer per
process sends every due check, built in one pass (`stun_fast.binding_request`), and hears the
answers through aioice's own transaction table (`aiortc_hooks.ConsentTarget`), so an idle
viewer costs one datagram out and one in per interval, and no task.

Same rules as aioice: a check every 0.8 to 1.2 CONSENT_INTERVAL_S (jittered so checks do not
bunch), no retransmission, CONSENT_FAILURES unanswered checks in a row close the connection.
`LOTCAST_CONSENT_INTERVAL_S` shortens the interval (tests).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import random
import time

from lotcast.media.aiortc_hooks import ConsentTarget
from lotcast.media.stun_fast import binding_request

logger = logging.getLogger(__name__)

CONSENT_INTERVAL_S = float(os.environ.get("LOTCAST_CONSENT_INTERVAL_S", "5"))
CONSENT_FAILURES = 6  # aioice's: 30 s at the default interval
# An answer later than this counts as a missed check (aioice: its STUN RTO with no
# retransmission); never longer than the interval, so one check is in flight at a time.
ANSWER_TIMEOUT_S = min(1.0, CONSENT_INTERVAL_S * 0.8)
TICK_S = min(0.25, CONSENT_INTERVAL_S / 4)


class _Check:
    """One connection's consent state."""

    __slots__ = ("at_deadline", "failures", "in_flight", "target")

    def __init__(self, target: ConsentTarget) -> None:
        self.target = target
        self.failures = 0
        self.in_flight: bytes | None = None  # transaction id of the check awaiting its answer
        self.at_deadline = False  # its next turn is the last check's answer deadline


class ConsentClock:
    """Sends every registered connection's consent checks from one timer."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, _Check]] = []  # (when, tiebreak, check)
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.checks = 0
        self.sent = 0
        self.answered = 0
        self.missed = 0
        self.expired = 0

    def add(self, target: ConsentTarget) -> None:
        """Check ``target``'s consent from now on (its first check one jittered interval on)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (tests): the old timer died with the old one
            self._loop, self._timer, self._due = loop, None, []
        check = _Check(target)
        self.checks += 1
        self._schedule(check, time.monotonic() + _interval())
        if self._timer is None:
            self._timer = loop.call_later(TICK_S, self._tick)

    def _schedule(self, check: _Check, when: float) -> None:
        heapq.heappush(self._due, (when, next(self._order), check))

    def _tick(self) -> None:
        now = time.monotonic()
        due = self._due
        while due and due[0][0] <= now:
            _, _, check = heapq.heappop(due)
            self._run(check, now)
        self._timer = None
        if due and self._loop is not None:
            self._timer = self._loop.call_later(TICK_S, self._tick)

    def _run(self, check: _Check, now: float) -> None:
        target = check.target
        if target.closed:
            self._drop(check)
            return
        if check.at_deadline:
            check.at_deadline = False
            if check.in_flight is not None:  # no answer in time: a missed check
                target.forget(check.in_flight)
                check.in_flight = None
                check.failures += 1
                self.missed += 1
            if check.failures >= CONSENT_FAILURES:
                logger.info("consent to send expired (%d checks unanswered)", check.failures)
                self.expired += 1
                self._drop(check)
                target.close()
                return
            self._schedule(check, now + max(0.0, _interval() - ANSWER_TIMEOUT_S))
            return
        transaction_id = random.randbytes(12)
        check.in_flight = transaction_id

        def answered(ok: bool, check: _Check = check, transaction_id: bytes = transaction_id) -> None:
            if check.in_flight != transaction_id:
                return
            check.target.forget(transaction_id)
            check.in_flight = None
            if ok:
                check.failures = 0
                self.answered += 1
            else:  # an error response: the peer refuses; counted as a missed check
                check.failures += 1
                self.missed += 1

        target.expect(transaction_id, answered)
        try:
            target.send(binding_request(transaction_id, target.username, target.priority,
                                        target.controlling, target.tie_breaker, target.password))
        except OSError as exc:  # the socket is going away; the next turn notices the close
            logger.debug("consent check not sent: %r", exc)
        self.sent += 1
        check.at_deadline = True
        self._schedule(check, now + ANSWER_TIMEOUT_S)

    def _drop(self, check: _Check) -> None:
        if check.in_flight is not None:
            check.target.forget(check.in_flight)
            check.in_flight = None
        self.checks -= 1

    def counters(self) -> dict[str, int]:
        return {"consent_connections": self.checks, "consent_checks_sent": self.sent,
                "consent_checks_answered": self.answered, "consent_checks_missed": self.missed,
                "consent_expired": self.expired}


def _interval() -> float:
    return CONSENT_INTERVAL_S * (0.8 + 0.4 * random.random())


_clock = ConsentClock()


def consent_clock() -> ConsentClock:
    """This process's clock (one per process, like its UDP mux)."""
    return _clock


def lean_consent_enabled() -> bool:
    """One clock for every viewer's checks (default), or aioice's task per connection
    (LOTCAST_LEAN_CONSENT=0, for comparison)."""
    return os.environ.get("LOTCAST_LEAN_CONSENT", "1") != "0"
