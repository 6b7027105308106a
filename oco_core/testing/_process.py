"""A real ``oco run`` process, for end-to-end tests of the bot and of plugins."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio


class OcoProcess:
    """An ``oco run`` process: its gRPC address, its output, its standard input."""

    def __init__(self, process: trio.Process, address: str, workdir: Path) -> None:
        self.process = process
        self.address = address
        self.workdir = workdir
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._changed = trio.Event()

    async def write(self, line: str) -> None:
        """Type a line into the bot's standard input (the shell adapter)."""
        assert self.process.stdin is not None
        await self.process.stdin.send_all(line.encode() + b"\n")

    async def close_stdin(self) -> None:
        """End the bot's standard input."""
        assert self.process.stdin is not None
        await self.process.stdin.aclose()

    async def expect(self, pattern: str, *, stream: str = "stdout", timeout: float = 15.0) -> re.Match[str]:
        """Wait until a line of ``stream`` matches ``pattern``; fail with what was seen."""
        compiled = re.compile(pattern)
        lines = self.stdout_lines if stream == "stdout" else self.stderr_lines
        seen = 0
        with trio.move_on_after(timeout):
            while True:
                for line in lines[seen:]:
                    found = compiled.search(line)
                    if found:
                        return found
                seen = len(lines)
                if self.process.returncode is not None and seen == len(lines):
                    break
                await self._changed.wait()
        raise AssertionError(
            f"no {stream} line matched {pattern!r} within {timeout} s; "
            f"stdout: {self.stdout_lines[-20:]!r}; stderr: {self.stderr_lines[-30:]!r}"
        )

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``sig`` and wait for the process to exit; returns its exit code."""
        if self.process.returncode is None:
            self.process.send_signal(sig)
        with trio.fail_after(timeout):
            return await self.process.wait()

    async def _pump(self, stream: trio.abc.ReceiveStream, lines: list[str]) -> None:
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                lines.append(line.decode("utf-8", "replace"))
            self._signal()
        if buffer:
            lines.append(buffer.decode("utf-8", "replace"))
        self._signal()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


@asynccontextmanager
async def run_oco(
    config: str, workdir: Path, *, env: dict[str, str] | None = None, ready_timeout: float = 60.0
) -> AsyncIterator[OcoProcess]:
    """Start ``oco run`` with YAML ``config`` in ``workdir``; yield once its gRPC server
    listens. The config should set ``grpc.listen: 127.0.0.1:0``; the address is read from
    the file ``oco run --address-file`` writes. The process is stopped (SIGTERM, then
    SIGKILL) on the way out."""
    workdir.mkdir(parents=True, exist_ok=True)
    address_file = workdir / "oco.address"
    address_file.unlink(missing_ok=True)
    config_file = workdir / "oco.yaml"
    config_file.write_text(config)
    command = [
        sys.executable,
        "-m",
        "oco_core",
        "run",
        "--config",
        str(config_file),
        "--address-file",
        str(address_file),
    ]
    environment = {**os.environ, **(env or {})}
    process = await trio.lowlevel.open_process(
        command,
        cwd=workdir,
        env=environment,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    running = OcoProcess(process, "", workdir)
    try:
        async with trio.open_nursery() as nursery:
            assert process.stdout is not None
            assert process.stderr is not None
            nursery.start_soon(running._pump, process.stdout, running.stdout_lines)
            nursery.start_soon(running._pump, process.stderr, running.stderr_lines)
            with trio.move_on_after(ready_timeout):
                while not address_file.exists() and process.returncode is None:
                    await trio.sleep(0.05)
            if not address_file.exists():
                await trio.sleep(0.2)  # let the pumps collect the last words
                raise AssertionError(
                    f"oco did not start (exit code {process.returncode}); stderr: {running.stderr_lines[-30:]!r}"
                )
            running.address = address_file.read_text().strip()
            yield running
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
                with trio.move_on_after(20):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
