"""The shell adapter: a terminal chat for development and demos.

Each line typed (or piped in) is a message from the local user in the room ``shell``;
the bot's messages are printed. At end of input it waits for replies still on their
way, then ends, and with it the bot: ``echo "oco ping" | oco run`` prints ``PONG``.

On a terminal (standard input and output both one, and the prompt not turned off) lines
are edited with readline, with a history kept between runs, and replies and log lines
appear above the prompt and what is being typed (see ``_terminal``). Piped, it reads
and prints plain lines.

A Markdown reply is shown with ANSI styles (bold, italic, code in cyan, links as "text
(url)") when standard output is a terminal, ``NO_COLOR`` is not set and ``TERM`` is not
``dumb``, and as clean plain text otherwise: never with raw ``**`` or backticks. The other
rich replies (reactions, edits, attachments, threads) reach the shell as the core's
plain-text fallbacks.
"""

from __future__ import annotations

import getpass
import os
import re
import sys
from pathlib import Path
from typing import TextIO

import trio
from pydantic import BaseModel, ConfigDict, Field

from ._adapter import Adapter, AdapterHost, AdapterType, ChatRoom, ChatUser, IncomingMessage, OutgoingMessage
from ._config import default_data_dir
from ._errors import UnknownTargetError
from ._hookspecs import hookimpl
from ._markdown import MarkdownStyles, render_markdown
from ._terminal import Terminal, open_terminal

ROOM = ChatRoom(id="shell", name="shell")

#: Markdown on a terminal. Each style is ended by its own code (22 ends bold, 23 italic,
#: 29 strikethrough, 39 the colour), so styles nest and none resets another.
ANSI_STYLES = MarkdownStyles(
    bold=("\x1b[1m", "\x1b[22m"),
    italic=("\x1b[3m", "\x1b[23m"),
    strike=("\x1b[9m", "\x1b[29m"),
    code=("\x1b[36m", "\x1b[39m"),
    code_block_indent="    ",
)

#: Markdown in a pipe or with NO_COLOR: the text, its markup gone.
PLAIN_STYLES = MarkdownStyles(code_block_indent="    ")

# Control characters but newline and tab: a reply shown on a terminal carries no escape
# sequence but the renderer's own (none that moves the cursor or retitles the window).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x9b]")


def _local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "user"


class ShellConfig(BaseModel):
    """Options of the shell adapter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: str = Field(default_factory=_local_user, description="The local user's name.")
    prompt: bool | None = Field(default=None, description="Show a prompt; by default only on a terminal.")
    eof_wait: float = Field(default=10.0, ge=0, description="Longest wait at end of input for pending replies.")
    history_file: Path | None = Field(
        default_factory=lambda: default_data_dir() / "shell_history",
        description="Where the lines typed on a terminal are kept between runs (null: nowhere).",
    )
    history_size: int = Field(default=1000, ge=0, description="Most lines the history keeps.")


class ShellAdapter(Adapter):
    """Reads chat from standard input and prints the bot's messages to standard output."""

    def __init__(self, config: ShellConfig, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
        self.config = config
        self._stdin = stdin or sys.stdin
        self._stdout = stdout or sys.stdout
        self._prompt = config.prompt if config.prompt is not None else self._stdin.isatty()
        # Line editing only on the process's own terminal; injected streams are a test's.
        self._edit = self._prompt and stdin is None and stdout is None and sys.stdin.isatty() and sys.stdout.isatty()
        self._terminal: Terminal | None = None
        # https://no-color.org: NO_COLOR set and not empty turns colour off.
        self._tty = _isatty(self._stdout)
        self._color = self._tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM", "") != "dumb"
        self.user = ChatUser(id=config.user, name=config.user, mention_name=config.user)

    async def run(self, host: AdapterHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._edit:
            prompt = f"{self.config.user}> "
            async with open_terminal(prompt, self.config.history_file, self.config.history_size) as terminal:
                if terminal is not None:
                    self._terminal = terminal
                    task_status.started()
                    try:
                        while (line := await terminal.read_line()) is not None:
                            if line.strip():
                                await host.receive(IncomingMessage(body=line, user=self.user, room=ROOM))
                    finally:
                        # Replies after the end of input are printed plainly, with no prompt.
                        self._terminal = None
                        self._prompt = False
            if terminal is not None:
                await host.wait_idle(quiet=0.3, max_wait=self.config.eof_wait)
                return
        task_status.started()
        self._show_prompt()
        while True:
            # Reading a terminal without making it non-blocking needs a thread; trio's
            # own thread pool, abandoned on cancel, so Ctrl-C never waits for Enter.
            line = await trio.to_thread.run_sync(self._stdin.readline, abandon_on_cancel=True)
            if not line:
                break
            body = line.rstrip("\r\n")
            if body.strip():
                await host.receive(IncomingMessage(body=body, user=self.user, room=ROOM))
            else:
                self._show_prompt()
        await host.wait_idle(quiet=0.3, max_wait=self.config.eof_wait)

    async def send(self, message: OutgoingMessage) -> None:  # the shell has no ids for messages
        if message.room_id not in (None, ROOM.id):
            raise UnknownTargetError(f"the shell has one room, {ROOM.id!r}, not {message.room_id!r}")
        if message.user is not None and message.room_id is None and message.user.id != self.user.id:
            raise UnknownTargetError(f"the shell has one user, {self.user.id!r}, not {message.user.id!r}")
        body = message.body
        if self._tty:  # a terminal: a reply's own escapes never reach it (a title, the clipboard)
            body = _CONTROL.sub("", body)
        if message.format == "markdown":
            body = render_markdown(body, ANSI_STYLES if self._color else PLAIN_STYLES)
        if message.action:
            body = f"* {body}"
        elif message.mention and message.user is not None:
            body = f"{message.user.mention_name or message.user.id}: {body}"
        if self._terminal is not None:
            self._terminal.write(body + "\n")
            return
        if self._prompt:
            self._stdout.write("\r")
        self._stdout.write(body + "\n")
        self._show_prompt()
        self._stdout.flush()

    async def join(self, room: str) -> None:
        if room != ROOM.id:
            raise UnknownTargetError(f"the shell has one room, {ROOM.id!r}; it cannot join {room!r}")

    async def part(self, room: str) -> None:
        raise UnknownTargetError("the shell cannot leave its only room")

    def _show_prompt(self) -> None:
        if self._prompt:
            self._stdout.write(f"{self.config.user}> ")
            self._stdout.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a stream without one, or closed
        return False


@hookimpl
def oco_adapter_types() -> list[AdapterType]:
    """The shell adapter."""
    return [
        AdapterType(
            name="shell",
            create=ShellAdapter,
            config_model=ShellConfig,
            description="a terminal chat on standard input and output",
            default=True,
        )
    ]
