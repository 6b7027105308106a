"""The shell adapter on a real terminal: ``oco run`` in a pseudo-terminal, typed into
key by key, and what it prints replayed onto a small screen model, so that the tests
check what a person sees: replies and log lines above the prompt, the half-typed line
redrawn below them, history on the up arrow, the terminal given back as it was.

The bot launches the bundled example callback and ``poke``, an SDK callback that logs
whatever the test writes into a FIFO: a log line that comes while someone is typing."""

from __future__ import annotations

import codecs
import json
import os
import re
import signal
import sys
import termios
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from oco_core.testing import run_oco
from oco_core.testing._process import oco_on_a_pty

POKE = """
import logging, sys, threading
from oco_core import Callback, Message

bot = Callback()
log = logging.getLogger("poke")

@bot.respond(r"^poke (?P<text>.+)$")
async def poke(message: Message) -> None:
    log.warning("poked: %s\\nsecond line", message.match("text"))
    await message.send("poked")

def relay() -> None:
    with open(sys.argv[1]) as fifo:
        for line in fifo:
            log.info("%s", line.strip())

threading.Thread(target=relay, daemon=True).start()
bot.run()
"""

PYTHON = json.dumps(sys.executable)
PROMPT = "alice> "
UP = "\x1b[A"  # what the up arrow sends


class Screen:
    """What a terminal shows after the bytes it was sent: just enough of a VT100 for
    readline on a wide screen (carriage return, line feed, erase to end of line, cursor
    left/right/up/down; other sequences, such as bracketed-paste mode, ignored)."""

    _TOKEN = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z@])|\x1b[()][0-9A-Za-z]|\x1b[=>78]|[\s\S]")

    def __init__(self) -> None:
        self.rows: list[list[str]] = [[]]
        self.row = 0
        self.col = 0

    def feed(self, text: str) -> None:
        for m in self._TOKEN.finditer(text):
            token = m.group(0)
            if m.group(2) is not None:
                self._control(m.group(1), m.group(2))
            elif token == "\r":
                self.col = 0
            elif token == "\n":
                self.row += 1
                while len(self.rows) <= self.row:
                    self.rows.append([])
            elif token == "\b":
                self.col = max(0, self.col - 1)
            elif token.isprintable():
                line = self.rows[self.row]
                line.extend(" " * (self.col + 1 - len(line)))
                line[self.col] = token
                self.col += 1

    @classmethod
    def complete(cls, escape: str) -> bool:
        """Whether ``escape`` (from an ESC on) holds a whole sequence."""
        m = cls._TOKEN.match(escape)
        return m is not None and len(m.group(0)) > 1

    def _control(self, args: str, command: str) -> None:
        n = int(args) if args.isdigit() else 1
        if command == "K" and args in ("", "0"):
            del self.rows[self.row][self.col :]
        elif command == "C":
            self.col += n
        elif command == "D":
            self.col = max(0, self.col - n)
        elif command == "A":
            self.row = max(0, self.row - n)
        elif command == "B":
            self.row += n
            while len(self.rows) <= self.row:
                self.rows.append([])

    @property
    def lines(self) -> list[str]:
        """Every line so far, trailing blanks removed; the last is the cursor's."""
        return ["".join(row).rstrip() for row in self.rows[: self.row + 1]]


class TerminalBot:
    """``oco run`` on the slave side of a pseudo-terminal; the test is the keyboard."""

    def __init__(self, process: trio.Process, master: trio.lowlevel.FdStream, slave: int) -> None:
        self.process = process
        self.slave = slave
        self.screen = Screen()
        self.raw = ""
        self._master = master
        self._changed = trio.Event()

    async def type(self, keys: str) -> None:
        await self._master.send_all(keys.encode())

    async def wait_until(self, what: str, check: Callable[[list[str]], bool], timeout: float = 30.0) -> None:
        """Wait until ``check(screen lines)`` holds; fail saying ``what`` was awaited."""
        with trio.move_on_after(timeout):
            while not check(self.screen.lines):
                await self._changed.wait()
            return
        raise AssertionError(f"{what} not seen within {timeout} s; screen: {self.screen.lines[-25:]!r}")

    async def wait_for_prompt(self, typed: str = "") -> None:
        """Until the cursor's line is the prompt and ``typed``, the cursor after them."""
        await self.wait_until(
            f"the prompt {PROMPT + typed!r}",
            lambda lines: lines[-1] == (PROMPT + typed).rstrip() and self.screen.col == len(PROMPT + typed),
        )

    async def wait_ready(self) -> None:
        """Until both callbacks have said they are connected, and the prompt is shown:
        nothing is left of the start-up to come between the test's lines."""
        said = [f"INFO oco.callback.{c}: callback '{c}' connected" for c in ("example", "poke")]
        await self.wait_until("both connected", lambda lines: all(any(s in line for line in lines) for s in said))
        await self.wait_for_prompt()

    async def pump(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        held = ""
        while True:
            try:
                chunk = await self._master.receive_some(65536)
            except OSError:  # EIO: every slave side is closed
                return
            if not chunk:
                return
            text = held + decoder.decode(chunk)
            # An escape sequence split between two reads is fed whole, with the next.
            cut = text.rfind("\x1b")
            if cut >= 0 and not Screen.complete(text[cut:]):
                text, held = text[:cut], text[cut:]
            else:
                held = ""
            self.raw += text
            self.screen.feed(text)
            self._changed.set()
            self._changed = trio.Event()

    def mode(self) -> tuple[bool, bool]:
        """Whether the terminal is in canonical (line) mode and echoes: as a shell needs it."""
        lflag = termios.tcgetattr(self.slave)[3]
        return bool(lflag & termios.ICANON), bool(lflag & termios.ECHO)


@asynccontextmanager
async def run_oco_in_a_terminal(config: str, workdir: Path) -> AsyncIterator[TerminalBot]:
    """Start ``oco run`` with ``config`` on a new pseudo-terminal as its controlling
    terminal, as a person's shell would."""
    async with oco_on_a_pty(config, workdir) as (process, master, slave):
        bot = TerminalBot(process, master, slave)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bot.pump)
            yield bot
            nursery.cancel_scope.cancel()


def terminal_config(tmp_path: Path, example_command: str) -> str:
    script = tmp_path / "poke.py"
    script.write_text(POKE)
    fifo = tmp_path / "poke.fifo"
    os.mkfifo(fifo)
    return (
        f'store: {{url: "sqlite:///{tmp_path / "oco.db"}"}}\n'
        'grpc: {listen: "127.0.0.1:0"}\n'
        "adapters: [{type: shell, user: alice}]\n"
        "callbacks:\n"
        f"  - id: example\n    command: {example_command}\n"
        f'  - id: poke\n    command: [{PYTHON}, "{script}", "{fifo}"]\n'
    )


async def poke_log(tmp_path: Path, line: str) -> None:
    """Make the poke callback log ``line`` (through the bot's log, on the terminal)."""

    def write() -> None:
        with open(tmp_path / "poke.fifo", "w") as fifo:
            fifo.write(line + "\n")

    await trio.to_thread.run_sync(write)


def count(lines: list[str], text: str) -> int:
    return sum(line == text for line in lines)


async def test_a_person_at_a_terminal_types_while_the_bot_logs(tmp_path: Path, example_command: str) -> None:
    async with run_oco_in_a_terminal(terminal_config(tmp_path, example_command), tmp_path / "bot") as bot:
        await bot.wait_ready()
        assert bot.mode() == (False, False), "readline reads key by key and echoes itself"

        await bot.type("oco ping\r")
        await bot.wait_until("PONG, then the prompt", lambda lines: lines[-2:] == ["PONG", PROMPT.rstrip()])
        assert bot.screen.lines[-3] == PROMPT + "oco ping"

        # Half a line typed, and a log line comes: it goes above, the typing stays below.
        await bot.type("oco pi")
        await bot.wait_for_prompt("oco pi")
        await poke_log(tmp_path, "poked while typing")
        await bot.wait_until(
            "the log line above the half-typed line",
            lambda lines: (
                lines[-2].endswith(" INFO oco.callback.poke: poked while typing") and lines[-1] == PROMPT + "oco pi"
            ),
        )
        await bot.type("ng\r")
        await bot.wait_until("a second PONG", lambda lines: count(lines, "PONG") == 2 and lines[-1] == PROMPT.rstrip())
        assert not [line for line in bot.screen.lines if "poked" in line and PROMPT.strip() in line]

        # The up arrow brings back the last line.
        await bot.type(UP)
        await bot.wait_for_prompt("oco ping")
        await bot.type("\r")
        await bot.wait_until("a third PONG", lambda lines: count(lines, "PONG") == 3 and lines[-1] == PROMPT.rstrip())

        # Ctrl-D on an empty line ends the input, and with it the bot.
        await bot.type("\x04")
        with trio.fail_after(30):
            code = await bot.process.wait()
        assert code == 0, bot.screen.lines[-20:]
        assert bot.mode() == (True, True), "the terminal was not given back in line mode with echo"
        assert not [line for line in bot.screen.lines if line.startswith(PROMPT) and "INFO" in line]
    history = tmp_path / "bot" / "xdg" / "oco" / "shell_history"
    assert history.read_text().splitlines() == ["oco ping"]  # once: a repeated line is not kept twice
    assert history.stat().st_mode & 0o077 == 0, "what was typed may be private"


async def test_history_is_kept_between_runs_and_ctrl_c_stops_the_bot(tmp_path: Path, example_command: str) -> None:
    history = tmp_path / "bot" / "xdg" / "oco" / "shell_history"
    history.parent.mkdir(parents=True)
    history.write_text("oco echo from last time\n")
    async with run_oco_in_a_terminal(terminal_config(tmp_path, example_command), tmp_path / "bot") as bot:
        await bot.wait_ready()
        await bot.type(UP)
        await bot.wait_for_prompt("oco echo from last time")
        await bot.type("\r")
        await bot.wait_until("the echo", lambda lines: lines[-2:] == ["from last time", PROMPT.rstrip()])

        await bot.type("oco ec")  # typed, never sent
        await bot.wait_for_prompt("oco ec")
        await bot.type("\x03")  # Ctrl-C: SIGINT from the terminal, an orderly shutdown
        with trio.fail_after(30):
            code = await bot.process.wait()
        assert code == 0, bot.screen.lines[-20:]
        assert bot.mode() == (True, True), "the terminal was not given back in line mode with echo"
        assert any("received SIGINT" in line for line in bot.screen.lines), "Ctrl-C did not reach the bot as SIGINT"
        assert PROMPT + "oco ec" not in bot.screen.lines, "the abandoned line is left on the screen"
    assert history.read_text().splitlines() == ["oco echo from last time"]


async def test_a_launched_callbacks_log_lines_carry_one_prefix_at_their_level(
    tmp_path: Path, bot_config: Callable[[str], str], example_command: str
) -> None:
    script = tmp_path / "poke.py"
    script.write_text(POKE)
    os.mkfifo(tmp_path / "poke.fifo")
    config = bot_config(f'callbacks:\n  - id: poke\n    command: [{PYTHON}, "{script}", "{tmp_path / "poke.fifo"}"]\n')
    async with run_oco(config, tmp_path / "bot") as bot:
        await bot.expect(r"INFO oco\.callback\.poke: callback 'poke' connected to ", stream="stderr", timeout=30)
        await bot.write("oco poke hello")
        await bot.expect("^poked$")
        # Both lines of the record, at its level, under the callback's id, and nothing else.
        await bot.expect(r"^\S+ \S+ WARNING oco\.callback\.poke: poked: hello$", stream="stderr")
        await bot.expect(r"^\S+ \S+ WARNING oco\.callback\.poke: second line$", stream="stderr")
        assert await bot.stop(signal.SIGTERM) == 0
    doubled = [line for line in bot.stderr_lines if re.search(r"oco\.callback\.\w+: (DEBUG|INFO|WARNING|ERROR) ", line)]
    assert not doubled, doubled
    assert any(line.endswith("INFO oco.callback.poke: received SIGTERM; stopping") for line in bot.stderr_lines)


TICKING = """
import sys, trio
from oco_core._terminal import open_terminal

async def main():
    async with open_terminal("P> ", None, 100) as terminal:
        async def tick():
            for n in range(200):
                await trio.sleep(0.2)
                terminal.write(f"LOG{n}\\n")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tick)
            while (line := await terminal.read_line()) is not None:
                terminal.write(f"GOT[{line}]\\n")
            nursery.cancel_scope.cancel()

trio.run(main)
"""


def test_a_log_line_during_a_history_search_waits_and_the_prompt_survives() -> None:
    """readline shows a prompt of its own while searching (Ctrl-R): a log line then
    waits until the search ends, and the prompt comes back with what is typed."""
    import select
    import subprocess
    import time

    primary, secondary = os.openpty()
    process = subprocess.Popen(
        [sys.executable, "-c", TICKING], stdin=secondary, stdout=secondary, stderr=secondary, start_new_session=True
    )
    os.close(secondary)

    def read_until(pattern: str, timeout: float = 10.0) -> str:
        seen = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([primary], [], [], 0.05)[0]:
                try:
                    seen += os.read(primary, 4096)
                except OSError:
                    break
                if re.search(pattern, seen.decode(errors="replace")):
                    return seen.decode(errors="replace")
        raise AssertionError(f"no {pattern!r} in {seen!r}")

    try:
        read_until(r"LOG1\r\nP> ")
        os.write(primary, b"\x12")  # Ctrl-R
        searching = read_until(r"reverse-i-search")
        time.sleep(0.6)  # log lines come meanwhile (every 0.2 s): they must wait
        held = read_until(r"", 0.1) if select.select([primary], [], [], 0)[0] else ""
        assert "LOG" not in searching + held, searching + held
        os.write(primary, b"\x07")  # Ctrl-G: the search ends
        read_until(r"LOG\d+\r\nP> ")
        os.write(primary, b"abc")
        assert re.search(r"P> abc", read_until(r"LOG\d+\r\nP> abc"))  # the prompt is still there
        os.write(primary, b"\r")
        read_until(r"GOT\[abc\]")
    finally:
        process.kill()
        process.wait()
        os.close(primary)
