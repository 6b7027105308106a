"""End-to-end benchmark: in-memory adapter → router → gRPC → Python callback → gRPC → adapter.

    python bench/bench_roundtrip.py [--quick]

The bot runs in this process (so the memory adapter can be driven directly); the
callbacks run in another process, written with the Python SDK, and talk to the bot over
real gRPC on loopback. Prints:

- sequential round trips (one message, wait for its reply, repeat): rate, p50, p99;
- replies per second with many messages in flight (the SDK replies over SendMessageStream);
- the same with 100 connected callbacks, messages spread over them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

from oco_core.testing import open_bot

HERE = Path(__file__).parent
SECRET = "bench-secret-0123456789-"


def config(count: int, tmp: Path) -> str:
    callbacks = "\n".join(f"  - {{id: bench{i}, secret: {SECRET}{i}}}" for i in range(count))
    return f"""
adapters: [{{type: memory}}]
store: {{url: "sqlite:///{tmp}/bench.db"}}
grpc: {{listen: "127.0.0.1:0", stream_queue: 100000}}
log_level: WARNING
callbacks:
{callbacks}
"""


async def start_callbacks(address: str, count: int) -> trio.Process:
    process = await trio.lowlevel.open_process(
        [sys.executable, str(HERE / "_callbacks.py"), address, str(count), SECRET],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    buffer = b""
    with trio.fail_after(60):
        while b"ready" not in buffer:
            chunk = await process.stdout.receive_some()
            if not chunk:
                raise RuntimeError("the benchmark callbacks did not start")
            buffer += chunk
    return process


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sequential(adapter: object, rounds: int, text: str) -> tuple[float, list[float]]:
    from oco_core.testing import MemoryAdapter

    assert isinstance(adapter, MemoryAdapter)
    latencies = []
    began = time.perf_counter()
    for n in range(rounds):
        sent = time.perf_counter()
        await adapter.inject(text.format(n=n))
        reply = await adapter.next_sent()
        latencies.append(time.perf_counter() - sent)
        assert reply.body == f"pong {n}", reply.body
    return rounds / (time.perf_counter() - began), latencies


async def in_flight(adapter: object, total: int, texts: list[str], window: int) -> float:
    from oco_core.testing import MemoryAdapter

    assert isinstance(adapter, MemoryAdapter)
    received = 0
    began = time.perf_counter()
    limit = trio.Semaphore(window)

    async def reader() -> None:
        nonlocal received
        while received < total:
            await adapter.next_sent()
            received += 1
            limit.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        for n in range(total):
            await limit.acquire()
            await adapter.inject(texts[n % len(texts)].format(n=n))
    return total / (time.perf_counter() - began)


async def run_case(callbacks: int, quick: bool, tmp: Path) -> None:
    rounds = 500 if quick else 3000
    total = 5000 if quick else 40000
    async with open_bot(config(callbacks, tmp)) as running:
        process = await start_callbacks(running.address, callbacks)
        try:
            texts = ["oco ping {n}"] if callbacks == 1 else [f"oco ping{i} {{n}}" for i in range(callbacks)]
            await sequential(running.adapter, 200, texts[0])  # warm up
            rate, latencies = await sequential(running.adapter, rounds, texts[0])
            print(
                f"{callbacks:>3} callback(s)  sequential: {rate:8.0f} round trips/s   "
                f"p50 {statistics.median(latencies) * 1e3:6.2f} ms   p99 {percentile(latencies, 0.99) * 1e3:6.2f} ms"
            )
            replies = await in_flight(running.adapter, total, texts, window=1000)
            print(f"{callbacks:>3} callback(s)  in flight:  {replies:8.0f} replies/s      ({total} messages)")
        finally:
            process.terminate()
            await process.wait()


async def main(quick: bool) -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        await run_case(1, quick, Path(tmp))
        await run_case(100, quick, Path(tmp))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke run")
    trio.run(main, parser.parse_args().quick)
