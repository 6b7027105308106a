"""Incoming: what adapters hear, turned into events on the callbacks' streams.

An adapter talks to the bot through its :class:`AdapterLink` (the
:class:`~._adapter.AdapterHost` it was given). A chat message becomes a protocol
``Message`` with ids prefixed by the adapter's instance name, is remembered in the
directory, goes to the bot's own commands if it is one, and otherwise to the router,
whose matches pass the permission gate (:class:`~._policy.MessageGate`) before they
are queued. Nothing here waits: a slow callback or database never slows an adapter.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._adapter import Adapter, ChatRoom, ChatUser, IncomingMessage, MembershipEvent, MembershipKind, ReactionEvent
from ._directory import UserRecord
from ._errors import AdapterError, UnknownTargetError
from ._proto import core_pb2, robot_pb2
from ._store import NamespacedStore, Store

if TYPE_CHECKING:
    from ._core import BotCore

log = logging.getLogger(__name__)


class AdapterLink:
    """The bot as one adapter sees it (implements :class:`~._adapter.AdapterHost`)."""

    def __init__(self, core: BotCore, name: str, adapter: Adapter, store: Store) -> None:
        self._core = core
        self.name = name
        self.adapter = adapter
        self.bot_name = core.router.bot_name
        self.aliases: Sequence[str] = core.router.aliases
        self.store = NamespacedStore(store, f"adapter:{name}")
        #: Whether the adapter's ``run`` has started (``task_status.started()``) and not ended.
        self.running = False
        #: How its ``run`` last failed ("" if it never has): the bot starts it again.
        self.last_error = ""
        #: Whether its ``run`` returned: the adapter is done and not started again.
        self.ended = False

    @property
    def connected(self) -> bool:
        """Whether the adapter is connected to its chat service, for health and metrics:
        running, and connected by its own account when it gives one."""
        return self.running and self.adapter.connected is not False

    @property
    def state(self) -> str:
        """``connected``, ``reconnecting`` (it was, or its run failed), ``connecting``
        (its first connection is under way) or ``stopped``, for the operator console."""
        if self.ended:
            return "stopped"
        if self.connected:
            return "connected"
        if self.running or self.last_error:
            return "reconnecting"
        return "connecting"

    async def receive(self, message: IncomingMessage) -> None:
        self._core.incoming.message(self.name, message)

    async def membership(self, event: MembershipEvent) -> None:
        self._core.incoming.membership(self.name, event)

    async def topic(self, room: ChatRoom, user: ChatUser | None = None) -> None:
        self._core.incoming.topic(self.name, room, user)

    async def reaction(self, event: ReactionEvent) -> None:
        self._core.incoming.reaction(self.name, event)

    async def room_members(self, room: ChatRoom, users: Sequence[ChatUser]) -> None:
        self._core.incoming.room_members(self.name, room, users)

    def set_own_names(self, names: Sequence[str]) -> None:
        self._core.router.set_own_names(self.name, names)

    def may_send(self) -> bool:
        return self._core.leader.acting()

    async def wait_idle(self, *, quiet: float = 0.5, max_wait: float = 10.0) -> None:
        await self._core.activity.wait_idle(self._core.router, quiet=quiet, max_wait=max_wait)


#: The largest file size a uint64 field takes; an adapter's -1 ("unknown") or a chat
#: service's absurd one must not break routing.
_MAX_SIZE = (1 << 63) - 1


class Incoming:
    """Routes what every adapter of one running bot hears."""

    def __init__(self, core: BotCore) -> None:
        self._core = core
        self._message_ids = itertools.count(1)
        #: The urls of the latest files people sent, with the adapter each came through:
        #: the only urls Robot.GetAttachment fetches (``bot.fetchable_files`` of them).
        self._files: OrderedDict[str, str] = OrderedDict()

    def message(self, adapter: str, incoming: IncomingMessage) -> None:
        """Route one chat message; never waits."""
        core = self._core
        if not core.leader.acting():
            return  # fenced (ha:): what the adapter still delivers is the new active bot's to answer
        core.stats.received += 1
        core.metrics.message_received(adapter)
        core.activity.touch()
        # Built field by field in place: upb's keyword constructors, with the sub-messages
        # copied in, cost more than twice as much (3.7 -> 1.4 µs).
        message = core_pb2.Message()
        message.body = incoming.body
        source = message.source
        user = source.user
        user_id = user.id = f"{adapter}/{incoming.user.id}"
        user.name = incoming.user.name
        user.mention_name = incoming.user.mention_name
        room_id = ""
        if incoming.room is not None:
            room = source.room
            room_id = room.id = f"{adapter}/{incoming.room.id}"
            room.name = incoming.room.name
            room.topic = incoming.room.topic
        message_id = message.id = f"{adapter}/{incoming.id}" if incoming.id else f"{adapter}/~{next(self._message_ids)}"
        if incoming.action:
            message.action = True
        if incoming.direct:
            message.private = True
        if incoming.thread_id:
            message.thread_id = f"{adapter}/{incoming.thread_id}"
        for a in incoming.attachments:
            message.attachments.add(
                name=a.name, media_type=a.media_type, url=a.url, size=min(max(a.size, 0), _MAX_SIZE)
            )
            if a.url:
                self._remember_file(a.url, adapter)
        core.directory.see_speaker(user_id, incoming.user.name, incoming.user.mention_name)
        if incoming.room is not None:
            core.directory.see_room(room_id, incoming.room.name, member=user_id)
        if incoming.edit_of:  # not a new command: only callbacks that asked for edits see it
            message.edit_of = f"{adapter}/{incoming.edit_of}"
            core.router.broadcast(robot_pb2.EVENT_KIND_EDIT, core_pb2.Event(edit=message))
            return
        if core.conversations.take(adapter, incoming, message):  # the answer to a callback's question
            return
        respond_text = core.router.address(adapter, incoming.body)
        if incoming.direct and respond_text is None:  # in private, the bot's name is optional
            respond_text = incoming.body.strip()
        if respond_text is not None and core.commands.take(adapter, incoming, user_id, room_id, respond_text):
            return
        gate = core.policies.gate(user_id, room_id, respond_text)
        matches = core.router.match(message, incoming.body, incoming.direct, respond_text, gate)
        if matches:
            core.stats.matched += len(matches)
            core.metrics.matched(message_id, matches)
            core.activity.matched(adapter, message_id, room_id, incoming, matches)
        if gate.held:  # matches of routes that need approval wait for it (_approvals)
            core.approvals.hold(adapter, incoming, message, respond_text, gate.held)
        refusal = gate.refusal(delivered=any(m.direct for m in matches)) if gate.refused else ""
        if refusal:
            core.outgoing.reply(adapter, incoming, refusal, mention=True)
        elif respond_text is not None and not gate.asked:
            core.commands.unmatched(adapter, incoming, user_id, room_id, respond_text)

    def membership(self, adapter: str, event: MembershipEvent) -> None:
        """Pass a membership change to the callbacks that asked for them."""
        directory = self._core.directory
        self._core.activity.touch()
        user = _user_pb(adapter, event.user)
        room = _room_pb(adapter, event.room)
        directory.see_user(UserRecord(user.id, user.name, user.mention_name))
        if event.kind is MembershipKind.JOINED:
            directory.see_room(room.id, room.name, member=user.id)
        elif event.kind in (MembershipKind.LEFT, MembershipKind.KICKED):
            directory.see_room(room.id, room.name)
            directory.leave_room(room.id, user.id)
        previous = _user_pb(adapter, event.previous) if event.previous is not None else None
        if event.kind is MembershipKind.RENAMED:
            # The member is the new id now; the old one is no longer in the room.
            directory.see_room(room.id, room.name, member=user.id)
            if previous is not None and previous.id != user.id:
                directory.leave_room(room.id, previous.id)
        change = core_pb2.MembershipChange(
            kind=event.kind.value,  # type: ignore[arg-type]  # the enum values match the proto's
            user=user,
            room=room,
            actor=_user_pb(adapter, event.actor) if event.actor else None,
            reason=event.reason,
            previous=previous,
        )
        self._core.router.broadcast(robot_pb2.EVENT_KIND_MEMBERSHIP, core_pb2.Event(membership_change=change))
        self._core.events.announce(
            "oco.membership",
            kind=event.kind.name.lower(),
            user=user.id,
            room=room.id,
            actor=change.actor.id if event.actor else "",
            reason=event.reason,
            # Only a rename names who the user was; other kinds keep their payload as before.
            **({"previous": previous.id} if previous is not None else {}),
        )

    def _remember_file(self, url: str, adapter: str) -> None:
        self._files[url] = adapter
        self._files.move_to_end(url)
        while len(self._files) > self._core.config.bot.fetchable_files:
            self._files.popitem(last=False)

    async def fetch_file(self, url: str) -> tuple[bytes, str]:
        """The content and media type of a file a person sent lately, by its url,
        fetched by the adapter it came through."""
        adapter = self._files.get(url)
        if adapter is None or adapter not in self._core.links:
            raise UnknownTargetError(
                f"{url[:200]!r} is not the url of a file the bot delivered lately (it remembers the latest "
                f"{self._core.config.bot.fetchable_files}, bot.fetchable_files)"
            )
        self._core.leader.check()  # a standby's adapters are not connected: say where the active one is
        try:
            return await self._core.links[adapter].adapter.fetch_attachment(
                url, self._core.config.bot.max_attachment_bytes
            )
        except AdapterError as exc:
            exc.args = (f"file {url[:200]!r} through {adapter}: {exc}",)
            raise

    def reaction(self, adapter: str, event: ReactionEvent) -> None:
        """Pass a reaction to the callbacks that asked for them."""
        core = self._core
        if not core.leader.acting():
            return
        core.activity.touch()
        user = _user_pb(adapter, event.user)
        room = _room_pb(adapter, event.room) if event.room is not None else None
        core.directory.see_user(UserRecord(user.id, user.name, user.mention_name))
        reaction = core_pb2.Reaction(
            message_id=f"{adapter}/{event.message_id}",
            key=event.key,
            source=core_pb2.Source(user=user, room=room),
            id=f"{adapter}/{event.id}" if event.id else "",
        )
        core.router.broadcast(robot_pb2.EVENT_KIND_REACTION, core_pb2.Event(reaction=reaction))

    def room_members(self, adapter: str, room: ChatRoom, users: Sequence[ChatUser]) -> None:
        """Set a room's members in the directory from the adapter's list, broadcasting
        nothing: a list the bot learns on joining is not people arriving."""
        directory = self._core.directory
        room_pb = _room_pb(adapter, room)
        directory.see_room(room_pb.id, room_pb.name)
        ids = []
        for person in users:
            user = _user_pb(adapter, person)
            directory.see_user(UserRecord(user.id, user.name, user.mention_name))
            directory.see_room(room_pb.id, room_pb.name, member=user.id)
            ids.append(user.id)
        for gone in set(directory.room(room_pb.id).members) - set(ids):
            directory.leave_room(room_pb.id, gone)

    def topic(self, adapter: str, room: ChatRoom, user: ChatUser | None) -> None:
        """Pass a topic change to the callbacks that asked for them."""
        room_pb = _room_pb(adapter, room)
        self._core.directory.see_room(room_pb.id, room.name, topic=room.topic)
        change = core_pb2.TopicChange(room=room_pb, user=_user_pb(adapter, user) if user else None)
        self._core.router.broadcast(robot_pb2.EVENT_KIND_TOPIC, core_pb2.Event(topic_change=change))
        self._core.events.announce("oco.topic", room=room_pb.id, topic=room.topic, user=change.user.id if user else "")


def _user_pb(adapter: str, user: ChatUser) -> core_pb2.User:
    return core_pb2.User(id=f"{adapter}/{user.id}", name=user.name, mention_name=user.mention_name)


def _room_pb(adapter: str, room: ChatRoom) -> core_pb2.Room:
    return core_pb2.Room(id=f"{adapter}/{room.id}", name=room.name, topic=room.topic)
