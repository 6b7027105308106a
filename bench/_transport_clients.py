"""Callback processes for bench_transport.py, on OCO's own .proto files.

    python bench/_transport_clients.py sdk ADDRESS ID SECRET ROUTES
    python bench/_transport_clients.py batched ADDRESS ID SECRET ROUTES
    python bench/_transport_clients.py count ADDRESS ID SECRET EVENTS listen|batches
    python bench/_transport_clients.py sdk-many ADDRESS FIRST COUNT SECRET_PREFIX

``sdk``: an ``oco_core.Callback`` answering "ping <n>" with "pong <n>", beside ROUTES - 1
routes that never match. ``batched``: the same with raw stubs over ListenBatches and
SendMessageBatches (one write per batch of events), no SDK. Both print ``ready`` once
their routes are live (``unimplemented`` when the bot lacks the RPCs) and run until
terminated.

``count``: a Listen (or ListenBatches) stream with a hear route for "ev <n>"; prints
``ready``, reads nothing until a line comes on its stdin, then, once "ev <EVENTS - 1>"
arrived, prints one JSON line with the events it got and their rate from the first to
the last.

``sdk-many``: SDK callbacks ``rss<FIRST>`` to ``rss<FIRST + COUNT - 1>`` (secret
SECRET_PREFIX + index), one route each; prints ``ready`` once all are connected.

The raw clients are plain grpc.aio on asyncio, as any gRPC user would write them: the
figures are the bot's, not a client library's.
"""

from __future__ import annotations

import asyncio
import cProfile
import itertools
import json
import os
import sys
import time

import grpc
import grpc.aio
import trio

from oco_core import Callback, Message
from oco_core._proto import core_pb2, robot_pb2, robot_pb2_grpc


def never(count: int) -> list[str]:
    """Patterns that "oco ping <n>" and "ev <n>" never match."""
    return [rf"^never{i} (\d+)$" for i in range(count)]


async def sdk(address: str, callback_id: str, secret: str, routes: int) -> None:
    callback = Callback(id=callback_id, secret=secret, address=address)

    @callback.respond(r"^ping (\d+)$", id="ping")
    async def ping(message: Message) -> None:
        await message.send(f"pong {message.groups[1]}")

    async def ignore(message: Message) -> None:
        raise AssertionError(f"a route that never matches matched {message.body!r}")

    for index, pattern in enumerate(never(routes - 1)):
        callback.respond(pattern, id=f"never{index}")(ignore)
    async with trio.open_nursery() as nursery:
        await nursery.start(callback.serve)
        print("ready", flush=True)
        nursery.start_soon(profiler)


async def profiler() -> None:
    """On ``profile`` on stdin, cProfile this process's trio thread (CPU time) until
    ``dump FILE`` (bench_transport_cpu --profile-callback)."""
    profile = cProfile.Profile(time.thread_time)
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    while chunk := await stdin.receive_some():
        buffer += chunk
        while b"\n" in buffer:
            line, _, buffer = buffer.partition(b"\n")
            command, _, argument = line.decode().strip().partition(" ")
            if command == "profile":
                profile.enable()
            elif command == "dump":
                profile.disable()
                profile.dump_stats(argument)
                print("dumped", flush=True)


async def sdk_many(address: str, first: int, count: int, secret_prefix: str) -> None:
    async def ping(message: Message) -> None:
        await message.send(f"pong {message.groups[1]}")

    async with trio.open_nursery() as nursery:

        async def start(callback: Callback) -> None:
            await nursery.start(callback.serve)

        # All at once: one after the other, each would wait for the router's next build.
        async with trio.open_nursery() as starting:
            for index in range(first, first + count):
                callback = Callback(id=f"rss{index}", secret=f"{secret_prefix}{index}", address=address)
                callback.respond(rf"^ping{index} (\d+)$", id="ping")(ping)
                starting.start_soon(start, callback)
        print("ready", flush=True)


def listen_request(callback_id: str, routes: list[robot_pb2.Route]) -> robot_pb2.ListenRequest:
    return robot_pb2.ListenRequest(plugin_id=callback_id, routes=routes)


def pong(event: core_pb2.Event) -> core_pb2.Message:
    matched = event.matched_message
    return core_pb2.Message(
        body=f"pong {matched.groups[1]}",
        source=core_pb2.Source(user=matched.message.source.user, room=matched.message.source.room),
        in_reply_to=matched.message.id,
    )


async def opened(call: grpc.aio.UnaryStreamCall) -> bool:  # type: ignore[type-arg]
    """Whether the bot accepted the stream: it sends its headers (with ``oco-routes``)
    once the routes are live. A bot without the RPC ends the call at once instead; then
    print ``unimplemented`` and say no."""
    headers = await call.initial_metadata()
    if headers is not None and "oco-routes" in headers:
        return True
    code = await call.code()
    if code == grpc.StatusCode.UNIMPLEMENTED:
        print("unimplemented", flush=True)
        return False
    raise SystemExit(f"the bot refused the stream: {code.name}: {await call.details()}")


async def batched(address: str, callback_id: str, secret: str, routes: int) -> None:
    metadata = (("authorization", f"Bearer {secret}"),)
    declared = [robot_pb2.Route(id="ping", pattern=r"^ping (\d+)$", respond=True)]
    declared += [robot_pb2.Route(id=f"never{i}", pattern=p, respond=True) for i, p in enumerate(never(routes - 1))]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = robot_pb2_grpc.RobotStub(channel)
        batches = stub.ListenBatches(listen_request(callback_id, declared), metadata=metadata)
        if not await opened(batches):
            return
        sender = stub.SendMessageBatches(metadata=metadata)
        print("ready", flush=True)

        async def drain() -> None:
            while (answer := await sender.read()) is not grpc.aio.EOF:
                for result in answer.results:
                    if result.code:
                        print(f"SendMessageBatches: {result.error_type} {result.error}", file=sys.stderr, flush=True)

        draining = asyncio.ensure_future(drain())
        ids = itertools.count(1)
        async for batch in batches:
            requests = [robot_pb2.SendMessagesRequest(messages=[pong(e)], request_id=next(ids)) for e in batch.events]
            await sender.write(robot_pb2.SendMessagesBatch(requests=requests))
        draining.cancel()


async def count(address: str, callback_id: str, secret: str, events: int, how: str) -> None:
    metadata = (("authorization", f"Bearer {secret}"),)
    request = listen_request(callback_id, [robot_pb2.Route(id="ev", pattern=r"^ev (\d+)$")])
    last = str(events - 1)
    # grpc's BDP probing would widen the stream's window to megabytes, and events would
    # pile up in this process while the bot routes them: the rate would then depend on
    # how much crossed before "go". Without it, at most the default 64 KiB is ahead.
    async with grpc.aio.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        stub = robot_pb2_grpc.RobotStub(channel)
        call = (
            stub.Listen(request, metadata=metadata)
            if how == "listen"
            else stub.ListenBatches(request, metadata=metadata)
        )
        if not await opened(call):
            return
        print("ready", flush=True)
        # The bot queues the events while this waits, then offers them all at once: the
        # figure is what the stream takes, not how fast the driver routes chat.
        stdin = asyncio.StreamReader()
        await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        await stdin.readline()
        got, first, dropped = 0, 0.0, 0
        async for item in call:
            batch = [item] if how == "listen" else list(item.events)
            if not got:
                first = time.perf_counter()
            got += len(batch)
            dropped += sum(e.dropped for e in batch)
            if batch[-1].matched_message.groups[1] == last:
                break
        elapsed = time.perf_counter() - first
        call.cancel()
    print(json.dumps({"events": got, "dropped": dropped, "rate": (got - 1) / elapsed if elapsed else 0.0}), flush=True)


def main() -> None:
    mode, address, *rest = sys.argv[1:]
    if mode == "sdk":
        trio.run(sdk, address, rest[0], rest[1], int(rest[2]))
    elif mode == "sdk-many":
        trio.run(sdk_many, address, int(rest[0]), int(rest[1]), rest[2])
    elif mode == "batched":
        asyncio.run(batched(address, rest[0], rest[1], int(rest[2])))
    elif mode == "count":
        asyncio.run(count(address, rest[0], rest[1], int(rest[2]), rest[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}: sdk, batched, count or sdk-many")


if __name__ == "__main__":
    main()
