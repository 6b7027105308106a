"""Callback programs the bot launches (``command:``): their environment, their output in
the bot's log, restarts with backoff, and TERM-then-KILL at shutdown. Real ``oco run``,
real child processes."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import trio

from oco_core._proto import storage_pb2, storage_pb2_grpc
from oco_core.testing import OcoProcess, run_oco

PYTHON = json.dumps(sys.executable)

# Writes the environment it was given to a file (atomically), says so without showing
# the secret, then waits to be stopped. It never connects, which these tests do not need.
PROBE = """\
import hashlib, json, os, pathlib, sys, time
names = ["OCO_ADDRESS", "OCO_CALLBACK_ID", "OCO_SECRET", "OCO_TEST_GREETING", "OCO_BOT_PID"]
found = {name: os.environ.get(name) for name in names}
target = pathlib.Path(sys.argv[1])
target.with_suffix(".tmp").write_text(json.dumps(found))
target.with_suffix(".tmp").replace(target)
digest = hashlib.sha256((found["OCO_SECRET"] or "").encode()).hexdigest()[:12]
print("environment written; secret of", len(found["OCO_SECRET"] or ""), "characters, sha256", digest, flush=True)
time.sleep(3600)
"""

# Notes SIGTERM in a file (not on stdout: see test_output_while_stopping_reaches_the_log)
# and carries on.
STUBBORN = """\
import pathlib, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: pathlib.Path(sys.argv[1]).write_text("SIGTERM"))
print("ready", flush=True)
while True:
    time.sleep(3600)
"""

# Says goodbye on SIGTERM, then exits as asked.
POLITE = """\
import signal, sys, time
def bye(*_):
    print("goodbye from stdout", flush=True)
    print("goodbye from stderr", file=sys.stderr, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def started_pids(bot: OcoProcess, callback_id: str) -> list[int]:
    """The pids the bot logged for ``callback_id``, in order."""
    started = re.compile(rf"started callback '{re.escape(callback_id)}' \(pid (\d+)\)")
    return [int(m.group(1)) for line in bot.stderr_lines if (m := started.search(line))]


async def wait_for_lines(bot: OcoProcess, pattern: str, count: int, timeout: float = 60.0) -> list[re.Match[str]]:
    """Wait until ``count`` stderr lines match ``pattern``; all that match."""
    await bot.stderr.wait_for(pattern, count=count, timeout=timeout)
    return bot.stderr.matches(pattern)


def storage_call(address: str, secret: str) -> grpc.StatusCode:
    """The status of one Storage.Set made with ``secret``."""
    with grpc.insecure_channel(address) as channel:
        stub = storage_pb2_grpc.StorageStub(channel)
        try:
            stub.Set(
                storage_pb2.SetRequest(key="probe", value=b"1"),
                metadata=(("authorization", f"Bearer {secret}"),),
                timeout=30,
            )
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_launched_callback_gets_address_id_and_its_own_secret(
    tmp_path: Path, bot_config: Callable[[str], str], process_running: Callable[[int], bool]
) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    config = bot_config(
        f"""\
callbacks:
  - id: probe-a
    command: [{PYTHON}, "{probe}", "{tmp_path / "a.json"}"]
    env: {{OCO_TEST_GREETING: hello}}
  - id: probe-b
    command: [{PYTHON}, "{probe}", "{tmp_path / "b.json"}"]
"""
    )
    async with run_oco(config, tmp_path / "bot") as bot:
        await bot.expect(r"oco\.callback\.probe-a: environment written; secret of \d+ characters", stream="stderr")
        await bot.expect(r"oco\.callback\.probe-b: environment written", stream="stderr")
        a = json.loads((tmp_path / "a.json").read_text())
        b = json.loads((tmp_path / "b.json").read_text())
        assert a["OCO_ADDRESS"] == b["OCO_ADDRESS"] == bot.address
        assert (a["OCO_CALLBACK_ID"], b["OCO_CALLBACK_ID"]) == ("probe-a", "probe-b")
        assert (a["OCO_TEST_GREETING"], b["OCO_TEST_GREETING"]) == ("hello", None)
        assert a["OCO_BOT_PID"] == b["OCO_BOT_PID"] == str(bot.process.pid)
        assert len(a["OCO_SECRET"]) >= 32
        assert a["OCO_SECRET"] != b["OCO_SECRET"], "each callback needs a secret of its own"
        # The secret is the one the bot accepts from that callback.
        assert await trio.to_thread.run_sync(storage_call, bot.address, a["OCO_SECRET"]) == grpc.StatusCode.OK
        assert await trio.to_thread.run_sync(storage_call, bot.address, a["OCO_SECRET"][:-1]) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        pids = started_pids(bot, "probe-a") + started_pids(bot, "probe-b")
        assert await bot.stop(signal.SIGTERM) == 0
    assert not [pid for pid in pids if process_running(pid)], "a callback outlived the bot"
    output = "\n".join(bot.stdout_lines + bot.stderr_lines)
    assert a["OCO_SECRET"] not in output
    assert b["OCO_SECRET"] not in output


async def test_an_sdk_callback_stops_by_itself_when_the_bot_that_launched_it_is_killed(
    tmp_path: Path, bot_config: Callable[[str], str], process_running: Callable[[int], bool]
) -> None:
    # A bot killed with SIGKILL (or crashed) cannot stop what it launched; the callback
    # would otherwise dial the dead address for ever, a process nobody supervises.
    config = bot_config(f'callbacks:\n  - {{id: ping, command: [{PYTHON}, "-m", "oco_core.examples.ping"]}}\n')
    async with run_oco(config, tmp_path / "bot") as bot:
        await bot.expect(r"callback 'ping' is listening", stream="stderr")
        [pid] = started_pids(bot, "ping")
        bot.process.send_signal(signal.SIGKILL)
        with trio.fail_after(15):
            while process_running(pid):
                await trio.sleep(0.1)


async def test_an_sdk_callback_whose_bot_died_before_it_started_stops_at_once(tmp_path: Path) -> None:
    # The bot may die in the second a Python callback takes to start: its parent is then
    # init already, so only the bot's own process id can tell.
    finished = await trio.lowlevel.open_process(["true"])
    await finished.wait()
    env = {
        **os.environ,
        "OCO_ADDRESS": "127.0.0.1:1",  # nothing listens: it would retry for ever
        "OCO_CALLBACK_ID": "ping",
        "OCO_SECRET": "s" * 32,
        "OCO_BOT_PID": str(finished.pid),  # a process that has ended
        "OCO_LOG_FORMAT": "bare",
    }
    with trio.fail_after(20):
        done = await trio.run_process(
            [sys.executable, "-m", "oco_core.examples.ping"], env=env, capture_stderr=True, check=False
        )
    assert done.returncode == 0
    assert f"the bot that launched this callback (process {finished.pid}) is gone" in done.stderr.decode()


@pytest.mark.slow  # the bot waits up to 20 s for every launched callback before it chats
async def test_crashing_callback_is_restarted_with_backoff_and_others_keep_working(
    tmp_path: Path, bot_config: Callable[[str], str], example_command: str
) -> None:
    config = bot_config(
        f"""\
callbacks:
  - id: example
    command: {example_command}
  - id: crasher
    command: [{PYTHON}, "-c", "import sys; print('boom'); sys.exit(3)"]
"""
    )
    async with run_oco(config, tmp_path / "bot") as bot:
        await bot.write("oco ping")
        await bot.expect("^PONG$", timeout=60)
        delays = [
            float(m.group(1)) for m in await wait_for_lines(bot, r"restarting callback 'crasher' in ([\d.]+) s", 3)
        ]
        await wait_for_lines(bot, r"oco\.callback\.crasher: boom$", 3)
        await wait_for_lines(bot, r"callback 'crasher' exited with code 3", 3)
        pids = started_pids(bot, "crasher")
        assert len(set(pids)) == len(pids) >= 3, pids
        # Exponential backoff with jitter of at most a quarter: each wait is longer.
        assert delays[0] < delays[1] < delays[2], delays
        # The example callback was never restarted, and still answers.
        assert len(started_pids(bot, "example")) == 1
        await bot.write("oco echo still here")
        await bot.expect("^still here$")
        assert await bot.stop(signal.SIGTERM) == 0


@pytest.mark.slow  # the bot gives a callback 5 s to obey SIGTERM
async def test_callback_ignoring_sigterm_is_killed_after_the_grace_period(
    tmp_path: Path, bot_config: Callable[[str], str], process_running: Callable[[int], bool]
) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    noted = tmp_path / "sigterm.txt"
    config = bot_config(f'callbacks:\n  - id: stubborn\n    command: [{PYTHON}, "{script}", "{noted}"]\n')
    async with run_oco(config, tmp_path / "bot") as bot:
        await bot.expect(r"oco\.callback\.stubborn: ready$", stream="stderr")
        [pid] = started_pids(bot, "stubborn")
        assert await bot.stop(signal.SIGTERM, timeout=60) == 0
    assert not process_running(pid), f"the stubborn callback (pid {pid}) outlived the bot"
    assert noted.read_text() == "SIGTERM", "the callback was not sent SIGTERM first"
    assert re.search(rf"\(pid {pid}\) ignored SIGTERM for \d+ s; killing it", "\n".join(bot.stderr_lines))


async def test_output_while_stopping_reaches_the_log(
    tmp_path: Path, bot_config: Callable[[str], str], process_running: Callable[[int], bool]
) -> None:
    """What a callback prints between SIGTERM and its exit (its last words: "flushed 3
    jobs", a traceback) is forwarded like the rest of its output."""
    script = tmp_path / "polite.py"
    script.write_text(POLITE)
    config = bot_config(f'callbacks:\n  - id: polite\n    command: [{PYTHON}, "{script}"]\n')
    async with run_oco(config, tmp_path / "bot") as bot:
        await bot.expect(r"oco\.callback\.polite: ready$", stream="stderr")
        [pid] = started_pids(bot, "polite")
        assert await bot.stop(signal.SIGTERM) == 0
    assert not process_running(pid)
    log = "\n".join(bot.stderr_lines)
    assert "oco.callback.polite: goodbye from stdout" in log
    assert "oco.callback.polite: goodbye from stderr" in log


async def test_exit_is_noticed_when_a_child_of_the_callback_keeps_its_output_open(
    tmp_path: Path, bot_config: Callable[[str], str], process_running: Callable[[int], bool]
) -> None:
    """A wrapper script that leaves a background child behind (which inherits its stdout)
    and exits is still seen to exit, and restarted; the bot's stop ends the leftovers too
    (the callback runs in a session of its own, so its whole process group)."""
    config = bot_config(
        """\
callbacks:
  - id: wrapper
    command: ["sh", "-c", "sleep 120 & echo \\"left behind $!\\"; exit 3"]
"""
    )
    children: list[int] = []
    try:
        async with run_oco(config, tmp_path / "bot") as bot:
            found = await bot.expect(r"oco\.callback\.wrapper: left behind (\d+)$", stream="stderr")
            children.append(int(found.group(1)))
            await bot.expect(r"callback 'wrapper' exited with code 3", stream="stderr", timeout=10)
            await bot.expect(r"restarting callback 'wrapper'", stream="stderr", timeout=10)
            assert await bot.stop(signal.SIGTERM) == 0
        children += [int(m.group(1)) for line in bot.stderr_lines if (m := re.search(r"left behind (\d+)$", line))]
        assert not [pid for pid in children if process_running(pid)], "the callback's children outlived the bot"
    finally:
        for pid in children:  # whatever the bot left behind, the test does not
            if process_running(pid):
                os.kill(pid, signal.SIGKILL)


# An SDK callback that dials with a secret of its own, not the one the bot gave it: the
# bot refuses it, and no restart can change that.
REFUSED = """\
from oco_core import Callback, Message

bot = Callback(secret="not-the-secret-the-bot-gave")


@bot.respond("^anything$")
async def never(message: Message) -> None:
    pass


bot.run()
"""


async def test_a_callback_failing_the_same_way_is_given_up_with_one_error(
    tmp_path: Path, bot_config: Callable[[str], str], example_command: str
) -> None:
    """The README's newcomer runs a callback that cannot work (a missing module): it is
    started give_up_after times, then one ERROR line says why and that it is not
    restarted; the bot and its other callbacks carry on, and chat says it is not running."""
    config = bot_config(
        f"""\
callbacks:
  - id: example
    command: {example_command}
  - id: broken
    command: [{PYTHON}, "-c", "import no_such_module_here"]
    restart_backoff_max: 0.5
    give_up_after: 3
    routes: [{{pattern: "^weather", respond: true}}]
"""
    )
    async with run_oco(config, tmp_path / "bot") as bot:
        given_up = await bot.expect(r"ERROR .*callback 'broken' (.*)$", stream="stderr", timeout=60)
        assert given_up.group(1) == (
            "failed the same way 3 times in a row (exit code 1: ModuleNotFoundError: "
            "No module named 'no_such_module_here'); not restarting it: fix it, then restart the bot"
        )
        # Exactly three starts, and the ERROR came in place of a third restart.
        assert len(started_pids(bot, "broken")) == 3
        assert len(bot.stderr.matches(r"restarting callback 'broken'")) == 2
        assert [line for line in bot.stderr_lines if " ERROR " in line] == [given_up.string]
        await bot.write("oco ping")
        await bot.expect("^PONG$")
        await bot.write("oco weather paris")
        await bot.expect(
            r"^alice: the broken callback is not running: it kept failing, so the bot stopped restarting it "
            r"\(the bot's log says why\)$"
        )
        assert await bot.stop(signal.SIGTERM) == 0


async def test_a_callback_the_bot_refuses_is_not_restarted(tmp_path: Path, bot_config: Callable[[str], str]) -> None:
    """The SDK exits with EX_CONFIG (78) when the bot refuses it for good; the supervisor
    then stops at the first exit, naming the refusal."""
    script = tmp_path / "refused.py"
    script.write_text(REFUSED)
    config = bot_config(f'callbacks:\n  - id: refused\n    command: [{PYTHON}, "{script}"]\n')
    async with run_oco(config, tmp_path / "bot") as bot:
        given_up = await bot.expect(r"ERROR .*callback 'refused' (.*)$", stream="stderr", timeout=60)
        assert given_up.group(1).startswith("was refused by the bot for good (exit code 78: callback 'refused': ")
        assert given_up.group(1).endswith("); not restarting it: fix it, then restart the bot")
        assert len(started_pids(bot, "refused")) == 1
        assert not bot.stderr.matches(r"restarting callback 'refused'")
        assert not bot.stderr.matches(r"Traceback")
        assert await bot.stop(signal.SIGTERM) == 0


async def test_a_callback_printing_in_a_loop_is_logged_at_a_bounded_rate(
    tmp_path: Path, bot_config: Callable[[str], str]
) -> None:
    config = bot_config(
        f"""\
callbacks:
  - id: chatty
    command: [{PYTHON}, "-c", "import itertools\\nfor n in itertools.count(): print(n, flush=True)"]
    output_lines_per_second: 20
"""
    )
    async with run_oco(config, tmp_path / "bot") as bot:
        found = await bot.expect(
            r"oco\.callback\.chatty: (\d+) line\(s\) of this callback's output dropped: over 20 lines/s "
            r"\(callbacks\[\]\.output_lines_per_second\)$",
            stream="stderr",
            timeout=30,
        )
        dropped = int(found.group(1))
        forwarded = [line for line in bot.stderr_lines if re.search(r"oco\.callback\.chatty: \d+$", line)]
        # A burst of ten seconds' worth went through, then the rest was dropped and counted.
        assert 200 <= len(forwarded) < 400, len(forwarded)
        assert dropped >= 1
        assert await bot.stop(signal.SIGTERM) == 0


async def test_start_up_waits_for_a_silent_callback_only_as_long_as_configured(
    tmp_path: Path, bot_config: Callable[[str], str], example_command: str
) -> None:
    config = bot_config(
        f"""\
bot: {{callback_startup_wait: 1}}
callbacks:
  - id: example
    command: {example_command}
  - id: silent
    command: [{PYTHON}, "-c", "import time; time.sleep(120)"]
"""
    )
    async with run_oco(config, tmp_path / "bot") as bot:
        await bot.expect(
            r"callback\(s\) silent did not open a Listen stream \(exited, or not within 1 s, "
            r"bot\.callback_startup_wait\); starting the adapters anyway",
            stream="stderr",
            timeout=30,
        )
        await bot.write("oco ping")
        await bot.expect("^PONG$")
        assert await bot.stop(signal.SIGTERM) == 0
