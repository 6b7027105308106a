"""One-way latency of one item through oco_core._bridge, each direction, one at a time
(an item every 0.5 ms, so every hop wakes a waiting thread). See ../README.md."""

from __future__ import annotations

import asyncio
import statistics
import time

import trio

from oco_core._bridge import _END, _AsyncioToTrio, _TrioToAsyncio, open_bridge

COUNT = 2000


def shown(name: str, latencies: list[int]) -> str:
    ordered = sorted(latencies)
    return f"{name}: p50 {statistics.median(ordered) / 1e3:.0f} µs, p90 {ordered[len(ordered) * 9 // 10] / 1e3:.0f} µs"


async def main() -> None:
    async with open_bridge() as bridge:
        incoming: _AsyncioToTrio[int] = _AsyncioToTrio(bridge, 256)

        async def produce() -> None:
            for _ in range(COUNT):
                await incoming.send(time.perf_counter_ns())
                await asyncio.sleep(0.0005)
            incoming.close()

        producer = asyncio.run_coroutine_threadsafe(produce(), bridge._loop)
        into_trio = [time.perf_counter_ns() - sent async for sent in incoming]
        producer.result()
        print(shown("asyncio -> trio", into_trio))

        outgoing: _TrioToAsyncio[int] = _TrioToAsyncio(bridge, 256)
        into_asyncio: list[int] = []

        async def consume() -> None:
            while (sent := await outgoing.get()) is not _END:
                assert isinstance(sent, int)
                into_asyncio.append(time.perf_counter_ns() - sent)

        consumer = asyncio.run_coroutine_threadsafe(consume(), bridge._loop)
        for _ in range(COUNT):
            await outgoing.send(time.perf_counter_ns())
            await trio.sleep(0.0005)
        outgoing.close()
        while not consumer.done():
            await trio.sleep(0.01)
        print(shown("trio -> asyncio", into_asyncio))


if __name__ == "__main__":
    trio.run(main)
