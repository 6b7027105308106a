"""The parts of a running bot, every one of them open: what :meth:`Bot.open` yields.

:class:`BotCore` is where the other modules meet. The store, directory, authorization
and audit log exist only while the bot runs; holding them here, built after each has
opened, is what lets every other module use them without checking for None. It is also
the object the gRPC edge sees through its narrow :class:`~._edge.EdgeHost` protocol.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from ._activity import Activity, LiveFeed
from ._approvals import Approvals
from ._audit import AuditLog
from ._auth import Authorization
from ._commands import ChatCommands
from ._config import Config
from ._conversations import Conversations
from ._datastores import DataStores
from ._directory import Directory
from ._events import EventHub
from ._health import Health
from ._incoming import AdapterLink, Incoming
from ._leader import Leader, Solo
from ._metrics import Metrics
from ._outgoing import Outgoing
from ._policy import CallbackPolicy, Policies, fold_patterns
from ._proto import core_pb2, robot_pb2
from ._router import Route, Router
from ._store import Store

log = logging.getLogger(__name__)


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
    #: Why the bot stopped restarting it (a launched callback that cannot run), if it did.
    given_up: str | None = None
    #: Times a launched callback was started again after it exited.
    restarts: int = 0
    #: How its process last failed (exit code and last output line), if it ever did.
    last_error: str = ""

    def process_exited(self, failure: str) -> None:
        """Its process exited (or could not start); ``failure`` says how, "" for a clean exit."""
        self.exited.set()
        if failure:
            self.last_error = failure

    def restarting(self) -> None:
        """Its process is about to be started again."""
        self.restarts += 1


class BotCore:
    """A running bot's parts. Built by :meth:`Bot.open` once the store, directory,
    authorization and audit log are open, so none of them is ever None here."""

    def __init__(
        self,
        *,
        config: Config,
        router: Router,
        callbacks: dict[str, CallbackState],
        store: Store,
        directory: Directory,
        auth: Authorization,
        audit: AuditLog,
        datastores: DataStores,
        tasks: trio.Nursery,
        stats: BotStatistics,
        events: EventHub,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.router = router
        self.callbacks = callbacks
        self.store = store
        self.directory = directory
        self.auth = auth
        self.audit = audit
        self.datastores = datastores
        self.stats = stats
        #: Events beyond chat matches, and durable delivery.
        self.events = events
        #: The adapters by instance name, once they are created (after the callbacks connect).
        self.links: dict[str, AdapterLink] = {}
        #: Whether this bot is the active one (``ha:``): asked before anything reaches chat.
        self.leader: Leader | Solo = Solo()
        #: Counters for /metrics, and why the bot is not ready (gRPC health, /readyz).
        self.metrics = metrics or Metrics()
        self.health: Health = self.metrics.health
        #: What it did lately: for wait_idle, and the console's figures and live view.
        console = config.console
        live = LiveFeed(console.live_buffer, console.show_bodies) if console is not None else None
        self.activity = Activity(self.metrics, live)
        # The audit log's own record: the gate records every delivered command, and a
        # call through self.record passes its nine details on once more (~2 µs).
        self.policies = Policies(config, auth, audit.record, router.bot_name, self.canonical_rooms)
        self._tasks = tasks
        self.outgoing = Outgoing(self)
        self.commands = ChatCommands(self)
        #: Matches and callbacks' requests waiting for people to approve them.
        self.approvals = Approvals(self)
        #: Questions callbacks asked people, waiting for their answers.
        self.conversations = Conversations(self)
        self.incoming = Incoming(self)
        auth.canonical = self.canonical_user

    def spawn(self, fn: Callable[[], Awaitable[object]]) -> None:
        """Run ``fn`` in the background, in the bot's nursery (replies, chat commands)."""
        self._tasks.start_soon(fn)

    def record(self, kind: str, decision: str, **details: str) -> None:
        """Add one record to the audit log (never waits)."""
        self.audit.record(kind, decision, **details)

    def policy(self, callback_id: str) -> CallbackPolicy:
        """The callback's capabilities, route rules and rate limit."""
        return self.policies.policy(callback_id)

    def callback_state(self, callback_id: str) -> CallbackState:
        """What the bot knows of a callback; one registered only in the store (with
        `oco callbacks add`) gets an entry when it first calls."""
        state = self.callbacks.get(callback_id)
        if state is None:
            state = self.callbacks[callback_id] = CallbackState(callback_id, "", [], launched=False)
        return state

    def secrets(self) -> Mapping[str, str]:
        """The configured callbacks' secrets, by callback id ("" when the store keeps it)."""
        return {cid: cb.secret for cid, cb in self.callbacks.items()}

    def canonical_user(self, user_id: str) -> str:
        """A user id as a person wrote it (``irc/Bob``) → the id messages carry
        (``irc/bob``), as the adapter it names says."""
        prefix, sep, native = user_id.partition("/")
        link = self.links.get(prefix) if sep else None
        return f"{prefix}/{link.adapter.user_id(native)}" if link is not None and native else user_id

    def canonical_rooms(self, patterns: Sequence[str]) -> Sequence[str]:
        """Room patterns from the config (``irc/#Ops-*``) folded as their adapters fold
        room ids (``irc/#ops-*``), for the checks in ``_policy``."""
        return fold_patterns(patterns, {name: link.adapter.room_id for name, link in self.links.items()})

    async def send_messages(self, callback_id: str, request: robot_pb2.SendMessagesRequest) -> list[str]:
        """Send every message of ``request`` in order, after checking all of them, and
        return their ids; a message asking a question opens it first, so that no quick
        answer is missed."""
        asking = [(i, m) for i, m in enumerate(request.messages) if m.HasField("question")]
        if not asking:
            return await self.outgoing.send_messages(callback_id, request)
        for index, message in asking:
            self.conversations.check(message, index)
        opened = [self.conversations.ask(callback_id, message) for _, message in asking]
        try:
            return await self.outgoing.send_messages(callback_id, request)
        except BaseException:
            for asked in opened:
                self.conversations.withdraw(asked)
            raise

    async def fetch_file(self, url: str) -> tuple[bytes, str]:
        """A file a person sent lately, by its url (Robot.GetAttachment)."""
        return await self.incoming.fetch_file(url)

    async def join(self, room: core_pb2.Room, leave: bool = False) -> None:
        """Join (or part) a room through its adapter."""
        await self.outgoing.join(room, leave)
