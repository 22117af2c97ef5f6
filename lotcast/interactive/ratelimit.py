"""Per-connection token buckets (local to a node); per-user limits live in Redis (lua/common.lua)."""

from __future__ import annotations

import time


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self._last = time.monotonic()

    def take(self, now: float | None = None) -> bool:
        """Spend one token if there is one. A rate <= 0 never limits."""
        if self.rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def retry_ms(self) -> int:
        return max(1, int((1 - self.tokens) * 1000 / self.rate)) if self.rate > 0 else 0


class FloodGuard:
    """Refuses messages beyond the per-connection rate; too many refusals means close (4029)."""

    def __init__(self, rate: float, burst: int, violation_rate: float = 5.0,
                 violation_burst: int = 50) -> None:
        self.messages = TokenBucket(rate, burst)
        self.violations = TokenBucket(violation_rate, violation_burst)

    def admit(self) -> bool:
        return self.messages.take()

    def record_violation(self) -> bool:
        """Returns False once the connection has flooded long enough to be closed."""
        return self.violations.take()
