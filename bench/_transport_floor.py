"""The floor for bench_transport.py: a bare grpc.aio round trip carrying OCO's messages.

    python bench/_transport_floor.py server
    python bench/_transport_floor.py client ADDRESS SEQUENTIAL IN_FLIGHT WINDOW

The server has one unary and one bidi-stream method, both taking an ``oco.Event`` (a
matched "oco ping <n>", as the bot writes it) and answering the ``SendMessagesRequest``
a callback would send back ("pong <n>"); it prints ``ready <port>``. The client plays
the bot: it measures both methods one at a time and with WINDOW calls in flight and
prints one JSON line (each method's figures and wrong answers). No trio and no bridge
thread on either side: this is what plain grpc.aio costs, the floor any OCO figure is
compared with.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
from _transport_common import summary

from oco_core._proto import core_pb2, robot_pb2

SERVICE = "bench.Floor"


def event(n: int) -> core_pb2.Event:
    """An event the size and shape of the one the bot writes for "oco ping <n>"."""
    text = f"ping {n}"
    return core_pb2.Event(
        matched_message=core_pb2.MatchedMessage(
            message=core_pb2.Message(
                body=f"oco {text}",
                source=core_pb2.Source(
                    user=core_pb2.User(id="alice", name="Alice", mention_name="alice"),
                    room=core_pb2.Room(id="general", name="general"),
                ),
                id=f"memory-{n}",
            ),
            pattern=r"^ping (\d+)$",
            route_id="ping",
            groups=[text, str(n)],
            direct=True,
            text=text,
        )
    )


def reply(request: core_pb2.Event) -> robot_pb2.SendMessagesRequest:
    """What a callback answers: "pong <n>" to the room the message came from."""
    matched = request.matched_message
    return robot_pb2.SendMessagesRequest(
        messages=[
            core_pb2.Message(
                body=f"pong {matched.groups[1]}",
                source=core_pb2.Source(user=matched.message.source.user, room=matched.message.source.room),
                in_reply_to=matched.message.id,
            )
        ]
    )


async def serve() -> None:
    async def unary(request: core_pb2.Event, context: Any) -> robot_pb2.SendMessagesRequest:
        return reply(request)

    async def stream(
        requests: AsyncIterator[core_pb2.Event], context: Any
    ) -> AsyncIterator[robot_pb2.SendMessagesRequest]:
        async for request in requests:
            yield reply(request)

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=core_pb2.Event.FromString,
                response_serializer=robot_pb2.SendMessagesRequest.SerializeToString,
            ),
            "Stream": grpc.stream_stream_rpc_method_handler(
                stream,
                request_deserializer=core_pb2.Event.FromString,
                response_serializer=robot_pb2.SendMessagesRequest.SerializeToString,
            ),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"ready {port}", flush=True)
    await server.wait_for_termination()


class Checker:
    """Keeps the answers that are not "pong <n>" for the n asked."""

    def __init__(self) -> None:
        self.wrong: list[str] = []

    def check(self, n: int, answer: robot_pb2.SendMessagesRequest) -> None:
        body = answer.messages[0].body if answer.messages else "<no message>"
        if body != f"pong {n}":
            self.wrong.append(f"asked {n}, got {body!r}")


async def measure(address: str, sequential: int, in_flight: int, window: int) -> dict[str, Any]:
    events = [event(n) for n in range(max(sequential, in_flight, 200))]
    checker = Checker()
    results: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        unary = channel.unary_unary(
            f"/{SERVICE}/Unary",
            request_serializer=core_pb2.Event.SerializeToString,
            response_deserializer=robot_pb2.SendMessagesRequest.FromString,
        )
        open_stream = channel.stream_stream(
            f"/{SERVICE}/Stream",
            request_serializer=core_pb2.Event.SerializeToString,
            response_deserializer=robot_pb2.SendMessagesRequest.FromString,
        )
        for n in range(200):  # warm up: connection, code paths
            checker.check(n, await unary(events[n]))

        latencies = []
        began = time.perf_counter()
        for n in range(sequential):
            sent = time.perf_counter()
            checker.check(n, await unary(events[n]))
            latencies.append(time.perf_counter() - sent)
        results["unary"] = summary(latencies, time.perf_counter() - began)

        numbers = iter(range(in_flight))

        async def worker() -> None:
            for n in numbers:
                checker.check(n, await unary(events[n]))

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(window)))
        results["unary"]["in_flight"] = in_flight / (time.perf_counter() - began)
        results["unary"]["wrong"], checker.wrong = checker.wrong, []

        call = open_stream()
        for n in range(200):
            await call.write(events[n])
            checker.check(n, await call.read())
        latencies = []
        began = time.perf_counter()
        for n in range(sequential):
            sent = time.perf_counter()
            await call.write(events[n])
            checker.check(n, await call.read())
            latencies.append(time.perf_counter() - sent)
        results["stream"] = summary(latencies, time.perf_counter() - began)

        # Answers come in order on one stream: the reader knows which n each answers.
        credit = asyncio.Semaphore(window)

        async def reader() -> None:
            for n in range(in_flight):
                checker.check(n, await call.read())
                credit.release()

        began = time.perf_counter()
        reading = asyncio.ensure_future(reader())
        for n in range(in_flight):
            await credit.acquire()
            await call.write(events[n])
        await reading
        results["stream"]["in_flight"] = in_flight / (time.perf_counter() - began)
        results["stream"]["wrong"] = checker.wrong
        await call.done_writing()
    return results


def main() -> None:
    if sys.argv[1:2] == ["server"]:
        asyncio.run(serve())
        return
    address, sequential, in_flight, window = sys.argv[2], *map(int, sys.argv[3:6])
    print(json.dumps(asyncio.run(measure(address, sequential, in_flight, window))), flush=True)


if __name__ == "__main__":
    main()
