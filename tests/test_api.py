"""The gRPC API end to end: a bot in this process (memory adapter), callbacks over real gRPC.

Callbacks use the Python SDK or plain generated stubs, so both the SDK and what any
generated client sees are covered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import trio

from oco_core import Callback, Membership, Message, RequestTooLargeError, UnknownTargetError, VersionConflictError
from oco_core._adapter import MembershipKind
from oco_core._proto import core_pb2, robot_pb2, robot_pb2_grpc, storage_pb2, storage_pb2_grpc
from oco_core.testing import RunningBot, free_port, open_bot, serving

SECRET_A = "secret-a-0123456789abcdef"
SECRET_B = "secret-b-0123456789abcdef"

T = TypeVar("T")
#: gRPC call metadata, as grpcio's blocking client takes it.
Metadata = tuple[tuple[str, str], ...]


def config(tmp_path: Path, extra: str = "") -> str:
    return f"""
adapters: [{{type: memory}}]
store: {{url: "sqlite:///{tmp_path}/oco.db"}}
bot: {{name: oco, aliases: ["!"], max_message_bytes: 1000}}
callbacks:
  - {{id: alpha, secret: {SECRET_A}}}
  - {{id: beta, secret: {SECRET_B}}}
{extra}
"""


@asynccontextmanager
async def callback(running: RunningBot, cb: Callback) -> AsyncIterator[Callback]:
    async with serving(cb):
        yield cb


def sdk(running: RunningBot, name: str = "alpha", **kwargs: Any) -> Callback:
    secret = SECRET_A if name == "alpha" else SECRET_B
    return Callback(id=name, secret=secret, address=running.address, **kwargs)


def pinger(cb: Callback) -> Callback:
    """``cb`` with the route ``ping``, answered ``PONG``."""

    @cb.respond("^ping$")
    async def ping(message: Message) -> None:
        await message.send("PONG")

    return cb


async def reply_to(running: RunningBot, body: str, **kwargs: Any) -> str:
    await running.adapter.inject(body, **kwargs)
    with trio.fail_after(10):
        return (await running.adapter.next_sent()).body


async def raw(running: RunningBot, call: Callable[[grpc.Channel], T]) -> T:
    """Run ``call(channel)`` with a plain grpcio channel (a generated client's view)."""

    def work() -> T:
        with grpc.insecure_channel(running.address) as channel:
            return call(channel)

    return await trio.to_thread.run_sync(work)


def auth(secret: str) -> Metadata:
    return (("authorization", f"Bearer {secret}"),)


async def test_respond_and_hear_routes_answer_through_the_sdk(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        cb = sdk(running)

        @cb.respond(r"^ping$", help="ping - replies PONG")
        async def ping(message: Message) -> None:
            await message.send("PONG")

        @cb.hear(r"(?i)\bcoffee\b")
        async def coffee(message: Message) -> None:
            await message.send(f"{message.user.name} wants coffee")

        async with callback(running, cb):
            assert await reply_to(running, "oco ping") == "PONG"
            assert await reply_to(running, "!ping") == "PONG"
            assert await reply_to(running, "ping", room=None) == "PONG"  # a private message is addressed
            assert await reply_to(running, "any COFFEE left?") == "Alice wants coffee"
            help_text = await reply_to(running, "oco help")
            assert help_text.splitlines()[0] == "ping - replies PONG"
            assert "who can" in help_text.splitlines()[-1]  # the bot's own commands are mentioned
            stats = running.bot.statistics()
            assert (stats.received, stats.matched, stats.sent, stats.dropped, stats.streams) == (5, 4, 4, 0, 1)


async def test_reply_mentions_the_sender_and_private_messages_stay_private(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        cb = sdk(running)

        @cb.respond(r"^hi$")
        async def hi(message: Message) -> None:
            await message.reply("hello")

        async with callback(running, cb):
            await running.adapter.inject("oco hi", user="bob")
            sent = await running.adapter.next_sent()
            assert (sent.body, sent.room_id, sent.mention, sent.user and sent.user.id) == (
                "hello",
                "general",
                True,
                "bob",
            )
            await running.adapter.inject("hi", user="bob", room=None)
            sent = await running.adapter.next_sent()
            assert (sent.room_id, sent.private, sent.mention, sent.user and sent.user.id) == (None, True, False, "bob")


async def test_capture_groups_reach_the_handler(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        cb = sdk(running)

        @cb.respond(r"^deploy (?P<app>\w+) to (\w+)$")
        async def deploy(message: Message) -> None:
            await message.send(f"{message.match('app')}|{message.match(2)}|{message.text}|{message.direct}")

        async with callback(running, cb):
            assert await reply_to(running, "oco: deploy api to prod") == "api|prod|deploy api to prod|True"


async def test_missing_wrong_and_borrowed_identities_are_refused(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:

        def listen(metadata: Metadata, plugin_id: str = "alpha") -> Callable[[grpc.Channel], grpc.StatusCode]:
            def call(channel: grpc.Channel) -> grpc.StatusCode:
                stream = robot_pb2_grpc.RobotStub(channel).Listen(
                    robot_pb2.ListenRequest(plugin_id=plugin_id), metadata=metadata, timeout=5
                )
                try:
                    next(iter(stream))
                except grpc.RpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            return call

        assert await raw(running, listen(())) == grpc.StatusCode.UNAUTHENTICATED
        assert await raw(running, listen(auth("not-the-secret-at-all"))) == grpc.StatusCode.UNAUTHENTICATED
        assert await raw(running, listen(auth(SECRET_A), plugin_id="beta")) == grpc.StatusCode.PERMISSION_DENIED

        def storage_without_secret(channel: grpc.Channel) -> grpc.StatusCode:
            try:
                storage_pb2_grpc.StorageStub(channel).Get(storage_pb2.GetRequest(key="k"), timeout=5)
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        assert await raw(running, storage_without_secret) == grpc.StatusCode.UNAUTHENTICATED


async def test_an_invalid_pattern_is_refused_naming_it(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:

        def call(channel: grpc.Channel) -> tuple[grpc.StatusCode, str]:
            request = robot_pb2.ListenRequest(routes=[robot_pb2.Route(id="bad", pattern="deploy (app")])
            try:
                next(iter(robot_pb2_grpc.RobotStub(channel).Listen(request, metadata=auth(SECRET_A), timeout=5)))
            except grpc.RpcError as exc:
                return exc.code(), exc.details() or ""
            return grpc.StatusCode.OK, ""

        code, details = await raw(running, call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "deploy (app" in details
        assert "missing )" in details
        # the bot is fine afterwards
        async with callback(running, pinger(sdk(running))):
            assert await reply_to(running, "oco ping") == "PONG"


async def test_storage_is_private_to_each_callback_with_compare_and_set(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        async with callback(running, sdk(running, "alpha")) as alpha, callback(running, sdk(running, "beta")) as beta:
            version = await alpha.storage.set("shared-name", b"alpha's")
            assert version == 1
            assert await beta.storage.get("shared-name") is None
            await beta.storage.set("shared-name", "beta's")
            assert await alpha.storage.get("shared-name") == b"alpha's"
            assert await beta.storage.get("shared-name") == b"beta's"
            with pytest.raises(VersionConflictError):
                await alpha.storage.set("shared-name", b"x", expected_version=7)
            assert await alpha.storage.set("shared-name", b"new", expected_version=1) == 2
            with pytest.raises(VersionConflictError):
                await alpha.storage.set("fresh", b"x", expected_version=1)
            assert await alpha.storage.set("fresh", b"x", expected_version=0) == 1
            for i in range(5):
                await alpha.storage.set(f"list/{i}", str(i))
            keys = [item.key async for item in alpha.storage.items("list/", page=2)]
            assert keys == [f"list/{i}" for i in range(5)]
            assert [i.key async for i in beta.storage.items("list/")] == []
            assert await alpha.storage.delete("fresh")
            assert not await alpha.storage.delete("fresh")


async def test_concurrent_compare_and_set_increments_lose_nothing(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running, callback(running, sdk(running, "alpha")) as alpha:

        async def increment() -> None:
            await alpha.storage.update("counter", lambda old: str(int(old or b"0") + 1).encode())

        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(increment)
        assert await alpha.storage.get("counter") == b"40"


async def test_bad_sends_get_clear_errors_and_the_bot_keeps_going(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running, callback(running, sdk(running)) as cb:
        with pytest.raises(RequestTooLargeError, match="1000"):
            await cb.send("x" * 1001, room="memory/general")
        with pytest.raises(UnknownTargetError, match="nowhere"):
            await cb.send("hello", room="memory/nowhere")
        with pytest.raises(UnknownTargetError, match="unknown id 'slack/x'"):
            await cb.send("hello", room="slack/x")
        await cb.send("still here", room="memory/general")
        assert (await running.adapter.next_sent()).body == "still here"
        await cb.send("psst", user="memory/alice")
        sent = await running.adapter.next_sent()
        assert (sent.body, sent.private, sent.user and sent.user.id) == ("psst", True, "alice")
        assert running.adapter.sent[0].body == "still here"  # nothing from the refused ones


async def test_join_and_part_reach_the_adapter(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:

        def call(channel: grpc.Channel) -> None:
            stub = robot_pb2_grpc.RobotStub(channel)
            stub.Join(robot_pb2.JoinRequest(room=core_pb2.Room(id="memory/ops")), metadata=auth(SECRET_A), timeout=5)
            stub.Part(
                robot_pb2.PartRequest(room=core_pb2.Room(id="memory/general")), metadata=auth(SECRET_A), timeout=5
            )

        await raw(running, call)
        assert running.adapter.rooms == {"ops"}


async def test_routes_end_with_their_stream(tmp_path: Path) -> None:
    """Once its stream ends, a callback gets no more messages; the person is told it is
    not running instead."""
    async with open_bot(config(tmp_path)) as running:
        async with callback(running, pinger(sdk(running))):
            assert await reply_to(running, "oco ping") == "PONG"
        with trio.fail_after(5):
            while running.bot.router.subscriptions():
                await trio.sleep(0.01)
        not_running = "the alpha callback is not running: it is not connected to the bot"
        assert await reply_to(running, "oco ping") == not_running
        assert [m.body for m in running.adapter.sent] == ["PONG", not_running]


async def test_a_stuck_callback_never_delays_the_others(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path, "grpc: {stream_queue: 4}")) as running:
        stuck = sdk(running, "alpha", concurrency=1)
        never = trio.Event()

        @stuck.hear("work")
        async def block(message: Message) -> None:
            await never.wait()

        healthy = sdk(running, "beta")

        @healthy.hear("work")
        async def answer(message: Message) -> None:
            await message.send(f"done {message.body}")

        async with callback(running, stuck), callback(running, healthy):
            # The stuck callback stops reading after one event; what the transport
            # buffers fills, then its own queue; the healthy one answers every message,
            # in order, all along. (Counting what overflows: tests/test_router.py.)
            with trio.fail_after(30):
                for n in range(50):
                    assert await reply_to(running, f"work {n}") == f"done work {n}"
            (stuck_stream,) = running.bot.router.subscriptions("alpha")
            assert stuck_stream.delivered + stuck_stream.overflowed == 50
            never.set()


async def test_membership_events_reach_callbacks_that_asked(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        cb = sdk(running)
        seen: list[Membership] = []
        got = trio.Event()

        @cb.on_membership
        async def member(change: Membership) -> None:
            seen.append(change)
            got.set()

        async with callback(running, cb):
            await running.adapter.member(MembershipKind.JOINED, "carol", "general")
            with trio.fail_after(5):
                await got.wait()
            assert (seen[0].kind, seen[0].user.id, seen[0].room.id) == ("joined", "memory/carol", "memory/general")
            users = await cb.directory.list_users("memory/general")
            assert "memory/carol" in [u.id for u in users]
            await running.adapter.inject("hello", user="dave")
            with trio.fail_after(10):  # the bot meets dave as it handles his message
                while "memory/dave" not in [u.id for u in await cb.directory.list_users()]:
                    await trio.sleep(0.05)
            assert [r.id for r in await cb.directory.list_rooms()] == ["memory/general"]
            with pytest.raises(UnknownTargetError):
                await cb.directory.get_user("memory/nobody")


async def test_the_sdk_reconnects_when_the_bot_restarts(tmp_path: Path) -> None:
    port = free_port()
    fixed = config(tmp_path, f"grpc: {{listen: '127.0.0.1:{port}'}}")
    cb = pinger(Callback(id="alpha", secret=SECRET_A, address=f"127.0.0.1:{port}"))

    async with trio.open_nursery() as nursery:
        async with open_bot(fixed) as running:
            await nursery.start(cb.serve)
            assert await reply_to(running, "oco ping") == "PONG"
        # the bot is gone; the callback keeps trying until it is back
        async with open_bot(fixed) as again:
            with trio.fail_after(20):
                while not again.bot.router.subscriptions("alpha"):
                    await trio.sleep(0.05)
            assert await reply_to(again, "oco ping") == "PONG"
        nursery.cancel_scope.cancel()


async def test_storage_quotas_answer_resource_exhausted_naming_the_quota(tmp_path: Path) -> None:
    from oco_core import QuotaExceededError

    text = f"""
adapters: [{{type: memory}}]
store: {{url: "sqlite:///{tmp_path}/oco.db", quota: {{max_keys: 2, max_bytes: 1000}}}}
callbacks:
  - {{id: alpha, secret: {SECRET_A}}}
  - {{id: beta, secret: {SECRET_B}, quota: {{max_keys: 3, max_bytes: null}}}}
"""
    async with open_bot(text) as running:
        async with callback(running, sdk(running, "alpha")) as alpha, callback(running, sdk(running, "beta")) as beta:
            await alpha.storage.set("one", b"1")
            await alpha.storage.set("two", b"2")
            with pytest.raises(QuotaExceededError, match="max_keys"):
                await alpha.storage.set("three", b"3")
            await alpha.storage.set("two", b"22")  # overwriting adds no key
            with pytest.raises(QuotaExceededError, match="max_bytes"):
                await alpha.storage.set("two", b"x" * 995)
            for key in ("a", "b", "c"):  # beta has its own, larger quota
                await beta.storage.set(key, b"x" * 2000)
            with pytest.raises(QuotaExceededError, match="max_keys"):
                await beta.storage.set("d", b"x")
            assert await alpha.storage.delete("one")
            await alpha.storage.set("three", b"3")  # room again
