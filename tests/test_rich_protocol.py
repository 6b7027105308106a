"""Rich replies as a client generated from our .proto sees them (issue 15): the ids of
sent messages, reactions, edits, attachments, threads and typing going out, each as the
adapter renders it or as plain text where it cannot; reactions and edits coming in as
events for the streams that asked; and the errors for requests the bot cannot send."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from oco_core import Callback, Message, RequestTooLargeError, UnknownTargetError
from oco_core._adapter import Attachment, OutgoingMessage
from oco_core._proto import core_pb2, robot_pb2, robot_pb2_grpc
from oco_core.testing import RunningBot, open_bot, serving

SECRET = "rich-protocol-secret-0123456789"
NARROW = "narrow-rich-secret-0123456789ab"
AUTH = (("authorization", f"Bearer {SECRET}"),)
ROOM = core_pb2.Source(room=core_pb2.Room(id="memory/general"))


def config(tmp_path: Path, features: str = "") -> str:
    memory = "{type: memory" + (f", features: {features}" if features else "") + "}"
    return f"""
adapters: [{memory}]
store: {{url: "sqlite:///{tmp_path}/oco.db"}}
grpc: {{listen: "127.0.0.1:0"}}
bot: {{name: oco, max_attachment_bytes: 1000}}
callbacks:
  - {{id: rich, secret: {SECRET}}}
  - {{id: narrow, secret: {NARROW}, capabilities: {{events: [membership]}}}}
"""


def _send(address: str, *messages: core_pb2.Message, secret: str = SECRET) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        robot = robot_pb2_grpc.RobotStub(channel)
        request = robot_pb2.SendMessagesRequest(messages=messages)
        response = robot.SendMessages(request, metadata=(("authorization", f"Bearer {secret}"),), timeout=30)
        return list(response.message_ids)


async def send(running: RunningBot, *messages: core_pb2.Message) -> list[str]:
    return await trio.to_thread.run_sync(lambda: _send(running.address, *messages))


async def refused(running: RunningBot, message: core_pb2.Message) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        await send(running, message)
    return caught.value


async def sent(running: RunningBot, count: int) -> list[OutgoingMessage]:
    with trio.fail_after(10):
        return [await running.adapter.next_sent() for _ in range(count)]


async def test_each_sent_message_gets_an_id_an_edit_and_a_reaction_can_name(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        ids = await send(running, core_pb2.Message(body="one", source=ROOM), core_pb2.Message(body="two", source=ROOM))
        assert ids == ["memory/m1", "memory/m2"]
        edit = core_pb2.Message(body="two, corrected", source=ROOM, edit_of=ids[1])
        react = core_pb2.Message(reaction="👍", source=ROOM, in_reply_to="memory/$incoming")
        threaded = core_pb2.Message(body="in the thread", source=ROOM, thread_id="memory/$root")
        assert await send(running, edit, react, threaded) == ["memory/m3", "memory/m4", "memory/m5"]
        out = await sent(running, 5)
    # The memory adapter renders every rich reply itself: it gets them as they are.
    assert (out[2].body, out[2].edit_of) == ("two, corrected", "m2")
    assert (out[3].body, out[3].reaction, out[3].in_reply_to) == ("", "👍", "$incoming")
    assert (out[4].body, out[4].thread_id) == ("in the thread", "$root")


async def test_a_stream_result_carries_the_ids_too(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:

        def stream() -> list[robot_pb2.SendResult]:
            with grpc.insecure_channel(running.address) as channel:
                robot = robot_pb2_grpc.RobotStub(channel)
                requests = [
                    robot_pb2.SendMessagesRequest(request_id=n, messages=[core_pb2.Message(body=f"{n}", source=ROOM)])
                    for n in (1, 2)
                ]
                return list(robot.SendMessageStream(iter(requests), metadata=AUTH, timeout=30))

        results = await trio.to_thread.run_sync(stream)
    assert [(r.request_id, r.code, list(r.message_ids)) for r in results] == [
        (1, 0, ["memory/m1"]),
        (2, 0, ["memory/m2"]),
    ]


async def test_attachments_go_to_an_adapter_that_takes_files_as_they_are(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        files = [
            core_pb2.Attachment(name="graph.png", media_type="image/png", data=b"\x89PNG...."),
            core_pb2.Attachment(name="runbook", url="https://wiki.example.org/runbook"),
        ]
        await send(running, core_pb2.Message(body="here", source=ROOM, attachments=files))
        [out] = await sent(running, 1)
    assert out.attachments == (
        Attachment(name="graph.png", media_type="image/png", data=b"\x89PNG....", size=8),
        Attachment(name="runbook", url="https://wiki.example.org/runbook"),
    )


async def test_an_adapter_without_rich_replies_gets_plain_text_and_no_typing(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path, features="[]")) as running:
        ids = await send(
            running,
            core_pb2.Message(typing_seconds=30, source=ROOM),
            core_pb2.Message(body="deployed", source=ROOM, thread_id="memory/$root"),
            core_pb2.Message(reaction="🚀", source=ROOM, in_reply_to="memory/$asked"),
        )
        ids += await send(
            running,
            core_pb2.Message(body="deployed to prod", source=ROOM, edit_of="memory/m1"),
            core_pb2.Message(
                body="the logs:",
                source=ROOM,
                attachments=[
                    core_pb2.Attachment(name="build.log", url="https://ci.example.org/build/7.log"),
                    core_pb2.Attachment(name="trace.txt", media_type="text/plain", data=b"x" * 600),
                ],
            ),
        )
        out = await sent(running, 4)
        with trio.move_on_after(0.3):
            extra = await running.adapter.next_sent()
            pytest.fail(f"the typing indication was sent as a message: {extra}")
    assert ids == ["", "memory/m1", "memory/m2", "memory/m3", "memory/m4"]  # typing: nothing sent, no id
    assert [(m.body, m.thread_id, m.reaction, m.edit_of, m.attachments) for m in out] == [
        ("deployed", "", "", "", ()),
        ("🚀", "", "", "", ()),
        ("Correction: deployed to prod", "", "", "", ()),
        (
            "the logs:\nbuild.log: https://ci.example.org/build/7.log\n"
            "trace.txt (600 bytes, text/plain; files cannot be shown here)",
            "",
            "",
            "",
            (),
        ),
    ]
    assert out[1].in_reply_to == "$asked"


@pytest.mark.parametrize(
    ("message", "code", "words"),
    [
        (core_pb2.Message(reaction="👍", source=ROOM), grpc.StatusCode.INVALID_ARGUMENT, "needs in_reply_to"),
        (
            core_pb2.Message(body="hi", typing_seconds=5, source=ROOM),
            grpc.StatusCode.INVALID_ARGUMENT,
            "carries nothing else",
        ),
        (core_pb2.Message(typing_seconds=500, source=ROOM), grpc.StatusCode.INVALID_ARGUMENT, "at most 120"),
        (
            core_pb2.Message(body="x", source=ROOM, edit_of="elsewhere/m1"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not the id of a message sent through memory",
        ),
        (
            core_pb2.Message(body="x", source=ROOM, attachments=[core_pb2.Attachment(name="empty")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "neither data nor url",
        ),
        (
            core_pb2.Message(body="x", source=ROOM, attachments=[core_pb2.Attachment(name="f", url="file:///etc")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not an http(s) url",
        ),
        (
            core_pb2.Message(body="x", source=ROOM, attachments=[core_pb2.Attachment(name="big", data=b"x" * 1001)]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "bot.max_attachment_bytes",
        ),
        (
            core_pb2.Message(body="x", source=ROOM, edit_of="memory/m99"),
            grpc.StatusCode.NOT_FOUND,
            "is not one of this callback's messages that the bot remembers",
        ),
        (
            core_pb2.Message(reaction="👍", body="and a word", source=ROOM, in_reply_to="memory/$1"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "a reaction carries no body",
        ),
        (
            core_pb2.Message(
                body="x",
                source=ROOM,
                attachments=[core_pb2.Attachment(name=f"{n}", url="https://x/") for n in range(11)],
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "bot.max_attachments",
        ),
        (
            core_pb2.Message(
                body="x", source=ROOM, attachments=[core_pb2.Attachment(name="n" * 256, url="https://x/")]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "longer than 255 characters",
        ),
    ],
    ids=[
        "reaction-alone",
        "typing-with-body",
        "typing-too-long",
        "edit-elsewhere",
        "empty-file",
        "file-url",
        "big",
        "edit-unknown",
        "reaction-body",
        "many-files",
        "long-name",
    ],
)
async def test_a_rich_reply_the_bot_cannot_send_is_refused_saying_why(
    tmp_path: Path, message: core_pb2.Message, code: grpc.StatusCode, words: str
) -> None:
    async with open_bot(config(tmp_path)) as running:
        error: Any = await refused(running, message)
        assert error.code() == code, error.details()
        assert words in error.details()
        # Nothing went out, and the bot goes on.
        assert await send(running, core_pb2.Message(body="still here", source=ROOM)) == ["memory/m1"]


class _Listener:
    """A generated client's Listen stream in a thread: the events it reads."""

    def __init__(self, address: str, request: robot_pb2.ListenRequest, secret: str = SECRET) -> None:
        self.events: list[core_pb2.Event] = []
        self.opened = threading.Event()
        self.error: grpc.RpcError | None = None
        self._address, self._request, self._secret = address, request, secret
        self._call: Any = None

    def run(self) -> None:
        with grpc.insecure_channel(self._address) as channel:
            robot = robot_pb2_grpc.RobotStub(channel)
            self._call = robot.Listen(self._request, metadata=(("authorization", f"Bearer {self._secret}"),))
            try:
                self._call.initial_metadata()
                self.opened.set()
                for event in self._call:
                    self.events.append(event)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    self.error = exc
                self.opened.set()

    def stop(self) -> None:
        if self._call is not None:
            self._call.cancel()


async def _listening(nursery: trio.Nursery, running: RunningBot, request: robot_pb2.ListenRequest) -> _Listener:
    listener = _Listener(running.address, request)
    nursery.start_soon(lambda: trio.to_thread.run_sync(listener.run, abandon_on_cancel=True))
    with trio.fail_after(10):
        while not listener.opened.is_set():
            await trio.sleep(0.01)
    return listener


async def _until(condition: Any, what: str) -> None:
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.01)


async def test_reactions_and_edits_reach_the_streams_that_asked_and_an_edit_is_no_command(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running, trio.open_nursery() as nursery:
        routes = [robot_pb2.Route(id="deploy", pattern="^deploy (.+)")]
        asked = await _listening(
            nursery,
            running,
            robot_pb2.ListenRequest(routes=routes, events=[robot_pb2.EVENT_KIND_REACTION, robot_pb2.EVENT_KIND_EDIT]),
        )
        await running.adapter.inject("deploy api", id="$1", thread_id="$root")
        await _until(lambda: len(asked.events) == 1, "the match")
        # Edited into another command: an event, not a second match.
        await running.adapter.inject("deploy web", id="$2", edit_of="$1")
        await running.adapter.react("👀", "$1", user="bob")
        await _until(lambda: len(asked.events) == 3, "the edit and the reaction")
        asked.stop()
        nursery.cancel_scope.cancel()
    match, edit, reaction = asked.events
    assert match.matched_message.message.thread_id == "memory/$root"
    assert edit.WhichOneof("type") == "edit"
    assert (edit.edit.body, edit.edit.edit_of, edit.edit.source.user.id) == (
        "deploy web",
        "memory/$1",
        "memory/alice",
    )
    assert reaction.WhichOneof("type") == "reaction"
    assert (reaction.reaction.key, reaction.reaction.message_id) == ("👀", "memory/$1")
    assert (reaction.reaction.source.user.id, reaction.reaction.source.room.id) == ("memory/bob", "memory/general")


async def test_a_stream_that_did_not_ask_gets_no_reactions_or_edits(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running, trio.open_nursery() as nursery:
        request = robot_pb2.ListenRequest(routes=[robot_pb2.Route(id="any", pattern=".")])
        plain = await _listening(nursery, running, request)
        await running.adapter.inject("first", id="$1")
        await running.adapter.inject("first, edited", id="$2", edit_of="$1")
        await running.adapter.react("👍", "$1")
        await running.adapter.inject("second", id="$3")
        await _until(lambda: len(plain.events) == 2, "the two messages")
        await trio.sleep(0.2)
        plain.stop()
        nursery.cancel_scope.cancel()
    assert [e.matched_message.message.body for e in plain.events] == ["first", "second"]


async def test_a_callback_without_the_capability_cannot_ask_for_edits(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        listener = _Listener(
            running.address, robot_pb2.ListenRequest(events=[robot_pb2.EVENT_KIND_EDIT]), secret=NARROW
        )
        await trio.to_thread.run_sync(listener.run)
    assert listener.error is not None
    assert listener.error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "edit" in (listener.error.details() or "")


async def test_incoming_attachments_reach_the_callback_with_their_url(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running, trio.open_nursery() as nursery:
        request = robot_pb2.ListenRequest(routes=[robot_pb2.Route(id="any", pattern="screenshot")])
        listener = await _listening(nursery, running, request)
        shot = Attachment(name="shot.png", media_type="image/png", url="https://chat.example.org/m/1", size=2048)
        await running.adapter.inject("screenshot", attachments=[shot])
        await _until(lambda: listener.events, "the match")
        listener.stop()
        nursery.cancel_scope.cancel()
    [attachment] = listener.events[0].matched_message.message.attachments
    assert (attachment.name, attachment.media_type, attachment.url, attachment.size, attachment.data) == (
        "shot.png",
        "image/png",
        "https://chat.example.org/m/1",
        2048,
        b"",
    )


async def test_a_callback_edits_only_its_own_messages_where_they_went(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        [mine] = await send(running, core_pb2.Message(body="deploying", source=ROOM))
        theirs = await trio.to_thread.run_sync(
            lambda: _send(running.address, core_pb2.Message(body="their words", source=ROOM), secret=NARROW)
        )
        # Another callback's message (or the bot's own, which no callback sent) is unknown.
        error: Any = await refused(running, core_pb2.Message(body="forged", source=ROOM, edit_of=theirs[0]))
        assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
        # One's own, moved to another place, is refused too.
        bob = core_pb2.Source(user=core_pb2.User(id="memory/bob"))
        error = await refused(running, core_pb2.Message(body="moved", source=bob, private=True, edit_of=mine))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "went to memory/general" in error.details()
        # One's own, where it went: yes, and the edit can be edited again.
        [edited] = await send(running, core_pb2.Message(body="deployed", source=ROOM, edit_of=mine))
        await send(running, core_pb2.Message(body="deployed, at last", source=ROOM, edit_of=edited))
        out = await sent(running, 4)
    assert [(m.body, m.edit_of) for m in out] == [
        ("deploying", ""),
        ("their words", ""),
        ("deployed", "m1"),
        ("deployed, at last", "m3"),
    ]


async def test_the_files_of_a_request_together_stay_under_the_limit(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        half = core_pb2.Attachment(name="half", data=b"x" * 600)  # the limit is 1,000 bytes
        error: Any = await refused(running, core_pb2.Message(body="two", source=ROOM, attachments=[half, half]))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1200 bytes together" in error.details()


async def test_files_written_out_as_text_count_against_the_message_size(tmp_path: Path) -> None:
    small = config(tmp_path, features="[]").replace("max_attachment_bytes: 1000", "max_message_bytes: 300")
    async with open_bot(small) as running:
        links = [core_pb2.Attachment(name=f"file{n}", url="https://x.example/" + "y" * 60) for n in range(5)]
        error: Any = await refused(running, core_pb2.Message(body="files", source=ROOM, attachments=links))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "bot.max_message_bytes" in error.details()


async def test_file_lines_in_a_markdown_body_keep_their_names_as_written(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path, features="[]")) as running:
        init = core_pb2.Attachment(name="__init__.py", url="https://x.example/a*b_c")
        markdown = core_pb2.Message(
            body="**the file**", source=ROOM, format=core_pb2.FORMAT_MARKDOWN, attachments=[init]
        )
        await send(running, markdown, core_pb2.Message(body="plain", source=ROOM, attachments=[init]))
        first, second = await sent(running, 2)
    assert first.body == "**the file**\n\\_\\_init\\_\\_\\.py: https://x\\.example/a\\*b\\_c"
    assert second.body == "plain\n__init__.py: https://x.example/a*b_c"


async def test_a_reaction_is_not_counted_as_a_reply(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        core = running.bot.core
        await running.adapter.inject("deploy", id="$1")
        await send(running, core_pb2.Message(reaction="👀", source=ROOM, in_reply_to="memory/$1"))
        assert core.activity.reading().of("rich") == (0, 0)
        await send(running, core_pb2.Message(body="done", source=ROOM, in_reply_to="memory/$1"))
        assert core.activity.reading().of("rich") == (0, 1)


async def test_a_callback_fetches_a_file_a_person_sent_and_no_other_url(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        cb = Callback(id="rich", secret=SECRET, address=running.address)
        got: list[Message] = []

        @cb.hear("screenshot")
        async def shot(message: Message) -> None:
            got.append(message)

        async with serving(cb):
            png = b"\x89PNG" + bytes(range(256)) * 2
            url = "https://chat.example.org/_matrix/media/shot"
            await running.adapter.inject(
                "screenshot", attachments=[Attachment(name="s.png", media_type="image/png", url=url, data=png)]
            )
            with trio.fail_after(10):
                while not got:
                    await trio.sleep(0.01)
            [attachment] = got[0].attachments
            assert attachment.url == url
            assert await cb.fetch_attachment(attachment) == png
            # A url the bot did not deliver is never fetched.
            with pytest.raises(UnknownTargetError, match=r"bot\.fetchable_files"):
                await cb.fetch_attachment("https://evil.example/steal")
            # Past bot.max_attachment_bytes (1,000 here), refused.
            big = "https://chat.example.org/_matrix/media/big"
            await running.adapter.inject("screenshot", attachments=[Attachment(name="big", url=big, data=b"x" * 1001)])
            with trio.fail_after(10):
                while len(got) < 2:
                    await trio.sleep(0.01)
            with pytest.raises(RequestTooLargeError):
                await cb.fetch_attachment(big)
