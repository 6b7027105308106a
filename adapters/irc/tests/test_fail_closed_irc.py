"""Capabilities and rules fail closed on IRC (issue 12), where channel names and nicks are
compared without case: rules written `irc/#Public` or `irc/#TE*` hold for the `#public`
and `#test` that messages carry, and a private message goes to the nick the send
capability was checked for, whatever mention name the callback wrote. A bot in this
process on a real ngircd, an SDK callback and plain gRPC stubs, raw IRC people."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from oco_adapter_irc import IrcAdapter, IrcConfig

from oco_core import Callback, Message
from oco_core._policy import fold_patterns
from oco_core._proto import core_pb2, robot_pb2, robot_pb2_grpc
from oco_core.testing import open_bot

pytestmark = pytest.mark.server("ngircd")

SECRET = "secret-ops-irc-0123456789abcdef"
BOT = r":oco!\S+ PRIVMSG "
NOT_HERE = "that command is not available here"

RULES = f"""\
callbacks:
  - id: ops
    secret: {SECRET}
    capabilities: {{send: ["irc/#Test", "irc/Bob"]}}
    route_rules:
      ping: {{deny_rooms: ["irc/#Public"]}}
      status: {{allow_rooms: ["irc/#TE*"]}}
"""


def _callback(address: str) -> Callback:
    cb = Callback(id="ops", secret=SECRET, address=address)

    @cb.respond(r"^ping$", id="ping")
    async def ping(message: Message) -> None:
        await message.reply("PONG")

    @cb.respond(r"^status$", id="status")
    async def status(message: Message) -> None:
        await message.reply("all good")

    return cb


def _send(address: str, message: core_pb2.Message) -> tuple[grpc.StatusCode, str]:
    request = robot_pb2.SendMessagesRequest(messages=[message])
    with grpc.insecure_channel(address) as channel:
        try:
            robot_pb2_grpc.RobotStub(channel).SendMessages(
                request, metadata=(("authorization", f"Bearer {SECRET}"),), timeout=10
            )
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _message(body: str, room: str = "", user: str = "", mention_name: str = "", private: bool = False) -> Any:
    return core_pb2.Message(
        body=body,
        source=core_pb2.Source(
            room=core_pb2.Room(id=room) if room else None,
            user=core_pb2.User(id=user, mention_name=mention_name) if user else None,
        ),
        private=private,
    )


async def _ask(person: Any, channel: str, text: str, answer: str) -> None:
    since = person.mark()
    await person.say(channel, f"oco: {text}")
    # The bot writes to the folded id (#public); which spelling the server relays is its own.
    where = f"(?i:{re.escape(channel)})"
    await person.expect(BOT + where + re.escape(f" :{person.nick}: {answer}") + "$", since=since)


async def test_rules_and_capabilities_hold_whatever_the_case_of_a_channel(kit: Any, tmp_path: Path) -> None:
    config = kit.oco_config(tmp_path, RULES).replace('channels: ["#test"]', 'channels: ["#test", "#Public"]')
    async with (
        kit.person("Alice", channels=("#test", "#Public")) as alice,
        open_bot(config) as running,
    ):
        await alice.expect(r":oco!\S+ JOIN :?#Public", timeout=30)
        async with trio.open_nursery() as nursery:
            await nursery.start(_callback(running.address).serve)
            # capabilities.send "irc/#Test" covers #test, where replies go as irc/#test.
            await _ask(alice, "#test", "ping", "PONG")
            # deny_rooms "irc/#Public" holds in #Public (irc/#public to the bot).
            await _ask(alice, "#Public", "ping", NOT_HERE)
            # allow_rooms "irc/#TE*": the literal part is folded, the wildcard kept.
            await _ask(alice, "#test", "status", "all good")
            await _ask(alice, "#Public", "status", NOT_HERE)
            nursery.cancel_scope.cancel()


async def test_a_private_message_goes_where_the_capability_was_checked(kit: Any, tmp_path: Path) -> None:
    """Allowed to send to #test and to Bob: a private message to Bob with the mention
    name "#secret" reaches Bob, not #secret; one to Alice naming #test is refused."""
    # Written as messages carry them, so that only where the message goes is in question.
    rules = RULES.replace('"irc/#Test", "irc/Bob"', '"irc/#test", "irc/bob"')
    config = kit.oco_config(tmp_path, rules).replace('channels: ["#test"]', 'channels: ["#test", "#secret"]')
    async with (
        kit.person("Alice", channels=("#test", "#secret")) as alice,
        kit.person("Bob") as bob,
        open_bot(config) as running,
    ):
        await alice.expect(r":oco!\S+ JOIN :?#secret", timeout=30)

        async def send(message: core_pb2.Message) -> tuple[grpc.StatusCode, str]:
            return await trio.to_thread.run_sync(lambda: _send(running.address, message))

        code, details = await send(_message("psst", room="irc/#test", user="irc/alice", private=True))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "goes to 'irc/alice'" in details
        assert await send(_message("for bob", user="irc/bob", mention_name="#secret", private=True)) == (
            grpc.StatusCode.OK,
            "",
        )
        await bob.expect(BOT + r"(?i:bob) :for bob$")
        # Then a line to #test (as the callback spelled it: checked as irc/#test), so
        # everything sent before it has reached the server.
        assert await send(_message("done", room="irc/#TEST")) == (grpc.StatusCode.OK, "")
        await alice.expect(BOT + r"(?i:#test) :done$")
        assert not alice.find(r"psst|for bob"), alice.lines[-10:]


def test_room_patterns_fold_as_the_server_folds_channel_names() -> None:
    """Before ISUPPORT arrives the adapter folds as RFC 1459 says (``[`` is ``{``);
    wildcards and sets keep their meaning, other adapters' patterns are left alone."""
    adapter = IrcAdapter(IrcConfig(host="127.0.0.1", tls=False, nick="oco"))
    folds = {"irc": adapter.room_id}
    patterns = ["irc/#Ops[1]", "irc/#A[B-C]?*", "*/#Dev", "private", "matrix/#Ops:x.org", "irc/#x[Y"]
    assert fold_patterns(patterns, folds) == [
        "irc/#ops[1]",
        "irc/#a[b-c]?*",
        "irc/#dev",
        "private",
        "matrix/#Ops:x.org",
        "irc/#x{y",
    ]
