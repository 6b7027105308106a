"""High availability (``ha:``): two real ``oco run`` processes share the local PostgreSQL;
one is active (its memory adapter connects, its control service answers), the other
stands by; killing, pausing and stopping the active one hands chat to the standby.

ngircd-based failover (one shared channel, duplicates counted) lives with the IRC
adapter's tests; the Redis store's own tests run the same election on Redis."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trio
import trio.testing

from oco_core import AdapterError, Callback, Message
from oco_core._adapter import Adapter, OutgoingMessage
from oco_core._bot import Bot
from oco_core._config import HaSettings, parse_config
from oco_core._errors import StandbyError, StoreUnavailableError
from oco_core._incoming import AdapterLink
from oco_core._leader import Leader
from oco_core._plugins import load_plugins
from oco_core._proto import control_pb2, control_pb2_grpc, core_pb2, robot_pb2, robot_pb2_grpc
from oco_core._store import Item, Store
from oco_core.testing import Lines, MemoryStore, OcoProcess, oco_cli, run_oco

PING = '["python", "-m", "oco_core.examples.ping"]'
SECRET = "h" * 32
AUTH = (("authorization", f"Bearer {SECRET}"),)


def ha_config(url: str, prefix: str, *, ha: str = "{}") -> str:
    """Two bots with this config and one store elect one active bot."""
    return (
        "adapters:\n"
        '  - {type: memory, control: "127.0.0.1:0", control_address_file: control.address}\n'
        "grpc: {listen: '127.0.0.1:0'}\n"
        "http: {listen: '127.0.0.1:0', address_file: http.address}\n"
        f"store: {{url: '{url}', table_prefix: '{prefix}'}}\n"
        f"ha: {ha}\n"
        "callbacks:\n"
        f"  - {{id: ping, command: {PING}}}\n"
        f"  - {{id: hold, secret: {SECRET}}}\n"
    )


class Chat:
    """Plays a chat user through one bot's memory adapter (its control service)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.seen = 0

    def _say(self, body: str, wait: float) -> list[core_pb2.Message | control_pb2.SentMessage]:
        with grpc.insecure_channel(self.address) as channel:
            control = control_pb2_grpc.MemoryControlStub(channel)
            if body:
                control.Inject(control_pb2.InjectRequest(body=body, user="alice", room="general"), timeout=10)
            sent = control.ListSent(
                control_pb2.ListSentRequest(after=self.seen, wait_ms=int(wait * 1000)), timeout=wait + 10
            )
        if sent.messages:
            self.seen = sent.messages[-1].seq
        return list(sent.messages)

    async def say(self, body: str, *, wait: float = 10.0) -> str:
        """Write ``body``; the bot's first answer ("" when none within ``wait``)."""
        answers = await trio.to_thread.run_sync(self._say, body, wait)
        return answers[0].body if answers else ""


async def active_chat(bot: OcoProcess, timeout: float = 30.0) -> Chat:
    """The chat of ``bot`` once it is active (its memory adapter writes its control
    address only when it connects, which only the active bot does)."""
    return Chat(await bot.written("control.address", timeout=timeout))


async def test_sigkill_of_the_active_bot_hands_chat_to_the_standby_within_5_s(
    tmp_path: Path, postgres_tables: tuple[str, str]
) -> None:
    config = ha_config(*postgres_tables)
    async with run_oco(config, tmp_path / "a") as a:
        chat_a = await active_chat(a)
        assert await chat_a.say("oco ping") == "PONG"
        async with run_oco(config, tmp_path / "b") as b:
            await b.expect(r"up as a standby", stream="stderr")
            # A standby connects no adapter, answers webhooks 503 naming the active one,
            # and refuses sends with UNAVAILABLE naming the active one's gRPC address.
            assert not (b.workdir / "control.address").exists()
            http_a = await a.written("http.address")
            http_b = await b.written("http.address")
            async with httpx.AsyncClient() as client:
                answer = await client.post(f"http://{http_b}/hooks/ping/x", content=b"{}")
            assert answer.status_code == 503
            assert http_a in answer.text
            assert answer.headers["oco-active-address"] == http_a
            refused = await send(b.address, "general", "hello")
            assert refused is not None
            assert refused.code() == grpc.StatusCode.UNAVAILABLE
            trailers = trailing(refused)
            assert trailers["oco-error-type"] == "StandbyError"
            assert trailers["oco-error-active-address"] == a.address

            killed = trio.current_time()
            a.process.send_signal(signal.SIGKILL)
            chat_b = await active_chat(b, timeout=10)
            assert await chat_b.say("oco ping", wait=5) == "PONG"
            took = trio.current_time() - killed
            assert took < 5.0, f"the standby answered {took:.2f} s after the kill"
            assert await send(b.address, "general", "hello from the new active bot") is None
            await b.expect(r"ha: this bot is now active \(fencing token 2\)", stream="stderr")


async def test_a_paused_active_bot_resumes_sending_nothing_and_steps_down(
    tmp_path: Path, postgres_tables: tuple[str, str]
) -> None:
    config = ha_config(*postgres_tables)
    async with run_oco(config, tmp_path / "a") as a, trio.open_nursery() as nursery:
        chat_a = await active_chat(a)
        async with run_oco(config, tmp_path / "b") as b:
            await b.expect(r"up as a standby", stream="stderr")
            # A callback of the active bot holds a message it will answer late.
            events: trio.MemorySendChannel[core_pb2.Event]
            events, received = trio.open_memory_channel[core_pb2.Event](10)
            nursery.start_soon(listen, a.address, events)
            await trio.sleep(0.5)  # the stream's routes are live
            assert await chat_a.say("hold this", wait=0.5) == ""
            with trio.fail_after(10):
                held = (await received.receive()).matched_message.message
            assert held.body == "hold this"

            a.process.send_signal(signal.SIGSTOP)
            try:
                chat_b = await active_chat(b, timeout=10)
                assert await chat_b.say("oco ping") == "PONG"
            finally:
                a.process.send_signal(signal.SIGCONT)
            # The resumed bot's lease is stale: it sends nothing, and says where to (once
            # it has looked at the lease again: until then, that it does not know).
            with trio.fail_after(5):
                while True:
                    refused = await send(a.address, held.source.room.id, "late answer", in_reply_to=held.id)
                    assert refused is not None
                    assert refused.code() == grpc.StatusCode.UNAVAILABLE
                    trailers = trailing(refused)
                    if trailers["oco-error-active-address"] == b.address:
                        break
                    assert trailers["oco-error-active-address"] == "", trailers
                    await trio.sleep(0.1)
            await a.expect(r"WARNING .*ha: this bot stopped acting and stands by", stream="stderr")
            await a.expect(r"adapters disconnected: this bot stands by", stream="stderr")
            # Sent where it said: the new active bot delivers it, once.
            assert await send(b.address, held.source.room.id, "late answer", in_reply_to=held.id) is None
            assert await chat_b.say("", wait=5) == "late answer"
            await trio.sleep(1.0)  # a bot that steps down warns once, not on every look
            assert len(a.stderr.matches(r"ha: this bot stopped acting")) == 1
            assert not a.stderr.matches(r"ha: this bot is now active \(fencing token 3\)")
        nursery.cancel_scope.cancel()


async def test_a_stopping_active_bot_hands_over_at_once(tmp_path: Path, postgres_tables: tuple[str, str]) -> None:
    # A lease of 8 s: only the release at shutdown explains a takeover within 3 s. (The
    # first bot waits that lease out on the empty store: the record may have vanished.)
    config = ha_config(*postgres_tables, ha="{lease: 8, renew_interval: 0.5}")
    async with run_oco(config, tmp_path / "a") as a:
        await active_chat(a)
        async with run_oco(config, tmp_path / "b") as b:
            await b.expect(r"up as a standby", stream="stderr")
            stopped = trio.current_time()
            assert await a.stop() == 0
            await a.expect(r"ha: released the lease", stream="stderr")
            chat_b = await active_chat(b, timeout=5)
            assert trio.current_time() - stopped < 3.0
            assert await chat_b.say("oco ping") == "PONG"
            await b.expect(r"the active bot released the lease", stream="stderr")


SLOW_TO_STOP = (
    '["python", "-c", "import signal, sys, time; '
    'signal.signal(signal.SIGTERM, lambda *_: (time.sleep(4), sys.exit(0))); time.sleep(600)"]'
)


async def test_a_stopping_active_bot_hands_over_before_its_callbacks_exit(
    tmp_path: Path, postgres_tables: tuple[str, str]
) -> None:
    # A launched callback takes 4 s to exit on SIGTERM; the lease (8 s) is released first,
    # so the standby is active long before the stopping bot is gone.
    config = ha_config(*postgres_tables, ha="{lease: 8, renew_interval: 0.5}")
    config = f"bot: {{callback_startup_wait: 0.5}}\n{config}  - {{id: slow, command: {SLOW_TO_STOP}}}\n"
    async with run_oco(config, tmp_path / "a") as a:
        await active_chat(a)
        async with run_oco(config, tmp_path / "b") as b:
            await b.expect(r"up as a standby", stream="stderr")
            stopped = trio.current_time()
            a.process.send_signal(signal.SIGTERM)
            chat_b = await active_chat(b, timeout=10)
            took = trio.current_time() - stopped
            assert took < 2.5, f"the standby took over {took:.2f} s after SIGTERM"
            assert a.process.returncode is None  # still stopping its callback
            assert await chat_b.say("oco ping") == "PONG"
            assert await a.stop() == 0
            await a.expect(r"ha: released the lease", stream="stderr")


async def test_the_sdk_given_every_bot_follows_the_active_one(tmp_path: Path, postgres_tables: tuple[str, str]) -> None:
    config = ha_config(*postgres_tables)
    async with run_oco(config, tmp_path / "a") as a:
        chat_a = await active_chat(a)
        async with run_oco(config, tmp_path / "b") as b, trio.open_nursery() as nursery:
            await b.expect(r"up as a standby", stream="stderr")
            # The standby first: a send it refuses goes to the bot it names.
            callback = Callback("hold", SECRET, f"{b.address},{a.address}")
            heard: list[str] = []

            @callback.hear(r"^hold (?P<what>.+)$")
            async def hold(message: Message) -> None:
                heard.append(message.text)
                await message.reply(f"held {message.match('what')}")

            await nursery.start(callback.serve)
            with trio.fail_after(10):
                while len(callback._connections) < 2:
                    await trio.sleep(0.02)
            await callback.send("hello from the SDK", room="memory/general")
            assert callback._active == a.address  # refused by b, which named a
            assert await chat_a.say("", wait=5) == "hello from the SDK"
            assert await chat_a.say("hold one") == "held one"

            a.process.send_signal(signal.SIGKILL)
            chat_b = await active_chat(b, timeout=10)
            # The event comes from the new active bot; the answer goes back there.
            assert await chat_b.say("hold two") == "held two"
            await callback.send("still here", room="memory/general")
            assert await chat_b.say("", wait=5) == "still here"
            assert heard == ["hold one", "hold two"]
            nursery.cancel_scope.cancel()


@pytest.mark.server("node")
async def test_the_node_example_given_every_bot_follows_the_active_one(
    node_example: Path, tmp_path: Path, postgres_tables: tuple[str, str]
) -> None:
    config = ha_config(*postgres_tables)
    async with run_oco(config, tmp_path / "a") as a:
        chat_a = await active_chat(a)
        async with run_oco(config, tmp_path / "b") as b, trio.open_nursery() as nursery:
            await b.expect(r"up as a standby", stream="stderr")
            env = {**os.environ, "OCO_ADDRESS": f"{b.address},{a.address}", "OCO_CALLBACK_ID": "hold"}
            env["OCO_SECRET"] = SECRET
            process = await trio.lowlevel.open_process(
                ["node", str(node_example / "callback.js")], env=env, stderr=subprocess.PIPE
            )
            stderr = Lines("the node callback's stderr")
            assert process.stderr is not None
            nursery.start_soon(stderr.pump, process.stderr)
            try:
                await stderr.wait_for(r"connected to .*: 6 route\(s\) registered", count=2)
                assert "from Node.js" in await chat_a.say("hello node")
                a.process.send_signal(signal.SIGKILL)
                chat_b = await active_chat(b, timeout=10)
                assert "from Node.js" in await chat_b.say("hello node")
            finally:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("store", ["store: {url: 'sqlite:///oco.db'}\n", ""], ids=["sqlite", "default"])
def test_ha_needs_a_store_bots_share(tmp_path: Path, store: str) -> None:
    (tmp_path / "oco.yaml").write_text(f"adapters: [{{type: memory}}]\n{store}ha: {{}}\ncallbacks: []\n")
    for command in ("check-config", "run"):
        done = oco_cli(command, "--config", str(tmp_path / "oco.yaml"), cwd=tmp_path, timeout=60)
        assert done.returncode != 0, (command, done.stdout, done.stderr)
        assert "ha needs a store several bots share: PostgreSQL or Redis" in done.stdout + done.stderr


def test_a_lease_too_short_for_two_renewals_is_refused(tmp_path: Path) -> None:
    (tmp_path / "oco.yaml").write_text("ha: {lease: 1, renew_interval: 0.5}\ncallbacks: []\n")
    done = oco_cli("check-config", "--config", str(tmp_path / "oco.yaml"), cwd=tmp_path, timeout=60)
    assert done.returncode != 0
    assert "by at least two ha.renew_interval" in done.stdout + done.stderr


def trailing(error: grpc.RpcError) -> dict[str, str]:
    """The trailing metadata of a failed call."""
    pairs: Any = error.trailing_metadata() or ()  # a grpc.Call's
    return {str(key): str(value) for key, value in pairs}


async def send(address: str, room: str, body: str, *, in_reply_to: str = "") -> grpc.RpcError | None:
    """SendMessages as the dial-in callback; the error, or None when it was sent."""

    def work() -> grpc.RpcError | None:
        with grpc.insecure_channel(address) as channel:
            message = core_pb2.Message(body=body, source=core_pb2.Source(room=core_pb2.Room(id=room)))
            message.in_reply_to = in_reply_to
            try:
                robot_pb2_grpc.RobotStub(channel).SendMessages(
                    robot_pb2.SendMessagesRequest(messages=[message]), metadata=AUTH, timeout=10
                )
            except grpc.RpcError as exc:
                return exc
        return None

    return await trio.to_thread.run_sync(work)


async def listen(address: str, events: trio.MemorySendChannel[core_pb2.Event]) -> None:
    """A dial-in callback's Listen stream with one route, its events into ``events``."""
    token = trio.lowlevel.current_trio_token()

    def work(cancelled: list[grpc.Future]) -> None:  # type: ignore[type-arg]
        with grpc.insecure_channel(address) as channel:
            request = robot_pb2.ListenRequest(routes=[robot_pb2.Route(pattern=r"^hold")])
            stream = robot_pb2_grpc.RobotStub(channel).Listen(request, metadata=AUTH)
            cancelled.append(stream)  # type: ignore[arg-type]
            try:
                for event in stream:
                    trio.from_thread.run(events.send, event, trio_token=token)
            except grpc.RpcError:
                return

    calls: list[grpc.Future] = []  # type: ignore[type-arg]
    try:
        await trio.to_thread.run_sync(work, calls, abandon_on_cancel=True)
    finally:
        for call in calls:
            call.cancel()


# -- the election alone, on trio's autojump clock -------------------------------------


class Cuttable(Store):
    """A view of a store that a test can cut off (StoreUnavailableError) or make hang."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.cut = False

    async def _gate(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.cut:
            raise StoreUnavailableError("cut off by the test")

    async def get(self, namespace: str, key: str) -> Item | None:
        await self._gate()
        return await self.store.get(namespace, key)

    async def set(self, namespace: str, key: str, value: bytes, *, expected_version: int | None = None) -> int:
        await self._gate()
        return await self.store.set(namespace, key, value, expected_version=expected_version)

    async def delete(self, namespace: str, key: str, *, expected_version: int | None = None) -> bool:
        await self._gate()
        return await self.store.delete(namespace, key, expected_version=expected_version)

    async def list(
        self, namespace: str, prefix: str = "", *, start_after: str = "", limit: int = 100, keys_only: bool = False
    ) -> list[Item]:
        await self._gate()
        return await self.store.list(namespace, prefix, start_after=start_after, limit=limit, keys_only=keys_only)


class SlowOnce(Store):
    """A view of a store whose next read (once :attr:`delay` is set) waits that long
    before it reads, then calls :attr:`then`: a read that brings back a renewal begun
    long after the read was sent."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.delay = 0.0
        self.then: Callable[[], None] = lambda: None

    async def get(self, namespace: str, key: str) -> Item | None:
        delay, self.delay = self.delay, 0.0
        await trio.sleep(delay)
        item = await self.store.get(namespace, key)
        if delay:
            self.then()
        return item

    async def set(self, namespace: str, key: str, value: bytes, *, expected_version: int | None = None) -> int:
        return await self.store.set(namespace, key, value, expected_version=expected_version)

    async def delete(self, namespace: str, key: str, *, expected_version: int | None = None) -> bool:
        return await self.store.delete(namespace, key, expected_version=expected_version)

    async def list(
        self, namespace: str, prefix: str = "", *, start_after: str = "", limit: int = 100, keys_only: bool = False
    ) -> list[Item]:
        return await self.store.list(namespace, prefix, start_after=start_after, limit=limit, keys_only=keys_only)


class Timeline:
    """When each leader became active and stepped down, to check they never overlap."""

    def __init__(self, *leaders: Leader) -> None:
        self.changes: list[tuple[float, str, bool]] = []
        for leader in leaders:
            leader.on_change(partial(self._changed, leader.holder))

    def _changed(self, name: str, active: bool) -> None:
        self.changes.append((trio.current_time(), name, active))

    def overlaps(self) -> list[float]:
        active: set[str] = set()
        bad = []
        for when, name, became in sorted(self.changes):
            if became:
                active.add(name)
            else:
                active.discard(name)
            if len(active) > 1:
                bad.append(when)
        return bad


async def test_a_leader_cut_off_from_the_store_stops_before_the_standby_starts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = HaSettings()
    store = MemoryStore()
    cuttable = Cuttable(store)
    a = Leader(cuttable, settings, name="a", grpc_address="a:1")
    b = Leader(store, settings, name="b", grpc_address="b:1")
    timeline = Timeline(a, b)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await a.wait_active()  # a full lease: nobody held it, or had the record vanished?
        assert a.token == 1
        await nursery.start(b.run)
        await trio.sleep(5)
        assert not b.acting()  # a renews: b waits for ever
        with pytest.raises(StandbyError) as refused:
            b.check()
        assert refused.value.active_address == "a:1"

        cuttable.cut = True
        cut_at = trio.current_time()
        await b.wait_active()
        took_over = trio.current_time()
        assert not a.acting()
        stepped_down = next(when for when, name, active in timeline.changes if name == "a" and not active)
        # a stopped within lease - margin of its last renewal; b started a margin later at least.
        assert stepped_down - cut_at <= settings.lease - settings.fence_margin
        assert took_over - stepped_down >= settings.fence_margin
        assert took_over - cut_at <= settings.lease + 2 * settings.renew_interval
        assert b.token == 2

        # a reaches the store again: it sees b's lease and stands by.
        cuttable.cut = False
        await trio.sleep(5)
        assert b.acting()
        assert not a.acting()
        assert a.active_grpc_address == "b:1"
        assert timeline.overlaps() == []
        nursery.cancel_scope.cancel()


async def test_a_leader_that_stops_releases_the_lease_at_once(autojump_clock: trio.testing.MockClock) -> None:
    settings = HaSettings(lease=30, renew_interval=0.5)
    store = MemoryStore()
    a = Leader(store, settings, name="a")
    b = Leader(store, settings, name="b")
    async with trio.open_nursery() as outer:
        with trio.CancelScope() as a_scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(a.run)
                await a.wait_active()
                outer.start_soon(b.run)
                await trio.sleep(2)
                assert a.acting()
                assert not b.acting()
                a_scope.cancel()
        stopped = trio.current_time()
        await b.wait_active()
        assert trio.current_time() - stopped <= settings.renew_interval + 0.1
        outer.cancel_scope.cancel()


async def test_a_paused_leader_stops_acting_by_its_clock_alone(autojump_clock: trio.testing.MockClock) -> None:
    # No task of the leader runs between the pause and the check: acting() reads the clock.
    settings = HaSettings()
    a = Leader(MemoryStore(), settings, name="a")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await a.wait_active()
        assert a.acting()
        autojump_clock.jump(settings.lease)  # the process was stopped this long
        assert not a.acting()
        with pytest.raises(StandbyError):
            a.check()
        assert a.step_downs == 1
        nursery.cancel_scope.cancel()


async def test_a_standby_counts_from_when_its_slow_read_returned(autojump_clock: trio.testing.MockClock) -> None:
    # b's read is sent, waits 2 s, and brings back a renewal a began just now; then a is
    # cut off. a acts until that renewal's start + lease - margin: b, counting from when
    # the read was sent, would take over about 1.5 s before that.
    settings = HaSettings()
    store = MemoryStore()
    cuttable = Cuttable(store)
    slow = SlowOnce(store)
    a = Leader(cuttable, settings, name="a")
    b = Leader(slow, settings, name="b")
    timeline = Timeline(a, b)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await a.wait_active()
        await nursery.start(b.run)
        await trio.sleep(2.1)
        assert not b.acting()

        def cut() -> None:
            cuttable.cut = True

        slow.then = cut
        slow.delay = 2.0
        await b.wait_active()
        assert timeline.overlaps() == []
        stepped_down = next(when for when, name, active in timeline.changes if name == "a" and not active)
        assert trio.current_time() - stepped_down >= settings.fence_margin
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("start_standby", [True, False], ids=["standby-running", "standby-starting"])
async def test_a_vanished_lease_record_is_waited_out_for_a_lease(
    autojump_clock: trio.testing.MockClock, start_standby: bool
) -> None:
    # The store lost the record (a restart without persistence, FLUSHDB, eviction) and a
    # cannot reach it meanwhile: a acts until its fence, so no standby may take the empty
    # store at once, neither one running nor one starting now.
    settings = HaSettings()
    store = MemoryStore()
    cuttable = Cuttable(store)
    a = Leader(cuttable, settings, name="a")
    b = Leader(store, settings, name="b")
    timeline = Timeline(a, b)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await a.wait_active()
        if start_standby:
            await nursery.start(b.run)
        await trio.sleep(2.05)
        assert a.acting()
        cuttable.cut = True
        lost = trio.current_time()
        assert await store.delete("ha", "leader")
        if not start_standby:
            await nursery.start(b.run)
        await b.wait_active()
        assert trio.current_time() - lost >= settings.lease
        assert timeline.overlaps() == []
        assert b.token == (2 if start_standby else 1)
        nursery.cancel_scope.cancel()


class SlowChat(Adapter):
    """A chat service whose every send takes 0.3 s, recording what went out."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def run(self, host: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def send(self, message: OutgoingMessage) -> None:
        await trio.sleep(0.3)
        self.sent.append(message.body)


async def test_a_send_the_fence_stops_part_way_is_not_retried_elsewhere() -> None:
    # The bot is fenced after some messages of a request of five went out: a StandbyError
    # would make the SDK resend all five to the new active bot, repeating those. It is an
    # AdapterError saying how many went out instead.
    config = parse_config(f"callbacks:\n  - {{id: hold, secret: {SECRET}}}\n")
    bot = Bot(config, load_plugins())
    settings = HaSettings(lease=1.0, renew_interval=0.2, fence_margin=0.3)
    cuttable = Cuttable(MemoryStore())
    async with bot.open() as core, trio.open_nursery() as nursery:
        leader = core.leader = Leader(cuttable, settings, name="a", grpc_address="a:1")
        chat = SlowChat()
        core.links["chat"] = AdapterLink(core, "chat", chat, core.store)
        await nursery.start(leader.run)
        await leader.wait_active()
        cuttable.cut = True  # no renewal lands any more: the fence falls within 0.7 s
        messages = [
            core_pb2.Message(body=f"m{n}", source=core_pb2.Source(room=core_pb2.Room(id="chat/general")))
            for n in range(5)
        ]
        with pytest.raises(AdapterError) as stopped:
            await core.outgoing.send_messages("hold", robot_pb2.SendMessagesRequest(messages=messages))
        assert not isinstance(stopped.value, StandbyError)
        assert 0 < len(chat.sent) < 5
        assert stopped.value.sent == len(chat.sent)
        assert "stopped being the active one" in str(stopped.value)
        # Nothing sent yet: still a StandbyError, which the SDK sends on whole.
        with pytest.raises(StandbyError):
            await core.outgoing.send_messages("hold", robot_pb2.SendMessagesRequest(messages=messages))
        nursery.cancel_scope.cancel()
