"""What the bot has been doing lately: for ``wait_idle``, and for the operator console.

One :class:`Activity` per running bot (``BotCore.activity``). It knows:

- when the bot last did something, and which routed messages still await a reply
  (what :meth:`~._adapter.AdapterHost.wait_idle` waits on);
- each callback's handler latency: from a match to the first reply of that callback
  that answers it (``in_reply_to``), over its last :data:`LATENCY_SAMPLES` replies;
- messages in and out, matches and replies per callback, by minute over the last hour.
  These are not counted again here: :mod:`._metrics` counts them as they happen, and a
  task reads its counters every :data:`SAMPLE_INTERVAL` seconds (:meth:`Activity.run`);
  the difference between two readings is what happened between them;
- with the console on, the live feed (:class:`LiveFeed`): the recent matched messages,
  and whoever watches them.

The hooks on the message path stay cheap (issue 17 is making that path faster): a
match costs one dict entry (which ``wait_idle`` needed already) and, with the console
on, one :class:`LiveEntry` per matched route in a bounded ring; a watcher that does not
keep up loses updates (counted), and never holds the bot back.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import trio

if TYPE_CHECKING:
    from ._adapter import IncomingMessage
    from ._metrics import Metrics, _Tally
    from ._router import Match, Router

log = logging.getLogger(__name__)

#: How many messages awaiting a reply are remembered before old ones are forgotten.
_AWAITING_MAX = 10_000
#: Replies per callback whose latency is kept for p50/p99: recent enough to show a
#: change within minutes, enough for a p99 that is not one reply's.
LATENCY_SAMPLES = 1000
#: Seconds between readings of the counters; a minute's count is exact to this much.
SAMPLE_INTERVAL = 10.0
#: How far back the readings go (seconds): the chart's hour.
HISTORY = 3600.0
#: Updates a live watcher may be behind before it loses some.
WATCHER_BUFFER = 256

Update = tuple[Literal["message", "reply"], "LiveEntry"]


class LiveEntry:
    """One route's match of one message, as the live view shows it."""

    __slots__ = ("adapter", "body", "callback", "duration", "id", "native_user", "room", "route", "when")

    def __init__(
        self,
        id: int,
        when: float,
        adapter: str,
        room: str,
        native_user: str,
        route: str,
        callback: str,
        body: str | None,
    ) -> None:
        #: Its place in the feed (1, 2, ...): how a reply finds its row on the page.
        self.id = id
        #: Seconds since the epoch.
        self.when = when
        self.adapter = adapter
        #: The room's id ("" for a private message).
        self.room = room
        #: The user's id as the adapter gave it (``user`` adds the adapter's prefix when asked).
        self.native_user = native_user
        self.route = route
        self.callback = callback
        #: None unless ``console.show_bodies``.
        self.body = body
        #: Seconds from the match to the callback's first reply; None until it replies.
        self.duration: float | None = None

    @property
    def user(self) -> str:
        """The user's id as messages carry it (``irc/alice``)."""
        return f"{self.adapter}/{self.native_user}"

    def as_json(self) -> dict[str, object]:
        """What the live stream sends: ``body`` is ``"hidden"`` unless bodies are shown,
        ``duration_ms`` null until the callback replied."""
        return {
            "id": self.id,
            "when": self.when,
            "adapter": self.adapter,
            "room": self.room,
            "user": self.user,
            "route": self.route,
            "callback": self.callback,
            "duration_ms": None if self.duration is None else round(self.duration * 1000),
            "body": "hidden" if self.body is None else self.body,
        }


class LiveFeed:
    """The last ``size`` matches, and the updates (new matches, first replies) the
    watchers (the console's live streams) read.

    Watchers cost the message path nothing per watcher: an update goes once into a
    bounded log (only while someone watches) and wakes whoever waits; each watcher
    reads the log from where it left off, and one that fell further behind than the
    log holds skips what it missed (counted in ``dropped``)."""

    def __init__(self, size: int, show_bodies: bool = False, watcher_buffer: int = WATCHER_BUFFER) -> None:
        self.entries: deque[LiveEntry] = deque(maxlen=size)
        self.show_bodies = show_bodies
        self._count = 0
        #: (sequence number, kind, entry) of the latest updates, while anyone watches.
        self._log: deque[tuple[int, Literal["message", "reply"], LiveEntry]] = deque(maxlen=watcher_buffer)
        self._sequence = 0
        self._watchers = 0
        self._changed = trio.Event()
        #: Updates watchers lost because they were too far behind.
        self.dropped = 0

    def add(
        self, when: float, adapter: str, room: str, native_user: str, body: str, matches: Sequence[Match]
    ) -> list[LiveEntry]:
        """The entries of one matched message (one per route that matched it)."""
        kept = body if self.show_bodies else None
        added = []
        for match in matches:
            self._count += 1
            entry = LiveEntry(self._count, when, adapter, room, native_user, match.route_id, match.callback_id, kept)
            self.entries.append(entry)
            added.append(entry)
            if self._watchers:
                self._tell("message", entry)
        return added

    def replied(self, entry: LiveEntry, duration: float) -> None:
        """``entry``'s callback sent its first reply, ``duration`` seconds after the match."""
        entry.duration = duration
        if self._watchers:
            self._tell("reply", entry)

    def recent(self) -> list[LiveEntry]:
        """The entries kept, newest first."""
        return list(reversed(self.entries))

    @contextmanager
    def watch(self) -> Iterator[Watcher]:
        """Updates from now on, while the block runs."""
        self._watchers += 1
        try:
            yield Watcher(self)
        finally:
            self._watchers -= 1
            if not self._watchers:
                self._log.clear()

    @property
    def watchers(self) -> int:
        """How many watch now."""
        return self._watchers

    def _tell(self, kind: Literal["message", "reply"], entry: LiveEntry) -> None:
        self._sequence += 1
        self._log.append((self._sequence, kind, entry))
        changed = self._changed
        if not changed.is_set():
            changed.set()


class Watcher:
    """One reader of a :class:`LiveFeed`'s updates."""

    def __init__(self, feed: LiveFeed) -> None:
        self._feed = feed
        self._seen = feed._sequence
        #: Updates this watcher missed because it was too far behind.
        self.dropped = 0

    def take(self) -> list[Update]:
        """The updates since the last take (none: an empty list), without waiting."""
        feed = self._feed
        if feed._sequence == self._seen:
            return []
        log = feed._log
        first = log[0][0] if log else feed._sequence + 1
        if first > self._seen + 1:
            missed = first - self._seen - 1
            self.dropped += missed
            feed.dropped += missed
        updates: list[Update] = [(kind, entry) for number, kind, entry in log if number > self._seen]
        self._seen = feed._sequence
        return updates

    async def next(self) -> list[Update]:
        """Wait for updates, then take them."""
        feed = self._feed
        while feed._sequence == self._seen:
            if feed._changed.is_set():
                feed._changed = trio.Event()  # everyone it woke has woken; the next change sets this one
            await feed._changed.wait()
        return self.take()


@dataclass(frozen=True, slots=True)
class Reading:
    """The counters at one moment (``at``: ``trio.current_time()``)."""

    at: float
    received: int
    sent: int
    #: callback id → (matches, replies)
    callbacks: Mapping[str, tuple[int, int]]

    def of(self, callback_id: str) -> tuple[int, int]:
        """A callback's (matches, replies) so far."""
        return self.callbacks.get(callback_id, (0, 0))


class Activity:
    """What a running bot has been doing lately. ``live`` is the console's live feed
    (None without ``console:``)."""

    def __init__(self, metrics: Metrics | None = None, live: LiveFeed | None = None) -> None:
        self.last = time.monotonic()
        #: When the bot started, in seconds since the epoch, and by ``time.monotonic()``.
        self.started = time.time()
        self.started_monotonic = self.last
        self.live = live
        self._metrics = metrics
        #: message id → (when it matched, its matches not yet answered, their live entries)
        self._awaiting: dict[str, tuple[float, Sequence[Match], list[LiveEntry] | None]] = {}
        #: message id → when it matched, until any callback answers it: what wait_idle
        #: waits on (a listen-only callback that also matched must not hold it up).
        self._unanswered: dict[str, float] = {}
        self._latency: dict[str, deque[float]] = {}
        self._readings: deque[Reading] = deque(maxlen=math.ceil(HISTORY / SAMPLE_INTERVAL) + 2)
        if metrics is not None:
            self._readings.append(self.reading())

    # -- the message path ----------------------------------------------------------------

    def touch(self) -> None:
        """Something happened just now."""
        self.last = time.monotonic()

    def matched(
        self, adapter: str, message_id: str, room: str, incoming: IncomingMessage, matches: Sequence[Match]
    ) -> None:
        """``matches`` are the routes that matched message ``message_id`` (``incoming``,
        in ``room``, "" for a private one): their callbacks will probably answer it."""
        now = time.monotonic()
        self._unanswered[message_id] = now
        live = self.live
        if live is None:
            self._awaiting[message_id] = (now, matches, None)
            return
        when = self.started + (now - self.started_monotonic)
        entries = live.add(when, adapter, room, incoming.user.id, incoming.body, matches)
        self._awaiting[message_id] = (now, matches, entries)

    def replied(self, callback_id: str, message_ids: Sequence[str]) -> None:
        """Callback ``callback_id`` answered these messages (``in_reply_to``)."""
        now = self.last = time.monotonic()
        awaiting = self._awaiting
        for message_id in message_ids:
            self._unanswered.pop(message_id, None)
            found = awaiting.pop(message_id, None)
            if found is None:
                continue
            at, matches, entries = found
            if len(matches) == 1:  # the usual case, without building a list
                if matches[0].callback_id != callback_id:
                    awaiting[message_id] = found  # another callback's match
                    continue
            else:
                rest = [m for m in matches if m.callback_id != callback_id]
                if rest:
                    awaiting[message_id] = (at, rest, entries)
                if len(rest) == len(matches):
                    continue  # another callback's match; or this one answered it already
            duration = now - at
            samples = self._latency.get(callback_id)
            if samples is None:
                samples = self._latency[callback_id] = deque(maxlen=LATENCY_SAMPLES)
            samples.append(duration)
            if entries is not None and self.live is not None:
                for entry in entries:
                    if entry.callback == callback_id and entry.duration is None:
                        self.live.replied(entry, duration)
        if len(awaiting) > _AWAITING_MAX:
            cutoff = now - 60
            self._awaiting = {k: v for k, v in awaiting.items() if v[0] > cutoff}
        if len(self._unanswered) > _AWAITING_MAX:
            cutoff = now - 60
            self._unanswered = {k: at for k, at in self._unanswered.items() if at > cutoff}

    async def wait_idle(self, router: Router, *, quiet: float, max_wait: float) -> None:
        """Replies are awaited for messages that matched a route, up to ``max_wait``;
        then ``quiet`` seconds without activity end the wait."""
        deadline = trio.current_time() + max_wait
        while trio.current_time() < deadline:
            now = time.monotonic()
            waiting = any(now - at < max_wait for at in self._unanswered.values())
            if not waiting and router.queued() == 0 and now - self.last >= quiet:
                return
            await trio.sleep(0.02)

    # -- latency -------------------------------------------------------------------------

    def latency(self, callback_id: str) -> tuple[float, float] | None:
        """A callback's p50 and p99 handler latency in seconds over its recent replies;
        None before its first."""
        samples = self._latency.get(callback_id)
        if not samples:
            return None
        ordered = sorted(samples)
        return _percentile(ordered, 0.50), _percentile(ordered, 0.99)

    # -- counts over time ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the counters every :data:`SAMPLE_INTERVAL` seconds until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(SAMPLE_INTERVAL)
            self._readings.append(self.reading())

    def reading(self) -> Reading:
        """The counters now."""
        metrics = self._metrics
        if metrics is None:
            return Reading(trio.current_time(), 0, 0, {})
        matches = _by_first_label(metrics.matches)
        replies = _by_first_label(metrics.replies)
        callbacks = {cid: (matches.get(cid, 0), replies.get(cid, 0)) for cid in matches.keys() | replies.keys()}
        received = sum(_by_first_label(metrics.received).values())
        sent = sum(_by_first_label(metrics.sent).values())
        return Reading(trio.current_time(), received, sent, callbacks)

    def reading_at(self, at: float) -> Reading:
        """The last reading taken at or before ``at`` (``trio.current_time()``); the first
        one when ``at`` is earlier (the counters start at zero with the bot)."""
        readings = self._readings
        if not readings:
            return Reading(at, 0, 0, {})
        index = bisect.bisect_right(readings, at, key=lambda r: r.at) - 1
        return readings[max(index, 0)]

    def per_minute(self, minutes: int = 60, now: Reading | None = None) -> list[tuple[int, int]]:
        """Messages (in, out) in each of the last ``minutes`` minutes, oldest first; the
        last ends now."""
        end = now or self.reading()
        buckets = []
        for back in range(minutes, 0, -1):
            start = self.reading_at(end.at - back * 60)
            stop = end if back == 1 else self.reading_at(end.at - (back - 1) * 60)
            buckets.append((max(stop.received - start.received, 0), max(stop.sent - start.sent, 0)))
        return buckets

    def callback_per_minute(self, callback_id: str, now: Reading | None = None) -> tuple[int, int]:
        """A callback's (matches, replies) in the last minute."""
        end = now or self.reading()
        matched, replies = end.of(callback_id)
        before_matched, before_replies = self.reading_at(end.at - 60).of(callback_id)
        return max(matched - before_matched, 0), max(replies - before_replies, 0)


def _by_first_label(counter: _Tally) -> dict[str, int]:
    """A labelled counter's totals, summed by the value of its first label."""
    totals: dict[str, int] = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = next(iter(sample.labels.values()), "")
                totals[key] = totals.get(key, 0) + int(sample.value)
    return totals


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of sorted ``ordered``."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]
