"""What bench_transport.py and its processes share: figures and child processes. No
protobuf modules here: the specification-only client must not load OCO's generated code
beside its own."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
UNIMPLEMENTED = "n/a (the bot answers UNIMPLEMENTED)"
NOT_IN_BUILD = "n/a (not in this build)"


class CaseError(Exception):
    """A case that could not finish (a process that died, replies that never came)."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    """One-at-a-time figures: median and 99th percentile in seconds, round trips a second."""
    return {
        "p50": statistics.median(latencies),
        "p99": percentile(latencies, 0.99),
        "rate": len(latencies) / elapsed,
    }


class Child:
    """A process of bench/ whose stdout is read line by line; its stderr passes through."""

    def __init__(self, name: str, process: trio.Process) -> None:
        self.name = name
        self.process = process
        self._buffer = b""

    @classmethod
    async def start(cls, name: str, script: str, *args: str, env: dict[str, str] | None = None) -> Child:
        process = await trio.lowlevel.open_process(
            [sys.executable, str(HERE / script), *args],
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        )
        return cls(name, process)

    async def line(self, timeout: float = 60) -> str:
        assert self.process.stdout is not None
        with trio.move_on_after(timeout):
            while b"\n" not in self._buffer:
                chunk = await self.process.stdout.receive_some()
                if not chunk:
                    await self.process.wait()
                    raise CaseError(f"{self.name} exited with {self.process.returncode} (its stderr is above)")
                self._buffer += chunk
            line, _, self._buffer = self._buffer.partition(b"\n")
            return line.decode().strip()
        raise CaseError(f"{self.name} printed nothing for {timeout} s")

    async def tell(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(f"{line}\n".encode())

    async def ready(self) -> bool:
        """Wait for ``ready``; False when the bot lacks the RPCs (``unimplemented``)."""
        first = await self.line()
        if first not in ("ready", "unimplemented"):
            raise CaseError(f"{self.name} said {first!r}")
        return first == "ready"

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            with trio.move_on_after(10):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
        with trio.CancelScope(shield=True):
            await self.process.wait()
