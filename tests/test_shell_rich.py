"""Markdown replies in the shell (issue 15): a real ``oco run`` with the shell adapter and
a launched callback that answers in Markdown. On a terminal (a pseudo-terminal, readline
and all) the reply has ANSI styles, unless NO_COLOR is set; through a pipe it is clean
plain text. Neither shows the raw markup (``**``, backticks, ``[..](..)``). Then the
rendering case by case (the parser is oco-core's, shared with the IRC adapter), and a
reply's own escape sequences kept off the terminal."""

from __future__ import annotations

import io
import re
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from oco_core._adapter import OutgoingMessage
from oco_core._markdown import render_markdown
from oco_core._shell import ANSI_STYLES, PLAIN_STYLES, ShellAdapter, ShellConfig
from oco_core.testing import OcoProcess, run_oco
from oco_core.testing._process import oco_on_a_pty

CALLBACK = """\
from oco_core import Callback, Message

bot = Callback()


@bot.respond(r"^fancy$")
async def fancy(message: Message) -> None:
    await message.send(
        "**deploy** of *prod* with `make all`: see [the log](https://ci.example/7)\\n"
        "# Done\\n"
        "```\\nls -l\\n```",
        markdown=True,
    )


@bot.respond(r"^plain$")
async def plain(message: Message) -> None:
    await message.send("**not markdown**")


bot.run()
"""

CONNECTED = "callback 'fancy' connected"
LAST_LINE = "    ls -l"  # the reply's last line: its code block


def config(bot_config: Callable[[str], str], tmp_path: Path) -> str:
    script = tmp_path / "fancy.py"
    script.write_text(CALLBACK)
    return bot_config(f'callbacks:\n  - id: fancy\n    command: ["{sys.executable}", "{script}"]\n')


@asynccontextmanager
async def oco_on_a_terminal(config: str, workdir: Path, env: dict[str, str]) -> AsyncIterator[Terminal]:
    """``oco run`` with ``config`` on a new pseudo-terminal as its controlling terminal
    (standard input, output and error), as a person's shell starts it."""
    async with oco_on_a_pty(config, workdir, env) as (_, master, _slave):
        terminal = Terminal(master)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(terminal.pump)
            yield terminal
            nursery.cancel_scope.cancel()


class Terminal:
    """The keyboard and the raw output of a pseudo-terminal."""

    def __init__(self, master: trio.lowlevel.FdStream) -> None:
        self.master = master
        self.raw = ""

    async def pump(self) -> None:
        while True:
            try:
                chunk = await self.master.receive_some(65536)
            except OSError:  # EIO: every slave side is closed
                return
            if not chunk:
                return
            self.raw += chunk.decode("utf-8", "replace")

    async def wait_for(self, text: str, since: int = 0, timeout: float = 60) -> None:
        with trio.move_on_after(timeout):
            while text not in self.raw[since:]:
                await trio.sleep(0.05)
            return
        raise AssertionError(f"{text!r} not shown within {timeout} s; the terminal showed {self.raw[-2000:]!r}")

    async def ask(self, line: str, until: str) -> str:
        """Once the callback is connected, type ``line``; what the terminal showed up to
        ``until``, the end of the reply's last line."""
        await self.wait_for(CONNECTED)
        start = len(self.raw)
        await self.master.send_all(line.encode() + b"\r")
        await self.wait_for(until, since=start, timeout=30)
        return self.raw[start:]


async def ask(bot: OcoProcess, line: str) -> list[str]:
    """Once the callback is connected, write ``line`` to the piped bot; the reply's lines."""
    await bot.expect(CONNECTED, stream="stderr", timeout=60)
    start = len(bot.stdout_lines)
    await bot.write(line)
    await bot.expect(f"^{LAST_LINE}$", timeout=30)
    return bot.stdout_lines[start:]


BOLD, NOT_BOLD = "\x1b[1m", "\x1b[22m"
ITALIC, NOT_ITALIC = "\x1b[3m", "\x1b[23m"
CODE, NOT_CODE = "\x1b[36m", "\x1b[39m"


async def test_a_markdown_reply_is_shown_with_ansi_styles_on_a_terminal(
    tmp_path: Path, bot_config: Callable[[str], str]
) -> None:
    async with oco_on_a_terminal(config(bot_config, tmp_path), tmp_path / "bot", {}) as terminal:
        shown = await terminal.ask("oco fancy", until=f"ls -l{NOT_CODE}\r\n")
    assert (
        f"{BOLD}deploy{NOT_BOLD} of {ITALIC}prod{NOT_ITALIC} with {CODE}make all{NOT_CODE}: "
        "see the log (https://ci.example/7)\r\n"
    ) in shown, shown
    assert f"{BOLD}Done{NOT_BOLD}\r\n" in shown, shown  # the heading
    assert f"    {CODE}ls -l{NOT_CODE}\r\n" in shown, shown  # the code block, indented
    assert not re.search(r"\*\*|`|\]\(", shown), shown


async def test_no_color_turns_the_styles_off_on_a_terminal(tmp_path: Path, bot_config: Callable[[str], str]) -> None:
    async with oco_on_a_terminal(config(bot_config, tmp_path), tmp_path / "bot", {"NO_COLOR": "1"}) as terminal:
        shown = await terminal.ask("oco fancy", until=f"{LAST_LINE}\r\n")
    assert "deploy of prod with make all: see the log (https://ci.example/7)\r\nDone\r\n" in shown, shown
    assert not re.search(r"\x1b\[[0-9;]*m", shown), shown  # no SGR (style) sequence at all
    assert not re.search(r"\*\*|`|\]\(", shown), shown


async def test_a_markdown_reply_is_plain_text_in_a_pipe(tmp_path: Path, bot_config: Callable[[str], str]) -> None:
    async with run_oco(config(bot_config, tmp_path), tmp_path / "bot") as bot:
        lines = await ask(bot, "oco fancy")
        # A plain reply is printed as written: its asterisks are the callback's own.
        await bot.write("oco plain")
        await bot.expect(r"^\*\*not markdown\*\*$")
    assert lines == ["deploy of prod with make all: see the log (https://ci.example/7)", "Done", "    ls -l"], lines
    assert not [line for line in lines if "\x1b" in line]


class _TerminalOut(io.StringIO):
    """Standard output as the shell sees a terminal."""

    def isatty(self) -> bool:
        return True


async def test_on_a_terminal_only_the_renderers_escapes_reach_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    out = _TerminalOut()
    shell = ShellAdapter(ShellConfig(user="alice", prompt=False, history_file=None), io.StringIO(), out)
    # A reply that would retitle the window and clear the screen, were it passed through.
    await shell.send(OutgoingMessage(body="\x1b]0;pwned\x07**x**\x1b[2J", room_id="shell", format="markdown"))
    assert out.getvalue() == f"]0;pwned{BOLD}x{NOT_BOLD}[2J\n"
    # Plain replies too, and with NO_COLOR: a terminal never gets a callback's escapes.
    monkeypatch.setenv("NO_COLOR", "1")
    quiet = _TerminalOut()
    plain = ShellAdapter(ShellConfig(user="alice", prompt=False, history_file=None), io.StringIO(), quiet)
    await plain.send(OutgoingMessage(body="\x1b]52;c;ZXZpbA==\x07done", room_id="shell"))
    await plain.send(OutgoingMessage(body="\x1b[2J**kept**", room_id="shell", format="markdown"))
    assert quiet.getvalue() == "]52;c;ZXZpbA==done\n[2Jkept\n"


@pytest.mark.parametrize(
    ("markdown", "ansi", "plain"),
    [
        ("# A **big** title", f"{BOLD}A big title{NOT_BOLD}", "A big title"),  # bold inside bold: one pair
        ("***both***", f"{ITALIC}{BOLD}both{NOT_BOLD}{NOT_ITALIC}", "both"),
        ("~~gone~~ and __here__", "\x1b[9mgone\x1b[29m and " + f"{BOLD}here{NOT_BOLD}", "gone and here"),
        ("**two\nlines**", f"{BOLD}two{NOT_BOLD}\n{BOLD}lines{NOT_BOLD}", "two\nlines"),
        ("1. `a`\n2. [b](https://b.org)", f"1. {CODE}a{NOT_CODE}\n2. b (https://b.org)", "1. a\n2. b (https://b.org)"),
        ("> quote\n\n---\n```\nx\n\ny\n```", f"> quote\n----\n    {CODE}x{NOT_CODE}\n\n    {CODE}y{NOT_CODE}", ""),
    ],
)
def test_markdown_as_ansi_and_as_plain_text(markdown: str, ansi: str, plain: str) -> None:
    assert render_markdown(markdown, ANSI_STYLES) == ansi
    expected_plain = plain or re.sub(r"\x1b\[[0-9;]*m", "", ansi)
    assert render_markdown(markdown, PLAIN_STYLES) == expected_plain
