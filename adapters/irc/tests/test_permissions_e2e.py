"""Permissions end to end on IRC: a real ``oco run`` process with the IRC adapter on a
real ngircd, a Python SDK callback dialling in over gRPC with its secret, and two people
in ``#test``: ``Alice``, an admin by config, and ``Bob``, who holds nothing until Alice
grants him the role from the channel. Afterwards ``oco audit`` shows every decision.

The nicks are capitalised on purpose: the adapter's user ids are case-folded nicks, so
the config names the admin ``irc/alice`` and the audit log says ``irc/bob``."""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from oco_core import Callback, Message
from oco_core.testing import OcoProcess, oco_cli, run_oco

pytestmark = pytest.mark.server("ngircd")

SECRET = "secret-ops-irc-0123456789abcdef"
CHANNEL = "#test"
BOT = r":oco!\S+ PRIVMSG #test :"
DENIED = "you need the permission `deploy` for that; `oco who can deploy` says who has it"
HELP_END = re.escape("(also: roles, who can, link; say `oco help roles` and so on)")


def _rest(admin: str = "irc/alice") -> str:
    """The callback and the auth section, after the IRC bot's config."""
    return f"""\
callbacks:
  - id: ops
    secret: {SECRET}
auth:
  admins: ["{admin}"]
  roles: {{deployers: [deploy]}}
"""


def _deployer(address: str, seen: list[str]) -> Callback:
    """The callback: a `deploy` that needs the permission `deploy`, and an open `ping`.
    Every handler run is recorded in ``seen``."""
    cb = Callback(id="ops", secret=SECRET, address=address)

    @cb.respond(r"^deploy (\w+)$", help="deploy <app> - ship it", permission="deploy")
    async def deploy(message: Message) -> None:
        seen.append(f"deploy {message.match(1)} by {message.user.id}")
        await message.reply(f"deploying {message.match(1)}")

    @cb.respond(r"^ping$", help="ping - PONG")
    async def ping(message: Message) -> None:
        seen.append(f"ping by {message.user.id}")
        await message.reply("PONG")

    return cb


async def _ask(person: Any, text: str, answer: str) -> None:
    """Say ``oco: <text>`` in the channel and wait for the bot's line ``answer``."""
    since = person.mark()
    await person.say(CHANNEL, f"oco: {text}")
    await person.expect(BOT + answer + "$", since=since)


async def _help(person: Any) -> list[str]:
    """The lines of ``oco: help`` as the person reads them in the channel."""
    since = person.mark()
    await person.say(CHANNEL, "oco: help")
    await person.expect(BOT + HELP_END, since=since)
    return [m.group(1) for m in person.find(BOT + "(.*)$", since)]


async def _oco_audit(bot: OcoProcess, *options: str) -> str:
    config = str(bot.workdir / "oco.yaml")
    result = await trio.to_thread.run_sync(partial(oco_cli, "audit", "--config", config, *options, cwd=bot.workdir))
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_a_permission_is_refused_then_granted_from_irc_and_audited(kit: Any, tmp_path: Path) -> None:
    seen: list[str] = []
    async with (
        kit.person("Alice") as alice,
        kit.person("Bob") as bob,
        run_oco(kit.oco_config(tmp_path, _rest()), tmp_path / "bot") as bot,
    ):
        await alice.expect(r":oco!\S+ JOIN :?#test", timeout=30)
        async with trio.open_nursery() as nursery:
            # serve() returns from start() once the routes are registered with the bot.
            await nursery.start(_deployer(bot.address, seen).serve)

            # 1. Bob holds nothing: one reply naming the permission; the handler never runs.
            await _ask(bob, "deploy web", f"Bob: {DENIED}")
            # An open route still works for him (and, answered after the refusal, shows the
            # deploy was not on its way to the callback).
            await _ask(bob, "ping", "Bob: PONG")
            assert seen == ["ping by irc/bob"]
            assert len(bob.find(re.escape(DENIED))) == 1
            bob_help = await _help(bob)
            assert "ping - PONG" in bob_help
            assert not any("deploy" in line for line in bob_help), bob_help
            # Nor may he grant himself the role.
            await _ask(
                bob,
                "grant Bob deploy",
                "Bob: only admins may grant roles \\(admins are listed in auth.admins of the bot's config\\)",
            )

            # 2. Alice is an admin by config (as irc/alice: ids are case-folded nicks).
            await _ask(alice, "deploy web", "Alice: deploying web")
            assert seen[-1] == "deploy web by irc/alice"
            assert "deploy <app> - ship it" in await _help(alice)

            # 3. Alice grants Bob the role from the channel; his very next deploy is answered.
            await _ask(alice, "grant Bob deploy", "Alice: irc/bob now has the role deploy")
            await _ask(bob, "deploy api", "Bob: deploying api")
            assert seen[-1] == "deploy api by irc/bob"
            assert "deploy <app> - ship it" in await _help(bob)
            await _ask(bob, "roles", "Bob: irc/bob: roles: deploy")
            await _ask(
                bob,
                "who can deploy",
                "Bob: deploy: granted by role\\(s\\) admin, deploy, deployers; held by irc/alice; irc/bob",
            )
            assert seen == ["ping by irc/bob", "deploy web by irc/alice", "deploy api by irc/bob"]
            assert len(bob.find(re.escape(DENIED))) == 1
            nursery.cancel_scope.cancel()

        # 4. The bot stops in order; the audit log, read with `oco audit`, has each decision.
        assert await bot.stop() == 0
        await alice.expect(r":oco!\S+ QUIT :")

    records = [json.loads(line) for line in (await _oco_audit(bot, "--kind", "route", "--json")).splitlines()]
    assert [(r["user"], r["decision"], r["route"], r["permission"]) for r in records] == [
        ("irc/bob", "denied", "deploy", "deploy"),
        ("irc/bob", "allowed", "ping", ""),
        ("irc/alice", "allowed", "deploy", "deploy"),
        ("irc/bob", "allowed", "deploy", "deploy"),
    ]
    assert {(r["room"], r["callback"]) for r in records} == {("irc/#test", "ops")}
    assert records[0]["detail"] == "missing permission 'deploy': deploy web"

    admin = [json.loads(line) for line in (await _oco_audit(bot, "--kind", "admin", "--json")).splitlines()]
    assert [(r["user"], r["decision"], r["detail"]) for r in admin] == [
        ("irc/bob", "denied", "grant Bob deploy"),
        ("irc/alice", "allowed", "grant Bob deploy"),
    ]

    # The table an operator reads: Bob's one refusal.
    table = (await _oco_audit(bot, "--user", "irc/bob", "--decision", "denied", "--kind", "route")).splitlines()
    assert table[0].split() == ["TIME", "KIND", "DECISION", "USER", "ROOM", "CALLBACK/ROUTE", "PERMISSION", "DETAIL"]
    assert len(table) == 2, table
    assert table[1].split()[2:] == [
        "route",
        "denied",
        "irc/bob",
        "irc/#test",
        "ops/deploy",
        "deploy",
        "missing",
        "permission",
        "'deploy':",
        "deploy",
        "web",
    ]


async def test_names_as_typed_find_the_person_whatever_their_case(kit: Any, tmp_path: Path) -> None:
    """IRC compares nicks without case: an admin written `irc/Alice` in the config, a
    grant to `irc/Bob`, and one to `Carol`, who was in the channel before the bot and has
    not spoken, all reach the case-folded ids messages carry."""
    seen: list[str] = []
    async with kit.person("Carol") as carol:
        async with (
            kit.person("Alice") as alice,
            kit.person("Bob") as bob,
            run_oco(kit.oco_config(tmp_path, _rest(admin="irc/Alice")), tmp_path / "bot") as bot,
        ):
            await alice.expect(r":oco!\S+ JOIN :?#test", timeout=30)
            async with trio.open_nursery() as nursery:
                await nursery.start(_deployer(bot.address, seen).serve)
                await _ask(alice, "grant irc/Bob deploy", "Alice: irc/bob now has the role deploy")
                await _ask(alice, "grant Carol deploy", "Alice: irc/carol now has the role deploy")
                await _ask(bob, "deploy api", "Bob: deploying api")
                await _ask(carol, "deploy web", "Carol: deploying web")
                assert seen == ["deploy api by irc/bob", "deploy web by irc/carol"]
                nursery.cancel_scope.cancel()
