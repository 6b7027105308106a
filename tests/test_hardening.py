"""Issue 12: no callback can starve, freeze or mislead the bot. A bot in this process with
the memory adapter; callbacks are plain generated gRPC clients, as an attacker's would be."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import trio

from oco_core import Callback, Message
from oco_core._proto import robot_pb2, robot_pb2_grpc
from oco_core.testing import RunningBot, open_bot, run_oco, serving

HOSTILE = "secret-hostile-0123456789abc"
VICTIM = "secret-victim-0123456789abcd"


def config(tmp_path: Path, grpc_settings: str = "") -> str:
    return f"""
adapters: [{{type: memory}}]
store: {{url: "sqlite:///{tmp_path}/oco.db"}}
grpc: {{listen: "127.0.0.1:0"{grpc_settings}}}
callbacks:
  - {{id: hostile, secret: {HOSTILE}}}
  - {{id: victim, secret: {VICTIM}}}
"""


def listen_refusal(running: RunningBot, *patterns: str) -> grpc.RpcError:
    """Open a Listen stream declaring ``patterns`` as a generated client would; the error
    the bot ends it with (the test fails if it registers them)."""
    request = robot_pb2.ListenRequest(routes=[robot_pb2.Route(id=f"r{i}", pattern=p) for i, p in enumerate(patterns)])
    with grpc.insecure_channel(running.address) as channel:
        stream = robot_pb2_grpc.RobotStub(channel).Listen(
            request, metadata=(("authorization", f"Bearer {HOSTILE}"),), timeout=30
        )
        try:
            next(iter(stream))
        except grpc.RpcError as exc:
            return exc
    raise AssertionError(f"the bot registered {patterns!r}")


def victim(running: RunningBot, seen: list[str]) -> Callback:
    cb = Callback(id="victim", secret=VICTIM, address=running.address)

    @cb.hear(r"^(.+)$")
    async def everything(message: Message) -> None:
        seen.append(message.body)
        await message.send(f"seen {message.body}")

    return cb


async def test_a_pattern_that_splits_utf8_characters_is_refused_and_others_keep_their_messages(
    tmp_path: Path,
) -> None:
    async with open_bot(config(tmp_path)) as running:
        seen: list[str] = []
        async with serving(victim(running, seen)):
            error = await trio.to_thread.run_sync(listen_refusal, running, r"^\C")
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert r"\C (any byte) can split a UTF-8 character" in (error.details() or "")
            for body in ("été", "école", "plain"):
                await running.adapter.inject(body)
                with trio.fail_after(10):
                    assert (await running.adapter.next_sent()).body == f"seen {body}"
        assert seen == ["été", "école", "plain"]


async def test_a_costly_pattern_is_refused_naming_the_limit_and_config_can_raise_it(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        error = await trio.to_thread.run_sync(listen_refusal, running, r"^ok$", r"\pL{300}")
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = error.details() or ""
        assert "too costly: its RE2 program has" in details, details
        assert "pL{300}" in details
        assert "grpc.max_pattern_program" in details
        error = await trio.to_thread.run_sync(listen_refusal, running, "x" * 5000)
        assert "5000 characters is over this bot's limit of 4096 (grpc.max_pattern_length)" in (error.details() or "")
    async with open_bot(config(tmp_path, ", max_pattern_program: 400000")) as running:
        cb = Callback(id="hostile", secret=HOSTILE, address=running.address)

        @cb.hear(r"^\pL{300}$")
        async def letters(message: Message) -> None:
            await message.send("300 letters")

        async with serving(cb):
            await running.adapter.inject("é" * 300)
            with trio.fail_after(10):
                assert (await running.adapter.next_sent()).body == "300 letters"


async def test_routes_per_stream_and_streams_per_callback_are_capped(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path, ", max_routes: 5, max_streams_per_callback: 2")) as running:
        error = await trio.to_thread.run_sync(listen_refusal, running, *[f"^r{i}$" for i in range(6)])
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == "6 routes on one Listen stream; this bot's limit is 5 (grpc.max_routes)"

        def replica() -> Callback:
            cb = Callback(id="hostile", secret=HOSTILE, address=running.address)

            @cb.hear("^x$")
            async def x(message: Message) -> None: ...

            return cb

        async with serving(replica(), replica()):
            error = await trio.to_thread.run_sync(listen_refusal, running, "^y$")
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.details() == (
                "callback 'hostile' already has 2 Listen streams open; this bot's limit is 2 "
                "(grpc.max_streams_per_callback)"
            )
        # Once they are gone, it may open streams again.
        with trio.fail_after(10):
            while running.bot.core.router.subscriptions("hostile"):
                await trio.sleep(0.01)
        async with serving(replica()):
            assert len(running.bot.core.router.subscriptions("hostile")) == 1


async def test_idle_connections_cannot_take_the_bot_down_and_the_log_says_so(tmp_path: Path) -> None:
    """Connections that never send a request are capped (grpc.max_connections): past the
    cap they are closed at once, the log says so, the bot and its connected callbacks go
    on, and a callback connects again once they are gone."""
    secret = "secret-late-0123456789abcdef"
    config = f"""
store: {{url: "sqlite:///{tmp_path / "oco.db"}"}}
grpc: {{listen: "127.0.0.1:0", max_connections: 20}}
adapters: [{{type: shell, user: alice}}]
callbacks:
  - id: example
    command: ["{sys.executable}", "-m", "oco_core.examples.ping"]
  - {{id: late, secret: {secret}}}
"""
    async with run_oco(config, tmp_path / "bot") as bot:
        await bot.expect(r"callback 'example' is listening", stream="stderr", timeout=60)
        host, _, port = bot.address.rpartition(":")
        idle = [await trio.open_tcp_stream(host, int(port)) for _ in range(40)]
        try:
            await bot.expect(
                r"WARNING oco_core\._edge: \d+ connections to the gRPC API on port \d+, limit 20 "
                r"\(grpc\.max_connections\)",
                stream="stderr",
                timeout=30,
            )
            await bot.write("oco ping")  # the callback connected before still answers
            await bot.expect("^PONG$")
        finally:
            for stream in idle:
                await stream.aclose()
        late = Callback(id="late", secret=secret, address=bot.address)

        @late.respond("^late$")
        async def answer(message: Message) -> None:
            await message.send("here now")

        with trio.fail_after(30):
            async with serving(late):
                await bot.write("oco late")
                await bot.expect("^here now$")
        assert await bot.stop() == 0
