"""Supervision of callback programs the bot launches itself (``command:`` in config).

Each is started with its address, id and secret in the environment (OCO_ADDRESS,
OCO_CALLBACK_ID, OCO_SECRET; OCO_BOT_PID, the bot's process id; with ``grpc.tls``, also
OCO_TLS_CA, OCO_TLS_SERVER_NAME and its client certificate in OCO_TLS_CERT and
OCO_TLS_KEY), its output forwarded to the
bot's log under its id, restarted with exponential backoff when it exits, and stopped
with SIGTERM, then SIGKILL after a grace period, when the bot shuts down.

Its PATH starts with the bot's interpreter directory (see
:func:`~._config.callback_search_path`). Restarting stops, with one ERROR line, when
restarting cannot help: the callback exited with :data:`~._errors.EXIT_REFUSED` (the bot
refused it for good), or it failed the same way ``give_up_after`` starts in a row.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import signal
import subprocess
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from ._config import CallbackSettings, TlsSettings, callback_search_path
from ._errors import EXIT_REFUSED
from ._timing import Backoff, TokenBucket

log = logging.getLogger(__name__)

#: Seconds a callback gets to exit after SIGTERM before it is killed.
TERMINATE_GRACE = 5.0
#: A run this long counts as healthy: the backoff starts again from the beginning.
HEALTHY_RUN = 60.0
#: Seconds the output of an exited callback is still read (its children may hold the pipes).
DRAIN_AFTER_EXIT = 2.0
#: Output lines of a run kept to say why it ended.
_TAIL_LINES = 20


@dataclass(slots=True)
class _Run:
    """How one start of a callback ended: what decides whether to start it again."""

    #: Its exit status, or None when it could not be started.
    code: int | None
    #: The last non-blank line it printed (or why it could not start).
    last_line: str
    seconds: float

    def same_failure(self, other: _Run | None) -> bool:
        return other is not None and (self.code, self.last_line) == (other.code, other.last_line)

    def describe(self) -> str:
        what = "could not start" if self.code is None else f"exit code {self.code}"
        return f"{what}: {self.last_line}" if self.last_line else what


async def supervise_callback(
    settings: CallbackSettings,
    address: str,
    secret: str,
    cwd: Path | None = None,
    on_exit: Callable[[str], object] | None = None,
    tls: TlsSettings | None = None,
    on_give_up: Callable[[str], object] | None = None,
    on_restart: Callable[[], object] | None = None,
) -> None:
    """Keep one callback program running until cancelled, or until restarting it cannot
    help (then ``on_give_up`` gets the reason and this returns). ``on_exit`` is called
    each time it exits (or cannot be started) with how it failed ("" for exit code 0),
    ``on_restart`` before each new start. ``tls`` is the API's ``grpc.tls``, if any."""
    assert settings.command is not None
    # A quarter of jitter at most: each restart's delay stays longer than the last (the
    # log shows the growth), while callbacks of bots restarted together still spread.
    backoff = Backoff(0.5, settings.restart_backoff_max, jitter=0.25, healthy_after=HEALTHY_RUN)
    output = logging.getLogger(f"oco.callback.{settings.id}")
    env = {
        # Only what inherit_env names: the bot's environment holds the passwords its
        # config reads (${PGPASSWORD}), which are not the callback's business. OCO_TLS_*
        # left in it would make a callback of a plaintext bot dial TLS; only the bot's
        # config (or the callback's env:) sets them.
        **{
            name: value
            for name, value in os.environ.items()
            if not name.startswith("OCO_") and any(fnmatch.fnmatchcase(name, p) for p in settings.inherit_env)
        },
        **settings.env,
        "OCO_ADDRESS": address,
        "OCO_CALLBACK_ID": settings.id,
        "OCO_SECRET": secret,
        "OCO_LOG_FORMAT": "bare",  # its log lines without the time and name this log adds
        # Says it was launched: a callback left behind by a bot that was killed (SIGKILL,
        # a crash) can see its parent go and stop, instead of dialling a dead address.
        "OCO_BOT_PID": str(os.getpid()),
        "PATH": callback_search_path(settings)[0],
        "PYTHONUNBUFFERED": "1",
        **_tls_env(settings, address, tls),
    }
    previous: _Run | None = None
    identical = 0
    # Across restarts: a burst of ten seconds' worth (a long traceback), then the rate.
    rate = settings.output_lines_per_second
    pace = TokenBucket(max(1.0, rate * 10), rate)
    while True:
        started = trio.current_time()
        tail: deque[str] = deque(maxlen=_TAIL_LINES)
        try:
            process = await trio.lowlevel.open_process(
                settings.command,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C in the terminal reaches the bot only; it stops callbacks itself
            )
        except OSError as exc:
            run = _Run(None, str(exc), 0.0)
            log.error("cannot start callback %r (%s): %s", settings.id, " ".join(settings.command), exc)
            if on_exit is not None:
                on_exit(run.describe())
        else:
            log.info("started callback %r (pid %d)", settings.id, process.pid)
            code = await _watch(process, output, settings.id, tail, pace)
            last = next((line.strip() for line in reversed(tail) if line.strip()), "")
            run = _Run(code, last, trio.current_time() - started)
            if on_exit is not None:
                on_exit(run.describe() if code else "")
            log.warning(
                "callback %r exited with code %s after %.1f s%s",
                settings.id,
                code,
                run.seconds,
                f": {run.last_line}" if run.last_line else "",
            )
        identical = identical + 1 if run.seconds < HEALTHY_RUN and run.same_failure(previous) else 1
        previous = run
        reason = _why_not_restart(settings, run, identical)
        if reason is not None:
            log.error("callback %r %s; not restarting it: %s", settings.id, reason, _FIX)
            if on_give_up is not None:
                on_give_up(reason)
            return
        delay = backoff.next_delay()
        log.info("restarting callback %r in %.1f s", settings.id, delay)
        await trio.sleep(delay)
        if on_restart is not None:
            on_restart()


_FIX = "fix it, then restart the bot"


def _why_not_restart(settings: CallbackSettings, run: _Run, identical: int) -> str | None:
    """Why starting the callback again cannot help, or None to restart it."""
    if run.code == EXIT_REFUSED:
        return f"was refused by the bot for good ({run.describe()})"
    if settings.give_up_after and identical >= settings.give_up_after:
        return f"failed the same way {identical} times in a row ({run.describe()})"
    return None


def _tls_env(settings: CallbackSettings, address: str, tls: TlsSettings | None) -> dict[str, str]:
    """How a launched callback dials the API over TLS (nothing when it is plaintext)."""
    if tls is None:
        return {}
    # The address's host is grpc.listen's, bracketed if IPv6; a certificate names it bare.
    env = {"OCO_TLS_SERVER_NAME": tls.server_name or address.rpartition(":")[0].strip("[]")}
    # Absolute: a callback may run in a cwd of its own.
    if tls.server_ca is not None:
        env["OCO_TLS_CA"] = str(tls.server_ca.absolute())
    if settings.tls_cert is not None and settings.tls_key is not None:
        env["OCO_TLS_CERT"] = str(settings.tls_cert.absolute())
        env["OCO_TLS_KEY"] = str(settings.tls_key.absolute())
    return env


async def _watch(process: trio.Process, output: logging.Logger, name: str, tail: deque[str], pace: TokenBucket) -> int:
    # The readers are shielded from the bot's shutdown: what a callback prints while it
    # stops still reaches the log, and a pipe nobody reads would block it mid-exit. They
    # get a bounded drain once it has exited (a child of it may hold the pipes open).
    readers_scope = trio.CancelScope(shield=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_output, readers_scope, process, output, tail, pace)
        try:
            return await process.wait()
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    await _stop(process, name)
                _signal_group(process, signal.SIGTERM)  # leftovers it started
                readers_scope.deadline = trio.current_time() + DRAIN_AFTER_EXIT


async def _read_output(
    scope: trio.CancelScope, process: trio.Process, output: logging.Logger, tail: deque[str], pace: TokenBucket
) -> None:
    assert process.stdout is not None
    assert process.stderr is not None

    dropped = 0

    def report_dropped() -> None:
        nonlocal dropped
        if dropped:
            output.warning(
                "%d line(s) of this callback's output dropped: over %g lines/s (callbacks[].output_lines_per_second)",
                dropped,
                pace.per_second,
            )
            dropped = 0

    def forward(line: str) -> None:
        nonlocal dropped
        # stderr is where most programs log, at every level: not a warning by itself. A
        # line that starts with a level's name (OCO_LOG_FORMAT=bare) is at that level.
        level = logging.INFO
        name, _, text = line.partition(" ")
        if text and name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            level, line = logging.getLevelName(name), text
        tail.append(line)
        # A callback printing in a loop must not fill the disk or take the bot's CPU.
        if pace.take():
            dropped += 1
            return
        report_dropped()
        output.log(level, "%s", line)

    with scope:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_lines, process.stdout, forward)
                nursery.start_soon(read_lines, process.stderr, forward)
        finally:
            report_dropped()


def _signal_group(process: trio.Process, signum: int) -> None:
    # Each callback leads its own session (start_new_session), so its process group
    # holds it and whatever it started.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


async def _stop(process: trio.Process, name: str) -> None:
    _signal_group(process, signal.SIGTERM)
    with trio.move_on_after(TERMINATE_GRACE):
        await process.wait()
        return
    log.warning("callback %r (pid %d) ignored SIGTERM for %.0f s; killing it", name, process.pid, TERMINATE_GRACE)
    _signal_group(process, signal.SIGKILL)
    await process.wait()


#: The longest line :func:`read_lines` holds back; a longer one comes in pieces this long.
MAX_LINE = 65536


async def read_lines(
    stream: trio.abc.ReceiveStream, on_line: Callable[[str], object], max_line: int = MAX_LINE
) -> None:
    """Call ``on_line`` with each line of a process's output until ``stream`` ends: UTF-8
    (undecodable bytes replaced), without its line ending (``\\n`` or ``\\r\\n``); an
    unterminated last line counts. Once more than ``max_line`` bytes of a line wait for
    its end, they are handed over in pieces of that size rather than held without bound
    (a line that ends within the chunk at hand comes whole). The one reader of process
    output: the supervisor logs callbacks' lines with it, :class:`oco_core.testing.Lines`
    collects them for tests."""

    def deliver(raw: bytes) -> None:
        on_line(raw.removesuffix(b"\r").decode("utf-8", "replace"))

    buffer = b""
    async for chunk in stream:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            deliver(line)
        while len(buffer) > max_line:
            deliver(buffer[:max_line])
            buffer = buffer[max_line:]
    if buffer:
        deliver(buffer)
