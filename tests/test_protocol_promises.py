"""The protocol keeps the promises its documentation makes to a callback.

- SendMessages is all or nothing: one bad message anywhere in a request sends none of it.
- Shutdown ends open Listen streams with OK at once, and the bot exits promptly.
- A stream that falls behind learns how many events were dropped (``Event.dropped``),
  and the Python SDK says so in a WARNING.
- Ids have one form, ``<adapter instance name>/<native id>``: events carry it, errors
  name it.
- The SDK checks its patterns with RE2 when they are declared.
- The .proto files generate Go code without one ``M`` flag per file.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from oco_core import AdapterError, Callback, InvalidPatternError, Message, UnknownTargetError
from oco_core._adapter import AdapterType, ChatRoom, ChatUser, IncomingMessage, OutgoingMessage
from oco_core._plugins import Plugins, load_plugins
from oco_core._proto import core_pb2, robot_pb2, robot_pb2_grpc
from oco_core._router import Route, Router, Subscription
from oco_core.testing import Lines, MemoryAdapter, MemoryConfig, oco_cli, open_bot, run_oco, serving
from oco_core.testing.pytest_plugin import server_unavailable

SECRET = "secret-promises-0123456789abcdef"


def _auth(secret: str = SECRET) -> tuple[tuple[str, str | bytes], ...]:
    return (("authorization", f"Bearer {secret}"),)


def memory_config(tmp_path: Path, extra: str = "") -> str:
    return f"""
adapters: [{{type: memory}}]
store: {{url: "sqlite:///{tmp_path}/oco.db"}}
callbacks:
  - {{id: promises, secret: {SECRET}}}
{extra}"""


def send_request(*rooms: str) -> robot_pb2.SendMessagesRequest:
    return robot_pb2.SendMessagesRequest(
        messages=[
            core_pb2.Message(body=f"to {room}", source=core_pb2.Source(room=core_pb2.Room(id=room))) for room in rooms
        ]
    )


async def raw_send(address: str, request: robot_pb2.SendMessagesRequest) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """SendMessages with plain generated stubs: the status code, details and trailing metadata."""

    def work() -> tuple[grpc.StatusCode, str, dict[str, str]]:
        with grpc.insecure_channel(address) as channel:
            try:
                robot_pb2_grpc.RobotStub(channel).SendMessages(request, metadata=_auth(), timeout=10)
            except grpc.RpcError as exc:
                trailers: Any = exc.trailing_metadata()  # (key, value) pairs; the stubs say otherwise
                return exc.code(), exc.details() or "", dict(trailers or ())
        return grpc.StatusCode.OK, "", {}

    return await trio.to_thread.run_sync(work)


# -- SendMessages is all or nothing ---------------------------------------------------------


async def test_one_bad_room_after_a_good_one_posts_nothing(tmp_path: Path) -> None:
    async with open_bot(memory_config(tmp_path)) as running:
        code, details, metadata = await raw_send(running.address, send_request("memory/general", "elsewhere/general"))
        assert code == grpc.StatusCode.NOT_FOUND
        assert metadata["oco-error-type"] == "UnknownTargetError"
        assert "elsewhere/general" in details
        assert "message 1" in details
        # The first message was good, and still nothing went out.
        assert running.adapter.sent == []

        # The same through the SDK (SendMessageStream), one good request after it is sent whole.
        cb = Callback(id="promises", secret=SECRET, address=running.address)
        async with serving(cb):
            await cb.send("fine", room="memory/general")
            assert [m.body for m in running.adapter.sent] == ["fine"]


class FlakyAdapter(MemoryAdapter):
    """A memory adapter whose connection drops after ``allow`` messages."""

    allow = 2

    async def send(self, message: OutgoingMessage) -> str:
        if len(self.sent) >= self.allow:
            raise AdapterError("the connection dropped; the message was not sent")
        return await super().send(message)


async def test_a_send_that_fails_part_way_tells_the_sdk_how_many_went_out(tmp_path: Path) -> None:
    installed = load_plugins()
    flaky = AdapterType("flaky", FlakyAdapter, MemoryConfig, description="drops its connection")
    plugins = Plugins({**installed.adapters, "flaky": flaky}, installed.stores)
    config = memory_config(tmp_path).replace("[{type: memory}]", "[{type: flaky}]")
    async with open_bot(config, plugins=plugins) as running:
        cb = Callback(id="promises", secret=SECRET, address=running.address)
        async with serving(cb):
            messages = [
                core_pb2.Message(body=f"part {n}", source=core_pb2.Source(room=core_pb2.Room(id="flaky/general")))
                for n in range(4)
            ]
            with pytest.raises(AdapterError) as caught:
                await cb._send(messages, with_mention=False)
        assert caught.value.sent == 2  # a retry can skip these
        assert "message 2 to flaky/general" in str(caught.value)
        assert [m.body for m in running.adapters["flaky"].sent] == ["part 0", "part 1"]  # type: ignore[attr-defined]


# -- shutdown ends Listen streams with OK at once -------------------------------------------


def _hold_until_end(address: str, method: str, opened: Callable[[], None]) -> grpc.StatusCode:
    """Hold a Listen stream or a SendMessageStream with plain generated stubs until the bot
    ends it; its status. ``opened`` is called once the bot has accepted the stream."""
    done = threading.Event()

    def no_requests() -> Iterator[robot_pb2.SendMessagesRequest]:
        done.wait()  # a client with nothing to say yet: the stream stays open
        yield from ()

    with grpc.insecure_channel(address) as channel:
        robot = robot_pb2_grpc.RobotStub(channel)
        stream: Any
        if method == "Listen":
            routes = [robot_pb2.Route(id="p", pattern="^ping$", respond=True)]
            stream = robot.Listen(robot_pb2.ListenRequest(routes=routes), metadata=_auth())
        else:
            stream = robot.SendMessageStream(no_requests(), metadata=_auth())
        try:
            stream.initial_metadata()  # the bot accepted it (for Listen: the routes are live)
            opened()
            for _ in stream:
                pass
        except grpc.RpcError as exc:
            return exc.code()
        finally:
            done.set()
        return stream.code()  # type: ignore[no-any-return]


async def test_shutdown_ends_open_streams_with_ok_at_once(tmp_path: Path, bot_config: Callable[[str], str]) -> None:
    config = bot_config(f"callbacks: [{{id: promises, secret: {SECRET}}}]\n")
    async with run_oco(config, tmp_path / "bot") as bot:
        codes: dict[str, grpc.StatusCode] = {}
        ended: list[float] = []
        async with trio.open_nursery() as nursery:
            token = trio.lowlevel.current_trio_token()

            async def hold(method: str, opened: trio.Event) -> None:
                def tell() -> None:
                    trio.from_thread.run_sync(opened.set, trio_token=token)

                codes[method] = await trio.to_thread.run_sync(_hold_until_end, bot.address, method, tell)
                ended.append(time.monotonic())

            for method in ("Listen", "SendMessageStream"):
                opened = trio.Event()
                nursery.start_soon(hold, method, opened)
                with trio.fail_after(30):
                    await opened.wait()
            # And a callback of the Python SDK: a Listen stream and a SendMessageStream.
            sdk = Callback(id="promises", secret=SECRET, address=bot.address)

            @sdk.respond("^ping$")
            async def ping(message: Message) -> None:
                await message.reply("PONG")

            await nursery.start(sdk.serve)
            await bot.write("oco ping")
            await bot.expect("PONG")
            signalled = time.monotonic()
            code = await bot.stop(signal.SIGTERM, timeout=30)
            exited = time.monotonic() - signalled
            nursery.cancel_scope.cancel()  # the SDK would reconnect until the bot is back
        assert code == 0, bot.stderr_lines[-20:]
        assert codes == {"Listen": grpc.StatusCode.OK, "SendMessageStream": grpc.StatusCode.OK}
        # The default grace is 5 s: streams end long before it, and the process follows.
        assert max(ended) - signalled < 3.0, f"the streams ended {max(ended) - signalled:.1f} s after SIGTERM"
        assert exited < 3.0, f"the bot took {exited:.1f} s to exit with open Listen streams"


# -- a stream that falls behind learns how many events it missed ---------------------------


def test_the_next_event_after_drops_carries_their_count() -> None:
    router = Router("oco")
    slow = Subscription("slow", [Route("p", "ping")], queue_size=2)
    router.subscribe(slow)

    def route(body: str) -> None:
        router.match(core_pb2.Message(body=body), body, False, None)

    for n in range(5):  # two fit, three are dropped
        route(f"ping {n}")
    first = [slow.take_nowait().event() for _ in range(2)]
    assert [e.dropped for e in first] == [0, 0]
    route("ping 5")
    route("ping 6")
    later = [slow.take_nowait().event() for _ in range(2)]
    assert [(e.matched_message.message.body, e.dropped) for e in later] == [("ping 5", 3), ("ping 6", 0)]

    # A broadcast event is one object offered to every stream: the count is the stream's own.
    other = Subscription("other", [], events=frozenset({robot_pb2.EVENT_KIND_TOPIC}), queue_size=1)
    behind = Subscription("behind", [], events=frozenset({robot_pb2.EVENT_KIND_TOPIC}), queue_size=1)
    router.subscribe(other)
    router.subscribe(behind)
    topic = core_pb2.Event(topic_change=core_pb2.TopicChange(room=core_pb2.Room(id="memory/general")))
    router.broadcast(robot_pb2.EVENT_KIND_TOPIC, topic)
    router.broadcast(robot_pb2.EVENT_KIND_TOPIC, topic)  # both full: one dropped each
    other.take_nowait().event()
    router.broadcast(robot_pb2.EVENT_KIND_TOPIC, topic)
    assert other.take_nowait().event().dropped == 1
    assert behind.take_nowait().event().dropped == 0  # its second is still dropped, not yet reported
    assert topic.dropped == 0


async def test_a_callback_that_falls_behind_is_told_and_the_sdk_logs_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_bot(memory_config(tmp_path, "grpc: {stream_queue: 1}")) as running:
        cb = Callback(id="promises", secret=SECRET, address=running.address)
        seen: list[str] = []
        after = trio.Event()

        @cb.hear("^burst")
        async def burst(message: Message) -> None:
            seen.append(message.body)
            if message.body == "burst after":
                after.set()

        async with serving(cb):
            host = running.adapter.host
            assert host is not None
            alice, general = ChatUser("alice", "Alice", "alice"), ChatRoom("general", "general")
            with caplog.at_level(logging.WARNING, logger="oco_core._sdk"):
                # A burst, as an adapter reads it from its server in one go: the bot
                # routes it without pausing, and the stream's queue of one overflows.
                for n in range(10):
                    await host.receive(IncomingMessage(f"burst {n}", alice, general))
                with trio.fail_after(15):  # the stream takes what was queued: room again
                    while running.bot.router.queued():
                        await trio.sleep(0.01)
                await host.receive(IncomingMessage("burst after", alice, general))
                with trio.fail_after(15):
                    await after.wait()
        dropped = 11 - len(seen)
        assert dropped >= 1, seen
        warnings = [r.getMessage() for r in caplog.records if r.name == "oco_core._sdk"]
        assert any(f"dropped {dropped} event(s)" in w and "'promises'" in w for w in warnings), warnings


# -- the SDK checks patterns when they are declared -------------------------------------------


def test_the_sdk_refuses_an_invalid_pattern_where_it_is_declared() -> None:
    cb = Callback(id="promises", secret=SECRET, address="127.0.0.1:1")  # never connects

    @cb.respond(r"^ping$")
    async def ping(message: Message) -> None: ...

    with pytest.raises(InvalidPatternError, match=r"deploy \(\?=now\)") as caught:

        @cb.respond(r"deploy (?=now)")  # lookahead: Python's re has it, RE2 does not
        async def deploy(message: Message) -> None: ...

    assert caught.value.pattern == "deploy (?=now)"
    assert "in route 'deploy' of callback 'promises'" in (caught.value.__notes__ or [])
    with pytest.raises(InvalidPatternError, match="non-empty"):
        cb.hear("", id="empty")(ping)
    with pytest.raises(InvalidPatternError, match=r"missing \)"):
        cb.hear("(", ignore_case=True, id="open")(ping)
    assert [r.id for r in cb._routes] == ["ping"]


# -- ids have one form ------------------------------------------------------------------------


async def test_events_and_errors_name_ids_in_one_form(tmp_path: Path) -> None:
    async with open_bot(memory_config(tmp_path)) as running:
        cb = Callback(id="promises", secret=SECRET, address=running.address)
        got: list[Message] = []
        arrived = trio.Event()

        @cb.hear("^hello")
        async def hello(message: Message) -> None:
            got.append(message)
            arrived.set()

        async with serving(cb):
            await running.adapter.inject("hello", id="m1")
            with trio.fail_after(15):
                await arrived.wait()
            (message,) = got
            assert (message.user.id, message.room.id if message.room else None, message.id) == (
                "memory/alice",
                "memory/general",
                "memory/m1",
            )
            # What an event carries is what a request accepts.
            await cb.send("hi", room=message.room.id if message.room else "")
            await cb.send("psst", user=message.user.id)
            # And errors name what the request named, in the same form, whoever found the
            # fault: the bot (an unknown adapter) or the adapter (it knows its native ids only).
            for room, user in (("elsewhere/general", None), ("memory/nowhere", None), (None, "memory/zed")):
                with pytest.raises(UnknownTargetError) as caught:
                    await cb.send("x", room=room, user=user)
                ident = room or user
                assert f"{ident!r}" in str(caught.value) or f" {ident}:" in str(caught.value), str(caught.value)
            with pytest.raises(UnknownTargetError, match="'memory/zed'"):
                await cb.directory.get_user("memory/zed")

            def part() -> tuple[grpc.StatusCode, str]:
                with grpc.insecure_channel(running.address) as channel:
                    request = robot_pb2.PartRequest(room=core_pb2.Room(id="memory/absent"))
                    try:
                        robot_pb2_grpc.RobotStub(channel).Part(request, metadata=_auth(), timeout=10)
                    except grpc.RpcError as exc:
                        return exc.code(), exc.details() or ""
                return grpc.StatusCode.OK, ""

            code, details = await trio.to_thread.run_sync(part)
            assert code == grpc.StatusCode.NOT_FOUND
            assert "memory/absent" in details, details


# -- what a spec-only client needs is documented -----------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_the_reference_says_what_pattern_and_body_are_and_the_form_of_ids() -> None:
    reference = (ROOT / "docs" / "protocol.md").read_text()

    def row(message: str, field: str) -> str:
        section = reference.split(f'<a id="oco.{message}"></a>')[1].split("<a id=")[0]
        return next(line for line in section.splitlines() if line.startswith(f"| `{field}` |"))

    assert "text after the bot's address" in row("MatchedMessage", "pattern")
    assert "whole message" in row("Message", "body")
    assert "`<adapter instance name>/<native id>`" in reference
    guide = (ROOT / "docs" / "writing-a-callback.md").read_text()
    assert "`<adapter instance name>/<native id>`" in guide
    assert "`shell/alice`" in guide


# -- code generators need no flags per file -----------------------------------------------------


@pytest.fixture
def protos(tmp_path: Path) -> Path:
    """The .proto files as a callback author gets them: ``oco proto --out``."""
    out = tmp_path / "proto"
    result = oco_cli("proto", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return out


def _tools(*names: str) -> dict[str, str]:
    """The programs ``names`` on PATH, or skip (fail in CI) naming those missing."""
    found = {name: shutil.which(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        server_unavailable(
            "a code generator",
            f"{', '.join(missing)} not found (Debian: apt-get install protobuf-compiler golang-go protoc-gen-go "
            "golang-google-protobuf-dev)",
        )
    return {name: path for name, path in found.items() if path is not None}


def test_protocs_own_generators_put_the_code_in_a_namespace_of_its_own(protos: Path, tmp_path: Path) -> None:
    tools = _tools("protoc")  # grpcio-tools' protoc has only the Python generator
    outs = {lang: tmp_path / lang for lang in ("java", "csharp", "objc", "cpp")}
    for out in outs.values():
        out.mkdir()
    files = sorted(p.name for p in protos.glob("*.proto"))
    generate = subprocess.run(
        [tools["protoc"], f"-I{protos}", *[f"--{lang}_out={out}" for lang, out in outs.items()], *files],
        capture_output=True,
        text=True,
        check=False,
    )
    assert generate.returncode == 0, generate.stderr
    java = outs["java"] / "org" / "openchatops" / "oco"
    assert (java / "StorageProto.java").exists()
    assert (java / "MatchedMessage.java").exists()
    assert "namespace OpenChatOps.Oco" in (outs["csharp"] / "Core.cs").read_text()
    assert "@interface OCOMatchedMessage" in (outs["objc"] / "Core.pbobjc.h").read_text()


async def test_a_go_callback_generated_without_m_flags_builds_and_answers(protos: Path, tmp_path: Path) -> None:
    tools = _tools("go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc")
    # Debian packs Go modules for GOPATH builds (the module proxy is out of reach here), so
    # the generated package goes where its go_package says, under a GOPATH of our own.
    gopath = tmp_path / "gopath"
    package = gopath / "src" / "github.com" / "openchatops" / "oco" / "proto" / "oco"
    package.mkdir(parents=True)
    files = sorted(p.name for p in protos.glob("*.proto"))
    # What docs/writing-a-callback.md tells a Go programmer to run: no M flag.
    generate = await trio.run_process(
        [
            tools["protoc"],
            f"-I{protos}",
            f"--go_out={package}",
            "--go_opt=paths=source_relative",
            f"--go-grpc_out={package}",
            "--go-grpc_opt=paths=source_relative",
            *files,
        ],
        capture_stderr=True,
        check=False,
    )
    assert generate.returncode == 0, generate.stderr.decode()
    assert {p.name for p in package.glob("*.pb.go")} >= {"core.pb.go", "robot.pb.go", "robot_grpc.pb.go"}
    main = gopath / "src" / "example.com" / "deploy"
    main.mkdir(parents=True)
    (main / "main.go").write_text(GO_CALLBACK)
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{gopath}{os.pathsep}/usr/share/gocode",
        "GOFLAGS": "",
        "GOPROXY": "off",
        # Kept between runs: compiling grpc-go takes a minute on a small machine.
        "GOCACHE": str(Path(os.environ.get("OCO_TEST_CACHE") or Path.home() / ".cache" / "oco-tests") / "go-build"),
    }
    binary = tmp_path / "deploy"
    for command in (["vet", "."], ["build", "-o", str(binary), "."]):
        built = await trio.run_process(
            [tools["go"], *command], cwd=main, env=env, capture_stdout=True, capture_stderr=True, check=False
        )
        assert built.returncode == 0, f"go {' '.join(command)}: {built.stderr.decode()}"

    async with open_bot(memory_config(tmp_path)) as running:
        out, err = Lines("the Go callback's stdout"), Lines("the Go callback's stderr")
        process = await trio.lowlevel.open_process(
            [str(binary)],
            env={**os.environ, "OCO_ADDRESS": running.address, "OCO_SECRET": SECRET},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            async with trio.open_nursery() as nursery:
                assert process.stdout is not None
                assert process.stderr is not None
                nursery.start_soon(out.pump, process.stdout)
                nursery.start_soon(err.pump, process.stderr)
                try:
                    await out.wait_for("^listening$")
                    await running.adapter.inject("oco: deploy api")
                    with trio.fail_after(30):
                        reply = await running.adapter.next_sent()
                        code = await process.wait()
                except (AssertionError, trio.TooSlowError) as exc:
                    raise AssertionError(f"{exc!r}; the Go callback's stderr: {err.lines!r}") from None
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
    assert code == 0, err.lines
    assert out.lines[1] == "memory/alice deploy api (the body: oco: deploy api; dropped: 0)"
    assert (reply.body, reply.room_id, reply.mention) == ("deploying api", "general", True)


#: A callback in Go, with only the code generated from `oco proto --out`.
GO_CALLBACK = """\
package main

import (
	"context"
	"fmt"
	"os"

	oco "github.com/openchatops/oco/proto/oco"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

func main() {
	conn, err := grpc.Dial(os.Getenv("OCO_ADDRESS"), grpc.WithInsecure())
	if err != nil {
		panic(err)
	}
	defer conn.Close()
	ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+os.Getenv("OCO_SECRET"))
	robot := oco.NewRobotClient(conn)
	routes := []*oco.Route{{Id: "deploy", Pattern: `^deploy (\\w+)$`, Respond: true}}
	stream, err := robot.Listen(ctx, &oco.ListenRequest{Routes: routes})
	if err != nil {
		panic(err)
	}
	if _, err := stream.Header(); err != nil { // the headers: the routes are live
		panic(err)
	}
	fmt.Println("listening")
	event, err := stream.Recv()
	if err != nil {
		panic(err)
	}
	matched := event.GetMatchedMessage()
	message := matched.GetMessage()
	fmt.Printf("%s %s (the body: %s; dropped: %d)\\n", message.GetSource().GetUser().GetId(), matched.GetText(),
		message.GetBody(), event.GetDropped())
	reply := &oco.Message{Body: "deploying " + matched.GetGroups()[1], Source: message.GetSource(),
		InReplyTo: message.GetId()}
	request := &oco.SendMessagesRequest{WithMention: true, Messages: []*oco.Message{reply}}
	if _, err := robot.SendMessages(ctx, request); err != nil {
		panic(err)
	}
}
"""
