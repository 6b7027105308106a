"""The bot's memory with Listen streams that never read, flooded with large messages.

    python bench/bench_memory.py [--messages 300] [--size 1000000] [--rounds 2]

A real ``oco run`` (memory adapter, SQLite) with two callbacks whose streams declare a
hear route matching everything and then never read (on channels whose HTTP/2 window
stays small, so the events wait in the bot, not in the transport). ``--messages`` chat
messages of ``--size`` bytes are written through the memory adapter's control service;
then the bot's peak resident memory (VmHWM) is read from /proc.

Two contenders, side by side in each round:

- ``bytes unbounded``: ``grpc.stream_queue_bytes`` so large that only the count bound
  (``grpc.stream_queue``, 1,000 events) applies, as before the byte bound existed;
- ``default``: the byte bound of 16 MiB per stream.

Each queued match shares the message with the other matches of it; before that, each
event held its own copy of the body (and of the text and groups).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
from pathlib import Path

import grpc
import trio

from oco_core._proto import control_pb2, control_pb2_grpc, robot_pb2, robot_pb2_grpc
from oco_core.testing import run_oco

SECRETS = {"slow1": "bench-slow-one-0123456789", "slow2": "bench-slow-two-0123456789"}
#: As the conformance suite's stream/dropped-count: no BDP probing, a 16 KiB window.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)]


def config(queue_bytes: int) -> str:
    callbacks = "\n".join(f"  - {{id: {cid}, secret: {secret}}}" for cid, secret in SECRETS.items())
    return f"""
adapters: [{{type: memory, control: "127.0.0.1:0", control_address_file: control.address}}]
store: {{url: "sqlite:///./oco.db"}}
grpc: {{listen: "127.0.0.1:0", stream_queue_bytes: {queue_bytes}, max_receive_bytes: 16000000}}
log_level: WARNING
callbacks:
{callbacks}
"""


def hold_stream(address: str, secret: str, opened: threading.Event, done: threading.Event) -> None:
    """Open a Listen stream that matches everything, wait for its headers, then never read."""
    with grpc.insecure_channel(address, options=SMALL_WINDOW) as channel:
        request = robot_pb2.ListenRequest(routes=[robot_pb2.Route(id="all", pattern="^x")])
        stream = robot_pb2_grpc.RobotStub(channel).Listen(request, metadata=(("authorization", f"Bearer {secret}"),))
        stream.initial_metadata()
        opened.set()
        done.wait()
        stream.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leave it untyped


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


async def measure(queue_bytes: int, messages: int, size: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        async with run_oco(config(queue_bytes), Path(tmp)) as bot:
            control = await bot.written("control.address")
            done = threading.Event()
            async with trio.open_nursery() as nursery:
                for secret in SECRETS.values():
                    opened = threading.Event()
                    nursery.start_soon(trio.to_thread.run_sync, hold_stream, bot.address, secret, opened, done)
                    await trio.to_thread.run_sync(opened.wait)
                body = "x" + "y" * (size - 1)

                def flood() -> None:
                    options = [("grpc.max_send_message_length", size + 1024)]
                    with grpc.insecure_channel(control, options=options) as channel:
                        inject = control_pb2_grpc.MemoryControlStub(channel).Inject
                        for _ in range(messages):
                            inject(control_pb2.InjectRequest(body=body, user="alice", room="general"), timeout=60)

                await trio.to_thread.run_sync(flood)
                rss = peak_rss_mb(bot.process.pid)
                done.set()
        return rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    contenders = {"bytes unbounded": 1 << 40, "default (16 MiB a stream)": 16 << 20}
    peaks: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(options.rounds):
        for name, queue_bytes in contenders.items():
            peaks[name].append(trio.run(measure, queue_bytes, options.messages, options.size))
    print(f"{options.messages} messages of {options.size:,} bytes at 2 streams that never read; bot's peak RSS:")
    for name, values in peaks.items():
        print(f"  {name:<26} {statistics.median(values):7.0f} MB (range {min(values):.0f}-{max(values):.0f})")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
