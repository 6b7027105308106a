"""The IRC adapter: one trio TCP (or TLS) stream to one server, and everything around it.

Tasks, all in nurseries:

- ``IrcAdapter.run`` supervises connections: it opens one, waits until it ends, and
  reconnects after an exponential backoff with jitter.
- Each ``_Connection`` runs a reader (lines in, events out), a writer (the only task
  that writes to the stream: control lines first, then the adapter's outbox, every line
  paced by a token bucket), a keepalive watchdog, a registration deadline, the
  periodic attempt to regain the configured nick, and delayed rejoins after a KICK.

The outbox belongs to the adapter, not to a connection: ``send`` appends whole messages
(as lines) to it whatever the connection's state, and a line leaves it only after it was
written, so what callbacks send during an outage goes out after the reconnect, in order.
Written is not received: a dying server (or network) loses what sat in the socket
buffers. IRC has no acknowledgements, but a server answers PINGs in order, so after a
burst the writer sends a PING and holds the lines written before it until its PONG
comes; lines still unconfirmed when the connection ends go back to the front of the
outbox and out again after the reconnect (at least once: a line the server handled just
before it died may appear twice).

User ids: a user's id is their nick, case-folded by the server's CASEMAPPING (so
``Alice`` and ``alice``, who IRC says are the same user, get one id). ``nick!user@host``
changes with the user's address and client; services accounts are not visible on every
server (ngircd has none); the nick is what IRC itself keeps unique at any moment, what
people write in authorization rules, and it is the address a private reply goes to. It
is only as trustworthy as the network's nick protection (NickServ enforcement): on a
network without services, anyone can take a nick that is not in use.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from oco_core import AdapterError, UnknownTargetError
from oco_core.plugin import (
    Adapter,
    AdapterHost,
    Backoff,
    ChatRoom,
    ChatUser,
    IncomingMessage,
    MembershipEvent,
    MembershipKind,
    OutgoingMessage,
    TokenBucket,
)

from . import _protocol as p
from ._config import IrcConfig
from ._markdown import markdown_to_irc

log = logging.getLogger(__name__)

#: Capabilities the adapter asks for when the server offers them.
_WANTED_CAPS = ("multi-prefix",)
#: Numerics that end SASL in failure.
_SASL_FAILED = {"902", "904", "905", "906", "908"}
#: Numerics that refuse a nick (in use, erroneous, temporarily unavailable).
_NICK_REFUSED = {"432", "433", "436", "437"}
#: Numerics that refuse a JOIN: full, invite-only, banned, bad key, too many channels.
_JOIN_REFUSED = {"403", "405", "471", "473", "474", "475", "476", "477"}
_CTCP_REPLY_INTERVAL = 2.0
_VERSION = "OCO (OpenChatOps) IRC adapter"


class ConnectionLostError(Exception):
    """The connection ended (closed, timed out, or refused by the server); retry later."""


class RegistrationRefusedError(ConnectionLostError):
    """The server refused the bot's credentials (server password, SASL). Fatal before
    the first successful registration (a config error); retried after it."""


@dataclass(frozen=True, slots=True)
class IrcStatistics:
    """Counters of an :class:`IrcAdapter`, from :meth:`IrcAdapter.statistics`."""

    #: Registered with the server right now.
    connected: bool
    #: The bot's current nick (None before the first registration).
    nick: str | None
    #: Successful registrations since the adapter started (2 after one reconnect).
    registrations: int
    #: Lines waiting in the outbox.
    queued_lines: int
    #: Message lines written to the server.
    sent_lines: int
    #: Lines from the server that were malformed, oversized or failed to be handled.
    skipped_lines: int
    #: Lines written that the server has not yet confirmed (by answering a later PING).
    unconfirmed_lines: int = 0
    #: Lines sent again after a reconnect because the server never confirmed them.
    resent_lines: int = 0


@dataclass(slots=True)
class _Channel:
    name: str
    # folded nick -> nick as last seen
    members: dict[str, str] = field(default_factory=dict)
    topic: str = ""


class IrcAdapter(Adapter):
    """An adapter for one IRC server, configured by an :class:`IrcConfig`."""

    def __init__(self, config: IrcConfig) -> None:
        self.config = config
        self._host: AdapterHost | None = None
        # Message, JOIN and PART lines, in the order callbacks asked for them. Bounded
        # by config.queue_size; a line leaves only once it was written.
        self._outbox: deque[str] = deque()
        # Channels the bot should be in: folded name -> (name, key). Rejoined after
        # every reconnect and after a KICK.
        self._wanted: dict[str, tuple[str, str | None]] = {}
        for channel in config.channels:
            key = channel.key.get_secret_value() if channel.key else None
            self._wanted[p.casefold(channel.name)] = (channel.name, key)
        self._connection: _Connection | None = None
        self._features = p.Features()
        self._wakeup = trio.lowlevel.ParkingLot()
        self._registrations = 0
        self._sent = 0
        self._resent = 0
        self._skipped = 0

    # ---- the Adapter interface ----

    async def run(self, host: AdapterHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect and stay connected until cancelled; ``task_status.started()`` is
        called after the first successful registration.

        Until then a refused registration (wrong server password, SASL refused) or a TLS
        certificate that fails verification raises :class:`~oco_core.AdapterError`, since
        retrying cannot fix a configuration; other failures (server down, timeouts) are
        retried with backoff and logged.
        """
        self._host = host
        cfg = self.config
        backoff = Backoff(cfg.reconnect.initial_delay, cfg.reconnect.max_delay, cfg.reconnect.factor, jitter=0.5)
        started = False

        def registered() -> None:
            nonlocal started
            backoff.reset()
            if not started:
                started = True
                task_status.started()

        where = f"{cfg.host}:{cfg.effective_port}"
        while True:
            connection = _Connection(self, host, registered)
            self._connection = connection
            try:
                await connection.run()
            except* RegistrationRefusedError as group:
                if not started:
                    raise AdapterError(f"IRC server {where} refused the bot: {_first(group)}") from None
                log.warning("IRC server %s refused the bot: %s", where, _first(group))
            except* ssl.SSLCertVerificationError as group:
                if not started:
                    raise AdapterError(
                        f"the TLS certificate of IRC server {where} failed verification: {_first(group)} "
                        "(set tls_ca_file to trust a private CA)"
                    ) from None
                log.warning("TLS certificate of %s failed verification: %s", where, _first(group))
            except* (
                OSError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                trio.TooSlowError,  # connect_timeout
                ConnectionLostError,
            ) as group:
                what = "lost" if connection.welcomed else "failed"
                cause = _first(group)
                if connection.opened and not connection.heard and not cfg.tls:
                    # A TLS port drops a client that speaks plaintext without a word.
                    cause += " — the server closed it before a line of IRC; if this is a TLS port, set tls: true"
                log.warning("IRC connection to %s %s: %s", where, what, cause)
            finally:
                self._connection = None
            delay = backoff.next_delay()
            log.info("reconnecting to IRC server %s in %.1f s", where, delay)
            await trio.sleep(delay)

    async def send(self, message: OutgoingMessage) -> None:
        """Queue ``message`` as IRC lines; they go out in order, paced by the rate limit,
        and wait for the connection when it is down. Raises AdapterError when the queue
        cannot take the whole message."""
        await trio.lowlevel.checkpoint()
        prefix = ""
        if message.room_id and not message.private:
            target = message.room_id
            if message.mention and message.user is not None:
                prefix = f"{_mention(message.user)}: "
        elif message.user is not None:
            target = message.user.mention_name or message.user.id
        else:
            raise UnknownTargetError("an IRC message needs a channel or a user to go to")
        # Markdown becomes IRC's formatting codes: a person never sees raw `**` or `[..](..)`.
        body = markdown_to_irc(message.body) if message.format == "markdown" else message.body
        try:
            lines = p.privmsg_lines(
                target, body, source_mask_bytes=self._mask_bytes(), action=message.action, prefix=prefix
            )
        except ValueError as exc:
            raise UnknownTargetError(str(exc)) from None
        self._enqueue(lines)

    async def join(self, room: str) -> None:
        """Join channel ``room`` now (or after the reconnect, when down) and after every
        later reconnect."""
        await trio.lowlevel.checkpoint()
        name = self._channel_name(room)
        self._wanted[self.fold(name)] = (name, None)
        if self._ready():
            self._enqueue([p.format_line("JOIN", name)])

    async def part(self, room: str) -> None:
        """Leave channel ``room`` and stop rejoining it."""
        await trio.lowlevel.checkpoint()
        name = self._channel_name(room)
        self._wanted.pop(self.fold(name), None)
        if self._ready():
            self._enqueue([p.format_line("PART", name)])

    # ---- public helpers ----

    def statistics(self) -> IrcStatistics:
        """Counters and state, for tests and monitoring."""
        connection = self._connection
        return IrcStatistics(
            connected=self._ready(),
            nick=connection.nick if connection is not None and connection.welcomed else None,
            registrations=self._registrations,
            queued_lines=len(self._outbox),
            sent_lines=self._sent,
            unconfirmed_lines=len(connection._unconfirmed) if connection is not None else 0,
            resent_lines=self._resent,
            skipped_lines=self._skipped,
        )

    def rooms(self) -> list[ChatRoom]:
        """The channels the bot is in now."""
        connection = self._connection
        if connection is None:
            return []
        return [connection._room(channel.name) for channel in connection.channels.values()]

    def members(self, room_id: str) -> list[ChatUser]:
        """The users in channel ``room_id`` now, as the adapter tracks them (NAMES, then
        JOIN, PART, QUIT, NICK and KICK)."""
        connection = self._connection
        channel = connection.channels.get(self.fold(room_id)) if connection is not None else None
        if channel is None:
            return []
        return [self.user(nick) for nick in channel.members.values()]

    @property
    def connected(self) -> bool:
        """Whether the bot is connected and registered now (health checks; ``run``
        reconnects by itself, so its running says nothing of an outage)."""
        return self._ready()

    def fold(self, name: str) -> str:
        """Case-fold a nick or channel name as the server compares them."""
        return self._features.fold(name)

    def user_id(self, name: str) -> str:
        """A nick as typed ("Bob", "@Bob") → the id messages carry (the folded nick)."""
        return self.fold(name.removeprefix("@"))

    def room_id(self, name: str) -> str:
        """A channel as written in the bot's config ("#Ops") → the id messages carry."""
        return self.fold(name)

    def user(self, nick: str) -> ChatUser:
        """The ChatUser for ``nick``: its id is the case-folded nick (see the module's
        docstring for why)."""
        return ChatUser(id=self.fold(nick), name=nick, mention_name=nick)

    # ---- internals ----

    def _ready(self) -> bool:
        return self._connection is not None and self._connection.ready

    def _channel_name(self, room: str) -> str:
        name = room.strip()
        if not self._features.is_channel(name) or any(c in name for c in " ,\x07\r\n\0"):
            raise UnknownTargetError(
                f"{room!r} is not an IRC channel name (channels start with one of {self._features.chantypes!r})"
            )
        return name

    def _enqueue(self, lines: list[str]) -> None:
        if len(self._outbox) + len(lines) > self.config.queue_size:
            raise AdapterError(
                f"the IRC outgoing queue is full ({len(self._outbox)} lines waiting, queue_size "
                f"{self.config.queue_size}); the message was not sent"
            )
        self._outbox.extend(lines)
        self._wakeup.unpark_all()

    def _mask_bytes(self) -> int:
        # The server relays our lines with ":nick!user@host " in front, and that prefix
        # counts towards the 512 bytes. Use the real mask when known; otherwise assume
        # the longest host, so a line never gets cut off by the server.
        connection = self._connection
        cfg = self.config
        nick = connection.nick if connection is not None else cfg.nick
        longest_nick = max([nick, cfg.nick, *cfg.alt_nicks], key=lambda n: len(n.encode()))
        userhost = connection.userhost if connection is not None else None
        if userhost is None:
            userhost = f"~{cfg.effective_username}@{'x' * p.MAX_HOST_BYTES}"
        return len(f"{longest_nick}__!{userhost}".encode())


def _mention(user: ChatUser) -> str:
    return user.mention_name or user.name or user.id


def _first(group: BaseExceptionGroup[BaseException]) -> str:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__


def _connect_failure(error: OSError, host: str, where: str) -> str:
    """Why a TCP connection could not be made, with the likely fix."""
    todo: list[BaseException] = [error]
    while todo:
        cause = todo.pop(0)
        if isinstance(cause, ConnectionRefusedError):
            return f"connection to {where} refused — is the IRC server running, and is the port right?"
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve {host} (DNS: {cause.strerror}) — is the host right?"
        if isinstance(cause, BaseExceptionGroup):
            todo.extend(cause.exceptions)
        if cause.__cause__ is not None:
            todo.append(cause.__cause__)
    return f"cannot connect to {where}: {error}"


def _redact(line: str) -> str:
    """A line fit for the log: credentials replaced."""
    command = line.split(" ", 1)[0].upper()
    if command in ("PASS", "AUTHENTICATE", "OPER") or "IDENTIFY" in line.upper():
        return f"{command} <redacted>"
    return line


#: Lines written before the writer asks the server to confirm them (it also asks when the
#: outbox empties): a PING per this many lines at most.
_CONFIRM_EVERY = 20


class _Connection:
    """One connection, from TCP connect to close."""

    def __init__(self, adapter: IrcAdapter, host: AdapterHost, on_registered: Callable[[], None]) -> None:
        self.adapter = adapter
        self.host = host
        self.config = adapter.config
        self._on_registered = on_registered
        self.features = p.Features()
        self.nick = self.config.nick
        self._nick_attempt = 0
        self.userhost: str | None = None
        self.welcomed = False
        self.ready = False
        self.channels: dict[str, _Channel] = {}
        self._control: deque[str] = deque()
        #: Outbox lines written on this connection and not yet confirmed by a PONG.
        self._unconfirmed: deque[str] = deque()
        #: The PING asking for that confirmation: its token and the lines it covers.
        self._confirming: tuple[str, int] | None = None
        self._confirmations = 0
        self._stream: trio.abc.Stream | None = None
        self._registered = trio.Event()
        self._last_rx = trio.current_time()
        self._caps_offered: set[str] = set()
        self._cap_negotiating = False
        self._last_ctcp_reply = -_CTCP_REPLY_INTERVAL
        self._nursery: trio.Nursery | None = None
        #: The TCP (and TLS) connection was made.
        self.opened = False
        #: The server sent a line of IRC on it (a TLS port answers plaintext with an
        #: alert, never a line).
        self.heard = False

    # ---- life cycle ----

    async def run(self) -> None:
        cfg = self.config
        with trio.fail_after(cfg.connect_timeout):
            stream = await self._open()
        self.opened = True
        self._stream = stream
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._last_rx = trio.current_time()
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                nursery.start_soon(self._keepalive)
                nursery.start_soon(self._registration_deadline)
                self._register()
        finally:
            self.ready = False
            self._requeue_unconfirmed()
            await self._close(stream)

    def _requeue_unconfirmed(self) -> None:
        if not self._unconfirmed:
            return
        count = len(self._unconfirmed)
        self.adapter._outbox.extendleft(reversed(self._unconfirmed))
        self.adapter._resent += count
        self._unconfirmed.clear()
        log.info(
            "%d line(s) written to the IRC server were not confirmed before the connection ended; "
            "they go out again after the reconnect",
            count,
        )

    async def _open(self) -> trio.abc.Stream:
        cfg = self.config
        port = cfg.effective_port
        where = f"{cfg.host}:{port}"
        log.info("connecting to IRC server %s%s", where, " (TLS)" if cfg.tls else "")
        try:
            tcp = await trio.open_tcp_stream(cfg.host, port)
        except OSError as exc:
            raise ConnectionLostError(_connect_failure(exc, cfg.host, where)) from None
        if not cfg.tls:
            return tcp
        context = ssl.create_default_context(cafile=str(cfg.tls_ca_file) if cfg.tls_ca_file else None)
        if not cfg.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        ssl_stream = trio.SSLStream(tcp, context, server_hostname=cfg.host, https_compatible=False)
        plaintext = f"TLS handshake with {where} failed"
        hint = "if this is a plaintext port, set tls: false"
        # Handshake now, so a certificate problem surfaces as such (not as a lost line).
        try:
            with trio.fail_after(cfg.tls_handshake_timeout):
                await ssl_stream.do_handshake()
        except BaseException as exc:
            await trio.aclose_forcefully(ssl_stream)
            if isinstance(exc, trio.TooSlowError):
                # A plaintext IRC server waits for a line and never answers the hello.
                raise ConnectionLostError(
                    f"{plaintext}: no answer within {cfg.tls_handshake_timeout:g} s — {hint}"
                ) from None
            if not isinstance(exc, trio.BrokenResourceError):
                raise
            # trio wraps the ssl module's errors; a failed verification is worth its own
            # message (and is fatal before the first registration).
            if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
                raise exc.__cause__ from None
            if isinstance(exc.__cause__, ssl.SSLError):
                reason = exc.__cause__.reason or str(exc.__cause__)
                raise ConnectionLostError(f"{plaintext} ({reason}) — {hint}") from None
            raise ConnectionLostError(f"{plaintext}: the server closed the connection — {hint}") from None
        return ssl_stream

    async def _close(self, stream: trio.abc.Stream) -> None:
        # Say goodbye when we are being shut down while registered; never wait long.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 2):
            try:
                if self.welcomed:
                    await stream.send_all(b"QUIT :shutting down\r\n")
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                pass
            with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.aclose()

    def _register(self) -> None:
        cfg = self.config
        # CAP LS first: servers that know it hold registration until CAP END, which is
        # what SASL needs; servers that do not answer 421 and register as usual.
        self._cap_negotiating = True
        self._control_line("CAP", "LS", "302")
        if cfg.password is not None:
            self._control_line("PASS", cfg.password.get_secret_value())
        self._control_line("NICK", self.nick)
        self._control_line("USER", cfg.effective_username, "0", "*", cfg.realname, trailing=True)

    async def _registration_deadline(self) -> None:
        with trio.move_on_after(self.config.connect_timeout):
            await self._registered.wait()
            return
        raise ConnectionLostError(f"registration did not complete within {self.config.connect_timeout:g} s")

    # ---- the three long-running tasks ----

    async def _reader(self) -> None:
        assert self._stream is not None
        reader = p.LineReader()
        while True:
            data = await self._stream.receive_some(65536)
            if not data:
                raise ConnectionLostError("the server closed the connection")
            self._last_rx = trio.current_time()
            before = reader.dropped
            for text in reader.feed(bytes(data)):
                await self._handle_text(text)
            if reader.dropped != before:
                self.adapter._skipped += reader.dropped - before
                log.warning("skipped %d oversized line(s) from the IRC server", reader.dropped - before)

    async def _handle_text(self, text: str) -> None:
        try:
            line = p.parse_line(text)
        except p.ProtocolError as exc:
            if text.strip():
                self.adapter._skipped += 1
                log.warning("skipped a malformed line from the IRC server: %s", exc)
            return
        self.heard = True
        log.debug("<< %s", text if line.command not in ("AUTHENTICATE",) else "AUTHENTICATE <redacted>")
        try:
            await self._handle(line)
        except ConnectionLostError:
            raise
        except Exception:
            # Bad input (a line shaped unlike what its command promises) must never
            # bring the connection down: log it with its traceback and go on.
            self.adapter._skipped += 1
            log.exception("skipped an IRC line that could not be handled: %r", text[:200])

    async def _writer(self) -> None:
        assert self._stream is not None
        stream = self._stream
        outbox = self.adapter._outbox
        bucket = TokenBucket(self.config.rate_limit.burst, self.config.rate_limit.per_second)
        while True:
            if not self._control and not (self.ready and outbox):
                await self.adapter._wakeup.park()
                continue
            await bucket.wait()
            # Control lines (PONG, JOIN after a reconnect) go before callbacks' messages.
            if self._control:
                line, from_outbox = self._control.popleft(), False
            elif self.ready and outbox:
                if not self.host.may_send():
                    self._drop_outbox()
                    continue
                line, from_outbox = outbox[0], True
            else:
                continue
            bucket.take()
            log.debug(">> %s", _redact(line))
            await stream.send_all(line.encode("utf-8") + b"\r\n")
            if from_outbox:
                # Only now: a line whose write failed stays first in the outbox and is
                # sent again after the reconnect.
                outbox.popleft()
                self.adapter._sent += 1
                self._unconfirmed.append(line)
                if not outbox or len(self._unconfirmed) >= _CONFIRM_EVERY:
                    self._ask_confirmation()

    def _drop_outbox(self) -> None:
        """The bot may no longer send (ha: another bot may be the active one now): what
        waits in the outbox would go out after the fence, so it is dropped."""
        outbox = self.adapter._outbox
        log.warning(
            "dropped %d queued message line(s): this bot is no longer the active one (ha:)",
            len(outbox),
        )
        outbox.clear()

    def _ask_confirmation(self) -> None:
        """PING after the lines written so far; its PONG confirms them."""
        if self._confirming is None and self._unconfirmed:
            self._confirmations += 1
            token = f"oco-sent-{self._confirmations}"
            self._confirming = (token, len(self._unconfirmed))
            self._control_line("PING", token)

    async def _on_pong(self, line: p.Line) -> None:
        if self._confirming is not None and line.param(-1) == self._confirming[0]:
            for _ in range(self._confirming[1]):
                self._unconfirmed.popleft()
            self._confirming = None
            self._ask_confirmation()  # lines written since that PING

    async def _keepalive(self) -> None:
        interval, timeout = self.config.ping_interval, self.config.ping_timeout
        pinged = False
        while True:
            idle = trio.current_time() - self._last_rx
            if idle >= interval + timeout:
                raise ConnectionLostError(f"no data from the server for {idle:.0f} s")
            if idle >= interval:
                if not pinged:
                    self._control_line("PING", f"oco-{int(trio.current_time())}")
                    pinged = True
                await trio.sleep(interval + timeout - idle)
            else:
                pinged = False
                await trio.sleep(interval - idle)

    # ---- helpers ----

    def _control_line(self, command: str, *params: str, trailing: bool = False) -> None:
        self._control.append(p.format_line(command, *params, trailing=trailing))
        self.adapter._wakeup.unpark_all()

    def _is_me(self, nick: str) -> bool:
        return self.features.fold(nick) == self.features.fold(self.nick)

    def _user(self, nick: str) -> ChatUser:
        return ChatUser(id=self.features.fold(nick), name=nick, mention_name=nick)

    def _room(self, name: str) -> ChatRoom:
        channel = self.channels.get(self.features.fold(name))
        if channel is None:
            return ChatRoom(id=self.features.fold(name), name=name)
        return ChatRoom(id=self.features.fold(name), name=channel.name, topic=channel.topic)

    def _own_names(self) -> None:
        self.host.set_own_names([self.nick, *self.config.command_prefix])

    def _next_nick(self) -> str:
        cfg = self.config
        candidates = [cfg.nick, *cfg.alt_nicks]
        self._nick_attempt += 1
        if self._nick_attempt < len(candidates):
            return candidates[self._nick_attempt]
        extra = self._nick_attempt - len(candidates) + 1
        nicklen = max(self.features.nicklen or 9, len(cfg.nick))
        if extra <= 3:
            return (cfg.nick + "_" * extra)[:nicklen]
        # Out of ideas: a few digits (kept within NICKLEN) make a collision unlikely.
        digits = f"{secrets.randbelow(10000):04d}"
        return cfg.nick[: nicklen - len(digits)] + digits

    def _start(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    # ---- handling lines ----

    async def _handle(self, line: p.Line) -> None:
        handler = getattr(self, f"_on_{line.command.lower()}", None)
        if handler is not None:
            await handler(line)
        elif line.command in _JOIN_REFUSED:
            log.warning("could not join %s: %s", line.param(1), line.param(-1))
        elif line.command == "401":
            log.warning("no such IRC nick or channel %s: a message to it was not delivered", line.param(1))
        elif line.command == "404":
            log.warning("cannot send to channel %s: %s", line.param(1), line.param(-1))
        elif line.command in _SASL_FAILED:
            self._sasl_done(ok=False, why=line.param(-1))
        elif line.command in _NICK_REFUSED:
            self._nick_refused(line)
        elif line.command == "464":
            raise RegistrationRefusedError(f"server password refused: {line.param(-1)}")
        elif line.command in ("465", "ERROR"):
            why = line.param(-1)
            # Some servers (ngircd) refuse a wrong server password with ERROR alone,
            # without 464; before the welcome that can only mean our credentials.
            if not self.welcomed and self.config.password is not None and "password" in why.lower():
                raise RegistrationRefusedError(f"server password refused: {why}")
            raise ConnectionLostError(f"the server closed the link: {why}")

    async def _on_ping(self, line: p.Line) -> None:
        self._control_line("PONG", line.param(0) or "oco")

    async def _on_cap(self, line: p.Line) -> None:
        cfg = self.config
        sub = line.param(1).upper()
        if sub == "LS":
            self._caps_offered.update(c.partition("=")[0] for c in line.param(-1).split())
            if line.param(2) == "*":
                return  # more LS lines follow (CAP 302 multiline)
            wanted = [c for c in _WANTED_CAPS if c in self._caps_offered]
            if cfg.sasl is not None:
                if "sasl" in self._caps_offered:
                    wanted.append("sasl")
                elif cfg.sasl.required:
                    raise RegistrationRefusedError("the server does not offer SASL, and sasl.required is set")
                else:
                    log.warning("the IRC server does not offer SASL; continuing without it")
            if wanted:
                self._control_line("CAP", "REQ", " ".join(wanted))
            else:
                self._cap_end()
        elif sub == "ACK":
            acked = set(line.param(-1).split())
            if "sasl" in acked and cfg.sasl is not None:
                self._control_line("AUTHENTICATE", "PLAIN")
            else:
                self._cap_end()
        elif sub == "NAK":
            if cfg.sasl is not None and cfg.sasl.required:
                raise RegistrationRefusedError(f"the server refused capabilities {line.param(-1)!r}, SASL among them")
            self._cap_end()

    async def _on_authenticate(self, line: p.Line) -> None:
        sasl = self.config.sasl
        if sasl is None or line.param(0) != "+":
            return
        for payload in p.sasl_plain(sasl.account, sasl.password.get_secret_value()):
            self._control.append(payload)
        self.adapter._wakeup.unpark_all()

    async def _on_903(self, line: p.Line) -> None:
        log.info("SASL authentication succeeded")
        self._sasl_done(ok=True, why="")

    def _sasl_done(self, *, ok: bool, why: str) -> None:
        if not ok and self.config.sasl is not None and self.config.sasl.required:
            raise RegistrationRefusedError(f"SASL authentication failed: {why}")
        if not ok:
            log.warning("SASL authentication failed (%s); continuing without it", why)
        self._cap_end()

    def _cap_end(self) -> None:
        if self._cap_negotiating:
            self._cap_negotiating = False
            self._control_line("CAP", "END")

    async def _on_421(self, line: p.Line) -> None:
        if line.param(1).upper() == "CAP":
            # No IRCv3 capabilities here: registration goes on without them.
            self._cap_negotiating = False
            if self.config.sasl is not None and self.config.sasl.required:
                raise RegistrationRefusedError("the server does not support CAP, so SASL is impossible")

    def _nick_refused(self, line: p.Line) -> None:
        if self.welcomed:
            log.debug("nick %s still unavailable: %s", line.param(1), line.param(-1))
            return
        old = self.nick
        self.nick = self._next_nick()
        log.warning("IRC nick %s unavailable (%s); trying %s", old, line.param(-1), self.nick)
        self._control_line("NICK", self.nick)

    async def _on_001(self, line: p.Line) -> None:
        self.welcomed = True
        self.nick = line.param(0) or self.nick
        self.features = p.Features()
        self.adapter._features = self.features
        # Some servers put our full mask at the end of the welcome text.
        last = line.param(-1).rsplit(" ", 1)[-1]
        if "!" in last and "@" in last:
            self.userhost = last.partition("!")[2]

    async def _on_005(self, line: p.Line) -> None:
        self.features.load(line.params)
        # Channel names were folded before the server said how it folds them.
        wanted = self.adapter._wanted
        self.adapter._wanted = {self.features.fold(name): (name, key) for name, key in wanted.values()}

    async def _on_376(self, line: p.Line) -> None:
        if self.ready or not self.welcomed:
            return
        cfg = self.config
        self.ready = True
        self.adapter._registrations += 1
        log.info("registered on IRC server %s as %s", cfg.host, self.nick)
        self._own_names()
        if cfg.nickserv_password is not None:
            self._control_line(
                "PRIVMSG", "NickServ", f"IDENTIFY {cfg.nick} {cfg.nickserv_password.get_secret_value()}", trailing=True
            )
        for name, key in self.adapter._wanted.values():
            self._join(name, key)
        if cfg.regain_nick_interval > 0:
            self._start(self._regain_nick)
        self._registered.set()
        self.adapter._wakeup.unpark_all()
        self._on_registered()

    _on_422 = _on_376  # no MOTD: registration is complete all the same

    def _join(self, name: str, key: str | None) -> None:
        if key:
            self._control_line("JOIN", name, key)
        else:
            self._control_line("JOIN", name)

    async def _regain_nick(self) -> None:
        while True:
            await trio.sleep(self.config.regain_nick_interval)
            self._try_regain()

    def _try_regain(self) -> None:
        if not self._is_me(self.config.nick):
            self._control_line("NICK", self.config.nick)

    async def _rejoin_later(self, folded: str) -> None:
        await trio.sleep(self.config.rejoin_delay)
        wanted = self.adapter._wanted.get(folded)
        if wanted is not None and folded not in self.channels:
            log.info("rejoining %s", wanted[0])
            self._join(*wanted)

    # ---- membership ----

    async def _membership(
        self,
        kind: MembershipKind,
        nick: str,
        channel: str,
        actor: str | None = None,
        reason: str = "",
        previous: str | None = None,
    ) -> None:
        await self.host.membership(
            MembershipEvent(
                kind=kind,
                user=self._user(nick),
                room=self._room(channel),
                actor=self._user(actor) if actor else None,
                reason=reason,
                previous=self._user(previous) if previous else None,
            )
        )

    async def _on_join(self, line: p.Line) -> None:
        name, nick = line.param(0), line.nick
        folded = self.features.fold(name)
        if self._is_me(nick):
            self.channels[folded] = _Channel(name)
            if line.userhost:
                self.userhost = line.userhost
            log.info("joined %s", name)
        channel = self.channels.get(folded)
        if channel is None:
            return
        channel.members[self.features.fold(nick)] = nick
        await self._membership(MembershipKind.JOINED, nick, name)

    async def _on_part(self, line: p.Line) -> None:
        name, nick = line.param(0), line.nick
        await self._leave(name, nick, MembershipKind.LEFT, reason=line.param(1))

    async def _on_kick(self, line: p.Line) -> None:
        name, nick = line.param(0), line.param(1)
        folded = self.features.fold(name)
        await self._leave(name, nick, MembershipKind.KICKED, actor=line.nick, reason=line.param(2))
        if self._is_me(nick):
            log.warning("kicked from %s by %s: %s", name, line.nick, line.param(2))
            if self.config.rejoin_on_kick and folded in self.adapter._wanted:
                self._start(self._rejoin_later, folded)

    async def _leave(
        self, name: str, nick: str, kind: MembershipKind, *, actor: str | None = None, reason: str = ""
    ) -> None:
        folded = self.features.fold(name)
        channel = self.channels.get(folded)
        if channel is None:
            return
        room = self._room(name)
        channel.members.pop(self.features.fold(nick), None)
        if self._is_me(nick):
            del self.channels[folded]
        await self.host.membership(
            MembershipEvent(
                kind=kind,
                user=self._user(nick),
                room=room,
                actor=self._user(actor) if actor else None,
                reason=reason,
            )
        )

    async def _on_invite(self, line: p.Line) -> None:
        # Reported, not acted on: whether to join is for a callback (or an operator) to
        # decide, through Join.
        nick, channel = line.param(0), line.param(1)
        if channel and self._is_me(nick):
            await self._membership(MembershipKind.INVITED, nick, channel, actor=line.nick)

    async def _on_quit(self, line: p.Line) -> None:
        nick = line.nick
        folded = self.features.fold(nick)
        for channel in list(self.channels.values()):
            if folded in channel.members:
                await self._leave(channel.name, nick, MembershipKind.LEFT, reason=f"quit: {line.param(0)}")
        if self.welcomed and folded == self.features.fold(self.config.nick):
            self._try_regain()  # whoever held our nick is gone

    async def _on_nick(self, line: p.Line) -> None:
        old, new = line.nick, line.param(0)
        if not new:
            return
        if self._is_me(old):
            self.nick = new
            log.info("IRC nick is now %s", new)
            self._own_names()
        # A nick change is one RENAMED per shared channel (old nick as `previous`), so
        # callbacks see a rename rather than someone leaving and someone else joining.
        folded_old, folded_new = self.features.fold(old), self.features.fold(new)
        for channel in list(self.channels.values()):
            if folded_old in channel.members:
                del channel.members[folded_old]
                channel.members[folded_new] = new
                if folded_old != folded_new:
                    await self._membership(MembershipKind.RENAMED, new, channel.name, previous=old)
        if self.welcomed and folded_old == self.features.fold(self.config.nick) and not self._is_me(new):
            self._try_regain()

    async def _on_332(self, line: p.Line) -> None:
        # RPL_TOPIC on joining: remembered (rooms carry it), not reported as a change.
        channel = self.channels.get(self.features.fold(line.param(1)))
        if channel is not None:
            channel.topic = line.param(2)

    async def _on_topic(self, line: p.Line) -> None:
        channel = self.channels.get(self.features.fold(line.param(0)))
        if channel is None:
            return
        channel.topic = line.param(1)
        await self.host.topic(self._room(channel.name), self._user(line.nick))

    async def _on_353(self, line: p.Line) -> None:
        # RPL_NAMREPLY: me, symbol, channel, names
        channel = self.channels.get(self.features.fold(line.param(2)))
        if channel is None:
            return
        for entry in line.param(3).split():
            nick = p.strip_names_prefixes(entry, self.features.prefixes)
            if nick:
                channel.members[self.features.fold(nick)] = nick

    async def _on_366(self, line: p.Line) -> None:
        # RPL_ENDOFNAMES: the list is whole; the directory gets it, and nobody is told
        # these people joined (they were there before the bot).
        channel = self.channels.get(self.features.fold(line.param(1)))
        if channel is None:
            return
        members = [self._user(nick) for nick in channel.members.values()]
        await self.host.room_members(self._room(channel.name), members)

    # ---- messages ----

    async def _on_privmsg(self, line: p.Line) -> None:
        if len(line.params) < 2 or not line.source:
            raise p.ProtocolError("PRIVMSG without a target or text")
        target, text, nick = line.param(0), line.param(1), line.nick
        if self._is_me(nick) or ("." in nick and "!" not in line.source):
            return  # our own echo, or a server notice-like message
        action = False
        request = p.parse_ctcp(text)
        if request is not None:
            tag, data = request
            if tag != "ACTION":
                self._ctcp_reply(nick, tag, data)
                return
            text, action = data, True
        if not text.strip():
            return
        user = self._user(nick)
        msgid = line.tags.get("msgid") or ""
        if self.features.is_channel(target.lstrip(self.features.prefixes)):
            room = self._room(target.lstrip(self.features.prefixes))
            message = IncomingMessage(body=text, user=user, room=room, id=msgid, action=action)
        else:
            message = IncomingMessage(body=text, user=user, direct=True, id=msgid, action=action)
        await self.host.receive(message)

    async def _on_notice(self, line: p.Line) -> None:
        # Bots never answer notices (RFC 2812), so they do not reach the router.
        log.info("notice from %s: %s", line.nick or "server", line.param(-1)[:300])

    def _ctcp_reply(self, nick: str, tag: str, data: str) -> None:
        now = trio.current_time()
        # Replies cost rate-limit tokens: answer at most one every few seconds.
        if now - self._last_ctcp_reply < _CTCP_REPLY_INTERVAL:
            return
        if tag == "VERSION":
            reply = p.ctcp("VERSION", _VERSION)
        elif tag == "PING":
            reply = p.ctcp("PING", data[:64])
        else:
            return
        self._last_ctcp_reply = now
        self._control_line("NOTICE", nick, reply, trailing=True)
