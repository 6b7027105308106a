"""Where the CPU of one reply goes (issue 17): the chat case of bench_transport with 64
in flight, and each thread's CPU time per reply, in the bot and in the callback.

    python bench/bench_transport_cpu.py [--kind sdk|batched] [--messages N] [--rounds R]
        [--profile FILE] [--profile-callback FILE]

The bot runs in this process (as in ``_transport_chat.py``, the driver injecting chat in
its trio thread), the callback in a process of its own. CPU time is each thread's
``/proc/<pid>/task/<tid>/schedstat`` (time on a CPU, not waiting for the GIL or for the
other process) taken before and after the in-flight phase, divided by the replies.
Threads are named by ``comm`` (grpc's are ``default-executo``, ``grpc_global_tim`` and
the like; the bridge's asyncio thread is ``oco-grpc-asynci``, in both processes). Each
figure is the median of the rounds with (min-max); the load average is printed beside
them, since this machine is shared.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
from _transport_chat import SECRET, Replies, bot_config
from _transport_common import Child

from oco_core.testing import open_bot

WINDOW = 64
#: Where --profile writes the trio thread's cProfile (CPU time), or None.
PROFILE: str | None = None
#: Where --profile-callback writes the SDK callback's trio thread's cProfile, or None.
PROFILE_CALLBACK: str | None = None


def cpu_by_thread(pid: int | str) -> dict[str, float]:
    """Seconds on a CPU so far, by thread name (threads of one name summed)."""
    total: dict[str, float] = collections.defaultdict(float)
    task = Path(f"/proc/{pid}/task")
    for tid in task.iterdir():
        try:
            name = (tid / "comm").read_text().strip()
            ns = int((tid / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
        if str(tid.name) == str(pid):
            name = "main (trio)"
        total[name] += ns / 1e9
    return total


def minus(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {name: seconds - before.get(name, 0.0) for name, seconds in after.items()}


async def one(kind: str, messages: int) -> tuple[float, dict[str, float], dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        async with open_bot(bot_config(Path(tmp), kind)) as running:
            args = (kind, running.address, kind, SECRET, "1")
            child = await Child.start(f"the {kind} client", "_transport_clients.py", *args)
            try:
                if not await child.ready():
                    raise SystemExit(f"the bot has no {kind} RPCs")
                replies = Replies(running.adapter)
                await replies.in_flight(500, WINDOW)  # warm up
                pid = child.process.pid
                profile = cProfile.Profile(time.thread_time) if PROFILE else None
                bot0, cb0 = cpu_by_thread(os.getpid()), cpu_by_thread(pid)
                if profile is not None:
                    profile.enable()
                if PROFILE_CALLBACK:
                    await child.tell("profile")
                rate = await replies.in_flight(messages, WINDOW)
                if profile is not None:
                    profile.disable()
                if PROFILE_CALLBACK:
                    await child.tell(f"dump {PROFILE_CALLBACK}")
                    if await child.line() != "dumped":
                        raise SystemExit("the callback did not write its profile")
                bot, cb = minus(cpu_by_thread(os.getpid()), bot0), minus(cpu_by_thread(pid), cb0)
                if profile is not None:
                    profile.dump_stats(PROFILE)
            finally:
                await child.stop()
            replies.leftovers()
            if replies.wrong:
                raise SystemExit(f"wrong replies: {replies.wrong[:5]}")
    return rate, {k: v / messages * 1e6 for k, v in bot.items()}, {k: v / messages * 1e6 for k, v in cb.items()}


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:,.0f}"
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


async def main(kind: str, messages: int, rounds: int) -> None:
    rates: list[float] = []
    bots: dict[str, list[float]] = collections.defaultdict(list)
    cbs: dict[str, list[float]] = collections.defaultdict(list)
    loads = [os.getloadavg()[0]]
    for _ in range(rounds):
        rate, bot, cb = await one(kind, messages)
        rates.append(rate)
        for name, us in bot.items():
            bots[name].append(us)
        for name, us in cb.items():
            cbs[name].append(us)
        loads.append(os.getloadavg()[0])
    print(f"{kind}, {WINDOW} in flight, {messages} messages x {rounds} round(s); load (1 min) {loads}")
    print(f"  replies/s: {spread(rates)}")
    for label, table in (("bot", bots), (f"{kind} callback", cbs)):
        print(f"  {label}: CPU µs per reply, by thread")
        rows = [(name, values) for name, values in table.items() if statistics.median(values) >= 1]
        rows.sort(key=lambda row: -statistics.median(row[1]))
        for name, values in rows:
            print(f"    {name:<20} {spread(values)}")
        totals = [sum(values[i] for values in table.values() if i < len(values)) for i in range(rounds)]
        print(f"    {'all threads':<20} {spread(totals)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("sdk", "batched"), default="sdk")
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", metavar="FILE", help="cProfile the bot's trio thread (CPU time) into FILE")
    parser.add_argument(
        "--profile-callback", metavar="FILE", help="cProfile the SDK callback's trio thread (CPU time) into FILE"
    )
    options = parser.parse_args()
    if options.profile_callback and options.kind != "sdk":
        parser.error("--profile-callback profiles the SDK callback: use it with --kind sdk")
    PROFILE, PROFILE_CALLBACK = options.profile, options.profile_callback
    started = time.perf_counter()
    trio.run(main, options.kind, options.messages, options.rounds)
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
