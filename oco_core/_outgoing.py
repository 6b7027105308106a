"""Outgoing: what callbacks (and the bot itself) say, checked and sent through the
adapter that an id names.

Ids callbacks see carry the adapter's instance name (``irc/#ops``, ``matrix/@a:b.org``);
here they are split again into the adapter and its native id. A request is checked
whole (size, target, capability, rate limit) before its first message goes out, so a
bad message in the middle never leaves a conversation half-sent by a mistake the bot
could have seen.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import OrderedDict
from typing import TYPE_CHECKING

from ._adapter import Attachment, ChatUser, Feature, IncomingMessage, OutgoingMessage
from ._errors import AdapterError, InvalidRequestError, RequestTooLargeError, StandbyError, UnknownTargetError
from ._proto import core_pb2, robot_pb2

if TYPE_CHECKING:
    from ._core import BotCore
    from ._incoming import AdapterLink

log = logging.getLogger(__name__)

#: The longest typing indication a message may ask for (Message.typing_seconds).
MAX_TYPING_SECONDS = 120
#: The longest file name and media type (Attachment.name, media_type), and url, in characters.
MAX_ATTACHMENT_NAME = 255
MAX_ATTACHMENT_URL = 2048
#: Markdown's punctuation, escaped in the text the bot writes for files into a Markdown body.
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~])")
_MARKDOWN = core_pb2.FORMAT_MARKDOWN


class Outgoing:
    """Resolves and sends outgoing messages, joins and parts, for one running bot."""

    def __init__(self, core: BotCore) -> None:
        self._core = core
        #: Who sent each of the latest messages that have an id, and where: the only
        #: messages a callback may edit are its own (``bot.editable_messages`` of them).
        self._senders: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def resolve(
        self, message: core_pb2.Message, with_mention: bool, index: int = 0
    ) -> tuple[AdapterLink, OutgoingMessage]:
        """Check one outgoing message and find the adapter it goes through.

        Raises InvalidRequestError, RequestTooLargeError or UnknownTargetError, naming
        the message by its ``index`` in the request.
        """
        what = f"message {index}"
        body = message.body
        limit = self._core.config.bot.max_message_bytes
        # UTF-8 takes at most 4 bytes a character: most bodies need no encoding to know.
        if len(body) * 4 > limit and (size := len(body.encode("utf-8"))) > limit:
            raise RequestTooLargeError(
                f"{what} is {size} bytes; the bot accepts at most {limit} (bot.max_message_bytes); split it"
            )
        # Each read of a sub-message makes a new Python object: each is read once.
        source = message.source
        source_user = source.user
        room_id = source.room.id
        user_id = source_user.id
        if not room_id and not user_id:
            raise InvalidRequestError(f"{what} has neither source.room.id nor source.user.id: say where it goes")
        link, native_room = self._split(room_id, what) if room_id else (None, None)
        user: ChatUser | None = None
        if user_id:
            user_link, native_user = self._split(user_id, what)
            if link is not None and user_link is not link:
                raise InvalidRequestError(f"{what}: user {user_id!r} and room {room_id!r} are on different adapters")
            link = user_link
            native_user = link.adapter.user_id(native_user)
            known = self._core.directory.users.get(user_link.name + "/" + native_user)
            # Adapters may address a private message by the mention name (IRC sends to
            # the nick): one the callback wrote counts only if it names this same user,
            # or a callback allowed to send to irc/bob could reach #secret through it.
            mention_name = source_user.mention_name
            if mention_name and link.adapter.user_id(mention_name) != native_user:
                mention_name = ""
            user = ChatUser(
                id=native_user,
                name=source_user.name or (known.name if known else ""),
                mention_name=mention_name or (known.mention_name if known else "") or native_user,
            )
        assert link is not None  # a room or a user named it, or _split raised
        private = message.private
        if private and user is None:
            raise InvalidRequestError(f"{what} is private but has no source.user.id: say whom it goes to")
        in_reply_to = message.in_reply_to
        thread_id = message.thread_id
        edit_of = message.edit_of
        reaction = message.reaction
        typing_seconds = message.typing_seconds
        prefix = link.name + "/"
        attachments = self._attachments(message, what) if message.attachments else ()
        if reaction or edit_of or typing_seconds:
            self._check_rich(message, native_room, prefix, what)
        out = OutgoingMessage(
            body=body,
            room_id=native_room,
            user=user,
            mention=bool(with_mention and user is not None),
            private=private or native_room is None,
            format="markdown" if message.format == _MARKDOWN else "plain",
            action=message.action,
            in_reply_to=in_reply_to.removeprefix(prefix) if in_reply_to.startswith(prefix) else "",
            thread_id=thread_id.removeprefix(prefix) if thread_id and thread_id.startswith(prefix) else "",
            attachments=attachments,
            edit_of=edit_of.removeprefix(prefix) if edit_of else "",
            reaction=reaction,
            typing_seconds=typing_seconds,
        )
        return link, out

    def _attachments(self, message: core_pb2.Message, what: str) -> tuple[Attachment, ...]:
        settings = self._core.config.bot
        if len(message.attachments) > settings.max_attachments:
            raise RequestTooLargeError(
                f"{what} has {len(message.attachments)} attachments; the bot accepts at most "
                f"{settings.max_attachments} a message (bot.max_attachments): send them in several messages"
            )
        attachments = []
        for n, item in enumerate(message.attachments):
            name = f"{what}, attachment {n}"
            if not item.data and not item.url:
                raise InvalidRequestError(f"{name} has neither data nor url: give the file's bytes or a link to it")
            if item.url and not item.url.startswith(("https://", "http://", "mxc://")):
                raise InvalidRequestError(f"{name}: url {item.url[:80]!r} is not an http(s) url")
            if len(item.url) > MAX_ATTACHMENT_URL:
                raise InvalidRequestError(f"{name}: its url is longer than {MAX_ATTACHMENT_URL} characters")
            if len(item.name) > MAX_ATTACHMENT_NAME or len(item.media_type) > MAX_ATTACHMENT_NAME:
                raise InvalidRequestError(
                    f"{name}: its name or media_type is longer than {MAX_ATTACHMENT_NAME} characters"
                )
            attachments.append(
                Attachment(
                    name=item.name or "attachment",
                    media_type=item.media_type,
                    url=item.url,
                    data=item.data,
                    size=len(item.data) or item.size,
                )
            )
        return tuple(attachments)

    @staticmethod
    def _check_rich(message: core_pb2.Message, native_room: str | None, prefix: str, what: str) -> None:
        if message.edit_of and not message.edit_of.startswith(prefix):
            raise InvalidRequestError(
                f"{what}: edit_of {message.edit_of!r} is not the id of a message sent through {prefix[:-1]}; "
                "use an id SendMessages returned for the bot's message"
            )
        if message.reaction:
            if message.body:
                raise InvalidRequestError(
                    f"{what}: a reaction carries no body (the key is the reaction); send text as its own message"
                )
            if not message.in_reply_to.startswith(prefix):
                raise InvalidRequestError(
                    f"{what}: a reaction needs in_reply_to, the id of the message it reacts to (one on {prefix[:-1]})"
                )
            if len(message.reaction) > 64 or message.edit_of or message.attachments:
                raise InvalidRequestError(
                    f"{what}: a reaction is a short key (an emoji, at most 64 characters), with no edit_of or "
                    "attachments"
                )
        if message.typing_seconds:
            if message.typing_seconds > MAX_TYPING_SECONDS:
                raise InvalidRequestError(
                    f"{what}: typing_seconds is {message.typing_seconds}; at most {MAX_TYPING_SECONDS}"
                )
            if message.body or message.attachments or message.reaction or message.edit_of or native_room is None:
                raise InvalidRequestError(
                    f"{what}: a typing indication (typing_seconds) goes to a room (source.room.id) and carries "
                    "nothing else: no body, attachments, reaction or edit_of"
                )

    @staticmethod
    def target(link: AdapterLink, out: OutgoingMessage) -> str:
        """Where ``out`` is delivered, as an id messages carry (``irc/#ops``,
        ``irc/bob``): the room, or the user when it is private (with or without a room)
        — what ``capabilities.send`` is checked against. A mention in a room reaches the
        room only."""
        if out.room_id and not out.private:
            return f"{link.name}/{link.adapter.room_id(out.room_id)}"
        assert out.user is not None  # resolve() refuses a private message without a user
        return f"{link.name}/{out.user.id}"  # resolve() made it the id messages carry

    def _split(self, ident: str, what: str) -> tuple[AdapterLink, str]:
        links = self._core.links
        name, sep, native = ident.partition("/")
        link = links.get(name) if sep else None
        if link is not None and native:
            return link, native
        if len(links) == 1 and not sep:  # one adapter: an id without prefix is that adapter's own
            return next(iter(links.values())), ident
        known = ", ".join(f"{n}/..." for n in links) or "none yet"
        raise UnknownTargetError(f"{what}: unknown id {ident!r}; ids start with an adapter name ({known})")

    async def send_messages(self, callback_id: str, request: robot_pb2.SendMessagesRequest) -> list[str]:
        """Send every message of ``request`` in order, after checking all of them;
        return the id of each as callbacks see ids ("" where the adapter gives none)."""
        core = self._core
        leader = core.leader
        leader.check()  # a standby's adapters are not connected: say where the active one is
        messages = request.messages
        with_mention = request.WithMention
        resolved = [self.resolve(m, with_mention, i) for i, m in enumerate(messages)]
        policy = core.policy(callback_id)
        targets = [self.target(link, out) for link, out in resolved]
        if not policy.sends_anywhere:
            for index, target in enumerate(targets):
                policy.require_send(target, f"message {index}")
        self._check_edits(callback_id, resolved, targets)
        rendered = [as_rendered(out, link.adapter.features) for link, out in resolved]
        files = 0
        for _, out in resolved:
            files += len(out.attachments)
        if files:  # else nothing was added to what resolve() checked
            self._check_sizes(resolved, rendered)
        # A file is a message of its own on most services: each counts against the rate.
        policy.take_send(len(resolved) + files)
        ids: list[str] = []
        answered: list[str] = []
        metrics = core.metrics
        stats = core.stats
        for sent, ((link, out), plain) in enumerate(zip(resolved, rendered, strict=True)):
            try:
                leader.check()  # the fence, right before it goes out (ha:)
            except StandbyError as exc:
                if not sent:
                    raise  # nothing went out: the SDK sends the whole request to the active bot
                # Part of it went out: resending the whole request elsewhere would repeat
                # those messages, so this is an AdapterError (not retried) saying how many.
                raise AdapterError(
                    f"message {sent} to {targets[sent]}: not sent, nor the ones after it: this bot stopped being "
                    f"the active one (ha:) after {sent} of {len(resolved)} message(s) went out ({exc})",
                    sent=sent,
                ) from exc
            if plain is None:  # a typing indication the service cannot show
                ids.append("")
                continue
            try:
                native_id = await link.adapter.send(plain)
            except AdapterError as exc:
                exc.sent = sent  # a retry can skip the messages that already went out
                # The adapter names its native id; the callback knows the full one.
                exc.args = (f"message {sent} to {targets[sent]}: {exc}",)
                raise
            message_id = f"{link.name}/{native_id}" if native_id else ""
            ids.append(message_id)
            if out.typing_seconds:
                continue  # not a message: neither counted nor a reply
            if message_id:
                self._remember(message_id, callback_id, targets[sent])
            stats.sent += 1
            # A reaction answers nothing: "👀" first must not read as a reply in 0 ms.
            reply_to = "" if out.reaction else messages[sent].in_reply_to
            metrics.message_sent(link.name, callback_id, reply_to)
            if reply_to:
                answered.append(reply_to)
        core.activity.replied(callback_id, answered)
        return ids

    def _check_edits(
        self, callback_id: str, resolved: list[tuple[AdapterLink, OutgoingMessage]], targets: list[str]
    ) -> None:
        """A callback edits only its own messages, where they went: never another
        callback's, nor the bot's own (an approval prompt rewritten would mislead approvers)."""
        for index, (link, out) in enumerate(resolved):
            if not out.edit_of:
                continue
            edited = f"{link.name}/{out.edit_of}"
            sender = self._senders.get(edited)
            if sender is None or sender[0] != callback_id:
                raise UnknownTargetError(
                    f"message {index}: edit_of {edited!r} is not one of this callback's messages that the bot "
                    f"remembers (the latest {self._core.config.bot.editable_messages}, bot.editable_messages)"
                )
            if sender[1] != targets[index]:
                raise InvalidRequestError(
                    f"message {index}: the edit goes to {targets[index]}, but {edited!r} went to {sender[1]}"
                )

    def _check_sizes(
        self, resolved: list[tuple[AdapterLink, OutgoingMessage]], rendered: list[OutgoingMessage | None]
    ) -> None:
        """The files of one request together, and the text the bot wrote for files an
        adapter cannot show, within their limits."""
        if not any(out.attachments for _, out in resolved):
            return  # most requests: nothing was added to what resolve() checked
        settings = self._core.config.bot
        data = sum(len(a.data) for _, out in resolved for a in out.attachments)
        if data > settings.max_attachment_bytes:
            raise RequestTooLargeError(
                f"the request's files are {data} bytes together; the bot accepts at most "
                f"{settings.max_attachment_bytes} (bot.max_attachment_bytes): send a url to them instead"
            )
        for index, ((_, out), plain) in enumerate(zip(resolved, rendered, strict=True)):
            if not out.attachments or plain is None or plain is out:
                continue  # no files here, or the adapter shows them itself
            encoded = plain.body.encode("utf-8")
            if len(encoded) > settings.max_message_bytes:
                raise RequestTooLargeError(
                    f"message {index} with its files written out as text (this chat service shows no files) "
                    f"is {len(encoded)} bytes; the bot accepts at most {settings.max_message_bytes} "
                    "(bot.max_message_bytes): send fewer files a message"
                )

    def _remember(self, message_id: str, callback_id: str, target: str) -> None:
        self._senders[message_id] = (callback_id, target)
        self._senders.move_to_end(message_id)
        while len(self._senders) > self._core.config.bot.editable_messages:
            self._senders.popitem(last=False)

    async def join(self, room: core_pb2.Room, leave: bool = False) -> None:
        """Join (or part) a room through its adapter."""
        ident = room.id or room.name
        if not ident:
            raise InvalidRequestError("the room has neither id nor name")
        self._core.leader.check()
        link, native = self._split(ident, "room")
        try:
            if leave:
                await link.adapter.part(native)
            else:
                await link.adapter.join(native)
        except AdapterError as exc:
            exc.args = (f"room {link.name}/{native}: {exc}",)  # as in send_messages: the full id
            raise

    def reply(self, adapter: str, incoming: IncomingMessage, body: str, *, mention: bool = False) -> None:
        """The bot's own answer to a person, in the room (or private chat) they wrote
        in; never waits, and a failure is logged, not raised."""
        out = OutgoingMessage(
            body=body,
            room_id=incoming.room.id if incoming.room else None,
            user=incoming.user,
            mention=mention and incoming.room is not None,
            private=incoming.room is None,
            in_reply_to=incoming.id,
            thread_id=incoming.thread_id,
        )
        link = self._core.links[adapter]
        out = as_rendered(out, link.adapter.features) or out

        async def send() -> None:
            if not self._core.leader.acting():  # fenced meanwhile (ha:): say nothing
                return
            try:
                await link.adapter.send(out)
            except AdapterError as exc:
                log.warning("could not send the bot's own reply through %s: %s", adapter, exc)
            else:
                self._core.metrics.message_sent(adapter)

        self._core.spawn(send)


def as_rendered(out: OutgoingMessage, features: Feature) -> OutgoingMessage | None:
    """``out`` as an adapter with ``features`` can send it: each rich part it does not
    render turned into plain text (see :class:`~._adapter.Feature`); None for a typing
    indication it cannot show."""
    if out.typing_seconds:
        return out if Feature.TYPING in features else None
    if not (out.reaction or out.edit_of or out.attachments or out.thread_id):
        return out  # plain text, as most replies are: nothing to look up
    changes: dict[str, object] = {}
    body = out.body
    if out.reaction and Feature.REACTIONS not in features:
        changes["reaction"] = ""
        body = out.reaction
    if out.edit_of and Feature.EDITS not in features:
        changes["edit_of"] = ""
        body = f"Correction: {body}"
    if out.attachments and Feature.ATTACHMENTS not in features:
        changes["attachments"] = ()
        lines = [_attachment_line(item, markdown=out.format == "markdown") for item in out.attachments]
        body = "\n".join([body, *lines]) if body else "\n".join(lines)
    if out.thread_id and Feature.THREADS not in features:
        changes["thread_id"] = ""
    if not changes:
        return out
    return dataclasses.replace(out, body=body, **changes)  # type: ignore[arg-type]


def _attachment_line(item: Attachment, *, markdown: bool) -> str:
    # In a Markdown body, "__init__.py" or a url with "*" in it must stay as written.
    text = (lambda value: _MARKDOWN_PUNCTUATION.sub(r"\\\1", value)) if markdown else str
    if item.url:
        return f"{text(item.name)}: {text(item.url)}"
    kind = f", {item.media_type}" if item.media_type else ""
    return text(f"{item.name} ({_size(item.size)}{kind}; files cannot be shown here)")


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    return f"{size / 1024:.1f} KiB" if size < 1 << 20 else f"{size / (1 << 20):.1f} MiB"
