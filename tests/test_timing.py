"""The one backoff and the one token bucket (oco_core.plugin.Backoff, TokenBucket), on
trio's autojump clock: no test here sleeps for real."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import trio
import trio.testing

from oco_core._timing import Throttle
from oco_core.plugin import Backoff, TokenBucket

# -- TokenBucket -------------------------------------------------------------------------


async def test_token_bucket_paces_after_the_burst(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(5, per_second=2.0)
    start = trio.current_time()
    times = []
    for _ in range(25):
        await bucket.wait()
        assert bucket.take() == 0
        times.append(trio.current_time() - start)
    assert times[:5] == [0.0] * 5  # the burst goes at once
    gaps = [b - a for a, b in itertools.pairwise(times[4:])]
    assert all(gap == pytest.approx(0.5) for gap in gaps)  # then two a second
    assert times[-1] == pytest.approx(10.0)


async def test_token_bucket_refills_while_idle_up_to_its_capacity(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(3, per_second=1.0)
    for _ in range(3):
        assert bucket.take() == 0
    assert bucket.delay() == pytest.approx(1.0)
    await trio.sleep(10)
    assert bucket.delay() == 0.0
    for _ in range(3):
        assert bucket.take() == 0  # refilled to the capacity, no more
    assert bucket.delay() == pytest.approx(1.0)


async def test_token_bucket_take_refuses_without_taking(autojump_clock: trio.testing.MockClock) -> None:
    # A rate limit of 4 a minute, as a callback's rate_limit: 4 is.
    bucket = TokenBucket(4, per_second=4 / 60)
    assert bucket.take(3) == 0
    assert bucket.take(2) == pytest.approx(15.0)  # one more token is 15 s away
    assert bucket.take(1) == 0  # the refused request took nothing
    assert bucket.take(5) == math.inf  # more than a minute's worth can never fit
    await trio.sleep(15)
    assert bucket.take(1) == 0
    with pytest.raises(ValueError, match="never fit"):
        await bucket.wait(5)


def test_token_bucket_is_built_outside_trio_and_rejects_nonsense() -> None:
    # Built in config objects before trio runs: the clock is read on first use only.
    assert TokenBucket(1, 0.5).capacity == 1
    with pytest.raises(ValueError, match="capacity >= 1"):
        TokenBucket(0, 1.0)
    with pytest.raises(ValueError, match="per_second > 0"):
        TokenBucket(1, 0)


# -- Backoff -----------------------------------------------------------------------------


def test_backoff_grows_with_jitter_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(1.0, 30.0, 2.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(12)]
    nominal = [min(30.0, 2.0**n) for n in range(12)]
    assert all(n / 2 <= d <= n for d, n in zip(delays, nominal, strict=True))  # default jitter 0.5
    assert len(set(delays)) == len(delays)  # jittered
    for _ in range(2000):
        assert backoff.next_delay() <= 30.0  # never past the cap, never overflowing
    backoff.reset()
    assert backoff.nominal == 1.0
    assert backoff.next_delay() <= 1.0


@pytest.mark.parametrize("jitter", [0.0, 0.2, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("nominal", [0.004, 1.5, 300.0])
def test_backoff_jitter_takes_up_to_that_fraction_off_the_nominal_delay(jitter: float, nominal: float) -> None:
    backoff = Backoff(nominal, nominal, factor=1, jitter=jitter, rng=random.Random(1))  # one step, repeated
    delays = [backoff.next_delay() for _ in range(500)]
    assert all((1 - jitter) * nominal <= d <= nominal for d in delays)
    # Spread over the whole range, not bunched in part of it.
    assert max(delays) - min(delays) == pytest.approx(jitter * nominal, abs=0.05 * nominal)


def test_backoff_below_one_minus_one_over_factor_jitter_always_grows() -> None:
    # The supervisor's setting: each restart's delay is longer than the last, even as
    # the log prints them (one decimal), until the cap.
    for seed in range(200):
        backoff = Backoff(0.5, 60.0, jitter=0.25, rng=random.Random(seed))
        logged = [round(backoff.next_delay(), 1) for _ in range(7)]  # 0.5 .. 32 s
        assert logged == sorted(set(logged)), logged


def test_backoff_with_a_maximum_below_initial_waits_the_maximum() -> None:
    backoff = Backoff(2.0, 0.5, jitter=0)
    assert [backoff.next_delay() for _ in range(3)] == [0.5, 0.5, 0.5]


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="factor >= 1"):
        Backoff(1.0, 10.0, 0.5)
    with pytest.raises(ValueError, match="maximum > 0"):
        Backoff(1.0, 0)
    with pytest.raises(ValueError, match="jitter"):
        Backoff(1.0, 10.0, jitter=1.5)


async def test_backoff_sleep_sleeps_its_delay(autojump_clock: trio.testing.MockClock) -> None:
    backoff = Backoff(1.0, 4.0, jitter=0.2)
    waits = []
    for _ in range(5):
        started = trio.current_time()
        slept = await backoff.sleep()
        waits.append(trio.current_time() - started)
        assert waits[-1] == pytest.approx(slept)
    for wait, step in zip(waits, [1, 2, 4, 4, 4], strict=True):
        assert step * 0.8 <= wait <= step
    backoff.reset()
    assert await backoff.sleep() <= 1.0


async def test_backoff_resets_after_a_healthy_run(autojump_clock: trio.testing.MockClock) -> None:
    """What a supervisor sees: quick failures back off further each time; a run of
    ``healthy_after`` seconds or more starts the delays from the beginning again."""
    backoff = Backoff(1.0, 60.0, jitter=0, healthy_after=60.0)
    for expected in [1.0, 2.0, 4.0]:
        await trio.sleep(5)  # a run that fails after 5 s
        assert await backoff.sleep() == expected
    await trio.sleep(59)  # not quite healthy
    assert backoff.next_delay() == 8.0
    await trio.sleep(8)  # the delay
    await trio.sleep(60)  # a healthy run: from the end of the delay to this failure
    assert await backoff.sleep() == 1.0
    assert await backoff.sleep() == 2.0  # an attempt that failed at once


async def test_a_throttle_lets_one_through_a_window_per_key_and_counts_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    throttle = Throttle(60.0)
    assert throttle.allow("a") == 0
    assert [throttle.allow("a") for _ in range(3)] == [None, None, None]
    assert throttle.allow("b") == 0  # keys are apart
    await trio.sleep(60)
    assert throttle.allow("a") == 3  # the next one says how many were held back
    assert throttle.allow("a") is None
