"""Supervision of callback programs the bot launches itself (``command:`` in config).

Each is started with its address, id and secret in the environment (OCO_ADDRESS,
OCO_CALLBACK_ID, OCO_SECRET; with ``grpc.tls``, also OCO_TLS_CA, OCO_TLS_SERVER_NAME and
its client certificate in OCO_TLS_CERT and OCO_TLS_KEY), its output forwarded to the
bot's log under its id, restarted with exponential backoff when it exits, and stopped
with SIGTERM, then SIGKILL after a grace period, when the bot shuts down.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import trio

from ._config import CallbackSettings, TlsSettings
from ._timing import Backoff

log = logging.getLogger(__name__)

#: Seconds a callback gets to exit after SIGTERM before it is killed.
TERMINATE_GRACE = 5.0
#: A run this long counts as healthy: the backoff starts again from the beginning.
HEALTHY_RUN = 60.0
#: Seconds the output of an exited callback is still read (its children may hold the pipes).
DRAIN_AFTER_EXIT = 2.0


async def supervise_callback(
    settings: CallbackSettings,
    address: str,
    secret: str,
    cwd: Path | None = None,
    on_exit: Callable[[], object] | None = None,
    tls: TlsSettings | None = None,
) -> None:
    """Keep one callback program running until cancelled; ``on_exit`` is called each
    time it exits (or cannot be started). ``tls`` is the API's ``grpc.tls``, if any."""
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
        "PYTHONUNBUFFERED": "1",
        **_tls_env(settings, address, tls),
    }
    while True:
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
            log.error("cannot start callback %r (%s): %s", settings.id, " ".join(settings.command), exc)
            if on_exit is not None:
                on_exit()
        else:
            log.info("started callback %r (pid %d)", settings.id, process.pid)
            code = await _watch(process, output, settings.id)
            if on_exit is not None:
                on_exit()
            log.warning("callback %r exited with code %s", settings.id, code)
        delay = backoff.next_delay()
        log.info("restarting callback %r in %.1f s", settings.id, delay)
        await trio.sleep(delay)


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


async def _watch(process: trio.Process, output: logging.Logger, name: str) -> int:
    # The readers are shielded from the bot's shutdown: what a callback prints while it
    # stops still reaches the log, and a pipe nobody reads would block it mid-exit. They
    # get a bounded drain once it has exited (a child of it may hold the pipes open).
    readers_scope = trio.CancelScope(shield=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_output, readers_scope, process, output)
        try:
            return await process.wait()
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    await _stop(process, name)
                _signal_group(process, signal.SIGTERM)  # leftovers it started
                readers_scope.deadline = trio.current_time() + DRAIN_AFTER_EXIT


async def _read_output(scope: trio.CancelScope, process: trio.Process, output: logging.Logger) -> None:
    assert process.stdout is not None
    assert process.stderr is not None

    def forward(line: str) -> None:
        # stderr is where most programs log, at every level: not a warning by itself.
        output.info("%s", line)

    with scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_lines, process.stdout, forward)
            nursery.start_soon(read_lines, process.stderr, forward)


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
