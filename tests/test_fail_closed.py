"""Capabilities and rules fail closed (issue 12): a send is checked against where the
adapter really delivers it, route_rules that name no route are said so in the log, and
a bare name in `grant` never picks an account by its display name. A bot in this
process with the memory adapter; callbacks over real gRPC (generated stubs and the SDK).
Room-name folding, which needs a server that folds, is in the IRC adapter's tests."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
import trio

from oco_core import Callback, Message
from oco_core._adapter import ChatRoom, ChatUser, IncomingMessage
from oco_core._config import CallbackSettings
from oco_core._policy import CallbackPolicy
from oco_core._proto import core_pb2, robot_pb2, robot_pb2_grpc
from oco_core._router import Route
from oco_core.testing import MemoryAdapter, RunningBot, open_bot, serving

SECRET = "secret-ops-0123456789abcdef"


def config(tmp_path: Path, callback: str = "", users: str = "[alice, bob, victim]") -> str:
    return f"""
adapters: [{{type: memory, users: {users}, rooms: [general, secret]}}]
store: {{url: "sqlite:///{tmp_path}/oco.db"}}
callbacks:
  - id: ops
    secret: {SECRET}
{callback}
auth:
  admins: [memory/alice]
  roles: {{deployers: [deploy]}}
"""


def _send(address: str, *messages: core_pb2.Message, with_mention: bool = False) -> tuple[grpc.StatusCode, str]:
    """One SendMessages call with plain generated stubs: its status and details."""
    request = robot_pb2.SendMessagesRequest(messages=list(messages), WithMention=with_mention)
    with grpc.insecure_channel(address) as channel:
        try:
            robot_pb2_grpc.RobotStub(channel).SendMessages(
                request, metadata=(("authorization", f"Bearer {SECRET}"),), timeout=10
            )
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def message(
    body: str, room: str = "", user: str = "", *, private: bool = False, mention_name: str = ""
) -> core_pb2.Message:
    return core_pb2.Message(
        body=body,
        source=core_pb2.Source(
            room=core_pb2.Room(id=room) if room else None,
            user=core_pb2.User(id=user, mention_name=mention_name) if user else None,
        ),
        private=private,
    )


def sent_to(adapter: MemoryAdapter) -> list[tuple[str, str]]:
    """What went out, as (where it was delivered, body): the user for a private message."""
    out = []
    for m in adapter.sent:
        if m.private or m.room_id is None:
            assert m.user is not None
            out.append((f"user {m.user.id}", m.body))
        else:
            out.append((f"room {m.room_id}", m.body))
    return out


async def test_a_send_is_checked_against_where_it_is_delivered(tmp_path: Path) -> None:
    """A callback that may send to memory/general only: naming that room while asking
    for a private message to someone else reaches nobody; a mention in the room is fine."""
    narrow = '    capabilities: {send: ["memory/general"]}'
    async with open_bot(config(tmp_path, narrow)) as running:

        async def send(*messages: core_pb2.Message, with_mention: bool = False) -> tuple[grpc.StatusCode, str]:
            return await trio.to_thread.run_sync(lambda: _send(running.address, *messages, with_mention=with_mention))

        # The room it may send to, with victim mentioned in it: delivered in the room.
        assert await send(message("in the room", "memory/general", "memory/victim"), with_mention=True) == (
            grpc.StatusCode.OK,
            "",
        )
        # The same room named, but private: it would go to victim alone.
        code, details = await send(message("psst", "memory/general", "memory/victim", private=True))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "message 0 goes to 'memory/victim'" in details
        assert "capabilities.send" in details
        # A whole request is refused when one message would go astray: nothing leaves.
        code, _ = await send(
            message("first", "memory/general"), message("second", "memory/general", "memory/victim", private=True)
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
        # Private with nobody to go to is a mistake, not a message to the room.
        code, details = await send(message("to whom?", "memory/general", private=True))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "private but has no source.user.id" in details

        assert sent_to(running.adapter) == [("room general", "in the room")]


async def test_a_private_message_goes_to_the_user_checked_whatever_its_mention_name(tmp_path: Path) -> None:
    """Adapters may address a private message by the user's mention name (IRC sends to
    the nick): a callback allowed to write to bob cannot steer one elsewhere with it."""
    narrow = '    capabilities: {send: ["memory/bob"]}'
    async with open_bot(config(tmp_path, narrow)) as running:
        status = await trio.to_thread.run_sync(
            lambda: _send(running.address, message("for bob", user="memory/bob", private=True, mention_name="secret"))
        )
        assert status == (grpc.StatusCode.OK, "")
        [out] = running.adapter.sent
        assert out.private
        assert out.user is not None
        assert (out.user.id, out.user.mention_name) == ("bob", "bob")


def _deployer(running: RunningBot) -> Callback:
    cb = Callback(id="ops", secret=SECRET, address=running.address)

    @cb.respond(r"^deploy (\w+)$", id="deploy_app", help="deploy <app> - ship it")
    async def deploy(message: Message) -> None:
        await message.reply(f"deploying {message.match(1)}")

    return cb


async def _say(running: RunningBot, body: str, user: str = "alice") -> str:
    await running.adapter.inject(body, user=user)
    with trio.fail_after(10):
        return (await running.adapter.next_sent()).body


RULES = """\
    routes: [{pattern: "^status$", respond: true}]
    route_rules:
      deploy: {permission: deploy}
      "^status$": {permission: ops}
"""


async def test_route_rules_naming_no_route_in_the_config_are_warned_about_at_start_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rule for `deploy` does not cover a route `deploy_app` (nor `^status$`): one
    WARNING at start-up, naming the routes the config has; the rule is not applied."""
    caplog.set_level(logging.WARNING, logger="oco_core")
    async with open_bot(config(tmp_path, RULES)) as running:
        started = [r.getMessage() for r in caplog.records if "route_rules" in r.getMessage()]
        assert len(started) == 1, started
        assert (
            "callbacks[0] (ops): route_rules.deploy names none of the routes in its config ('^status$')" in (started[0])
        )
        # bob, who holds nothing, deploys: the rule protects nothing, as the log said.
        async with serving(_deployer(running)):
            assert await _say(running, "oco deploy web", user="bob") == "deploying web"


async def test_route_rules_naming_no_route_a_callback_declares_are_warned_about_as_it_connects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Routes come mostly from the callback as it connects: then, once per rule (not
    again when it reconnects), a WARNING naming the routes it declared."""
    caplog.set_level(logging.WARNING, logger="oco_core")
    async with open_bot(config(tmp_path, RULES)) as running:
        for _ in range(2):
            async with serving(_deployer(running)):
                pass
    connected = [r.getMessage() for r in caplog.records if "as it connected" in r.getMessage()]
    assert len(connected) == 1, connected
    assert "callbacks[0] (ops): route_rules.deploy names no route the callback declared" in connected[0]
    assert "its routes: 'deploy_app', '^status$'" in connected[0]


async def test_a_route_rule_may_be_a_pattern(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`deploy*` covers `deploy_app` (and a route with no id, known by its pattern)."""
    rules = '    route_rules: {"deploy*": {permission: deploy}}'
    caplog.set_level(logging.WARNING, logger="oco_core")
    async with open_bot(config(tmp_path, rules)) as running:
        async with serving(_deployer(running)):
            await running.adapter.inject("oco deploy web", user="bob")
            with trio.fail_after(10):
                answer = (await running.adapter.next_sent()).body
            assert answer.startswith("you need the permission `deploy`")
            await running.adapter.inject("oco deploy web", user="alice")
            with trio.fail_after(10):
                assert (await running.adapter.next_sent()).body == "deploying web"
    assert not [r for r in caplog.records if "route_rules" in r.getMessage()]


async def test_a_bare_name_never_picks_an_account_by_its_display_name(tmp_path: Path) -> None:
    """mallory calls herself "BOB"; the real bob has not spoken yet. `grant bob` must not
    give mallory the role: it is refused with the accounts listed, and a full id, or bob
    once seen, is exact."""
    async with open_bot(config(tmp_path, users="[alice, bob, mallory]")) as running:
        host = running.adapter.host
        assert host is not None
        mallory = ChatUser("mallory", name="BOB", mention_name="mallory")
        await host.receive(IncomingMessage(body="hello all", user=mallory, room=ChatRoom("general")))

        refused = await _say(running, "oco grant bob deployers")
        assert refused == (
            "'bob' is not a user I have seen, but the display name of memory/mallory (BOB): "
            "say which by the full id (memory/bob for a user not seen yet)"
        )
        assert await _say(running, "oco roles memory/mallory") == "memory/mallory: roles: none"
        assert await _say(running, "oco grant memory/bob deployers") == "memory/bob now has the role deployers"

        # bob speaks: his id is now known, and wins over anyone's display name.
        assert await _say(running, "oco roles", user="bob") == "memory/bob: roles: deployers"
        assert await _say(running, "oco revoke bob deployers") == "memory/bob no longer has the role deployers"
        # A name that is nobody's id but two display names (bob's "Bob", mallory's "BOB").
        assert await _say(running, "oco roles BOB") == (
            "'BOB' is not a user I have seen, but the display name of memory/bob (Bob), memory/mallory (BOB): "
            "say which by the full id (memory/BOB for a user not seen yet)"
        )
        assert await _say(running, "oco roles memory/mallory") == "memory/mallory: roles: none"


def test_a_rule_key_that_is_a_declared_route_id_is_never_a_pattern() -> None:
    """A route without an id is known by its regex, which may look like a shell pattern
    (`help.*`): the rule written for it must not also lift another route's permission."""
    settings = CallbackSettings.model_validate(
        {"id": "cb", "secret": "s" * 16, "route_rules": {"help.*": {"permission": ""}}}
    )
    policy = CallbackPolicy("cb", settings)
    routes = [
        Route("help.*", "help.*", respond=True, permission="help"),
        Route("help.admin", "^help admin$", respond=True, permission="admin"),
    ]
    policy.check_rules(routes)  # as the callback connects, before its routes go live
    assert policy.access(routes[0]).permission == ""
    assert policy.access(routes[1]).permission == "admin"
