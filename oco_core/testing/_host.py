"""A recording :class:`~oco_core.plugin.AdapterHost` for adapter tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import trio

from .._adapter import ChatRoom, ChatUser, IncomingMessage, MembershipEvent, ReactionEvent
from .._store import NamespacedStore
from ._memory_store import MemoryStore

T = TypeVar("T")

#: How often :meth:`RecordingHost.wait_for` looks at its condition again. The condition
#: may read state the host is never told about (an adapter's counters), so it is polled.
_POLL = 0.02


class RecordingHost:
    """An :class:`~oco_core.plugin.AdapterHost` that records everything an adapter tells it.

    Give it to ``adapter.run`` in place of the bot; then read :attr:`messages`,
    :attr:`memberships`, :attr:`reactions`, :attr:`topics` and :attr:`own_names`, or wait for what you
    expect with :meth:`next_message`, :meth:`next_membership`, :meth:`next_topic` and
    :meth:`wait_for`. Every wait fails with an :class:`AssertionError` after its
    ``timeout``, naming what it waited for and what did arrive::

        host = RecordingHost("irc")
        async with trio.open_nursery() as nursery:
            await nursery.start(adapter.run, host)
            message = await host.next_message(lambda m: m.body == "hello", what="alice's hello")

    The adapter's own store (:attr:`store`, namespace ``adapter:<name>``) is backed by
    :attr:`memory`, a :class:`~oco_core.testing.MemoryStore`; pass the same ``memory`` to
    a second host to model a restarted bot that kept its store.

    ``on_message``, when set, is awaited after each message is recorded, in the
    adapter's task (as the bot's router is): a test can answer there the way a callback
    would, e.g. ``host.on_message = lambda m: adapter.send(...)``.
    """

    def __init__(
        self,
        name: str = "test",
        *,
        bot_name: str = "oco",
        aliases: Sequence[str] = (),
        memory: MemoryStore | None = None,
        timeout: float = 30.0,
    ) -> None:
        #: The adapter's instance name (the bot prefixes ids with it; here nothing does).
        self.name = name
        self.bot_name = bot_name
        self.aliases: Sequence[str] = tuple(aliases)
        self.memory = memory if memory is not None else MemoryStore()
        self.store = NamespacedStore(self.memory, f"adapter:{name}")
        #: The default timeout of the waits, in seconds.
        self.timeout = timeout
        self.messages: list[IncomingMessage] = []
        self.memberships: list[MembershipEvent] = []
        self.reactions: list[ReactionEvent] = []
        #: ``(room, who set it)`` for every topic change, ``room.topic`` holding the topic.
        self.topics: list[tuple[ChatRoom, ChatUser | None]] = []
        #: Every room_members() call: the room and its members.
        self.member_lists: list[tuple[ChatRoom, list[ChatUser]]] = []
        #: The names the adapter last gave :meth:`set_own_names` (empty before it did).
        self.own_names: list[str] = []
        #: Every list of names the adapter gave, oldest first.
        self.own_names_history: list[list[str]] = []
        self.on_message: Callable[[IncomingMessage], Awaitable[object]] | None = None
        #: What :meth:`may_send` answers: set it False to play a bot that is no longer
        #: the active one (``ha:``).
        self.sending = True
        self._taken: dict[str, set[int]] = {"message": set(), "membership": set(), "topic": set(), "reaction": set()}
        self._changed = trio.Event()
        self._last_record = trio.current_time() if _in_trio() else 0.0

    # ---- the AdapterHost interface ----

    async def receive(self, message: IncomingMessage) -> None:
        """Record ``message`` (then await :attr:`on_message`, when set)."""
        self.messages.append(message)
        self._record()
        if self.on_message is not None:
            await self.on_message(message)
        else:
            await trio.lowlevel.checkpoint()

    async def membership(self, event: MembershipEvent) -> None:
        """Record ``event``."""
        self.memberships.append(event)
        self._record()
        await trio.lowlevel.checkpoint()

    async def reaction(self, event: ReactionEvent) -> None:
        """Record ``event``."""
        self.reactions.append(event)
        self._record()
        await trio.lowlevel.checkpoint()

    async def topic(self, room: ChatRoom, user: ChatUser | None = None) -> None:
        """Record a topic change."""
        self.topics.append((room, user))
        self._record()
        await trio.lowlevel.checkpoint()

    async def room_members(self, room: ChatRoom, users: Sequence[ChatUser]) -> None:
        """Record a room's member list."""
        self.member_lists.append((room, list(users)))
        self._record()
        await trio.lowlevel.checkpoint()

    def set_own_names(self, names: Sequence[str]) -> None:
        """Record the bot's names on the service."""
        self.own_names = list(names)
        self.own_names_history.append(list(names))
        self._record()

    async def wait_idle(self, *, quiet: float = 0.5, max_wait: float = 10.0) -> None:
        """Return once the adapter reported nothing for ``quiet`` seconds, or after
        ``max_wait`` seconds (there are no callbacks here to wait for)."""
        with trio.move_on_after(max_wait):
            while (left := self._last_record + quiet - trio.current_time()) > 0:
                await trio.sleep(left)

    def may_send(self) -> bool:
        """:attr:`sending` (True unless a test plays a fenced bot)."""
        return self.sending

    # ---- waiting for what the adapter reports ----

    async def next_message(
        self,
        predicate: Callable[[IncomingMessage], bool] | None = None,
        *,
        what: str = "",
        timeout: float | None = None,
    ) -> IncomingMessage:
        """The earliest received message that matches ``predicate`` (any, when None) and
        that no earlier ``next_message`` returned; waits for it up to ``timeout`` seconds.
        ``what`` describes it for the failure message."""
        return await self._next("message", self.messages, predicate, what, timeout, _describe_message)

    async def next_membership(
        self,
        predicate: Callable[[MembershipEvent], bool] | None = None,
        *,
        what: str = "",
        timeout: float | None = None,
    ) -> MembershipEvent:
        """Like :meth:`next_message`, for membership events."""
        return await self._next("membership", self.memberships, predicate, what, timeout, _describe_membership)

    async def next_reaction(
        self,
        predicate: Callable[[ReactionEvent], bool] | None = None,
        *,
        what: str = "",
        timeout: float | None = None,
    ) -> ReactionEvent:
        """Like :meth:`next_message`, for reactions."""
        return await self._next(
            "reaction", self.reactions, predicate, what, timeout, lambda r: f"{r.user.id} {r.key} on {r.message_id}"
        )

    async def next_topic(
        self,
        predicate: Callable[[ChatRoom], bool] | None = None,
        *,
        what: str = "",
        timeout: float | None = None,
    ) -> tuple[ChatRoom, ChatUser | None]:
        """Like :meth:`next_message`, for topic changes; ``predicate`` sees the room."""
        matches = None if predicate is None else (lambda change: predicate(change[0]))
        return await self._next("topic", self.topics, matches, what, timeout, lambda c: f"{c[0].id}: {c[0].topic!r}")

    async def wait_for(self, condition: Callable[[], object], what: str, *, timeout: float | None = None) -> None:
        """Wait until ``condition()`` is true (it may read anything: the host's records,
        the adapter's state); fail naming ``what`` after ``timeout`` seconds."""
        limit = self.timeout if timeout is None else timeout
        with trio.move_on_after(limit):
            while not condition():
                with trio.move_on_after(_POLL):
                    await self._changed.wait()
            return
        raise AssertionError(f"timed out after {limit:g} s waiting for {what}")

    # ---- internals ----

    def _record(self) -> None:
        self._last_record = trio.current_time()
        self._changed.set()
        self._changed = trio.Event()

    async def _next(
        self,
        kind: str,
        records: list[T],
        predicate: Callable[[T], bool] | None,
        what: str,
        timeout: float | None,
        describe: Callable[[T], str],
    ) -> T:
        taken = self._taken[kind]
        limit = self.timeout if timeout is None else timeout
        with trio.move_on_after(limit):
            while True:
                for index, record in enumerate(records):
                    if index not in taken and (predicate is None or predicate(record)):
                        taken.add(index)
                        return record
                await self._changed.wait()
        recent = "; ".join(describe(record) for record in records[-10:]) or "nothing"
        wanted = what or (f"a {kind}" if predicate is None else f"a {kind} matching the predicate")
        raise AssertionError(f"the adapter reported no {wanted} within {limit:g} s; its last {kind}s were: {recent}")


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def _describe_message(message: IncomingMessage) -> str:
    where = message.room.id if message.room is not None else "private"
    return f"{message.user.id} in {where}: {message.body!r}"


def _describe_membership(event: MembershipEvent) -> str:
    return f"{event.user.id} {event.kind.name.lower()} {event.room.id}"
