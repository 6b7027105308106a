"""Rich replies on a real Synapse (issue 15), seen by a person on matrix-nio: the bot's
reactions, edits, threaded replies, files and typing notices, in plain and encrypted
rooms; and the person's reactions, edits and files as the adapter reports them."""

from __future__ import annotations

import os
import urllib.error
from typing import Any

import nio  # type: ignore[import-untyped]  # nio ships no type information
import pytest
import trio
from nio.crypto.attachments import decrypt_attachment  # type: ignore[import-untyped]

from oco_core import AdapterError, RequestTooLargeError, UnknownTargetError
from oco_core.plugin import Attachment, ChatUser, OutgoingMessage

pytestmark = [pytest.mark.server("synapse"), pytest.mark.slow]

# A 1x1 PNG: what the person's client would show as an image.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


def body_is(text: str) -> Any:
    return lambda event: getattr(event, "body", None) == text


async def sees_reaction(person: Any, bot: Any, room_id: str, key: str) -> Any:
    def found() -> list[Any]:
        return [r for r in person.reactions_from(bot.user_id, room_id) if r.key == key]

    await person.wait_until(lambda: bool(found()))
    (reaction,) = found()
    return reaction


async def test_the_bot_reacts_and_edits_its_own_message(synapse: Any, person: Any, make_bot: Any) -> None:
    bot = make_bot()
    async with bot.running() as adapter:
        room_id = await bot.room_with(person)
        asked = await person.say(room_id, "deploy api")
        await bot.host.next_message(lambda m: m.id == asked, what="the person's message")
        # A reaction to the person's message, by its event id; no id to take back.
        assert await adapter.send(OutgoingMessage("", room_id=room_id, reaction="👀", in_reply_to=asked))
        seen = await sees_reaction(person, bot, room_id, "👀")
        assert seen.reacts_to == asked
        # A message, then an edit naming it by the id send() gave before it was delivered.
        who = ChatUser(id=person.user_id, name=person.localpart)
        first = await adapter.send(
            OutgoingMessage("deploying *api*", room_id=room_id, user=who, mention=True, format="markdown")
        )
        assert first is not None
        assert first.startswith("~")
        await adapter.send(
            OutgoingMessage(
                "**deployed** api", room_id=room_id, user=who, mention=True, format="markdown", edit_of=first
            )
        )
        original = await person.wait_for_message(bot.user_id, room_id, lambda e: "deploying" in e.body)
        edit = await person.wait_for_message(bot.user_id, room_id, lambda e: "deployed" in e.body)
        content = edit.source["content"]
        assert content["m.relates_to"] == {"rel_type": "m.replace", "event_id": original.event_id}
        assert content["body"] == f"* {person.localpart}: **deployed** api"
        assert content["formatted_body"].startswith("* <a href=")
        new = content["m.new_content"]
        assert new["body"] == f"{person.localpart}: **deployed** api"
        assert new["formatted_body"].endswith(": <strong>deployed</strong> api")
        assert new["msgtype"] == "m.notice"
        # Mentioned already by the original: the edit does not notify them again.
        assert new["m.mentions"] == {"user_ids": [person.user_id]}
        assert content["m.mentions"] == {}
        # An edit of that edit (by the id send() gave it) replaces the original again.
        second = await adapter.send(OutgoingMessage("rolled back", room_id=room_id, edit_of=first))
        assert second is not None
        await adapter.send(OutgoingMessage("redeployed", room_id=room_id, edit_of=second))
        again = await person.wait_for_message(bot.user_id, room_id, body_is("* redeployed"))
        assert again.source["content"]["m.relates_to"]["event_id"] == original.event_id
        # A reaction to the bot's own message by the same id; then by its event id.
        await adapter.send(OutgoingMessage("", room_id=room_id, reaction="✅", in_reply_to=first))
        assert (await sees_reaction(person, bot, room_id, "✅")).reacts_to == original.event_id
        await adapter.send(OutgoingMessage("again", room_id=room_id, edit_of=original.event_id))
        await person.wait_for_message(bot.user_id, room_id, body_is("* again"))
        # Ids it never gave are refused at once, saying what they are not.
        with pytest.raises(UnknownTargetError, match="is not one of the last"):
            await adapter.send(OutgoingMessage("x", room_id=room_id, edit_of="~nothing"))
        with pytest.raises(UnknownTargetError, match="needs in_reply_to"):
            await adapter.send(OutgoingMessage("", room_id=room_id, reaction="👍"))
        with pytest.raises(AdapterError, match="must fit in one event"):
            await adapter.send(OutgoingMessage("long " * 2000, room_id=room_id, edit_of=first))


async def test_a_reply_in_a_thread_stays_in_it(synapse: Any, person: Any, make_bot: Any) -> None:
    bot = make_bot()
    async with bot.running() as adapter:
        room_id = await bot.room_with(person)
        root = await person.say(room_id, "release notes")
        asked = await person.say(
            room_id, "what changed?", **{"m.relates_to": {"rel_type": "m.thread", "event_id": root}}
        )
        message = await bot.host.next_message(lambda m: m.id == asked, what="the question in the thread")
        assert message.thread_id == root
        await adapter.send(
            OutgoingMessage("the parser", room_id=room_id, thread_id=message.thread_id, in_reply_to=message.id)
        )
        reply = await person.wait_for_message(bot.user_id, room_id, body_is("the parser"))
        assert reply.source["content"]["m.relates_to"] == {
            "rel_type": "m.thread",
            "event_id": root,
            "is_falling_back": True,
            "m.in_reply_to": {"event_id": asked},
        }
        # A thread rooted in the bot's own message, named by the id send() gave; without
        # in_reply_to, clients without threads show a reply to the root.
        own = await adapter.send(OutgoingMessage("deploy log", room_id=room_id))
        assert own is not None
        await adapter.send(OutgoingMessage("step 1", room_id=room_id, thread_id=own))
        own_event = await person.wait_for_message(bot.user_id, room_id, body_is("deploy log"))
        step = await person.wait_for_message(bot.user_id, room_id, body_is("step 1"))
        relation = step.source["content"]["m.relates_to"]
        assert (relation["event_id"], relation["m.in_reply_to"]) == (
            own_event.event_id,
            {"event_id": own_event.event_id},
        )
        # The person answering in that thread: its thread_id is the id the bot gave.
        await person.say(
            room_id, "thanks", **{"m.relates_to": {"rel_type": "m.thread", "event_id": own_event.event_id}}
        )
        thanks = await bot.host.next_message(lambda m: m.body == "thanks", what="the answer in the bot's thread")
        assert thanks.thread_id == own


async def test_files_are_uploaded_and_the_person_gets_the_same_bytes(synapse: Any, person: Any, make_bot: Any) -> None:
    bot = make_bot()
    data = os.urandom(5000)
    async with bot.running() as adapter:
        room_id = await bot.room_with(person)
        files = (
            Attachment(name="report.bin", media_type="application/octet-stream", data=data),
            Attachment(name="graph.png", data=PNG),  # its media type guessed from the name
            Attachment(name="runbook", url="https://wiki.example.org/runbook?a=1&b=2"),
        )
        await adapter.send(OutgoingMessage("here is the report", room_id=room_id, attachments=files))
        await person.wait_for_message(bot.user_id, room_id, lambda e: "runbook" in e.body)
        text, report, graph, link = person.messages_from(bot.user_id, room_id)
        assert text.body == "here is the report"
        assert isinstance(report, nio.RoomMessageFile)
        assert report.source["content"]["info"] == {"mimetype": "application/octet-stream", "size": 5000}
        assert (report.body, report.source["content"]["filename"]) == ("report.bin", "report.bin")
        assert await person.download(report.url) == data
        assert isinstance(graph, nio.RoomMessageImage)
        assert graph.source["content"]["info"]["mimetype"] == "image/png"
        assert await person.download(graph.url) == PNG
        assert link.body == "runbook: https://wiki.example.org/runbook?a=1&b=2"
        assert link.source["content"]["formatted_body"] == (
            '<a href="https://wiki.example.org/runbook?a=1&amp;b=2">runbook</a>'
        )
        # An mxc url is posted as it is, without a new upload, in a thread like any message.
        root = await person.say(room_id, "graphs")
        again = Attachment(name="same.png", media_type="image/png", url=graph.url, size=len(PNG))
        await adapter.send(OutgoingMessage("", room_id=room_id, attachments=(again,), thread_id=root))
        same = await person.wait_for_message(bot.user_id, room_id, body_is("same.png"))
        assert same.url == graph.url
        assert same.source["content"]["m.relates_to"]["event_id"] == root


async def test_encrypted_room_files_edits_and_reactions(synapse: Any, person: Any, make_bot: Any) -> None:
    bot = make_bot()
    data = os.urandom(3000)
    async with bot.running() as adapter:
        room_id = await bot.room_with(person, encrypted=True)
        first = await adapter.send(OutgoingMessage("building", room_id=room_id))
        assert first is not None
        await adapter.send(OutgoingMessage("built", room_id=room_id, edit_of=first))
        await adapter.send(OutgoingMessage("", room_id=room_id, attachments=(Attachment("build.txt", data=data),)))
        original = await person.wait_for_message(bot.user_id, room_id, body_is("building"))
        edit = await person.wait_for_message(bot.user_id, room_id, body_is("* built"))
        assert original.decrypted
        assert edit.decrypted
        assert edit.source["content"]["m.new_content"]["body"] == "built"
        assert edit.source["content"]["m.relates_to"] == {"rel_type": "m.replace", "event_id": original.event_id}
        # The file is encrypted before it is uploaded: the homeserver holds only ciphertext.
        log = await person.wait_for_message(bot.user_id, room_id, body_is("build.txt"))
        assert isinstance(log, nio.RoomEncryptedFile)
        assert "url" not in log.source["content"]
        assert log.source["content"]["info"] == {"mimetype": "text/plain", "size": 3000}
        blob = await person.download(log.url)
        assert blob != data
        assert decrypt_attachment(blob, log.key["k"], log.hashes["sha256"], log.iv) == data
        # Reactions go in clear, as the specification says they normally do.
        await adapter.send(OutgoingMessage("", room_id=room_id, reaction="🚀", in_reply_to=first))
        reaction = await sees_reaction(person, bot, room_id, "🚀")
        assert reaction.reacts_to == original.event_id
        assert not reaction.decrypted
        # The person's reaction, which nio encrypts, reaches the host decrypted.
        await person.react(room_id, original.event_id, "🎉")
        seen = await bot.host.next_reaction(lambda r: r.key == "🎉", what="the encrypted reaction")
        assert seen.message_id == first
        # The person's encrypted file: named, without a url (its blob is ciphertext); its
        # body, the file's name, is no text.
        notes = await person.send_file(room_id, b"secret notes", "notes.txt", "text/plain")
        message = await bot.host.next_message(lambda m: m.id == notes, what="the encrypted file")
        assert message.body == ""
        (attachment,) = message.attachments
        assert (attachment.name, attachment.media_type, attachment.size, attachment.url) == (
            "notes.txt",
            "text/plain",
            12,
            "",
        )


async def test_typing_shows_until_the_next_message(synapse: Any, person: Any, make_bot: Any) -> None:
    bot = make_bot()
    async with bot.running() as adapter:
        room_id = await bot.room_with(person)
        assert await adapter.send(OutgoingMessage("", room_id=room_id, typing_seconds=60)) is None
        await person.wait_until(lambda: (room_id, [bot.user_id]) in person.typing)
        started = trio.current_time()
        # Synapse would show it for the whole minute; the bot's next message there ends it.
        await adapter.send(OutgoingMessage("done", room_id=room_id))
        await person.wait_until(lambda: person.typing[-1] == (room_id, []), timeout=20)
        assert trio.current_time() - started < 20
        # A room it is not in is refused at once.
        with pytest.raises(UnknownTargetError):
            await adapter.send(OutgoingMessage("", room_id="!nowhere:localhost", typing_seconds=5))


async def test_the_persons_reactions_edits_and_files_reach_the_host(synapse: Any, person: Any, make_bot: Any) -> None:
    bot = make_bot()
    async with bot.running() as adapter:
        room_id = await bot.room_with(person)
        said = await person.say(room_id, "status?")
        await bot.host.next_message(lambda m: m.id == said, what="the question")
        reaction_id = await person.react(room_id, said, "👍")
        reaction = await bot.host.next_reaction(what="the person's reaction")
        assert (reaction.message_id, reaction.key, reaction.id) == (said, "👍", reaction_id)
        assert reaction.user.id == person.user_id
        assert reaction.room is not None
        assert reaction.room.id == room_id
        # A reaction to the bot's message names it by the id send() gave.
        sent = await adapter.send(OutgoingMessage("all green", room_id=room_id))
        shown = await person.wait_for_message(bot.user_id, room_id, body_is("all green"))
        await person.react(room_id, shown.event_id, "❤️")
        assert (await bot.host.next_reaction(what="the reaction to the bot")).message_id == sent
        # Its own reactions are not reported.
        await adapter.send(OutgoingMessage("", room_id=room_id, reaction="🆗", in_reply_to=said))
        await sees_reaction(person, bot, room_id, "🆗")
        # An edit: the new text, naming the original.
        edit = await person.edit(room_id, said, "status of the api?")
        edited = await bot.host.next_message(lambda m: m.id == edit, what="the edit")
        assert (edited.edit_of, edited.body, edited.attachments) == (said, "status of the api?", ())
        # A file, with a caption: its url works with the bot's token, and only with it.
        data = os.urandom(2000)
        await person.send_file(room_id, data, "shot.png", "image/png", filename="shot.png", body="the dashboard")
        message = await bot.host.next_message(lambda m: m.body == "the dashboard", what="the file")
        (attachment,) = message.attachments
        assert (attachment.name, attachment.media_type, attachment.size) == ("shot.png", "image/png", 2000)
        assert attachment.url.startswith(f"{synapse.url}/_matrix/client/v1/media/download/localhost/")
        assert await synapse.get(attachment.url, await bot.access_token()) == data
        with pytest.raises(urllib.error.HTTPError) as refused:
            await synapse.get(attachment.url, None)
        refused.value.close()  # it holds the connection open
        assert refused.value.code == 401
    assert [r.key for r in bot.host.reactions] == ["👍", "❤️"]


async def test_a_files_name_is_no_command_and_its_caption_is_text(synapse: Any, person: Any, make_bot: Any) -> None:
    bot = make_bot()
    async with bot.running():
        room_id = await bot.room_with(person)
        # As most clients send a file: its name as the body. That is no text (a name
        # like "ping-notes.pdf" would otherwise be routed as a command): the body is "".
        sent = await person.send_file(room_id, b"%PDF-", "ping-notes.pdf", "application/pdf")
        message = await bot.host.next_message(lambda m: m.id == sent, what="the file")
        assert message.body == ""
        assert [a.name for a in message.attachments] == ["ping-notes.pdf"]
        # The name as body and as filename: no caption either.
        named = await person.send_file(room_id, PNG, "ping.png", "image/png", filename="ping.png")
        assert (await bot.host.next_message(lambda m: m.id == named, what="the named file")).body == ""
        # A caption (Matrix 1.10: filename set, body different) is the message's text.
        captioned = await person.send_file(room_id, PNG, "ping.png", "image/png", filename="x.png", body="ping shot")
        message = await bot.host.next_message(lambda m: m.id == captioned, what="the captioned file")
        assert (message.body, message.attachments[0].name) == ("ping shot", "x.png")
        await person.wait_for_message(bot.user_id, room_id, body_is("PONG shot"))
    # Only the caption was answered (conftest.answer_ping answers any "ping" in a body).
    assert [e.body for e in person.messages_from(bot.user_id, room_id)] == ["PONG shot"]


async def test_a_persons_file_is_fetched_with_the_bots_token_and_no_other_url(
    synapse: Any, person: Any, make_bot: Any
) -> None:
    bot = make_bot()
    data = os.urandom(5000)
    async with bot.running() as adapter:
        room_id = await bot.room_with(person)
        sent = await person.send_file(room_id, data, "notes.pdf", "application/pdf")
        message = await bot.host.next_message(lambda m: m.id == sent, what="the file")
        (attachment,) = message.attachments
        assert (attachment.name, attachment.media_type, attachment.size) == ("notes.pdf", "application/pdf", 5000)
        # Fetched with the bot's token: the same bytes and the type the homeserver gives.
        assert await adapter.fetch_attachment(attachment.url, 5000) == (data, "application/pdf")
        with pytest.raises(RequestTooLargeError, match="larger than the 4999 bytes the bot may fetch"):
            await adapter.fetch_attachment(attachment.url, 4999)
        # A url of the same form naming no file here: said so.
        missing = attachment.url.rsplit("/", 1)[0] + "/NoSuchMedia"
        with pytest.raises(UnknownTargetError, match="has no file at"):
            await adapter.fetch_attachment(missing, 5000)
        # Any other url is refused before a request: the bot's token goes nowhere else.
        for foreign in (
            "https://evil.example/steal",
            f"{synapse.url}/_matrix/client/v3/account/whoami",
            attachment.url + "?allow_redirect=true",
            attachment.url.replace("/download/", "/thumbnail/"),
            attachment.url.replace(synapse.url, "http://localhost:1"),
        ):
            with pytest.raises(UnknownTargetError, match="fetches nothing else with the bot's access token"):
                await adapter.fetch_attachment(foreign, 5000)
