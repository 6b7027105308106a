"""End to end: a real ``oco run`` process with the Matrix adapter and the bundled example
callback; a person on Synapse says ``oco: ping`` and gets ``PONG``, in a plain and in an
encrypted room. And rich replies from a callback that speaks the generated gRPC stubs:
a reaction, a message and its edit, a file and a typing notice going out, the person's
reaction and edit coming back with the ids the callback knows."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import nio  # type: ignore[import-untyped]  # nio ships no type information
import pytest
import trio

from oco_core._proto import core_pb2, robot_pb2, robot_pb2_grpc
from oco_core.testing import run_oco

pytestmark = [pytest.mark.server("synapse"), pytest.mark.slow]


def is_pong(event: Any) -> bool:
    """The bundled callback's answer, as the bot sends it (an ``m.notice``)."""
    return isinstance(event, nio.RoomMessageNotice) and event.body == "PONG"


async def test_oco_ping_over_matrix(synapse: Any, person: Any, make_bot: Any, tmp_path: Path) -> None:
    bot = make_bot()
    options = {key: value for key, value in bot.options.items() if key != "password"}
    # The password comes from the environment, as an operator's would.
    options["password"] = "${OCO_MATRIX_PASSWORD}"
    config = {
        "bot": {"name": "oco"},
        "adapters": [{"type": "matrix", **options}],
        "store": {"url": f"sqlite:///{tmp_path / 'oco.db'}"},
        "grpc": {"listen": "127.0.0.1:0"},
        "callbacks": [{"id": "example", "command": [sys.executable, "-m", "oco_core.examples.ping"]}],
    }
    async with run_oco(json.dumps(config), tmp_path / "bot", env={"OCO_MATRIX_PASSWORD": bot.password}) as oco:
        await oco.expect(r"callback 'example' is listening", stream="stderr", timeout=60)
        plain = await bot.room_with(person, in_process=False)
        await person.say(plain, "oco: ping")
        first = await person.wait_for_message(bot.user_id, plain, is_pong)
        # In a thread, the answer goes into the thread.
        root = await person.say(plain, "release notes")
        asked = await person.say(plain, "oco: ping", **{"m.relates_to": {"rel_type": "m.thread", "event_id": root}})
        threaded = await person.wait_for_message(bot.user_id, plain, lambda e: is_pong(e) and e is not first)
        assert threaded.source["content"]["m.relates_to"]["event_id"] == root
        assert threaded.source["content"]["m.relates_to"]["m.in_reply_to"] == {"event_id": asked}
        # An edit is not a new command: no third PONG.
        await person.say(
            plain,
            "* oco: ping",
            **{
                "m.new_content": {"msgtype": "m.text", "body": "oco: ping"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": asked},
            },
        )
        encrypted = await bot.room_with(person, encrypted=True, in_process=False)
        await person.say(encrypted, "oco: ping")
        reply = await person.wait_for_message(bot.user_id, encrypted, is_pong)
        assert reply.decrypted
        assert len([e for e in person.messages_from(bot.user_id, plain) if is_pong(e)]) == 2
    output = "\n".join(oco.stderr_lines + oco.stdout_lines)
    assert bot.password not in output, "the password leaked"
    assert "syt_" not in output, "an access token leaked"  # Synapse's tokens start so


SECRET = "matrix-rich-secret-0123456789abcdef"
AUTH = (("authorization", f"Bearer {SECRET}"),)


class Listener:
    """A callback's Listen stream through the generated stubs, in a thread: the events it read."""

    def __init__(self, address: str, request: robot_pb2.ListenRequest) -> None:
        self.address, self.request = address, request
        self.events: list[core_pb2.Event] = []
        self.opened = threading.Event()
        self._call: Any = None

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            self._call = robot_pb2_grpc.RobotStub(channel).Listen(self.request, metadata=AUTH)
            try:
                self._call.initial_metadata()
                self.opened.set()
                self.events.extend(self._call)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.CANCELLED:
                    raise

    def stop(self) -> None:
        if self._call is not None:
            self._call.cancel()

    async def next(self, kind: str, count: int = 1) -> core_pb2.Event:
        """The ``count``-th event of ``kind`` (``matched_message``, ``reaction``, ``edit``)."""
        with trio.fail_after(30):
            while len(found := [e for e in self.events if e.WhichOneof("type") == kind]) < count:
                await trio.sleep(0.05)
        return found[count - 1]


def send(address: str, *messages: core_pb2.Message) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        request = robot_pb2.SendMessagesRequest(messages=messages)
        return list(robot_pb2_grpc.RobotStub(channel).SendMessages(request, metadata=AUTH, timeout=30).message_ids)


async def test_rich_replies_through_oco_run(synapse: Any, person: Any, make_bot: Any, tmp_path: Path) -> None:
    bot = make_bot()
    config = {
        "bot": {"name": "oco"},
        "adapters": [{"type": "matrix", **bot.options}],
        "store": {"url": f"sqlite:///{tmp_path / 'oco.db'}"},
        "grpc": {"listen": "127.0.0.1:0"},
        "callbacks": [{"id": "rich", "secret": SECRET}],
    }
    log = os.urandom(4000)
    async with run_oco(json.dumps(config), tmp_path / "bot") as oco, trio.open_nursery() as nursery:
        room_id = await bot.room_with(person, in_process=False)
        request = robot_pb2.ListenRequest(
            routes=[robot_pb2.Route(id="deploy", pattern="^deploy (.+)", respond=True)],
            events=[robot_pb2.EVENT_KIND_REACTION, robot_pb2.EVENT_KIND_EDIT],
        )
        listener = Listener(oco.address, request)
        nursery.start_soon(lambda: trio.to_thread.run_sync(listener.run, abandon_on_cancel=True))
        await trio.to_thread.run_sync(listener.opened.wait, 30)
        asked = await person.say(room_id, "oco: deploy api")
        matched = (await listener.next("matched_message")).matched_message.message
        assert (matched.id, matched.source.room.id) == (f"matrix/{asked}", f"matrix/{room_id}")
        here = core_pb2.Source(room=matched.source.room)
        ids = await trio.to_thread.run_sync(
            lambda: send(
                oco.address,
                core_pb2.Message(reaction="👀", in_reply_to=matched.id, source=here),
                core_pb2.Message(body="deploying api", source=here),
                core_pb2.Message(typing_seconds=60, source=here),
            )
        )
        reaction_id, deploying_id, typing_id = ids
        assert reaction_id.startswith("matrix/~")
        assert deploying_id.startswith("matrix/~")
        assert typing_id == ""
        await person.wait_until(lambda: (room_id, [bot.user_id]) in person.typing)
        file = core_pb2.Attachment(name="deploy.log", media_type="text/plain", data=log)
        await trio.to_thread.run_sync(
            lambda: send(
                oco.address,
                core_pb2.Message(body="deployed api", edit_of=deploying_id, source=here),
                core_pb2.Message(attachments=[file], source=here),
            )
        )
        # What the person sees: the reaction on their message, the message and its edit,
        # the file (the same bytes), and the typing notice ended by the edit.
        await person.wait_until(lambda: any(r.key == "👀" for r in person.reactions_from(bot.user_id, room_id)))
        (reaction,) = person.reactions_from(bot.user_id, room_id)
        assert reaction.reacts_to == asked
        deploying = await person.wait_for_message(bot.user_id, room_id, lambda e: e.body == "deploying api")
        edit = await person.wait_for_message(bot.user_id, room_id, lambda e: e.body == "* deployed api")
        assert edit.source["content"]["m.relates_to"] == {"rel_type": "m.replace", "event_id": deploying.event_id}
        uploaded = await person.wait_for_message(bot.user_id, room_id, lambda e: e.body == "deploy.log")
        assert await person.download(uploaded.url) == log
        await person.wait_until(lambda: person.typing[-1] == (room_id, []))
        # What the callback hears: the person's reaction to the bot's message, named by
        # the id SendMessages gave; the person's edit of their command, not a new match.
        await person.react(room_id, deploying.event_id, "🎉")
        got = (await listener.next("reaction")).reaction
        assert (got.message_id, got.key, got.source.user.id) == (deploying_id, "🎉", f"matrix/{person.user_id}")
        await person.edit(room_id, asked, "oco: deploy web")
        edited = (await listener.next("edit")).edit
        assert edited.edit_of == f"matrix/{asked}"
        assert edited.body.endswith("deploy web")
        listener.stop()
        nursery.cancel_scope.cancel()
    assert len([e for e in listener.events if e.WhichOneof("type") == "matched_message"]) == 1
