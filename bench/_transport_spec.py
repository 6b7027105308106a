"""A callback built from the OpenChatOps specification's two .proto files alone, for
bench_transport.py.

    PYTHONPATH=<stubs> python bench/_transport_spec.py ADDRESS ID SECRET

<stubs> holds what protoc generated from tests/spec_proto (bench_transport.py makes it);
nothing of OCO is imported, since its generated modules would clash with these in one
descriptor pool. The routes are the operator's (the bot's config), since the
specification has no way to declare one. Listen, and one unary SendMessages per event
("pong <n>" for "oco ping <n>"), each in its own task so that many can be in flight, as
a client of the specification would do it. Prints ``ready`` once the stream is open and
runs until terminated.
"""

from __future__ import annotations

import asyncio
import re
import sys
from typing import Any

import core_pb2  # type: ignore[import-not-found]  # generated at run time
import grpc
import grpc.aio
import robot_pb2  # type: ignore[import-not-found]
import robot_pb2_grpc  # type: ignore[import-not-found]

NUMBER = re.compile(r"(\d+)$")


async def main(address: str, callback_id: str, secret: str) -> None:
    metadata = (("authorization", f"Bearer {secret}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = robot_pb2_grpc.RobotStub(channel)
        call = stub.Listen(robot_pb2.ListenRequest(plugin_id=callback_id), metadata=metadata)
        await call.initial_metadata()
        if call.done():
            raise SystemExit(f"the bot refused the stream: {await call.code()}: {await call.details()}")
        print("ready", flush=True)
        pending: set[asyncio.Future[Any]] = set()

        async def answer(event: Any) -> None:
            message = event.matched_message.message
            number = NUMBER.search(message.body)
            body = f"pong {number.group(1) if number else '?'}"
            reply = core_pb2.Message(body=body, source=core_pb2.Source(room=message.source.room))
            try:
                await stub.SendMessages(robot_pb2.SendMessagesRequest(messages=[reply]), metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                print(f"SendMessages: {exc.code().name}: {exc.details()}", file=sys.stderr, flush=True)

        async for event in call:
            task = asyncio.ensure_future(answer(event))
            pending.add(task)
            task.add_done_callback(pending.discard)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
