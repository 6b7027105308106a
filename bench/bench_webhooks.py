"""Webhook benchmark: HTTP client → ``oco run`` (Hypercorn, the EventHub, gRPC) → a
callback → RespondWebhook → HTTP response, side by side with a bare Hypercorn handler.

    python bench/bench_webhooks.py [--quick] [--repeats N] [--seconds S] [--connections C]

Three processes besides this one, which is the HTTP client (a small keep-alive HTTP/1.1
client on trio sockets, so that the client costs little next to the servers):

- ``oco run`` with ``http:`` and one callback whose webhook route is synchronous and
  verified by a bearer token;
- that callback, raw gRPC (``grpc.aio`` over the generated stubs): it answers each
  webhook request at once with ``RespondWebhook`` (a 200 echoing the body's length);
- a bare Hypercorn server (the same trio worker and settings the bot uses) whose one
  ASGI handler reads the body and answers the same, with no bot behind it.

Each repeat measures both, one after the other: sequential requests on one connection
(latency: p50 and p99) and ``--connections`` connections for ``--seconds`` (requests/s).
Printed: the median of each figure over the repeats, with its spread (min to max), and the
latency the bot adds (webhook p50 minus bare p50, per repeat).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from oco_core.testing import run_oco

TOKEN = "bench-webhook-token-0123456789"
SECRET = "bench-callback-secret-0123456789"
BODY = b'{"ref": "refs/heads/main", "commits": [1, 2, 3]}'


# -- the servers ----------------------------------------------------------------------


def bare_server(address_file: str) -> None:
    """A bare Hypercorn server, as the bot configures it, with one handler."""
    import socket

    from hypercorn.config import Config
    from hypercorn.trio import serve

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()  # type: ignore[operator]
                kind = message["type"].rpartition(".")[2]  # startup, shutdown
                await send({"type": f"lifespan.{kind}.complete"})  # type: ignore[operator]
                if kind == "shutdown":
                    return
        size = 0
        while True:
            message = await receive()  # type: ignore[operator]
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = str(size).encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": body})  # type: ignore[operator]

    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("bench.bare")  # warnings only: not its "Running on"
    config.include_server_header = False

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, app, config)
            Path(address_file).write_text(f"127.0.0.1:{port}\n")

    trio.run(main)


def raw_callback(address: str) -> None:
    """The callback: raw gRPC, answering every webhook request at once."""
    import grpc

    from oco_core._proto import robot_pb2, robot_pb2_grpc

    async def main() -> None:
        metadata = (("authorization", f"Bearer {SECRET}"),)
        async with grpc.aio.insecure_channel(address) as channel:
            robot = robot_pb2_grpc.RobotStub(channel)
            route = robot_pb2.WebhookRoute(method="POST", path="/push")
            stream = robot.Listen(robot_pb2.ListenRequest(webhooks=[route]), metadata=metadata)
            await stream.initial_metadata()
            print("ready", flush=True)
            tasks = set()
            async for event in stream:
                if not event.HasField("webhook_request"):
                    continue
                request = event.webhook_request
                answer = robot_pb2.WebhookResponse(
                    request_id=request.id,
                    headers={"content-type": "text/plain"},
                    body=str(len(request.body)).encode(),
                )
                task = asyncio.ensure_future(robot.RespondWebhook(answer, metadata=metadata))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    asyncio.run(main())


# -- the client -----------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection sending the same request again and again."""

    def __init__(self, stream: trio.SocketStream, request: bytes) -> None:
        self.stream = stream
        self.request = request
        self.buffer = b""

    @classmethod
    async def open(cls, address: str, path: str, headers: dict[str, str]) -> Connection:
        host, _, port = address.rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))
        lines = [f"POST {path} HTTP/1.1", f"Host: {address}", f"Content-Length: {len(BODY)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return cls(stream, ("\r\n".join(lines) + "\r\n\r\n").encode() + BODY)

    async def call(self) -> int:
        await self.stream.send_all(self.request)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += await self._receive()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.buffer) < length:
            self.buffer += await self._receive()
        self.buffer = self.buffer[length:]
        return status

    async def _receive(self) -> bytes:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        return chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


async def sequential(address: str, path: str, headers: dict[str, str], count: int) -> list[float]:
    connection = await Connection.open(address, path, headers)
    latencies = []
    try:
        for _ in range(20):  # warm up
            assert await connection.call() == 200
        for _ in range(count):
            began = time.perf_counter()
            status = await connection.call()
            latencies.append(time.perf_counter() - began)
            assert status == 200, status
    finally:
        await connection.aclose()
    return latencies


async def concurrent(address: str, path: str, headers: dict[str, str], connections: int, seconds: float) -> float:
    done = 0
    failed = 0

    async def worker(deadline: float) -> None:
        nonlocal done, failed
        connection = await Connection.open(address, path, headers)
        try:
            while trio.current_time() < deadline:
                if await connection.call() == 200:
                    done += 1
                else:
                    failed += 1
        finally:
            await connection.aclose()

    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        deadline = trio.current_time() + seconds
        for _ in range(connections):
            nursery.start_soon(worker, deadline)
    if failed:
        print(f"  ({failed} requests failed)")
    return done / (time.perf_counter() - began)


# -- the run --------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def spread(values: list[float], scale: float = 1.0, unit: str = "") -> str:
    med = statistics.median(values) * scale
    return f"{med:8.2f}{unit} (min {min(values) * scale:.2f}, max {max(values) * scale:.2f})"


async def wait_ready(process: trio.Process) -> None:
    assert process.stdout is not None
    buffer = b""
    with trio.fail_after(60):
        while b"ready" not in buffer:
            chunk = await process.stdout.receive_some()
            if not chunk:
                raise RuntimeError("the benchmark callback did not start")
            buffer += chunk


async def wait_file(path: Path) -> str:
    with trio.fail_after(60):
        while not path.exists() or not path.read_text().strip():
            await trio.sleep(0.05)
    return path.read_text().strip()


def config(tmp: Path) -> str:
    return f"""
adapters: [{{type: memory}}]
store: {{url: "sqlite:///{tmp}/bench.db"}}
grpc: {{listen: "127.0.0.1:0"}}
http: {{listen: "127.0.0.1:0", address_file: {tmp}/http.address, webhook_rate_limit: 100000000,
        max_pending_webhooks: 100000}}
log_level: WARNING
callbacks:
  - id: bench
    secret: {SECRET}
    webhook_auth: {{bearer: {TOKEN}}}
"""


async def main(args: argparse.Namespace) -> None:
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores")
    print(
        f"{args.repeats} repeats; {args.sequential} sequential requests and {args.connections} connections "
        f"for {args.seconds:g} s each; body {len(BODY)} bytes"
    )
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        async with run_oco(config(tmp), tmp / "bot") as oco, trio.open_nursery() as nursery:
            http = await wait_file(tmp / "http.address")
            me = [sys.executable, __file__]
            callback = await trio.lowlevel.open_process([*me, "--callback", oco.address], stdout=subprocess.PIPE)
            bare_file = tmp / "bare.address"
            bare = await trio.lowlevel.open_process([*me, "--bare", str(bare_file)])
            try:
                await wait_ready(callback)
                bare_address = await wait_file(bare_file)
                hook = (http, "/hooks/bench/push", {"Authorization": f"Bearer {TOKEN}"})
                plain = (bare_address, "/push", {})
                figures: dict[str, list[float]] = {}
                for repeat in range(args.repeats):
                    row = {}
                    for name, (address, path, headers) in (("bare", plain), ("webhook", hook)):
                        latencies = await sequential(address, path, headers, args.sequential)
                        row[f"{name} p50"] = percentile(latencies, 0.5)
                        row[f"{name} p99"] = percentile(latencies, 0.99)
                        row[f"{name} req/s"] = await concurrent(address, path, headers, args.connections, args.seconds)
                    row["added p50"] = row["webhook p50"] - row["bare p50"]
                    for key, value in row.items():
                        figures.setdefault(key, []).append(value)
                    print(
                        f"  repeat {repeat + 1}: bare {row['bare req/s']:.0f} req/s, webhook "
                        f"{row['webhook req/s']:.0f} req/s, p50 {row['bare p50'] * 1e3:.2f} / "
                        f"{row['webhook p50'] * 1e3:.2f} ms"
                    )
                print()
                print("median over repeats (spread):")
                for name in ("bare", "webhook"):
                    print(f"  {name:8} sequential p50  {spread(figures[f'{name} p50'], 1e3, ' ms')}")
                    print(f"  {name:8} sequential p99  {spread(figures[f'{name} p99'], 1e3, ' ms')}")
                    print(f"  {name:8} {args.connections} connections {spread(figures[f'{name} req/s'], 1, ' req/s')}")
                print(f"  added by the bot, p50    {spread(figures['added p50'], 1e3, ' ms')}")
                ratio = [w / b for w, b in zip(figures["webhook req/s"], figures["bare req/s"], strict=True)]
                print(f"  webhook / bare req/s     {spread(ratio)}")
            finally:
                for process in (callback, bare):
                    process.terminate()
                    with trio.CancelScope(shield=True):
                        await process.wait()
                nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shorter runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--sequential", type=int, default=500)
    parser.add_argument("--callback", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--bare", metavar="ADDRESS_FILE", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.callback:
        raw_callback(options.callback)
    elif options.bare:
        bare_server(options.bare)
    else:
        if options.quick:
            options.repeats, options.seconds, options.sequential = 3, 1.0, 200
        trio.run(main, options)
