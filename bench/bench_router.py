"""Router matching cost per message with 10, 1,000 and 10,000 live patterns.

    python bench/bench_router.py

Each pattern is a realistic respond route (``^cmd<i> (\\w+)(?: to (\\w+))?$``), plus as
many hear routes; messages alternate between one that matches a single route and one
that matches nothing. Two figures: the whole routing of a message (addressing, the RE2 set pass over
hear and respond routes, capture groups of what matched, building the event, queueing
it) and the RE2 set pass alone.

Then the same routing of one matching message with 1 and with 10 respond routes, alone
and beside a thread that runs Python the whole time (as grpc's asyncio thread does in a
busy bot): every RE2 call releases the GIL, and getting it back from a busy thread costs
far more than the match. Wall time per message, the median of 5 runs with (min-max).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import threading
import time

from oco_core._proto import core_pb2
from oco_core._router import Route, Router, Subscription


def measure(patterns: int, messages: int = 100_000) -> tuple[float, float, float]:
    router = Router("oco")
    half = max(1, patterns // 2)
    routes = [Route(f"r{i}", rf"^cmd{i} (\w+)(?: to (\w+))?$", respond=True) for i in range(half)]
    routes += [Route(f"h{i}", rf"\bword{i}\b") for i in range(patterns - half)]
    subscription = Subscription("bench", routes, queue_size=messages + 1)
    router.subscribe(subscription)
    bodies = [f"oco cmd{half // 2} api to prod", "just some chatter about nothing in particular"]
    protos = [core_pb2.Message(body=b, id="m") for b in bodies]
    router.match(protos[0], bodies[0], False, router.address("x", bodies[0]))  # builds the set
    began = time.perf_counter()
    for n in range(messages):
        body = bodies[n & 1]
        router.match(protos[n & 1], body, False, router.address("x", body))
    elapsed = time.perf_counter() - began
    tables = router._tables
    assert tables is not None
    data = [b.encode() for b in bodies]
    began = time.perf_counter()
    for n in range(messages):
        tables[True].set.Match(data[n & 1])
        tables[False].set.Match(data[n & 1])
    set_only = time.perf_counter() - began
    started = time.perf_counter()
    Router("oco").subscribe(Subscription("bench", routes))  # validation cost of a new Listen
    return elapsed / messages * 1e6, set_only / messages * 1e6, time.perf_counter() - started


def spin(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))


def beside(patterns: int, busy: bool, messages: int = 2000) -> str:
    """Wall µs to route one matching message, as "median (min-max)" of 5 runs."""
    router = Router("oco")
    routes = [Route(f"r{i}", rf"^cmd{i} (\w+)(?: to (\w+))?$", respond=True) for i in range(patterns)]
    router.subscribe(Subscription("bench", routes, queue_size=10 * messages + 1))
    body = "oco cmd0 api to prod"
    proto = core_pb2.Message(body=body, id="m")
    router.match(proto, body, False, router.address("x", body))  # builds the tables
    stop = threading.Event()
    spinner = threading.Thread(target=spin, args=(stop,), daemon=True)
    sys.setswitchinterval(0.0005)  # as the bot sets it (_bridge.open_bridge)
    if busy:
        spinner.start()
    runs = []
    try:
        for _ in range(5):
            began = time.perf_counter()
            for _ in range(messages):
                router.match(proto, body, False, router.address("x", body))
            runs.append((time.perf_counter() - began) / messages * 1e6)
    finally:
        stop.set()
    return f"{statistics.median(runs):6.1f} ({min(runs):.1f}-{max(runs):.1f})"


def main() -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    for patterns in (10, 1_000, 10_000):
        per_message, set_only, subscribe = measure(patterns)
        print(
            f"{patterns:>6} patterns: routing {per_message:6.2f} µs per message, of which the RE2 set pass "
            f"{set_only:5.2f} µs   (registering them: {subscribe * 1e3:.0f} ms)"
        )
    print(f"one matching message, wall µs (load average {os.getloadavg()[0]:.2f}):")
    for patterns in (1, 10):
        alone, busy = beside(patterns, False), beside(patterns, True)
        print(f"  {patterns:>2} route(s): alone {alone}, beside a busy thread {busy}")


if __name__ == "__main__":
    main()
