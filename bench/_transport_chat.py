"""One case of bench_transport.py that goes through a bot: the bot runs in this process
(memory adapter, SQLite, the audit log on as by default) and this process drives chat
through the memory adapter, while the callback is a process of its own.

    python bench/_transport_chat.py chat KIND ROUTES SEQUENTIAL IN_FLIGHT WINDOW STUBS
    python bench/_transport_chat.py pushed HOW EVENTS

``chat``: KIND is ``sdk`` or ``batched`` (_transport_clients.py) or ``spec``
(_transport_spec.py, the stubs generated into STUBS); "oco ping <n>" injected, "pong
<n>" awaited: 100 to warm up, SEQUENTIAL one at a time, then IN_FLIGHT with WINDOW in
flight. ``pushed``: EVENTS chat messages routed to one Listen (HOW ``listen``) or
ListenBatches (``batches``) stream of a _transport_clients.py counter, all queued before
it reads.

Prints one JSON line: the figures (with the wrong replies), or ``missing`` (why there are
none), or ``error``. A process of its own so that a checkout from before a change, first
on PYTHONPATH, is measured the same way in the same run (bench_transport --before).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from _transport_common import NOT_IN_BUILD, UNIMPLEMENTED, CaseError, Child, summary

from oco_core._proto import robot_pb2
from oco_core.plugin import ChatRoom, ChatUser, IncomingMessage, OutgoingMessage
from oco_core.testing import MemoryAdapter, open_bot

SECRET = "bench-transport-secret-0123456789"
STUCK_AFTER = 240  # seconds; bench_transport waits 300 for a case


class Replies:
    """Sends "oco ping <n>" through the memory adapter and checks every reply: one whose n
    was never sent or was already answered is wrong.

    The driver shares the bot's trio thread, so it costs as little as it can: a message
    goes to the adapter's host as the adapter's own ``inject`` would send it, with one
    pass of trio's scheduler after each, as an adapter reading one message at a time
    (without it, 64 in flight are injected in bursts, which the bot's batches then
    carry for much less a reply: not the shape of the earlier figures); a reply already
    there is read without a timeout's cancel scope."""

    PONG = re.compile(r"^pong (\d+)$")

    def __init__(self, adapter: MemoryAdapter) -> None:
        self.adapter = adapter
        self.next = 0
        self.waiting: set[int] = set()
        self.wrong: list[str] = []
        self._user = ChatUser(id="alice", name="Alice", mention_name="alice")
        self._room = ChatRoom(id="general", name="general")

    async def send(self) -> int:
        n = self.next
        self.next += 1
        self.waiting.add(n)
        if self.adapter.host is None:  # not running yet: inject waits for it
            await self.adapter.inject(f"oco ping {n}")
        else:
            await self.adapter.host.receive(IncomingMessage(f"oco ping {n}", self._user, self._room))
            await trio.lowlevel.checkpoint()
        return n

    async def receive(self) -> bool:
        """Read one reply; True when it answered a waiting message."""
        adapter = self.adapter
        reply: OutgoingMessage | None = None
        if adapter._read < len(adapter.sent):
            adapter._read += 1
            reply = adapter.sent[adapter._read - 1]
        else:
            with trio.move_on_after(30):
                reply = await adapter.next_sent()
            if reply is None:
                raise CaseError(f"no reply for 30 s ({len(self.waiting)} message(s) unanswered)")
        match = self.PONG.match(reply.body)
        n = int(match.group(1)) if match else -1
        if n in self.waiting:
            self.waiting.discard(n)
            return True
        why = "answered already" if 0 <= n < self.next else "never sent"
        self.wrong.append(f"{reply.body!r} ({why})")
        return False

    async def sequential(self, count: int) -> dict[str, float]:
        latencies = []
        began = time.perf_counter()
        for _ in range(count):
            sent = time.perf_counter()
            n = await self.send()
            while n in self.waiting:
                await self.receive()
            latencies.append(time.perf_counter() - sent)
        return summary(latencies, time.perf_counter() - began)

    async def in_flight(self, count: int, window: int) -> float:
        credit = trio.Semaphore(window)

        async def read() -> None:
            answered = 0
            while answered < count:
                if await self.receive():
                    answered += 1
                    credit.release()

        began = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            for _ in range(count):
                try:  # no pass of trio's scheduler when a credit is free
                    credit.acquire_nowait()
                except trio.WouldBlock:
                    await credit.acquire()
                await self.send()
        return count / (time.perf_counter() - began)

    def leftovers(self) -> None:
        """Replies that came after the last one awaited (late duplicates) are wrong too."""
        for reply in self.adapter.sent[self.adapter._read :]:
            self.wrong.append(f"{reply.body!r} (after the run)")


def route_lines(count: int) -> str:
    """The operator's routes for the specification-only client: ping, and count - 1 that
    never match (as _transport_clients.never)."""
    lines = [r"""      - {id: ping, pattern: '^ping (\d+)$', respond: true}"""]
    lines += [rf"""      - {{id: never{i}, pattern: '^never{i} (\d+)$', respond: true}}""" for i in range(count - 1)]
    return "\n".join(lines)


def bot_config(tmp: Path, callback: str, *, routes: int = 0, queue: int = 1000) -> str:
    """One callback, ``callback``, with the operator's routes when ``routes``."""
    declared = f"\n    routes:\n{route_lines(routes)}" if routes else ""
    return f"""
adapters: [{{type: memory}}]
store: {{url: "sqlite:///{tmp}/bench.db"}}
grpc: {{listen: "127.0.0.1:0", stream_queue: {queue}, stream_queue_bytes: {1 << 30}}}
log_level: ERROR
callbacks:
  - id: {callback}
    secret: "{SECRET}"{declared}
"""


def batching_in_build() -> bool:
    """Whether this build's protocol has the batching extension."""
    names = ("EventBatch", "SendMessagesBatch", "SendResultBatch")
    methods = robot_pb2.DESCRIPTOR.services_by_name["Robot"].methods_by_name
    return all(hasattr(robot_pb2, name) for name in names) and {"ListenBatches", "SendMessageBatches"} <= set(methods)


async def chat(kind: str, routes: int, sequential: int, in_flight: int, window: int, stubs: str) -> dict[str, Any]:
    if kind == "batched" and not batching_in_build():
        return {"missing": NOT_IN_BUILD}
    with tempfile.TemporaryDirectory() as tmp:
        async with open_bot(bot_config(Path(tmp), kind, routes=routes if kind == "spec" else 0)) as running:
            if kind == "spec":
                env = {"PYTHONPATH": stubs}
                child = await Child.start(
                    "the spec-only client", "_transport_spec.py", running.address, kind, SECRET, env=env
                )
            else:
                args = (kind, running.address, kind, SECRET, str(routes))
                child = await Child.start(f"the {kind} client", "_transport_clients.py", *args)
            try:
                if not await child.ready():
                    return {"missing": UNIMPLEMENTED}
                replies = Replies(running.adapter)
                await replies.sequential(100)  # warm up
                figures: dict[str, Any] = await replies.sequential(sequential)
                figures["in_flight"] = await replies.in_flight(in_flight, window)
            finally:
                await child.stop()
            replies.leftovers()
    figures["wrong"] = replies.wrong
    return figures


async def pushed(how: str, events: int) -> dict[str, Any]:
    """Events a second one stream took, and how fast this process routed them into the
    stream's queue."""
    if how == "batches" and not batching_in_build():
        return {"missing": NOT_IN_BUILD}
    with tempfile.TemporaryDirectory() as tmp:
        async with open_bot(bot_config(Path(tmp), "counter", queue=events + 100)) as running:
            args = (running.address, "counter", SECRET, str(events), how)
            child = await Child.start(f"the {how} counter", "_transport_clients.py", "count", *args)
            try:
                if not await child.ready():
                    return {"missing": UNIMPLEMENTED}
                began = time.perf_counter()
                for n in range(events):
                    await running.adapter.inject(f"ev {n}")
                routed = events / (time.perf_counter() - began)
                await child.tell("go")
                result = json.loads(await child.line(timeout=120))
            finally:
                await child.stop()
    if result["events"] != events or result["dropped"]:
        raise CaseError(f"{result['events']} events of {events} arrived, {result['dropped']} dropped")
    return {"taken": result["rate"], "routed": routed}


async def main(mode: str, args: list[str]) -> dict[str, Any]:
    try:
        if mode == "chat":
            kind, routes, sequential, in_flight, window, stubs = args
            return await chat(kind, int(routes), int(sequential), int(in_flight), int(window), stubs)
        if mode == "pushed":
            return await pushed(args[0], int(args[1]))
        raise SystemExit(f"unknown mode {mode!r}: chat or pushed")
    except CaseError as exc:
        return {"error": str(exc)}


if __name__ == "__main__":
    # The bot's warnings (a callback with more than 50 routes, say) are not news here.
    logging.basicConfig(level=logging.ERROR)
    # A case that hangs (a bot that never stops, a stall no timeout here covers) says
    # where, every thread's stack on stderr, and ends before bench_transport gives up on it.
    faulthandler.dump_traceback_later(STUCK_AFTER, exit=True)
    print(json.dumps(trio.run(main, sys.argv[1], sys.argv[2:])), flush=True)
