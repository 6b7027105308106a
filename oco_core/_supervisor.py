"""Supervision of callback programs the bot launches itself (``command:`` in config).

Each is started with its address, id and secret in the environment (OCO_ADDRESS,
OCO_CALLBACK_ID, OCO_SECRET), its output forwarded to the bot's log under its id,
restarted with exponential backoff when it exits, and stopped with SIGTERM, then SIGKILL
after a grace period, when the bot shuts down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import trio

from ._config import CallbackSettings

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
) -> None:
    """Keep one callback program running until cancelled; ``on_exit`` is called each
    time it exits (or cannot be started)."""
    assert settings.command is not None
    backoff = 0.5
    output = logging.getLogger(f"oco.callback.{settings.id}")
    env = {
        **os.environ,
        **settings.env,
        "OCO_ADDRESS": address,
        "OCO_CALLBACK_ID": settings.id,
        "OCO_SECRET": secret,
        "PYTHONUNBUFFERED": "1",
    }
    while True:
        began = time.monotonic()
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
        if time.monotonic() - began > HEALTHY_RUN:
            backoff = 0.5
        delay = min(backoff, settings.restart_backoff_max) * (0.75 + random.random() / 2)
        log.info("restarting callback %r in %.1f s", settings.id, delay)
        await trio.sleep(delay)
        backoff *= 2


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
    with scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_forward, process.stdout, output, logging.INFO)
            # stderr is where most programs log, at every level: not a warning by itself.
            nursery.start_soon(_forward, process.stderr, output, logging.INFO)


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


async def _forward(stream: trio.abc.ReceiveStream, output: logging.Logger, level: int) -> None:
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            output.log(level, "%s", line.decode("utf-8", "replace").rstrip())
        if len(buffer) > 65536:  # a line without end: show it in pieces rather than grow
            output.log(level, "%s", buffer.decode("utf-8", "replace"))
            buffer = b""
    if buffer:
        output.log(level, "%s", buffer.decode("utf-8", "replace").rstrip())
