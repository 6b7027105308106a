"""The Python SDK for callback programs.

::

    from oco_core import Callback, Message

    bot = Callback()  # address, id and secret from OCO_ADDRESS, OCO_CALLBACK_ID, OCO_SECRET

    @bot.respond(r"ping$", help="ping - replies PONG")
    async def ping(message: Message) -> None:
        await message.reply("PONG")

    bot.run()

The callback connects to the bot, declares its routes in its Listen stream, and runs each
matched message's handler in a task of its own (at most ``concurrency`` at once). When the
bot goes away it reconnects with backoff; routes are declared again on every connection.
Events come over ListenBatches and replies go over SendMessageBatches (one stream each
per connection): whatever is waiting travels in one stream message, a lone event or
reply at once. With a bot that lacks them, Listen and SendMessageStream.

Over TLS when any ``tls_*`` argument or ``OCO_TLS_*`` variable is set (the bot sets them
for callbacks it launches); see :class:`Callback`.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import math
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import grpc
import grpc.aio
import trio

from ._bridge import Bridge, DuplexSender, ResponseStream, open_bridge
from ._errors import (
    EXIT_REFUSED,
    ApprovalDeniedError,
    CallbackError,
    InvalidPatternError,
    InvalidRequestError,
    OcoError,
    QuestionUnansweredError,
    StandbyError,
    ValueTooLargeError,
    VersionConflictError,
    from_status,
    from_wire,
)
from ._proto import (
    authorization_pb2,
    authorization_pb2_grpc,
    core_pb2,
    datastores_pb2,
    datastores_pb2_grpc,
    directory_pb2,
    directory_pb2_grpc,
    robot_pb2,
    robot_pb2_grpc,
    storage_pb2,
    storage_pb2_grpc,
)
from ._router import compile_pattern
from ._sdk_events import (
    FAILED_BODY,
    InvalidBodyError,
    PublishedEvent,
    Response,
    ScheduleFiring,
    WebhookRequest,
    encode_payload,
    whole_seconds,
)
from ._store import Item
from ._timing import Backoff
from ._tls import PemSource, load_client_tls

log = logging.getLogger(__name__)

Handler = Callable[["Message"], Awaitable[None]]
WebhookHandler = Callable[[WebhookRequest], Awaitable[Response | None]]
ScheduleHandler = Callable[[ScheduleFiring], Awaitable[None]]
EventHandler = Callable[[PublishedEvent], Awaitable[None]]
F = TypeVar("F", bound=Callable[..., Awaitable[None]])
W = TypeVar("W", bound=WebhookHandler)
S = TypeVar("S", bound=ScheduleHandler)
E = TypeVar("E", bound=EventHandler)
T = TypeVar("T")

#: gRPC status codes after which reconnecting cannot help: the configuration is wrong.
_FATAL = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,  # a required data store the bot does not offer
}
#: What a storage status that names no error means (a bot older than typed errors).
_STORAGE_IMPLIED = {grpc.StatusCode.RESOURCE_EXHAUSTED: ValueTooLargeError}
#: Seconds a unary call (storage, directory) may take before it fails with DEADLINE_EXCEEDED.
_UNARY_DEADLINE = 30.0
#: Seconds between checks that the bot that launched this callback still runs.
_ORPHAN_CHECK = 1.0
#: How long a call refused by standbys (ha:) is retried on the other bots before it fails.
_STANDBY_RETRY = 10.0
#: The connection the event being handled came from: its handler answers on it (ha:).
_origin: contextvars.ContextVar[_Connection | None] = contextvars.ContextVar("oco_origin", default=None)
_CHANNEL_OPTIONS = [
    # Reconnect quickly when the bot restarts (gRPC's default waits up to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


@dataclass(frozen=True, slots=True)
class User:
    """A chat user (ids carry the adapter's name: ``irc/alice``)."""

    id: str
    name: str = ""
    mention_name: str = ""


@dataclass(frozen=True, slots=True)
class Room:
    """A chat room."""

    id: str
    name: str = ""
    topic: str = ""


@dataclass(frozen=True, slots=True)
class Membership:
    """A user entered or left a room (``kind``: joined, left, kicked, invited), or changed
    their name in it (``renamed``: ``previous`` is who they were, ``user`` who they are)."""

    kind: str
    user: User
    room: Room
    actor: User | None = None
    reason: str = ""
    previous: User | None = None


#: The shortest time between renewals of a typing indication (Message.typing), in seconds.
_TYPING_RENEW_MIN = 5.0


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file or an image on a message.

    To send one (``reply``, ``send``: ``attachments=[...]``), give its ``data`` (at most
    the bot's ``bot.max_attachment_bytes``, 3 MiB by default; uploaded where the service
    stores files, Matrix) or a ``url`` (http or https, linked; the bot never fetches it).
    Where the service cannot show files (IRC, the shell) people see a line
    ``name: url``, or the name and size of data. ``media_type`` ("image/png") may be
    left empty: it is guessed from ``name``.

    On an incoming message (:attr:`Message.attachments`), what the person sent: its
    ``url`` (Matrix: the homeserver's download url, which needs the bot's token: read it
    with :meth:`Callback.fetch_attachment`), and its ``size`` where known (0 otherwise)."""

    name: str
    data: bytes = b""
    url: str = ""
    media_type: str = ""
    size: int = 0

    def __repr__(self) -> str:  # not the bytes
        where = f"url={self.url!r}" if self.url else f"{len(self.data) or self.size} bytes"
        return f"Attachment({self.name!r}, {where}{f', {self.media_type}' if self.media_type else ''})"


@dataclass(frozen=True, slots=True)
class Reaction:
    """Someone reacted to a message (``@bot.on_reaction``): ``key`` is the emoji ("👍")
    or short text, ``message_id`` the message reacted to (an incoming
    :attr:`Message.id`, or a :attr:`SentMessage.id` of this callback's), ``room`` None
    in a private chat, ``id`` the reaction's own id ("" where the service gives none)."""

    message_id: str
    key: str
    user: User
    room: Room | None = None
    id: str = ""


def _user(pb: core_pb2.User) -> User:
    return User(pb.id, pb.name, pb.mention_name)


def _room(pb: core_pb2.Room) -> Room:
    return Room(pb.id, pb.name, pb.topic)


@dataclass(frozen=True, slots=True)
class _Route:
    pattern: str
    respond: bool
    help: str
    id: str
    ignore_case: bool
    handler: Handler
    permission: str = ""
    durable: bool = False
    durable_ttl: int = 0
    approval: robot_pb2.ApprovalRule | None = None


def _approval_rule(values: dict[str, Any], what: str) -> robot_pb2.ApprovalRule:
    """``{"role": ..., "count": 1, "timeout": 600}`` as the protocol's ApprovalRule."""
    unknown = set(values) - {"role", "count", "timeout"}
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {', '.join(sorted(unknown))}; give role, count and timeout")
    role, count, timeout = values.get("role"), values.get("count", 1), values.get("timeout", 600)
    if not isinstance(role, str) or not role:
        raise ValueError(f"{what}: role must name the role whose holders approve, such as 'approvers'")
    if not isinstance(count, int) or not 1 <= count <= 10:
        raise ValueError(f"{what}: count must be a whole number from 1 to 10, not {count!r}")
    if not isinstance(timeout, int | float) or not 0 < timeout <= 86400:
        raise ValueError(f"{what}: timeout must be seconds, more than 0 and at most 86400, not {timeout!r}")
    return robot_pb2.ApprovalRule(role=role, count=count, timeout_seconds=whole_seconds(timeout, f"{what} timeout"))


@dataclass(frozen=True, slots=True)
class _Webhook:
    route: robot_pb2.WebhookRoute
    handler: WebhookHandler


@dataclass(frozen=True, slots=True)
class _Scheduled:
    schedule: robot_pb2.Schedule
    handler: ScheduleHandler


@dataclass(frozen=True, slots=True)
class _Subscribed:
    pattern: str
    handler: EventHandler


@dataclass(frozen=True, slots=True)
class PermissionCheck:
    """What :meth:`Callback.check_permission` answers."""

    allowed: bool
    #: Why, in words a person can read: "admin", "role deployers", or what is missing.
    reason: str
    #: The roles the person holds, across their linked accounts.
    roles: tuple[str, ...]
    #: The person the user id belongs to (linked accounts share one).
    person_id: str


@dataclass(frozen=True, slots=True)
class DataStore:
    """What :meth:`Callback.datastore` answers: how to reach this callback's own corner
    of a specific data store."""

    #: The data-store type ("postgresql", "redis", "sqlite").
    type: str
    #: A URL the ordinary client accepts as it is: ``psycopg.connect(url)``,
    #: ``redis.Redis.from_url(url)``, ``sqlite3.connect(details["path"])``.
    url: str
    #: Where the data must live: the schema, the key prefix ("" where all is its own).
    namespace: str
    #: The URL's parts and what else the data store documents (host, port, user, ...).
    details: Mapping[str, str]
    #: Grows with each rotation of the credentials.
    generation: int

    def __repr__(self) -> str:
        return f"<DataStore {self.type} namespace={self.namespace!r} generation={self.generation}>"  # no password


class Message:
    """A chat message that matched one of this callback's routes (or answered
    :meth:`ask`, or was edited: ``@bot.on_edit``)."""

    def __init__(self, callback: Callback, matched: core_pb2.MatchedMessage) -> None:
        self._callback = callback
        # Each sub-message read once (every read of one makes a new Python object).
        self._pb = pb = matched.message
        source = pb.source
        #: The whole body as written.
        self.body: str = pb.body
        #: The text the pattern matched: for respond routes, the body after the bot's address.
        self.text: str = matched.text
        #: groups[0] is the whole match, groups[n] the n-th capture group ("" if it did not take part).
        self.groups: tuple[str, ...] = tuple(matched.groups)
        #: Named capture groups that took part.
        self.named: dict[str, str] = dict(matched.named_groups) if matched.named_groups else {}
        self.route_id: str = matched.route_id
        self.pattern: str = matched.pattern
        #: True when the message was addressed to the bot.
        self.direct: bool = matched.direct
        #: True for a private (direct) message.
        self.private: bool = pb.private
        self.id: str = pb.id
        self.user = _user(source.user)
        room = source.room
        self.room = _room(room) if room.id else None
        #: Set for a match of a ``durable`` route, which the bot keeps until the callback
        #: has handled it; the SDK acknowledges it after the handler.
        self.delivery_id: str = ""
        #: How many times this match was delivered before (durable routes only: after a
        #: callback stopped before it had handled it).
        self.redelivered: int = 0
        #: Who approved this match (user ids), for a route that needs approval; () otherwise.
        self.approved_by: tuple[str, ...] = ()
        #: The thread the message is in: the id of the thread's root message, where the
        #: service has threads (Matrix); "" outside one. Replies go to the same thread.
        self.thread_id: str = pb.thread_id
        #: For an edit (``@bot.on_edit``): the id of the message edited, whose new text is
        #: :attr:`body`; "" for any other message.
        self.edit_of: str = pb.edit_of

    @property
    def attachments(self) -> tuple[Attachment, ...]:
        """The files the person sent with the message, each with a ``url`` to fetch it."""
        return tuple(_attachment(a) for a in self._pb.attachments)

    def __repr__(self) -> str:
        return f"<Message {self.id} from {self.user.id} in {self.room.id if self.room else 'private'}: {self.body!r}>"

    async def check_permission(self, permission: str) -> PermissionCheck:
        """Whether the sender holds ``permission`` (for finer-grained actions than the
        route's own permission, which the bot already checked)."""
        return await self._callback.check_permission(
            self.user.id, permission, room_id=self.room.id if self.room else ""
        )

    async def request_approval(
        self,
        role: str,
        *,
        count: int = 1,
        timeout: float = 600,  # noqa: ASYNC109 (the bot keeps it, and answers once it passes)
        action: str = "",
    ) -> tuple[str, ...]:
        """Ask people in chat to approve what the handler is about to do, and wait: the
        bot says in this message's room that the sender wants to run ``action`` (default:
        the message's body) and how to answer; ``count`` people holding ``role``, other
        than the sender, must say ``oco approve <id>`` within ``timeout`` seconds.
        Returns who approved (user ids); raises ApprovalDeniedError when someone holding
        the role (or the sender) denies it, or the time runs out."""
        rule = _approval_rule({"role": role, "count": count, "timeout": timeout}, "request_approval")
        request = robot_pb2.RequestApprovalRequest(message=self._pb, rule=rule, action=action)
        response = await self._callback._unary("robot", "RequestApproval", request, deadline=rule.timeout_seconds + 30)
        if response.decision == robot_pb2.RequestApprovalResponse.DECISION_APPROVED:
            return tuple(user.id for user in response.approval.approvers)
        raise ApprovalDeniedError(
            response.reason or "approval was not given",
            approval_id=response.approval.id,
            timed_out=response.decision == robot_pb2.RequestApprovalResponse.DECISION_TIMED_OUT,
        )

    async def ask(
        self,
        question: str,
        *,
        timeout: float = 300,  # noqa: ASYNC109 (the bot keeps it, and answers once it passes)
        choices: Sequence[str] = (),
        routes_too: bool = False,
        markdown: bool = False,
    ) -> Message:
        """Ask the sender ``question`` where this message came from, and wait for their
        next message there: it is the answer, returned as a Message (``answer.body``),
        and it goes to no route (unless ``routes_too``). With ``choices``, the bot itself
        asks again until the answer is one of them (ignoring case). Raises
        QuestionUnansweredError when ``timeout`` seconds pass first (``timed_out``) or
        the question is cancelled (a newer question to the same person there). Cancelling
        the waiting task (a trio cancel scope) cancels the question in the bot."""
        if not 0 < timeout <= 86400:
            raise InvalidRequestError(f"ask: timeout {timeout!r} is out of range: give 0 < timeout <= 86400 seconds")
        if any(not isinstance(c, str) or not c.strip() for c in choices) or isinstance(choices, str):
            raise InvalidRequestError(f"ask: choices {choices!r} must be a list of non-empty strings")
        question_id = secrets.token_hex(8)
        waiting = _Question()
        callback = self._callback
        callback._questions[question_id] = waiting
        room = self._pb.source.room if self.room and not self.private else None
        message = core_pb2.Message(
            body=question,
            source=core_pb2.Source(user=self._pb.source.user, room=room),
            in_reply_to=self.id,
            format=core_pb2.FORMAT_MARKDOWN if markdown else core_pb2.FORMAT_PLAIN,
            private=self.private,
            question=core_pb2.Question(
                id=question_id, timeout_seconds=math.ceil(timeout), choices=list(choices), routes_too=routes_too
            ),
        )
        try:
            await callback._send([message], with_mention=room is not None)
            # The bot ends the question at the timeout; the margin only covers a bot that
            # never says so (its stream ended, and with it this handler, as a rule).
            with trio.move_on_after(timeout + 30):
                await waiting.done.wait()
        finally:
            del callback._questions[question_id]
            if waiting.answer is None:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await callback._cancel_question(question_id)
        answer = waiting.answer
        status = answer.status if answer is not None else core_pb2.QuestionAnswer.STATUS_TIMED_OUT
        if answer is not None and status == core_pb2.QuestionAnswer.STATUS_ANSWERED:
            body = answer.message.body
            return Message(callback, core_pb2.MatchedMessage(message=answer.message, text=body, direct=self.direct))
        timed_out = status == core_pb2.QuestionAnswer.STATUS_TIMED_OUT
        raise QuestionUnansweredError(
            f"no answer to {question!r} within {timeout:g} s"
            if timed_out
            else f"the question {question!r} was cancelled",
            question_id=question_id,
            timed_out=timed_out,
        )

    def match(self, group: int | str = 0) -> str:
        """A capture group by number or name ("" when it did not take part)."""
        if isinstance(group, str):
            return self.named.get(group, "")
        return self.groups[group] if group < len(self.groups) else ""

    async def reply(self, text: str, *, markdown: bool = False, attachments: Sequence[Attachment] = ()) -> SentMessage:
        """Answer the sender, mentioning them in the room (privately if it was private),
        in the message's thread if it is in one, with ``attachments`` if given. Returns
        the message sent, to :meth:`SentMessage.edit` or :meth:`SentMessage.react` to."""
        return await self._respond(text, mention=True, markdown=markdown, action=False, attachments=attachments)

    async def send(
        self, text: str, *, markdown: bool = False, action: bool = False, attachments: Sequence[Attachment] = ()
    ) -> SentMessage:
        """Say something where the message came from (its thread too), without
        mentioning the sender. Returns the message sent."""
        return await self._respond(text, mention=False, markdown=markdown, action=action, attachments=attachments)

    async def react(self, key: str) -> None:
        """React to this message with ``key`` (an emoji, "👍"): a reaction on it where the
        service has them (Matrix), the key as a short message elsewhere (IRC, the shell)."""
        message = core_pb2.Message(
            reaction=key, source=self._where(), in_reply_to=self.id, private=self.private, thread_id=self.thread_id
        )
        await self._callback._send([message], with_mention=False)

    @asynccontextmanager
    async def typing(self, seconds: float = 30) -> AsyncIterator[None]:
        """Show the bot as typing in this message's room while the block runs, for long
        work::

            async with message.typing():
                report = await build_report()
            await message.reply(report)

        Sends a typing indication of ``seconds`` (1 to 120) and renews it shortly before
        it runs out, until the block ends (the next message there ends it too). Nothing
        in a private chat, or where the service shows no typing (IRC, the shell). A
        failure to send it is logged, never raised into the block."""
        if not 1 <= seconds <= 120:
            raise ValueError(f"typing: seconds must be from 1 to 120, not {seconds!r}")
        if self.room is None or self.private:
            yield
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_typing, math.ceil(seconds))
                try:
                    yield
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The renewing task raises nothing: the group holds only what the block
            # raised, which the block's caller should see as it was.
            if len(group.exceptions) != 1:
                raise
            inner = group.exceptions[0]
            cause, context, suppress = inner.__cause__, inner.__context__, inner.__suppress_context__
            try:
                raise inner
            finally:  # re-raising here made the group its context: put back its own
                inner.__cause__, inner.__context__, inner.__suppress_context__ = cause, context, suppress

    async def _keep_typing(self, seconds: int) -> None:
        message = core_pb2.Message(typing_seconds=seconds, source=core_pb2.Source(room=self._pb.source.room))
        # Renewed before it runs out, with room for a slow round trip; never more often
        # than every few seconds, as each renewal spends one of the callback's sends.
        every = max(seconds - 5, seconds / 2, _TYPING_RENEW_MIN)
        while True:
            try:
                await self._callback._send([message], with_mention=False)
            except Exception as exc:  # cosmetic: the work in the block goes on
                log.warning("could not show the bot typing in %s: %s", self.room.id if self.room else "?", exc)
            await trio.sleep(every)

    def _where(self) -> core_pb2.Source:
        """Where an answer to this message goes: its room, or its sender privately."""
        if self.room and not self.private:
            return core_pb2.Source(user=self._pb.source.user, room=self._pb.source.room)
        return core_pb2.Source(user=self._pb.source.user)

    async def _respond(
        self, text: str, *, mention: bool, markdown: bool, action: bool, attachments: Sequence[Attachment]
    ) -> SentMessage:
        in_room = self.room is not None and not self.private
        # Set field by field, the source copied whole: as _where() and upb's keyword
        # constructor give, for a third of the CPU (5.3 -> 1.5 µs).
        message = core_pb2.Message()
        message.body = text
        if in_room:  # its source is a user and a room, both present
            message.source.CopyFrom(self._pb.source)
        else:
            message.source.user.CopyFrom(self._pb.source.user)
        message.in_reply_to = self.id
        if markdown:
            message.format = core_pb2.FORMAT_MARKDOWN
        if action:
            message.action = True
        if self.private:
            message.private = True
        if self.thread_id:
            message.thread_id = self.thread_id
        if attachments:
            message.attachments.extend(_attachment_pb(a) for a in attachments)
        with_mention = mention and in_room
        ids = await self._callback._send([message], with_mention=with_mention)
        return SentMessage(self._callback, message, with_mention, ids[0] if ids else "")


class SentMessage:
    """A message this callback sent: what :meth:`Message.reply`, :meth:`Message.send`
    and :meth:`Callback.send` return.

    ``id`` is the bot's id for it ("matrix/~3f9a...", "memory/m4"), or "" where the chat service gives
    messages none (IRC, the shell); then :meth:`edit` sends the new text as a
    correction and :meth:`react` sends the key as a message, which is what the bot
    itself does for services without edits or reactions."""

    __slots__ = ("_callback", "_message", "_with_mention", "id")

    def __init__(self, callback: Callback, message: core_pb2.Message, with_mention: bool, id: str) -> None:
        self._callback = callback
        self._message = message
        self._with_mention = with_mention
        #: The bot's id for the message; "" where the service gives none.
        self.id = id

    def __repr__(self) -> str:
        return f"<SentMessage {self.id or '(no id)'}: {self._message.body!r}>"

    async def edit(self, text: str, *, markdown: bool = False) -> None:
        """Replace the message's text by ``text``: in place where the service can
        (Matrix), else as a new message "Correction: <text>". Each edit replaces the
        text of this same message; call it again to change it again."""
        original = self._message
        message = core_pb2.Message(
            body=text if self.id else f"Correction: {text}",
            source=original.source,
            format=core_pb2.FORMAT_MARKDOWN if markdown else core_pb2.FORMAT_PLAIN,
            private=original.private,
            thread_id=original.thread_id,
            edit_of=self.id,
        )
        await self._callback._send([message], with_mention=self._with_mention)

    async def react(self, key: str) -> None:
        """React to this message with ``key`` (an emoji): a reaction where the service
        has them (Matrix), the key as a short message elsewhere."""
        original = self._message
        source = core_pb2.Source(room=original.source.room) if original.source.room.id else original.source
        if self.id:
            message = core_pb2.Message(
                reaction=key, source=source, in_reply_to=self.id, private=original.private, thread_id=original.thread_id
            )
        else:
            message = core_pb2.Message(body=key, source=source, private=original.private, thread_id=original.thread_id)
        await self._callback._send([message], with_mention=False)


def _attachment(pb: core_pb2.Attachment) -> Attachment:
    return Attachment(pb.name, pb.data, pb.url, pb.media_type, pb.size)


def _attachment_pb(attachment: Attachment) -> core_pb2.Attachment:
    if not isinstance(attachment, Attachment):
        raise TypeError(
            f"attachments must be oco_core.Attachment objects, not {type(attachment).__name__}: "
            "Attachment(name, data=...) or Attachment(name, url=...)"
        )
    return core_pb2.Attachment(
        name=attachment.name,
        data=bytes(attachment.data),
        url=attachment.url,
        media_type=attachment.media_type,
        size=attachment.size,
    )


def _error(exc: grpc.aio.AioRpcError, service: str) -> OcoError:
    """Our exception for a failed unary call: the class the bot named in the trailing
    metadata (with its attributes), else the one the status code implies. For storage a
    bare RESOURCE_EXHAUSTED is a value too large, as older bots meant it."""
    implied = _STORAGE_IMPLIED if service == "storage" else None
    # grpc.aio hands over a grpc.aio.Metadata of (key, value) pairs; the stubs say grpc's.
    metadata: Any = exc.trailing_metadata()
    return from_status(exc.code(), exc.details() or "", metadata, implied=implied)


def _result_error(result: robot_pb2.SendResult) -> OcoError:
    """Our exception for a SendResult that reports a failure."""
    code = next((c for c in grpc.StatusCode if c.value[0] == result.code), grpc.StatusCode.UNKNOWN)
    return from_wire(code, result.error, result.error_type, result.error_fields)


class Storage:
    """This callback's key-value storage in the bot (no other callback can see it)."""

    def __init__(self, callback: Callback) -> None:
        self._cb = callback

    async def get_item(self, key: str) -> Item | None:
        """The item under ``key`` (value and version), or None."""
        response = await self._cb._unary("storage", "Get", storage_pb2.GetRequest(key=key))
        return Item(key, response.value, response.version) if response.found else None

    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, or None."""
        item = await self.get_item(key)
        return item.value if item else None

    async def set(self, key: str, value: bytes | str, *, expected_version: int | None = None) -> int:
        """Store ``value``; with ``expected_version``, only if the stored version is that
        (0: only if absent), else VersionConflictError. Returns the new version."""
        data = value.encode() if isinstance(value, str) else value
        request = storage_pb2.SetRequest(key=key, value=data)
        if expected_version is not None:
            request.expected_version = expected_version
        response = await self._cb._unary("storage", "Set", request)
        return int(response.version)

    async def delete(self, key: str, *, expected_version: int | None = None) -> bool:
        """Delete ``key``; False when it did not exist."""
        request = storage_pb2.DeleteRequest(key=key)
        if expected_version is not None:
            request.expected_version = expected_version
        response = await self._cb._unary("storage", "Delete", request)
        return bool(response.deleted)

    async def items(self, prefix: str = "", *, keys_only: bool = False, page: int = 100) -> AsyncIterator[Item]:
        """Every item whose key starts with ``prefix``, in key order, fetched a page at a time."""
        after = ""
        while True:
            request = storage_pb2.ListRequest(prefix=prefix, start_after=after, limit=page, keys_only=keys_only)
            response = await self._cb._unary("storage", "List", request)
            for item in response.items:
                yield Item(item.key, item.value, item.version)
            if not response.next_start_after:
                return
            after = response.next_start_after

    async def update(self, key: str, change: Callable[[bytes | None], bytes], *, attempts: int = 100) -> bytes:
        """Read-modify-write with compare-and-set, retried on conflict; returns the value written."""
        # Full jitter: writers contending for one key spread out instead of colliding again.
        backoff = Backoff(0.002, 0.1, jitter=1.0)
        for _ in range(attempts):
            item = await self.get_item(key)
            new = change(item.value if item else None)
            try:
                await self.set(key, new, expected_version=item.version if item else 0)
            except VersionConflictError:
                await trio.sleep(backoff.next_delay())
                continue
            return new
        raise VersionConflictError(f"gave up updating {key!r} after {attempts} conflicting attempts", -1)


class Directory:
    """The users and rooms the bot knows."""

    def __init__(self, callback: Callback) -> None:
        self._cb = callback

    async def get_user(self, user_id: str) -> User:
        """One user; UnknownTargetError when the bot has not seen them."""
        return _user(await self._cb._unary("directory", "GetUser", directory_pb2.GetUserRequest(id=user_id)))

    async def list_users(self, room_id: str = "") -> list[User]:
        """Known users, or those in ``room_id``."""
        response = await self._cb._unary("directory", "ListUsers", directory_pb2.ListUsersRequest(room_id=room_id))
        return [_user(u) for u in response.users]

    async def get_room(self, room_id: str) -> Room:
        """One room; UnknownTargetError when the bot has not seen it."""
        return _room(await self._cb._unary("directory", "GetRoom", directory_pb2.GetRoomRequest(id=room_id)))

    async def list_rooms(self) -> list[Room]:
        """Known rooms."""
        response = await self._cb._unary("directory", "ListRooms", directory_pb2.ListRoomsRequest())
        return [_room(r) for r in response.rooms]


class _Started:
    """A task status for one of several connections (ha:): the first to connect sets
    ``event``; the rest report to no one."""

    def __init__(self, event: trio.Event) -> None:
        self._event = event

    def started(self, value: object = None) -> None:
        self._event.set()


@dataclass(eq=False)
class _Question:
    """A question of ``Message.ask`` waiting for its Event.answer."""

    done: trio.Event = field(default_factory=trio.Event)
    answer: core_pb2.QuestionAnswer | None = None


@dataclass(slots=True, eq=False)
class _Connection:
    """The gRPC objects of one connection to the bot."""

    bridge: Bridge
    stubs: dict[str, Any]
    sender: DuplexSender | None = None
    #: The bot takes replies in batches (SendMessageBatches); else one by one.
    batched: bool = False
    #: Replies waiting for the batch being written before them to be taken (batched).
    outbox: robot_pb2.SendMessagesBatch = field(default_factory=robot_pb2.SendMessagesBatch)
    outbox_ready: trio.Event = field(default_factory=trio.Event)
    pending: dict[int, tuple[trio.Event, list[robot_pb2.SendResult]]] = field(default_factory=dict)
    #: Delivery ids of events handled and not yet acknowledged, and what wakes the task
    #: that acknowledges them.
    acks: list[str] = field(default_factory=list)
    acks_ready: trio.Event = field(default_factory=trio.Event)


def _first_rpc_error(group: BaseExceptionGroup[grpc.aio.AioRpcError]) -> grpc.aio.AioRpcError:
    """The first call error in a (possibly nested) exception group."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    assert isinstance(first, grpc.aio.AioRpcError)
    return first


def _first_callback_error(error: BaseException) -> CallbackError | None:
    """The refusal ``error`` is made of, when it is nothing else: one CallbackError, or a
    group (nurseries wrap errors) whose every member is one."""
    if isinstance(error, CallbackError):
        return error
    if isinstance(error, BaseExceptionGroup):
        found = [_first_callback_error(inner) for inner in error.exceptions]
        if found and all(f is not None for f in found):
            return found[0]
    return None


class _BareFormatter(logging.Formatter):
    """Each line of a record (a traceback's too) as ``LEVEL text``: the bot that launched
    the callback adds the time and ``oco.callback.<id>`` and logs it at that level."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(f"{record.levelname} {line}" for line in super().format(record).splitlines() or [""])


def _configure_logging() -> None:
    # OCO_LOG_FORMAT=bare: the bot launched this program and prefixes its output itself.
    if os.environ.get("OCO_LOG_FORMAT") == "bare":
        handler = logging.StreamHandler()
        handler.setFormatter(_BareFormatter("%(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler])
    else:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


#: Batches of events that may wait between grpc and trio (each up to the bot's
#: grpc.batch_max_events; the handlers' concurrency holds the reading back).
_BATCHES_WINDOW = 8

Opened = TypeVar("Opened")


@asynccontextmanager
async def _preferred(
    prefer: bool,
    open_preferred: Callable[[], AbstractAsyncContextManager[Opened]],
    open_fallback: Callable[[], AbstractAsyncContextManager[Opened]],
    responses: Callable[[Opened], ResponseStream],
) -> AsyncIterator[tuple[bool, Opened]]:
    """Open a call of an extension (when ``prefer``) and, when the bot answers
    UNIMPLEMENTED (it is older), its plain form instead; yields which one is open. Any
    other refusal is raised, as the plain form's would be."""
    if prefer:
        async with open_preferred() as opened:
            try:
                await responses(opened).initial_metadata()
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
            else:
                yield True, opened
                return
    async with open_fallback() as opened:
        await responses(opened).initial_metadata()
        yield False, opened


class _Flattened:
    """The items of a stream of batches (``field``: the batch's repeated field), or of
    a plain stream as batches of one, for one loop over both. A class, not an async
    generator: a reader cancelled mid-stream would leave the generator suspended."""

    def __init__(self, stream: ResponseStream, field: str = "") -> None:
        self._items = aiter(stream)
        self._field = field

    def __aiter__(self) -> _Flattened:
        return self

    async def __anext__(self) -> Sequence[Any]:
        item = await anext(self._items)
        return getattr(item, self._field) if self._field else (item,)


async def _stop_when_orphaned(scope: trio.CancelScope, parent: int, bot: int) -> None:
    """Stop a callback the bot launched (OCO_BOT_PID set) once that bot is gone: a bot
    killed with SIGKILL, or that crashed, cannot stop its callbacks, and they would dial
    its address for ever. Gone: this process was handed to init (or a subreaper), or
    the bot's process no longer exists (it died before this one started watching, or a
    wrapper that does not exec, `uv run`, stands between them and outlived it)."""
    while os.getppid() == parent and _process_exists(bot):  # noqa: ASYNC110 - the kernel sets nothing we can wait on
        await trio.sleep(_ORPHAN_CHECK)
    log.info("the bot that launched this callback (process %d) is gone; stopping", bot)
    scope.cancel()


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


class Callback:
    """A callback program: declare routes with decorators, then :meth:`run`.

    ``id``, ``secret`` and ``address`` default to OCO_CALLBACK_ID, OCO_SECRET and
    OCO_ADDRESS. The ``tls_*`` arguments default to the environment variable of the same
    name in capitals (``tls_ca``: OCO_TLS_CA, ...); when any of them is set, the callback
    dials over TLS:

    - ``tls_ca``: the CA that signed the bot's certificate (default: the system's roots);
    - ``tls_cert`` and ``tls_key``: this callback's certificate and key, when the bot
      requires client certificates (mutual TLS); the certificate names the callback's id;
    - ``tls_server_name``: the name the bot's certificate must carry, when it is not the
      host of ``address`` (also enough by itself to turn TLS on with the system's roots).

    Certificates and keys are PEM: a path (``str`` or ``Path``) or the bytes themselves.
    """

    def __init__(
        self,
        id: str | None = None,
        secret: str | None = None,
        address: str | None = None,
        *,
        concurrency: int = 64,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        tls_server_name: str | None = None,
        requires: Sequence[str] = (),
    ) -> None:
        self.id = id or os.environ.get("OCO_CALLBACK_ID", "")
        #: The specific data stores this callback needs; a bot that lacks one refuses it.
        self.requires = list(requires)
        self._secret = secret or os.environ.get("OCO_SECRET", "")
        self.address = address or os.environ.get("OCO_ADDRESS", "127.0.0.1:50051")
        #: Several bots (ha:), comma-separated: one connection to each; events come from
        #: the active one, and a call a standby refuses goes to the one it names.
        self._addresses = [a.strip() for a in self.address.split(",") if a.strip()]
        self._connections: dict[str, _Connection] = {}
        self._active = ""
        self._tls_ca = tls_ca or os.environ.get("OCO_TLS_CA") or None
        self._tls_cert = tls_cert or os.environ.get("OCO_TLS_CERT") or None
        self._tls_key = tls_key or os.environ.get("OCO_TLS_KEY") or None
        self._tls_server_name = tls_server_name or os.environ.get("OCO_TLS_SERVER_NAME") or None
        self._over_tls = False
        self._routes: list[_Route] = []
        self._membership: list[Callable[[Membership], Awaitable[None]]] = []
        self._reactions: list[Callable[[Reaction], Awaitable[None]]] = []
        self._edits: list[Handler] = []
        self._webhooks: list[_Webhook] = []
        self._schedules: list[_Scheduled] = []
        self._subscribed: list[_Subscribed] = []
        self._limiter = trio.CapacityLimiter(concurrency)
        #: Questions of Message.ask waiting for their answers, by id.
        self._questions: dict[str, _Question] = {}
        self._connected = trio.Event()
        self._request_ids = itertools.count(1)
        #: Use the bot's batched streams when it has them (False: the plain ones, to
        #: compare them in benchmarks and tests).
        self._batches = True
        self.storage = Storage(self)
        self.directory = Directory(self)

    def __repr__(self) -> str:
        return f"<Callback {self.id!r} → {self.address}>"  # never the secret

    # -- declaring -------------------------------------------------------------------

    def hear(
        self,
        pattern: str,
        *,
        help: str = "",
        id: str | None = None,
        ignore_case: bool = False,
        permission: str = "",
        durable: bool = False,
        durable_ttl: float | None = None,
        approval: Mapping[str, Any] | None = None,
    ) -> Callable[[F], F]:
        """Run the decorated handler for every message that matches ``pattern`` (RE2).
        With ``permission``, only messages from people who hold it reach the handler.
        A pattern that is not valid RE2 raises InvalidPatternError here, naming it.
        ``durable`` and ``approval``: see :meth:`respond`."""
        return self._route(pattern, False, help, id, ignore_case, permission, durable, durable_ttl, approval)

    def respond(
        self,
        pattern: str,
        *,
        help: str = "",
        id: str | None = None,
        ignore_case: bool = False,
        permission: str = "",
        durable: bool = False,
        durable_ttl: float | None = None,
        approval: Mapping[str, Any] | None = None,
    ) -> Callable[[F], F]:
        """Run the decorated handler for messages addressed to the bot ("oco: deploy x")
        whose text after the address matches ``pattern`` (RE2). With ``permission``,
        the bot checks it first and tells a person who lacks it; the handler never runs.
        A pattern that is not valid RE2 raises InvalidPatternError here, naming it.

        ``durable``: a match that comes while this callback is not connected (restarting
        for a deploy) waits in the bot, for ``durable_ttl`` seconds (default: the bot's
        ``events.chat_ttl``, 30 s), and a match whose handler was cut short is delivered
        again; the SDK acknowledges each after its handler.

        ``approval``: ``{"role": "approvers", "count": 1, "timeout": 600}`` (count and
        timeout in seconds optional): a match waits until that many people holding the
        role, not the sender, approve it in chat (``oco approve <id>``); the handler sees
        who in :attr:`Message.approved_by`. The operator's ``route_rules`` win over it."""
        return self._route(pattern, True, help, id, ignore_case, permission, durable, durable_ttl, approval)

    def _route(
        self,
        pattern: str,
        respond: bool,
        help: str,
        id: str | None,
        ignore_case: bool,
        permission: str,
        durable: bool,
        durable_ttl: float | None,
        approval: Mapping[str, Any] | None = None,
    ) -> Callable[[F], F]:
        if durable_ttl is not None and not durable:
            raise ValueError("durable_ttl is for durable routes; pass durable=True too")
        ttl = whole_seconds(durable_ttl, "durable_ttl") if durable_ttl is not None else 0
        rule = _approval_rule(dict(approval), "approval") if approval is not None else None

        def decorate(handler: F) -> F:
            route_id = id or handler.__name__
            if any(r.id == route_id for r in self._routes):
                raise ValueError(f"two routes are called {route_id!r}; pass id=... to tell them apart")
            try:
                # The bot's own check, here: a bad pattern fails where it is written, not
                # as a refusal after connecting.
                compile_pattern(pattern, ignore_case)
            except InvalidPatternError as exc:
                exc.add_note(f"in route {route_id!r} of callback {self.id!r}")
                raise
            self._routes.append(
                _Route(pattern, respond, help, route_id, ignore_case, handler, permission, durable, ttl, rule)
            )
            return handler

        return decorate

    def webhook(
        self, method: str, path: str, *, asynchronous: bool = False, id: str | None = None, help: str = ""
    ) -> Callable[[W], W]:
        """Serve the decorated handler at ``/hooks/<callback id><path>`` on the bot's HTTP
        server (``method``: "POST", "GET"..., or "*" for any; a last path segment
        ``{rest}`` takes any remainder: "/github/{rest}")::

            @bot.webhook("POST", "/ci")
            async def ci(request: WebhookRequest) -> Response | None:
                build = request.json()
                await bot.send(f"build {build['id']}: {build['status']}", room="irc/#ops")
                return Response.json({"ok": True})

        The caller waits for the handler's :class:`Response` (None answers 204; a handler
        that raises answers 500, its traceback in this callback's log) for at most the
        bot's ``http.webhook_timeout`` (504 after). ``asynchronous=True``: the bot answers
        202 at once and keeps the request until the handler has run, even across a
        restart of this callback; what the handler returns is ignored.
        """
        from ._webhooks import webhook_route_problem  # the bot's own check: only when used

        method = method.strip().upper()
        route = robot_pb2.WebhookRoute(
            id=id or f"{method} {path}", method=method, path=path, asynchronous=asynchronous, help=help
        )
        # A bad route fails where it is written, not as a refusal after connecting.
        problem = webhook_route_problem(route)
        if problem is not None:
            raise ValueError(problem)

        def decorate(handler: W) -> W:
            for known in self._webhooks:
                if known.route.id == route.id:
                    raise ValueError(f"two webhook routes are called {route.id!r}; pass id=... to tell them apart")
                if (known.route.method, known.route.path) == (method, path):
                    raise ValueError(f"webhook route {method} {path} is declared twice")
            self._webhooks.append(_Webhook(route, handler))
            return handler

        return decorate

    def schedule(self, cron: str, *, tz: str = "", id: str | None = None, catch_up: float = 0) -> Callable[[S], S]:
        """Run the decorated handler whenever the five-field cron expression ``cron``
        comes due ("*/5 * * * *", "0 9 * * mon-fri"), read in the IANA time zone ``tz``
        ("Europe/Paris"; UTC by default)::

            @bot.schedule("0 9 * * mon-fri", tz="Europe/Paris")
            async def standup(firing: ScheduleFiring) -> None:
                await bot.send("stand-up time", room="irc/#team")

        Each slot fires once, for one replica of this callback, and is delivered again if
        its handler was cut short. A slot missed while no bot ran fires late when it is at
        most ``catch_up`` seconds old (0: skipped). ``id`` defaults to ``cron``.
        """
        cron = " ".join(cron.split())
        schedule = robot_pb2.Schedule(
            id=id or cron, cron=cron, time_zone=tz, catch_up_seconds=whole_seconds(catch_up, "catch_up")
        )
        return self._schedule(schedule)

    def every(
        self, seconds: float = 0, *, minutes: float = 0, hours: float = 0, id: str | None = None, catch_up: float = 0
    ) -> Callable[[S], S]:
        """Run the decorated handler every so long (slots aligned to the Unix epoch, so
        ``every(minutes=5)`` fires at :00, :05...; rounded up to whole seconds)::

            @bot.every(seconds=30)
            async def heartbeat(firing: ScheduleFiring) -> None: ...

        ``id`` defaults to "every <n>s"; ``catch_up`` as for :meth:`schedule`."""
        total = whole_seconds(seconds + 60 * minutes + 3600 * hours, "every")
        if total < 1:
            raise ValueError("every needs a positive interval: every(seconds=30), every(minutes=5)...")
        schedule = robot_pb2.Schedule(
            id=id or f"every {total}s", every_seconds=total, catch_up_seconds=whole_seconds(catch_up, "catch_up")
        )
        return self._schedule(schedule)

    def _schedule(self, schedule: robot_pb2.Schedule) -> Callable[[S], S]:
        from ._schedules import schedule_problem  # the bot's own check: only when used

        problem = schedule_problem(schedule)
        if problem is not None:
            raise ValueError(problem)

        def decorate(handler: S) -> S:
            if any(s.schedule.id == schedule.id for s in self._schedules):
                raise ValueError(f"two schedules are called {schedule.id!r}; pass id=... to tell them apart")
            self._schedules.append(_Scheduled(schedule, handler))
            return handler

        return decorate

    def on_event(self, topic: str) -> Callable[[E], E]:
        """Run the decorated handler for every event published to a topic ``topic``
        names: dot-separated segments, ``*`` matching one segment and a final ``#`` any
        number ("deploys.*", "oco.#"). Each event reaches one replica of this callback,
        and is delivered again if its handler was cut short::

            @bot.on_event("deploys.*")
            async def on_deploy(event: PublishedEvent) -> None:
                deploy = event.json()

        The bot's own topics: ``oco.callback.connected``, ``oco.callback.disconnected``,
        ``oco.membership``, ``oco.topic`` (JSON payloads). Needs the capability
        (``callbacks[].capabilities.subscribe``), as :meth:`publish` does ``publish``."""
        from ._events import topic_pattern_problem  # pulls in the config models: only when used

        problem = topic_pattern_problem(topic)
        if problem is not None:
            raise ValueError(problem)

        def decorate(handler: E) -> E:
            self._subscribed.append(_Subscribed(topic, handler))
            return handler

        return decorate

    def on_membership(
        self, handler: Callable[[Membership], Awaitable[None]]
    ) -> Callable[[Membership], Awaitable[None]]:
        """Run the decorated handler when users enter or leave rooms."""
        self._membership.append(handler)
        return handler

    def on_reaction(self, handler: Callable[[Reaction], Awaitable[None]]) -> Callable[[Reaction], Awaitable[None]]:
        """Run the decorated handler when someone reacts to a message (a Matrix
        reaction), with a :class:`Reaction`. Declaring one asks the bot for reactions;
        each reaches one replica of this callback::

            @bot.on_reaction
            async def reacted(reaction: Reaction) -> None:
                if reaction.key == "👍" and reaction.message_id in waiting_for_approval: ...
        """
        self._reactions.append(handler)
        return handler

    def on_edit(self, handler: Handler) -> Handler:
        """Run the decorated handler when someone edits a message they sent, with the
        edited :class:`Message`: its new text in ``body``, the id of the message edited in
        ``edit_of``. Declaring one asks the bot for edits; an edit never matches a route
        (it is not a new command)."""
        self._edits.append(handler)
        return handler

    # -- talking to the bot ----------------------------------------------------------

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._secret}"),)

    async def _ready(self, avoid: _Connection | None = None) -> _Connection:
        """A connected connection: the one the event being handled came from, else the
        one to the active bot (ha:) when known, else any (not ``avoid``, if another is)."""
        if avoid is None:  # a handler's call, the usual case: answer where the event came from
            origin = _origin.get()
            if origin is not None and origin.sender is not None and origin in self._connections.values():
                return origin
        while True:
            # In OCO_ADDRESS's order: the same bot first each time, while it is up.
            connected = (self._connections.get(a) for a in self._addresses)
            live = [c for c in connected if c is not None and c.sender is not None]
            origin = _origin.get() if avoid is None else None
            preferred = self._connections.get(self._active)
            for candidate in (origin, preferred, *live):
                if candidate is not None and candidate in live and (candidate is not avoid or len(live) == 1):
                    return candidate
            await self._connected.wait()
            await trio.sleep(0.01)

    async def _following_active(self, call: Callable[[_Connection], Awaitable[T]]) -> T:
        """``call`` on a connection; when a standby refuses it (StandbyError, ha:), again
        on the bot it names (or the next one), for up to :data:`_STANDBY_RETRY` seconds."""
        connection = await self._ready()
        deadline = trio.current_time() + _STANDBY_RETRY
        while True:
            try:
                return await call(connection)
            except StandbyError as exc:
                if len(self._addresses) < 2 or trio.current_time() > deadline:
                    raise
                self._active = exc.active_address
                named = self._connections.get(exc.active_address)
                if named is None or named is connection or named.sender is None:
                    await trio.sleep(0.2)  # a takeover under way: the next look names the new one
                if named is not None and named is not connection and named.sender is not None:
                    connection = named
                else:
                    connection = await self._ready(avoid=connection)

    async def _unary(self, service: str, method: str, request: Any, *, deadline: float = _UNARY_DEADLINE) -> Any:
        """One unary call; a failure raises the exception the bot named (see
        :func:`._errors.from_status`): QuotaExceededError, VersionConflictError..."""

        async def on(connection: _Connection) -> Any:
            call = getattr(connection.stubs[service], method)
            try:
                return await connection.bridge.run_asyncio(
                    lambda: call(request, metadata=self._metadata(), timeout=deadline)
                )
            except grpc.aio.AioRpcError as exc:
                raise _error(exc, service) from None

        return await self._following_active(on)

    async def datastore(self, type: str, *, refresh: bool = False) -> DataStore:
        """Access to this callback's own corner of the data store ``type`` (provisioned
        by the bot on first use). When the database refuses what you were given, ask
        again with ``refresh=True``: the operator may have rotated the credentials, or
        the database forgotten them (a restarted Redis), and the bot provisions again.
        DataStoreUnavailableError when the bot offers no such data store,
        CapabilityError when this callback may not use it."""
        request = datastores_pb2.GetDataStoreRequest(type=type, refresh=refresh)
        response = await self._unary("datastores", "GetDataStore", request)
        return DataStore(
            response.type, response.url, response.namespace, dict(response.details), int(response.generation)
        )

    async def offered_datastores(self) -> list[str]:
        """The data-store types the bot offers."""
        response = await self._unary("datastores", "ListDataStores", datastores_pb2.ListDataStoresRequest())
        return list(response.types)

    async def publish(
        self,
        topic: str,
        payload: bytes | str | Mapping[str, Any] | list[Any] = b"",
        *,
        attributes: Mapping[str, str] | None = None,
    ) -> str:
        """Publish an event to ``topic`` ("deploys.finished"): every callback that
        subscribes to it (:meth:`on_event`) gets it once, even one not connected now
        (the bot keeps it for ``events.ttl``). ``payload``: bytes as they are, text in
        UTF-8, anything else as JSON. Returns the event's id.

        CapabilityError when this callback's ``capabilities.publish`` does not name the
        topic; InvalidRequestError for a malformed topic or one under ``oco.``;
        RequestTooLargeError beyond the bot's ``events.max_event_bytes``."""
        request = robot_pb2.PublishRequest(
            topic=topic, payload=encode_payload(topic, payload), attributes=dict(attributes or {})
        )
        response = await self._unary("robot", "Publish", request)
        return str(response.id)

    async def fetch_attachment(self, attachment: Attachment | str) -> bytes:
        """The content of a file a person sent (one of :attr:`Message.attachments`, or
        its ``url``), fetched by the bot with its own credentials where the chat service
        needs them (Matrix). UnknownTargetError for a url the bot did not deliver lately;
        RequestTooLargeError past the bot's ``bot.max_attachment_bytes``."""
        url = attachment if isinstance(attachment, str) else attachment.url
        response = await self._unary("robot", "GetAttachment", robot_pb2.GetAttachmentRequest(url=url))
        return bytes(response.data)

    async def check_permission(self, user_id: str, permission: str, *, room_id: str = "") -> PermissionCheck:
        """Whether the user (``"irc/alice"``) holds ``permission``; the bot records the
        question and its answer in its audit log."""
        response = await self._unary(
            "authorization",
            "CheckPermission",
            authorization_pb2.CheckPermissionRequest(user_id=user_id, permission=permission, room_id=room_id),
        )
        return PermissionCheck(response.allowed, response.reason, tuple(response.roles), response.person_id)

    async def send(
        self,
        text: str,
        *,
        room: str | None = None,
        user: str | None = None,
        mention: bool = False,
        markdown: bool = False,
        attachments: Sequence[Attachment] = (),
        thread_id: str = "",
    ) -> SentMessage:
        """Send a message to a room (``"irc/#ops"``), a user privately, or a user in a
        room; with ``attachments`` (see :class:`Attachment`), in the thread
        ``thread_id`` (a :attr:`Message.thread_id`) if given. Returns the message sent,
        to :meth:`SentMessage.edit` or :meth:`SentMessage.react` to."""
        source = core_pb2.Source(
            room=core_pb2.Room(id=room) if room else None, user=core_pb2.User(id=user) if user else None
        )
        message = core_pb2.Message(
            body=text,
            source=source,
            format=core_pb2.FORMAT_MARKDOWN if markdown else core_pb2.FORMAT_PLAIN,
            thread_id=thread_id,
        )
        if attachments:
            message.attachments.extend(_attachment_pb(a) for a in attachments)
        ids = await self._send([message], with_mention=mention)
        return SentMessage(self, message, mention, ids[0] if ids else "")

    async def _send(self, messages: Sequence[core_pb2.Message], *, with_mention: bool) -> Sequence[str]:
        """Send ``messages`` in one request; the bot's id of each ("" where the service
        gives none, and none at all from a bot older than message ids)."""
        return await self._following_active(partial(self._send_on, messages=messages, with_mention=with_mention))

    async def _send_on(
        self, connection: _Connection, *, messages: Sequence[core_pb2.Message], with_mention: bool
    ) -> Sequence[str]:
        if connection.sender is None:
            raise CallbackError("the connection to the bot was lost before the message could be sent")
        request_id = next(self._request_ids)
        done = trio.Event()
        slot: list[robot_pb2.SendResult] = []
        connection.pending[request_id] = (done, slot)
        # Batched, the request is made in the batch it goes in (not made, then copied in).
        request = connection.outbox.requests.add() if connection.batched else robot_pb2.SendMessagesRequest()
        request.request_id = request_id
        if with_mention:
            request.WithMention = True
        request.messages.extend(messages)
        try:
            if connection.batched:
                connection.outbox_ready.set()
            else:
                await connection.sender.send(request)
            await done.wait()
        finally:
            connection.pending.pop(request_id, None)
        if not slot:
            raise CallbackError("the connection to the bot was lost before it confirmed the message")
        result = slot[0]
        if result.code:
            raise _result_error(result)
        return result.message_ids

    # -- running ---------------------------------------------------------------------

    def run(self) -> None:
        """Run until interrupted (SIGINT or SIGTERM); configure logging if nobody did."""
        if not logging.getLogger().handlers:
            _configure_logging()
        try:
            trio.run(self._serve_until_signalled)
        except (CallbackError, BaseExceptionGroup) as exc:
            # Nurseries wrap it; the refusal is what the operator needs, on one line.
            refusal = _first_callback_error(exc)
            if refusal is None:
                raise
            # The supervisor of a launched callback does not restart one that exits so.
            # Logged, and printed too when no handler would show it.
            log.error("callback %r: %s", self.id, refusal)
            if not log.isEnabledFor(logging.ERROR) or not logging.getLogger().handlers:
                print(f"callback {self.id!r}: {refusal}", file=sys.stderr)
            raise SystemExit(EXIT_REFUSED) from None
        except KeyboardInterrupt:
            pass

    async def _serve_until_signalled(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.serve)
                launcher = os.environ.get("OCO_BOT_PID", "")
                if launcher.isdigit():
                    nursery.start_soon(_stop_when_orphaned, nursery.cancel_scope, os.getppid(), int(launcher))
                async for signum in signals:
                    log.info("received %s; stopping", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, listen and handle messages until cancelled, reconnecting with backoff.

        ``task_status.started()`` is called once the first Listen stream is registered.
        Raises CallbackError when the bot refuses the callback (bad secret, bad pattern).
        """
        if not self._secret:
            raise CallbackError("no secret: set OCO_SECRET or pass secret=... (the bot's operator has it)")
        if not self.id:
            raise CallbackError("no callback id: set OCO_CALLBACK_ID or pass id=...")
        try:
            tls = await trio.to_thread.run_sync(
                load_client_tls, self._tls_ca, self._tls_cert, self._tls_key, self._tls_server_name
            )
        except ValueError as exc:
            raise CallbackError(str(exc)) from None
        self._over_tls = tls is not None
        if len(self._addresses) == 1:
            await self._serve_one(self._addresses[0], tls, task_status)
            return
        # Several bots (ha:): one connection to each, each reconnecting on its own; ready
        # once the first is connected.
        first = trio.Event()
        async with trio.open_nursery() as nursery:
            for address in self._addresses:
                nursery.start_soon(partial(self._serve_one, address, tls, _Started(first)))
            await first.wait()
            task_status.started()

    async def _serve_one(self, address: str, tls: Any, task_status: Any) -> None:
        async with open_bridge() as bridge:
            channel = await bridge.open_channel(address, _CHANNEL_OPTIONS, tls)
            stubs = {
                "robot": robot_pb2_grpc.RobotStub(channel),
                "storage": storage_pb2_grpc.StorageStub(channel),
                "directory": directory_pb2_grpc.DirectoryStub(channel),
                "authorization": authorization_pb2_grpc.AuthorizationStub(channel),
                "datastores": datastores_pb2_grpc.DataStoresStub(channel),
            }
            backoff = Backoff(0.2, 10.0)
            started = False
            try:
                while True:
                    connection = _Connection(bridge, stubs)
                    what = "the bot ended the Listen stream"
                    try:
                        async with trio.open_nursery() as nursery:
                            await nursery.start(self._listen, connection, address)
                            if not started:
                                started = True
                                task_status.started()
                            backoff.reset()
                    except* grpc.aio.AioRpcError as group:
                        error = _first_rpc_error(group)
                        if error.code() in _FATAL:
                            raise CallbackError(f"the bot refused this callback: {error.details()}") from None
                        # The details tell a bot that is down from a TLS handshake that fails.
                        how = "lost" if connection.sender is not None else "failed"
                        why = f"{error.code().name}: {error.details()}"
                        if error.code() == grpc.StatusCode.INTERNAL and error.details() == "Internal error from Core":
                            # grpc's client says so of a write that raced the bot closing
                            # the stream (grpc/grpc#36066): not an error in the bot.
                            why = "the bot closed the stream while this callback was writing to it"
                        what = f"connection to the bot at {address} {how} ({why}){self._hint(error.details() or '')}"
                    finally:
                        if self._connections.get(address) is connection:
                            del self._connections[address]
                        if not self._connections:
                            self._connected = trio.Event()
                        for done, _ in connection.pending.values():
                            done.set()
                    # One line a try, saying what happened and when the next try is.
                    delay = backoff.next_delay()
                    log.warning("%s; reconnecting in %.1f s", what, delay)
                    await trio.sleep(delay)
            finally:
                with trio.CancelScope(shield=True):
                    await bridge.close_channel(channel)

    def _hint(self, details: str) -> str:
        """The likely fix for a connection that failed so, when the details tell."""
        if "Connection refused" in details:
            return " — is the bot running, and is its address (OCO_ADDRESS) right?"
        if self._over_tls and "WRONG_VERSION_NUMBER" in details:
            return " — if the bot serves plaintext gRPC, unset OCO_TLS_CA and OCO_TLS_SERVER_NAME"
        if self._over_tls and "CERTIFICATE_VERIFY_FAILED" in details:
            return " — is OCO_TLS_CA the CA that signed the bot's certificate, and does it name this host?"
        if not self._over_tls and "Socket closed" in details:
            # A TLS server closes a plaintext client's connection without a word.
            return " — if the bot serves gRPC over TLS, set OCO_TLS_CA (or OCO_TLS_SERVER_NAME)"
        return ""

    async def _listen(self, connection: _Connection, address: str, *, task_status: trio.TaskStatus[None]) -> None:
        request = robot_pb2.ListenRequest(
            plugin_id=self.id,
            routes=[
                robot_pb2.Route(
                    id=r.id,
                    pattern=r.pattern,
                    respond=r.respond,
                    help=r.help,
                    ignore_case=r.ignore_case,
                    permission=r.permission,
                    durable=r.durable,
                    durable_ttl_seconds=r.durable_ttl,
                    approval=r.approval,
                )
                for r in self._routes
            ],
            events=[
                kind
                for kind, handlers in (
                    (robot_pb2.EVENT_KIND_MEMBERSHIP, self._membership),
                    (robot_pb2.EVENT_KIND_REACTION, self._reactions),
                    (robot_pb2.EVENT_KIND_EDIT, self._edits),
                )
                if handlers
            ],
            requires=self.requires,
            webhooks=[w.route for w in self._webhooks],
            schedules=[s.schedule for s in self._schedules],
            topics=list(dict.fromkeys(s.pattern for s in self._subscribed)),
            # Durable events (asynchronous webhooks, firings, published events, matches
            # of durable routes) are acknowledged after their handler: at least once.
            acknowledge=True,
        )
        async with self._open_streams(connection, request) as (events, results):
            self._connections[address] = connection
            self._connected.set()
            log.info(
                "callback %r connected to %s%s with %d route(s)%s",
                self.id,
                address,
                " over TLS" if self._over_tls else "",
                len(self._routes),
                self._declared(),
            )
            task_status.started()
            async with trio.open_nursery() as handlers:
                handlers.start_soon(self._read_results, connection, results, handlers.cancel_scope)
                handlers.start_soon(self._acknowledge, connection)
                if connection.batched:
                    handlers.start_soon(self._write_batches, connection)
                routes = {r.id: r for r in self._routes}
                async for batch in events:
                    for event in batch:
                        if event.dropped:
                            log.warning(
                                "callback %r fell behind: the bot dropped %d event(s) for it since the previous one, "
                                "because its queue in the bot was full; handle events faster (or raise concurrency=, "
                                "now %d), or ask the bot's operator for a longer grpc.stream_queue",
                                self.id,
                                event.dropped,
                                int(self._limiter.total_tokens),
                            )
                        if event.HasField("answer"):  # not a handler's: it wakes one, even at the limit
                            self._answered(event.answer)
                            continue
                        token = object()  # protobuf messages are unhashable borrowers
                        # A free token is taken without a pass of trio's scheduler (which
                        # acquire_on_behalf_of makes even then): the reading cannot hog the
                        # thread, as at most `concurrency` handlers start before it waits.
                        await trio.lowlevel.checkpoint_if_cancelled()
                        try:
                            self._limiter.acquire_on_behalf_of_nowait(token)
                        except trio.WouldBlock:
                            await self._limiter.acquire_on_behalf_of(token)
                        handlers.start_soon(self._dispatch, connection, routes, event, token)
                handlers.cancel_scope.cancel()

    @asynccontextmanager
    async def _open_streams(
        self, connection: _Connection, request: robot_pb2.ListenRequest
    ) -> AsyncIterator[tuple[AsyncIterator[Sequence[core_pb2.Event]], AsyncIterator[Sequence[robot_pb2.SendResult]]]]:
        """Open the Listen stream and the stream replies go on; with a bot that has them,
        their batched forms (ListenBatches, SendMessageBatches), which cost one stream
        message per batch instead of one per event and per reply. A bot without them
        answers UNIMPLEMENTED, and the plain ones are opened instead."""
        robot = connection.stubs["robot"]
        metadata = self._metadata()
        bridge = connection.bridge
        async with (
            _preferred(
                self._batches,
                lambda: bridge.open_response_stream(
                    lambda: robot.ListenBatches(request, metadata=metadata), window=_BATCHES_WINDOW
                ),
                lambda: bridge.open_response_stream(lambda: robot.Listen(request, metadata=metadata)),
                lambda stream: stream,
            ) as (events_batched, events),
            # One batch crosses to grpc at a time: while it is written, replies of
            # handlers that finish gather in the outbox for the next (_write_batches).
            _preferred(
                self._batches,
                lambda: bridge.open_duplex_stream(
                    lambda requests: robot.SendMessageBatches(requests, metadata=metadata), window=1
                ),
                lambda: bridge.open_duplex_stream(
                    lambda requests: robot.SendMessageStream(requests, metadata=metadata)
                ),
                lambda duplex: duplex[1],
            ) as (replies_batched, (sender, results)),
        ):
            connection.batched = replies_batched
            connection.sender = sender
            yield (
                _Flattened(events, "events" if events_batched else ""),
                _Flattened(results, "results" if replies_batched else ""),
            )

    async def _write_batches(self, connection: _Connection) -> None:
        """Send the replies in the outbox, all that wait in one batch. A lone reply goes
        at once; replies of handlers that finish while the previous batch is crossing to
        grpc wait for it and go together."""
        assert connection.sender is not None
        while True:
            await connection.outbox_ready.wait()
            connection.outbox_ready = trio.Event()
            batch, connection.outbox = connection.outbox, robot_pb2.SendMessagesBatch()
            await connection.sender.send(batch)

    async def _read_results(
        self,
        connection: _Connection,
        results: AsyncIterator[Sequence[robot_pb2.SendResult]],
        scope: trio.CancelScope,
    ) -> None:
        async for batch in results:
            for result in batch:
                entry = connection.pending.get(result.request_id)
                if entry is not None:
                    entry[1].append(result)
                    entry[0].set()
        # The bot ended the stream of results (it is shutting down): no reply will be
        # confirmed now, and handlers waiting for one hold the concurrency the events
        # loop needs to notice that Listen ended too. This connection is over.
        scope.cancel()

    def _declared(self) -> str:
        """The webhooks, schedules and topics declared, for the log line on connecting."""
        parts = [
            f"{len(items)} {name}" for items, name in ((self._webhooks, "webhook(s)"), (self._schedules, "schedule(s)"))
        ]
        parts.append(f"{len(self._subscribed)} event handler(s)")
        declared = [p for p in parts if not p.startswith("0 ")]
        return f", {', '.join(declared)}" if declared else ""

    async def _acknowledge(self, connection: _Connection) -> None:
        """Acknowledge handled events, in batches: whatever is ready when a call can go
        goes in one call, and a lone acknowledgement goes at once."""
        robot = connection.stubs["robot"]
        while True:
            await connection.acks_ready.wait()
            # Handlers finishing in this same moment join the batch: one pass of trio's
            # scheduler, no wait.
            await trio.lowlevel.checkpoint()
            connection.acks_ready = trio.Event()
            ids, connection.acks = connection.acks, []
            request = robot_pb2.AcknowledgeRequest(delivery_ids=ids)
            try:
                await connection.bridge.run_asyncio(
                    partial(robot.Acknowledge, request, metadata=self._metadata(), timeout=_UNARY_DEADLINE)
                )
            except grpc.aio.AioRpcError as exc:
                # Not the end of the connection: the bot delivers these again (at least once).
                log.warning(
                    "could not acknowledge %d event(s) (%s: %s); the bot will deliver them again",
                    len(ids),
                    exc.code().name,
                    exc.details(),
                )

    def _answered(self, answer: core_pb2.QuestionAnswer) -> None:
        # Every replica's stream gets the answer; only the one that asked knows the id.
        waiting = self._questions.get(answer.question_id)
        if waiting is not None and waiting.answer is None:
            waiting.answer = answer
            waiting.done.set()

    async def _cancel_question(self, question_id: str) -> None:
        try:
            await self._unary("robot", "CancelQuestion", robot_pb2.CancelQuestionRequest(question_id=question_id))
        except OcoError as exc:  # the bot ends it at its timeout anyway
            log.debug("could not cancel question %s: %s", question_id, exc)

    def _acknowledged(self, connection: _Connection, delivery_id: str) -> None:
        connection.acks.append(delivery_id)
        connection.acks_ready.set()

    async def _dispatch(
        self, connection: _Connection, routes: dict[str, _Route], event: core_pb2.Event, token: object
    ) -> None:
        # The supervision boundary for handlers: one failing handler is logged, never
        # takes the callback down. An event kept for acknowledgement is acknowledged
        # after its handler returned or raised (else it would come back forever), not
        # when it was cancelled (the connection ended: the bot delivers it again).
        kind = event.WhichOneof("type")
        _origin.set(connection)  # only the active bot (ha:) hands out events: answer there
        try:
            try:
                await self._handle(connection, routes, kind, event)
            except Exception:
                log.exception(
                    "handler failed for %s%s", kind, " (acknowledged all the same)" if event.delivery_id else ""
                )
            if event.delivery_id:
                self._acknowledged(connection, event.delivery_id)
        finally:
            self._limiter.release_on_behalf_of(token)

    async def _handle(
        self, connection: _Connection, routes: dict[str, _Route], kind: str | None, event: core_pb2.Event
    ) -> None:
        if kind == "matched_message":
            matched = event.matched_message
            route = routes.get(matched.route_id)
            if route is None:
                log.debug("no handler for route %r", matched.route_id)
                return
            message = Message(self, matched)
            message.delivery_id = event.delivery_id
            message.redelivered = event.redelivered
            approvers = event.approval.approvers
            if approvers:
                message.approved_by = tuple(user.id for user in approvers)
            await route.handler(message)
        elif kind == "membership_change":
            change = event.membership_change
            membership = Membership(
                kind=core_pb2.MembershipChange.Kind.Name(change.kind).removeprefix("KIND_").lower(),
                user=_user(change.user),
                room=_room(change.room),
                actor=_user(change.actor) if change.HasField("actor") else None,
                reason=change.reason,
                previous=_user(change.previous) if change.HasField("previous") else None,
            )
            for handler in self._membership:
                await handler(membership)
        elif kind == "reaction":
            pb = event.reaction
            reaction = Reaction(
                message_id=pb.message_id,
                key=pb.key,
                user=_user(pb.source.user),
                room=_room(pb.source.room) if pb.source.room.id else None,
                id=pb.id,
            )
            for on_reaction in self._reactions:
                await on_reaction(reaction)
        elif kind == "edit":
            edited = Message(self, core_pb2.MatchedMessage(message=event.edit, text=event.edit.body))
            for on_edit in self._edits:
                await on_edit(edited)
        elif kind == "webhook_request":
            await self._handle_webhook(connection, event)
        elif kind == "schedule_firing":
            firing = ScheduleFiring(event)
            scheduled = next((s for s in self._schedules if s.schedule.id == firing.schedule_id), None)
            if scheduled is None:
                # The operator's callbacks[].schedules fire for this callback too.
                log.warning(
                    "schedule %r fired, and this callback has no handler for it (declare one with "
                    "@bot.schedule(..., id=%r) or @bot.every(..., id=%r))",
                    firing.schedule_id,
                    firing.schedule_id,
                    firing.schedule_id,
                )
                return
            await scheduled.handler(firing)
        elif kind == "published_event":
            from ._events import topic_matches

            published = PublishedEvent(event)
            handlers = [s.handler for s in self._subscribed if topic_matches(s.pattern, published.topic)]
            if not handlers:
                log.debug("no handler for topic %r", published.topic)
            # Every handler runs even when one fails; the first failure is logged after.
            failed: BaseException | None = None
            for on_event in handlers:
                try:
                    await on_event(published)
                except Exception as exc:
                    failed = failed or exc
            if failed is not None:
                raise failed

    async def _handle_webhook(self, connection: _Connection, event: core_pb2.Event) -> None:
        request = WebhookRequest(event)
        webhook = next((w for w in self._webhooks if w.route.id == request.route_id), None)
        response: Response | None
        try:
            if webhook is None:
                raise LookupError(f"no handler for webhook route {request.route_id!r}")
            response = await webhook.handler(request)
            if response is not None and not isinstance(response, Response):
                raise TypeError(
                    f"webhook handler {webhook.handler.__name__!r} returned a {type(response).__name__}; return a "
                    "Response (Response.json(...), Response.text(...)) or None"
                )
        except InvalidBodyError as exc:
            if request.asynchronous:
                raise
            log.warning("webhook %s %s: %s; answered 400", request.method, request.path, exc)
            response = Response.text(f"{exc}\n", status=400)
        except Exception:
            if request.asynchronous:
                raise
            log.exception("webhook handler for %s %s failed; answered 500", request.method, request.path)
            response = Response(FAILED_BODY, 500, {"content-type": "text/plain; charset=utf-8"})
        if request.asynchronous:
            return  # answered 202 by the bot already
        answer = (response or Response(status=204)).to_pb(request.id)
        robot = connection.stubs["robot"]
        try:
            await connection.bridge.run_asyncio(
                lambda: robot.RespondWebhook(answer, metadata=self._metadata(), timeout=_UNARY_DEADLINE)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            log.warning(
                "webhook %s %s: the bot no longer waits for this answer (its http.webhook_timeout passed, or its "
                "caller went away); answer faster, or declare the route asynchronous=True",
                request.method,
                request.path,
            )
