"""Real processes for end-to-end tests of the bot and of plugins: ``oco run``
(:func:`run_oco`), one-shot ``oco`` commands (:func:`oco_cli`), any process's output line
by line (:class:`Lines`), and a free port to give a server (:func:`free_port`)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from .._supervisor import read_lines


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on (bound, then released), for a
    server a test starts. Another process may take it meanwhile; tests accept that
    small race, as every test suite that starts servers on fixed ports does."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def oco_cli(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m oco_core ARGS`` in ``cwd`` until it exits and collect what it
    printed (as text; its exit code is the caller's to check).

    The environment is this process's, without ``OCO_CONFIG`` (a developer's own config
    must not leak in) and with ``XDG_DATA_HOME`` under ``cwd`` (nor their data), then
    ``env`` on top: ``env={"TZ": "UTC"}`` pins the time zone of printed times, say.
    Blocking: from a trio test call it with ``trio.to_thread.run_sync``."""
    environment = {k: v for k, v in os.environ.items() if k != "OCO_CONFIG"}
    environment["XDG_DATA_HOME"] = str(cwd / "xdg")
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "oco_core", *args],
        cwd=cwd,
        env=environment,
        stdin=subprocess.DEVNULL,  # nothing to answer: a command that reads input sees its end
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Lines:
    """One output stream of a process, line by line as it comes, to wait on.

    Start :meth:`pump` in a nursery with the process's ``stdout`` or ``stderr``; then
    :meth:`wait_for` a line. ``lines`` holds every line so far (decoded as
    :func:`~oco_core._supervisor.read_lines` does: UTF-8, without line endings)."""

    def __init__(self, name: str = "output") -> None:
        #: What the stream is, for failure messages ("stderr", "the node callback's stderr").
        self.name = name
        self.lines: list[str] = []
        #: Whether the stream has ended (the process closed it, usually by exiting).
        self.ended = False
        self._changed = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        """Collect ``stream`` until it ends."""
        try:
            await read_lines(stream, self._add)
        finally:
            self.ended = True
            self._wake()

    def matches(self, pattern: str | re.Pattern[str]) -> list[re.Match[str]]:
        """The lines so far that ``pattern`` matches (``re.search``), in order."""
        compiled = re.compile(pattern)
        return [m for line in self.lines if (m := compiled.search(line))]

    async def match(
        self, pattern: str | re.Pattern[str], *, count: int = 1, timeout: float = 30.0
    ) -> re.Match[str] | None:
        """The ``count``-th line ``pattern`` matches, once it is there; None when it is
        not within ``timeout`` seconds or the stream ends without it."""
        compiled = re.compile(pattern)
        found = 0
        seen = 0
        with trio.move_on_after(timeout):
            while True:
                for line in self.lines[seen:]:
                    seen += 1
                    m = compiled.search(line)
                    if m is not None:
                        found += 1
                        if found == count:
                            return m
                if self.ended:
                    return None
                await self._changed.wait()
        return None

    async def wait_for(self, pattern: str | re.Pattern[str], *, count: int = 1, timeout: float = 30.0) -> re.Match[str]:
        """:meth:`match`, failing the test (AssertionError, with the last lines) when the
        line does not come."""
        found = await self.match(pattern, count=count, timeout=timeout)
        if found is None:
            why = "the stream ended" if self.ended else f"{timeout} s passed"
            raise AssertionError(
                f"{self.name}: {count} line(s) matching {_pattern(pattern)!r} expected, {why} with "
                f"{len(self.matches(pattern))}; last lines: {self.lines[-30:]!r}"
            )
        return found

    async def wait_ended(self, timeout: float = 10.0) -> bool:
        """Wait until the stream has ended (every line is in ``lines``); False when it
        has not within ``timeout`` seconds (a child of the process may hold it open)."""
        with trio.move_on_after(timeout):
            while not self.ended:
                await self._changed.wait()
        return self.ended

    def _add(self, line: str) -> None:
        self.lines.append(line)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


def _pattern(pattern: str | re.Pattern[str]) -> str:
    return pattern if isinstance(pattern, str) else pattern.pattern


class OcoProcess:
    """An ``oco run`` process: its gRPC address, its output, its standard input."""

    def __init__(self, process: trio.Process, address: str, workdir: Path) -> None:
        self.process = process
        self.address = address
        self.workdir = workdir
        #: Its standard output (what the shell adapter says) and error (its log).
        self.stdout = Lines("stdout")
        self.stderr = Lines("stderr")

    @property
    def stdout_lines(self) -> list[str]:
        """Its standard output so far, line by line."""
        return self.stdout.lines

    @property
    def stderr_lines(self) -> list[str]:
        """Its standard error (its log) so far, line by line."""
        return self.stderr.lines

    async def write(self, line: str) -> None:
        """Type a line into the bot's standard input (the shell adapter)."""
        assert self.process.stdin is not None
        await self.process.stdin.send_all(line.encode() + b"\n")

    async def close_stdin(self) -> None:
        """End the bot's standard input."""
        assert self.process.stdin is not None
        await self.process.stdin.aclose()

    async def expect(
        self, pattern: str, *, stream: str = "stdout", timeout: float = 15.0, count: int = 1
    ) -> re.Match[str]:
        """Wait until the ``count``-th line of ``stream`` ("stdout" or "stderr") matches
        ``pattern``; fail with what was seen."""
        lines = self.stdout if stream == "stdout" else self.stderr
        found = await lines.match(pattern, count=count, timeout=timeout)
        if found is None:
            raise AssertionError(
                f"no {stream} line matched {pattern!r}{f' {count} times' if count > 1 else ''} within {timeout} s; "
                f"stdout: {self.stdout_lines[-20:]!r}; stderr: {self.stderr_lines[-30:]!r}"
            )
        return found

    async def written(self, path: Path | str, *, timeout: float = 30.0) -> str:
        """The text of the file ``path`` (relative to the working folder), stripped, once
        the bot has written it, such as a memory adapter's ``control_address_file``
        (written whole, by rename). Fails with the bot's output when the file is not there
        within ``timeout`` seconds or the bot exits first."""
        text = await _wait_for_file(self.workdir / path, self.process, timeout)
        if text is None:
            await self._collect_output()
            why = (
                f"exited with {self.process.returncode}"
                if self.process.returncode is not None
                else f"{timeout} s passed"
            )
            raise AssertionError(
                f"oco did not write {path} ({why}); "
                f"stdout: {self.stdout_lines[-20:]!r}; stderr: {self.stderr_lines[-30:]!r}"
            )
        return text

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``sig`` and wait for the process to exit; returns its exit code. Its output
        is then read to the end, so ``stdout_lines`` and ``stderr_lines`` hold its last words."""
        if self.process.returncode is None:
            self.process.send_signal(sig)
        with trio.fail_after(timeout):
            code = await self.process.wait()
        await self._collect_output()
        return code

    async def _collect_output(self) -> None:
        """Once the process has exited, wait (briefly) for the pumps to read what it wrote last."""
        if self.process.returncode is not None:
            await self.stdout.wait_ended(5)
            await self.stderr.wait_ended(5)


async def _wait_for_file(path: Path, process: trio.Process, timeout: float) -> str | None:
    """The stripped text of ``path`` once it exists and is not empty; None when it does not
    within ``timeout`` seconds or ``process`` exits first. Writers rename the file into
    place, so a file that exists is whole; polling is all a file offers to wait on."""
    with trio.move_on_after(timeout):
        while True:
            exited = process.returncode is not None  # before reading: it may write, then exit
            try:
                text = path.read_text().strip()
            except FileNotFoundError:
                text = ""
            if text:
                return text
            if exited:
                return None
            await trio.sleep(0.02)
    return None


async def end_process(process: trio.Process, grace: float = 20.0) -> None:
    """Stop ``process`` if it still runs: SIGTERM, then SIGKILL after ``grace`` seconds.
    Call it shielded from cancellation, on the way out of a test."""
    if process.returncode is None:
        process.terminate()
        with trio.move_on_after(grace):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


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
            nursery.start_soon(running.stdout.pump, process.stdout)
            nursery.start_soon(running.stderr.pump, process.stderr)
            address = await _wait_for_file(address_file, process, ready_timeout)
            if address is None:
                await running._collect_output()
                why = (
                    f"exited with {process.returncode}"
                    if process.returncode is not None
                    else f"did not listen within {ready_timeout} s"
                )
                raise AssertionError(f"oco {why}; stderr: {running.stderr_lines[-30:]!r}")
            running.address = address
            yield running
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await end_process(process)


@asynccontextmanager
async def oco_on_a_pty(
    config: str, workdir: Path, env: Mapping[str, str] = {}
) -> AsyncIterator[tuple[trio.Process, trio.lowlevel.FdStream, int]]:
    """For oco-core's tests of the shell on a real terminal. Start ``oco run`` with
    ``config`` on a new pseudo-terminal (200 columns, so that
    nothing wraps) as its controlling terminal; yield the process, the terminal's master
    end and its slave's descriptor. ``env`` is added to a known terminal (xterm, no
    NO_COLOR), the data (history) under ``workdir``, and readline's default keys
    whatever the developer's ~/.inputrc says."""
    import fcntl  # POSIX only, as pseudo-terminals are
    import struct
    import termios

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "oco.yaml").write_text(config)
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    environment = {k: v for k, v in os.environ.items() if k not in ("OCO_CONFIG", "NO_COLOR")}
    environment.update(TERM="xterm", XDG_DATA_HOME=str(workdir / "xdg"), INPUTRC="/dev/null", **env)

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "oco_core", "run", "--config", str(workdir / "oco.yaml")],
        cwd=workdir,
        env=environment,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        preexec_fn=controlling_terminal,
    )
    stream = trio.lowlevel.FdStream(master)
    try:
        yield process, stream, slave
    finally:
        with trio.CancelScope(shield=True):
            await end_process(process)
            await stream.aclose()
            os.close(slave)
