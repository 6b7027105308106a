"""End to end: a real ``oco run`` process with the IRC adapter on a real ngircd, the
bundled example callback launched by the bot, and a person saying ``oco: ping``; and
the same bot run in the test's own process with ``open_bot``."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from oco_adapter_irc import IrcAdapter

from oco_core._adapter import MembershipKind
from oco_core.testing import oco_cli, open_bot, run_oco

pytestmark = pytest.mark.server("ngircd")

EXAMPLE_CALLBACK = f"""\
callbacks:
  - id: example
    command: ["{sys.executable}", "-m", "oco_core.examples.ping"]
"""


async def _ask_until_answered(person: Any, target: str, question: str, answer: str, timeout: float = 60) -> None:
    # The callback process connects some time after the bot joined: ask again until it
    # is there to answer.
    with trio.move_on_after(timeout):
        while True:
            since = person.mark()
            await person.say(target, question)
            with trio.move_on_after(3):
                await person.expect(answer, since=since, timeout=3)
                return
    raise AssertionError(f"no {answer!r} for {question!r}; the person saw {person.lines[-20:]!r}")


async def test_oco_ping_in_a_channel_gets_pong(kit: Any, tmp_path: Path) -> None:
    async with (
        kit.person("alice") as alice,
        run_oco(kit.oco_config(tmp_path, EXAMPLE_CALLBACK), tmp_path / "bot") as bot,
    ):
        await alice.expect(r":oco!\S+ JOIN :?#test", timeout=30)
        await _ask_until_answered(alice, "#test", "oco: ping", r":oco!\S+ PRIVMSG #test :(alice: )?PONG$")
        # The other ways of addressing the bot, and a private message.
        await _ask_until_answered(alice, "#test", "oco, ping", r"PRIVMSG #test :(alice: )?PONG$")
        await _ask_until_answered(alice, "#test", "oco ping", r"PRIVMSG #test :(alice: )?PONG$")
        await _ask_until_answered(alice, "oco", "ping", r":oco!\S+ PRIVMSG alice :PONG$")
        await _ask_until_answered(alice, "#test", "oco: echo héllo wörld", r"PRIVMSG #test :(alice: )?héllo wörld$")
        # The built-in help: several lines, each its own IRC line.
        before_help = alice.mark()
        await _ask_until_answered(alice, "#test", "oco: help", r"PRIVMSG #test :.*ping - replies PONG")
        await alice.expect(r"PRIVMSG #test :.*echo <text>", since=before_help)
        assert bot.process.returncode is None
        # SIGTERM: an orderly shutdown, and the bot says goodbye on IRC.
        assert await bot.stop() == 0
        await alice.expect(r":oco!\S+ QUIT :")


async def test_check_config_names_the_bad_irc_keys(tmp_path: Path) -> None:
    config = tmp_path / "oco.yaml"
    config.write_text(
        "adapters:\n"
        "  - type: irc\n"
        "    host: 127.0.0.1\n"
        "    nick: 1oco\n"
        '    channels: ["#ok", "nochan"]\n'
        "    pasword: hunter2-secret\n"
        "callbacks: []\n"
    )
    result = await trio.to_thread.run_sync(partial(oco_cli, "check-config", "--config", str(config), cwd=tmp_path))
    errors = result.stderr
    assert "hunter2" not in errors
    assert result.returncode != 0
    assert "line 4: adapters[0].nick: '1oco' is not a valid IRC nick" in errors
    assert "line 5: adapters[0].channels[1].name: 'nochan' is not a channel name" in errors
    assert "line 6: adapters[0].pasword: unknown key" in errors

    fixed = config.read_text().replace("1oco", "oco").replace(', "nochan"', "")
    config.write_text(fixed.replace("pasword", "password"))
    result = await trio.to_thread.run_sync(partial(oco_cli, "check-config", "--config", str(config), cwd=tmp_path))
    assert result.returncode == 0, result.stderr
    assert "irc (irc)" in result.stdout
    assert "hunter2" not in result.stdout + result.stderr


async def test_open_bot_runs_a_real_bot_on_ngircd_in_process(kit: Any, tmp_path: Path) -> None:
    async with kit.person("alice") as alice, open_bot(kit.oco_config(tmp_path, "callbacks: []")) as running:
        adapter = running.adapters["irc"]
        assert isinstance(adapter, IrcAdapter)
        with pytest.raises(LookupError, match=r"no memory adapter \(its adapters: irc \(IrcAdapter\)\)"):
            assert running.adapter is None
        await alice.expect(r":oco!\S+ JOIN :?#test", timeout=30)
        await alice.say("#test", "oco: help")
        await alice.expect(r":oco!\S+ PRIVMSG #test :no callbacks with commands are connected$")
        assert running.bot.statistics().received == 1
        assert adapter.statistics().registrations == 1


async def test_the_people_already_in_a_channel_reach_the_directory_as_members_not_joins(
    kit: Any, tmp_path: Path
) -> None:
    async with (
        kit.person("bob") as bob,
        open_bot(kit.oco_config(tmp_path, "callbacks: []")) as running,
    ):
        await bob.expect(r":oco!\S+ JOIN :?#test", timeout=30)
        directory = running.bot.core.directory
        with trio.fail_after(15):
            while "irc/#test" not in directory.rooms or "irc/bob" not in directory.room("irc/#test").members:
                await trio.sleep(0.05)
        assert set(directory.room("irc/#test").members) == {"irc/bob", "irc/oco"}


async def test_names_is_handed_over_as_a_member_list_without_joins(kit: Any) -> None:
    async with kit.person("bob") as bob:
        adapter = IrcAdapter(kit.config())
        async with kit.running(adapter, kit.host):
            await bob.expect(r":oco!\S+ JOIN :?#test", timeout=30)
            with trio.fail_after(15):
                while not kit.host.member_lists:
                    await trio.sleep(0.02)
            room, members = kit.host.member_lists[0]
            assert room.id == "#test"
            assert {u.id for u in members} == {"bob", "oco"}
            # bob was there before the bot: no join is reported for him.
            assert not [e for e in kit.host.memberships if e.kind is MembershipKind.JOINED and e.user.id == "bob"]
