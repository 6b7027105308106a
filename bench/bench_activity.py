"""What the activity hooks (``_activity.py``) add to each matched and answered message.

    python bench/bench_activity.py

A message matched by one route of one callback, then answered by it: the hooks the
message path calls (``Activity.matched`` on the match, ``Activity.replied`` on the
reply), timed alone, against what the path did before the console (one float per
message id, popped on the reply). Three cases: no ``console:`` (latency samples only),
the console on with nobody on the live view (an entry in the live ring too), and two
live views open (an update in the watchers' log too).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import trio

from oco_core._activity import Activity, LiveFeed
from oco_core._adapter import ChatRoom, ChatUser, IncomingMessage
from oco_core._metrics import Metrics
from oco_core._proto import core_pb2
from oco_core._router import Match, Queued

N = 200_000
IDS = [f"irc/{n}" for n in range(N)]
INCOMING = IncomingMessage(body="oco deploy api", user=ChatUser("bob", "Bob", "bob"), room=ChatRoom("#ops", "#ops"))
MATCHES = [Match(None, Queued(0, core_pb2.Event), False, "deployer", "deploy")]


class Before:
    """The hooks as they were: when each matched message arrived, forgotten on its reply."""

    def __init__(self) -> None:
        self.awaiting: dict[str, float] = {}
        self.last = 0.0

    def matched(self, message_id: str) -> None:
        self.awaiting[message_id] = time.monotonic()

    def replied(self, message_ids: list[str]) -> None:
        self.last = time.monotonic()
        for message_id in message_ids:
            self.awaiting.pop(message_id, None)


def measure(match: Callable[[int], object], reply: Callable[[int], object]) -> float:
    """The best of five runs, in ns per message."""
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter_ns()
        for n in range(N):
            match(n)
            reply(n)
        best = min(best, (time.perf_counter_ns() - began) / N)
    return best


def hooks(activity: Activity) -> tuple[Callable[[int], object], Callable[[int], object]]:
    return (
        lambda n: activity.matched("irc", IDS[n], "irc/#ops", INCOMING, MATCHES),
        lambda n: activity.replied("deployer", [IDS[n]]),
    )


async def main() -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    before = Before()
    base = measure(lambda n: before.matched(IDS[n]), lambda n: before.replied([IDS[n]]))
    print(f"before the console:               {base:6.0f} ns per matched and answered message")
    off = measure(*hooks(Activity(Metrics())))
    on = Activity(Metrics(), LiveFeed(200))
    nobody = measure(*hooks(on))
    assert on.live is not None
    with on.live.watch(), on.live.watch():
        watched = measure(*hooks(on))
    for label, figure in (
        ("no console:", off),
        ("console, nobody watching:", nobody),
        ("console, two live views open:", watched),
    ):
        print(f"{label:33s} {figure:6.0f} ns per matched and answered message ({figure - base:+.0f} ns)")


if __name__ == "__main__":
    trio.run(main)
