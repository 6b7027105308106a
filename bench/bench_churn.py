"""Routing throughput while one callback reconnects in a loop, with 5,000 routes live.

    python bench/bench_churn.py [--seconds 3] [--rounds 3]

50 callbacks hold 100 routes each. One task routes messages as fast as it can (as an
adapter's burst would, yielding to trio every 10 messages); another makes one of the
callbacks leave and come back (unsubscribe, then register its 100 routes again) over
and over. Three contenders, interleaved in each round:

- ``quiet``: no reconnects, the ceiling;
- ``churn, rebuild inline``: the router rebuilds its tables on the first message after
  each change, on the trio thread (what the bot did before ``Router.maintain``);
- ``churn, rebuild off-thread``: the bot's way: :meth:`Router.maintain` builds them in a
  worker thread and swaps them in, while routing goes on with the previous ones.

Prints messages routed per second (median and range over the rounds), reconnects done,
and the load average, since this machine is shared.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import trio

from oco_core._proto import core_pb2
from oco_core._router import Route, Router, Subscription

CALLBACKS = 50
ROUTES_EACH = 100


def routes_of(callback: int) -> list[Route]:
    return [
        Route(f"r{i}", rf"^cb{callback}cmd{i} (\w+)(?: to (\w+))?$", respond=i % 2 == 0) for i in range(ROUTES_EACH)
    ]


async def run(contender: str, seconds: float) -> tuple[float, int]:
    router = Router("oco")
    for callback in range(CALLBACKS):
        router.subscribe(Subscription(f"cb{callback}", routes_of(callback), queue_size=10))
    bodies = ["oco cb7cmd4 api to prod", "just some chatter about nothing in particular"]
    protos = [core_pb2.Message(body=b, id="m") for b in bodies]
    router.match(protos[0], bodies[0], False, router.address("x", bodies[0]))  # the first build
    routed = reconnects = 0
    async with trio.open_nursery() as nursery:
        if contender.endswith("off-thread"):
            await nursery.start(router.maintain)

        async def churn() -> None:
            nonlocal reconnects
            churning = router.subscriptions("cb0")[0]
            while True:
                router.unsubscribe(churning)
                churning = Subscription("cb0", routes_of(0), queue_size=10)
                await router.register(churning)
                reconnects += 1
                await trio.lowlevel.checkpoint()

        if contender != "quiet":
            nursery.start_soon(churn)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            for n in range(10):
                body = bodies[n & 1]
                router.match(protos[n & 1], body, False, router.address("x", body))
                for sub in router.subscriptions("cb7"):  # keep its queue from filling
                    while sub.queued():
                        sub.take_nowait()
            routed += 10
            await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()
    return routed / seconds, reconnects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    contenders = ["quiet", "churn, rebuild inline", "churn, rebuild off-thread"]
    rates: dict[str, list[float]] = {c: [] for c in contenders}
    churned: dict[str, list[int]] = {c: [] for c in contenders}
    for _ in range(options.rounds):
        for contender in contenders:
            rate, reconnects = trio.run(run, contender, options.seconds)
            rates[contender].append(rate)
            churned[contender].append(reconnects)
    print(f"{CALLBACKS * ROUTES_EACH} routes, {options.rounds} rounds of {options.seconds:g} s each:")
    for contender in contenders:
        r = rates[contender]
        print(
            f"  {contender:<27} {statistics.median(r):8.0f} messages/s (range {min(r):.0f}-{max(r):.0f}), "
            f"{statistics.median(churned[contender]):.0f} reconnects"
        )
    router = Router("oco")
    streams = [Subscription(f"cb{i % 100}", [Route("p", "^ping$")], queue_size=1) for i in range(8000)]
    for stream in streams:
        router.subscribe(stream)
    began = time.perf_counter()
    for stream in streams:
        router.unsubscribe(stream)
    print(f"closing 8,000 streams one by one: {(time.perf_counter() - began) * 1e3:.0f} ms")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
