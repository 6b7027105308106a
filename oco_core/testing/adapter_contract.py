"""The adapter contract: one test suite that every chat adapter must pass against its
real chat server.

An adapter's tests subclass :class:`AdapterContract` and provide a ``live_chat`` fixture
that yields a :class:`LiveChat`: the adapter, already running (``nursery.start(adapter.run,
host)`` returned) with a :class:`~oco_core.testing.RecordingHost` and connected to a real
server, and a *person* on that server — a driver the adapter's test kit writes for its
service, implementing :class:`ChatPerson` — who shares a room with the bot::

    from oco_core.testing import RecordingHost
    from oco_core.testing.adapter_contract import AdapterContract, LiveChat

    class TestMyAdapterContract(AdapterContract):
        @pytest.fixture
        async def live_chat(self, my_server, nursery):
            host = RecordingHost("mychat")
            adapter = MyAdapter(MyConfig(server=my_server.url, ...))
            await nursery.start(adapter.run, host)
            person = await MyPerson.connect(my_server, room="#test")  # your driver
            yield LiveChat(adapter, host, person)

Run it with pytest-trio in ``trio_mode``. Each test gets a fresh ``live_chat``. A check
that the service cannot support is skipped only when the person's matching
``supports_*`` flag is False, and the flag's docstring in the driver must say why.

What is checked: a room message reaches the host with the person's id, the room's id and
the body, ids that ``user_id`` and ``room_id`` leave unchanged; the bot's message
reaches the room; a mention names the person; a message addressing the bot by its own
name arrives intact; private messages both ways (``private`` wins over a room); a long
message is split within the service's limit with nothing lost and order kept; several
lines arrive in order; the person leaving and joining is reported; and messages sent
while the server is away arrive, in order, once it is back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import pytest
import trio

from .._adapter import Adapter, IncomingMessage, MembershipEvent, MembershipKind, OutgoingMessage
from ._host import RecordingHost

__all__ = ["AdapterContract", "ChatPerson", "LiveChat", "SeenByPerson", "SeenMessage"]


@dataclass(frozen=True, slots=True)
class SeenMessage:
    """A message from the bot, as the person saw it on the service."""

    body: str
    #: The room it was said in (the adapter's id for it); None for a private message.
    room: str | None
    #: The user ids (as the adapter reports them) that the service considers mentioned
    #: by this message: a Matrix ``m.mentions`` list, the ``nick:`` that starts an IRC
    #: line. Empty where the message mentions nobody.
    mentions: frozenset[str] = frozenset()
    #: The message's size as the service limits it (a whole IRC line in bytes with the
    #: prefix the server adds; a Matrix event's JSON), compared to
    #: :attr:`ChatPerson.max_message_bytes`.
    size: int = 0


class ChatPerson(Protocol):
    """A person on the chat server, driven by the adapter's test kit.

    Implement it for your service with a real, independent client (a raw socket, the
    service's own SDK), not with the adapter under test. Subclass it explicitly to
    inherit the ``supports_*`` defaults; set a flag to False only when the service
    cannot do the thing, and say why in the flag's docstring.
    """

    #: The person's user id, as the adapter reports it in ``IncomingMessage.user.id``.
    user_id: str
    #: The person's name as the service shows it; a mention of them must contain it.
    name: str
    #: The room the person shares with the bot, by the adapter's id for it.
    room: str
    #: The largest message the service carries, in the unit of :attr:`SeenMessage.size`.
    max_message_bytes: int
    #: The service has private (direct) messages between the person and the bot.
    supports_private_messages: bool = True
    #: The person can leave and join :attr:`room`, and the service tells the bot.
    supports_membership: bool = True
    #: :meth:`interrupt` and :meth:`restore` can take the service away and bring it back.
    supports_outage: bool = True

    async def say(self, room: str, text: str) -> None:
        """Say ``text`` in ``room``."""
        ...

    async def say_privately(self, text: str) -> None:
        """Say ``text`` to the bot privately."""
        ...

    async def join(self, room: str) -> None:
        """Join ``room``; return once the person is in it."""
        ...

    async def leave(self, room: str) -> None:
        """Leave ``room``; return once the person is out of it."""
        ...

    async def next_from_bot(self, predicate: Callable[[SeenMessage], bool], *, timeout: float) -> SeenMessage:
        """The earliest message from the bot that matches ``predicate`` and that no
        earlier call returned; wait for it up to ``timeout`` seconds, then fail with an
        :class:`AssertionError` that says what the person did see."""
        ...

    async def interrupt(self) -> None:
        """Take the service away from the bot (stop the server, or cut the bot's
        connection); return once the adapter can have noticed (for a service without
        acknowledgements, once it has), so that what it is asked to send next waits."""
        ...

    async def restore(self) -> None:
        """Bring the service back; return once the person is back in :attr:`room` and
        can see what the bot says (the adapter reconnects by itself)."""
        ...


class SeenByPerson:
    """What a person has seen the bot say, for a driver's
    :meth:`ChatPerson.next_from_bot`: each message is returned once, the earliest
    unreturned one that matches, by polling ``seen`` (the driver's reading of everything
    the bot said, oldest first, as :class:`SeenMessage`)."""

    def __init__(self, who: str, seen: Callable[[], list[SeenMessage]], poll: float = 0.02) -> None:
        self._who = who
        self._seen = seen
        self._poll = poll
        self._taken: set[int] = set()

    async def next(self, predicate: Callable[[SeenMessage], bool], *, timeout: float) -> SeenMessage:
        """The next matching message; an AssertionError naming the last ten seen when
        none comes within ``timeout`` seconds."""
        with trio.move_on_after(timeout):
            while True:
                for index, message in enumerate(self._seen()):
                    if index not in self._taken and predicate(message):
                        self._taken.add(index)
                        return message
                await trio.sleep(self._poll)
        raise AssertionError(f"{self._who} saw no such message from the bot; it saw {self._seen()[-10:]!r}")


@dataclass
class LiveChat:
    """What the ``live_chat`` fixture yields: a running adapter, its host, a person."""

    adapter: Adapter
    host: RecordingHost
    person: ChatPerson


def _squash(text: str) -> str:
    # Splitting may drop or keep the whitespace it cut at; everything else must survive.
    return "".join(text.split())


def _long_text(at_least_bytes: int) -> str:
    words: list[str] = []
    size = 0
    n = 0
    while size < at_least_bytes:
        # Multi-byte characters, so a split that cuts bytes rather than characters shows.
        word = f"w{n:05d}-é漢🙂"
        words.append(word)
        size += len(word.encode()) + 1
        n += 1
    return " ".join(words) + " the-end"


class AdapterContract:
    """The behaviour every adapter promises; subclass it and provide ``live_chat``."""

    #: Seconds a check waits for the person or the host to see something.
    timeout: float = 30.0

    async def _from_person(self, chat: LiveChat, text: str) -> IncomingMessage:
        await chat.person.say(chat.person.room, text)
        return await chat.host.next_message(lambda m: m.body == text, what=f"{text!r}", timeout=self.timeout)

    async def _bot_says_in(self, chat: LiveChat, room: str | None, until: str) -> list[SeenMessage]:
        """The bot's messages in ``room`` (None: private), up to the one containing ``until``."""
        seen: list[SeenMessage] = []
        while not seen or until not in seen[-1].body:
            seen.append(await chat.person.next_from_bot(lambda s: s.room == room, timeout=self.timeout))
        return seen

    # ---- rooms ----

    async def test_room_message_reaches_the_host(self, live_chat: LiveChat) -> None:
        person = live_chat.person
        message = await self._from_person(live_chat, "hello, is anyone here?")
        assert message.user.id == person.user_id
        assert message.room is not None, "a room message must carry its room"
        assert message.room.id == person.room
        assert not message.direct
        # The bot folds names in its config (auth.admins, route_rules, capabilities.send)
        # with user_id and room_id: the ids messages carry must come out unchanged.
        assert live_chat.adapter.user_id(message.user.id) == message.user.id
        assert live_chat.adapter.room_id(message.room.id) == message.room.id

    async def test_room_message_from_the_bot_reaches_the_person(self, live_chat: LiveChat) -> None:
        person = live_chat.person
        await live_chat.adapter.send(OutgoingMessage("deploy finished", room_id=person.room))
        seen = await person.next_from_bot(lambda s: s.room == person.room, timeout=self.timeout)
        assert seen.body == "deploy finished"
        assert not seen.mentions

    async def test_mention_names_the_person(self, live_chat: LiveChat) -> None:
        person = live_chat.person
        asked = await self._from_person(live_chat, "is the deploy done?")
        await live_chat.adapter.send(OutgoingMessage("yes, done", room_id=person.room, user=asked.user, mention=True))
        seen = await person.next_from_bot(lambda s: s.room == person.room, timeout=self.timeout)
        assert seen.body.endswith("yes, done")
        assert person.name in seen.body.removesuffix("yes, done"), f"{seen.body!r} does not name {person.name!r}"
        assert person.user_id in seen.mentions, f"the service does not see {person.user_id} mentioned"

    async def test_message_addressing_the_bot_arrives_intact(self, live_chat: LiveChat) -> None:
        host = live_chat.host
        await host.wait_for(lambda: host.own_names, "the adapter to call set_own_names", timeout=self.timeout)
        for name in host.own_names[:2]:
            message = await self._from_person(live_chat, f"{name}: status please")
            assert not message.direct

    # ---- private messages ----

    async def test_private_messages_both_ways(self, live_chat: LiveChat) -> None:
        person = live_chat.person
        if not person.supports_private_messages:
            pytest.skip(f"{type(person).__name__}.supports_private_messages is False")
        await person.say_privately("psst, a secret")
        message = await live_chat.host.next_message(lambda m: m.body == "psst, a secret", timeout=self.timeout)
        assert message.direct, "a private message must have direct=True"
        assert message.user.id == person.user_id
        await live_chat.adapter.send(OutgoingMessage("a secret answer", user=message.user, private=True))
        seen = await person.next_from_bot(lambda s: s.body == "a secret answer", timeout=self.timeout)
        assert seen.room is None, f"a private message went to room {seen.room}"
        # No room at all means privately too.
        await live_chat.adapter.send(OutgoingMessage("and another", user=message.user))
        seen = await person.next_from_bot(lambda s: s.body == "and another", timeout=self.timeout)
        assert seen.room is None, f"a message without a room went to room {seen.room}"
        # private wins over a room: the bot checked the send capability against the user.
        await live_chat.adapter.send(OutgoingMessage("just you", room_id=person.room, user=message.user, private=True))
        seen = await person.next_from_bot(lambda s: s.body == "just you", timeout=self.timeout)
        assert seen.room is None, f"a private message naming a room went to room {seen.room}"

    # ---- long and multi-line messages ----

    async def test_long_message_is_split_within_the_limit_without_loss(self, live_chat: LiveChat) -> None:
        person = live_chat.person
        text = _long_text(2 * person.max_message_bytes + 1)
        await live_chat.adapter.send(OutgoingMessage(text, room_id=person.room))
        pieces = await self._bot_says_in(live_chat, person.room, "the-end")
        too_big = [piece.size for piece in pieces if piece.size > person.max_message_bytes]
        assert not too_big, f"pieces of {too_big} exceed the service's {person.max_message_bytes}"
        assert _squash("".join(piece.body for piece in pieces)) == _squash(text), "text was lost or reordered"

    async def test_lines_arrive_in_order(self, live_chat: LiveChat) -> None:
        person = live_chat.person
        await live_chat.adapter.send(OutgoingMessage("first line\nsecond line\n\nthird line", room_id=person.room))
        pieces = await self._bot_says_in(live_chat, person.room, "third line")
        lines = [line for piece in pieces for line in piece.body.splitlines() if line.strip()]
        assert lines == ["first line", "second line", "third line"]

    # ---- membership ----

    async def test_person_leaving_and_joining_is_reported(self, live_chat: LiveChat) -> None:
        person, host = live_chat.person, live_chat.host
        if not person.supports_membership:
            pytest.skip(f"{type(person).__name__}.supports_membership is False")

        def about(kind: MembershipKind) -> Callable[[MembershipEvent], bool]:
            return lambda e: e.kind is kind and e.user.id == person.user_id and e.room.id == person.room

        await person.leave(person.room)
        left = await host.next_membership(about(MembershipKind.LEFT), what="the person leaving", timeout=self.timeout)
        assert left.actor is None, "nobody else made the person leave"
        await person.join(person.room)
        await host.next_membership(about(MembershipKind.JOINED), what="the person joining", timeout=self.timeout)
        await self._from_person(live_chat, "back again")

    # ---- outages ----

    async def test_messages_sent_during_an_outage_arrive_after_it(self, live_chat: LiveChat) -> None:
        person = live_chat.person
        if not person.supports_outage:
            pytest.skip(f"{type(person).__name__}.supports_outage is False")
        await self._from_person(live_chat, "before the outage")
        await person.interrupt()
        for n in range(3):
            await live_chat.adapter.send(OutgoingMessage(f"while away {n}", room_id=person.room))
        await person.restore()
        pieces = await self._bot_says_in(live_chat, person.room, "while away 2")
        assert [piece.body for piece in pieces] == [f"while away {n}" for n in range(3)]
        await self._from_person(live_chat, "after the outage")
        bodies = [m.body for m in live_chat.host.messages]
        assert bodies.count("before the outage") == 1, "a message from before the outage was delivered again"
