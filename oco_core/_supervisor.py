"""Supervision of callback programs the bot launches itself (``command:`` in config).

Each is started with its address, id and secret in the environment (OCO_ADDRESS,
OCO_CALLBACK_ID, OCO_SECRET), its output forwarded to the bot's log under its id,
restarted with exponential backoff when it exits, and stopped with SIGTERM, then SIGKILL
after a grace period, when the bot shuts down.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import time
from pathlib import Path

import trio

from ._config import CallbackSettings

log = logging.getLogger(__name__)

#: Seconds a callback gets to exit after SIGTERM before it is killed.
TERMINATE_GRACE = 5.0
#: A run this long counts as healthy: the backoff starts again from the beginning.
HEALTHY_RUN = 60.0


async def supervise_callback(settings: CallbackSettings, address: str, secret: str, cwd: Path | None = None) -> None:
    """Keep one callback program running until cancelled."""
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
        else:
            log.info("started callback %r (pid %d)", settings.id, process.pid)
            code = await _watch(process, output)
            log.warning("callback %r exited with code %s", settings.id, code)
        if time.monotonic() - began > HEALTHY_RUN:
            backoff = 0.5
        delay = min(backoff, settings.restart_backoff_max) * (0.75 + random.random() / 2)
        log.info("restarting callback %r in %.1f s", settings.id, delay)
        await trio.sleep(delay)
        backoff *= 2


async def _watch(process: trio.Process, output: logging.Logger) -> int:
    try:
        async with trio.open_nursery() as nursery:
            assert process.stdout is not None
            assert process.stderr is not None
            nursery.start_soon(_forward, process.stdout, output, logging.INFO)
            # stderr is where most programs log, at every level: not a warning by itself.
            nursery.start_soon(_forward, process.stderr, output, logging.INFO)
            return await process.wait()
    finally:
        if process.returncode is None:
            with trio.CancelScope(shield=True):
                await _stop(process)


async def _stop(process: trio.Process) -> None:
    process.terminate()
    with trio.move_on_after(TERMINATE_GRACE):
        await process.wait()
        return
    log.warning("callback (pid %d) ignored SIGTERM for %.0f s; killing it", process.pid, TERMINATE_GRACE)
    process.kill()
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
