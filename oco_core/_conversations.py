"""Conversations: a callback asks a person a question (``Message.question`` on a message
it sends) and gets that person's next message in that room as the answer.

While a question is open, the person's next message in the room (or private chat) the
question went to is taken here before the bot's commands and the routes see it (unless
the question says ``routes_too``); everyone else, and that person elsewhere, is
unaffected. A wrong answer to a question with choices is asked again by the bot itself,
so a callback in any language gets it. The end of a question (answered, timed out,
cancelled) goes to every open stream of the asking callback as ``Event.answer``: the
replica that asked knows the id, the others ignore it.

Open questions live in this bot's memory. A bot that stops (SIGTERM) ends them first,
telling each person in chat that it no longer waits for their answer; the asking
handlers end with the callbacks' streams.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import trio

from ._adapter import ChatRoom, ChatUser, IncomingMessage, OutgoingMessage
from ._errors import AdapterError, InvalidRequestError
from ._proto import core_pb2
from ._router import Queued

if TYPE_CHECKING:
    from ._core import BotCore

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300
MAX_TIMEOUT = 86400
Status = core_pb2.QuestionAnswer.Status


@dataclass(eq=False)
class Open:
    """One question waiting for its answer."""

    callback_id: str
    question: core_pb2.Question
    #: (user id, room id or "" for the private chat) of the person asked.
    key: tuple[str, str]
    adapter: str
    #: Where the bot's own words go (a re-ask, a cancel at shutdown).
    incoming: IncomingMessage
    body: str
    done: trio.Event = field(default_factory=trio.Event)


class Conversations:
    """The open questions of one running bot."""

    def __init__(self, core: BotCore) -> None:
        self._core = core
        self._by_person: dict[tuple[str, str], Open] = {}
        self._by_id: dict[tuple[str, str], Open] = {}

    def open_count(self) -> int:
        return len(self._by_id)

    def check(self, message: core_pb2.Message, index: int) -> None:
        """Refuse a malformed question before anything of its request goes out."""
        question = message.question
        if not question.id:
            raise InvalidRequestError(f"message {index}: question.id is empty: give each question an id of your own")
        if not message.source.user.id:
            raise InvalidRequestError(
                f"message {index}: a question needs source.user (the person whose next message is the answer)"
            )
        if question.timeout_seconds > MAX_TIMEOUT:
            raise InvalidRequestError(
                f"message {index}: question.timeout_seconds {question.timeout_seconds} is over {MAX_TIMEOUT}: "
                "ask for less"
            )

    def ask(self, callback_id: str, message: core_pb2.Message) -> Open:
        """Open the question ``message`` carries (before it is sent, so that no quick
        answer is missed). A newer question to the same person in the same place
        replaces the older one, which is cancelled."""
        user = message.source.user
        room_id = message.source.room.id if message.source.room.id and not message.private else ""
        adapter, _, native_user = user.id.partition("/")
        key = (user.id, room_id)
        previous = self._by_person.get(key)
        if previous is not None:
            self._end(previous, Status.STATUS_CANCELLED)
        old = self._by_id.get((callback_id, message.question.id))
        if old is not None:
            self._end(old, Status.STATUS_CANCELLED)
        room = ChatRoom(room_id.partition("/")[2], message.source.room.name) if room_id else None
        incoming = IncomingMessage(
            body="", user=ChatUser(native_user, user.name, user.mention_name), room=room, direct=room is None
        )
        question = core_pb2.Question()
        question.CopyFrom(message.question)
        asked = Open(callback_id, question, key, adapter, incoming, message.body)
        self._by_person[key] = asked
        self._by_id[(callback_id, question.id)] = asked
        self._core.spawn(partial(self._expire, asked))
        return asked

    def withdraw(self, asked: Open) -> None:
        """The question's message could not be sent: forget it, silently."""
        if not asked.done.is_set():
            self._forget(asked)

    def cancel(self, callback_id: str, question_id: str) -> bool:
        """``CancelQuestion``: True when the question was open."""
        asked = self._by_id.get((callback_id, question_id))
        if asked is None:
            return False
        self._end(asked, Status.STATUS_CANCELLED)
        return True

    def take(self, adapter: str, incoming: IncomingMessage, message: core_pb2.Message) -> bool:
        """The incoming-path hook: hand ``message`` to the callback that asked its sender
        a question here, if one did. True when the routes and commands must not see it."""
        if not self._by_person:
            return False
        key = (message.source.user.id, message.source.room.id if not incoming.direct else "")
        asked = self._by_person.get(key)
        if asked is None:
            return False
        choices = asked.question.choices
        if choices and incoming.body.strip().lower() not in {c.strip().lower() for c in choices}:
            self._core.outgoing.reply(
                adapter, incoming, f"please answer one of: {', '.join(choices)} ({asked.body})", mention=True
            )
            return True
        self._end(asked, Status.STATUS_ANSWERED, message)
        return not asked.question.routes_too

    async def stop(self) -> None:
        """The bot is stopping: end every open question (STATUS_CANCELLED) and tell each
        person in chat, waiting for those lines to go out (the adapters stop next)."""
        async with trio.open_nursery() as nursery:
            for asked in list(self._by_id.values()):
                self._end(asked, Status.STATUS_CANCELLED)
                nursery.start_soon(self._tell_stopping, asked)

    async def _tell_stopping(self, asked: Open) -> None:
        link = self._core.links.get(asked.adapter)
        if link is None or not self._core.leader.acting():  # a standby took chat over (ha:)
            return
        room = asked.incoming.room
        out = OutgoingMessage(
            body=f"the bot is restarting: it no longer waits for your answer to \u201c{asked.body}\u201d",
            room_id=room.id if room else None,
            user=asked.incoming.user,
            mention=room is not None,
            private=room is None,
        )
        try:
            await link.adapter.send(out)
        except AdapterError as exc:
            log.warning("could not tell %s that their question ended: %s", asked.key[0], exc)

    async def _expire(self, asked: Open) -> None:
        with trio.move_on_after(asked.question.timeout_seconds or DEFAULT_TIMEOUT):
            await asked.done.wait()
            return
        if not asked.done.is_set():
            self._end(asked, Status.STATUS_TIMED_OUT)

    def _forget(self, asked: Open) -> None:
        if self._by_person.get(asked.key) is asked:
            del self._by_person[asked.key]
        if self._by_id.get((asked.callback_id, asked.question.id)) is asked:
            del self._by_id[(asked.callback_id, asked.question.id)]
        asked.done.set()

    def _end(
        self, asked: Open, status: core_pb2.QuestionAnswer.Status.ValueType, message: core_pb2.Message | None = None
    ) -> None:
        self._forget(asked)
        event = core_pb2.Event(
            answer=core_pb2.QuestionAnswer(question_id=asked.question.id, status=status, message=message)
        )
        size = event.ByteSize()
        subs = self._core.router.subscriptions(asked.callback_id)
        offered = [sub.offer(Queued(size, partial(_copy, event), "answer")) for sub in subs]
        if not any(offered):
            log.info(
                "question %r of callback %s ended (%s) with no stream of it to tell",
                asked.question.id,
                asked.callback_id,
                Status.Name(status),
            )


def _copy(event: core_pb2.Event) -> core_pb2.Event:
    copy = core_pb2.Event()
    copy.CopyFrom(event)
    return copy


__all__: Sequence[str] = ["Conversations", "Open"]
