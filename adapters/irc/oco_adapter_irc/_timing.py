"""Timing without I/O: the token bucket for outgoing lines and the reconnect backoff.

Both read trio's clock, so tests drive them with ``autojump_clock`` instead of sleeping.
"""

from __future__ import annotations

import random

import trio


class TokenBucket:
    """Up to ``burst`` lines at once, then ``per_second`` on average.

    One task (the connection's writer) takes tokens, so waiting and taking need no lock;
    that single consumer is also what keeps lines in order.
    """

    def __init__(self, burst: int, per_second: float) -> None:
        if burst < 1 or per_second <= 0:
            raise ValueError("a token bucket needs burst >= 1 and per_second > 0")
        self.burst = burst
        self.per_second = per_second
        self._tokens = float(burst)
        self._updated = trio.current_time()

    def _refill(self) -> None:
        now = trio.current_time()
        self._tokens = min(float(self.burst), self._tokens + (now - self._updated) * self.per_second)
        self._updated = now

    def delay(self) -> float:
        """Seconds until a token is available (0 when one is)."""
        self._refill()
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.per_second

    async def wait(self) -> None:
        """Wait (cancellably) until a token is available, without taking it."""
        # One sleep suffices: this bucket has a single consumer, so nobody else takes
        # the token that refills meanwhile.
        delay = self.delay()
        if delay > 0:
            await trio.sleep(delay)

    def take(self) -> None:
        """Take one token; call after :meth:`wait`."""
        self._refill()
        self._tokens -= 1


class Backoff:
    """Exponential backoff with "equal jitter": the n-th delay is drawn from
    ``[d/2, d]`` where ``d = min(max_delay, initial * factor**n)``, so that many bots
    dropped by one server restart do not all come back in the same second, while each
    still waits at least half the nominal delay."""

    def __init__(self, initial: float, maximum: float, factor: float = 2.0, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.attempts = 0
        self._rng = rng or random.Random()

    def reset(self) -> None:
        """Start from the initial delay again (after a connection that worked)."""
        self.attempts = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; each call grows it."""
        nominal = min(self.maximum, self.initial * self.factor**self.attempts)
        if nominal < self.maximum:
            # Stop growing once at the cap (and so never overflow the power).
            self.attempts += 1
        return self._rng.uniform(nominal / 2, nominal)
