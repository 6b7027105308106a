"""Rich replies on IRC (issue 15): the IRC adapter renders none of them itself (IRCv3's
``+draft/react`` and ``+typing`` client tags need ``message-tags``, which ngircd does not
offer), so the bot's plain-text fallbacks are what a person sees. Through a real ``oco
run`` on a real ngircd, a launched callback sends them with the generated stubs: a
reaction arrives as its key, an edit as "Correction: ...", an attachment by url as "name:
url" and one by data as its name and size, a threaded reply as ordinary text, a typing
indication not at all; and the ids of the sent messages are empty, since IRC has none."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from oco_core.testing import run_oco

pytestmark = pytest.mark.server("ngircd")

CALLBACK = """\
import os

import grpc
import trio

from oco_core import Callback, Message
from oco_core._proto import core_pb2, robot_pb2, robot_pb2_grpc

bot = Callback()


def send(*messages: core_pb2.Message) -> list[str]:
    # The generated stubs, as a callback in any language would call SendMessages.
    with grpc.insecure_channel(os.environ["OCO_ADDRESS"]) as channel:
        response = robot_pb2_grpc.RobotStub(channel).SendMessages(
            robot_pb2.SendMessagesRequest(messages=messages),
            metadata=(("authorization", "Bearer " + os.environ["OCO_SECRET"]),),
            timeout=30,
        )
    return list(response.message_ids)


@bot.respond(r"^rich$")
async def rich(message: Message) -> None:
    assert message.room is not None
    here = core_pb2.Source(room=core_pb2.Room(id=message.room.id))
    ids = await trio.to_thread.run_sync(
        lambda: send(
            core_pb2.Message(typing_seconds=10, source=here),
            core_pb2.Message(reaction="\N{THUMBS UP SIGN}", in_reply_to=message.id, source=here),
        )
    )
    # IRC gives no ids, so no edit can name the message: the SDK sends the correction.
    sent = await message.send("deploying build 7")
    await sent.edit("deploying build **8**", markdown=True)
    ids.append(sent.id)
    ids += await trio.to_thread.run_sync(
        lambda: send(
            core_pb2.Message(
                body="the logs:",
                source=here,
                attachments=[
                    core_pb2.Attachment(name="build.log", url="https://ci.example.org/build/8.log"),
                    core_pb2.Attachment(name="trace.txt", media_type="text/plain", data=b"x" * 2048),
                ],
            ),
            core_pb2.Message(body="in the thread", thread_id=message.id, source=here),
        )
    )
    await message.send("ids: " + ",".join(repr(i) for i in ids))


bot.run()
"""


async def test_rich_replies_reach_an_irc_person_as_plain_text(kit: Any, tmp_path: Path) -> None:
    script = tmp_path / "rich.py"
    script.write_text(CALLBACK)
    config = kit.oco_config(tmp_path, f'callbacks:\n  - id: rich\n    command: ["{sys.executable}", "{script}"]\n')
    async with kit.person("alice") as alice, run_oco(config, tmp_path / "bot"):
        await alice.expect(r":oco!\S+ JOIN :?#test", timeout=30)
        since, _ = await alice.ask_until("#test", "oco: rich", r":oco!\S+ PRIVMSG #test :\N{THUMBS UP SIGN}$")
        await alice.expect(r"PRIVMSG #test :ids: ", since=since)
        said = [m.group(1) for m in alice.find(r":oco!\S+ PRIVMSG #test :(.*)$", since=since)]
        said = said[said.index("\N{THUMBS UP SIGN}") :]
    assert said == [
        "\N{THUMBS UP SIGN}",  # the reaction: its key, as a message of its own
        "deploying build 7",
        "Correction: deploying build \x028\x02",  # the edit: Markdown still rendered
        "the logs:",
        "build.log: https://ci.example.org/build/8.log",
        "trace.txt (2.0 KiB, text/plain; files cannot be shown here)",
        "in the thread",  # the thread dropped: an ordinary line in the channel
        # Typing sends nothing; no message has an id on IRC.
        "ids: '','','','',''",
    ], said
    # Nothing but PRIVMSGs: no TAGMSG, no NOTICE stands in for the typing indication.
    assert not alice.find(r":oco!\S+ (TAGMSG|NOTICE) ", since=since)


async def test_ngircd_offers_no_message_tags_for_native_reactions_or_typing(kit: Any) -> None:
    # What the README says: were this to change, +draft/react and +typing could be rendered.
    async with kit.person("alice") as alice:
        since = alice.mark()
        await alice.send("CAP LS 302")
        offered = await alice.expect(r" CAP \S+ LS :?(.*)$", since=since)
    assert "message-tags" not in offered.group(1).split(), offered.group(0)
