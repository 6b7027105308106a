"""Live reload: SIGHUP and `oco reload` apply a changed config to a running `oco run`
without dropping what the change does not touch; a broken config changes nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import trio

from oco_core._adapter import AdapterType
from oco_core._bot import Bot
from oco_core._config import parse_config
from oco_core._leader import Solo
from oco_core._plugins import Plugins, load_plugins
from oco_core._proto import robot_pb2, robot_pb2_grpc
from oco_core._reload import (
    Change,
    Reloader,
    ReloadError,
    _is_oco_command,
    _looks_like_oco,
    diff,
    effective,
    pid_path,
    send_reload,
    status_path,
)
from oco_core.testing import ControlChat, MemoryAdapter, MemoryConfig, OcoProcess, open_bot, run_oco

PING = '["python", "-m", "oco_core.examples.ping"]'
DIAL_IN_SECRET = "s" * 32


def config(workdir: Path, callbacks: str = "[]", *, extra: str = "", second: str = "") -> str:
    """A bot with a memory adapter (control service), SQLite, and ``callbacks``."""
    adapters = f'  - {{type: memory, control: "127.0.0.1:0", control_address_file: control.address}}\n{second}'
    return (
        f"adapters:\n{adapters}"
        f"grpc: {{listen: '127.0.0.1:0'}}\n"
        f"store: {{url: 'sqlite:///{workdir / 'oco.db'}'}}\n"
        f"pid_file: {workdir / 'bot.pid'}\n"
        f"callbacks: {callbacks}\n{extra}"
    )


async def reload_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "oco_core", "reload", *args]
    with trio.fail_after(60):
        return await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)


async def reload(bot: OcoProcess, text: str) -> str:
    """Write the config and run `oco reload`; its output (it must succeed)."""
    (bot.workdir / "oco.yaml").write_text(text)
    done = await reload_cli("--config", str(bot.workdir / "oco.yaml"))
    assert done.returncode == 0, (done.stdout, done.stderr, bot.stderr_lines[-20:])
    return done.stdout.decode()


def count(bot: OcoProcess, pattern: str) -> int:
    return sum(1 for line in bot.stderr_lines if re.search(pattern, line))


async def test_a_callback_added_answers_and_one_removed_stops(tmp_path: Path) -> None:
    async with run_oco(config(tmp_path), tmp_path) as bot:
        chat = ControlChat(await bot.written("control.address"))
        assert "PONG" not in await chat.say("oco ping", wait=1)
        out = await reload(bot, config(tmp_path, f"[{{id: example, command: {PING}}}]"))
        assert out == "reloaded: callbacks +example\n"
        await bot.expect(r"callback 'example' is listening", stream="stderr")
        assert await chat.say("oco ping") == "PONG"
        out = await reload(bot, config(tmp_path))
        assert out == "reloaded: callbacks -example\n"
        await bot.expect(r"callback 'example' stopped listening", stream="stderr")
        assert "PONG" not in await chat.say("oco ping", wait=1)
        assert bot.process.poll() is None
        assert await bot.stop() == 0
    assert count(bot, r"INFO oco_core._reload: reloaded: callbacks \+example$") == 1


async def test_route_rules_and_roles_change_what_people_may_run_without_restarting_the_callback(
    tmp_path: Path,
) -> None:
    guarded = f"[{{id: example, command: {PING}, route_rules: {{ping: {{permission: pinger}}}}}}]"
    async with run_oco(config(tmp_path, guarded), tmp_path) as bot:
        chat = ControlChat(await bot.written("control.address"))
        await bot.expect(r"callback 'example' is listening", stream="stderr")
        assert "you need the permission `pinger`" in await chat.say("oco ping")
        out = await reload(bot, config(tmp_path, guarded, extra="auth: {default_roles: [pinger]}\n"))
        assert out == "reloaded: auth\n"
        assert await chat.say("oco ping") == "PONG"
        denied = f'[{{id: example, command: {PING}, route_rules: {{ping: {{deny_rooms: ["memory/general"]}}}}}}]'
        out = await reload(bot, config(tmp_path, denied, extra="auth: {default_roles: [pinger]}\n"))
        assert out == "reloaded: callbacks ~example\n"
        assert await chat.say("oco ping") == "that command is not available here"
        assert await chat.say("oco echo still here") == "still here"
    # The callback's process and its Listen stream lived through both reloads.
    assert count(bot, r"started callback 'example'") == 1
    assert count(bot, r"callback 'example' is listening") == 1


async def test_an_adapter_changed_reconnects_alone(tmp_path: Path) -> None:
    second = (
        '  - {{type: memory, name: second, users: [{users}], control: "127.0.0.1:0", control_address_file: {file}}}\n'
    )
    callbacks = f"[{{id: example, command: {PING}}}]"
    first_config = config(tmp_path, callbacks, second=second.format(users="alice", file="second.address"))
    async with run_oco(first_config, tmp_path) as bot:
        chat = ControlChat(await bot.written("control.address"))
        other = ControlChat(await bot.written("second.address"))
        await bot.expect(r"callback 'example' is listening", stream="stderr")
        assert await other.say("oco ping") == "PONG"
        changed = config(tmp_path, callbacks, second=second.format(users="alice, carol", file="second-again.address"))
        assert await reload(bot, changed) == "reloaded: adapters ~second\n"
        again = ControlChat(await bot.written("second-again.address"))
        assert await again.say("oco ping", user="carol") == "PONG"
        # The first adapter, its control service and the callback's stream were untouched.
        assert await chat.say("oco ping") == "PONG"
    assert count(bot, r"adapter 'second' stopped \(reload\)") == 1
    assert count(bot, r"adapter 'memory' stopped") == 0
    assert count(bot, r"callback 'example' is listening") == 1


async def test_a_broken_config_changes_nothing_and_the_bot_keeps_answering(tmp_path: Path) -> None:
    callbacks = f"[{{id: example, command: {PING}}}]"
    async with run_oco(config(tmp_path, callbacks), tmp_path) as bot:
        chat = ControlChat(await bot.written("control.address"))
        await bot.expect(r"callback 'example' is listening", stream="stderr")
        broken = config(tmp_path, f"[{{id: example, command: {PING}, routes: [{{pattern: '(unclosed'}}]}}]")
        (tmp_path / "oco.yaml").write_text(broken + "auth: {default_roles: [pinger]}\n")
        done = await reload_cli("--config", str(tmp_path / "oco.yaml"))
        assert done.returncode == 3, done
        err = done.stderr.decode()
        assert "callbacks[0].routes[0].pattern" in err
        assert "the bot refused the new config and runs on with the old one" in err
        await bot.expect(
            r"ERROR oco_core._reload: reload refused, nothing changed: .*routes\[0\]\.pattern", stream="stderr"
        )
        # What `oco check-config` says of the same file, the bot's log says too.
        check = await trio.run_process(
            [sys.executable, "-m", "oco_core", "check-config", "--config", str(tmp_path / "oco.yaml")],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert check.returncode == 3
        reason = check.stderr.decode().removeprefix("oco: error: ").strip()
        assert any(reason in line for line in bot.stderr_lines)
        assert await chat.say("oco ping") == "PONG"
        assert bot.process.poll() is None


async def test_sighup_reloads_and_no_longer_ends_the_bot(tmp_path: Path) -> None:
    async with run_oco(config(tmp_path), tmp_path) as bot:
        chat = ControlChat(await bot.written("control.address"))
        (tmp_path / "oco.yaml").write_text(
            config(
                tmp_path,
                f"[{{id: example, command: {PING}}}]",
                extra="log_level: debug\ngrpc: {listen: '127.0.0.1:0', max_routes: 5}\n",
            ).replace("grpc: {listen: '127.0.0.1:0'}\n", "", 1)
        )
        bot.process.send_signal(signal.SIGHUP)
        await bot.expect(r"INFO oco_core._reload: reloaded: callbacks \+example; log level DEBUG$", stream="stderr")
        await bot.expect(r"callback 'example' is listening", stream="stderr")
        assert await chat.say("oco ping") == "PONG"
        warnings = [line for line in bot.stderr_lines if "cannot change while the bot runs" in line]
        assert len(warnings) == 1
        assert "grpc.max_routes" in warnings[0]
        assert "restart" in warnings[0]
        assert bot.process.poll() is None
        assert await bot.stop() == 0


async def test_oco_reload_says_why_it_cannot_reach_the_bot(tmp_path: Path) -> None:
    done = await reload_cli("--pid-file", str(tmp_path / "nothing.pid"))
    assert done.returncode != 0
    assert "no such pid file; is the bot running" in done.stderr.decode()
    (tmp_path / "oco.yaml").write_text("callbacks: []\n")
    done = await reload_cli("--config", str(tmp_path / "oco.yaml"))
    assert done.returncode != 0
    assert "set pid_file: in the config" in done.stderr.decode()


async def test_a_changed_secret_ends_the_streams_that_use_the_old_one(tmp_path: Path) -> None:
    def text(secret: str) -> str:
        return f"adapters: [{{type: memory}}]\ncallbacks: [{{id: dial, secret: '{secret}'}}]\n"

    current = [text(DIAL_IN_SECRET)]
    async with open_bot(current[0]) as running:
        from oco_core._plugins import load_plugins

        reloader = Reloader(running.bot, lambda: parse_config(current[0], "<test>"), load_plugins)
        ended = trio.Event()
        codes: list[grpc.StatusCode] = []

        def listen() -> None:
            with grpc.insecure_channel(running.address) as channel:
                stub = robot_pb2_grpc.RobotStub(channel)
                stream = stub.Listen(
                    robot_pb2.ListenRequest(), metadata=(("authorization", f"Bearer {DIAL_IN_SECRET}"),), timeout=30
                )
                try:
                    for _ in stream:
                        pass
                except grpc.RpcError as exc:
                    codes.append(exc.code())

        async with trio.open_nursery() as nursery:

            async def run_listen() -> None:
                await trio.to_thread.run_sync(listen)
                ended.set()

            nursery.start_soon(run_listen)
            with trio.fail_after(10):
                while not running.bot.router.subscriptions("dial"):
                    await trio.sleep(0.02)
            current[0] = text("t" * 32)
            outcome = await reloader.reload()
            assert outcome.ok
            assert outcome.message == "callbacks ~dial"
            with trio.fail_after(15):  # the Listen recheck, every few seconds
                await ended.wait()
        assert codes == [grpc.StatusCode.UNAUTHENTICATED]


# -- the difference itself -----------------------------------------------------------


def _diff(before: str, after: str) -> Change:
    old, new = parse_config(before).config, parse_config(after).config
    return diff(old, new, old.adapters or [], new.adapters or [])


def test_what_only_a_restart_applies_is_named_and_kept() -> None:
    before = "adapters: [{type: memory}]\ngrpc: {listen: '127.0.0.1:1'}\nbot: {name: oco}\ncallbacks: []\n"
    after = (
        "adapters: [{type: memory}]\ngrpc: {listen: '127.0.0.1:2'}\nbot: {name: other, unknown_command_reply: false}\n"
        "callbacks: []\nauth: {audit: {retention_days: 3}, admins: [memory/alice]}\n"
    )
    change = _diff(before, after)
    assert change.restart_only == ["grpc.listen", "bot.name", "auth.audit.retention_days"]
    assert change.summary() == "auth; bot"
    kept = effective(parse_config(before).config, parse_config(after).config)
    assert kept.grpc.listen == "127.0.0.1:1"
    assert kept.bot.name == "oco"
    assert kept.bot.unknown_command_reply is False
    assert kept.auth.admins == ["memory/alice"]
    assert kept.auth.audit.retention_days == 90


@pytest.mark.parametrize(
    ("change", "restarted"),
    [
        ("env: {A: '1'}", True),
        ("give_up_after: 1", False),
        ("cwd: /tmp", True),
        ("inherit_env: ['*']", True),
        ("capabilities: {join: false}", False),
        ("rate_limit: 5", False),
        ("routes: [{pattern: x}]", False),
        ("schedules: [{every: 60}]", False),
    ],
)
def test_a_launched_callback_restarts_only_when_how_it_starts_changed(change: str, restarted: bool) -> None:
    before = f"adapters: [{{type: memory}}]\ncallbacks: [{{id: a, command: {PING}}}]\n"
    after = before.removesuffix("}]\n") + f", {change}}}]\n"
    diffed = _diff(before, after)
    assert diffed.callbacks_changed == ["a"]
    assert diffed.callbacks_restarted == (["a"] if restarted else [])


def test_adapters_added_removed_and_changed_by_name() -> None:
    before = "adapters: [{type: memory}, {type: memory, name: b}, {type: memory, name: c}]\ncallbacks: []\n"
    after = "adapters: [{type: memory}, {type: memory, name: c, rooms: [x]}, {type: memory, name: d}]\ncallbacks: []\n"
    change = _diff(before, after)
    assert (change.adapters_added, change.adapters_removed, change.adapters_changed) == (["d"], ["b"], ["c"])
    assert change.summary() == "adapters +d -b ~c"


def test_the_pid_file_goes_beside_the_address_file_by_default(tmp_path: Path) -> None:
    assert pid_path(parse_config("callbacks: []").config) is None
    beside = parse_config(f"grpc: {{address_file: {tmp_path / 'oco.address'}}}").config
    assert pid_path(beside) == tmp_path / "oco.pid"
    named = parse_config(f"pid_file: {tmp_path / 'x.pid'}").config
    assert pid_path(named) == tmp_path / "x.pid"
    assert status_path(tmp_path / "x.pid") == tmp_path / "x.pid.reload"


async def test_a_callback_given_up_on_starts_again_once_a_reload_fixes_it(tmp_path: Path) -> None:
    broken = '[{id: example, command: [python, -c, "raise SystemExit(1)"], give_up_after: 1}]'
    async with run_oco(config(tmp_path, broken), tmp_path) as bot:
        chat = ControlChat(await bot.written("control.address"))
        await bot.expect(r"callback 'example' .*not restarting it", stream="stderr")
        out = await reload(bot, config(tmp_path, f"[{{id: example, command: {PING}, give_up_after: 1}}]"))
        assert out == "reloaded: callbacks ~example; restarted example\n"
        await bot.expect(r"callback 'example' is listening", stream="stderr")
        assert await chat.say("oco ping") == "PONG"


class Election(Solo):
    """An election the test decides (ha: without a second bot): standby until won."""

    def __init__(self) -> None:
        self.state = "standby"
        self._won = trio.Event()

    def acting(self) -> bool:
        return self._won.is_set()

    async def wait_active(self) -> None:
        await self._won.wait()

    def win(self) -> None:
        self.state = "active"
        self._won.set()


async def test_adapters_a_reload_changes_connect_when_the_bot_takes_over_midway(tmp_path: Path) -> None:
    # A callback slow to stop on SIGTERM keeps the reload in its callbacks step while the
    # standby becomes the active bot and connects the adapters it had then.
    ready = tmp_path / "ready"
    script = "import signal, time; signal.signal(15, lambda *a: (time.sleep(0.5), exit()))\n"
    script += f"open({str(ready)!r}, 'w'); time.sleep(60)"
    slow = json.dumps([sys.executable, "-c", script])
    base = f"store: {{url: 'sqlite:///{tmp_path / 'oco.db'}'}}\ngrpc: {{listen: '127.0.0.1:0'}}\n"
    base += "bot: {callback_startup_wait: 0}\n"
    before = f"{base}adapters: [{{type: memory}}]\ncallbacks: [{{id: slow, command: {slow}}}]\n"
    after = f"{base}adapters: [{{type: memory}}, {{type: memory, name: second}}]\ncallbacks: []\n"
    bot = Bot(parse_config(before, "<before>"), load_plugins())
    election = bot.leader = Election()
    async with trio.open_nursery() as nursery:
        await nursery.start(bot.run)
        assert bot.core.links == {}  # a standby
        with trio.fail_after(10):
            while not ready.exists():  # its SIGTERM handler is in place
                await trio.sleep(0.01)
        reloader = Reloader(bot, lambda: parse_config(after, "<after>"), load_plugins)
        outcomes: list[str] = []

        async def reload() -> None:
            outcomes.append((await reloader.reload()).message)

        nursery.start_soon(reload)
        with trio.fail_after(10):
            while "slow" in bot.launched:  # the reload is stopping it
                await trio.sleep(0.01)
        election.win()
        with trio.fail_after(10):
            while not outcomes:
                await trio.sleep(0.01)
        assert outcomes == ["callbacks -slow; adapters +second"]
        await trio.sleep(0.1)  # the adapters' tasks run
        assert sorted(bot.core.links) == ["memory", "second"]
        nursery.cancel_scope.cancel()


class Refusing(MemoryAdapter):
    def __init__(self, config: MemoryConfig) -> None:
        raise RuntimeError("the chat service refused the token")


async def test_a_reload_that_fails_part_way_says_what_it_applied_and_keeps_the_config(tmp_path: Path) -> None:
    installed = load_plugins()
    refusing = AdapterType("refusing", Refusing, MemoryConfig, description="a chat service refusing the bot")
    plugins = Plugins({**installed.adapters, "refusing": refusing}, installed.stores)
    text = f"store: {{url: 'sqlite:///{tmp_path / 'oco.db'}'}}\nadapters: [{{type: memory}}]\ncallbacks: []\n"
    changed = text.replace("[{type: memory}]", "[{type: memory}, {type: refusing}]") + "auth: {default_roles: [x]}\n"
    async with open_bot(text, plugins=plugins) as running:
        bot = running.bot
        old = bot.config
        outcome = await Reloader(bot, lambda: parse_config(changed, "<changed>"), lambda: plugins).reload()
        assert not outcome.ok
        assert outcome.message.startswith(
            "the reload failed while applying adapters (RuntimeError: the chat service refused the token) "
            "after applying auth; not applied: the other keys."
        )
        # The config it names as running is not the new one it applied only part of.
        assert bot.config is old
        assert bot.core.config is old
        assert bot.config.auth.default_roles == []


@pytest.mark.parametrize(
    ("argv", "oco"),
    [
        (["oco", "run"], True),
        (["/venv/bin/oco", "run", "--config", "x.yaml"], True),
        (["/usr/bin/python3.11", "/venv/bin/oco", "run"], True),
        (["python", "-m", "oco_core", "run"], True),
        (["coverage", "run", "-moco_core", "run"], True),
        (["geocoder", "--serve"], False),
        (["less", "oco"], False),
        ([], False),
    ],
)
def test_what_counts_as_an_oco_process(argv: list[str], oco: bool) -> None:
    assert _is_oco_command(argv) is oco


def test_a_stale_pid_file_naming_another_program_gets_no_signal(tmp_path: Path) -> None:
    # A real process whose command line merely contains "oco".
    with subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", "geocoder"], stdin=subprocess.PIPE
    ) as other:
        try:
            assert not _looks_like_oco(other.pid)
            assert _looks_like_oco(os.getpid()) is False  # pytest is no bot either
            (tmp_path / "bot.pid").write_text(f"{other.pid}\n")
            with pytest.raises(ReloadError, match="is not an oco bot; the pid file is stale"):
                send_reload(tmp_path / "bot.pid", timeout=1)
            assert other.poll() is None  # no SIGHUP, which would have ended it
        finally:
            other.kill()
