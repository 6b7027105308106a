"""Batched streams (ListenBatches, SendMessageBatches): what a generated client sees, and
the SDK, with this bot and with an older one that lacks them."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from oco_core import Callback, Message
from oco_core._proto import core_pb2, robot_pb2, robot_pb2_grpc
from oco_core.testing import RunningBot, free_port, open_bot, serving

SECRET = "batches-secret-0123456789abcdef"
AUTH = (("authorization", f"Bearer {SECRET}"),)
#: A stream's HTTP/2 window stays at 16 KiB: a client that does not read holds events
#: back in the bot, where they gather into batches.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)]


def config(tmp_path: Path, grpc_extra: str = "") -> str:
    return f"""
adapters: [{{type: memory}}]
store: {{url: "sqlite:///{tmp_path}/oco.db"}}
grpc: {{listen: "127.0.0.1:0"{grpc_extra}}}
callbacks:
  - {{id: batcher, secret: {SECRET}}}
"""


def _read_batches(address: str, count: int, opened: threading.Event, go: threading.Event) -> list[list[int]]:
    """Open ListenBatches for ``numbered <n>``, say so, wait for ``go`` without reading,
    then read until ``count`` events came: the numbers, batch by batch."""
    with grpc.insecure_channel(address, options=SMALL_WINDOW) as channel:
        robot = robot_pb2_grpc.RobotStub(channel)
        routes = [robot_pb2.Route(id="numbered", pattern=r"^numbered (\d+)")]
        stream: Any = robot.ListenBatches(robot_pb2.ListenRequest(routes=routes), metadata=AUTH, timeout=60)
        assert dict(stream.initial_metadata())["oco-routes"] == "1"
        opened.set()
        go.wait(60)
        batches: list[list[int]] = []
        for batch in stream:
            batches.append([int(event.matched_message.groups[1]) for event in batch.events])
            if sum(map(len, batches)) >= count:
                break
        stream.cancel()
        return batches


async def _batches_of(running: RunningBot, bodies: list[str]) -> list[list[int]]:
    opened, go = threading.Event(), threading.Event()
    async with trio.open_nursery() as nursery:
        got: list[list[list[int]]] = []

        async def read() -> None:
            got.append(await trio.to_thread.run_sync(_read_batches, running.address, len(bodies), opened, go))

        nursery.start_soon(read)
        with trio.fail_after(30):
            while not opened.is_set():
                await trio.sleep(0.01)
            for body in bodies:  # nothing reads the stream meanwhile
                await running.adapter.inject(body)
        go.set()
    return got[0]


@pytest.mark.parametrize(
    ("grpc_extra", "padding", "most"),
    [
        (", batch_max_events: 3", "", 3),  # bounded in events
        # Bounded in bytes past the first: each event counts ~1,300 bytes (its message,
        # and its matched text again), so two fit in 3,000 and a third does not.
        (", batch_max_bytes: 3000", "x" * 600, 3),
    ],
)
async def test_waiting_events_come_together_in_order_within_the_bounds(
    tmp_path: Path, grpc_extra: str, padding: str, most: int
) -> None:
    async with open_bot(config(tmp_path, grpc_extra)) as running:
        bodies = [f"numbered {n} {padding}" for n in range(300)]
        batches = await _batches_of(running, bodies)
    assert [n for batch in batches for n in batch] == list(range(300))
    assert max(map(len, batches)) == most, [len(b) for b in batches]
    assert min(map(len, batches)) >= 1


async def test_a_lone_event_comes_at_once_in_a_batch_of_one(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        batches = await _batches_of(running, ["numbered 7"])
    assert batches == [[7]]


async def test_a_batch_of_replies_is_answered_in_order_and_a_bad_one_fails_alone(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        room = core_pb2.Source(room=core_pb2.Room(id="memory/general"))
        nowhere = core_pb2.Source(room=core_pb2.Room(id="memory/nowhere"))
        requests = [
            robot_pb2.SendMessagesRequest(request_id=11, messages=[core_pb2.Message(body="first", source=room)]),
            robot_pb2.SendMessagesRequest(request_id=12, messages=[core_pb2.Message(body="lost", source=nowhere)]),
            robot_pb2.SendMessagesRequest(request_id=13, messages=[core_pb2.Message(body="second", source=room)]),
        ]

        def send() -> list[robot_pb2.SendResultBatch]:
            with grpc.insecure_channel(running.address) as channel:
                robot = robot_pb2_grpc.RobotStub(channel)
                batches = iter([robot_pb2.SendMessagesBatch(requests=requests)])
                return list(robot.SendMessageBatches(batches, metadata=AUTH, timeout=30))

        [answer] = await trio.to_thread.run_sync(send)
        with trio.fail_after(10):
            sent = [(await running.adapter.next_sent()).body for _ in range(2)]
    assert [r.request_id for r in answer.results] == [11, 12, 13]
    assert [r.code for r in answer.results] == [0, grpc.StatusCode.NOT_FOUND.value[0], 0]
    assert answer.results[1].error_type == "UnknownTargetError"
    assert sent == ["first", "second"]


async def test_the_sdk_answers_many_in_flight_each_once(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        callback = Callback(id="batcher", secret=SECRET, address=running.address, concurrency=256)

        @callback.respond(r"^ping (\d+)$")
        async def ping(message: Message) -> None:
            await trio.sleep(0.001 * (int(message.match(1)) % 5))  # replies finish out of order
            await message.send(f"pong {message.match(1)}")

        async with serving(callback):
            with trio.fail_after(60):
                for n in range(1000):
                    await running.adapter.inject(f"oco ping {n}")
                replies = [(await running.adapter.next_sent()).body for _ in range(1000)]
    assert sorted(replies) == sorted(f"pong {n}" for n in range(1000))


class _OlderBot(robot_pb2_grpc.RobotServicer):
    """A bot from before the batched streams: Listen and SendMessageStream only (the
    generated servicer answers UNIMPLEMENTED for the rest)."""

    def __init__(self) -> None:
        self.requests: queue.Queue[robot_pb2.SendMessagesRequest] = queue.Queue()
        self.called: list[str] = []
        self.done = threading.Event()

    def Listen(self, request: robot_pb2.ListenRequest, context: grpc.ServicerContext) -> Iterator[core_pb2.Event]:
        self.called.append("Listen")
        context.send_initial_metadata((("oco-routes", str(len(request.routes))),))
        message = core_pb2.Message(
            id="older/1",
            body="ping",
            source=core_pb2.Source(user=core_pb2.User(id="older/alice"), room=core_pb2.Room(id="older/general")),
        )
        matched = core_pb2.MatchedMessage(message=message, route_id=request.routes[0].id, groups=["ping"], text="ping")
        yield core_pb2.Event(matched_message=matched)
        self.done.wait(60)

    def SendMessageStream(
        self, requests: Iterator[robot_pb2.SendMessagesRequest], context: grpc.ServicerContext
    ) -> Iterator[robot_pb2.SendResult]:
        self.called.append("SendMessageStream")
        context.send_initial_metadata(())
        for request in requests:
            self.requests.put(request)
            yield robot_pb2.SendResult(request_id=request.request_id)


async def test_the_sdk_falls_back_to_plain_streams_with_an_older_bot() -> None:
    older = _OlderBot()  # type: ignore[abstract]  # lacking the rest is the point: UNIMPLEMENTED
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    robot_pb2_grpc.add_RobotServicer_to_server(older, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        callback = Callback(id="batcher", secret=SECRET, address=f"127.0.0.1:{port}")
        confirmed = trio.Event()

        @callback.respond("^ping$")
        async def ping(message: Message) -> None:
            await message.reply("pong")  # returns once the bot confirmed it
            confirmed.set()

        async with serving(callback):
            with trio.fail_after(20):
                await confirmed.wait()
        request = older.requests.get(timeout=1)
    finally:
        older.done.set()
        server.stop(None)
    assert [m.body for m in request.messages] == ["pong"]
    assert request.WithMention
    assert older.called == ["Listen", "SendMessageStream"]
