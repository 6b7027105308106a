"""The adapter against a real Synapse, with a person driven by matrix-nio: what is
particular to Matrix (encryption, pills, threads, edits, logins, rate limits).

The adapter reports to a RecordingHost whose ``on_message`` answers ``ping<rest>`` with
``PONG<rest>`` (conftest.answer_ping). What every adapter must do is checked by the
adapter contract in test_matrix_contract.py; the end to end test with a real ``oco``
process is in test_oco_run.py.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

import nio  # type: ignore[import-untyped]  # nio ships no type information
import pytest
import trio
from oco_adapter_matrix import MatrixAdapter, MatrixConfig

from oco_core import AdapterError, UnknownTargetError
from oco_core.plugin import Attachment, ChatUser, IncomingMessage, MembershipKind, OutgoingMessage

pytestmark = [pytest.mark.server("synapse"), pytest.mark.slow]


def unique_alias() -> str:
    """A room alias localpart no other test uses."""
    return f"ops-{uuid.uuid4().hex[:8]}"


def is_pong(suffix: str = "") -> Any:
    """A check for the bot's ``PONG<suffix>`` notice."""
    return lambda event: isinstance(event, nio.RoomMessageNotice) and event.body == f"PONG{suffix}"


async def test_ping_in_a_room(synapse: Any, person: Any, make_bot: Any) -> None:
    bot = make_bot()
    async with bot.running():
        room_id = await bot.room_with(person)
        assert bot.localpart in bot.host.own_names
        event_id = await person.say(room_id, f"{bot.localpart}: ping")
        reply = await person.wait_for_message(bot.user_id, room_id, is_pong())
        assert reply.source["content"]["msgtype"] == "m.notice"
        (message,) = [m for m in bot.host.messages if m.id == event_id]
        assert message.room is not None
        assert message.room.id == room_id
        assert message.user.id == person.user_id
        assert not message.direct
        # Topic changes and members reach the host.
        await person.call(lambda: person.nio.update_room_topic(room_id, "deploys go here"))
        await bot.host.next_topic(lambda room: room.topic == "deploys go here", what="the new topic")
        (invited,) = [e for e in bot.host.memberships if e.kind is MembershipKind.INVITED and e.user.id == bot.user_id]
        joined = [e.user.id for e in bot.host.memberships if e.kind is MembershipKind.JOINED]
        assert joined == [bot.user_id]
        assert invited.user.id == bot.user_id
        assert invited.actor is not None
        assert invited.actor.id == person.user_id
    assert not [m for m in bot.host.messages if m.user.id == bot.user_id], "own messages must be ignored"


async def test_ping_in_a_direct_chat_with_a_pill(synapse: Any, person: Any, make_bot: Any) -> None:
    bot = make_bot(display_name="Ops Bot")
    async with bot.running() as adapter:
        assert "Ops Bot" in bot.host.own_names
        room_id = await person.create_room(invite=[bot.user_id], direct=True)
        await person.wait_joined(room_id, bot.user_id)
        await person.say(room_id, "ping")
        await person.wait_for_message(bot.user_id, room_id, is_pong())
        assert bot.host.messages[-1].direct
        # A pill showing an old display name still addresses the bot.
        await person.say(
            room_id,
            "Old Name: ping pill",
            format="org.matrix.custom.html",
            formatted_body=f'<a href="https://matrix.to/#/{bot.user_id}">Old Name</a>: ping pill',
        )
        await person.wait_for_message(bot.user_id, room_id, is_pong(" pill"))
        assert bot.host.messages[-1].body == f"{bot.localpart}: ping pill"
        # Markdown becomes a formatted body; a mention is a pill.
        who = ChatUser(id=person.user_id, name=person.localpart)
        await adapter.send(OutgoingMessage("**done**", room_id=room_id, user=who, mention=True, format="markdown"))
        formatted = await person.wait_for_message(bot.user_id, room_id, lambda e: "done" in e.body)
        content = formatted.source["content"]
        assert content["body"] == f"{person.localpart}: **done**"
        assert content["formatted_body"].endswith(": <strong>done</strong>")
        assert f"https://matrix.to/#/{person.user_id}" in content["formatted_body"]
        assert content["m.mentions"] == {"user_ids": [person.user_id]}


async def test_encrypted_room(synapse: Any, person: Any, make_bot: Any) -> None:
    bot = make_bot()
    async with bot.running():
        room_id = await bot.room_with(person, encrypted=True)
        event_id = await person.say(room_id, f"{bot.localpart}: ping")
        reply = await person.wait_for_message(bot.user_id, room_id, is_pong())
        assert reply.decrypted, "the bot's answer in an encrypted room must be encrypted"
        assert [m.body for m in bot.host.messages if m.id == event_id] == [f"{bot.localpart}: ping"]
    # The keys persist: a restarted adapter (same device) still reads and answers there.
    async with bot.running():
        await person.say(room_id, f"{bot.localpart}: ping again")
        reply = await person.wait_for_message(bot.user_id, room_id, is_pong(" again"))
        assert reply.decrypted


async def test_access_token_instead_of_password(synapse: Any, person: Any, make_bot: Any) -> None:
    bot = make_bot()
    bot.options.pop("password")
    bot.options["access_token"] = bot.registration["access_token"]
    async with bot.running():
        room_id = await bot.room_with(person, encrypted=True)
        await person.say(room_id, f"{bot.localpart}: ping")
        reply = await person.wait_for_message(bot.user_id, room_id, is_pong())
        assert reply.decrypted
    # A configured token is the operator's: it is not copied into the store.
    assert await bot.host.memory.get("adapter:matrix", "access_token") is None


async def test_encryption_off_says_so(
    synapse: Any, person: Any, make_bot: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bot = make_bot(encryption=False)
    with caplog.at_level(logging.WARNING, logger="oco_adapter_matrix"):
        async with bot.running():
            room_id = await bot.room_with(person, encrypted=True)
            await person.say(room_id, f"{bot.localpart}: ping")
            await bot.host.wait_for(lambda: "encryption is off" in caplog.text, "the warning")
    assert room_id in caplog.text
    assert not bot.host.messages


async def test_restart_resumes_without_replaying(synapse: Any, person: Any, make_bot: Any) -> None:
    bot = make_bot()
    async with bot.running():
        room_id = await bot.room_with(person)
        await person.say(room_id, f"{bot.localpart}: ping 1")
        await person.wait_for_message(bot.user_id, room_id, is_pong(" 1"))
    device_item = await bot.host.memory.get("adapter:matrix", "device_id")
    token_item = await bot.host.memory.get("adapter:matrix", "access_token")
    assert device_item is not None
    assert token_item is not None
    device, token = device_item.value, token_item.value
    # Said while the bot is away: answered after the restart, once.
    await person.say(room_id, f"{bot.localpart}: ping 2")
    async with bot.running():
        await person.wait_for_message(bot.user_id, room_id, is_pong(" 2"))
        await person.say(room_id, f"{bot.localpart}: ping 3")
        await person.wait_for_message(bot.user_id, room_id, is_pong(" 3"))
    bodies = [m.body for m in bot.host.messages if m.room is not None and m.room.id == room_id]
    assert bodies == [f"{bot.localpart}: ping {n}" for n in (1, 2, 3)]
    pongs = [e.body for e in person.messages_from(bot.user_id, room_id)]
    assert pongs == ["PONG 1", "PONG 2", "PONG 3"]
    # Logged in once: the restart reused the token and so the device.
    token_after = await bot.host.memory.get("adapter:matrix", "access_token")
    device_after = await bot.host.memory.get("adapter:matrix", "device_id")
    assert token_after is not None
    assert device_after is not None
    assert token_after.value == token
    assert device_after.value == device


async def test_thread_reply_and_edit(synapse: Any, person: Any, make_bot: Any) -> None:
    bot = make_bot()
    async with bot.running():
        room_id = await bot.room_with(person)
        root = await person.say(room_id, "deploy notes")
        in_thread = await person.say(
            room_id, f"{bot.localpart}: ping thread", **{"m.relates_to": {"rel_type": "m.thread", "event_id": root}}
        )
        reply = await person.wait_for_message(bot.user_id, room_id, is_pong(" thread"))
        relation = reply.source["content"]["m.relates_to"]
        assert relation["rel_type"] == "m.thread"
        assert relation["event_id"] == root
        assert relation["m.in_reply_to"] == {"event_id": in_thread}
        (message,) = [m for m in bot.host.messages if m.id == in_thread]
        assert message.thread_id == root
        # An edit arrives as an edit of the original, never as a new command.
        edit = await person.say(
            room_id,
            f"* {bot.localpart}: ping edited",
            **{
                "m.new_content": {"msgtype": "m.text", "body": f"{bot.localpart}: ping edited"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": in_thread},
            },
        )
        edited = await bot.host.next_message(lambda m: m.id == edit, what="the edit")
        assert edited.edit_of == in_thread
        assert edited.body == f"{bot.localpart}: ping edited"
        # The edit does not repeat the thread (the original's stays): the adapter keeps
        # no memory of threads to fill it in.
        assert edited.thread_id == ""


async def test_rate_limited_sends_keep_order(
    synapse: Any, person: Any, make_bot: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bot = make_bot()
    # Two messages a second, no burst: most of six quick messages meet HTTP 429.
    synapse.override_ratelimit(bot.user_id, per_second=2, burst=1)
    with caplog.at_level(logging.INFO, logger="oco_adapter_matrix"):
        async with bot.running() as adapter:
            room_id = await bot.room_with(person)
            for n in range(6):
                await adapter.send(OutgoingMessage(f"burst {n}", room_id=room_id))
            await person.wait_for_message(bot.user_id, room_id, lambda e: e.body == "burst 5", timeout=60)
    assert "rate limited" in caplog.text
    bodies = [e.body for e in person.messages_from(bot.user_id, room_id)]
    assert bodies == [f"burst {n}" for n in range(6)]


async def test_join_part_and_a_private_message(synapse: Any, person: Any, make_bot: Any) -> None:
    bot = make_bot(autojoin_invites=False)
    alias = unique_alias()
    async with bot.running() as adapter:
        response = await person.call(
            lambda: person.nio.room_create(alias=alias, visibility=nio.RoomVisibility.public, name="Ops")
        )
        assert isinstance(response, nio.RoomCreateResponse), response
        await adapter.join(f"#{alias}:localhost")
        await person.wait_joined(response.room_id, bot.user_id)
        await adapter.part(f"#{alias}:localhost")
        await person.wait_until(lambda: bot.user_id not in person.nio.rooms[response.room_id].users)
        await bot.host.next_membership(
            lambda e: e.kind is MembershipKind.LEFT and e.user.id == bot.user_id, what="the bot leaving"
        )
        with pytest.raises(UnknownTargetError):
            await adapter.join("#no-such-room:localhost")
        with pytest.raises(UnknownTargetError):
            await adapter.send(OutgoingMessage("hello", room_id="general"))
        # A private message opens a direct chat; the person joins and reads it.
        who = ChatUser(id=person.user_id, name=person.localpart)
        await adapter.send(OutgoingMessage("psst", user=who, private=True))
        await person.wait_until(lambda: any(isinstance(e, nio.InviteMemberEvent) for _, e in person.events))
        (room_id,) = {room for room, e in person.events if isinstance(e, nio.InviteMemberEvent)}
        await person.call(lambda: person.nio.join(room_id))
        await person.wait_for_message(bot.user_id, room_id, lambda e: e.body == "psst")
        # The next one goes to the same direct chat.
        await adapter.send(OutgoingMessage("again", user=who, private=True))
        await person.wait_for_message(bot.user_id, room_id, lambda e: e.body == "again")


async def test_homeserver_down_at_start_is_waited_for(
    synapse: Any, make_bot: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bot = make_bot(reconnect={"initial_delay": 0.1, "max_delay": 0.5})
    caplog.set_level(logging.WARNING, logger="oco_adapter_matrix")
    await trio.to_thread.run_sync(synapse.stop)

    async def restart_after_some_retries() -> None:
        with trio.fail_after(30):
            while len([r for r in caplog.records if "cannot connect" in r.getMessage()]) < 3:
                await trio.sleep(0.02)
        await synapse.restart()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(restart_after_some_retries)
        # run() starts once the homeserver is back: no failure for the bot to restart.
        async with bot.running():
            assert bot.localpart in bot.host.own_names
    retries = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert all(f"homeserver {synapse.url}: connection refused" in line for line in retries), retries


async def test_an_event_that_cannot_be_handled_is_skipped_once(
    synapse: Any, person: Any, make_bot: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bot = make_bot()
    caplog.set_level(logging.WARNING, logger="oco_adapter_matrix")
    async with bot.running():
        room_id = await bot.room_with(person)
        # Fields that are not what the specification says are taken as absent.
        odd = await person.say(room_id, "ping odd", **{"m.relates_to": "oops"})
        await person.wait_for_message(bot.user_id, room_id, is_pong(" odd"))
        relation = {"rel_type": "m.replace", "event_id": odd}
        edit = await person.say(room_id, "* fixed", **{"m.new_content": "oops", "m.relates_to": relation})
        edited = await bot.host.next_message(lambda m: m.id == edit, what="the odd edit")
        assert (edited.edit_of, edited.body) == (odd, "fixed")
        unknown = await person.send_file(room_id, b"abc", "a.bin", "text/plain", info={"size": -1})
        message = await bot.host.next_message(lambda m: m.id == unknown, what="the file of size -1")
        assert message.attachments[0].size == 0
        # An event whose handling fails (here in the host) is skipped, saying which; the
        # sync loop goes on with the next.
        answer = bot.host.on_message
        assert answer is not None

        async def fails_on_boom(message: IncomingMessage) -> None:
            if message.body == "boom":
                raise RuntimeError("the router broke")
            await answer(message)

        bot.host.on_message = fails_on_boom
        boom = await person.say(room_id, "boom")
        await person.say(room_id, "ping after")
        await person.wait_for_message(bot.user_id, room_id, is_pong(" after"))
    skipped = [r for r in caplog.records if "skipped event" in r.getMessage()]
    assert [(r.levelname, r.getMessage()) for r in skipped] == [
        (
            "WARNING",
            f"matrix: skipped event {boom} in {room_id}, which could not be handled: RuntimeError: the router broke",
        )
    ]
    # Restarted, the bot does not meet it again: the sync token went past it.
    async with bot.running():
        await person.say(room_id, "ping again")
        await person.wait_for_message(bot.user_id, room_id, is_pong(" again"))
    assert [m.body for m in bot.host.messages].count("boom") == 1


async def test_the_outgoing_queue_is_bounded_and_frees_as_events_go_out(
    synapse: Any, person: Any, make_bot: Any
) -> None:
    bot = make_bot(queue_size=3, queue_bytes=4000)
    async with bot.running():
        room_id = await bot.room_with(person)
    # Not running, as through an outage: what is sent waits, up to queue_size events.
    adapter = MatrixAdapter(MatrixConfig.model_validate(bot.options))
    for n in (1, 2, 3):
        await adapter.send(OutgoingMessage(f"queued {n}", room_id=room_id))
    with pytest.raises(AdapterError, match=r"3 events waiting for the homeserver.*queue_size 3\)"):
        await adapter.send(OutgoingMessage("refused", room_id=room_id))
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.run, bot.host)
        await person.wait_for_message(bot.user_id, room_id, lambda e: e.body == "queued 3")
        await bot.host.wait_for(lambda: adapter._queued == 0, "the queue to empty")
        # Delivered, they no longer count: a file of most of queue_bytes fits now...
        big = Attachment("big.bin", data=b"x" * 3900)
        await adapter.send(OutgoingMessage("", room_id=room_id, attachments=(big,)))
        await person.wait_for_message(bot.user_id, room_id, lambda e: e.body == "big.bin")
        # ...but never one larger than queue_bytes.
        with pytest.raises(AdapterError, match=r"this message holds 4108; queue_bytes 4000\)"):
            await adapter.send(
                OutgoingMessage("", room_id=room_id, attachments=(Attachment("huge", data=b"x" * 4104),))
            )
        await adapter.send(OutgoingMessage("last", room_id=room_id))
        await person.wait_for_message(bot.user_id, room_id, lambda e: e.body == "last")
        nursery.cancel_scope.cancel()
    bodies = [e.body for e in person.messages_from(bot.user_id, room_id)]
    assert bodies == ["queued 1", "queued 2", "queued 3", "big.bin", "last"]


async def test_a_bot_no_longer_active_drops_what_it_queued(
    synapse: Any, person: Any, make_bot: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bot = make_bot(queue_size=3)
    caplog.set_level(logging.INFO, logger="oco_adapter_matrix")

    def dropped(what: str) -> int:
        found = (re.fullmatch(rf"matrix: dropped (\d+) {what}.*\(ha:\)", r.getMessage()) for r in caplog.records)
        return sum(int(m.group(1)) for m in found if m)

    async with bot.running() as adapter:
        room_id = await bot.room_with(person)
        asked = await person.say(room_id, "status")
        await bot.host.next_message(lambda m: m.id == asked, what="the person's message")
        # Another bot is the active one now (ha:): nothing this one queued goes out.
        bot.host.sending = False
        await adapter.send(OutgoingMessage("", room_id=room_id, typing_seconds=30))
        await adapter.send(OutgoingMessage("stale", room_id=room_id))
        await adapter.send(OutgoingMessage("", room_id=room_id, reaction="👀", in_reply_to=asked))
        await adapter.send(OutgoingMessage("", room_id=room_id, attachments=(Attachment("stale.bin", data=b"x"),)))
        await bot.host.wait_for(
            lambda: dropped("queued event") == 3 and dropped("typing indication") == 1, "the INFO lines of the drops"
        )
        # Active again: a new message goes out (the queue, queue_size 3, was emptied).
        bot.host.sending = True
        await adapter.send(OutgoingMessage("fresh", room_id=room_id))
        await person.wait_for_message(bot.user_id, room_id, lambda e: e.body == "fresh")
    assert [e.body for e in person.messages_from(bot.user_id, room_id)] == ["fresh"]
    assert person.reactions_from(bot.user_id, room_id) == []
    assert not [users for room, users in person.typing if room == room_id and bot.user_id in users]
