"""End to end through the shell adapter: a real ``oco run``, typed into and read from.

The config leaves out ``callbacks:``, so the bot launches and supervises the bundled
example callback (``ping``, ``echo``, ``count``) as a process of its own, which talks to
the bot over gRPC; its counter lives in a real SQLite file.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from pathlib import Path

import trio

from oco_core.testing import OcoProcess, run_oco

HELP_LINES = [
    "count - counts how often it was asked, in the callback's storage",
    "echo <text> - says <text> back",
    "ping - replies PONG",
    "(also: roles, who can, link; say `oco help roles` and so on)",
]


async def callback_pid(bot: OcoProcess, callback_id: str = "example") -> int:
    """The pid of the launched callback, from the bot's log."""
    found = await bot.expect(rf"started callback '{re.escape(callback_id)}' \(pid (\d+)\)", stream="stderr")
    return int(found.group(1))


async def say(bot: OcoProcess, line: str, until: str) -> list[str]:
    """Type ``line``, wait for a stdout line matching ``until`` (a pattern no earlier line
    matches), then type a marker and wait for it: return every stdout line printed in
    between, so that a test sees everything that came, not only what it waited for."""
    start = len(bot.stdout_lines)
    await bot.write(line)
    await bot.expect(until)
    first = next(i for i, printed in enumerate(bot.stdout_lines) if re.search(until, printed))
    assert first >= start, f"{until!r} matches a line printed before {line!r} was typed: use a unique pattern"
    marker = f"marker {start}"
    await bot.write(f"oco echo {marker}")
    await bot.expect(f"^{marker}$")
    end = bot.stdout_lines.index(marker)
    assert end >= start, f"{marker!r} was printed before it was typed"
    return bot.stdout_lines[start:end]


async def test_chat_in_the_terminal_with_the_bundled_callback(
    tmp_path: Path, bot_config: Callable[[str], str], process_running: Callable[[int], bool]
) -> None:
    async with run_oco(bot_config(""), tmp_path / "bot") as bot:
        pid = await callback_pid(bot)
        assert await say(bot, "oco ping", "PONG") == ["PONG"]
        assert await say(bot, "oco: echo hello", "hello") == ["hello"]
        assert await say(bot, "@oco count", "counted 1") == ["alice: counted 1 time(s)"]
        assert await say(bot, "@oco count", "counted 2") == ["alice: counted 2 time(s)"]
        assert await say(bot, "oco help echo", "^echo <text> - ") == ["echo <text> - says <text> back"]
        assert sorted(await say(bot, "oco help", "^[(]also: ")) == sorted(HELP_LINES)

        assert process_running(pid)
        assert await bot.stop(signal.SIGTERM) == 0
        assert not process_running(pid), f"the callback (pid {pid}) outlived the bot"
    assert (tmp_path / "oco.db").is_file()


async def test_end_of_piped_input_prints_pending_replies_then_exits(
    tmp_path: Path, bot_config: Callable[[str], str], process_running: Callable[[int], bool]
) -> None:
    async with run_oco(bot_config(""), tmp_path / "bot") as bot:
        pid = await callback_pid(bot)
        # Type and hang up at once, as `printf ... | oco run` does: nothing is answered yet.
        await bot.write("oco count")
        await bot.write("oco ping")
        await bot.write("oco echo last words")
        await bot.close_stdin()
        with trio.fail_after(60):
            code = await bot.process.wait()
        assert code == 0, bot.stderr_lines[-20:]
        assert sorted(line for line in bot.stdout_lines if line) == ["PONG", "alice: counted 1 time(s)", "last words"]
        assert not process_running(pid), f"the callback (pid {pid}) outlived the bot"

    # The counter was kept in the SQLite file: a new bot on the same file goes on counting.
    async with run_oco(bot_config(""), tmp_path / "bot-again") as again:
        pid = await callback_pid(again)
        await again.write("oco count")
        await again.expect(r"counted")
        assert [line for line in again.stdout_lines if line] == ["alice: counted 2 time(s)"]
        # Ctrl-C in the terminal stops the bot as cleanly as SIGTERM.
        assert await again.stop(signal.SIGINT) == 0
        assert not process_running(pid), f"the callback (pid {pid}) outlived the bot"
