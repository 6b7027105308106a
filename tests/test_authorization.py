"""Permissions for people, callback capabilities, rate limits and the audit log, end to
end: a bot in this process with the memory adapter, callbacks over real gRPC (the SDK
and plain generated stubs), and the audit log read back from the store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import pytest
import trio

from oco_core import Callback, CapabilityError, Message, RateLimitedError
from oco_core._audit import AuditQuery, AuditRecord, query
from oco_core._proto import core_pb2, robot_pb2, robot_pb2_grpc, storage_pb2, storage_pb2_grpc
from oco_core.testing import MemoryAdapter, RunningBot, open_bot, serving

SECRET = "secret-ops-0123456789abcdef"
OTHER = "secret-other-0123456789abcd"

T = TypeVar("T")


def config(tmp_path: Path, auth: str = "", callback: str = "", adapters: str = "[{type: memory}]") -> str:
    return f"""
adapters: {adapters}
store: {{url: "sqlite:///{tmp_path}/oco.db"}}
callbacks:
  - id: ops
    secret: {SECRET}
{callback}
  - {{id: other, secret: {OTHER}}}
auth:
  admins: [memory/alice]
{auth}
"""


class Deployer:
    """A callback with a permission-protected `deploy` and an open `ping`; it records
    every message its handlers see."""

    def __init__(self, running: RunningBot, permission: str = "deploy") -> None:
        self.seen: list[str] = []
        self.cb = Callback(id="ops", secret=SECRET, address=running.address)

        @self.cb.respond(r"^deploy (\w+)$", help="deploy <app> - ship it", permission=permission)
        async def deploy(message: Message) -> None:
            self.seen.append(f"deploy {message.match(1)} by {message.user.id}")
            await message.reply(f"deploying {message.match(1)}")

        @self.cb.respond(r"^ping$", help="ping - PONG")
        async def ping(message: Message) -> None:
            self.seen.append(f"ping by {message.user.id}")
            await message.reply("PONG")


async def say(running: RunningBot, body: str, user: str = "alice", room: str | None = "general") -> str:
    """Inject a message and return the bot's (or the callback's) answer."""
    return await say_on(running.adapter, body, user, room)


async def say_on(adapter: MemoryAdapter, body: str, user: str = "alice", room: str | None = "general") -> str:
    await adapter.inject(body, user=user, room=room)
    with trio.fail_after(10):
        return (await adapter.next_sent()).body


async def silence(adapter: MemoryAdapter, seconds: float = 0.5) -> None:
    """Assert that the bot says nothing for a while."""
    with trio.move_on_after(seconds):
        sent = await adapter.next_sent()
        raise AssertionError(f"expected no answer, got {sent.body!r}")


async def audit(running: RunningBot, **filters: Any) -> list[AuditRecord]:
    core = running.bot.core
    await core.audit.flush()
    return await query(core.store, AuditQuery(**filters), limit=1000)


async def test_a_route_permission_is_checked_before_delivery_and_roles_change_at_runtime(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        deployer = Deployer(running)
        async with serving(deployer.cb):
            # bob holds nothing: one reply naming the permission; the callback never sees it.
            answer = await say(running, "oco deploy web", user="bob")
            assert answer == "you need the permission `deploy` for that; `oco who can deploy` says who has it"
            assert deployer.seen == []
            # alice is an admin by config.
            assert await say(running, "oco deploy web") == "deploying web"
            assert deployer.seen == ["deploy web by memory/alice"]
            # Routes without a permission are open to everyone.
            assert await say(running, "oco ping", user="bob") == "PONG"

            # bob may not grant himself anything.
            assert await say(running, "oco grant bob deploy", user="bob") == (
                "only admins may grant roles (admins are listed in auth.admins of the bot's config)"
            )
            # The admin grants; the very next message is allowed.
            assert await say(running, "oco grant bob deploy") == "memory/bob now has the role deploy"
            assert await say(running, "oco deploy api", user="bob") == "deploying api"
            assert deployer.seen[-1] == "deploy api by memory/bob"
            assert await say(running, "oco roles", user="bob") == "memory/bob: roles: deploy"
            assert await say(running, "oco who can deploy") == (
                "deploy: granted by role(s) admin, deploy; held by memory/alice; memory/bob"
            )
            # Revoked: refused again.
            assert await say(running, "oco revoke bob deploy") == "memory/bob no longer has the role deploy"
            assert (await say(running, "oco deploy api", user="bob")).startswith("you need the permission `deploy`")
            assert len(deployer.seen) == 3  # alice's deploy, bob's ping and his one allowed deploy

        denied = await audit(running, kind="route", decision="denied")
        assert [(r.user, r.callback, r.route, r.permission) for r in denied] == [
            ("memory/bob", "ops", "deploy", "deploy"),
            ("memory/bob", "ops", "deploy", "deploy"),
        ]
        assert "missing permission 'deploy'" in denied[0].detail
        allowed = await audit(running, kind="route", decision="allowed")
        assert [(r.user, r.route) for r in allowed] == [
            ("memory/alice", "deploy"),
            ("memory/bob", "ping"),
            ("memory/bob", "deploy"),
        ]
        admin = await audit(running, kind="admin")
        assert [(r.user, r.decision, r.detail) for r in admin] == [
            ("memory/bob", "denied", "grant bob deploy"),
            ("memory/alice", "allowed", "grant bob deploy"),
            ("memory/alice", "allowed", "revoke bob deploy"),
        ]


async def test_roles_granted_from_chat_survive_a_restart(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        assert await say(running, "oco grant bob deployers") == "memory/bob now has the role deployers"
    async with open_bot(config(tmp_path, "  roles: {deployers: [deploy]}")) as running:
        deployer = Deployer(running)
        async with serving(deployer.cb):
            assert await say(running, "oco deploy web", user="bob") == "deploying web"


async def test_help_lists_only_what_the_asker_may_run(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        async with serving(Deployer(running).cb):
            bob_help = (await say(running, "oco help", user="bob")).splitlines()
            assert bob_help[0] == "ping - PONG"
            assert not any("deploy" in line for line in bob_help)
            alice_help = (await say(running, "oco help")).splitlines()
            assert alice_help[:2] == ["deploy <app> - ship it", "ping - PONG"]
            await say(running, "oco grant bob deploy")
            assert (await say(running, "oco help deploy", user="bob")) == "deploy <app> - ship it"
            # The bot's own commands are found by topic.
            assert (
                await say(running, "oco help revoke", user="bob")
            ) == "revoke <user> <role> - (admins) take a role from <user>"


async def test_the_operator_rules_win_over_what_the_callback_declared(tmp_path: Path) -> None:
    rules = """
    route_rules:
      deploy: {permission: ""}
      ping: {permission: ops, allow_rooms: ["memory/general", private], deny_rooms: ["memory/lobby"]}
"""
    async with open_bot(config(tmp_path, callback=rules)) as running:
        running.adapter.rooms |= {"ops", "lobby"}
        deployer = Deployer(running)
        async with serving(deployer.cb):
            # The operator lifted deploy's permission.
            assert await say(running, "oco deploy web", user="bob") == "deploying web"
            # ... and gave ping one, allowed only in general and in private.
            assert (await say(running, "oco ping", user="bob")).startswith("you need the permission `ops`")
            await say(running, "oco grant bob ops")
            assert await say(running, "oco ping", user="bob") == "PONG"
            assert await say(running, "oco ping", user="bob", room=None) == "PONG"
            assert await say(running, "oco ping", user="bob", room="ops") == "that command is not available here"
            assert await say(running, "oco ping", user="bob", room="lobby") == "that command is not available here"
            assert deployer.seen == ["deploy web by memory/bob", "ping by memory/bob", "ping by memory/bob"]
            # help, asked in ops, does not list ping.
            assert "ping - PONG" not in await say(running, "oco help", user="bob", room="ops")
        room_denials = await audit(running, kind="route", decision="denied", text="not allowed in")
        assert [r.room for r in room_denials] == ["memory/ops", "memory/lobby"]


async def test_a_rule_set_at_runtime_starts_from_the_rule_in_force_and_stored_patterns_win(tmp_path: Path) -> None:
    rules = """
    route_rules:
      "deploy*": {permission: deployer, allow_rooms: ["memory/ops"]}
      "*": {permission: ""}
"""
    async with open_bot(config(tmp_path, callback=rules)) as running:
        running.adapter.rooms |= {"ops", "random"}
        async with serving(Deployer(running).cb):
            # Keyed by the route's id, it starts from the config's deploy* rule: the
            # permission and the room limit stay; only the denied rooms are new.
            assert await say(running, "oco rule set ops deploy deny=random") == (
                "ops deploy: permission deployer; rooms memory/ops; not in memory/random (kept in the store)"
            )
            assert (await say(running, "oco deploy web", user="bob", room="ops")).startswith(
                "you need the permission `deployer`"
            )
            assert await say(running, "oco deploy web", room="general") == "that command is not available here"
            assert await say(running, "oco ping", user="bob") == "PONG"  # the config's "*"
            # A stored pattern is tried before the config's patterns, as the list says.
            assert (await say(running, "oco rule set ops p* deny=general")).startswith("ops p*: permission (none);")
            assert await say(running, "oco ping", user="bob") == "that command is not available here"
            listed = [line.split(":")[0] for line in (await say(running, "oco rule list")).splitlines()]
            assert listed == ["ops deploy", "ops p*", "ops deploy*", "ops *"]


async def test_a_rule_pattern_stops_applying_once_a_stream_declares_it_as_a_route_id(tmp_path: Path) -> None:
    """The gate keeps each route's access from one message to the next (issue 17): a
    replica that declares a route whose id is the rule's key turns the key from a
    pattern into that route's id, and the very next message obeys the change; so does
    the next one after a rule set from chat."""
    rules = """
    route_rules:
      "deploy*": {permission: ""}
"""
    async with open_bot(config(tmp_path, callback=rules)) as running:
        deployer = Deployer(running)
        async with serving(deployer.cb):
            # deploy* lifts the declared permission of deploy, for every message.
            assert await say(running, "oco deploy web", user="bob") == "deploying web"
            assert await say(running, "oco deploy db", user="bob") == "deploying db"
            replica = Callback(id="ops", secret=SECRET, address=running.address)

            @replica.respond(r"^ship everything$", id="deploy*", permission="boss")
            async def everything(message: Message) -> None:
                await message.reply("everything")

            async with serving(replica):
                assert (await say(running, "oco deploy web", user="bob")).startswith("you need the permission `deploy`")
                # The rule is now for deploy* alone: the one route of that id.
                assert await say(running, "oco ship everything", user="bob") == "everything"
                # A stored rule for deploy, set from chat, applies to the next message.
                assert (await say(running, "oco rule set ops deploy no-permission")).startswith("ops deploy:")
                assert await say(running, "oco deploy api", user="bob") == "deploying api"
        assert deployer.seen == ["deploy web by memory/bob", "deploy db by memory/bob", "deploy api by memory/bob"]


async def test_hear_routes_without_permission_are_refused_silently_but_recorded(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        cb = Callback(id="ops", secret=SECRET, address=running.address)
        heard: list[str] = []

        @cb.hear(r"\bincident\b", permission="oncall")
        async def incident(message: Message) -> None:
            heard.append(message.user.id)
            await message.send("paging")

        async with serving(cb):
            await running.adapter.inject("there is an incident", user="bob")
            await silence(running.adapter)
            assert await say(running, "another incident") == "paging"
            assert heard == ["memory/alice"]
        denied = await audit(running, kind="route", decision="denied")
        assert [(r.user, r.route, r.permission) for r in denied] == [("memory/bob", "incident", "oncall")]


async def test_check_permission_answers_callbacks_and_is_audited(tmp_path: Path) -> None:
    roles = "  roles: {deployers: [deploy, deploy.staging.*]}\n  default_roles: [viewer]"
    async with open_bot(config(tmp_path, roles)) as running:
        cb = Callback(id="ops", secret=SECRET, address=running.address)
        async with serving(cb):
            await say(running, "oco grant bob deployers")
            staging = await cb.check_permission("memory/bob", "deploy.staging.eu", room_id="memory/general")
            assert (staging.allowed, staging.reason, staging.roles) == (True, "role deployers", ("deployers", "viewer"))
            prod = await cb.check_permission("memory/bob", "deploy.prod")
            assert (prod.allowed, prod.reason) == (False, "missing permission 'deploy.prod'")
            assert (await cb.check_permission("memory/carol", "viewer")).allowed  # a default role
            admin = await cb.check_permission("memory/alice", "anything.at.all")
            assert (admin.allowed, admin.reason) == (True, "admin (auth.admins)")
        records = await audit(running, kind="check_permission")
        assert [(r.user, r.permission, r.decision, r.callback) for r in records] == [
            ("memory/bob", "deploy.staging.eu", "allowed", "ops"),
            ("memory/bob", "deploy.prod", "denied", "ops"),
            ("memory/carol", "viewer", "allowed", "ops"),
            ("memory/alice", "anything.at.all", "allowed", "ops"),
        ]


async def test_linked_accounts_share_roles_once_both_sides_confirm(tmp_path: Path) -> None:
    adapters = "[{type: memory, name: irc}, {type: memory, name: matrix}]"
    async with open_bot(config(tmp_path, adapters=adapters).replace("memory/alice", "irc/alice")) as running:
        irc = cast(MemoryAdapter, running.adapters["irc"])
        matrix = cast(MemoryAdapter, running.adapters["matrix"])
        cb = Callback(id="ops", secret=SECRET, address=running.address)
        async with serving(cb):
            assert await say_on(irc, "oco grant bob deploy") == "irc/bob now has the role deploy"
            assert not (await cb.check_permission("matrix/robert", "deploy")).allowed
            # One side alone links nothing.
            assert await say_on(irc, "oco link matrix/robert", user="bob") == (
                "to confirm, say `oco link irc/bob` as matrix/robert within 10 minutes"
            )
            assert not (await cb.check_permission("matrix/robert", "deploy")).allowed
            # Someone else cannot confirm it for robert.
            assert (await say_on(matrix, "oco link irc/bob", user="mallory")).startswith("to confirm")
            assert not (await cb.check_permission("matrix/mallory", "deploy")).allowed
            assert await say_on(matrix, "oco link irc/bob", user="robert") == (
                "linked: matrix/robert and irc/bob are now one person; roles follow both"
            )
            check = await cb.check_permission("matrix/robert", "deploy")
            assert (check.allowed, check.person_id) == (True, "irc/bob")
            assert await say_on(matrix, "oco roles", user="robert") == (
                "matrix/robert: roles: deploy; linked accounts: irc/bob, matrix/robert"
            )
            assert await say_on(matrix, "oco unlink", user="robert") == "matrix/robert is now linked to nobody"
            assert not (await cb.check_permission("matrix/robert", "deploy")).allowed
            assert (await cb.check_permission("irc/bob", "deploy")).allowed


def _metadata(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


async def test_a_callback_without_a_capability_is_refused_naming_it(tmp_path: Path) -> None:
    narrow = """
    capabilities: {send: ["memory/ops"], join: false, storage: false, directory: false, check_permission: false,
                   events: []}
"""
    async with open_bot(config(tmp_path, callback=narrow)) as running:
        running.adapter.rooms.add("ops")

        def calls(channel: grpc.Channel) -> dict[str, tuple[grpc.StatusCode, str]]:
            robot = robot_pb2_grpc.RobotStub(channel)
            storage = storage_pb2_grpc.StorageStub(channel)
            results: dict[str, tuple[grpc.StatusCode, str]] = {}

            def attempt(name: str, call: Callable[[], object]) -> None:
                try:
                    call()
                    results[name] = (grpc.StatusCode.OK, "")
                except grpc.RpcError as exc:
                    results[name] = (exc.code(), exc.details() or "")

            def send(room: str, secret: str = SECRET) -> Callable[[], object]:
                message = core_pb2.Message(body="hi", source=core_pb2.Source(room=core_pb2.Room(id=room)))
                request = robot_pb2.SendMessagesRequest(messages=[message])
                return lambda: robot.SendMessages(request, metadata=_metadata(secret), timeout=10)

            attempt("send ops", send("memory/ops"))
            attempt("send general", send("memory/general"))
            attempt("other sends general", send("memory/general", OTHER))
            join = robot_pb2.JoinRequest(room=core_pb2.Room(id="memory/new"))
            attempt("join", lambda: robot.Join(join, metadata=_metadata(SECRET), timeout=10))
            get = storage_pb2.GetRequest(key="k")
            attempt("storage", lambda: storage.Get(get, metadata=_metadata(SECRET), timeout=10))
            listen = robot_pb2.ListenRequest(events=[robot_pb2.EVENT_KIND_MEMBERSHIP])
            attempt("listen", lambda: next(iter(robot.Listen(listen, metadata=_metadata(SECRET), timeout=10))))
            return results

        results = await trio.to_thread.run_sync(lambda: _with_channel(running.address, calls))
        assert results["send ops"] == (grpc.StatusCode.OK, "")
        assert results["other sends general"] == (grpc.StatusCode.OK, "")  # other keeps the defaults
        for name, capability in [("send general", "send"), ("join", "join"), ("storage", "storage")]:
            code, details = results[name]
            assert code == grpc.StatusCode.PERMISSION_DENIED, name
            assert f"lacks the capability {capability!r}" in details
            assert f"capabilities.{capability}" in details
        assert "memory/general" in results["send general"][1]
        assert results["listen"][0] == grpc.StatusCode.PERMISSION_DENIED
        assert "membership events" in results["listen"][1]
        assert [m.room_id for m in running.adapter.sent] == ["ops", "general"]  # nothing else went out

        # The SDK raises CapabilityError.
        cb = Callback(id="ops", secret=SECRET, address=running.address)
        async with serving(cb):
            with pytest.raises(CapabilityError, match="check_permission"):
                await cb.check_permission("memory/alice", "x")
            with pytest.raises(CapabilityError, match="directory"):
                await cb.directory.list_rooms()
        refused = await audit(running, kind="capability")
        assert sorted(r.permission for r in refused) == [
            "check_permission",
            "directory",
            "events",
            "join",
            "send",
            "storage",
        ]
        assert all(r.callback == "ops" and r.decision == "denied" for r in refused)


def _with_channel(address: str, work: Callable[[grpc.Channel], T]) -> T:
    with grpc.insecure_channel(address) as channel:
        return work(channel)


async def test_rate_limits_refuse_clearly(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path, "  rate_limit: 2", callback="    rate_limit: 4")) as running:
        deployer = Deployer(running)
        async with serving(deployer.cb):
            # A person: two commands a minute; the third gets one reply, the fourth nothing.
            assert await say(running, "oco ping", user="bob") == "PONG"
            assert await say(running, "oco ping", user="bob") == "PONG"
            slow = await say(running, "oco ping", user="bob")
            assert slow.startswith("slow down: you may run 2 commands a minute; commands in the next ")
            await running.adapter.inject("oco ping", user="bob")
            await silence(running.adapter)
            assert deployer.seen == ["ping by memory/bob"] * 2
            # Others are not affected. alice's own 2 commands: her first ping costs one.
            assert await say(running, "oco ping") == "PONG"

            # A callback: four messages a minute (the three PONGs used three); a request that does
            # not fit is refused whole with RESOURCE_EXHAUSTED and the time to wait.
            await deployer.cb.send("one", room="memory/general")
            with pytest.raises(RateLimitedError, match=r"rate limit of 4 messages a minute; retry in") as limited_send:
                await deployer.cb.send("two", room="memory/general")
            assert 0 < limited_send.value.retry_after <= 60
        assert [m.body for m in running.adapter.sent][-2:] == ["PONG", "one"]
        limited = await audit(running, kind="rate_limit")
        assert [(r.user, r.callback) for r in limited] == [("memory/bob", ""), ("memory/bob", ""), ("", "ops")]


async def test_link_is_the_bots_only_when_it_names_an_account(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        cb = Callback(id="ops", secret=SECRET, address=running.address)

        @cb.respond(r"^link (\S+)$")
        async def shorten(message: Message) -> None:
            await message.reply(f"short link for {message.match(1)}")

        async with serving(cb):
            assert await say(running, "oco link https://example.com/x") == "short link for https://example.com/x"
            assert (await say(running, "oco link memory/robert")).startswith("to confirm, say `oco link memory/alice`")


async def test_two_bots_sharing_a_store_see_each_others_grants(tmp_path: Path) -> None:
    from oco_core._auth import RELOAD_SECONDS

    async with open_bot(config(tmp_path)) as first, open_bot(config(tmp_path)) as second:
        cb = Callback(id="ops", secret=SECRET, address=second.address)
        async with serving(cb):
            assert not (await cb.check_permission("memory/bob", "deploy")).allowed
            assert await say(first, "oco grant bob deploy") == "memory/bob now has the role deploy"
            began = trio.current_time()
            while not (await cb.check_permission("memory/bob", "deploy")).allowed:
                assert trio.current_time() - began < RELOAD_SECONDS + 5, "the second bot never saw the grant"
                await trio.sleep(0.2)


async def test_refused_callers_are_audited_once_a_minute_per_host(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:

        def get(secret: str) -> grpc.StatusCode:
            def work(channel: grpc.Channel) -> grpc.StatusCode:
                try:
                    storage_pb2_grpc.StorageStub(channel).Get(
                        storage_pb2.GetRequest(key="k"), metadata=_metadata(secret), timeout=10
                    )
                except grpc.RpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            return _with_channel(running.address, work)

        for _ in range(3):
            assert await trio.to_thread.run_sync(get, "not-the-secret-0123456789") == grpc.StatusCode.UNAUTHENTICATED
        assert await trio.to_thread.run_sync(get, SECRET) == grpc.StatusCode.OK
        refused = await audit(running, kind="authentication")
        assert len(refused) == 1
        assert refused[0].decision == "denied"
        assert "unknown secret" in refused[0].detail
        assert "peer ipv4:127.0.0.1:" in refused[0].detail
