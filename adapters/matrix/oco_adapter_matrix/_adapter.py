"""The Matrix adapter: sync loop, outgoing queue, end-to-end encryption, membership,
rich replies (threads, edits, reactions, files, typing)."""

from __future__ import annotations

import contextlib
import fnmatch
import html
import itertools
import logging
import math
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import nio  # type: ignore[import-untyped]  # nio ships no type information
import trio
from nio.crypto import ENCRYPTION_ENABLED  # type: ignore[import-untyped]
from nio.crypto.attachments import encrypt_attachment  # type: ignore[import-untyped]

from oco_core import AdapterError, UnknownTargetError
from oco_core.plugin import (
    Adapter,
    AdapterHost,
    Attachment,
    Backoff,
    ChatRoom,
    ChatUser,
    Feature,
    IncomingMessage,
    MembershipEvent,
    MembershipKind,
    OutgoingMessage,
    ReactionEvent,
)

from ._config import MatrixConfig
from ._format import MAX_BODY_JSON_BYTES, leading_pill, markdown_to_html, pill, split_body, strip_reply_fallback
from ._rich import (
    LOCAL_ID_PREFIX,
    MEDIA_MSGTYPES,
    SentIds,
    as_dict,
    caption,
    download_path,
    edit_content,
    file_content,
    incoming_attachment,
    link_content,
    media_type_of,
    reaction_content,
    thread_relation,
)
from ._transport import SYNC_GRACE, TokenRejectedError, Transport, UnreachableError

log = logging.getLogger(__name__)

# Keys of the adapter's own state in the core store (namespace adapter:<name>).
KEY_ACCESS_TOKEN = "access_token"  # noqa: S105  (a key name, not a secret)
KEY_DEVICE_ID = "device_id"
KEY_USER_ID = "user_id"
KEY_SYNC_TOKEN = "sync_token"  # noqa: S105  (a key name, not a secret)

# Typing indications waiting for the typing task; past this many, new ones are dropped
# (they only pile up while the homeserver cannot be reached, and are stale by then).
_TYPING_QUEUE = 32
# Timeline events a sync may return per room; more than this while the bot was away and
# the oldest are skipped (the homeserver marks the timeline "limited").
_TIMELINE_LIMIT = 50


@dataclass
class _Pending:
    """One event accepted by :meth:`MatrixAdapter.send`, waiting for the sender task: a
    message (or a piece of one too large for a single event), a reaction, an edit, or one
    file of a message's ``attachment``.

    Its transaction id is fixed when accepted, so a retry after an answer was lost is
    recognised by the homeserver as the same message, never sent twice; an uploaded
    file is kept (``uploaded``) so that a retry does not upload it again.
    """

    message: OutgoingMessage
    attachment: Attachment | None = None
    #: The id send() returned, on the first event of a message only.
    local_id: str = ""
    #: The order in which send() accepted it, shared with typing indications.
    seq: int = 0
    uploaded: dict[str, Any] | None = None
    txn_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def weight(self) -> int:
        """The bytes it holds, as ``queue_bytes`` counts them: its text, and its file's
        data, name and url (a message's files are counted with their own events)."""
        message, attachment = self.message, self.attachment
        size = len(message.body.encode()) + len(message.reaction.encode())
        if attachment is not None:
            size += len(attachment.data) + len(attachment.name.encode()) + len(attachment.url.encode())
        return size


class _NotActiveError(Exception):
    """The bot may no longer send (``ha:``: another bot may be the active one now)."""


@dataclass(frozen=True, slots=True)
class _Typing:
    """A typing indication for the typing task: on for ``seconds`` (until ``deadline``,
    trio time), or off (``seconds`` 0)."""

    room: str
    seconds: int
    deadline: float
    seq: int


class MatrixAdapter(Adapter):
    """A bot account on a Matrix homeserver. See the package README for the config.

    Rich replies: a thread is an ``m.thread`` relation (a reply to the message answered
    for clients without threads), an edit an ``m.replace`` relation, a reaction an
    ``m.reaction`` event, a file an upload to the media repository and an ``m.image``,
    ``m.video``, ``m.audio`` or ``m.file`` message (encrypted in encrypted rooms), and a
    typing indication the room's typing notice. :meth:`send` returns ``~`` and a
    transaction id, which ``edit_of``, ``in_reply_to`` and ``thread_id`` may name later.

    Incoming, reactions go to :meth:`AdapterHost.reaction`, edits arrive with
    ``edit_of`` and their new text, and files as attachments whose ``url`` is the
    homeserver's authenticated download url (it needs the bot's access token, with which
    :meth:`fetch_attachment` fetches it); a file's body is its caption, or "" (not its
    name). A file sent in an encrypted room arrives without a url: the homeserver holds
    only its ciphertext, and the key is not handed on.
    """

    features = Feature.THREADS | Feature.ATTACHMENTS | Feature.EDITS | Feature.REACTIONS | Feature.TYPING

    def __init__(self, config: MatrixConfig) -> None:
        self.config = config
        # Outgoing messages in order; one sender task empties it, so order holds even
        # while a message waits out a rate limit or an outage. It outlives ``run``.
        # Bounded by config.queue_size and queue_bytes, counted in send() (which refuses
        # what does not fit) rather than by the channel, which would make send() wait.
        self._outbox_tx, self._outbox_rx = trio.open_memory_channel[_Pending](math.inf)
        self._inflight: _Pending | None = None
        # Events accepted and not yet delivered or dropped (in the outbox or in flight).
        self._queued = 0
        self._queued_bytes = 0
        self._client: Any = None  # nio.Client
        self._transport: Transport | None = None
        self._host: AdapterHost | None = None
        self._sent = SentIds()
        self._seq = itertools.count(1)
        # Typing indications skip the outbox: one stuck behind an outage would be stale
        # when it went out. The typing task sends each once, or drops it.
        self._typing_tx, self._typing_rx = trio.open_memory_channel[_Typing](_TYPING_QUEUE)
        # Per room id: the seq of the typing indication shown there, and of the last
        # message delivered there (a message accepted after an indication ends it).
        self._typing_shown: dict[str, int] = {}
        self._delivered_seq: dict[str, int] = {}
        self._warned_plaintext: set[str] = set()
        self._synced = False
        self._same_account = False
        # Set (and replaced) after every sync, for tasks that wait for news.
        self._sync_done = trio.Event()

    # -- the Adapter interface ---------------------------------------------------------

    async def run(self, host: AdapterHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Log in, catch up from the stored sync token, then sync and send until cancelled."""
        self._host = host
        config = self.config
        encryption = config.encryption and ENCRYPTION_ENABLED
        if config.encryption and not ENCRYPTION_ENABLED:
            log.warning("matrix: encryption is on but matrix-nio[e2e] is not installed; encrypted rooms are unreadable")
        config.store_path.mkdir(parents=True, exist_ok=True)
        self._client = nio.Client(
            config.user_id,
            store_path=str(config.store_path),
            config=nio.ClientConfig(encryption_enabled=encryption, store_sync_tokens=False),
        )
        try:
            async with httpx.AsyncClient(base_url=config.homeserver) as http:
                retry = config.reconnect
                self._transport = Transport(http, Backoff(retry.initial_delay, retry.max_delay, jitter=0.2))
                await self._connect(Backoff(retry.initial_delay, retry.max_delay, jitter=0.2))
                self._synced = True
                task_status.started()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_loop)
                    nursery.start_soon(self._typing_loop)
                    await self._sync_loop()
        finally:
            self._synced = False
            self._transport = None
            store = getattr(self._client, "store", None)
            if store is not None:
                store.database.close()

    async def send(self, message: OutgoingMessage) -> str | None:
        """Queue ``message``; the sender task delivers queued messages in order, waiting
        out rate limits and outages. Return its id: ``~`` and the transaction id of its
        first event, which the adapter maps to the event id once delivered, so that a
        later edit (``edit_of``), reaction (``in_reply_to``) or ``thread_id`` can name it.

        A body too large for one event goes as several; a body with attachments goes
        first, then one event per file. A typing indication is not queued (None). What
        does not fit in ``queue_size`` events and ``queue_bytes`` bytes is refused
        (:class:`AdapterError`), nothing of it queued."""
        # The one wait, before anything is queued: cancelled here, nothing went out.
        await trio.lowlevel.checkpoint()
        if message.room_id and not message.private:
            room = message.room_id
            if not room.startswith(("!", "#")):
                raise UnknownTargetError(f"{room!r} is not a Matrix room id (!id:server) or alias (#name:server)")
            if self._synced and room.startswith("!") and room not in self._client.rooms:
                raise UnknownTargetError(f"the bot is not in Matrix room {room}")
        elif message.typing_seconds:
            raise UnknownTargetError("a typing indication on Matrix goes to a room (!id:server or #alias:server)")
        elif message.user is None or not message.user.id.startswith("@"):
            raise UnknownTargetError("a private Matrix message needs a user id (@name:server)")
        if message.typing_seconds:
            self._want_typing(message)
            return None
        if message.edit_of:
            self._sent.check(message.edit_of, "edit_of")
            message = replace(message, edit_of=self._sent.original(message.edit_of))
            if (events := self._sent.text_events(message.edit_of)) > 1:
                # Its replacement would replace the first event only, the rest staying.
                raise AdapterError(
                    f"edit_of {message.edit_of!r} names a message the Matrix adapter sent as {events} events (its "
                    "text was too long for one), and an edit would replace only the first: send a new message"
                )
        if message.thread_id:
            self._sent.check(message.thread_id, "thread_id")
        if message.reaction:
            if not message.in_reply_to:
                raise UnknownTargetError("a reaction needs in_reply_to: the id of the message it reacts to")
            self._sent.check(message.in_reply_to, "in_reply_to")
            pieces = [_Pending(message)]
        else:
            pieces = self._pieces(message)
        self._make_room(pieces)
        first = pieces[0]
        first.local_id = LOCAL_ID_PREFIX + first.txn_id
        user = first.message.user
        mentioned = (user.id,) if first.message.mention and user is not None and first.attachment is None else ()
        texts = sum(1 for pending in pieces if pending.attachment is None and not pending.message.reaction)
        self._sent.accept(first.local_id, mentioned, edit_of=first.message.edit_of, text_events=texts)
        for pending in pieces:
            pending.seq = next(self._seq)
            # Without waiting (the channel is unbounded): the pieces of two messages sent
            # at once never interleave, and a cancelled send never queues half a message.
            self._outbox_tx.send_nowait(pending)
        return first.local_id

    def _make_room(self, pieces: list[_Pending]) -> None:
        """Count ``pieces`` as queued, or raise :class:`AdapterError` if they do not fit
        in ``queue_size`` and ``queue_bytes`` (nothing of the message is queued then)."""
        config, size = self.config, sum(pending.weight for pending in pieces)
        if self._queued + len(pieces) > config.queue_size:
            raise AdapterError(
                f"the Matrix outgoing queue is full ({self._queued} events waiting for the homeserver, this message "
                f"needs {len(pieces)}; queue_size {config.queue_size}): the message was not sent"
            )
        if self._queued_bytes + size > config.queue_bytes:
            raise AdapterError(
                f"the Matrix outgoing queue is full ({self._queued_bytes} bytes waiting for the homeserver, this "
                f"message holds {size}; queue_bytes {config.queue_bytes}): the message was not sent"
            )
        self._queued += len(pieces)
        self._queued_bytes += size

    def _done_with(self, pending: _Pending) -> None:
        """``pending`` left the queue: delivered, failed or dropped."""
        self._queued -= 1
        self._queued_bytes -= pending.weight

    @staticmethod
    def _pieces(message: OutgoingMessage) -> list[_Pending]:
        texts: list[str] = []
        if message.body or not message.attachments:
            if not message.edit_of:
                # A body too large for one event would be refused and lost: it goes as
                # several, the mention on the first only.
                texts = split_body(message.body)
            elif len(split_body(message.body, MAX_BODY_JSON_BYTES // 2)) > 1:
                # An edit carries its text twice (the fallback and the new content).
                raise AdapterError(
                    f"an edit on Matrix must fit in one event (about {MAX_BODY_JSON_BYTES // 2} bytes of text; "
                    f"this one has {len(message.body.encode())}): send the long text as a new message"
                )
            else:
                texts = [message.body]
        pieces = [
            _Pending(message if len(texts) == 1 else replace(message, body=text, mention=message.mention and n == 0))
            for n, text in enumerate(texts)
        ]
        for attachment in message.attachments:
            # Each file its own event, after the text: only the text is an edit.
            part = replace(message, body="", mention=False, edit_of="", attachments=(attachment,))
            pieces.append(_Pending(part, attachment=attachment))
        return pieces

    async def fetch_attachment(self, url: str, max_bytes: int) -> tuple[bytes, str]:
        """The content and media type of a file a person sent, by the authenticated
        download url the adapter gave it (``{homeserver}/_matrix/client/v1/media/download/...``),
        fetched with the bot's access token; read as it arrives, and given up with
        :class:`~oco_core.RequestTooLargeError` past ``max_bytes``. Any other url is
        refused (:class:`UnknownTargetError`): the token must go nowhere else."""
        path = download_path(self.config.homeserver, url)
        if self._transport is None:
            raise AdapterError("the Matrix adapter is not connected")
        return await self._transport.download(path, self._token(), max_bytes)

    async def join(self, room: str) -> None:
        """Join a room by id or alias."""
        response = await self._request(nio.JoinResponse, *nio.Api.join(self._token(), room))
        if isinstance(response, nio.ErrorResponse):
            raise _target_error(f"cannot join Matrix room {room}", response)
        log.info("matrix: joined %s (%s)", room, response.room_id)
        # Return once the sync knows the room, so that a message sent next can go there.
        await self._wait_for_room(response.room_id)

    async def part(self, room: str) -> None:
        """Leave a room by id or alias."""
        room_id = await self._resolve(room)
        response = await self._request(nio.RoomLeaveResponse, *nio.Api.room_leave(self._token(), room_id))
        if isinstance(response, nio.ErrorResponse):
            raise _target_error(f"cannot leave Matrix room {room}", response)
        log.info("matrix: left %s", room)
        # Forget it now, not at the next sync: a message sent right after must not go there.
        left = self._client.rooms.pop(room_id, None)
        if left is not None:
            own = ChatUser(id=self.config.user_id, name=self.config.localpart)
            await self._require_host().membership(MembershipEvent(MembershipKind.LEFT, own, self._chat_room(left)))

    # -- connecting --------------------------------------------------------------------

    def _token(self) -> str:
        if self._transport is None or not self._client or not self._client.access_token:
            raise AdapterError("the Matrix adapter is not connected")
        return str(self._client.access_token)

    async def _request(self, response_class: type, method: str, path: str, data: str | None = None, **kw: Any) -> Any:
        if self._transport is None:
            raise AdapterError("the Matrix adapter is not connected")
        return await self._transport.request(response_class, method, path, data, **kw)

    async def _connect(self, backoff: Backoff) -> None:
        # A homeserver that is down at start-up is waited for here, one line a try,
        # rather than failing the adapter (which the bot would log with a traceback and
        # restart); refusals (a bad password or token) still fail it.
        while True:
            try:
                await self._log_in()
                await self._catch_up()
                await self._join_configured_rooms()
                return
            except UnreachableError as error:
                delay = backoff.next_delay()
                log.warning("matrix: cannot connect: %s; retrying in %.1f s", error, delay)
                await trio.sleep(delay)

    async def _log_in(self) -> None:
        host, config, client = self._require_host(), self.config, self._client
        # What the store holds (sync token, device) is of this account only if user_id
        # did not change in the config since.
        self._same_account = await _get(host, KEY_USER_ID) == config.user_id
        if config.access_token is not None:
            token = config.access_token.get_secret_value()
            whoami = await self._request(nio.WhoamiResponse, *nio.Api.whoami(token))
            if isinstance(whoami, nio.ErrorResponse):
                raise AdapterError(f"matrix: the configured access_token was refused: {whoami.message}")
            if whoami.user_id != config.user_id:
                raise AdapterError(f"matrix: access_token is of {whoami.user_id}, not of user_id {config.user_id}")
            client.restore_login(config.user_id, whoami.device_id or "", token)
            await host.store.set(KEY_USER_ID, config.user_id.encode())
        else:
            stored = {key: await _get(host, key) for key in (KEY_ACCESS_TOKEN, KEY_DEVICE_ID, KEY_USER_ID)}
            if stored[KEY_ACCESS_TOKEN] and stored[KEY_USER_ID] == config.user_id:
                client.restore_login(config.user_id, stored[KEY_DEVICE_ID], stored[KEY_ACCESS_TOKEN])
            else:
                await self._password_login(stored[KEY_DEVICE_ID] if stored[KEY_USER_ID] == config.user_id else "")
        log.info("matrix: logged in as %s, device %s", client.user_id, client.device_id)

    async def _password_login(self, device_id: str) -> None:
        host, config, client = self._require_host(), self.config, self._client
        assert config.password is not None
        # Logging in with the device id we had keeps that device, and so its keys.
        response = await self._request(
            nio.LoginResponse,
            *nio.Api.login(
                config.user_id,
                password=config.password.get_secret_value(),
                device_name=config.device_name,
                device_id=device_id or None,
            ),
        )
        if isinstance(response, nio.ErrorResponse):
            raise AdapterError(f"matrix: login as {config.user_id} failed: {response.message}")
        client.receive_response(response)
        await host.store.set(KEY_USER_ID, response.user_id.encode())
        await host.store.set(KEY_DEVICE_ID, response.device_id.encode())
        await host.store.set(KEY_ACCESS_TOKEN, response.access_token.encode())

    async def _sync(
        self, *, since: str | None, full_state: bool = False, poll: float = 0, retry: bool, relogin: bool = True
    ) -> Any:
        client = self._client
        sync_filter = {"room": {"timeline": {"limit": _TIMELINE_LIMIT}}}
        try:
            response = await self._request(
                nio.SyncResponse,
                *nio.Api.sync(
                    client.access_token,
                    since=since,
                    timeout=int(poll * 1000) or None,
                    filter=sync_filter,
                    full_state=full_state or None,
                ),
                http_timeout=poll + SYNC_GRACE,
                retry=retry,
            )
        except TokenRejectedError:
            if self.config.password is None or not relogin:
                raise
            log.warning("matrix: the stored access token was refused; logging in again with the same device")
            await self._password_login(client.device_id or "")
            return await self._sync(since=since, full_state=full_state, poll=poll, retry=retry, relogin=False)
        if isinstance(response, nio.ErrorResponse):
            raise AdapterError(f"matrix: sync failed: {response}")
        client.receive_response(response)
        return response

    async def _catch_up(self) -> None:
        host = self._require_host()
        token = await _get(host, KEY_SYNC_TOKEN) if self._same_account else ""
        if token:
            # Full state rebuilds what nio knows of the rooms (members, encryption);
            # the timeline holds only what happened since we stopped: deliver it.
            response = await self._sync(since=token, full_state=True, retry=False)
            await self._e2e_housekeeping()
            await self._dispatch(response)
        else:
            # The first start of this account: learn the rooms, answer nothing old.
            response = await self._sync(since=None, retry=False)
            await self._e2e_housekeeping()
            await self._handle_invites(response, report=False)
        await host.store.set(KEY_SYNC_TOKEN, response.next_batch.encode())
        await self._learn_own_names()
        for room in self._client.rooms.values():
            self._warn_if_unreadable(room)

    async def _learn_own_names(self) -> None:
        config, client = self.config, self._client
        if config.display_name:
            await self._request(
                nio.ProfileSetDisplayNameResponse,
                *nio.Api.profile_set_displayname(client.access_token, config.user_id, config.display_name),
            )
        profile = await self._request(
            nio.ProfileGetDisplayNameResponse, *nio.Api.profile_get_displayname(config.user_id, client.access_token)
        )
        display_name = getattr(profile, "displayname", None) or config.display_name
        names = [name for name in (display_name, config.localpart, config.user_id) if name]
        self._require_host().set_own_names(list(dict.fromkeys(names)))

    async def _join_configured_rooms(self) -> None:
        for room in self.config.rooms:
            if room in self._client.rooms:
                continue
            response = await self._request(nio.JoinResponse, *nio.Api.join(self._client.access_token, room))
            if isinstance(response, nio.ErrorResponse):
                log.error("matrix: cannot join %s: %s", room, response.message)
            else:
                log.info("matrix: joined %s (%s)", room, response.room_id)

    # -- receiving ---------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        host, client = self._require_host(), self._client
        while True:
            # retry=True: outages and homeserver restarts are waited out with backoff.
            response = await self._sync(since=client.next_batch, poll=self.config.sync_timeout, retry=True)
            await self._e2e_housekeeping()
            await self._dispatch(response)
            # Saved after the events were handed over: a restart resumes after them.
            await host.store.set(KEY_SYNC_TOKEN, response.next_batch.encode())
            self._sync_done.set()
            self._sync_done = trio.Event()

    async def _dispatch(self, response: Any) -> None:
        client = self._client
        for room_id, info in response.rooms.join.items():
            room = client.rooms.get(room_id)
            if room is None:
                continue
            for event in self._since_own_join(info.timeline.events):
                await self._dispatch_event(room, event)
        for room_id, info in response.rooms.leave.items():
            room = client.rooms.get(room_id)
            if room is not None:
                for event in info.timeline.events:
                    if isinstance(event, nio.RoomMemberEvent):
                        await self._dispatch_event(room, event)
            # nio keeps rooms we left; forget them, or a direct chat could be found there.
            client.rooms.pop(room_id, None)
            log.info("matrix: no longer in %s", room_id)
        await self._handle_invites(response, report=True)

    async def _dispatch_event(self, room: Any, event: Any) -> None:
        # One event that cannot be handled is skipped with a WARNING: raised, it would end
        # the sync loop before the sync token was saved, and fail again on every restart.
        try:
            await self._handle_event(room, event)
        except Exception as error:
            log.warning(
                "matrix: skipped event %s in %s, which could not be handled: %s: %s",
                getattr(event, "event_id", "?"),
                room.room_id,
                type(error).__name__,
                error,
            )
            log.debug("matrix: the skipped event's traceback", exc_info=True)

    async def _handle_event(self, room: Any, event: Any) -> None:
        host, client = self._require_host(), self._client
        if isinstance(
            event, nio.RoomMessageText | nio.RoomMessageEmote | nio.RoomMessageMedia | nio.RoomEncryptedMedia
        ):
            message = self._incoming(room, event)
            if message is not None:
                await host.receive(message)
        elif isinstance(event, nio.ReactionEvent):
            # Decrypted by nio when a client encrypted it (Element sends them in clear).
            if event.sender != client.user_id:
                await host.reaction(
                    ReactionEvent(
                        message_id=self._sent.local_id(event.reacts_to),
                        key=str(event.key),
                        user=self._chat_user(room, event.sender),
                        room=self._chat_room(room),
                        id=event.event_id,
                    )
                )
        elif isinstance(event, nio.MegolmEvent):
            self._undecryptable(room, event)
        elif isinstance(event, nio.RoomMemberEvent):
            await self._membership(room, event)
        elif isinstance(event, nio.RoomTopicEvent):
            await host.topic(self._chat_room(room), self._chat_user(room, event.sender))
        elif isinstance(event, nio.RoomEncryptionEvent):
            self._warn_if_unreadable(room)

    def _since_own_join(self, events: list[Any]) -> list[Any]:
        # A room the bot just joined comes with some of its history: what was said before
        # the bot was there is old, never answered. Our own join is reported.
        own = self._client.user_id
        for index in range(len(events) - 1, -1, -1):
            event = events[index]
            if (
                isinstance(event, nio.RoomMemberEvent)
                and event.state_key == own
                and event.membership == "join"
                and event.prev_membership != "join"
            ):
                return events[index:]
        return events

    def _incoming(self, room: Any, event: Any) -> IncomingMessage | None:
        client = self._client
        if event.sender == client.user_id:
            return None
        content = as_dict(event.source.get("content"))
        relation = as_dict(content.get("m.relates_to"))
        body = str(event.body)
        edit_of = thread_id = ""
        if relation.get("rel_type") == "m.replace":
            # The new text is in m.new_content; the body is a "* ..." fallback. Its thread
            # is the original's, which the edit does not repeat: thread_id stays empty.
            edit_of = str(relation.get("event_id", ""))
            new = as_dict(content.get("m.new_content"))
            body = str(new.get("body", body.removeprefix("* ")))
            content = new
        elif relation.get("rel_type") == "m.thread":
            thread_id = self._sent.local_id(str(relation.get("event_id", "")))
        if content.get("msgtype") in MEDIA_MSGTYPES:
            # A file's body is its name, unless a caption (Matrix 1.10: then the name is in
            # filename): a name is no command, the file goes in attachments.
            body = caption(content)
        if "m.in_reply_to" in relation and not relation.get("is_falling_back"):
            body = strip_reply_fallback(body)
        body = self._name_for_pill(body, content)
        attachments: tuple[Attachment, ...] = ()
        if isinstance(event, nio.RoomMessageMedia | nio.RoomEncryptedMedia) and not edit_of:
            encrypted = isinstance(event, nio.RoomEncryptedMedia)
            attachments = (incoming_attachment(self.config.homeserver, content, encrypted),)
        return IncomingMessage(
            body=body,
            user=self._chat_user(room, event.sender),
            room=self._chat_room(room),
            direct=self._is_direct(room),
            id=event.event_id,
            action=isinstance(event, nio.RoomMessageEmote),
            thread_id=thread_id,
            edit_of=edit_of,
            attachments=attachments,
        )

    def _name_for_pill(self, body: str, content: dict[str, Any]) -> str:
        # A pill shows the bot's display name as it was when the person wrote; if that is
        # no longer one of our names, put the localpart in its place so routing still sees
        # the message as addressed.
        formatted = content.get("formatted_body")
        if content.get("format") != "org.matrix.custom.html" or not isinstance(formatted, str):
            return body
        found = leading_pill(formatted)
        if found is None or found[0] != self._client.user_id:
            return body
        shown = found[1]
        if shown and body.startswith(shown):
            return self.config.localpart + body[len(shown) :]
        return body

    def _is_direct(self, room: Any) -> bool:
        # A room of exactly two members (the bot and one person, joined or invited) is a
        # direct chat, whatever its m.direct flag says: that is how people perceive it.
        return int(room.member_count) == 2

    def _chat_room(self, room: Any) -> ChatRoom:
        return ChatRoom(id=room.room_id, name=str(room.display_name or ""), topic=str(room.topic or ""))

    def _chat_user(self, room: Any, user_id: str) -> ChatUser:
        name = room.user_name(user_id) if room is not None else None
        return ChatUser(id=user_id, name=name or user_id, mention_name=name or user_id)

    async def _membership(self, room: Any, event: Any) -> None:
        membership, previous = event.membership, event.prev_membership
        user = ChatUser(
            id=event.state_key,
            name=(event.content or {}).get("displayname") or room.user_name(event.state_key) or event.state_key,
        )
        actor = self._chat_user(room, event.sender) if event.sender != event.state_key else None
        if membership == "join" and previous != "join":
            kind = MembershipKind.JOINED
        elif membership == "invite" and previous != "invite":
            kind = MembershipKind.INVITED
        elif membership in ("leave", "ban") and previous in ("join", "invite"):
            kind = MembershipKind.KICKED if actor is not None else MembershipKind.LEFT
        else:
            return  # a display name or avatar change
        reason = str((event.content or {}).get("reason") or "")
        await self._require_host().membership(
            MembershipEvent(kind=kind, user=user, room=self._chat_room(room), actor=actor, reason=reason)
        )

    async def _handle_invites(self, response: Any, *, report: bool) -> None:
        own = self._client.user_id
        for room_id, info in response.rooms.invite.items():
            inviter = ""
            room_name = ""
            for event in info.invite_state:
                if isinstance(event, nio.InviteMemberEvent) and event.state_key == own and event.membership == "invite":
                    inviter = event.sender
                elif getattr(event, "type", "") == "m.room.name" or type(event).__name__ == "RoomNameEvent":
                    room_name = getattr(event, "name", "") or ""
            if report:
                await self._require_host().membership(
                    MembershipEvent(
                        kind=MembershipKind.INVITED,
                        user=ChatUser(id=own, name=self.config.localpart),
                        room=ChatRoom(id=room_id, name=room_name),
                        actor=ChatUser(id=inviter, name=inviter) if inviter else None,
                    )
                )
            if any(fnmatch.fnmatchcase(inviter, allowed) for allowed in self.config.autojoin_invites):
                joined = await self._request(nio.JoinResponse, *nio.Api.join(self._client.access_token, room_id))
                if isinstance(joined, nio.ErrorResponse):
                    log.error("matrix: cannot accept the invitation to %s: %s", room_id, joined.message)
                else:
                    log.info("matrix: accepted the invitation to %s from %s", room_id, inviter)
            else:
                log.info("matrix: invited to %s by %s; not accepted (autojoin_invites)", room_id, inviter or "?")

    def _undecryptable(self, room: Any, event: Any) -> None:
        if self._client.olm is None:
            self._warn_if_unreadable(room)
        else:
            log.warning(
                "matrix: cannot decrypt a message from %s in %s (session %s not received); it is skipped",
                event.sender,
                room.room_id,
                event.session_id,
            )

    def _warn_if_unreadable(self, room: Any) -> None:
        if room.encrypted and self._client.olm is None and room.room_id not in self._warned_plaintext:
            self._warned_plaintext.add(room.room_id)
            log.warning(
                "matrix: room %s (%s) is end-to-end encrypted but encryption is off (encryption: false, or "
                "matrix-nio[e2e] missing): the bot cannot read or answer messages there",
                room.room_id,
                room.display_name,
            )

    # -- encryption ----------------------------------------------------------------------

    async def _e2e_housekeeping(self) -> None:
        """What nio's AsyncClient.sync_forever does after each sync: to-device messages
        out, our keys up, others' device keys and one-time keys in."""
        client = self._client
        if client.olm is None:
            return
        for message in list(client.outgoing_to_device_messages):
            method, path, data = nio.Api.to_device(client.access_token, message.type, message.as_dict(), uuid.uuid4())
            client.receive_response(
                await self._request(nio.ToDeviceResponse, method, path, data, response_data=(message,), retry=True)
            )
        if client.should_upload_keys:
            client.receive_response(
                await self._request(
                    nio.KeysUploadResponse,
                    *nio.Api.keys_upload(client.access_token, client.olm.share_keys()),
                    retry=True,
                )
            )
        await self._query_keys()
        if client.should_claim_keys:
            users = client.get_users_for_key_claiming()
            client.receive_response(
                await self._request(nio.KeysClaimResponse, *nio.Api.keys_claim(client.access_token, users), retry=True)
            )

    async def _query_keys(self) -> None:
        client = self._client
        if client.should_query_keys:
            users = client.users_for_key_query
            client.receive_response(
                await self._request(nio.KeysQueryResponse, *nio.Api.keys_query(client.access_token, users), retry=True)
            )

    async def _encrypt(self, room: Any, event_type: str, content: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """What nio's AsyncClient.room_send does for an encrypted room."""
        client = self._client
        if not room.members_synced:
            response = await self._request(
                nio.JoinedMembersResponse,
                *nio.Api.joined_members(client.access_token, room.room_id),
                response_data=(room.room_id,),
                retry=True,
            )
            client.receive_response(response)
        await self._query_keys()
        if client.olm.should_share_group_session(room.room_id):
            missing = client.get_missing_sessions(room.room_id)
            if missing:
                client.receive_response(
                    await self._request(
                        nio.KeysClaimResponse, *nio.Api.keys_claim(client.access_token, missing), retry=True
                    )
                )
            # The bot cannot verify devices interactively: it shares its room key with
            # every device of the room's members (trust on first use), as other bots do.
            for sharing_with, to_device in client.olm.share_group_session_parallel(
                room.room_id, list(room.users), ignore_unverified_devices=True
            ):
                method, path, data = nio.Api.to_device(client.access_token, "m.room.encrypted", to_device, uuid.uuid4())
                client.receive_response(
                    await self._request(
                        nio.ShareGroupSessionResponse,
                        method,
                        path,
                        data,
                        response_data=(room.room_id, sharing_with),
                        retry=True,
                    )
                )
            # nio marks the session shared itself only when someone received it.
            client.olm.outbound_group_sessions[room.room_id].shared = True
        event_type, content = client.encrypt(room.room_id, event_type, content)
        return str(event_type), dict(content)

    # -- sending -------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            if self._inflight is None:
                self._inflight = await self._outbox_rx.receive()
            # Kept in _inflight until delivered: if run() is cancelled mid-send and started
            # again, the same message (same transaction id) goes first.
            try:
                await self._deliver(self._inflight)
            except TokenRejectedError:
                raise  # run() ends and starts again with a new login; the message stays
            except AdapterError as error:
                log.error("matrix: message not sent: %s", error)
            except _NotActiveError:
                self._drop_outbox()
                continue
            self._done_with(self._inflight)
            self._inflight = None

    def _check_active(self) -> None:
        # Asked right before each write to the room: what was queued while this bot was
        # the active one must not go out after another bot took over (ha:).
        if not self._require_host().may_send():
            raise _NotActiveError

    def _drop_outbox(self) -> None:
        """The bot may no longer send: drop the event in flight and all queued ones."""
        dropped = []
        if self._inflight is not None:
            dropped.append(self._inflight)
            self._inflight = None
        with contextlib.suppress(trio.WouldBlock):
            while True:
                dropped.append(self._outbox_rx.receive_nowait())
        for pending in dropped:
            self._done_with(pending)
        log.info("matrix: dropped %d queued event(s): this bot is no longer the active one (ha:)", len(dropped))

    async def _deliver(self, pending: _Pending) -> None:
        message, client = pending.message, self._client
        if message.room_id and not message.private:
            room_id = await self._resolve(message.room_id, retry=True)
        else:
            assert message.user is not None
            room_id = await self._direct_room(message.user.id)
        room = client.rooms.get(room_id)
        if room is None:
            raise UnknownTargetError(f"the bot is not in Matrix room {room_id}")
        if message.reaction:
            self._check_active()
            # Sent in clear in encrypted rooms too, as the specification says they normally
            # are (and Element does): the relation, all a reaction holds but its key, stays
            # in clear in an encrypted event anyway, and some clients show encrypted ones badly.
            event_type = "m.reaction"
            content = reaction_content(self._sent.event_id(message.in_reply_to, "in_reply_to"), message.reaction)
        else:
            if room.encrypted and client.olm is None:
                self._warn_if_unreadable(room)
                raise AdapterError(f"room {room_id} is encrypted and encryption is off; not sending in clear text")
            if pending.attachment is not None:
                content = await self._attachment_content(room, pending)
            else:
                content = self._content(message)
            event_type = "m.room.message"
            if room.encrypted:
                event_type, content = await self._encrypt(room, event_type, content)
            self._check_active()
        response = await self._request(
            nio.RoomSendResponse,
            *nio.Api.room_send(client.access_token, room_id, event_type, content, pending.txn_id),
            response_data=(room_id,),
            retry=True,
        )
        if isinstance(response, nio.ErrorResponse):
            raise AdapterError(f"homeserver refused a message to {room_id}: {response.message}")
        if pending.local_id:
            self._sent.delivered(pending.local_id, response.event_id)
        if event_type != "m.reaction":
            self._message_delivered(room_id, pending.seq)

    async def _attachment_content(self, room: Any, pending: _Pending) -> dict[str, Any]:
        attachment, message = pending.attachment, pending.message
        assert attachment is not None
        media_type = media_type_of(attachment)
        if attachment.data:
            if pending.uploaded is None:
                self._check_active()
                pending.uploaded = await self._upload(attachment, media_type, encrypted=bool(room.encrypted))
            content = file_content(attachment, media_type, pending.uploaded)
        elif attachment.url.startswith("mxc://"):
            content = file_content(attachment, media_type, {"url": attachment.url})
        else:
            content = link_content(attachment, self._msgtype(message))
        self._relate(content, message)
        return content

    async def _upload(self, attachment: Attachment, media_type: str, *, encrypted: bool) -> dict[str, Any]:
        """Store ``attachment`` in the media repository; return where the event finds it:
        ``{"url": mxc}``, or in an encrypted room ``{"file": ...}`` with the key of the
        encrypted blob (the homeserver never sees the file itself)."""
        data, content_type, keys = attachment.data, media_type, None
        if encrypted:
            data, keys = encrypt_attachment(attachment.data)
            content_type = "application/octet-stream"
        method, path = nio.Api.upload(self._token(), attachment.name)
        response = await self._request(
            nio.UploadResponse, method, path, content=data, content_type=content_type, http_timeout=120, retry=True
        )
        if isinstance(response, nio.ErrorResponse):
            raise AdapterError(
                f"the homeserver did not store {attachment.name!r} ({len(attachment.data)} bytes): {response.message}"
            )
        if keys is None:
            return {"url": response.content_uri}
        return {"file": {**keys, "url": response.content_uri, "mimetype": media_type}}

    def _msgtype(self, message: OutgoingMessage) -> str:
        if message.action:
            return "m.emote"
        return "m.notice" if self.config.message_type == "notice" else "m.text"

    def _relate(self, content: dict[str, Any], message: OutgoingMessage) -> None:
        """Put ``content`` in ``message.thread_id``'s thread, where it names one."""
        if not message.thread_id:
            return
        root = self._sent.event_id(message.thread_id, "thread_id")
        reply_to = root
        if message.in_reply_to.startswith("$"):
            reply_to = message.in_reply_to
        elif message.in_reply_to:
            # Where it names nothing delivered, the fallback reply goes to the root instead.
            with contextlib.suppress(AdapterError):
                reply_to = self._sent.event_id(message.in_reply_to, "in_reply_to")
        content["m.relates_to"] = thread_relation(root, reply_to)

    def _content(self, message: OutgoingMessage) -> dict[str, Any]:
        msgtype = self._msgtype(message)
        body = message.body
        formatted = markdown_to_html(body) if message.format == "markdown" else None
        content: dict[str, Any] = {"msgtype": msgtype}
        if message.mention and message.user is not None:
            user = message.user
            name = user.name or user.mention_name or user.id
            body = f"{name}: {body}"
            formatted = f"{pill(user.id, name)}: {formatted if formatted is not None else html.escape(message.body)}"
            content["m.mentions"] = {"user_ids": [user.id]}
        content["body"] = body
        if formatted is not None:
            content["format"] = "org.matrix.custom.html"
            content["formatted_body"] = formatted
        if message.edit_of:
            original = self._sent.event_id(message.edit_of, "edit_of")
            return edit_content(content, original, self._sent.mentions(message.edit_of))
        self._relate(content, message)
        return content

    # -- typing --------------------------------------------------------------------------

    def _want_typing(self, message: OutgoingMessage) -> None:
        assert message.room_id is not None
        seconds = message.typing_seconds
        wanted = _Typing(message.room_id, seconds, trio.current_time() + seconds, next(self._seq))
        try:
            self._typing_tx.send_nowait(wanted)
        except trio.WouldBlock:
            log.info("matrix: typing indication in %s dropped: %d wait already", message.room_id, _TYPING_QUEUE)

    def _message_delivered(self, room_id: str, seq: int) -> None:
        # Synapse does not end a typing notice when the same user sends a message (it
        # waits for the timeout): the bot ends one it showed before this message was sent.
        self._delivered_seq[room_id] = max(seq, self._delivered_seq.get(room_id, 0))
        shown = self._typing_shown.get(room_id)
        if shown is not None and shown < seq:
            del self._typing_shown[room_id]
            with contextlib.suppress(trio.WouldBlock):
                self._typing_tx.send_nowait(_Typing(room_id, 0, 0.0, seq))

    async def _typing_loop(self) -> None:
        while True:
            wanted = await self._typing_rx.receive()
            left = wanted.deadline - trio.current_time()
            if wanted.seconds and left < 1:
                continue  # it waited out an outage: too late to show
            try:
                room_id = await self._resolve(wanted.room)
                if wanted.seconds and self._delivered_seq.get(room_id, 0) > wanted.seq:
                    continue  # a message sent after it already went out
                if not self._require_host().may_send():
                    self._drop_typing(1)
                    continue
                method, path, data = nio.Api.room_typing(
                    self._token(),
                    room_id,
                    self._client.user_id,
                    typing_state=bool(wanted.seconds),
                    timeout=int(left * 1000),
                )
                # No retries: an indication that cannot go now is of no use later.
                response = await self._request(nio.RoomTypingResponse, method, path, data, response_data=(room_id,))
            except AdapterError as error:
                log.info("matrix: typing indication in %s not sent: %s", wanted.room, error)
                continue
            if isinstance(response, nio.ErrorResponse):
                log.info("matrix: typing indication in %s refused: %s", room_id, response.message)
            elif wanted.seconds:
                self._typing_shown[room_id] = wanted.seq
                if self._delivered_seq.get(room_id, 0) > wanted.seq:
                    self._message_delivered(room_id, self._delivered_seq[room_id])

    def _drop_typing(self, dropped: int) -> None:
        """The bot may no longer send: drop the indications waiting, and say how many."""
        with contextlib.suppress(trio.WouldBlock):
            while True:
                self._typing_rx.receive_nowait()
                dropped += 1
        log.info("matrix: dropped %d typing indication(s): this bot is no longer the active one (ha:)", dropped)

    async def _resolve(self, room: str, *, retry: bool = False) -> str:
        if not room.startswith("#"):
            return room
        method, path = nio.Api.room_resolve_alias(room)
        response = await self._request(nio.RoomResolveAliasResponse, method, path, response_data=(room,), retry=retry)
        if isinstance(response, nio.ErrorResponse):
            raise _target_error(f"no Matrix room {room}", response)
        return str(response.room_id)

    async def _direct_room(self, user_id: str) -> str:
        for room in self._client.rooms.values():
            if self._is_direct(room) and user_id in room.users:
                return str(room.room_id)
        # No direct chat with this person yet: open one, as a client would.
        response = await self._request(
            nio.RoomCreateResponse,
            *nio.Api.room_create(
                self._client.access_token, is_direct=True, invite=[user_id], preset=nio.RoomPreset.trusted_private_chat
            ),
            retry=True,
        )
        if isinstance(response, nio.ErrorResponse):
            raise _target_error(f"cannot open a direct chat with {user_id}", response)
        await self._wait_for_room(response.room_id)
        return str(response.room_id)

    async def _wait_for_room(self, room_id: str) -> None:
        # The sync loop learns rooms; a sync is at most a long-poll away.
        with trio.move_on_after(self.config.sync_timeout + 5):
            while room_id not in self._client.rooms:
                await self._sync_done.wait()

    def _require_host(self) -> AdapterHost:
        if self._host is None:
            raise AdapterError("the Matrix adapter is not running")
        return self._host


async def _get(host: AdapterHost, key: str) -> str:
    item = await host.store.get(key)
    return item.value.decode() if item is not None else ""


def _target_error(what: str, response: Any) -> AdapterError:
    status = getattr(response, "status_code", "")
    if status in ("M_NOT_FOUND", "M_FORBIDDEN", "M_UNKNOWN", "M_INVALID_PARAM"):
        return UnknownTargetError(f"{what}: {response.message}")
    return AdapterError(f"{what}: {response.message} ({status})")
