"""The adapter interface: how a chat service plugs into the bot.

An adapter deals only in the chat service's own ids ("#ops", "!abc:example.org"). The
bot makes them unique across adapters by prefixing the adapter's name
("irc/#ops") before callbacks see them, and strips the prefix again before it hands an
outgoing message back, so a reply always goes out through the adapter its message came
from.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import trio
from pydantic import BaseModel

from ._errors import AdapterError
from ._store import NamespacedStore


@dataclass(frozen=True, slots=True)
class ChatUser:
    """A user as the chat service knows them: its own ``id``, a display ``name`` and the
    ``mention_name`` that alerts them when written in a message."""

    id: str
    name: str = ""
    mention_name: str = ""


@dataclass(frozen=True, slots=True)
class ChatRoom:
    """A room (channel) as the chat service knows it."""

    id: str
    name: str = ""
    topic: str = ""


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file or image on a message.

    Outgoing, it has ``data`` (the adapter uploads it where its service stores files) or
    a ``url`` (linked; the bot never fetches it). Incoming, it has the service's ``url``
    for it. ``media_type`` may be empty (guess it from ``name``); ``size`` is 0 when not
    known.
    """

    name: str
    media_type: str = ""
    url: str = ""
    data: bytes = b""
    size: int = 0


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """A message an adapter received from its chat service.

    ``room`` is None for a private message on a service without rooms for them (IRC);
    ``direct`` is True for any private message (such a message is always addressed to
    the bot). ``id`` is the service's id for the message, where it has one.
    ``edit_of`` names the message this one edits (its new text is ``body``): callbacks
    that asked for edits get it as an event, and the router does not treat it as a new
    command. ``thread_id`` is the root of the thread the message is in.
    """

    body: str
    user: ChatUser
    room: ChatRoom | None = None
    direct: bool = False
    id: str = ""
    action: bool = False
    thread_id: str = ""
    edit_of: str = ""
    attachments: tuple[Attachment, ...] = ()


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message for an adapter to send.

    It goes to ``room_id`` when set, else privately to ``user``. With ``mention`` the
    adapter addresses ``user`` in the room its own way (``nick: `` on IRC, a pill on
    Matrix). ``private`` asks for a private message to ``user`` even when a room is
    known. ``in_reply_to`` is the service's id of the message being answered.

    The rest are rich replies; the bot hands an adapter only those its
    :attr:`Adapter.features` name, and turns the others into plain text first (see
    :class:`Feature`). ``thread_id``: post in this thread. ``attachments``: files.
    ``edit_of``: replace the bot's earlier message with this id (one :meth:`Adapter.send`
    returned) by this one. ``reaction``: react with this key to ``in_reply_to``; the body
    is empty. ``typing_seconds``: not a message, show the bot typing in ``room_id`` for
    that long (or until its next message there).
    """

    body: str
    room_id: str | None = None
    user: ChatUser | None = None
    mention: bool = False
    private: bool = False
    format: Literal["plain", "markdown"] = "plain"
    action: bool = False
    in_reply_to: str = ""
    thread_id: str = ""
    attachments: tuple[Attachment, ...] = ()
    edit_of: str = ""
    reaction: str = ""
    typing_seconds: int = 0


class Feature(enum.Flag):
    """The rich replies an adapter renders the way its service does (``Adapter.features``).

    For the ones it does not name, the bot changes the message before :meth:`Adapter.send`
    sees it, so every adapter gets something it can send as text: a reaction becomes its
    key as a message, an edit a new message starting "Correction:", an attachment a line
    "name: url" (or its name and size when it has only data), a thread is dropped, and a
    typing indication is not sent at all.
    """

    NONE = 0
    THREADS = enum.auto()
    ATTACHMENTS = enum.auto()
    EDITS = enum.auto()
    REACTIONS = enum.auto()
    TYPING = enum.auto()


@dataclass(frozen=True, slots=True)
class ReactionEvent:
    """Someone reacted to a message: ``message_id`` is the service's id of the message
    (one it delivered as :attr:`IncomingMessage.id`, or one :meth:`Adapter.send`
    returned), ``key`` the emoji or text, ``id`` the reaction's own id."""

    message_id: str
    key: str
    user: ChatUser
    room: ChatRoom | None = None
    id: str = ""


class MembershipKind(enum.Enum):
    """What happened to a user's membership of a room."""

    JOINED = 1
    LEFT = 2
    KICKED = 3
    INVITED = 4
    #: The user, still in the room, changed the name they are known by (an IRC nick).
    RENAMED = 5


@dataclass(frozen=True, slots=True)
class MembershipEvent:
    """A user entered or left a room. ``actor`` is who caused it, when someone else did.
    For ``RENAMED``, ``previous`` is the user as they were and ``user`` as they are now."""

    kind: MembershipKind
    user: ChatUser
    room: ChatRoom
    actor: ChatUser | None = None
    reason: str = ""
    previous: ChatUser | None = None


class AdapterHost(Protocol):
    """What the bot offers an adapter while it runs."""

    #: The adapter's name in this bot (its ``name:`` in config, by default its type).
    name: str
    #: How people address the bot (``bot.name``), and the configured aliases.
    bot_name: str
    aliases: Sequence[str]
    #: The adapter's own persistent state, in the core store (namespace ``adapter:<name>``).
    store: NamespacedStore

    async def receive(self, message: IncomingMessage) -> None:
        """Hand an incoming message to the router. Returns as soon as it is routed; it
        never waits for callbacks."""

    async def membership(self, event: MembershipEvent) -> None:
        """Report a user entering or leaving a room."""

    async def topic(self, room: ChatRoom, user: ChatUser | None = None) -> None:
        """Report a room's new topic (in ``room.topic``)."""

    async def reaction(self, event: ReactionEvent) -> None:
        """Report a reaction to a message, for callbacks that asked for reactions."""

    async def room_members(self, room: ChatRoom, users: Sequence[ChatUser]) -> None:
        """Hand the directory everyone in ``room`` now (an IRC NAMES reply, a Matrix
        member list), replacing what it had. Nobody is told: these are not joins."""

    def set_own_names(self, names: Sequence[str]) -> None:
        """Tell the router the names the bot has on this service (an IRC nick, a Matrix
        display name or localpart); messages starting with one are addressed to it."""

    async def wait_idle(self, *, quiet: float = 0.5, max_wait: float = 10.0) -> None:
        """Wait until no event is queued for a callback and nothing was sent for ``quiet``
        seconds, or ``max_wait`` seconds passed. The shell adapter uses it at end of input so
        replies still on their way are printed."""

    def may_send(self) -> bool:
        """Whether the bot may send to chat now. Always True without ``ha:``; with it,
        False once this bot is no longer the active one (its lease may be another bot's).
        An adapter that queues messages and writes them later asks right before each
        write, and drops what it queued when False."""


class Adapter(abc.ABC):
    """A connection to one chat service. Created from its validated config; then
    :meth:`run` is started in the bot's nursery.

    ``send``, ``join`` and ``part`` may be called at any time from other tasks, also
    while the connection is down (queue what can wait, in order; raise
    :class:`~oco_core.AdapterError` for what cannot). An unknown room or user raises
    :class:`~oco_core.UnknownTargetError`.
    """

    @abc.abstractmethod
    async def run(self, host: AdapterHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, call ``task_status.started()`` once messages can flow, then deliver
        incoming messages to ``host`` until cancelled. Reconnect by itself where it can.
        Returning ends this adapter (the bot stops when every adapter has ended); raising
        makes the bot log the error and start ``run`` again after a backoff."""

    @property
    def connected(self) -> bool | None:
        """Whether the adapter is connected to its chat service now, for health checks
        and metrics. None (this default): it does not say, and the bot counts it as
        connected while :meth:`run` runs after ``task_status.started()``. Override it
        in an adapter that reconnects inside ``run``, so that health sees an outage."""
        return None

    #: The rich replies this adapter renders itself (see :class:`Feature`); the bot
    #: turns the others into plain text before :meth:`send` sees them.
    features: Feature = Feature.NONE

    @abc.abstractmethod
    async def send(self, message: OutgoingMessage) -> str | None:
        """Send one message; return once the adapter has accepted it, with an id for it
        that the adapter takes back in ``edit_of`` and ``in_reply_to`` (the service's id,
        or one of the adapter's own that it maps to the service's once sent), or None
        where the service has no ids for messages."""

    def user_id(self, name: str) -> str:
        """The user id this adapter's messages carry for the person a human calls
        ``name`` (as typed in ``oco grant <user> <role>`` or in ``auth.admins``). The
        default returns ``name``; override it where the service compares names loosely
        (IRC folds case as its server does)."""
        return name

    def room_id(self, name: str) -> str:
        """The room id this adapter's messages carry for the room a human calls ``name``
        (as written in ``route_rules`` or ``capabilities.send`` of the bot's config). The
        default returns ``name``; override it where the service compares room names
        loosely (IRC folds channel names as its server does), or a rule written ``#Ops``
        would never match the ``#ops`` messages carry. Called with parts of a pattern
        too (``#Ops-`` of ``#Ops-*``): fold characters, do not validate."""
        return name

    async def fetch_attachment(self, url: str, max_bytes: int) -> tuple[bytes, str]:
        """The content and media type of a file a person sent, by the ``url`` this
        adapter gave it in :attr:`IncomingMessage.attachments`, for a callback that asks
        the bot for it (``Robot.GetAttachment``): a service whose file urls need the bot's
        own credentials (Matrix) fetches it with them. At most ``max_bytes``: raise
        :class:`~oco_core.RequestTooLargeError` past it, without reading the rest. The
        bot has checked that the callback was given ``url``. The default refuses."""
        raise AdapterError(f"the {type(self).__name__} adapter has no files to fetch")

    async def join(self, room: str) -> None:
        """Join a room by the service's id or name."""
        raise AdapterError(f"the {type(self).__name__} adapter cannot join rooms")

    async def part(self, room: str) -> None:
        """Leave a room by the service's id or name."""
        raise AdapterError(f"the {type(self).__name__} adapter cannot part rooms")


@dataclass(frozen=True, slots=True)
class AdapterType:
    """What an adapter plugin offers, returned by the ``oco_adapter_types`` hook.

    ``create(config)`` builds an :class:`Adapter` from a validated ``config`` (an
    instance of ``config_model``, which holds the keys beside ``type:`` in the bot's
    config). ``package`` is the distribution that provides it, for error messages.

    ``noisy_loggers`` names loggers of the adapter's dependencies that log every request
    or frame at INFO (an HTTP client, a protocol library); ``oco`` raises them to
    WARNING unless it runs with ``--debug``, so they do not drown the bot's own lines.

    ``default`` offers this adapter, with its default options, to a config that has no
    ``adapters:`` key (the built-in ``shell`` adapter does). When no installed adapter
    type says so, or more than one, such a config is an error that asks for ``adapters:``.
    """

    name: str
    create: Callable[[Any], Adapter]
    config_model: type[BaseModel]
    package: str = "oco-core"
    description: str = ""
    noisy_loggers: tuple[str, ...] = ()
    default: bool = False
