"""Events beyond chat, and the one path every durable event takes to a callback.

Webhook requests, schedule firings, published events and matches of durable routes are
all :class:`~._proto.core_pb2.Event` messages. Whoever makes one hands it to
:meth:`EventHub.deliver` (``_webhooks``, ``_schedules``, :meth:`EventHub.publish`, the
router for durable routes); the hub keeps it in the core store (namespace ``events``)
until the callback has it, and writes it to one stream of the callback when one is
connected, in order, through the stream's own queue (``_router.Subscription``).

A stream that asked to acknowledge (``ListenRequest.acknowledge``) gets each durable
event with a ``delivery_id``; the event stays in the store until ``Robot.Acknowledge``
names it, and goes back to the callback's other streams (or waits for the next one)
when its stream ends first: at least once. A stream that does not acknowledge (a
client generated from the specification) has an event once it was written to it: at
most once, as chat matches have always been.

Declarations (webhook routes, schedules, topics) live with the stream that made them,
as routes do; after a callback's last stream leaves, the hub remembers them for
``events.ttl``, so events for a callback restarting for a deploy are kept for it.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import struct
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import trio
from google.protobuf.message import DecodeError

from ._config import CallbackSettings, Config, ScheduleSettings
from ._errors import StoreError
from ._leader import Leader, Solo
from ._proto import core_pb2, robot_pb2
from ._router import Queued, Router, Subscription, copy_event
from ._store import Store
from ._timing import Backoff, Throttle

log = logging.getLogger(__name__)

#: The core store's namespace for durable events: key ``<callback id>/<time>-<bot>-<n>``.
NAMESPACE = "events"
#: Seconds between sweeps for expired events and streams that sit on theirs.
_SWEEP_INTERVAL = 0.5
_LOG_INTERVAL = 10.0
_PAGE = 500
#: The value of a stored event: its expiry (ms since the epoch), then the Event.
_HEADER = struct.Struct(">q")
#: Who publishes the bot's own topics.
BOT_PUBLISHER = "oco"

_TOPIC = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_TOPIC_PATTERN_SEGMENT = re.compile(r"[A-Za-z0-9_-]+|\*|#")


def topic_problem(topic: str) -> str | None:
    """Why ``topic`` cannot be published to, or None."""
    if not topic:
        return "a topic cannot be empty"
    if len(topic) > 255:
        return f"topic {topic[:40]!r}... is longer than 255 characters"
    if not _TOPIC.fullmatch(topic):
        return (
            f"topic {topic!r} is not dot-separated segments of letters, digits, '_' and '-' (such as "
            "'deploys.finished')"
        )
    return None


def topic_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be subscribed to, or None."""
    segments = pattern.split(".")
    if len(pattern) > 255 or not all(_TOPIC_PATTERN_SEGMENT.fullmatch(s) for s in segments):
        return (
            f"topic pattern {pattern!r} is not dot-separated segments of letters, digits, '_' and '-', or '*' "
            "(one segment), with an optional final '#' (any number): such as 'deploys.*' or 'oco.#'"
        )
    if "#" in segments[:-1]:
        return f"topic pattern {pattern!r} has '#' before its last segment; '#' may only end a pattern"
    return None


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` is one ``pattern`` names: ``*`` is one segment, a final ``#``
    any number of them (none included)."""
    want = pattern.split(".")
    have = topic.split(".")
    for index, segment in enumerate(want):
        if segment == "#":
            return True
        if index >= len(have) or (segment != "*" and segment != have[index]):
            return False
    return len(want) == len(have)


def topic_covers(allowed: str, pattern: str) -> bool:
    """Whether every topic ``pattern`` names is one ``allowed`` names (for capabilities)."""
    grant = allowed.split(".")
    want = pattern.split(".")
    for index, segment in enumerate(grant):
        if segment == "#":
            return True
        if index >= len(want) or want[index] == "#":
            return False
        if segment != "*" and (want[index] == "*" or segment != want[index]):
            return False
    return len(grant) == len(want)


class NotConnectedError(Exception):
    """No stream of the callback is connected to take a synchronous webhook request."""


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """The webhook route a request goes to."""

    callback_id: str
    route: robot_pb2.WebhookRoute
    #: Whether a stream of the callback is connected now.
    connected: bool


@dataclass(frozen=True, slots=True)
class DeclaredSchedule:
    """A schedule of a callback, from its streams or from the operator's config."""

    callback_id: str
    schedule: robot_pb2.Schedule
    #: True for one of the operator's ``callbacks[].schedules``.
    configured: bool


def schedule_id(schedule: robot_pb2.Schedule) -> str:
    """A schedule's id, defaulted as the protocol says."""
    if schedule.id:
        return schedule.id
    return schedule.cron if schedule.cron else f"every {schedule.every_seconds}s"


def configured_schedule(settings: ScheduleSettings) -> robot_pb2.Schedule:
    """One of the operator's ``callbacks[].schedules`` as the protocol's Schedule."""
    schedule = robot_pb2.Schedule(
        cron=settings.cron or "",
        time_zone=settings.time_zone,
        every_seconds=math.ceil(settings.every) if settings.every is not None else 0,
        catch_up_seconds=math.ceil(settings.catch_up),
    )
    schedule.id = settings.id or schedule_id(schedule)
    return schedule


def webhook_route_id(route: robot_pb2.WebhookRoute) -> str:
    """A webhook route's id, defaulted as the protocol says."""
    return route.id or f"{route.method.upper()} {route.path}"


def _route_takes(route: robot_pb2.WebhookRoute, method: str, path: str) -> bool:
    if route.method != "*" and route.method.upper() != method.upper():
        return False
    if route.path.endswith("/{rest}"):
        return path.startswith(route.path[: -len("{rest}")])
    return route.path == path


@dataclass(slots=True)
class _Declared:
    """What a callback's streams declared beyond routes: live while a stream is open,
    remembered for ``events.ttl`` once the last one left (``left`` is then set)."""

    webhooks: dict[str, robot_pb2.WebhookRoute] = field(default_factory=dict)
    schedules: dict[str, robot_pb2.Schedule] = field(default_factory=dict)
    topics: set[str] = field(default_factory=set)
    left: float | None = None


def _wanted_by(event: core_pb2.Event) -> tuple[str, str]:
    """What a stream must have declared to be given ``event``: (kind, what)."""
    kind = event.WhichOneof("type")
    if kind == "published_event":
        return ("topic", event.published_event.topic)
    if kind == "webhook_request":
        return ("webhook", event.webhook_request.route_id)
    if kind == "schedule_firing":
        return ("schedule", event.schedule_firing.schedule_id)
    if kind == "matched_message":
        return ("route", event.matched_message.route_id)
    return ("", "")


@dataclass(frozen=True, slots=True)
class _Interest:
    """What one open stream declared."""

    topics: tuple[str, ...]
    webhooks: dict[str, robot_pb2.WebhookRoute]
    schedules: dict[str, robot_pb2.Schedule]
    routes: frozenset[str]

    def wants(self, wanted: tuple[str, str], configured: Mapping[str, object]) -> bool:
        """Whether this stream should get an event that ``wanted`` describes; the
        operator's schedules (``configured``) go to any stream of their callback."""
        kind, what = wanted
        if kind == "topic":
            return any(topic_matches(pattern, what) for pattern in self.topics)
        if kind == "webhook":
            return what in self.webhooks
        if kind == "schedule":
            return what in self.schedules or what in configured
        if kind == "route":
            return what in self.routes
        return True


@dataclass(eq=False, slots=True)
class _Pending:
    """A durable event kept for a callback, in the store and here."""

    key: str
    data: bytes
    kind: str
    #: When it expires, in seconds since the epoch.
    expires: float
    #: Which streams of the callback want it (:func:`_wanted_by`).
    wanted: tuple[str, str] = ("", "")
    #: Set once it is in the store.
    stored: trio.Event = field(default_factory=trio.Event)
    #: Handled (or dropped) before it was stored: the write that stores it deletes it.
    forgotten: bool = False
    #: May go to a stream before it is stored (a match of a durable route, best effort).
    early: bool = False
    #: The stream it is on (queued, or written and not yet acknowledged).
    holder: Subscription | None = None
    written: bool = False
    sent_at: float = 0.0
    redelivered: int = 0


@dataclass(slots=True)
class _Outbox:
    """A callback's durable events, oldest first."""

    pending: dict[str, _Pending] = field(default_factory=dict)
    bytes: int = 0
    turn: itertools.count[int] = field(default_factory=itertools.count)
    expired: int = 0
    evicted: int = 0


@dataclass(slots=True)
class EventStatistics:
    """Counts since the bot started, for logs and metrics."""

    kept: int = 0
    delivered: int = 0
    acknowledged: int = 0
    redelivered: int = 0
    expired: int = 0
    evicted: int = 0
    published: int = 0


@dataclass(slots=True)
class _Waiting:
    callback_id: str
    done: trio.Event = field(default_factory=trio.Event)
    response: robot_pb2.WebhookResponse | None = None
    holder: Subscription | None = None


class EventHub:
    """Declarations of event interest, and the delivery of every event that is not a
    plain chat match."""

    def __init__(self, config: Config, store: Store, router: Router, spawn: Callable[..., object]) -> None:
        self.settings = config.events
        self.store = store
        self.router = router
        self._spawn = spawn
        router.keep_durable = self.keep_nowait
        self.stats = EventStatistics()
        self._declared: dict[str, _Declared] = {}
        self._configured = _configured_schedules(config.callbacks)
        self._outboxes: dict[str, _Outbox] = {}
        self._in_flight: dict[Subscription, int] = {}
        #: What each open stream declared: an event goes only to a stream that wants it.
        self._interest: dict[Subscription, _Interest] = {}
        self._webhooks: dict[str, _Waiting] = {}
        self._deletes: deque[_Pending] = deque()
        self._wake = trio.Event()
        self._deleted = trio.Event()
        self._logs = Throttle(_LOG_INTERVAL)
        self._bot = os.urandom(3).hex()
        self._count = itertools.count()
        self.schedules_version = 0
        self._schedules_changed = trio.Event()
        #: Only the active bot (``ha:``) hands events out; a standby keeps none in memory.
        self.leader: Leader | Solo = Solo()

    # -- start-up and background work -------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the events kept in the store, then deliver, sweep and delete until cancelled;
        with ``ha:`` only while this bot is the active one (loading again each time)."""
        if not self.leader.acting():
            task_status.started()  # a standby is ready without them
            task_status = trio.TASK_STATUS_IGNORED
        while True:
            await self.leader.wait_active()
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as guard:
                    guard.start_soon(_cancel_when, self.leader.wait_stepped_down, scope)
                    await self._load()
                    await self._deliver(task_status)
            task_status = trio.TASK_STATUS_IGNORED
            # Stepped down: what it held is in the store, for the active bot to hand out.
            self._outboxes.clear()
            self._in_flight = dict.fromkeys(self._in_flight, 0)

    async def _deliver(self, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._delete_acknowledged)
            task_status.started()
            while True:
                with trio.move_on_after(_SWEEP_INTERVAL):
                    await self._wake.wait()
                self._wake = trio.Event()
                self._sweep()
                self.router.expire_ghosts()
                for callback_id in list(self._outboxes):
                    self._pump(callback_id)

    async def _load(self) -> None:
        backoff = Backoff(0.5, 10.0)
        after = ""
        kept = 0
        while True:
            try:
                items = await self.store.list(NAMESPACE, start_after=after, limit=_PAGE)
            except StoreError as exc:
                delay = backoff.next_delay()
                log.warning("could not read the durable events from the store (%s); retrying in %.1f s", exc, delay)
                await trio.sleep(delay)
                continue
            for item in items:
                callback_id = item.key.partition("/")[0]
                decoded = _decode(item.key, item.value)
                if decoded is None:
                    continue
                expires, event = decoded
                data = item.value[_HEADER.size :]
                pending = _Pending(item.key, data, event.WhichOneof("type") or "", expires, _wanted_by(event))
                pending.stored.set()
                outbox = self._outboxes.setdefault(callback_id, _Outbox())
                outbox.pending[item.key] = pending
                outbox.bytes += len(pending.data)
                kept += 1
            if len(items) < _PAGE:
                break
            after = items[-1].key
        if kept:
            log.info("%d durable event(s) kept in the store wait for %d callback(s)", kept, len(self._outboxes))

    async def _delete_acknowledged(self) -> None:
        backoff = Backoff(0.5, 10.0)
        while True:
            if not self._deletes:
                self._deleted = trio.Event()
                await self._deleted.wait()
            pending = self._deletes[0]
            try:
                await self.store.delete(NAMESPACE, pending.key)
            except StoreError as exc:
                delay = backoff.next_delay()
                if self._logs.allow("delete") is not None:
                    log.warning("could not delete handled events from the store (%s); retrying", exc)
                await trio.sleep(delay)
                continue
            backoff.reset()
            self._deletes.popleft()

    def _forget(self, callback_id: str, pending: _Pending) -> None:
        outbox = self._outboxes.get(callback_id)
        if outbox is None or outbox.pending.pop(pending.key, None) is None:
            return
        outbox.bytes -= len(pending.data)
        if pending.holder is not None:
            self._in_flight[pending.holder] -= 1
            pending.holder = None
            self._wake.set()
        pending.data = b""  # handled: only its key is needed, to delete it
        if pending.stored.is_set():
            self._deletes.append(pending)
            self._deleted.set()
        else:
            pending.forgotten = True

    def _sweep(self) -> None:
        now = time.time()
        stale = time.monotonic() - self.settings.redeliver_after
        for callback_id, outbox in self._outboxes.items():
            expired = []
            for pending in outbox.pending.values():
                if pending.expires <= now and (pending.holder is None or pending.written):
                    # One written and never acknowledged expires too, or it would go
                    # round the callback's streams forever.
                    expired.append(pending)
                elif pending.holder is not None and pending.written and pending.sent_at < stale:
                    log.warning(
                        "callback %r has not acknowledged event %s in %.0f s (events.redeliver_after); offering it "
                        "again",
                        callback_id,
                        pending.key,
                        self.settings.redeliver_after,
                    )
                    self._release(pending)
            for pending in expired:
                self._forget(callback_id, pending)
            if expired:
                outbox.expired += len(expired)
                self.stats.expired += len(expired)
                self._log_loss(callback_id, "expired", len(expired), outbox.expired)

    def _log_loss(self, callback_id: str, how: str, count: int, total: int) -> None:
        if self._logs.allow((callback_id, how)) is None:
            return
        why = (
            f"waited longer than their time to live (events.ttl {self.settings.ttl:g} s)"
            if how == "expired"
            else (
                f"were the oldest beyond events.max_pending ({self.settings.max_pending}) or "
                f"events.max_pending_bytes ({self.settings.max_pending_bytes})"
            )
        )
        log.warning(
            "%d durable event(s) for callback %r %s: they %s and were dropped undelivered (%d so far)",
            count,
            callback_id,
            how,
            why,
            total,
        )

    # -- declarations -----------------------------------------------------------------

    def stream_opened(self, subscription: Subscription, request: robot_pb2.ListenRequest) -> None:
        """A Listen stream is live: its declarations join the callback's, and waiting
        events start flowing to it."""
        callback_id = subscription.callback_id
        self._in_flight[subscription] = 0
        self._interest[subscription] = _Interest(
            topics=tuple(request.topics),
            webhooks={webhook_route_id(w): w for w in request.webhooks},
            schedules={schedule_id(s): s for s in request.schedules},
            routes=frozenset(route.id for route in subscription.routes),
        )
        self._redeclare(callback_id)
        self._wake.set()
        if len(self.router.subscriptions(callback_id)) == 1:
            self.announce("oco.callback.connected", callback=callback_id)

    def stream_closed(self, subscription: Subscription) -> None:
        """A Listen stream ended: the durable events it held and had not acknowledged go
        back to the callback's queue; when it was the last, its declarations are kept for
        ``events.ttl``."""
        callback_id = subscription.callback_id
        self._in_flight.pop(subscription, None)
        if self._interest.pop(subscription, None) is not None and self.router.subscriptions(callback_id):
            self._redeclare(callback_id)  # what only this stream declared goes with it
        outbox = self._outboxes.get(callback_id)
        if outbox is not None:
            for pending in outbox.pending.values():
                if pending.holder is subscription:
                    pending.holder = None
                    if pending.written:
                        pending.redelivered += 1
                        self.stats.redelivered += 1
                    pending.written = False
        for waiting in self._webhooks.values():
            if waiting.holder is subscription:
                waiting.done.set()  # its caller answers 503 now rather than 504 later
        if not self.router.subscriptions(callback_id):
            declared = self._declared.get(callback_id)
            if declared is not None:
                declared.left = time.monotonic()
            self.announce("oco.callback.disconnected", callback=callback_id)
        self._wake.set()

    def _redeclare(self, callback_id: str) -> None:
        """The callback's declarations: those of its open streams together (the first
        stream's wins where two declare one id differently)."""
        declared = _Declared()
        for stream in self.router.subscriptions(callback_id):
            interest = self._interest.get(stream)
            if interest is None:
                continue
            for route_id, webhook in interest.webhooks.items():
                declared.webhooks.setdefault(route_id, webhook)
            for sid, schedule in interest.schedules.items():
                declared.schedules.setdefault(sid, schedule)
            declared.topics.update(interest.topics)
        before = self._declared.get(callback_id)
        self._declared[callback_id] = declared
        if before is None or set(before.schedules) != set(declared.schedules):
            self._bump_schedules()

    def announce(self, topic: str, /, **fields: object) -> None:
        """Publish one of the bot's own topics, its fields as a JSON object, in the
        background (when a callback subscribes to it)."""
        if self.subscribers(topic):
            self._spawn(partial(self.publish_own, topic, json.dumps(fields).encode()))

    def _remembered(self, declared: _Declared) -> bool:
        """Whether declarations still count: a stream is open, or the last left less than
        ``events.ttl`` ago."""
        return declared.left is None or declared.left >= time.monotonic() - self.settings.ttl

    def _live_declared(self) -> Iterable[tuple[str, _Declared]]:
        for callback_id, declared in list(self._declared.items()):
            if not self._remembered(declared):
                del self._declared[callback_id]
                if declared.schedules:
                    self._bump_schedules()
                continue
            yield callback_id, declared

    def webhook_target(self, callback_id: str, method: str, path: str) -> WebhookTarget | None:
        """The callback's webhook route for ``method`` and ``path`` (below its prefix)."""
        declared = self._declared.get(callback_id)
        if declared is None or not self._remembered(declared):
            return None
        for route in declared.webhooks.values():
            if _route_takes(route, method, path):
                return WebhookTarget(callback_id, route, declared.left is None)
        return None

    def configure_schedules(self, callbacks: Sequence[CallbackSettings]) -> None:
        """The operator's schedules, anew (a live reload)."""
        configured = _configured_schedules(callbacks)
        if configured != self._configured:
            self._configured = configured
            self._bump_schedules()

    def rerouted(self, subscription: Subscription) -> None:
        """An open stream's routes changed (a live reload): durable matches follow them."""
        interest = self._interest.get(subscription)
        if interest is not None:
            self._interest[subscription] = replace(interest, routes=frozenset(r.id for r in subscription.routes))

    def knows(self, callback_id: str) -> bool:
        """Whether the callback has a stream on this bot, or had one less than
        ``events.ttl`` ago: events made for it here will reach it."""
        declared = self._declared.get(callback_id)
        return declared is not None and self._remembered(declared)

    def webhooks(self) -> dict[str, list[robot_pb2.WebhookRoute]]:
        """Every callback's webhook routes, live or remembered."""
        return {cid: list(d.webhooks.values()) for cid, d in self._live_declared() if d.webhooks}

    def schedules(self) -> list[DeclaredSchedule]:
        """Every schedule now: the operator's, then those streams declared."""
        found = [
            DeclaredSchedule(callback_id, schedule, True)
            for callback_id, schedules in self._configured.items()
            for schedule in schedules.values()
        ]
        for callback_id, declared in self._live_declared():
            configured = self._configured.get(callback_id, {})
            found += [
                DeclaredSchedule(callback_id, schedule, False)
                for sid, schedule in declared.schedules.items()
                if sid not in configured
            ]
        return found

    def _bump_schedules(self) -> None:
        self.schedules_version += 1
        self._schedules_changed.set()
        self._schedules_changed = trio.Event()

    async def wait_schedules_changed(self, seen: int) -> int:
        """Wait until :meth:`schedules` differs from version ``seen``; the new version."""
        while self.schedules_version == seen:
            await self._schedules_changed.wait()
        return self.schedules_version

    def subscribers(self, topic: str) -> list[str]:
        """Callbacks subscribed to ``topic`` (connected, or away for less than events.ttl)."""
        return [
            callback_id
            for callback_id, declared in self._live_declared()
            if any(topic_matches(pattern, topic) for pattern in declared.topics)
        ]

    # -- durable delivery ------------------------------------------------------------

    def _key(self, callback_id: str) -> str:
        return f"{callback_id}/{time.time_ns():020d}-{self._bot}-{next(self._count) % 1_000_000:06d}"

    def keep(self, callback_id: str, event: core_pb2.Event, *, ttl: float | None = None) -> _Pending:
        """Queue a durable event for the callback now, and return it; the caller stores
        it (:meth:`deliver` waits for that, :meth:`keep_nowait` lets it happen)."""
        data = event.SerializeToString()
        expires = time.time() + (self.settings.ttl if ttl is None else ttl)
        pending = _Pending(self._key(callback_id), data, event.WhichOneof("type") or "", expires, _wanted_by(event))
        outbox = self._outboxes.setdefault(callback_id, _Outbox())
        evicted = 0
        while outbox.pending and (
            len(outbox.pending) >= self.settings.max_pending
            or outbox.bytes + len(data) > self.settings.max_pending_bytes
        ):
            oldest = next((p for p in outbox.pending.values() if p.holder is None), None)
            if oldest is None:
                break
            self._forget(callback_id, oldest)
            evicted += 1
        if evicted:
            outbox.evicted += evicted
            self.stats.evicted += evicted
            self._log_loss(callback_id, "evicted", evicted, outbox.evicted)
        outbox.pending[pending.key] = pending
        outbox.bytes += len(data)
        self.stats.kept += 1
        return pending

    async def deliver(self, callback_id: str, event: core_pb2.Event, *, ttl: float | None = None) -> None:
        """Keep ``event`` for the callback until it has it; returns once it is in the
        store (StoreError when it cannot be: then it is not kept)."""
        pending = self.keep(callback_id, event, ttl=ttl)
        try:
            await self._store(pending)
        except BaseException:
            self._forget(callback_id, pending)  # never handed out: it was not stored
            raise
        self._pump(callback_id)

    def keep_nowait(self, callback_id: str, event: core_pb2.Event, ttl: float) -> None:
        """Keep ``event`` (a match of a durable route, from the router, which cannot
        wait); it is delivered at once and stored in the background."""
        pending = self.keep(callback_id, event, ttl=ttl)
        pending.early = True
        self._spawn(partial(self._store_quietly, pending))
        self._pump(callback_id)

    async def _store(self, pending: _Pending) -> None:
        if pending.forgotten:  # handled before it could be stored: nothing to keep
            return
        value = _HEADER.pack(int(pending.expires * 1000)) + pending.data
        await self.store.set(NAMESPACE, pending.key, value)
        pending.stored.set()
        self._delete_if_forgotten(pending)

    def _delete_if_forgotten(self, pending: _Pending) -> None:
        # Handled while it was being stored: delete what was just written.
        if pending.forgotten:
            self._deletes.append(pending)
            self._deleted.set()

    async def _store_quietly(self, pending: _Pending) -> None:
        backoff = Backoff(0.5, 10.0)
        while not pending.stored.is_set() and not pending.forgotten:
            try:
                await self._store(pending)
                return
            except StoreError as exc:
                if self._logs.allow("store") is not None:
                    log.warning("could not keep a durable event in the store (%s); it waits in memory", exc)
                await trio.sleep(backoff.next_delay())

    def _pump(self, callback_id: str) -> None:
        """Hand the callback's waiting events, oldest first, to its streams with room."""
        outbox = self._outboxes.get(callback_id)
        if outbox is None or not outbox.pending or not self.leader.acting():
            return
        window = self.settings.max_unacknowledged
        # Streams with room; one that fills up leaves the list, and when none is left the
        # rest waits for the next acknowledgement or sweep.
        streams = [
            s
            for s in self.router.subscriptions(callback_id)
            if s in self._interest and not s.closed and self._in_flight[s] < window
        ]
        configured = self._configured.get(callback_id, {})
        for pending in list(outbox.pending.values()):
            if not streams:
                return
            if pending.holder is not None or not (pending.stored.is_set() or pending.early):
                continue  # given out, or not yet in the store: its caller may still hear it failed
            wanting = [s for s in streams if self._interest[s].wants(pending.wanted, configured)]
            start = next(outbox.turn)
            for step in range(len(wanting)):
                stream = wanting[(start + step) % len(wanting)]
                if stream.offer(self._queued(callback_id, pending, stream)):
                    pending.holder = stream
                    self._in_flight[stream] += 1
                    if self._in_flight[stream] >= window:
                        streams.remove(stream)
                    break
                streams.remove(stream)  # its queue is full

    def _queued(self, callback_id: str, pending: _Pending, stream: Subscription) -> Queued:
        acknowledging = stream.acknowledge

        def build() -> core_pb2.Event:
            event = core_pb2.Event.FromString(pending.data)
            if acknowledging:
                event.delivery_id = pending.key
            event.redelivered = pending.redelivered
            return event

        def written() -> None:
            if pending.holder is not stream:
                return
            self.stats.delivered += 1
            pending.written = True
            pending.sent_at = time.monotonic()
            if not acknowledging:  # at most once: written is delivered
                self._forget(callback_id, pending)

        queued = Queued(len(pending.data) + 40, build, pending.kind)
        queued.on_written = written
        queued.movable = False  # the hub offers it again when its stream ends
        return queued

    def _release(self, pending: _Pending) -> None:
        if pending.holder is not None:
            self._in_flight[pending.holder] -= 1
            pending.holder = None
        pending.written = False
        pending.redelivered += 1
        self.stats.redelivered += 1
        self._wake.set()

    def acknowledge(self, callback_id: str, delivery_ids: Sequence[str]) -> int:
        """The callback handled these events: forget them. Returns how many it still had."""
        outbox = self._outboxes.get(callback_id)
        if outbox is None:
            return 0
        done = 0
        for delivery_id in delivery_ids:
            pending = outbox.pending.get(delivery_id)
            if pending is not None:
                self._forget(callback_id, pending)
                done += 1
        self.stats.acknowledged += done
        if done:
            self._pump(callback_id)
        return done

    def waiting(self, callback_id: str) -> int:
        """Durable events kept for the callback, on a stream or not."""
        outbox = self._outboxes.get(callback_id)
        return len(outbox.pending) if outbox is not None else 0

    # -- synchronous webhooks ---------------------------------------------------------

    async def call_webhook(self, callback_id: str, request: core_pb2.WebhookRequest) -> robot_pb2.WebhookResponse:
        """Hand a synchronous webhook request to one stream of the callback and wait for
        its answer (the caller bounds the wait). NotConnectedError when no stream takes it."""
        wanted = ("webhook", request.route_id)
        streams = [
            s
            for s in self.router.subscriptions(callback_id)
            if not s.closed and s in self._interest and self._interest[s].wants(wanted, {})
        ]
        if not streams:
            raise NotConnectedError(f"callback {callback_id!r} is not connected")
        event = core_pb2.Event(webhook_request=request)
        size = event.ByteSize()
        waiting = self._webhooks[request.id] = _Waiting(callback_id)
        try:
            start = hash(request.id)
            for step in range(len(streams)):
                stream = streams[(start + step) % len(streams)]
                queued = Queued(size, partial(copy_event, event), "webhook_request")
                queued.movable = False  # if its stream ends first, its caller hears so (503)
                if stream.offer(queued):
                    waiting.holder = stream
                    break
            else:
                raise NotConnectedError(f"every stream of callback {callback_id!r} is full")
            await waiting.done.wait()
            if waiting.response is None:
                raise NotConnectedError(f"the stream of callback {callback_id!r} ended before it answered")
            return waiting.response
        finally:
            del self._webhooks[request.id]

    def respond_webhook(self, callback_id: str, response: robot_pb2.WebhookResponse) -> bool:
        """A callback's answer to a synchronous webhook request; False when no request
        of this callback by that id waits (answered, timed out, or never sent)."""
        waiting = self._webhooks.get(response.request_id)
        if waiting is None or waiting.callback_id != callback_id or waiting.done.is_set():
            return False
        waiting.response = response
        waiting.done.set()
        return True

    # -- publish / subscribe ----------------------------------------------------------

    async def publish(
        self, publisher: str, topic: str, payload: bytes, attributes: dict[str, str] | None = None
    ) -> tuple[str, int]:
        """Hand an event to every callback subscribed to ``topic``; its id and how many."""
        self.leader.check()  # a standby would keep it where the active bot never looks
        published = core_pb2.PublishedEvent(
            id=uuid.uuid4().hex,
            topic=topic,
            payload=payload,
            attributes=attributes or {},
            publisher=publisher,
            published_unix_ms=int(time.time() * 1000),
        )
        event = core_pb2.Event(published_event=published)
        subscribers = self.subscribers(topic)
        # Every subscriber's copy is stored before any is handed out: a Publish that fails
        # has reached no one, so the publisher may simply retry it.
        kept = [(callback_id, self.keep(callback_id, event)) for callback_id in subscribers]
        try:
            for _, pending in kept:
                await self._store(pending)
        except BaseException:
            for callback_id, pending in kept:
                self._forget(callback_id, pending)
            raise
        for callback_id, _ in kept:
            self._pump(callback_id)
        self.stats.published += 1
        return published.id, len(subscribers)

    async def publish_own(self, topic: str, payload: bytes) -> None:
        """Publish one of the bot's own topics; a store failure is logged, not raised."""
        if not self.subscribers(topic) or not self.leader.acting():
            return
        try:
            await self.publish(BOT_PUBLISHER, topic, payload)
        except StoreError as exc:
            if self._logs.allow(("own", topic)) is not None:
                log.warning("could not publish %s (%s)", topic, exc)


@dataclass(slots=True)
class WaitingEvents:
    """What ``oco events`` shows for one callback: the durable events kept for it."""

    callback_id: str
    count: int = 0
    bytes: int = 0
    #: When the oldest was kept, and when the first to expire does (seconds since the epoch).
    oldest: float = math.inf
    next_expiry: float = math.inf
    #: How many of each kind (``webhook_request``, ``published_event``...).
    kinds: dict[str, int] = field(default_factory=dict)


async def waiting_events(store: Store, callback_id: str = "") -> list[WaitingEvents]:
    """The durable events kept in ``store``, by callback (read by ``oco events``, with
    or without a bot running)."""
    found: dict[str, WaitingEvents] = {}
    after = ""
    prefix = f"{callback_id}/" if callback_id else ""
    while True:
        items = await store.list(NAMESPACE, prefix, start_after=after, limit=_PAGE)
        for item in items:
            owner, _, rest = item.key.partition("/")
            entry = found.setdefault(owner, WaitingEvents(owner))
            decoded = _decode(item.key, item.value)
            entry.count += 1
            entry.bytes += len(item.value) - _HEADER.size
            stamp = rest.partition("-")[0]
            entry.oldest = min(entry.oldest, int(stamp) / 1e9 if stamp.isdigit() else math.inf)
            if decoded is None:
                kind = "unreadable"
            else:
                entry.next_expiry = min(entry.next_expiry, decoded[0])
                kind = decoded[1].WhichOneof("type") or "unknown"
            entry.kinds[kind] = entry.kinds.get(kind, 0) + 1
        if len(items) < _PAGE:
            return sorted(found.values(), key=lambda e: e.callback_id)
        after = items[-1].key


def _decode(key: str, value: bytes) -> tuple[float, core_pb2.Event] | None:
    """A stored event's expiry (seconds since the epoch) and Event; None, logged, when
    the record cannot be read (truncated, or written by something else)."""
    try:
        (expires_ms,) = _HEADER.unpack_from(value)
        return expires_ms / 1000, core_pb2.Event.FromString(value[_HEADER.size :])
    except (struct.error, DecodeError) as exc:
        log.error("durable event %s/%s in the store is unreadable (%s); skipped it", NAMESPACE, key, exc)
        return None


def _configured_schedules(callbacks: Sequence[CallbackSettings]) -> dict[str, dict[str, robot_pb2.Schedule]]:
    """The operator's ``callbacks[].schedules``, by callback and schedule id."""
    return {cb.id: {s.id: s for s in map(configured_schedule, cb.schedules)} for cb in callbacks if cb.schedules}


async def _cancel_when(event: Callable[[], Awaitable[object]], scope: trio.CancelScope) -> None:
    await event()
    scope.cancel()
