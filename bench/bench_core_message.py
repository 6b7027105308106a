"""The bot's own CPU for one chat command and its reply, without gRPC (issue 17).

    python bench/bench_core_message.py [--messages N] [--rounds R] [--busy]

A bot (memory adapter, SQLite, the audit log on as by default) runs in this process with
one Listen stream's subscription added straight to its router (route ``^ping (\\d+)$``,
respond). Each message goes the way a command does: in through the adapter's host
(``AdapterLink.receive``: directory, addressing, the router's RE2 set and capture, the
gate and its audit record, metrics, activity), its event built as the edge builds it
for the stream, then the reply through ``BotCore.send_messages`` (checks, the memory
adapter, metrics, activity). The trio thread's CPU time (``time.thread_time``) per
message is printed, the median of the rounds with (min-max), for the three parts and
the whole; the audit log's writes (a background task) are in the whole.

``--busy``: a thread runs Python beside the bot the whole time, as grpc's asyncio
thread does at 64 in flight: every call that releases the GIL in the trio thread (RE2,
a socket write) then waits to get it back. Wall time per message is printed too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time

import trio
import trio.lowlevel

from oco_core._adapter import ChatRoom, ChatUser, IncomingMessage
from oco_core._proto import core_pb2, robot_pb2
from oco_core._router import Route, Subscription
from oco_core.testing import open_bot

CONFIG = """
adapters: [{{type: memory}}]
store: {{url: "sqlite:///{tmp}/bench.db"}}
log_level: ERROR
callbacks:
  - id: bench
    secret: "bench-core-message-secret-0123456789"
"""


def spin(stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        for _ in range(1000):
            n += 1


async def one_round(messages: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        async with open_bot(CONFIG.format(tmp=tmp)) as running:
            core = running.bot.core
            link = core.links["memory"]
            sub = Subscription("bench", [Route("ping", r"^ping (\d+)$", respond=True)], queue_size=messages + 10)
            await core.router.register(sub)
            user = ChatUser(id="alice", name="Alice", mention_name="alice")
            room = ChatRoom(id="general", name="general")
            running.adapter.users.add("alice")
            parts = {"in": 0.0, "event": 0.0, "reply": 0.0}
            clock = time.thread_time
            began, wall = clock(), time.perf_counter()
            for n in range(messages):
                t0 = clock()
                await link.receive(IncomingMessage(body=f"oco ping {n}", user=user, room=room, id=f"m{n}"))
                t1 = clock()
                event = sub.take_nowait().event()
                t2 = clock()
                matched = event.matched_message
                reply = core_pb2.Message(
                    body=f"pong {matched.groups[1]}",
                    source=core_pb2.Source(room=matched.message.source.room),
                    in_reply_to=matched.message.id,
                )
                await core.send_messages("bench", robot_pb2.SendMessagesRequest(messages=[reply]))
                t3 = clock()
                parts["in"] += t1 - t0
                parts["event"] += t2 - t1
                parts["reply"] += t3 - t2
                if n % 64 == 63:
                    await trio.lowlevel.checkpoint()  # let the audit log's task write, as it would
            await trio.sleep(0.2)
            total, wall = clock() - began, time.perf_counter() - wall
            assert len(running.adapter.sent) == messages, "a reply is missing"
    figures = {name: seconds / messages * 1e6 for name, seconds in parts.items()}
    figures["whole"] = total / messages * 1e6
    figures["wall"] = wall / messages * 1e6
    return figures


async def main(messages: int, rounds: int, busy: bool) -> None:
    stop = threading.Event()
    spinner = threading.Thread(target=spin, args=(stop,), daemon=True)
    if busy:
        spinner.start()
    results: list[dict[str, float]] = []
    loads = [os.getloadavg()[0]]
    try:
        for _ in range(rounds + 1):
            results.append(await one_round(messages))
            loads.append(os.getloadavg()[0])
    finally:
        stop.set()
    results = results[1:]  # the first round warms up
    print(f"{messages} messages x {rounds} rounds{', a busy thread beside' if busy else ''}; load (1 min) {loads}")
    print(
        "µs per message (trio thread CPU): "
        + ", ".join(
            f"{name} {statistics.median(r[name] for r in results):.1f} "
            f"({min(r[name] for r in results):.1f}-{max(r[name] for r in results):.1f})"
            for name in ("in", "event", "reply", "whole", "wall")
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--busy", action="store_true", help="a thread running Python beside the bot")
    options = parser.parse_args()
    trio.run(main, options.messages, options.rounds, options.busy)
