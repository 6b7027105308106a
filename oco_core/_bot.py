"""The bot: wires adapters, router, store, directory, gRPC edge and callback processes.

Start-up order, each step ready before the next: the store opens; the directory loads;
the gRPC server binds; launched callbacks start and the bot waits (a bounded time) for
each to open its Listen stream, so that the first chat message finds their routes; then
the adapters connect. Shutdown (SIGINT, SIGTERM, or every adapter ending) runs the other
way, in the one nursery: adapters stop, callbacks get TERM then KILL, the gRPC server
gives running calls a grace period, the directory flushes, and the store closes.
"""

from __future__ import annotations

import itertools
import logging
import random
import re
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from ._adapter import Adapter, ChatRoom, ChatUser, IncomingMessage, MembershipEvent, MembershipKind, OutgoingMessage
from ._admin import configured_store
from ._audit import ALLOWED, DENIED, AuditLog
from ._auth import Authorization
from ._config import LoadedConfig, validate_section
from ._directory import Directory, RoomRecord, UserRecord
from ._errors import (
    AdapterError,
    ConfigError,
    InvalidRequestError,
    RequestTooLargeError,
    StoreError,
    StoreUnavailableError,
    UnknownTargetError,
)
from ._plugins import Plugins
from ._policy import PRIVATE_ROOM, CallbackPolicy
from ._proto import core_pb2, robot_pb2
from ._quota import QuotaStore
from ._router import InvalidPatternError, Route, Router, compile_pattern
from ._secrets import check_store_secrets, expects_store_secret, generate_secret
from ._store import NamespacedStore, Store

log = logging.getLogger(__name__)

_HELP = re.compile(r"help(?:\s+(.*))?", re.IGNORECASE | re.DOTALL)
#: Commands the bot answers itself, before any route: managing roles and identities.
_BUILTIN = re.compile(
    r"(?P<cmd>grant|revoke|roles|who\s+can|link|unlink)(?:\s+(?P<args>.*))?", re.IGNORECASE | re.DOTALL
)
_BUILTIN_HELP = [
    "roles [<user>] - the roles you (or, for admins, <user>) hold",
    "who can <permission> - the roles and people that grant or hold <permission>",
    "link <account> - link your account with <account> (say it from both accounts)",
    "unlink [<account>] - detach an account from your linked accounts",
    "grant <user> <role> - (admins) give <user> a role",
    "revoke <user> <role> - (admins) take a role from <user>",
]
#: How long start-up waits for launched callbacks to open their Listen streams.
CALLBACK_STARTUP_WAIT = 20.0
#: How long start-up waits for every adapter's first connection attempt.
ADAPTER_STARTUP_WAIT = 30.0


@dataclass(slots=True)
class BotStatistics:
    """What :meth:`Bot.statistics` returns."""

    received: int = 0
    matched: int = 0
    sent: int = 0
    dropped: int = 0
    streams: int = 0


@dataclass(slots=True)
class CallbackState:
    """What the bot knows of one configured callback."""

    id: str
    secret: str
    routes: list[Route]
    launched: bool
    connected: trio.Event = field(default_factory=trio.Event)
    #: Set when its process first exits (or fails to start): start-up stops waiting for it.
    exited: trio.Event = field(default_factory=trio.Event)


class _AdapterLink:
    """The bot as one adapter sees it (implements :class:`AdapterHost`)."""

    def __init__(self, bot: Bot, name: str, adapter: Adapter, store: Store) -> None:
        self._bot = bot
        self.name = name
        self.adapter = adapter
        self.bot_name = bot.router.bot_name
        self.aliases: Sequence[str] = bot.router.aliases
        self.store = NamespacedStore(store, f"adapter:{name}")

    async def receive(self, message: IncomingMessage) -> None:
        self._bot.route_incoming(self.name, message)

    async def membership(self, event: MembershipEvent) -> None:
        self._bot.route_membership(self.name, event)

    async def topic(self, room: ChatRoom, user: ChatUser | None = None) -> None:
        self._bot.route_topic(self.name, room, user)

    def set_own_names(self, names: Sequence[str]) -> None:
        self._bot.router.set_own_names(self.name, names)

    async def wait_idle(self, *, quiet: float = 0.5, max_wait: float = 10.0) -> None:
        await self._bot.wait_idle(quiet=quiet, max_wait=max_wait)


class Bot:
    """One OCO bot. Create it from a loaded config and the installed plugins, then
    ``await bot.run()`` (or ``nursery.start(bot.run)``, which returns the gRPC address)."""

    def __init__(self, loaded: LoadedConfig, plugins: Plugins) -> None:
        self.loaded = loaded
        config = loaded.config
        self.config = config
        self.router = Router(config.bot.name, config.bot.aliases)
        self.callbacks: dict[str, CallbackState] = {}
        for cb in config.callbacks:
            if cb.secret is not None:
                secret = cb.secret.get_secret_value()
            elif expects_store_secret(cb):
                secret = ""  # registered with `oco callbacks add`: the store has its hash
            else:
                secret = generate_secret()  # launched: a fresh one each start
            routes = [Route.declared(r) for r in cb.routes]
            self.callbacks[cb.id] = CallbackState(cb.id, secret, routes, launched=cb.command is not None)
        self._policies = {
            cb.id: CallbackPolicy(cb.id, cb, f"callbacks[{i}] ({cb.id})", self.record)
            for i, cb in enumerate(config.callbacks)
        }
        # Validate every plugin section now, so `oco check-config` and start-up fail early.
        self._adapter_specs = []
        for index, entry in enumerate(config.adapters):
            try:
                kind = plugins.adapter(entry.type)
            except ConfigError as exc:
                raise loaded.error(("adapters", index, "type"), str(exc)) from None
            options = validate_section(loaded, ("adapters", index), kind.config_model, entry.options())
            self._adapter_specs.append((entry.instance_name, kind, options))
        self._store_type, self._store_options = configured_store(loaded, plugins)
        adapter_names = [entry.instance_name for entry in config.adapters]
        for index, admin in enumerate(config.auth.admins):
            if admin.partition("/")[0] not in adapter_names:
                raise loaded.error(
                    ("auth", "admins", index),
                    f"{admin!r} names no configured adapter (ids start with one of: {', '.join(adapter_names)})",
                )
        for cb_index, cb in enumerate(config.callbacks):
            for r_index, route in enumerate(self.callbacks[cb.id].routes):
                try:
                    compile_pattern(route.pattern, route.ignore_case)
                except InvalidPatternError as exc:
                    raise loaded.error(("callbacks", cb_index, "routes", r_index, "pattern"), str(exc)) from None
        self.links: dict[str, _AdapterLink] = {}
        self.directory: Directory | None = None
        self.auth: Authorization | None = None
        self.audit: AuditLog | None = None
        self.store: Store | None = None
        self.address = ""
        self._message_ids = itertools.count(1)
        self._last_activity = time.monotonic()
        self._awaiting_reply: dict[str, float] = {}
        self._shutdown: trio.CancelScope | None = None
        self._tasks: trio.Nursery | None = None
        self._starting: trio.CancelScope | None = None
        self._stats = BotStatistics()

    # -- running ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled or until every adapter has ended."""
        try:
            with trio.CancelScope() as self._starting:
                await self._run(task_status)
        finally:
            stats = self.statistics()
            log.info(
                "bot stopped: %d message(s) received, %d match(es) delivered, %d message(s) sent, %d event(s) dropped",
                stats.received,
                stats.matched,
                stats.sent,
                stats.dropped,
            )

    async def _run(self, task_status: trio.TaskStatus[str]) -> None:
        from ._edge import serve
        from ._supervisor import supervise_callback

        async with AsyncExitStack() as stack:
            store = QuotaStore.for_callbacks(
                await self._open_store(stack),
                self.config.store.quota,
                {cb.id: cb.quota for cb in self.config.callbacks if cb.quota is not None},
            )
            self.store = store
            await check_store_secrets(store, self.config.callbacks)
            self.directory = Directory(store)
            await self.directory.load()
            self.auth = Authorization(store, self.config.auth)
            await self.auth.load()
            self.audit = AuditLog(store, self.config.auth.audit.retention_days)
            nursery = await stack.enter_async_context(trio.open_nursery())
            self._tasks = nursery
            await nursery.start(self.directory.run)
            await nursery.start(self.audit.run)
            await nursery.start(self.auth.run)
            self.address = await nursery.start(serve, self)
            with trio.CancelScope() as self._shutdown:
                async with trio.open_nursery() as workers:
                    for cb in self.config.callbacks:
                        if cb.command is not None:
                            state = self.callbacks[cb.id]
                            workers.start_soon(
                                supervise_callback,
                                cb,
                                self.address,
                                state.secret,
                                cb.cwd,
                                state.exited.set,
                                self.config.grpc.tls,
                            )
                    await self._wait_for_callbacks()
                    for name, kind, options in self._adapter_specs:
                        adapter = kind.create(options)
                        self.links[name] = _AdapterLink(self, name, adapter, store)
                    self.auth.canonical = self.canonical_user
                    async with trio.open_nursery() as adapters:
                        # Adapters connect side by side; one whose server is down holds
                        # back neither the others nor start-up for longer than the wait.
                        attempts = {name: trio.Event() for name in self.links}
                        for name, link in self.links.items():
                            adapters.start_soon(self._supervise_adapter, link, attempts[name])
                        with trio.move_on_after(ADAPTER_STARTUP_WAIT):
                            for attempt in attempts.values():
                                await attempt.wait()
                        slow = [name for name, attempt in attempts.items() if not attempt.is_set()]
                        if slow:
                            log.warning("adapter(s) %s still connecting; the bot is up meanwhile", ", ".join(slow))
                        log.info("bot %r is up: gRPC on %s", self.config.bot.name, self.address)
                        task_status.started(self.address)
                    log.info("every adapter has ended; shutting down")
                    workers.cancel_scope.cancel()
            nursery.cancel_scope.cancel()

    async def _open_store(self, stack: AsyncExitStack) -> Store:
        # A database that is down at start-up is waited for, with one line a try, rather
        # than failing the bot: it usually comes up beside it (systemd, Kubernetes).
        delay = 1.0
        while True:
            try:
                return await stack.enter_async_context(self._store_type.open(self._store_options))
            except StoreUnavailableError as exc:
                log.error("store unavailable: %s; retrying in %.0f s", exc, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, 30.0)

    def callback_state(self, callback_id: str) -> CallbackState:
        """What the bot knows of a callback; one registered only in the store (with
        `oco callbacks add`) gets an entry when it first calls."""
        state = self.callbacks.get(callback_id)
        if state is None:
            state = self.callbacks[callback_id] = CallbackState(callback_id, "", [], launched=False)
        return state

    def policy(self, callback_id: str) -> CallbackPolicy:
        """The callback's capabilities, route rules and rate limit (defaults when the
        config does not name it)."""
        policy = self._policies.get(callback_id)
        if policy is None:
            policy = self._policies[callback_id] = CallbackPolicy(callback_id, record=self.record)
        return policy

    def statistics(self) -> BotStatistics:
        """Counters since start: messages received, matches delivered, messages sent,
        events dropped because a callback's queue was full, and open Listen streams."""
        return BotStatistics(
            received=self._stats.received,
            matched=self._stats.matched,
            sent=self._stats.sent,
            dropped=self.router.overflowed,
            streams=len(self.router.subscriptions()),
        )

    def shutdown(self) -> None:
        """Begin an orderly shutdown (as SIGTERM does); while still starting (waiting
        for the store, say), stop at once."""
        if self._shutdown is not None:
            self._shutdown.cancel()
        elif self._starting is not None:
            self._starting.cancel()

    async def _wait_for_callbacks(self) -> None:
        launched = [cb for cb in self.callbacks.values() if cb.launched]
        with trio.move_on_after(CALLBACK_STARTUP_WAIT):
            for cb in launched:
                await _first(cb.connected, cb.exited)
        late = [cb.id for cb in launched if not cb.connected.is_set()]
        if late:
            log.warning(
                "callback(s) %s did not open a Listen stream (exited, or not within %.0f s); "
                "starting the adapters anyway",
                ", ".join(late),
                CALLBACK_STARTUP_WAIT,
            )

    async def _supervise_adapter(self, link: _AdapterLink, attempted: trio.Event) -> None:
        # The supervision boundary for adapters: a failure is logged and retried with
        # backoff; returning normally means the adapter is done (the shell at end of input).
        backoff = 1.0
        while True:
            began = time.monotonic()
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(partial(link.adapter.run, link))
                    attempted.set()
                log.info("adapter %r ended", link.name)
                return
            except* Exception as group:
                for exc in group.exceptions:
                    log.error("adapter %r failed: %s: %s", link.name, type(exc).__name__, exc, exc_info=exc)
            attempted.set()
            if time.monotonic() - began > 60:
                backoff = 1.0
            delay = backoff * (0.5 + random.random())
            log.info("restarting adapter %r in %.1f s", link.name, delay)
            await trio.sleep(delay)
            backoff = min(backoff * 2, 60.0)

    # -- incoming --------------------------------------------------------------------

    def route_incoming(self, adapter: str, incoming: IncomingMessage) -> None:
        """Route one message from an adapter; never waits."""
        self._stats.received += 1
        self._last_activity = time.monotonic()
        if incoming.edit_of:
            log.debug("not routing an edit of %s from %s", incoming.edit_of, adapter)
            return
        user_id = f"{adapter}/{incoming.user.id}"
        user = core_pb2.User(id=user_id, name=incoming.user.name, mention_name=incoming.user.mention_name)
        room = None
        if incoming.room is not None:
            room = core_pb2.Room(id=f"{adapter}/{incoming.room.id}", name=incoming.room.name, topic=incoming.room.topic)
        message_id = f"{adapter}/{incoming.id}" if incoming.id else f"{adapter}/~{next(self._message_ids)}"
        message = core_pb2.Message(
            body=incoming.body,
            source=core_pb2.Source(user=user, room=room),
            id=message_id,
            action=incoming.action,
            private=incoming.direct,
        )
        if self.directory is not None:
            self.directory.see_user(UserRecord(user.id, user.name, user.mention_name))
            if room is not None:
                self.directory.see_room(room.id, room.name, member=user.id)
        respond_text = self.router.address(adapter, incoming.body)
        if incoming.direct and respond_text is None:  # in private, the bot's name is optional
            respond_text = incoming.body.strip()
        if respond_text is not None:
            builtin = _BUILTIN.fullmatch(respond_text)
            if builtin and self._is_builtin(builtin.group("cmd"), builtin.group("args") or ""):
                command = " ".join(builtin.group("cmd").lower().split())
                self._spawn(partial(self._builtin, adapter, incoming, user_id, command, builtin.group("args") or ""))
                return
            help_match = _HELP.fullmatch(respond_text)
            if help_match:
                self._answer_help(adapter, incoming, user_id, room.id if room else "", help_match.group(1) or "")
        gate = _MessageGate(self, user_id, room.id if room else "", respond_text)
        matches = self.router.match(message, incoming.body, incoming.direct, respond_text, gate)
        if matches:
            self._stats.matched += len(matches)
            self._awaiting_reply[message_id] = time.monotonic()
        refusal = gate.refusal(delivered=any(m.event.matched_message.direct for m in matches))
        if refusal:
            self._reply(adapter, incoming, refusal, mention=True)

    def _is_builtin(self, command: str, args: str) -> bool:
        """Whether an addressed message is the bot's own command. `link` is a common
        word for callbacks too ("oco link https://..."): it is ours only when it names
        an account on one of the bot's adapters; otherwise it goes to the routes."""
        if command.lower() != "link":
            return True
        words = args.split()
        return len(words) == 1 and words[0].partition("/")[0] in self.links

    def _answer_help(self, adapter: str, incoming: IncomingMessage, user_id: str, room_id: str, topic: str) -> None:
        topic = topic.strip()
        lines = self.router.help_lines(topic, lambda cb, route: self.may_run(user_id, room_id, cb, route))
        builtin = [line for line in _BUILTIN_HELP if topic and topic.lower() in line.lower()]
        if lines or builtin:
            body = "\n".join(lines + builtin)
        elif topic:
            body = f"no command matches {topic!r}; say `{self.router.bot_name} help` for all"
        else:
            body = "no callbacks with commands are connected"
        if not topic:
            body += f"\n(also: roles, who can, link; say `{self.router.bot_name} help roles` and so on)"
        self._reply(adapter, incoming, body)

    def _reply(self, adapter: str, incoming: IncomingMessage, body: str, *, mention: bool = False) -> None:
        """Answer a person in the room (or private chat) they wrote in; never waits."""
        out = OutgoingMessage(
            body=body,
            room_id=incoming.room.id if incoming.room else None,
            user=incoming.user,
            mention=mention and incoming.room is not None,
            private=incoming.room is None,
            in_reply_to=incoming.id,
        )
        link = self.links[adapter]

        async def send() -> None:
            try:
                await link.adapter.send(out)
            except AdapterError as exc:
                log.warning("could not send the bot's own reply through %s: %s", adapter, exc)

        self._spawn(send)

    # -- permissions -----------------------------------------------------------------

    def may_run(self, user_id: str, room_id: str, callback_id: str, route: Route) -> bool:
        """Whether a person may run a route in a room (without recording it), for help."""
        access = self.policy(callback_id).access(route)
        if not access.allows_room(room_id):
            return False
        assert self.auth is not None
        return not access.permission or self.auth.check(user_id, access.permission).allowed

    def record(self, kind: str, decision: str, **details: str) -> None:
        """Add one record to the audit log (never waits)."""
        if self.audit is not None:
            self.audit.record(kind, decision, **details)

    async def _builtin(self, adapter: str, incoming: IncomingMessage, user_id: str, command: str, args: str) -> None:
        assert self.auth is not None
        words = args.split()
        name = self.router.bot_name
        room = f"{adapter}/{incoming.room.id}" if incoming.room else ""
        audit = {"user": user_id, "person": self.auth.person(user_id), "room": room, "detail": f"{command} {args}"}
        try:
            if command in ("grant", "revoke"):
                if len(words) != 2:
                    answer = f"usage: {name} {command} <user> <role>"
                elif not self.auth.is_admin(user_id):
                    self.record("admin", DENIED, **audit)
                    answer = f"only admins may {command} roles (admins are listed in auth.admins of the bot's config)"
                else:
                    target = self._user_ref(adapter, words[0])
                    role = words[1]
                    if command == "grant":
                        changed = await self.auth.grant(target, role)
                        answer = f"{target} now has the role {role}" if changed else f"{target} already has {role}"
                    else:
                        changed = await self.auth.revoke(target, role)
                        answer = (
                            f"{target} no longer has the role {role}" if changed else f"{target} did not have {role}"
                        )
                    self.record("admin", ALLOWED, **audit, permission=role)
            elif command == "roles":
                target = self._user_ref(adapter, words[0]) if words else user_id
                if target != user_id and not self.auth.is_admin(user_id) and target not in self.auth.accounts(user_id):
                    answer = "only admins may see another person's roles"
                else:
                    roles = self.auth.roles(target)
                    admin = " (admin)" if self.auth.is_admin(target) else ""
                    accounts = self.auth.accounts(target)
                    linked = f"; linked accounts: {', '.join(accounts)}" if len(accounts) > 1 else ""
                    answer = f"{target}{admin}: roles: {', '.join(roles) or 'none'}{linked}"
            elif command == "who can":
                if len(words) != 1:
                    answer = f"usage: {name} who can <permission>"
                else:
                    granting, people = self.auth.who_can(words[0])
                    answer = (
                        f"{words[0]}: granted by role(s) {', '.join(granting) or 'none'}; "
                        f"held by {'; '.join(people) or 'nobody yet'}"
                    )
            elif command == "link":  # _is_builtin saw one word naming an account on an adapter
                other = self._user_ref(adapter, words[0])
                if other == user_id:
                    answer = f"{other} is this account: name the other one, from each of the two"
                elif await self.auth.request_link(user_id, other):
                    self.record("admin", ALLOWED, **audit)
                    answer = f"linked: {user_id} and {other} are now one person; roles follow both"
                else:
                    minutes = self.config.auth.link_timeout / 60
                    answer = f"to confirm, say `{name} link {user_id}` as {other} within {minutes:.0f} minutes"
            else:  # unlink
                target = self._user_ref(adapter, words[0]) if words else user_id
                if target not in self.auth.accounts(user_id) and not self.auth.is_admin(user_id):
                    answer = f"{target} is not one of your accounts"
                elif await self.auth.unlink(target):
                    self.record("admin", ALLOWED, **audit)
                    answer = f"{target} is now linked to nobody"
                else:
                    answer = f"{target} is not linked to another account"
        except StoreError as exc:
            answer = f"could not save that: {exc}; try again later"
        self._reply(adapter, incoming, answer, mention=True)

    def canonical_user(self, user_id: str) -> str:
        """A user id as a person wrote it (``irc/Bob``) → the id messages carry
        (``irc/bob``), as the adapter it names says."""
        prefix, sep, native = user_id.partition("/")
        link = self.links.get(prefix) if sep else None
        return f"{prefix}/{link.adapter.user_id(native)}" if link is not None and native else user_id

    def _user_ref(self, adapter: str, ref: str) -> str:
        """A user named in a command: a full id (``irc/alice``), or a name on the
        speaker's adapter (``alice``, ``@alice``, a display name the bot has seen)."""
        prefix, sep, _ = ref.partition("/")
        if sep and prefix in self.links:
            return self.canonical_user(ref)
        canonical = self.canonical_user(f"{adapter}/{ref}")
        if self.directory is not None and canonical not in self.directory.users:
            bare = ref.removeprefix("@").lower()
            for user in self.directory.users.values():
                if user.id.startswith(adapter + "/") and bare in (user.name.lower(), user.mention_name.lower()):
                    return user.id
        return canonical

    def _spawn(self, fn: Any) -> None:
        assert self._tasks is not None, "the bot is not running"
        self._tasks.start_soon(fn)

    def route_membership(self, adapter: str, event: MembershipEvent) -> None:
        """Pass a membership change to the callbacks that asked for them."""
        self._last_activity = time.monotonic()
        user = _user_pb(adapter, event.user)
        room = core_pb2.Room(id=f"{adapter}/{event.room.id}", name=event.room.name, topic=event.room.topic)
        if self.directory is not None:
            self.directory.see_user(UserRecord(user.id, user.name, user.mention_name))
            if event.kind is MembershipKind.JOINED:
                self.directory.see_room(room.id, room.name, member=user.id)
            elif event.kind in (MembershipKind.LEFT, MembershipKind.KICKED):
                self.directory.see_room(room.id, room.name)
                self.directory.leave_room(room.id, user.id)
        change = core_pb2.MembershipChange(
            kind=event.kind.value,  # type: ignore[arg-type]  # the enum values match the proto's
            user=user,
            room=room,
            actor=_user_pb(adapter, event.actor) if event.actor else None,
            reason=event.reason,
        )
        self.router.broadcast(robot_pb2.EVENT_KIND_MEMBERSHIP, core_pb2.Event(membership_change=change))

    def route_topic(self, adapter: str, room: ChatRoom, user: ChatUser | None) -> None:
        """Pass a topic change to the callbacks that asked for them."""
        room_pb = core_pb2.Room(id=f"{adapter}/{room.id}", name=room.name, topic=room.topic)
        if self.directory is not None:
            self.directory.see_room(room_pb.id, room.name, topic=room.topic)
        change = core_pb2.TopicChange(room=room_pb, user=_user_pb(adapter, user) if user else None)
        self.router.broadcast(robot_pb2.EVENT_KIND_TOPIC, core_pb2.Event(topic_change=change))

    async def wait_idle(self, *, quiet: float, max_wait: float) -> None:
        """See AdapterHost.wait_idle. Replies are awaited for messages that matched a route,
        up to ``max_wait``; then ``quiet`` seconds without activity end the wait."""
        deadline = trio.current_time() + max_wait
        while trio.current_time() < deadline:
            now = time.monotonic()
            waiting = any(now - t < max_wait for t in self._awaiting_reply.values())
            if not waiting and self.router.queued() == 0 and now - self._last_activity >= quiet:
                return
            await trio.sleep(0.02)

    # -- outgoing --------------------------------------------------------------------

    def resolve(
        self, message: core_pb2.Message, with_mention: bool, index: int = 0
    ) -> tuple[_AdapterLink, OutgoingMessage]:
        """Check one outgoing message and find the adapter it goes through.

        Raises InvalidRequestError, RequestTooLargeError or UnknownTargetError, naming
        the message by its ``index`` in the request.
        """
        what = f"message {index}"
        size = len(message.body.encode("utf-8"))
        limit = self.config.bot.max_message_bytes
        if size > limit:
            raise RequestTooLargeError(
                f"{what} is {size} bytes; the bot accepts at most {limit} (bot.max_message_bytes); split it"
            )
        room_id = message.source.room.id
        user_id = message.source.user.id
        if not room_id and not user_id:
            raise InvalidRequestError(f"{what} has neither source.room.id nor source.user.id: say where it goes")
        link, native_room = self._split(room_id, what) if room_id else (None, None)
        user: ChatUser | None = None
        if user_id:
            user_link, native_user = self._split(user_id, what)
            if link is not None and user_link is not link:
                raise InvalidRequestError(f"{what}: user {user_id!r} and room {room_id!r} are on different adapters")
            link = user_link
            known = self.directory.users.get(user_link.name + "/" + native_user) if self.directory else None
            user = ChatUser(
                id=native_user,
                name=message.source.user.name or (known.name if known else ""),
                mention_name=message.source.user.mention_name or (known.mention_name if known else "") or native_user,
            )
        assert link is not None
        in_reply_to = message.in_reply_to or ""
        prefix = link.name + "/"
        out = OutgoingMessage(
            body=message.body,
            room_id=native_room,
            user=user,
            mention=bool(with_mention and user is not None),
            private=message.private or native_room is None,
            format="markdown" if message.format == core_pb2.FORMAT_MARKDOWN else "plain",
            action=message.action,
            in_reply_to=in_reply_to.removeprefix(prefix) if in_reply_to.startswith(prefix) else "",
        )
        return link, out

    def _split(self, ident: str, what: str) -> tuple[_AdapterLink, str]:
        name, sep, native = ident.partition("/")
        link = self.links.get(name) if sep else None
        if link is not None and native:
            return link, native
        if len(self.links) == 1 and not sep:  # one adapter: an id without prefix is that adapter's own
            return next(iter(self.links.values())), ident
        known = ", ".join(f"{n}/..." for n in self.links) or "none yet"
        raise UnknownTargetError(f"{what}: unknown id {ident!r}; ids start with an adapter name ({known})")

    async def send_messages(self, callback_id: str, request: robot_pb2.SendMessagesRequest) -> None:
        """Send every message of ``request`` in order, after checking all of them."""
        resolved = [self.resolve(m, request.WithMention, i) for i, m in enumerate(request.messages)]
        policy = self.policy(callback_id)
        for index, (link, out) in enumerate(resolved):
            native = out.room_id or (out.user.id if out.user else "")
            policy.require_send(f"{link.name}/{native}", f"message {index}")
        policy.take_send(len(resolved))
        for link, out in resolved:
            await link.adapter.send(out)
            self._stats.sent += 1
        self._last_activity = time.monotonic()
        for message in request.messages:
            if message.in_reply_to:
                self._awaiting_reply.pop(message.in_reply_to, None)
        if len(self._awaiting_reply) > 10000:
            cutoff = time.monotonic() - 60
            self._awaiting_reply = {k: v for k, v in self._awaiting_reply.items() if v > cutoff}

    async def join(self, room: core_pb2.Room, leave: bool = False) -> None:
        """Join (or part) a room through its adapter."""
        ident = room.id or room.name
        if not ident:
            raise InvalidRequestError("the room has neither id nor name")
        link, native = self._split(ident, "room")
        if leave:
            await link.adapter.part(native)
        else:
            await link.adapter.join(native)

    # -- directory -------------------------------------------------------------------

    def users(self, room_id: str = "") -> list[UserRecord]:
        """Known users, optionally only those in a room."""
        assert self.directory is not None
        if room_id:
            room = self.directory.rooms.get(room_id)
            if room is None:
                raise UnknownTargetError(f"unknown room {room_id!r}")
            return [self.directory.users.get(m) or UserRecord(m) for m in room.members]
        return sorted(self.directory.users.values(), key=lambda u: u.id)

    def room(self, room_id: str) -> RoomRecord:
        """One known room."""
        assert self.directory is not None
        found = self.directory.rooms.get(room_id)
        if found is None:
            raise UnknownTargetError(f"unknown room {room_id!r}: the bot has not seen it")
        return found


class _MessageGate:
    """Decides, for one incoming message, which routes that matched may receive it: the
    operator's room rules, the person's permissions, and the person's rate limit; it
    records every decision in the audit log and knows what to tell the person."""

    def __init__(self, bot: Bot, user_id: str, room_id: str, respond_text: str | None) -> None:
        assert bot.auth is not None
        self._bot = bot
        self._auth = bot.auth
        self._user = user_id
        self._room = room_id
        self._addressed = respond_text is not None
        self._what = (respond_text or "")[:200]
        self._wait: float | None = None
        self.missing: list[str] = []
        self.wrong_room = False

    def _record(self, decision: str, callback_id: str, route: Route, **details: str) -> None:
        self._bot.record(
            "route",
            decision,
            user=self._user,
            person=self._auth.person(self._user),
            room=self._room,
            callback=callback_id,
            route=route.id,
            **details,
        )

    def __call__(self, callback_id: str, route: Route) -> bool:
        access = self._bot.policy(callback_id).access(route)
        permission = access.permission
        if not access.allows_room(self._room):
            where = self._room or PRIVATE_ROOM
            self._record(DENIED, callback_id, route, detail=f"not allowed in {where}: {self._what}")
            self.wrong_room = self.wrong_room or route.respond
            return False
        if permission:
            decision = self._auth.check(self._user, permission)
            if not decision.allowed:
                self._record(
                    DENIED, callback_id, route, permission=permission, detail=f"{decision.reason}: {self._what}"
                )
                if route.respond and permission not in self.missing:
                    self.missing.append(permission)
                return False
        if self._wait is None:  # one command, however many routes it matches
            self._wait = self._auth.take(self._user)
            if self._wait:
                self._bot.record(
                    "rate_limit",
                    DENIED,
                    user=self._user,
                    person=self._auth.person(self._user),
                    room=self._room,
                    detail=f"over {self._bot.config.auth.rate_limit} commands a minute: {self._what}",
                )
        if self._wait:
            return False
        if permission or route.respond:
            self._record(ALLOWED, callback_id, route, permission=permission, detail=self._what)
        return True

    def refusal(self, delivered: bool) -> str:
        """What to tell the person: one line, or "" when nothing was refused that they
        asked for (overheard messages are refused silently, and recorded)."""
        if self._wait and self._addressed and self._auth.should_warn(self._user, self._wait):
            return (
                f"slow down: you may run {self._bot.config.auth.rate_limit} commands a minute; "
                f"commands in the next {self._wait:.0f} s are ignored"
            )
        if delivered or not self._addressed:
            return ""
        name = self._bot.router.bot_name
        if self.missing:
            needed = " or ".join(f"`{p}`" for p in self.missing)
            return f"you need the permission {needed} for that; `{name} who can {self.missing[0]}` says who has it"
        if self.wrong_room:
            return "that command is not available here"
        return ""


async def _first(*events: trio.Event) -> None:
    """Wait until any of ``events`` is set."""
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)


def _user_pb(adapter: str, user: ChatUser) -> core_pb2.User:
    return core_pb2.User(id=f"{adapter}/{user.id}", name=user.name, mention_name=user.mention_name)
