"""Line editing for the shell adapter on a terminal: GNU readline, fed by the trio thread.

Why readline: it is in the standard library (no dependency; importing it takes a few
milliseconds, and only ``oco run`` on a terminal does), people know its keys and its
``~/.inputrc``, and it keeps a history. prompt_toolkit would do the same with a
dependency, an asyncio loop of its own in a second thread and ~0.1 s of imports.

Why its *callback* interface, through ctypes: a reply or a log line must appear above
the prompt and the half-typed line, which means erasing and redrawing readline's line.
readline is not thread-safe, so that must happen in the thread that feeds it keys.
Python's ``readline`` module offers only the blocking ``input()``, which would hold a
worker thread inside readline while the trio thread draws. So the trio thread waits
until standard input is readable and hands readline one key at a time
(``rl_callback_read_char``), exactly as CPython's own ``input()`` loop does; between
keys it may draw. The functions come from the library Python's ``readline`` module is
linked with (the same instance, so that module still serves for the history). Where
they are missing (libedit without them, no ``readline`` module), :func:`open_terminal`
yields None and the shell reads lines as it does from a pipe.

Log records reach the terminal through :class:`Terminal.write` too: while it is open,
the root logger's handlers that write to a terminal write above the prompt instead.
Records logged from other threads (the gRPC bridge) are handed to the trio thread.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import trio

if TYPE_CHECKING:
    import ctypes

log = logging.getLogger(__name__)

_FUNCTIONS = (
    "rl_callback_handler_install",
    "rl_callback_read_char",
    "rl_callback_handler_remove",
    "rl_save_prompt",
    "rl_restore_prompt",
    "rl_replace_line",
    "rl_redisplay",
)


#: readline.h's RL_STATE_ISEARCH, _NSEARCH, _SEARCH, _NUMERICARG, _MOREINPUT: readline is
#: showing a prompt of its own, or reading a key for a command.
_OWN_PROMPT_STATES = 0x80 | 0x100 | 0x200 | 0x400 | 0x800


class Terminal:
    """An open terminal: :meth:`read_line` for what the person types, :meth:`write` for
    anything to show (above the prompt and what is typed, which are then redrawn)."""

    def __init__(self, lib: ctypes.CDLL, prompt: str, out: TextIO, fd: int) -> None:
        import ctypes

        self._lib = lib
        self._ctypes = ctypes
        self._prompt = prompt.encode()
        self._out = out
        self._fd = fd
        self._lines: collections.deque[str] = collections.deque()
        self._eof = False
        self._pending: collections.deque[str] = collections.deque()
        self._inside_readline = False
        self._open = False
        self._saved: tuple[bytes, int] = (b"", 0)  # what was typed, and where, while erased
        self._token = trio.lowlevel.current_trio_token()
        self._point = ctypes.c_int.in_dll(lib, "rl_point")
        self._end = ctypes.c_int.in_dll(lib, "rl_end")
        self._buffer = ctypes.c_void_p.in_dll(lib, "rl_line_buffer")
        self._free = ctypes.CDLL(None).free
        self._free.argtypes = [ctypes.c_void_p]
        # Kept referenced: readline holds only the C pointer.
        self._handler = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(self._on_line)
        lib.rl_callback_handler_install.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        lib.rl_replace_line.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self._reset_screen_size = getattr(lib, "rl_reset_screen_size", None)
        try:
            self._state: ctypes.c_ulong | None = ctypes.c_ulong.in_dll(lib, "rl_readline_state")
        except ValueError:
            self._state = None

    async def read_line(self) -> str | None:
        """The next line typed (Enter), or None at end of input (Ctrl-D on an empty line)."""
        while not self._lines and not self._eof:
            await trio.lowlevel.wait_readable(self._fd)
            if self._reset_screen_size is not None:
                self._reset_screen_size()  # the window may have been resized meanwhile
            self._inside_readline = True
            try:
                self._lib.rl_callback_read_char()
            finally:
                self._inside_readline = False
            self._show_pending()
        return self._lines.popleft() if self._lines else None

    def write(self, text: str) -> None:
        """Show ``text`` (whole lines) above the prompt; from any thread. From the trio
        thread it is drawn at once; from another, as soon as the trio thread gets to it."""
        self._pending.append(text)
        if trio.lowlevel.in_trio_run():
            if not self._inside_readline:
                self._show_pending()
            return
        try:
            self._token.run_sync_soon(self._show_pending_soon)
        except trio.RunFinishedError:
            self._show_pending()  # the bot is gone, and with it the prompt

    def _show_pending_soon(self) -> None:
        # An exception escaping a run_sync_soon callback would end the whole trio run;
        # a terminal that went away (EIO) is not worth that.
        with contextlib.suppress(OSError):
            self._show_pending()

    def _on_line(self, line: int | None) -> None:
        # readline's line handler: a malloc'd line, or NULL at end of input.
        if line is None:
            self._eof = True
            return
        try:
            text = self._ctypes.string_at(line).decode(errors="replace")
        finally:
            self._free(line)
        # A bracketed paste of several lines arrives as one.
        self._lines.extend(text.splitlines() or [""])
        if text.strip():
            _remember(text)

    def _show_pending(self) -> None:
        if not self._pending:
            return
        if not self._open:
            while self._pending:
                self._out.write(_whole_lines(self._pending.popleft()))
            self._out.flush()
            return
        if self._busy():
            return  # shown once readline is back at its own prompt (after the next key)
        if self._reset_screen_size is not None:
            self._reset_screen_size()
        self._erase()
        while self._pending:
            self._out.write(_whole_lines(self._pending.popleft()))
        self._out.flush()
        self._redraw()

    def _busy(self) -> bool:
        """Whether readline shows a prompt of its own (an incremental search, a numeric
        argument): it saved the line's prompt itself, and saving it again over that
        would lose it. What is pending waits until it is back."""
        return self._state is not None and bool(self._state.value & _OWN_PROMPT_STATES)

    def _erase(self) -> None:
        # readline's own way to clear its line (prompt and text, over as many rows as
        # they wrapped to): display an empty line without a prompt. Its cursor is then
        # at the start of an empty row, which is where the text written next leaves it.
        point = self._point.value
        typed = self._ctypes.string_at(self._buffer.value, self._end.value) if self._buffer.value else b""
        self._saved = (typed, point)
        self._lib.rl_save_prompt()
        self._lib.rl_replace_line(b"", 0)
        self._lib.rl_redisplay()

    def _redraw(self) -> None:
        typed, point = self._saved
        self._lib.rl_restore_prompt()
        self._lib.rl_replace_line(typed, 0)
        self._point.value = point
        self._lib.rl_redisplay()

    def _start(self) -> None:
        self._lib.rl_callback_handler_install(self._prompt, self._ctypes.cast(self._handler, self._ctypes.c_void_p))
        self._open = True

    def _stop(self) -> None:
        if not self._open:
            return
        self._show_pending()
        self._erase()  # no prompt left behind for the log lines of the shutdown
        self._open = False
        self._lib.rl_callback_handler_remove()
        self._show_pending()  # any held back while readline showed a prompt of its own
        self._out.flush()


class _AbovePrompt:
    """The stream a terminal log handler writes to while a :class:`Terminal` is open."""

    def __init__(self, terminal: Terminal) -> None:
        self._terminal = terminal

    def write(self, text: str) -> int:
        self._terminal.write(text)
        return len(text)

    def flush(self) -> None:
        pass


def _whole_lines(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def _remember(line: str) -> None:
    import readline

    # Like HISTCONTROL=ignoredups: a command repeated ten times is one step back.
    length = readline.get_current_history_length()
    if length == 0 or readline.get_history_item(length) != line:
        readline.add_history(line)


def _readline_library() -> ctypes.CDLL | None:
    """The C library behind Python's ``readline`` module, if it has the callback interface."""
    try:
        import ctypes
        import readline
    except ImportError:
        return None
    try:
        lib = ctypes.CDLL(readline.__file__)
    except (OSError, AttributeError):  # AttributeError: a readline built into the interpreter
        return None
    if not all(hasattr(lib, name) for name in (*_FUNCTIONS, "rl_point", "rl_end", "rl_line_buffer")):
        return None
    return lib


@contextlib.contextmanager
def _logs_above(terminal: Terminal) -> Iterator[None]:
    """Point the root logger's handlers that write to a terminal at ``terminal``."""
    moved: list[tuple[logging.StreamHandler[Any], Any]] = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            stream = handler.stream
            with contextlib.suppress(AttributeError, ValueError, OSError):
                if stream.isatty():
                    moved.append((handler, handler.setStream(_AbovePrompt(terminal))))
    try:
        yield
    finally:
        for handler, stream in moved:
            handler.setStream(stream)


@contextlib.asynccontextmanager
async def open_terminal(prompt: str, history_file: Path | None, history_size: int) -> AsyncIterator[Terminal | None]:
    """Line editing on the process's own terminal (standard input and output), with the
    history read from and written back to ``history_file`` (at most ``history_size``
    lines); None when this Python's readline cannot be driven (see the module docstring)."""
    lib = _readline_library()
    if lib is None:
        yield None
        return
    import ctypes
    import readline
    import termios

    # Python handles the signals (trio turns SIGINT into a shutdown); readline's own
    # handlers would only stand in between.
    ctypes.c_int.in_dll(lib, "rl_catch_signals").value = 0
    fd = sys.stdin.fileno()
    readline.set_history_length(history_size)
    if history_file is not None:
        try:
            readline.read_history_file(history_file)
        except FileNotFoundError:
            pass  # the first run
        except OSError as exc:
            log.warning("cannot read the shell history %s: %s", history_file, exc)
    saved_mode = termios.tcgetattr(fd)
    terminal = Terminal(lib, prompt, sys.stdout, fd)
    try:
        terminal._start()
        with _logs_above(terminal):
            try:
                yield terminal
            finally:
                terminal._stop()
    finally:
        # readline restores the mode it changed; this also covers a stop half-way.
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved_mode)
        if history_file is not None and history_size > 0:
            try:
                history_file.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(history_file)
                os.chmod(history_file, 0o600)  # what was typed may be private
            except OSError as exc:
                log.warning("cannot write the shell history %s: %s", history_file, exc)
