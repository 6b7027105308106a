"""pytest plugin shared by every OCO distribution's tests (entry point ``pytest11``).

Tests that need a real server (ngircd, Synapse, PostgreSQL, Redis) call
:func:`server_unavailable` when it cannot be found. On a developer's machine the test is
skipped with the reason; where ``OCO_REQUIRE_SERVERS=1`` is set (``.ci/run`` sets it),
it fails instead, so CI never counts a skipped server test as a pass.

PostgreSQL and Redis come from :func:`server_url`: ``OCO_TEST_POSTGRES_URL`` or
``OCO_TEST_REDIS_URL`` when set; when unset, the local server at the default URL if it
answers (a TCP connection and a real login or ``PING`` within a second), so a machine
that runs them tests against them without any setting. An empty value or ``none`` turns
one off. The report header and the end of the summary say which servers were used, and
where; fixtures name others they use (ngircd, Synapse) with :func:`server_used`.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Literal, NoReturn
from urllib.parse import unquote, urlsplit

import pytest

REQUIRE_SERVERS_ENV = "OCO_REQUIRE_SERVERS"
#: How long the probe of a default server may take to connect, and then to answer.
PROBE_SECONDS = 1.0

ServerKind = Literal["postgresql", "redis"]


@dataclass(frozen=True)
class _Server:
    title: str
    env: str
    default: str


SERVERS: dict[ServerKind, _Server] = {
    "postgresql": _Server("PostgreSQL", "OCO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    "redis": _Server("Redis", "OCO_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"),
}
# Values of OCO_TEST_*_URL that turn the server off rather than name one.
_OFF = ("", "none", "off", "no", "false", "0")

# What the tests of this process used (name -> where), for the summary. Per process, like
# the environment it is derived from.
_used: dict[str, str] = {}
_missing: dict[str, str] = {}


def servers_required() -> bool:
    """True when a missing test server must fail the test rather than skip it."""
    return os.environ.get(REQUIRE_SERVERS_ENV, "") not in ("", "0", "false", "no")


def server_unavailable(name: str, why: str) -> NoReturn:
    """Skip (or, in CI, fail) the calling test because server ``name`` is not available."""
    __tracebackhide__ = True
    message = f"{name} is not available: {why}"
    _missing.setdefault(name, why)
    if servers_required():
        pytest.fail(f"{message} ({REQUIRE_SERVERS_ENV} is set, so this cannot be skipped)")
    pytest.skip(message)


def server_used(name: str, where: str) -> None:
    """Name a server the tests use and where it is (``server_used("ngircd", path)``), for
    the line the summary ends with."""
    _used[name] = where


def server_url(kind: ServerKind) -> str:
    """The URL of the test ``kind`` server ("postgresql" or "redis"): its
    ``OCO_TEST_*_URL`` when set, else the local default when that answers. Otherwise the
    calling test is skipped (failed where ``OCO_REQUIRE_SERVERS=1``) with why and how to
    provide one. The caller still checks that the server does what it needs."""
    __tracebackhide__ = True
    url, how = _choose(kind)
    if url is None:
        server_unavailable(SERVERS[kind].title, how)
    server_used(kind, f"{_masked(url)} ({how})")
    return url


@functools.cache
def _choose(kind: ServerKind) -> tuple[str | None, str]:
    """``(url, how it was chosen)``, or ``(None, why there is none)``; probed once."""
    server = SERVERS[kind]
    given = os.environ.get(server.env)
    if given is not None:
        if given.strip().lower() in _OFF:
            return None, f"{server.env}={given!r} turns it off; unset it to use {server.default} when that answers"
        return given, f"from {server.env}"
    refused = (_probe_postgres if kind == "postgresql" else _probe_redis)(server.default)
    if refused is None:
        return server.default, "default, answered"
    return None, f"{server.env} is unset and the default {server.default} {refused}; set {server.env} to a server's URL"


def _masked(url: str) -> str:
    from .._store import mask_url  # oco_core's own, imported only when a server is used

    return mask_url(url)


def _probe_postgres(url: str) -> str | None:
    """None when a PostgreSQL at ``url`` lets its user into its database without a
    password (a real startup, then Terminate); else what went wrong, as a phrase."""
    parts = urlsplit(url)
    user = unquote(parts.username or "postgres")
    database = unquote(parts.path.lstrip("/")) or user
    params = b"".join(k + b"\0" + v.encode() + b"\0" for k, v in ((b"user", user), (b"database", database)))
    startup = struct.pack("!i", 3 << 16) + params + b"\0"  # protocol 3.0
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), PROBE_SECONDS) as sock:
            sock.settimeout(PROBE_SECONDS)
            sock.sendall(struct.pack("!i", len(startup) + 4) + startup)
            reader = sock.makefile("rb")
            while True:
                head = reader.read(5)
                if len(head) < 5:
                    return "closed the connection during login"
                kind, length = head[:1], struct.unpack("!i", head[1:])[0]
                body = reader.read(length - 4)
                if kind == b"E":
                    fields = {f[:1]: f[1:].decode(errors="replace") for f in body.split(b"\0") if f}
                    return f"refused the login: {fields.get(b'M', 'no message')}"
                if kind == b"R" and struct.unpack("!i", body[:4])[0] != 0:
                    return f"asks {user} for a password"
                if kind == b"Z":  # ready for a query: logged in
                    sock.sendall(b"X" + struct.pack("!i", 4))
                    return None
    except OSError as exc:
        return f"did not answer ({exc.strerror or exc})"


def _probe_redis(url: str) -> str | None:
    """None when a Redis at ``url`` takes its database number and answers PING without
    a password; else what went wrong, as a phrase. Touches no data."""
    parts = urlsplit(url)
    database = parts.path.lstrip("/") or "0"
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), PROBE_SECONDS) as sock:
            sock.settimeout(PROBE_SECONDS)
            reader = sock.makefile("rb")
            for command in (["SELECT", database], ["PING"], ["QUIT"]):
                wire = f"*{len(command)}\r\n" + "".join(f"${len(c)}\r\n{c}\r\n" for c in command)
                sock.sendall(wire.encode())
                reply = reader.readline().strip()
                if not reply.startswith(b"+"):
                    return f"refused {command[0]}: {reply.decode(errors='replace') or 'no reply'}"
    except OSError as exc:
        return f"did not answer ({exc.strerror or exc})"
    return None


def _servers_line(chosen: Mapping[str, str]) -> str:
    return "oco servers: " + (", ".join(f"{name}={where}" for name, where in chosen.items()) or "none used")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which PostgreSQL and Redis the tests will use, before they run."""
    chosen: dict[str, str] = {}
    for kind in SERVERS:
        url, how = _choose(kind)
        chosen[kind] = f"{_masked(url)} ({how})" if url is not None else f"none ({how})"
    return [_servers_line(chosen)]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """End the summary with the servers the tests used, and those they missed."""
    if _used:
        terminalreporter.write_line(_servers_line(dict(sorted(_used.items()))))
    for name, why in sorted(_missing.items()):
        terminalreporter.write_line(f"oco servers: {name} not available: {why}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Give back the reason of a skip raised inside trio.

    pytest-trio (0.8) catches the exception group a skip inside ``trio.run`` arrives in
    and calls ``pytest.skip()`` again without the reason, so every such skip read just
    "Skipped". The original is the new exception's context."""
    report = yield
    if report.skipped and call.excinfo is not None and isinstance(report.longrepr, tuple):
        lost = _skip_lost_in_group(call.excinfo.value)
        if lost is not None:
            reason, skip = lost
            path, line = report.longrepr[:2]
            # Where the test or fixture asked to skip: its deepest frame not hidden the way
            # pytest hides its own (and server_unavailable's) from tracebacks.
            tb = skip.__traceback__
            while tb is not None:
                if not tb.tb_frame.f_locals.get("__tracebackhide__"):
                    path, line = tb.tb_frame.f_code.co_filename, tb.tb_lineno
                tb = tb.tb_next
            report.longrepr = (path, line, f"Skipped: {reason}")
    return report


def _skip_lost_in_group(exc: BaseException) -> tuple[str, BaseException] | None:
    """``(reason, the skip that had it)`` when ``exc`` is a skip without a reason raised
    while handling a group that held one skip with a reason, and nothing else."""
    if not isinstance(exc, pytest.skip.Exception) or exc.msg:
        return None
    group = exc.__context__
    if not isinstance(group, BaseExceptionGroup):
        return None
    leaves: list[BaseException] = []
    queue: list[BaseException] = [group]
    while queue:
        current = queue.pop()
        if isinstance(current, BaseExceptionGroup):
            queue.extend(current.exceptions)
        else:
            leaves.append(current)
    [leaf, *others] = leaves
    if others or not isinstance(leaf, pytest.skip.Exception) or not leaf.msg:
        return None
    return leaf.msg, leaf
