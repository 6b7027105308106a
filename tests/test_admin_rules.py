"""Admin outside chat: route rules and roles changed with ``oco rules``/``oco roles``
against the store of a running ``oco run`` change what people in chat may do, within
the few seconds a bot takes to read the store again, and are audited as the operator;
admins do the same from chat with ``oco rule``; ``oco rules list`` says where each rule
comes from. And the log options: ``log_format: json`` lines parse, ``log_file`` rotates.

Chat is played through the memory adapter's control service; the stores are SQLite and
the local PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from oco_core._cli import EXIT_CONFIG, EXIT_OK, EXIT_USAGE
from oco_core._logs import JsonFormatter
from oco_core.testing import ControlChat, oco_cli, run_oco

PING = '["python", "-m", "oco_core.examples.ping"]'
#: How long a change in the store may take to reach a running bot (it reads every 5 s).


@pytest.fixture(params=["sqlite", "postgresql"])
def store_yaml(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The ``store:`` line: a SQLite file, or tables of this test's own on the local
    PostgreSQL (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"store: {{url: 'sqlite:///{tmp_path / 'oco.db'}'}}\n"
        return
    url, prefix = request.getfixturevalue("postgres_tables")
    yield f"store: {{url: '{url}', table_prefix: '{prefix}'}}\n"


def bot_yaml(store: str, *, extra: str = "") -> str:
    """A bot with a memory adapter (control service), the ping example whose ``ping``
    needs the permission ``ops`` by the config, and alice as its admin."""
    return (
        "adapters:\n  - {type: memory, control: '127.0.0.1:0', control_address_file: control.address}\n"
        "grpc: {listen: '127.0.0.1:0'}\n"
        f"{store}"
        "auth: {admins: [memory/alice]}\n"
        f"callbacks:\n  - {{id: example, command: {PING}, route_rules: {{ping: {{permission: ops}}}}}}\n"
        f"{extra}"
    )


async def oco(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``oco ARGS`` with the bot's config, as a process (it must not wait on the bot)."""
    return await trio.to_thread.run_sync(lambda: oco_cli(*args, "--config", str(cwd / "oco.yaml"), cwd=cwd))


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == EXIT_OK, (result.stdout, result.stderr)
    return result.stdout


def rows(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in ok(result).splitlines()]


async def test_rules_and_roles_set_with_the_cli_change_what_a_running_bot_lets_people_do(
    tmp_path: Path, store_yaml: str
) -> None:
    async with run_oco(bot_yaml(store_yaml), tmp_path) as bot:
        chat = ControlChat(await bot.written("control.address"), user="bob")
        await bot.expect(r"callback 'example' is listening", stream="stderr")
        assert "you need the permission `ops`" in await chat.say("oco ping")

        listed = rows(await oco("rules", "list", "--json", cwd=tmp_path))
        assert [(r["route"], r["permission"], r["origin"], r["source"]) for r in listed] == [
            ("ping", "ops", "config", "callbacks[0].route_rules")
        ]

        # Lifted in the store, by the operator: bob may ping, without a restart.
        changed = await oco("rules", "set", "example", "ping", "--no-permission", "--as", "tester", cwd=tmp_path)
        assert "kept in the store, over the config" in ok(changed)
        await chat.until("oco ping", "PONG")
        listed = rows(await oco("rules", "list", "--json", cwd=tmp_path))
        assert [(r["route"], r["permission"], r["origin"], r["overrides"], r["overridden"]) for r in listed] == [
            ("ping", "", "store", True, False),
            ("ping", "ops", "config", False, True),
        ]
        assert listed[0]["source"] == "cli/tester"
        table = ok(await oco("rules", "list", cwd=tmp_path)).splitlines()
        assert table[0].split() == ["CALLBACK", "ROUTE", "PERMISSION", "ROOMS", "NOT", "IN", "ORIGIN"]
        assert "store (set by cli/tester, " in table[1]
        assert "overrides the config" in table[1]
        assert "config (callbacks[0].route_rules; overridden by the store)" in table[2]

        # A room rule keyed by a pattern, only in the store: echo is refused in general.
        ok(await oco("rules", "set", "example", "e*", "--deny", "memory/general", "--as", "tester", cwd=tmp_path))
        await chat.until("oco echo hi", "that command is not available here")
        assert await chat.say("oco ping") == "PONG"  # the exact key still wins for ping
        ok(await oco("rules", "unset", "example", "e*", "--as", "tester", cwd=tmp_path))
        await chat.until("oco echo hi", "hi")

        # Unset: the config's rule applies again; a role granted with the CLI lets bob in.
        assert "the config's rule for it applies again" in ok(
            await oco("rules", "unset", "example", "ping", "--as", "tester", cwd=tmp_path)
        )
        await chat.until("oco ping", "you need the permission `ops`")
        ok(await oco("roles", "grant", "memory/bob", "ops", "--as", "tester", cwd=tmp_path))
        await chat.until("oco ping", "PONG")
        roles = ok(await oco("roles", "list", cwd=tmp_path)).splitlines()
        assert roles[1].split() == ["memory/bob", "ops", "store"]
        assert roles[2].split()[:2] == ["memory/alice", "admin"]
        assert "auth.admins" in roles[2]
        ok(await oco("roles", "revoke", "memory/bob", "ops", "--as", "tester", cwd=tmp_path))
        await chat.until("oco ping", "you need the permission `ops`")

        audited = rows(await oco("audit", "--kind", "admin", "--user", "cli/tester", "--json", cwd=tmp_path))
        assert [r["detail"] for r in audited] == [
            "oco rules set example ping --no-permission",
            "oco rules set example e* --deny memory/general",
            "oco rules unset example e*",
            "oco rules unset example ping",
            "oco roles grant memory/bob ops",
            "oco roles revoke memory/bob ops",
        ]
        assert {(r["callback"], r["route"]) for r in audited[:4]} == {("example", "ping"), ("example", "e*")}
        assert await bot.stop() == EXIT_OK


async def test_admins_change_rules_from_chat(tmp_path: Path) -> None:
    store = f"store: {{url: 'sqlite:///{tmp_path / 'oco.db'}'}}\n"
    async with run_oco(bot_yaml(store), tmp_path) as bot:
        chat = ControlChat(await bot.written("control.address"), user="bob")
        await bot.expect(r"callback 'example' is listening", stream="stderr")
        assert await chat.say("oco rule set example echo deny=memory/general") == (
            "only admins may change route rules (auth.admins of the config)"
        )
        # A room without its adapter is on the speaker's: general is memory/general.
        answer = await chat.say("oco rule set example echo deny=general,private", user="alice")
        assert answer == (
            "example echo: permission (the callback's); rooms any; not in memory/general, private (kept in the store)"
        )
        # The bot that took the command applies it at once; no reload needed.
        assert await chat.say("oco echo hi") == "that command is not available here"
        answer = await chat.say("oco rule set example ping no-permission", user="alice")
        assert answer.startswith("example ping: permission (none);")
        assert await chat.say("oco ping") == "PONG"
        listed = (await chat.say("oco rule list", user="alice")).splitlines()
        assert listed == [
            "example ping: permission (none); rooms any; not in - (store, set by memory/alice)",
            "example ping: permission ops; rooms any; not in - "
            "(config, callbacks[0].route_rules, overridden by the store)",
            "example echo: permission (the callback's); rooms any; not in memory/general, private "
            "(store, set by memory/alice)",
        ]
        assert "is no change a rule knows" in await chat.say("oco rule set example ping everyone", user="alice")
        assert await chat.say("oco rule unset example echo", user="alice") == "removed the rule for example echo"
        assert await chat.say("oco echo back") == "back"
        # `rule` followed by anything else is not the bot's own command.
        assert "no command matches" in await chat.say("oco rule the world")

        # The CLI sees what chat set, and where it came from.
        listed_cli = rows(await oco("rules", "list", "--json", cwd=tmp_path))
        assert [(r["route"], r["origin"], r["source"]) for r in listed_cli] == [
            ("ping", "store", "memory/alice"),
            ("ping", "config", "callbacks[0].route_rules"),
        ]
        audited = rows(await oco("audit", "--kind", "admin", "--callback", "example", "--json", cwd=tmp_path))
        assert [(r["user"], r["decision"], r["route"]) for r in audited] == [
            ("memory/alice", "allowed", "echo"),
            ("memory/alice", "allowed", "ping"),
            ("memory/alice", "allowed", "echo"),
        ]
        assert await bot.stop() == EXIT_OK


async def test_cli_errors_name_what_was_wrong_and_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "oco.yaml").write_text(bot_yaml(f"store: {{url: 'sqlite:///{tmp_path / 'oco.db'}'}}\n"))
    wrong = await oco("roles", "grant", "bob", "ops", cwd=tmp_path)
    assert wrong.returncode == EXIT_USAGE
    assert "write it as <adapter>/<user id>" in wrong.stderr
    assert "adapters: memory" in wrong.stderr
    nothing = await oco("rules", "set", "example", "ping", cwd=tmp_path)
    assert nothing.returncode == EXIT_USAGE
    assert "say what to change" in nothing.stderr
    absent = await oco("rules", "unset", "example", "ping", cwd=tmp_path)
    assert absent.returncode == EXIT_USAGE
    assert "no rule for 'ping' in the store" in absent.stderr
    assert "edit the config" in absent.stderr
    both = await oco("rules", "set", "example", "ping", "--permission", "x", "--no-permission", cwd=tmp_path)
    assert both.returncode == EXIT_USAGE
    assert "not allowed with argument --permission" in both.stderr
    bad_id = await oco("rules", "set", "no/such", "ping", "--no-permission", cwd=tmp_path)
    assert bad_id.returncode == EXIT_USAGE
    assert "invalid callback id" in bad_id.stderr
    bare = await oco("rules", "set", "example", "ping", "--allow", "#ops", "--as", "x", cwd=tmp_path)
    assert bare.returncode == EXIT_OK
    assert "'#ops' match no room: room ids start with their adapter" in bare.stderr
    unknown = await oco("rules", "set", "other", "go", "--permission", "go", "--as", "x", cwd=tmp_path)
    assert "has no callback 'other'" in unknown.stderr
    assert rows(await oco("rules", "list", "--callback", "other", "--json", cwd=tmp_path))[0]["permission"] == "go"


async def test_cli_rule_set_starts_from_the_rule_in_force_and_lists_stored_patterns_first(tmp_path: Path) -> None:
    store = f"store: {{url: 'sqlite:///{tmp_path / 'oco.db'}'}}\n"
    rule = "{'deploy*': {permission: deployer, allow_rooms: [irc/#ops]}}"
    callbacks = f"callbacks:\n  - {{id: example, route_rules: {rule}}}\n"
    (tmp_path / "oco.yaml").write_text(bot_yaml(store).split("callbacks:")[0] + callbacks)
    set_prod = oco("rules", "set", "example", "deploy-prod", "--deny", "irc/#random", "--as", "x", cwd=tmp_path)
    changed = ok(await set_prod)
    assert "example deploy-prod: permission deployer; rooms: irc/#ops; not in: irc/#random" in changed
    ok(await oco("rules", "set", "example", "deploy-*", "--no-permission", "--as", "x", cwd=tmp_path))
    listed = rows(await oco("rules", "list", "--json", cwd=tmp_path))
    # In the order they are tried: the stored deploy-* before the config's deploy*.
    assert [(r["route"], r["origin"], r["permission"]) for r in listed] == [
        ("deploy-prod", "store", "deployer"),
        ("deploy-*", "store", ""),
        ("deploy*", "config", "deployer"),
    ]


async def test_json_log_file_rotates_and_bounds_a_callback_printing_in_a_loop(tmp_path: Path) -> None:
    loop = json.dumps([sys.executable, "-c", "while True: print('x' * 200, flush=True)"])
    config = (
        "adapters: [{type: memory}]\n"
        "grpc: {listen: '127.0.0.1:0'}\n"
        f"store: {{url: 'sqlite:///{tmp_path / 'oco.db'}'}}\n"
        f"callbacks: [{{id: chatty, command: {loop}, output_lines_per_second: 50}}]\n"
        "log_format: json\n"
        f"log_file: {tmp_path / 'oco.log'}\n"
        "log_max_bytes: 4096\n"
        "log_backups: 2\n"
    )
    async with run_oco(config, tmp_path) as bot:
        files = [tmp_path / "oco.log", tmp_path / "oco.log.1", tmp_path / "oco.log.2"]

        def dropped() -> bool:
            return any("output dropped" in f.read_text() for f in files if f.exists())

        with trio.fail_after(30):
            while not (files[2].exists() and dropped()):
                await trio.sleep(0.1)
        assert await bot.stop() == EXIT_OK
    assert not (tmp_path / "oco.log.3").exists()  # two backups kept, the oldest deleted
    entries: list[dict[str, Any]] = []
    for path in files:
        assert path.stat().st_size <= 4096 + 1024  # rotated before a line would pass it
        entries += [json.loads(line) for line in path.read_text().splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert all(e["time"].endswith("Z") and "T" in e["time"] for e in entries)
    assert any(e["logger"] == "oco.callback.chatty" and e["message"] == "x" * 200 for e in entries)
    warnings = [e for e in entries if "output dropped" in e["message"]]
    assert warnings
    assert warnings[0]["level"] == "WARNING"
    assert "output_lines_per_second" in warnings[0]["message"]
    # The log went to the file alone.
    assert not [line for line in bot.stderr_lines if "oco.callback" in line]


async def test_a_log_file_that_cannot_be_written_is_refused_at_start(tmp_path: Path) -> None:
    config = (
        "adapters: [{type: memory}]\n"
        f"store: {{url: 'sqlite:///{tmp_path / 'oco.db'}'}}\n"
        "callbacks: []\n"
        f"log_file: {tmp_path / 'missing' / 'oco.log'}\n"
    )
    (tmp_path / "oco.yaml").write_text(config)
    result = await trio.to_thread.run_sync(lambda: oco_cli("run", "--config", str(tmp_path / "oco.yaml"), cwd=tmp_path))
    assert result.returncode == EXIT_CONFIG
    assert "log_file" in result.stderr
    assert "create its folder" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_json_lines_carry_the_exception_text() -> None:
    formatter = JsonFormatter()
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord("oco.x", logging.ERROR, __file__, 1, "failed: %s", ("it",), sys.exc_info())
    line = formatter.format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "failed: it"
    assert entry["level"] == "ERROR"
    assert entry["logger"] == "oco.x"
    assert entry["exception"].startswith("Traceback")
    assert "ValueError: boom\nsecond line" in entry["exception"]
