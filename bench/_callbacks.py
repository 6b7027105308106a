"""Callback processes for the benchmarks: N SDK callbacks in one process.

    python bench/_callbacks.py ADDRESS COUNT SECRET_PREFIX

Callback i has id ``bench{i}`` and secret ``SECRET_PREFIX{i}``; it answers ``ping{i} <n>``
with ``pong <n>`` and, for callback 0, also plain ``ping <n>``.
"""

from __future__ import annotations

import sys

import trio

from oco_core import Callback, Message


def make(address: str, index: int, secret_prefix: str) -> Callback:
    callback = Callback(id=f"bench{index}", secret=f"{secret_prefix}{index}", address=address, concurrency=512)

    @callback.respond(rf"^ping{index} (\d+)$", id="numbered")
    async def numbered(message: Message) -> None:
        await message.send(f"pong {message.groups[1]}")

    if index == 0:

        @callback.respond(r"^ping (\d+)$", id="plain")
        async def plain(message: Message) -> None:
            await message.send(f"pong {message.groups[1]}")

    return callback


async def main(address: str, count: int, secret_prefix: str) -> None:
    async with trio.open_nursery() as nursery:
        for index in range(count):
            await nursery.start(make(address, index, secret_prefix).serve)
        print("ready", flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]), sys.argv[3])
