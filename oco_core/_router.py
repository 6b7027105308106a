"""The router: matches every incoming message against the routes of live Listen streams.

All live patterns are matched in one pass with an RE2 set (linear time, so no callback
can stall the router with a catastrophic pattern); only the patterns that matched are run
again, one by one, for their capture groups. *Hear* routes see every message; *respond*
routes see only messages addressed to the bot, and match the text after the address.

Each Listen stream is a :class:`Subscription` with a bounded queue of its own. Routing
never waits: when a stream's queue is full the event goes to a replica of the same
callback with room, or is dropped, counted and logged, so one slow callback never delays
the adapter or the others. The next event the stream gets says how many it missed
(``Event.dropped``), so the callback learns it fell behind.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import re2
import trio

from ._errors import InvalidPatternError as InvalidPatternError  # its old home; still imported from here
from ._proto import core_pb2, robot_pb2

log = logging.getLogger(__name__)

#: Memory RE2 may use for the compiled set of all live patterns (10,000 patterns fit).
_SET_MAX_MEM = 512 << 20
_OVERFLOW_LOG_INTERVAL = 10.0
#: Time the router rests after building its tables, as a multiple of the build's time,
#: and at most this many seconds.
_REBUILD_REST = 4.0
_REBUILD_REST_MAX = 1.0


def _options(max_mem: int | None = None) -> Any:
    options = re2.Options()
    options.log_errors = False  # we report the error ourselves, once, to whoever sent it
    if max_mem is not None:
        options.max_mem = max_mem
    return options


#: ``\C`` (any byte) preceded by an even number of backslashes: it is the escape itself.
_ANY_BYTE = re.compile(r"(?<!\\)(?:\\\\)*\\C")


@dataclass(frozen=True, slots=True)
class PatternLimits:
    """How costly one route pattern may be (``grpc.max_pattern_length`` and
    ``grpc.max_pattern_program``): compiling and matching grow with RE2's program."""

    #: Characters in a pattern.
    length: int = 4096
    #: Instructions of its compiled RE2 program (``\pL`` alone is about 1,200).
    program: int = 20_000
    #: Instructions of all live patterns together (``grpc.max_total_pattern_program``):
    #: what one RE2 set can hold and build in well under a second.
    total: int = 1_000_000


def compile_pattern(pattern: str, ignore_case: bool = False, limits: PatternLimits | None = None) -> Any:
    """Compile one route pattern, or raise InvalidPatternError naming it and why; with
    ``limits``, also when it is longer or its program larger than they allow."""
    if not pattern:
        raise InvalidPatternError(pattern, "a route needs a non-empty pattern")
    if limits is not None and len(pattern) > limits.length:
        raise InvalidPatternError(
            pattern[:80] + "...",
            f"a pattern of {len(pattern)} characters is over this bot's limit of {limits.length} "
            "(grpc.max_pattern_length)",
        )
    if _ANY_BYTE.search(pattern):
        # Matches could end inside a UTF-8 character, which no text can hold.
        raise InvalidPatternError(pattern, "\\C (any byte) can split a UTF-8 character; use . (any character)")
    try:
        regex = re2.compile(("(?i)" if ignore_case else "") + pattern, _options())
    except re2.error as exc:
        reason = exc.args[0] if exc.args else str(exc)
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise InvalidPatternError(pattern, str(reason)) from None
    if limits is not None and regex.programsize > limits.program:
        raise InvalidPatternError(
            pattern,
            f"too costly: its RE2 program has {regex.programsize} instructions, over this bot's limit of "
            f"{limits.program} (grpc.max_pattern_program); repeat less (\\pL+ rather than \\pL{{300}}) "
            "and check lengths in the callback",
        )
    return regex


try:
    _UNANCHORED = re2._re2.RE2.Anchor.UNANCHORED

    def _spans(regex: Any, data: bytes) -> list[tuple[int, int]] | None:
        """Byte spans of the whole match and each group ((-1, -1): did not take part).

        Calls the compiled RE2 object directly: the wrapper's ``search().groups()``
        maps every offset back to characters in Python and costs 3-4 times as much
        (bench/bench_router.py)."""
        spans: list[tuple[int, int]] = regex._regexp.Match(_UNANCHORED, data, 0, len(data))
        return None if spans[0][0] < 0 else spans

except AttributeError:  # a google-re2 without that internal: the public, slower way

    def _spans(regex: Any, data: bytes) -> list[tuple[int, int]] | None:
        found = regex.search(data)
        if found is None:
            return None
        return [found.span(i) for i in range(regex.groups + 1)]


@dataclass(frozen=True, slots=True)
class ApprovalNeed:
    """Who must approve a route's match before the callback gets it (``_approvals``)."""

    role: str
    count: int = 1
    #: Seconds the match waits for the approvals.
    timeout: float = 600.0


@dataclass(frozen=True, slots=True)
class Route:
    """A route as a callback (or the operator's config) declared it."""

    id: str
    pattern: str
    respond: bool = False
    help: str = ""
    permission: str = ""
    ignore_case: bool = False
    #: Seconds a match may wait for the callback, kept by the event hub (0: not durable).
    durable_ttl: float = 0.0
    #: Approval the callback declared for its matches (the operator's rule wins).
    approval: ApprovalNeed | None = None

    @classmethod
    def declared(cls, declaration: Any, chat_ttl: float = 30.0) -> Route:
        """A route from its declaration: a ``Route`` of a ListenRequest, or one the
        operator wrote in config (both have the same fields but for the durable TTL).
        The id defaults to the pattern; a durable route's TTL to ``chat_ttl``."""
        ttl = getattr(declaration, "durable_ttl_seconds", None) or getattr(declaration, "durable_ttl", None)
        rule = getattr(declaration, "approval", None)  # only a ListenRequest's routes declare one
        approval = (
            ApprovalNeed(rule.role, min(rule.count or 1, 10), float(min(rule.timeout_seconds or 600, 86400)))
            if isinstance(rule, robot_pb2.ApprovalRule) and rule.role
            else None
        )
        return cls(
            id=declaration.id or declaration.pattern,
            pattern=declaration.pattern,
            respond=declaration.respond,
            help=declaration.help,
            permission=declaration.permission,
            ignore_case=declaration.ignore_case,
            durable_ttl=float(ttl or chat_ttl) if declaration.durable else 0.0,
            approval=approval,
        )


class Queued:
    """An event waiting in a stream's queue. Its protobuf is built only when it is
    written to the stream: until then a match holds references to the message and the
    strings it shares with the other matches of that message (every route and replica
    that matched it), so a message waiting in many queues is held once."""

    __slots__ = ("_build", "dropped", "kind", "movable", "on_written", "size")

    def __init__(self, size: int, build: Callable[[], core_pb2.Event], kind: str = "matched_message") -> None:
        #: Bytes it counts for in a queue: about its size on the wire.
        self.size = size
        self._build = build
        #: The kind of event (``Event``'s oneof field), for log lines.
        self.kind = kind
        #: Events the stream lost just before this one (``Event.dropped``).
        self.dropped = 0
        #: Called once it is written to the stream. Set on durable events, whose
        #: delivery the event hub tracks: the router never moves them between streams.
        self.on_written: Callable[[], None] | None = None
        #: Whether another stream of the callback may take it when its stream ends.
        #: Not durable events (the hub offers them again) nor webhook requests (whose
        #: caller is told the stream ended, and must not see the request run anyway).
        self.movable = True

    def event(self) -> core_pb2.Event:
        """The event, as the stream sends it (a new object each time)."""
        event = self._build()
        event.dropped = self.dropped
        return event


def copy_event(event: core_pb2.Event) -> core_pb2.Event:
    """A copy of ``event``, for one more stream (each is built anew when written)."""
    copy = core_pb2.Event()
    copy.CopyFrom(event)
    return copy


def _matched_event(
    message: core_pb2.Message,
    pattern: str,
    route_id: str,
    groups: list[str],
    named: dict[str, str],
    direct: bool,
    text: str,
) -> core_pb2.Event:
    # Fields set one by one: upb's keyword constructor costs about three times as much
    # (and an empty dict for named_groups goes through MutableMapping.update in Python).
    event = core_pb2.Event()
    matched = event.matched_message
    matched.message.CopyFrom(message)
    matched.pattern = pattern
    matched.route_id = route_id
    matched.groups.extend(groups)
    if named:
        matched.named_groups.update(named)
    matched.direct = direct
    matched.text = text
    return event


@dataclass(eq=False)
class Subscription:
    """One open Listen stream: the routes and event kinds it declared, and its queue,
    bounded both in events (``queue_size``) and in bytes (``queue_bytes``)."""

    callback_id: str
    routes: Sequence[Route]
    events: frozenset[int] = frozenset()
    queue_size: int = 1000
    queue_bytes: int = 16 << 20
    overflowed: int = 0
    delivered: int = 0
    #: Events dropped since the last one queued; the next one queued carries the count.
    unreported: int = 0
    #: Bytes of the events waiting in its queue.
    queued_bytes: int = 0
    _last_overflow_log: float = 0.0
    #: Set when the stream ends: tables built before then skip it.
    closed: bool = False
    #: The stream acknowledges durable events (``ListenRequest.acknowledge``).
    acknowledge: bool = False
    #: Where the stream comes from (gRPC's peer, such as ``ipv4:127.0.0.1:50312``).
    peer: str = ""
    _send: trio.MemorySendChannel[Queued] = field(init=False, repr=False)
    _receive: trio.MemoryReceiveChannel[Queued] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Queued](self.queue_size)

    def offer(self, queued: Queued) -> bool:
        """Queue an event without waiting; False when the queue is full (in events, or
        in bytes unless it is empty: one event larger than the bound still goes alone).
        After drops, the event queued carries their count in ``dropped``."""
        if self.queued_bytes and self.queued_bytes + queued.size > self.queue_bytes:
            return False
        queued.dropped = self.unreported
        try:
            self._send.send_nowait(queued)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        self.queued_bytes += queued.size
        self.delivered += 1
        self.unreported = 0
        return True

    async def next_event(self) -> core_pb2.Event | None:
        """Wait for the next event to send; None once the stream's queue has ended."""
        queued = await self.next_queued()
        return None if queued is None else queued.event()

    async def next_queued(self) -> Queued | None:
        """Wait for the next event to send, unbuilt; None once the queue has ended.

        A schedule point only when it waits (a cancellation point always): the stream's
        writer, next, waits once its window is full, so a busy stream cannot hog trio."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            try:
                queued = self._receive.receive_nowait()
            except trio.WouldBlock:
                queued = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return None
        self.queued_bytes -= queued.size
        return queued

    def take_nowait(self) -> Queued:
        """The next event waiting, without waiting (trio.WouldBlock when none is,
        trio.EndOfChannel once it has ended and is empty)."""
        queued = self._receive.receive_nowait()
        self.queued_bytes -= queued.size
        return queued

    def queued(self) -> int:
        """Events waiting in this stream's queue."""
        return self._send.statistics().current_buffer_used

    def close(self) -> None:
        """End the stream's queue (the Listen call is ending)."""
        self.closed = True
        self._send.close()


@dataclass(slots=True)
class _Target:
    """The streams of one callback that declared one route with one pattern."""

    callback_id: str
    route: Route
    subscriptions: list[Subscription]
    turn: itertools.count[int] = field(default_factory=itertools.count)


@dataclass(slots=True)
class _Pattern:
    regex: Any
    pattern: str
    targets: dict[tuple[str, str], _Target]
    #: Named groups → their index (the RE2 wrapper's ``groupindex`` builds a dict each time).
    groupindex: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Table:
    """The compiled state of all live routes of one kind (hear or respond)."""

    patterns: list[_Pattern]
    #: An RE2 set of every pattern; None for one pattern or none, which is matched alone.
    set: Any
    #: The patterns of ``set``, in order: a build with the same reuses it.
    keys: tuple[tuple[str, bool], ...] = ()


def _build_tables(
    subscriptions: Sequence[Subscription],
    regexes: dict[tuple[str, bool], Any],
    previous: dict[bool, _Table] | None = None,
) -> dict[bool, _Table]:
    """The tables for these subscriptions, their patterns compiled already (``regexes``);
    an RE2 set of ``previous`` is reused when its patterns are the same (a replica that
    connects changes who gets a match, not what matches). Reads nothing else:
    :meth:`Router.maintain` runs it in a worker thread."""
    tables: dict[bool, _Table] = {}
    for respond in (False, True):
        by_key: dict[tuple[str, bool], _Pattern] = {}
        for sub in subscriptions:
            for route in sub.routes:
                if route.respond != respond:
                    continue
                key = (route.pattern, route.ignore_case)
                entry = by_key.get(key)
                if entry is None:
                    regex = regexes[key]
                    entry = by_key[key] = _Pattern(regex, route.pattern, {}, regex.groupindex)
                target = entry.targets.get((sub.callback_id, route.id))
                if target is None:
                    target = entry.targets[(sub.callback_id, route.id)] = _Target(sub.callback_id, route, [])
                target.subscriptions.append(sub)
        keys = tuple(by_key)
        if len(keys) < 2:
            regex_set = None  # see Router._match_table
        elif previous is not None and previous[respond].keys == keys and previous[respond].set is not None:
            regex_set = previous[respond].set
        else:
            regex_set = re2.Set.SearchSet(_options(_SET_MAX_MEM))
            for pattern, ignore_case in keys:
                regex_set.Add(("(?i)" if ignore_case else "") + pattern)
            regex_set.Compile()
        tables[respond] = _Table(list(by_key.values()), regex_set, keys)
    return tables


#: Decides, for one message, whether a (callback id, route) that matched may receive it.
Gate = Callable[[str, Route], bool]


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 1.5 µs, a match
class Match:
    """One route that matched one message, and the stream that will get it."""

    #: None for a durable route's match, which the event hub keeps for the callback.
    subscription: Subscription | None
    queued: Queued
    #: Whether the message was addressed to the bot (``MatchedMessage.direct``).
    direct: bool
    #: Whose route matched, and its id (for metrics).
    callback_id: str = ""
    route_id: str = ""

    @property
    def event(self) -> core_pb2.Event:
        """The event the stream gets (built anew: for tests and tools)."""
        return self.queued.event()


class Router:
    """Routes incoming messages to the subscriptions whose routes match them."""

    def __init__(self, bot_name: str, aliases: Sequence[str] = (), limits: PatternLimits | None = None) -> None:
        self.bot_name = bot_name
        self.aliases = tuple(a for a in aliases if a)
        self.limits = limits or PatternLimits()
        # Insertion-ordered sets: a stream leaves in constant time, however many there are.
        self._subscriptions: dict[Subscription, None] = {}
        self._by_callback: dict[str, dict[Subscription, None]] = {}
        #: Compiled patterns by (pattern, ignore_case), compiled once when first declared.
        self._regexes: dict[tuple[str, bool], Any] = {}
        #: Live patterns: how many streams declare each, and their RE2 instructions together.
        self._live: dict[tuple[str, bool], int] = {}
        self._program = 0
        self._tables: dict[bool, _Table] = _build_tables([], {})
        #: Changes to the subscriptions so far, and how many of them the tables hold.
        self._version = 0
        self._built = 0
        self._changed = trio.Event()
        self._rebuilt = trio.Event()
        #: Whether :meth:`maintain` builds the tables (off the trio thread); if not,
        #: the first message after a change builds them, on the caller's thread.
        self._maintained = False
        #: Streams added since the last build that succeeded, and those a failed build refused.
        self._pending: dict[Subscription, None] = {}
        self._rejected: dict[Subscription, InvalidPatternError] = {}
        self._own_names: dict[str, tuple[str, ...]] = {}
        self._address_res: dict[str, re.Pattern[str]] = {}
        #: By adapter: the aliases and its own names that are prefixes (see _symbol_names).
        self._prefixes: dict[str, tuple[str, ...]] = {}
        self._failing: dict[str, float] = {}
        self.overflowed = 0
        self.routed = 0
        #: The routes of callbacks whose last stream closed, until one opens again.
        self._departed: dict[str, Sequence[Route]] = {}
        #: Where matches of durable routes go (the event hub): (callback id, event, TTL).
        self.keep_durable: Callable[[str, core_pb2.Event, float], None] | None = None
        #: By callback whose last stream left: a stream that is not one, holding its
        #: durable routes until their TTL, so their matches are kept for it meanwhile.
        self._ghosts: dict[str, tuple[Subscription, float]] = {}

    # -- subscriptions ---------------------------------------------------------------

    def compile_routes(self, routes: Sequence[Route]) -> dict[tuple[str, bool], Any]:
        """Compile ``routes``' patterns within this router's limits, or raise
        InvalidPatternError for the first that is invalid or too costly. Touches no
        state of the router: safe to run in a worker thread."""
        compiled: dict[tuple[str, bool], Any] = {}
        for route in routes:
            key = (route.pattern, route.ignore_case)
            if key not in compiled:
                compiled[key] = self._regexes.get(key) or compile_pattern(*key, limits=self.limits)
        return compiled

    def subscribe(self, subscription: Subscription) -> None:
        """Add a Listen stream, its patterns compiled here; its routes match from the
        next message on. The bot uses :meth:`register`, which compiles and rebuilds
        off the trio thread."""
        self._add(subscription, self.compile_routes(subscription.routes))

    async def register(self, subscription: Subscription) -> None:
        """Add a Listen stream: its patterns are compiled in a worker thread, then this
        waits until the tables that route messages hold its routes (built off the trio
        thread by :meth:`maintain`, while routing goes on with the previous ones).
        InvalidPatternError when a pattern is invalid or over the limits; then nothing
        changed."""
        compiled = await trio.to_thread.run_sync(self.compile_routes, subscription.routes)
        self._add(subscription, compiled)
        if not self._maintained:
            return
        wanted = self._version
        try:
            while self._built < wanted:
                await self._rebuilt.wait()
                failure = self._rejected.pop(subscription, None)
                if failure is not None:
                    raise failure
        except BaseException:
            self.unsubscribe(subscription)  # cancelled while waiting, or refused: as if it never came
            raise

    def _add(self, subscription: Subscription, compiled: dict[tuple[str, bool], Any]) -> None:
        new = [key for key in compiled if key not in self._live]
        added = sum(compiled[key].programsize for key in new)
        if new and self._program + added > self.limits.total:
            costliest = max(new, key=lambda key: compiled[key].programsize)
            raise InvalidPatternError(
                costliest[0],
                f"the bot's live routes would need {self._program + added} RE2 instructions together, over its "
                f"limit of {self.limits.total} (grpc.max_total_pattern_program); this stream's new patterns take "
                f"{added}, this one {compiled[costliest].programsize}",
            )
        self._regexes.update(compiled)
        for key in compiled:
            self._live[key] = self._live.get(key, 0) + 1
        self._program += added
        self._pending[subscription] = None
        self._subscriptions[subscription] = None
        self._by_callback.setdefault(subscription.callback_id, {})[subscription] = None
        self._departed.pop(subscription.callback_id, None)
        self.drop_ghost(subscription.callback_id)
        self._bump()

    def reroute(self, subscription: Subscription, routes: Sequence[Route]) -> None:
        """Replace the routes of a live stream, which stays open (a reload changed the
        routes the config declares for its callback); they match once the tables are
        rebuilt. InvalidPatternError, changing nothing, when the bot's live patterns
        would exceed the limit."""
        compiled = self.compile_routes(routes)
        if subscription not in self._subscriptions:
            subscription.routes = routes
            return
        self._forget_patterns(subscription)
        new = [key for key in compiled if key not in self._live]
        added = sum(compiled[key].programsize for key in new)
        if new and self._program + added > self.limits.total:
            for key in {(route.pattern, route.ignore_case) for route in subscription.routes}:  # as it was
                self._live[key] = self._live.get(key, 0) + 1
                if self._live[key] == 1:
                    self._program += self._regexes[key].programsize
            raise InvalidPatternError(
                new[0][0], f"the bot's live routes would exceed {self.limits.total} RE2 instructions together"
            )
        self._regexes.update(compiled)
        for key in compiled:
            self._live[key] = self._live.get(key, 0) + 1
        self._program += added
        subscription.routes = routes
        self._bump()

    def _forget_patterns(self, subscription: Subscription) -> None:
        for key in {(route.pattern, route.ignore_case) for route in subscription.routes}:
            self._live[key] -= 1
            if not self._live[key]:
                del self._live[key]
                self._program -= self._regexes[key].programsize

    def drop_ghost(self, callback_id: str) -> None:
        """The callback is back (or its durable routes' time is up): its ghost goes."""
        ghost = self._ghosts.pop(callback_id, None)
        if ghost is not None and self._subscriptions.pop(ghost[0], 0) is None:
            ghost[0].close()
            self._forget_patterns(ghost[0])
            self._bump()

    def expire_ghosts(self) -> None:
        """Drop the ghosts of callbacks away for longer than their durable routes' TTL."""
        now = time.monotonic()
        for callback_id in [cid for cid, (_, until) in self._ghosts.items() if until <= now]:
            self.drop_ghost(callback_id)

    def _haunt(self, callback_id: str, routes: Sequence[Route]) -> None:
        durable = [route for route in routes if route.durable_ttl]
        if not durable or self.keep_durable is None:
            return
        ghost = Subscription(callback_id, durable, queue_size=1)
        for key in {(route.pattern, route.ignore_case) for route in durable}:
            self._live[key] = self._live.get(key, 0) + 1
            if self._live[key] == 1:
                self._program += self._regexes[key].programsize
        self._subscriptions[ghost] = None
        self._ghosts[callback_id] = (ghost, time.monotonic() + max(route.durable_ttl for route in durable))
        self._bump()

    def _bump(self) -> None:
        self._version += 1
        self._changed.set()

    async def maintain(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Rebuild the tables after every change, in a worker thread, and swap them in
        (until cancelled). Changes made during a build are taken together by the next
        one, so a callback reconnecting in a loop costs one build at a time, never a
        stall of routing."""
        self._maintained = True
        task_status.started()
        try:
            while True:
                if self._built == self._version:
                    self._changed = trio.Event()
                    await self._changed.wait()
                version = self._version
                subscriptions = list(self._subscriptions)
                # Patterns no stream uses any more are forgotten.
                self._regexes = {key: self._regexes[key] for key in self._live}
                pending, self._pending = self._pending, {}
                began = time.perf_counter()
                try:
                    tables = await trio.to_thread.run_sync(
                        _build_tables, subscriptions, dict(self._regexes), self._tables
                    )
                except Exception as exc:  # RE2 refused the set: the routing in place stays
                    self._refuse(pending, exc)
                else:
                    self._tables, self._built = tables, version
                rebuilt, self._rebuilt = self._rebuilt, trio.Event()
                rebuilt.set()
                # RE2 holds the GIL while it compiles: a build in a thread still slows
                # routing. Resting a multiple of its time between builds (at most a
                # second) keeps routing at least 1/(1 + _REBUILD_REST) as fast under
                # endless reconnects.
                await trio.sleep(min((time.perf_counter() - began) * _REBUILD_REST, _REBUILD_REST_MAX))
        finally:
            self._maintained = False

    def _refuse(self, pending: dict[Subscription, None], error: Exception) -> None:
        """A build failed: the streams added since the last good one are taken out (their
        registration fails with the reason), and the next build goes without them."""
        reason = error.args[0] if error.args else str(error)
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        callbacks = sorted({sub.callback_id for sub in pending if sub in self._subscriptions})
        log.error("could not build the routing tables (%s); refused the new streams of %s", reason, callbacks)
        for sub in pending:
            if sub in self._subscriptions:
                pattern = next((route.pattern for route in sub.routes), "")
                self._rejected[sub] = InvalidPatternError(
                    pattern, f"RE2 could not build the bot's routes with this stream's ({reason}); declare fewer"
                )
                self.unsubscribe(sub)

    def unsubscribe(self, subscription: Subscription) -> int:
        """Remove a Listen stream and its routes. Events still queued for it go to live
        replicas of the same callback; returns how many could not (and are lost)."""
        subscription.close()
        self._pending.pop(subscription, None)
        if self._subscriptions.pop(subscription, 0) is None:
            self._forget_patterns(subscription)
            siblings = self._by_callback[subscription.callback_id]
            del siblings[subscription]
            if not siblings:
                del self._by_callback[subscription.callback_id]
            self._bump()
        replicas = self.subscriptions(subscription.callback_id)
        if not replicas and subscription.callback_id not in self._departed:
            self._departed[subscription.callback_id] = subscription.routes
            self._haunt(subscription.callback_id, subscription.routes)
        lost = 0
        turn = itertools.count()
        while True:
            try:
                queued = subscription.take_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if not queued.movable:
                continue
            carried = queued.dropped  # what the leaving stream lost before this one
            taker = self._deliver(replicas, turn, queued) if replicas else None
            if taker is not None:
                queued.dropped += carried
            else:
                lost += 1
        self.overflowed += lost
        return lost

    def departed_routes(self, callback_id: str) -> Sequence[Route] | None:
        """The routes a callback had when its last stream closed; None while it has a
        stream, or when it never had one."""
        return self._departed.get(callback_id)

    def subscriptions(self, callback_id: str | None = None) -> list[Subscription]:
        """Live subscriptions, optionally of one callback."""
        if callback_id is None:
            if not self._ghosts:
                return list(self._subscriptions)
            ghosts = {ghost for ghost, _ in self._ghosts.values()}
            return [sub for sub in self._subscriptions if sub not in ghosts]
        return list(self._by_callback.get(callback_id, ()))

    # -- addressing ------------------------------------------------------------------

    def set_own_names(self, adapter: str, names: Iterable[str]) -> None:
        """The names the bot has on one adapter (an IRC nick), besides ``bot_name``."""
        self._own_names[adapter] = tuple(n for n in names if n)
        self._address_res.pop(adapter, None)
        self._prefixes.pop(adapter, None)

    def _symbol_names(self, adapter: str) -> tuple[str, ...]:
        # An adapter's own name ending in a symbol ("!") is a prefix, like the aliases.
        return tuple(n for n in self._own_names.get(adapter, ()) if not (n[-1].isalnum() or n[-1] == "_"))

    def _address_re(self, adapter: str) -> re.Pattern[str]:
        compiled = self._address_res.get(adapter)
        if compiled is None:
            names = sorted({self.bot_name, *self._own_names.get(adapter, ())}, key=len, reverse=True)
            alternatives = "|".join(re.escape(n) for n in names)
            # "oco ping", "oco: ping", "oco, ping", "@oco ping"; not "ocobot ping".
            compiled = re.compile(rf"\s*@?(?:{alternatives})(?:[:,]\s*|\s+|$)(.*)", re.IGNORECASE | re.DOTALL)
            self._address_res[adapter] = compiled
        return compiled

    def address(self, adapter: str, body: str) -> str | None:
        """The text after the bot's address, or None when ``body`` is not addressed."""
        prefixes = self._prefixes.get(adapter)
        if prefixes is None:
            prefixes = self._prefixes[adapter] = (*self.aliases, *self._symbol_names(adapter))
        if prefixes:
            stripped = body.lstrip()
            if stripped.startswith(prefixes):  # one call for all of them, then which one
                for alias in prefixes:
                    if stripped.startswith(alias):
                        return stripped[len(alias) :].lstrip()
        match = self._address_re(adapter).match(body)
        return match.group(1).strip() if match else None

    # -- routing ---------------------------------------------------------------------

    def match(
        self,
        message: core_pb2.Message,
        text: str,
        direct: bool,
        respond_text: str | None,
        gate: Gate | None = None,
    ) -> list[Match]:
        """Every (callback, route) that matches, with the stream chosen to receive it.

        ``text`` is the whole body; ``respond_text`` the addressed text, or None when
        the message is not addressed to the bot. ``gate`` is asked about each route that
        matched; one it refuses is not delivered.
        """
        if not self._maintained and self._built < self._version:
            self._tables, self._built = _build_tables(list(self._subscriptions), self._regexes), self._version
            self._pending.clear()  # built: as maintain() does after a build
        tables = self._tables
        matches: list[Match] = []
        # `direct` means addressed to the bot: by name or alias, or a private message.
        self._match_table(tables[False], message, text, direct or respond_text is not None, matches, gate)
        if respond_text is not None:
            self._match_table(tables[True], message, respond_text, True, matches, gate)
        self.routed += 1
        return matches

    def _match_table(
        self, table: _Table, message: core_pb2.Message, text: str, direct: bool, out: list[Match], gate: Gate | None
    ) -> None:
        if not table.patterns:
            return
        data = text.encode("utf-8")
        message_size = 0
        # One pattern is matched alone, with its groups, in one RE2 call instead of the
        # set's and then its own: each call releases the GIL, and beside a busy gRPC
        # thread getting it back costs far more than the match (docs/architecture.md).
        indices = (0,) if table.set is None else table.set.Match(data) or ()  # None when nothing matched
        for index in indices:
            entry = table.patterns[index]
            try:
                spans = _spans(entry.regex, data)
                if spans is None:  # no match (the set said it matched only when there is one)
                    continue
                groups = [data[start:end].decode("utf-8") if start >= 0 else "" for start, end in spans]
                named = (
                    {name: groups[i] for name, i in entry.groupindex.items() if spans[i][0] >= 0}
                    if entry.groupindex
                    else {}
                )
            except Exception:  # one route's failure must not cost the other routes their match
                self._pattern_failed(entry)
                continue
            message_size = message_size or message.ByteSize()
            size = message_size + len(text) + sum(map(len, groups))
            for target in entry.targets.values():
                route = target.route
                keep = self.keep_durable if route.durable_ttl else None
                subscriptions = target.subscriptions
                if len(subscriptions) == 1:  # most routes: one stream, not copied
                    live = subscriptions if not subscriptions[0].closed else []
                else:
                    live = [sub for sub in subscriptions if not sub.closed]
                # Its streams ended since these tables were built. A durable route's
                # match is kept all the same: until the next build its ghost is not in
                # the tables, and the match would be lost in between.
                if not live and keep is None:
                    continue
                if gate is not None and not gate(target.callback_id, route):
                    continue
                build = partial(_matched_event, message, entry.pattern, route.id, groups, named, direct, text)
                queued = Queued(size, build)
                if keep is not None:
                    keep(target.callback_id, build(), route.durable_ttl)
                    out.append(Match(None, queued, direct, target.callback_id, route.id))
                    continue
                sub = self._deliver(live, target.turn, queued)
                if sub is not None:
                    out.append(Match(sub, queued, direct, target.callback_id, route.id))

    def _pattern_failed(self, entry: _Pattern) -> None:
        now = time.monotonic()
        if now - self._failing.get(entry.pattern, -_OVERFLOW_LOG_INTERVAL) >= _OVERFLOW_LOG_INTERVAL:
            self._failing[entry.pattern] = now
            callbacks = sorted({target.callback_id for target in entry.targets.values()})
            log.exception("route pattern %r of %s failed on a message; skipped it", entry.pattern, ", ".join(callbacks))

    def _deliver(
        self, subscriptions: Sequence[Subscription], turn: itertools.count[int], queued: Queued
    ) -> Subscription | None:
        # Replicas of one callback share its matches: round-robin, skipping full queues.
        start = next(turn)
        count = len(subscriptions)
        if count == 1:  # most callbacks: one stream, no turns to take
            sub = subscriptions[0]
            if sub.offer(queued):
                return sub
            self._overflow(sub, queued)
            return None
        for step in range(count):
            sub = subscriptions[(start + step) % count]
            if sub.offer(queued):
                return sub
        self._overflow(subscriptions[start % count], queued)
        return None

    def _overflow(self, sub: Subscription, queued: Queued) -> None:
        sub.overflowed += 1
        sub.unreported += 1
        self.overflowed += 1
        now = time.monotonic()
        if now - sub._last_overflow_log >= _OVERFLOW_LOG_INTERVAL:
            sub._last_overflow_log = now
            log.warning(
                "callback %r is not keeping up: its queue is full (%d events of %d, %d bytes of %d); "
                "%d event(s) dropped so far (latest: %s)",
                sub.callback_id,
                sub.queued(),
                sub.queue_size,
                sub.queued_bytes,
                sub.queue_bytes,
                sub.overflowed,
                queued.kind,
            )

    def broadcast(self, kind: int, event: core_pb2.Event) -> int:
        """Deliver a non-message event to one stream of every callback that asked for
        ``kind``; return how many callbacks got it."""
        by_callback: dict[str, list[Subscription]] = {}
        for sub in self._subscriptions:
            if kind in sub.events:
                by_callback.setdefault(sub.callback_id, []).append(sub)
        delivered = 0
        size = event.ByteSize()
        name = event.WhichOneof("type") or ""
        for subs in by_callback.values():
            if self._deliver(subs, itertools.count(), Queued(size, partial(copy_event, event), name)) is not None:
                delivered += 1
        return delivered

    # -- introspection ---------------------------------------------------------------

    def help_lines(self, topic: str = "", visible: Gate | None = None) -> list[str]:
        """Help texts of live routes (one per distinct text), filtered by ``topic`` and,
        when given, by ``visible`` (say, to what the asking person may run)."""
        lines = {
            route.help.strip()
            for sub in self._subscriptions
            for route in sub.routes
            if route.help.strip()
            and topic.lower() in route.help.lower()
            and (visible is None or visible(sub.callback_id, route))
        }
        return sorted(lines, key=str.lower)

    def queued(self) -> int:
        """Events waiting in all queues."""
        return sum(s.queued() for s in self._subscriptions)

    def pattern_count(self) -> int:
        """Distinct live patterns."""
        return len({(r.pattern, r.ignore_case, r.respond) for s in self._subscriptions for r in s.routes})


EVENT_KINDS = frozenset(robot_pb2.EventKind.values()) - {robot_pb2.EVENT_KIND_UNSPECIFIED}
