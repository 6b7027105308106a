"""Timing without I/O: the one backoff and the one token bucket of OCO and its plugins.

Both read trio's clock (:func:`trio.current_time`), so tests drive them with
``autojump_clock`` instead of sleeping; neither reads it until it is first used, so
either may be built outside ``trio.run`` (in a config object's constructor, say).

Exported from :mod:`oco_core.plugin` for adapter and store distributions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable

import trio


class Backoff:
    """Exponential backoff between attempts at something that may fail for a while
    (a connection, a process, a compare-and-set).

    The nominal delay starts at ``initial`` and is multiplied by ``factor`` after each
    delay, up to ``maximum``. The jitter rule, the same at every call site: each delay
    is drawn uniformly from ``[(1 - jitter) * d, d]``, where ``d`` is the nominal delay.
    So ``maximum`` is a true upper bound (an operator's ``restart_backoff_max`` is
    never exceeded), and many clients dropped by one restart come back spread over the
    last ``jitter`` fraction of each step instead of all in the same second.
    ``jitter=0`` waits exactly ``d`` (a log line can name the next try), ``0.5`` is the
    usual "equal jitter", ``1`` is "full jitter" (for contending compare-and-set
    writers, where spreading out matters more than waiting). While
    ``jitter < 1 - 1 / factor`` (0.5 for the default factor) successive delays below
    ``maximum`` never overlap, so each is longer than the last.

    After a success call :meth:`reset`; or pass ``healthy_after``: an attempt that ran
    that many seconds (from the end of the previous delay to the next call of
    :meth:`next_delay`) resets the delay by itself, as a supervisor wants for a process
    that ran for an hour before it crashed.
    """

    def __init__(
        self,
        initial: float,
        maximum: float,
        factor: float = 2.0,
        *,
        jitter: float = 0.5,
        healthy_after: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if initial < 0 or maximum <= 0 or factor < 1:
            raise ValueError(
                f"a backoff needs initial >= 0, maximum > 0 and factor >= 1 "
                f"(got initial={initial}, maximum={maximum}, factor={factor})"
            )
        if not 0 <= jitter <= 1:
            raise ValueError(f"a backoff's jitter is a fraction of the delay, from 0 to 1 (got {jitter})")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self.healthy_after = healthy_after
        self._rng = rng or random.Random()
        self._nominal = min(initial, maximum)
        #: When the current attempt began (trio's clock); None until first needed.
        self._began: float | None = None

    @property
    def nominal(self) -> float:
        """The nominal delay the next :meth:`next_delay` jitters."""
        return self._nominal

    def reset(self) -> None:
        """Start from the initial delay again (after an attempt that worked)."""
        self._nominal = min(self.initial, self.maximum)

    def next_delay(self) -> float:
        """The delay before the next attempt; each call grows the next one. Sleep it
        right away: with ``healthy_after`` the next attempt is taken to begin when this
        delay ends."""
        # The clock is read only when needed: a backoff without healthy_after also
        # serves code outside trio (a compare-and-set retried in a worker thread).
        now: float | None = None
        if self.healthy_after is not None:
            now = trio.current_time()
            # The first attempt is not measured: its delay is the initial one anyway.
            if self._began is not None and now - self._began >= self.healthy_after:
                self.reset()
        nominal = self._nominal
        self._nominal = min(self.maximum, nominal * self.factor)
        delay = self._rng.uniform((1 - self.jitter) * nominal, nominal)
        if now is not None:
            self._began = now + delay
        return delay

    async def sleep(self) -> float:
        """Sleep for :meth:`next_delay` (cancellably) and return how long that was."""
        delay = self.next_delay()
        await trio.sleep(delay)
        return delay


class TokenBucket:
    """A rate limit: up to ``capacity`` at once, then ``per_second`` on average.

    It starts full. :meth:`take` never waits, for callers that refuse what is over the
    limit (a callback's sends, a person's commands); :meth:`wait` waits, for a caller
    that paces instead (an adapter's outgoing lines). Waiting does not reserve: with
    several tasks waiting on one bucket, the order they take in is not the order they
    came in, so a pacer that must keep order has a single consumer.
    """

    def __init__(self, capacity: float, per_second: float) -> None:
        if capacity < 1 or per_second <= 0:
            raise ValueError(f"a token bucket needs capacity >= 1 and per_second > 0 (got {capacity} and {per_second})")
        self.capacity = capacity
        self.per_second = per_second
        self._tokens = float(capacity)
        #: trio's clock at the last refill; None until first used.
        self._updated: float | None = None

    def _refill(self) -> None:
        now = trio.current_time()
        if self._updated is not None:
            self._tokens = min(float(self.capacity), self._tokens + (now - self._updated) * self.per_second)
        self._updated = now

    def delay(self, count: float = 1) -> float:
        """Seconds until ``count`` tokens are there: 0 when they are, infinity when
        ``count`` exceeds the capacity (it can never fit)."""
        self._refill()
        if count > self.capacity:
            return math.inf
        return 0.0 if self._tokens >= count else (count - self._tokens) / self.per_second

    def take(self, count: float = 1) -> float:
        """Take ``count`` tokens and return 0, or take none and return :meth:`delay`."""
        delay = self.delay(count)
        if delay == 0:
            self._tokens -= count
        return delay

    async def wait(self, count: float = 1) -> None:
        """Wait (cancellably) until ``count`` tokens are there, without taking them;
        raises ValueError when ``count`` exceeds the capacity."""
        while (delay := self.delay(count)) > 0:
            if delay == math.inf:
                raise ValueError(f"{count} tokens can never fit a bucket of {self.capacity}")
            # A loop, not one sleep: the clock's float arithmetic may leave a sliver missing.
            await trio.sleep(delay)


class Throttle:
    """At most one of something (a log line, an audit record) per key every ``window``
    seconds, counting what it held back meanwhile: a client failing in a loop cannot
    flood the log. Remembers at most ``max_keys`` keys (then starts afresh)."""

    def __init__(self, window: float, max_keys: int = 10_000) -> None:
        self.window = window
        self._max_keys = max_keys
        #: By key: trio's clock when one was last let through, and how many were held since.
        self._seen: dict[Hashable, tuple[float, int]] = {}

    def allow(self, key: Hashable) -> int | None:
        """None when this one is held back (and counted); else how many were held back
        since the last one let through."""
        now = trio.current_time()
        last, held = self._seen.get(key, (-math.inf, 0))
        if now - last < self.window:
            self._seen[key] = (last, held + 1)
            return None
        if len(self._seen) >= self._max_keys:
            self._seen.clear()
        self._seen[key] = (now, 0)
        return held
