"""Rich replies in the Python SDK (issue 15), through a real bot with the memory adapter:
what ``reply`` and ``send`` return (a SentMessage with the bot's id, to edit and react
to), reactions to the incoming message, attachments by data and by url, replies staying
in the message's thread, ``message.typing()`` renewing and stopping, and reactions and
edits reaching ``@bot.on_reaction`` and ``@bot.on_edit`` (and only callbacks that
declared one; an edit is never a command). Against an adapter that renders none of it,
the plain-text fallbacks; against one that gives no ids (as IRC), edits become
corrections and reactions text."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

import oco_core._sdk
from oco_core import (
    Attachment,
    Callback,
    Message,
    Reaction,
    RequestTooLargeError,
    SentMessage,
)
from oco_core._adapter import AdapterType, OutgoingMessage
from oco_core._adapter import Attachment as ChatAttachment
from oco_core._plugins import Plugins, load_plugins
from oco_core._proto import robot_pb2
from oco_core.testing import MemoryAdapter, MemoryConfig, RunningBot, open_bot, serving

SECRET = "sdk-rich-secret-0123456789abcdef"
OTHER = "sdk-rich-other-0123456789abcdef"
NARROW = "sdk-rich-narrow-0123456789abcdef"


def config(tmp_path: Path, adapter: str = "{type: memory}") -> str:
    return f"""
adapters: [{adapter}]
store: {{url: "sqlite:///{tmp_path}/oco.db"}}
bot: {{name: oco, max_attachment_bytes: 1000}}
callbacks:
  - {{id: alpha, secret: {SECRET}}}
  - {{id: beta, secret: {OTHER}}}
  - {{id: narrow, secret: {NARROW}, capabilities: {{send: ["memory/alice"]}}}}
"""


class IdlessAdapter(MemoryAdapter):
    """A memory adapter whose service gives sent messages no ids, as IRC and the shell."""

    async def send(self, message: OutgoingMessage) -> str:
        await super().send(message)
        return ""


def with_idless() -> Plugins:
    installed = load_plugins()
    idless = AdapterType("idless", IdlessAdapter, MemoryConfig, description="a chat service without message ids")
    return Plugins({**installed.adapters, "idless": idless}, installed.stores)


async def sent(running: RunningBot, count: int) -> list[OutgoingMessage]:
    with trio.fail_after(10):
        return [await running.adapter.next_sent() for _ in range(count)]


async def sent_until(running: RunningBot, body: str) -> list[OutgoingMessage]:
    """What the bot sends, up to and with the first message whose body is ``body``."""
    out: list[OutgoingMessage] = []
    with trio.fail_after(10):
        while not out or out[-1].body != body:
            out.append(await running.adapter.next_sent())
    return out


async def nothing_more_sent(running: RunningBot, within: float = 0.5) -> None:
    with trio.move_on_after(within):
        extra = await running.adapter.next_sent()
        raise AssertionError(f"the bot sent more than expected: {extra}")


async def until(condition: Callable[[], bool]) -> None:
    """Wait for a handler to get as far as ``condition`` says (its replies reach the
    adapter before the handler has their ids)."""
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.01)


@asynccontextmanager
async def handling(
    running: RunningBot, handler: Callable[[Message], Awaitable[None]], pattern: str = r"^go$"
) -> AsyncIterator[Callback]:
    """Serve callback alpha, whose one respond route runs ``handler``."""
    cb = Callback(id="alpha", secret=SECRET, address=running.address)
    cb.respond(pattern, id="go")(handler)
    async with serving(cb):
        yield cb


async def test_a_reply_returns_its_id_and_edits_and_reactions_name_it(tmp_path: Path) -> None:
    results: list[SentMessage] = []

    async def go(message: Message) -> None:
        reply = await message.reply("deploying")
        results.append(reply)
        await reply.edit("deployed **api**", markdown=True)
        await reply.edit("deployed api, twice")  # each edit replaces the same message
        await reply.react("✅")
        results.append(await message.send("done"))

    async with open_bot(config(tmp_path)) as running, handling(running, go):
        await running.adapter.inject("oco go", id="$asked")
        out = await sent(running, 5)
        await until(lambda: len(results) == 2)
    reply, done = results
    assert (reply.id, done.id) == ("memory/m1", "memory/m5")
    assert (out[0].body, out[0].mention, out[0].in_reply_to, out[0].edit_of) == ("deploying", True, "$asked", "")
    assert (out[1].body, out[1].edit_of, out[1].format, out[1].room_id) == (
        "deployed **api**",
        "m1",
        "markdown",
        "general",
    )
    assert (out[2].body, out[2].edit_of, out[2].format) == ("deployed api, twice", "m1", "plain")
    assert (out[3].reaction, out[3].in_reply_to, out[3].body, out[3].mention) == ("✅", "m1", "", False)
    assert (out[4].body, out[4].mention) == ("done", False)


async def test_react_reacts_to_the_incoming_message_and_callback_send_returns_an_id(tmp_path: Path) -> None:
    async def go(message: Message) -> None:
        await message.react("👍")

    async with open_bot(config(tmp_path)) as running, handling(running, go) as cb:
        await running.adapter.inject("oco go", id="$asked")
        [reaction] = await sent(running, 1)
        direct = await cb.send("hello", user="memory/alice")
        [private] = await sent(running, 1)
        await direct.react("🎉")  # in the private chat, to the bot's own message
        [own] = await sent(running, 1)
    assert (reaction.reaction, reaction.in_reply_to, reaction.room_id, reaction.body) == ("👍", "$asked", "general", "")
    assert direct.id == "memory/m2"
    assert (private.room_id, private.user and private.user.id) == (None, "alice")
    assert (own.reaction, own.in_reply_to, own.room_id) == ("🎉", "m2", None)


async def test_replies_stay_in_the_thread_and_carry_attachments(tmp_path: Path) -> None:
    seen: list[Message] = []

    async def go(message: Message) -> None:
        seen.append(message)
        await message.reply(
            "the report",
            attachments=[
                Attachment("report.txt", data=b"all green\n", media_type="text/plain"),
                Attachment("runbook", url="https://wiki.example.org/runbook"),
            ],
        )

    screenshot = ChatAttachment(name="screen.png", media_type="image/png", url="mxc://example.org/abc", size=2048)
    async with open_bot(config(tmp_path)) as running, handling(running, go):
        await running.adapter.inject("oco go", id="$asked", thread_id="$root", attachments=[screenshot])
        [out] = await sent(running, 1)
    [message] = seen
    assert message.thread_id == "memory/$root"
    assert message.attachments == (
        Attachment("screen.png", url="mxc://example.org/abc", media_type="image/png", size=2048),
    )
    assert out.thread_id == "$root"
    assert out.attachments == (
        ChatAttachment(name="report.txt", media_type="text/plain", data=b"all green\n", size=10),
        ChatAttachment(name="runbook", url="https://wiki.example.org/runbook"),
    )


async def test_an_attachment_over_the_limit_is_refused_naming_the_setting(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        cb = Callback(id="alpha", secret=SECRET, address=running.address)
        async with serving(cb):
            with pytest.raises(RequestTooLargeError, match=r"2000 bytes.*at most 1000 \(bot\.max_attachment_bytes\)"):
                await cb.send("big", room="memory/general", attachments=[Attachment("big.bin", data=b"x" * 2000)])
            with pytest.raises(TypeError, match=r"oco_core\.Attachment"):
                await cb.send("x", room="memory/general", attachments=[b"bytes"])  # type: ignore[list-item]
            # Nothing of either went out; the next message does.
            ok = await cb.send("small", room="memory/general", attachments=[Attachment("a.bin", data=b"x" * 1000)])
            [out] = await sent(running, 1)
    assert (ok.id, out.body, out.attachments[0].size) == ("memory/m1", "small", 1000)


async def test_typing_renews_until_the_block_ends_and_raises_what_the_block_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(oco_core._sdk, "_TYPING_RENEW_MIN", 0.0)  # renewals every 0.5 s, not every 5
    caught: list[BaseException] = []

    async def go(message: Message) -> None:
        try:
            async with message.typing(seconds=1):
                await trio.sleep(0.2)
                raise LookupError("no such build")
        except LookupError as exc:
            caught.append(exc)
        async with message.typing(seconds=1):  # renewed every 0.5 s
            await trio.sleep(1.3)
        await message.reply("done")

    async with open_bot(config(tmp_path)) as running, handling(running, go):
        await running.adapter.inject("oco go")
        out = await sent_until(running, "done")
        typing = out[:-1]
        await nothing_more_sent(running, within=1.2)  # the renewing ended with the block
        # In a private chat there is no one to show it to: only the reply.
        await running.adapter.inject("oco go", room=None)
        [private] = await sent(running, 1)
        await nothing_more_sent(running, within=1.2)
    # One for the first block; for the second, one at its start and renewals.
    assert 3 <= len(typing) <= 5, typing
    assert all((t.typing_seconds, t.body, t.room_id) == (1, "", "general") for t in typing), typing
    assert (private.body, private.room_id) == ("done", None)
    assert [type(e) for e in caught] == [LookupError, LookupError]  # as raised, not in an exception group
    assert caught[0].__context__ is None  # its own context, not the group's


async def test_a_typing_indication_that_fails_is_logged_and_the_work_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(oco_core._sdk, "_TYPING_RENEW_MIN", 0.0)
    caplog.set_level(logging.WARNING, "oco_core._sdk")
    async with open_bot(config(tmp_path)) as running:
        cb = Callback(id="narrow", secret=NARROW, address=running.address)  # may only write to alice

        @cb.respond(r"^go$")
        async def go(message: Message) -> None:
            async with message.typing(seconds=1):
                await trio.sleep(0.7)
            await cb.send("done anyway", user=message.user.id)

        async with serving(cb):
            await running.adapter.inject("oco go")
            [out] = await sent(running, 1)
    assert (out.body, out.room_id) == ("done anyway", None)
    warnings = [r.getMessage() for r in caplog.records if "could not show the bot typing" in r.getMessage()]
    assert len(warnings) >= 2, caplog.text  # the first and a renewal
    assert "memory/general" in warnings[0]


async def test_a_short_typing_indication_is_renewed_no_more_often_than_every_five_seconds(tmp_path: Path) -> None:
    async def go(message: Message) -> None:
        async with message.typing(seconds=1):  # each renewal would spend one of the callback's sends
            await trio.sleep(1.5)
        await message.reply("done")

    async with open_bot(config(tmp_path)) as running, handling(running, go):
        await running.adapter.inject("oco go")
        out = await sent_until(running, "done")
    assert [m.typing_seconds for m in out] == [1, 0]


async def test_reactions_and_edits_reach_the_handlers_that_asked_and_an_edit_is_no_command(tmp_path: Path) -> None:
    reactions: list[Reaction] = []
    edits: list[Message] = []
    commands: list[str] = []
    heard_by_beta: list[str] = []
    more = trio.Event()

    def arrived() -> None:
        nonlocal more
        more.set()
        more = trio.Event()

    async with open_bot(config(tmp_path)) as running:
        alpha = Callback(id="alpha", secret=SECRET, address=running.address)
        beta = Callback(id="beta", secret=OTHER, address=running.address)  # declares neither

        @alpha.respond(r"^deploy (\w+)$")
        async def deploy(message: Message) -> None:
            commands.append(message.match(1))
            arrived()

        @alpha.on_reaction
        async def reacted(reaction: Reaction) -> None:
            reactions.append(reaction)
            arrived()

        @alpha.on_edit
        async def edited(message: Message) -> None:
            edits.append(message)
            arrived()

        @beta.hear(r"deploy (\w+)$")
        async def heard(message: Message) -> None:
            heard_by_beta.append(message.match(1))
            arrived()

        async with serving(alpha, beta):
            await running.adapter.react("👍", "$asked", user="bob")
            await running.adapter.react("🎉", "$private", user="carol", room=None)
            await running.adapter.inject("oco deploy web", id="$asked-v2", edit_of="$asked", thread_id="$root")
            await running.adapter.inject("oco deploy api")  # after the edit: routed as a command
            with trio.fail_after(10):
                while len(reactions) < 2 or not edits or not commands or not heard_by_beta:
                    await more.wait()
            subscriptions = {s.callback_id: s.events for s in running.bot.core.router.subscriptions()}
    # Each event has a handler task of its own: they may finish in either order.
    assert sorted(((r.key, r.message_id, r.user.id, r.room and r.room.id) for r in reactions), key=str) == sorted(
        [
            ("👍", "memory/$asked", "memory/bob", "memory/general"),
            ("🎉", "memory/$private", "memory/carol", None),
        ],
        key=str,
    )
    [edit] = edits
    assert (edit.body, edit.edit_of, edit.id, edit.thread_id) == (
        "oco deploy web",
        "memory/$asked",
        "memory/$asked-v2",
        "memory/$root",
    )
    assert edit.user.id == "memory/alice"
    assert commands == ["api"]  # the edit matched no route, alpha's or beta's
    assert heard_by_beta == ["api"]
    assert set(subscriptions["alpha"]) == {robot_pb2.EVENT_KIND_REACTION, robot_pb2.EVENT_KIND_EDIT}
    assert not subscriptions["beta"]  # it asked for nothing, so it is sent neither


async def test_an_adapter_without_rich_replies_gets_the_text_fallbacks(tmp_path: Path) -> None:
    async def go(message: Message) -> None:
        async with message.typing(seconds=1):
            pass
        reply = await message.reply("see", attachments=[Attachment("runbook", url="https://wiki.example.org/rb")])
        await reply.edit("see this")
        await message.react("👍")

    async with open_bot(config(tmp_path, "{type: memory, features: []}")) as running, handling(running, go):
        await running.adapter.inject("oco go", id="$asked", thread_id="$root")
        out = await sent(running, 3)
        await nothing_more_sent(running)  # no typing: the service cannot show it
    assert [(o.body, o.edit_of, o.reaction, o.attachments, o.thread_id, o.typing_seconds) for o in out] == [
        ("see\nrunbook: https://wiki.example.org/rb", "", "", (), "", 0),
        ("Correction: see this", "", "", (), "", 0),
        ("👍", "", "", (), "", 0),
    ]


async def test_without_ids_an_edit_is_a_correction_and_a_reaction_is_text(tmp_path: Path) -> None:
    replies: list[SentMessage] = []

    async def go(message: Message) -> None:
        reply = await message.reply("deploying")
        replies.append(reply)
        await reply.edit("deployed")
        await reply.react("✅")

    adapter = "{type: idless, name: memory, features: [edits, reactions]}"  # it could, but has no id to name
    async with open_bot(config(tmp_path, adapter), plugins=with_idless()) as running, handling(running, go):
        await running.adapter.inject("oco go", id="$asked")
        out = await sent(running, 3)
        await until(lambda: bool(replies))
    assert replies[0].id == ""
    assert [(o.body, o.edit_of, o.reaction, o.mention) for o in out] == [
        ("deploying", "", "", True),
        ("Correction: deployed", "", "", True),
        ("✅", "", "", False),
    ]
