"""``oco audit``: records written with the bot's own AuditLog into a real store (opened
as the CLI opens it), then read back by the ``oco`` command run as a process, through
every filter; and one record made by a real ``oco run`` from a chat command.

Runs on SQLite, and on PostgreSQL too when ``OCO_TEST_POSTGRES_URL`` is set.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from oco_core import _audit
from oco_core._admin import open_configured_store
from oco_core._audit import AuditLog
from oco_core._cli import EXIT_OK, EXIT_STORE, EXIT_USAGE
from oco_core._config import parse_config
from oco_core._plugins import load_plugins
from oco_core.testing import free_port, oco_cli, run_oco

#: (seconds ago, kind, decision, details), oldest first.
RECORDS: list[tuple[float, str, str, dict[str, str]]] = [
    (
        3 * 86400,
        "route",
        "denied",
        {
            "user": "irc/alice",
            "person": "p-alice",
            "room": "irc/#ops",
            "callback": "deploy",
            "route": "deploy_app",
            "permission": "deploy",
            "detail": "needs the permission deploy",
        },
    ),
    (
        2 * 3600,
        "capability",
        "denied",
        {"callback": "roamer", "permission": "join", "detail": "callback 'roamer' may not join rooms"},
    ),
    (
        30 * 60,
        "admin",
        "allowed",
        {
            "user": "irc/bob",
            "person": "p-bob",
            "room": "irc/#ops",
            "permission": "deployer",
            "detail": "grant irc/alice deployer",
        },
    ),
    (
        60,
        "check_permission",
        "allowed",
        {
            "user": "matrix/@carol:example.org",
            "callback": "deploy",
            "permission": "deploy",
            "detail": "role deployer \x1b[31mred\x1b[0m",
        },
    ),
]


def oco(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``oco ARGS`` in UTC, so that the local times it prints are known."""
    return oco_cli(*args, cwd=cwd, env={"TZ": "UTC"})


@pytest.fixture(params=["sqlite", "postgresql"])
def config_file(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A config whose store is a SQLite file, or tables of this test's own on the test
    PostgreSQL (dropped afterwards)."""
    path = tmp_path / "oco.yaml"
    if request.param == "sqlite":
        path.write_text(f'store: {{url: "sqlite:///{tmp_path / "oco.db"}"}}\ncallbacks: []\n')
        yield path
        return
    url, prefix = request.getfixturevalue("postgres_tables")
    path.write_text(f'store: {{url: "{url}", table_prefix: "{prefix}"}}\ncallbacks: []\n')
    yield path


async def write_records(config: Path, monkeypatch: pytest.MonkeyPatch) -> float:
    """Write RECORDS through AuditLog (its clock set to each record's time) into the
    store the config names, opened as the CLI opens it; return the time they are
    relative to: now (not when the module was imported: in a long run minutes apart,
    and the filters the CLI is asked for are relative to now)."""
    now = time.time()
    clock = [0.0]
    monkeypatch.setattr(_audit, "time", SimpleNamespace(time=lambda: clock[0]))
    loaded = parse_config(config.read_text(), str(config))
    async with open_configured_store(loaded, load_plugins()) as store:
        log = AuditLog(store, retention_days=None)
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            for ago, kind, decision, details in RECORDS:
                clock[0] = now - ago
                log.record(kind, decision, **details)
                # One batch each: a real batch holds what queued up within moments, and
                # the scan counts on that (its key is its first record's time).
                await log.flush()
            nursery.cancel_scope.cancel()
    assert log.lost == 0
    return now


def kinds(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The kinds of the records ``oco audit --json`` printed, in order."""
    assert result.returncode == EXIT_OK, result.stderr
    return [json.loads(line)["kind"] for line in result.stdout.splitlines()]


def utc(now: float, seconds_ago: float) -> str:
    return datetime.fromtimestamp(now - seconds_ago, UTC).strftime("%Y-%m-%d %H:%M:%S")


async def test_filters_table_and_json(tmp_path: Path, config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = await write_records(config_file, monkeypatch)
    c = str(config_file)

    def audit(*args: str) -> subprocess.CompletedProcess[str]:
        return oco("audit", "--config", c, *args, cwd=tmp_path)

    def filtered(*args: str) -> list[str]:
        return kinds(audit("--json", *args))

    everything = ["route", "capability", "admin", "check_permission"]
    assert filtered() == everything
    assert filtered("--since", "1h") == ["admin", "check_permission"]
    assert filtered("--since", "2d") == ["capability", "admin", "check_permission"]
    assert filtered("--since", "90m", "--until", "10m") == ["admin"]
    assert filtered("--until", "1h") == ["route", "capability"]
    iso = datetime.fromtimestamp(now - 3 * 3600, UTC)
    assert filtered("--since", iso.isoformat()) == ["capability", "admin", "check_permission"]
    assert filtered("--since", iso.strftime("%Y-%m-%dT%H:%M:%SZ")) == ["capability", "admin", "check_permission"]
    # Without an offset, local time (UTC in these runs).
    assert filtered("--since", iso.strftime("%Y-%m-%dT%H:%M:%S")) == ["capability", "admin", "check_permission"]
    assert filtered("--user", "irc/alice") == ["route"]  # the user, not a detail that mentions them
    assert filtered("--user", "p-bob") == ["admin"]  # the person a user id belongs to
    assert filtered("--callback", "deploy") == ["route", "check_permission"]
    assert filtered("--kind", "admin") == ["admin"]
    assert filtered("--decision", "denied") == ["route", "capability"]
    assert filtered("--room", "irc/#ops") == ["route", "admin"]
    assert filtered("--permission", "deploy") == ["route", "check_permission"]
    assert filtered("--grep", "grant") == ["admin"]
    assert filtered("--callback", "deploy", "--decision", "allowed") == ["check_permission"]
    assert filtered("--kind", "nothing-like-it") == []

    table = audit()
    assert table.returncode == EXIT_OK, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "TIME",
        "KIND",
        "DECISION",
        "USER",
        "ROOM",
        "CALLBACK/ROUTE",
        "PERMISSION",
        "DETAIL",
    ]
    assert len(lines) == 5
    route, capability, admin, check = lines[1:]
    assert route.startswith(utc(now, 3 * 86400) + "  route ")
    assert route.split()[3:9] == ["denied", "irc/alice", "(p-alice)", "irc/#ops", "deploy/deploy_app", "deploy"]
    assert route.endswith("needs the permission deploy")
    assert capability.split()[3:8] == ["denied", "-", "-", "roamer", "join"]
    assert admin.split()[3:7] == ["allowed", "irc/bob", "(p-bob)", "irc/#ops"]
    # What people typed never reaches the terminal as control characters.
    assert "\x1b" not in table.stdout
    assert check.endswith("role deployer \\x1b[31mred\\x1b[0m")

    newest = audit("--limit", "2")
    assert [line.split()[2] for line in newest.stdout.splitlines()[1:]] == ["admin", "check_permission"]
    assert "showing the newest 2" in newest.stderr

    lines = audit("--json", "--kind", "check_permission").stdout.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["time"] == pytest.approx(now - 60, abs=1e-5)
    assert record["time_iso"].startswith(datetime.fromtimestamp(now - 60, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    assert record["detail"] == "role deployer \x1b[31mred\x1b[0m"
    assert "\x1b" not in lines[0]  # escaped in the JSON text too
    assert record["user"] == "matrix/@carol:example.org"

    nothing = audit("--since", "5s")
    assert nothing.returncode == EXIT_OK
    assert nothing.stdout == ""
    assert "no audit records match" in nothing.stderr


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--since", "yesterday"], "'yesterday' is not a time"),
        (["--until", "1 fortnight"], "is not a time"),
        (["--since", "1h", "--until", "2h"], "--since is later than --until"),
        (["--limit", "0"], "positive whole number"),
        (["--decision", "maybe"], "invalid choice"),
    ],
    ids=["since", "until", "order", "limit", "decision"],
)
def test_usage_errors_name_what_is_accepted(tmp_path: Path, args: list[str], problem: str) -> None:
    config = tmp_path / "oco.yaml"
    config.write_text(f'store: {{url: "sqlite:///{tmp_path / "oco.db"}"}}\n')
    result = oco("audit", "--config", str(config), *args, cwd=tmp_path)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stdout == ""
    assert problem in result.stderr
    if "is not a time" in problem:
        assert "30s, 15m, 1h, 2d, 1w" in result.stderr
        assert "ISO 8601" in result.stderr


def test_store_down_is_one_line_with_exit_5(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there: the store is down
    config = tmp_path / "oco.yaml"
    config.write_text(f'store: {{url: "postgresql+psycopg://oco:hunter2-secret@127.0.0.1:{port}/oco"}}\n')
    result = oco("audit", "--config", str(config), cwd=tmp_path)
    assert result.returncode == EXIT_STORE
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("oco: error: ")
    assert "unavailable" in lines[0]
    assert "hunter2-secret" not in lines[0]


@pytest.mark.slow
async def test_a_record_the_running_bot_wrote(tmp_path: Path, bot_config: Callable[[str], str]) -> None:
    """A person who is no admin tries `oco grant` in chat; `oco audit` (while the bot
    still runs, on the same SQLite file) shows the refusal."""
    config = bot_config("callbacks: []\n")
    async with run_oco(config, tmp_path / "bot") as bot:
        await bot.write("oco grant bob deployer")
        await bot.expect("only admins may grant roles")
        found: list[dict[str, Any]] = []
        with trio.fail_after(20):
            args = ("audit", "--config", str(tmp_path / "bot" / "oco.yaml"), "--kind", "admin", "--json")
            while not found:
                result = await trio.to_thread.run_sync(lambda: oco(*args, cwd=tmp_path))
                assert result.returncode == EXIT_OK, result.stderr
                found = [json.loads(line) for line in result.stdout.splitlines()]
                await trio.sleep(0.2)
        assert await bot.stop() == EXIT_OK
    assert found[0]["decision"] == "denied"
    assert found[0]["user"] == "shell/alice"
    assert found[0]["detail"] == "grant bob deployer"
