"""Schedules: cron expressions and fixed intervals that fire events to a callback.

A schedule comes from the operator (``callbacks[].schedules``) or from a callback's
Listen stream (``ListenRequest.schedules``); :meth:`EventHub.schedules` has them all.
Each firing is a ``ScheduleFiring`` event handed to :meth:`EventHub.deliver`, so it is
kept in the core store until the callback has it, like every durable event.

Slots. A cron schedule's slots are the times its five-field expression names in its IANA
time zone; an ``every_seconds`` schedule's slots are the multiples of the interval since
the Unix epoch, so every bot (and every restart) agrees on them.

Once per slot, across bots. The state of a schedule is the last slot that fired, in the
core store (namespace ``schedules``, key ``<callback id>/<schedule id>``, a JSON value).
A bot fires a slot only after it *claims* it: it reads the record and its version and
writes the new slot with ``expected_version`` (0 when there is no record yet). Of two
bots on one store, one write wins and the other gets a conflict, re-reads, sees the slot
taken and does nothing; a restarted bot reads the last slot and never fires it again.

Unknown outcomes. When the claim's write fails (the store went away mid-call), the bot
cannot tell whether it landed. Each claim writes a token of its own beside the slot; the
bot keeps reading until the store answers: its own token under the slot means the claim
won and it fires; another's means another bot (or an earlier run) has it; an older slot
means the write never landed and it tries again. A claim nobody can confirm before the
schedule's next slot is given up, so a slot fires at most once: a bot that dies between
its claim and the delivery loses that slot rather than risk firing it twice. Delivery
after a won claim is retried while the store is unavailable, up to the next slot; if a
write the store reported failed had in fact landed, the callback can get that firing
twice, so ``(schedule_id, scheduled_unix_ms)`` is the key to deduplicate on.

Catch-up. When a schedule starts (bot start, or the schedule appears) and its stored
last slot is older than the most recent slot that came due, that most recent slot fires
once, with ``late`` set, if it is at most ``catch_up_seconds`` old; older missed slots
never fire (no backlog). A schedule never seen before (no stored state) starts with its
next slot.

Why cronsim rather than croniter: cronsim (by the author of Healthchecks.io, which runs
millions of cron checks on it) is one small module (about 15 KB) with no dependencies
and typed; it follows Debian cron's documented rules on daylight-saving changes (a job
at a specific local time that falls into a skipped hour runs once right after the jump,
and once, not twice, in a repeated hour) and it iterates backwards, which catch-up needs.
croniter pulls in python-dateutil, was nearly archived by its maintainer in 2024 before
it changed hands, and its DST handling has a long history of reported edge cases.

Time zones come from :mod:`zoneinfo`; the ``tzdata`` package is a dependency so that
machines without ``/usr/share/zoneinfo`` (slim and distroless images, Windows) know them.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import trio
from cronsim import CronSim, CronSimError

from ._errors import StoreError, VersionConflictError
from ._events import DeclaredSchedule, schedule_id
from ._proto import core_pb2, robot_pb2
from ._store import Item, Store
from ._timing import Backoff

log = logging.getLogger(__name__)

#: The core store's namespace for schedule state: key ``<callback id>/<schedule id>``.
NAMESPACE = "schedules"
#: Longest single sleep while waiting for a slot: the wall clock may jump (NTP, a
#: suspended machine), and a slot is a wall-clock time.
_MAX_SLEEP = 30.0
#: How many cron results to skip, at most, that a DST quirk puts at or before the start.
_GUARD = 100
_FIELDS = "minute hour day-of-month month day-of-week"


# -- slots ------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name or "UTC")


def time_zone_problem(name: str) -> str | None:
    """Why ``name`` is not an IANA time zone this machine knows, or None."""
    try:
        _zone(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder such as "Europe"
        return f"unknown time zone {name[:64]!r}; use an IANA name such as 'Europe/Paris', 'America/New_York' or 'UTC'"
    return None


def cron_problem(cron: str, time_zone: str = "UTC") -> str | None:
    """Why ``cron`` is not a five-field cron expression that comes due, or None."""
    fields = cron.split()
    if len(fields) != 5:
        return (
            f"cron expression {cron!r} has {len(fields)} field(s); it needs five ({_FIELDS}), "
            "such as '*/5 * * * *' or '0 9 * * mon-fri'"
        )
    zone = _zone("UTC" if time_zone_problem(time_zone) else time_zone)
    try:
        next(CronSim(cron, datetime.now(zone)))
    except CronSimError as exc:
        return f"cron expression {cron!r} is not valid: {exc} (fields: {_FIELDS}; such as '0 9 * * mon-fri')"
    except StopIteration:
        return f"cron expression {cron!r} never comes due (no such date in the next 50 years)"
    return None


def schedule_problem(schedule: robot_pb2.Schedule) -> str | None:
    """Why a declared ``schedule`` cannot run, naming it, or None when it can."""
    name = f"schedule {schedule_id(schedule)!r}"
    if schedule.cron and schedule.every_seconds:
        return f"{name} gives both cron and every_seconds; give one of them"
    if not schedule.cron and not schedule.every_seconds:
        return f"{name} gives neither cron nor every_seconds; give one (every_seconds must be at least 1)"
    problem = time_zone_problem(schedule.time_zone)
    if problem is None and schedule.cron:
        problem = cron_problem(schedule.cron, schedule.time_zone)
    return None if problem is None else f"{name}: {problem}"


def _ms(moment: datetime) -> int:
    return math.floor(moment.timestamp()) * 1000


def _cron(schedule: robot_pb2.Schedule, at_ms: int, *, reverse: bool) -> Iterator[int]:
    zone = _zone(schedule.time_zone)
    # cronsim steps by whole seconds from ``at`` (exclusive) and drops sub-seconds.
    start = datetime.fromtimestamp(at_ms // 1000, zone)
    if reverse:
        start += timedelta(seconds=1)  # so that a slot at ``at`` itself is found
    for moment in itertools.islice(CronSim(schedule.cron, start, reverse=reverse), _GUARD):
        yield _ms(moment)


def next_slot(schedule: robot_pb2.Schedule, after_ms: int) -> int | None:
    """The first slot strictly after ``after_ms`` (ms since the epoch), or None when the
    schedule never comes due again."""
    if not schedule.cron:
        period = schedule.every_seconds * 1000
        return (after_ms // period + 1) * period
    # A local time in a repeated hour loses its fold inside cronsim: skip what lands at
    # or before the start.
    return next((slot for slot in _cron(schedule, after_ms, reverse=False) if slot > after_ms), None)


def latest_slot(schedule: robot_pb2.Schedule, at_ms: int) -> int | None:
    """The most recent slot at or before ``at_ms``, or None when there is none (in
    the 50 years cronsim looks back)."""
    if not schedule.cron:
        period = schedule.every_seconds * 1000
        return at_ms // period * period
    found = next((slot for slot in _cron(schedule, at_ms, reverse=True) if slot <= at_ms), None)
    if found is None:
        return None
    # Forward iteration is the reference (it is what fires): move up to its last slot
    # at or before ``at``, should backwards iteration have landed short around a DST change.
    while (following := next_slot(schedule, found)) is not None and following <= at_ms:
        found = following
    return found


def catch_up_slot(schedule: robot_pb2.Schedule, last_ms: int | None, now_ms: int) -> int | None:
    """The slot to fire late when a schedule starts at ``now_ms`` with ``last_ms`` the
    last slot that fired: the most recent one that came due since, when it is at most
    ``catch_up_seconds`` old; None otherwise (and always for a schedule never seen)."""
    if last_ms is None or not schedule.catch_up_seconds:
        return None
    latest = latest_slot(schedule, now_ms)
    if latest is None or latest <= last_ms or now_ms - latest > schedule.catch_up_seconds * 1000:
        return None
    return latest


def scheduled_time(schedule: robot_pb2.Schedule, slot_ms: int) -> str:
    """``slot_ms`` in RFC 3339, in the schedule's time zone."""
    moment = datetime.fromtimestamp(slot_ms / 1000, _zone(schedule.time_zone))
    return moment.isoformat(timespec="milliseconds" if slot_ms % 1000 else "seconds")


def firing(schedule: robot_pb2.Schedule, slot_ms: int, *, late: bool) -> core_pb2.Event:
    """The event a slot of ``schedule`` delivers."""
    return core_pb2.Event(
        schedule_firing=core_pb2.ScheduleFiring(
            schedule_id=schedule_id(schedule),
            scheduled_unix_ms=slot_ms,
            scheduled_time=scheduled_time(schedule, slot_ms),
            late=late,
        )
    )


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch, now: the clock slots are read on."""
    return time.time_ns() // 1_000_000


# -- the state of a schedule ------------------------------------------------------------


def encode_state(slot_ms: int, claim: str) -> bytes:
    """A schedule's stored state: the last slot fired and the claim that fired it."""
    return json.dumps({"last_slot_unix_ms": slot_ms, "claim": claim}, separators=(",", ":")).encode()


def decode_state(value: bytes) -> tuple[int, str]:
    """``(last slot, claim)`` of a stored state; a record that is not ours reads as slot 0."""
    try:
        data = json.loads(value)
        return int(data["last_slot_unix_ms"]), str(data.get("claim", ""))
    except (ValueError, TypeError, KeyError):
        return 0, ""


# -- running ----------------------------------------------------------------------------


class ScheduleHub(Protocol):
    """What the scheduler needs of :class:`~._events.EventHub`."""

    schedules_version: int

    def schedules(self) -> list[DeclaredSchedule]: ...

    async def wait_schedules_changed(self, seen: int) -> int: ...

    async def deliver(self, callback_id: str, event: core_pb2.Event, *, ttl: float | None = None) -> None: ...

    def knows(self, callback_id: str) -> bool: ...


async def run_schedules(
    hub: ScheduleHub,
    store: Store,
    *,
    clock: Callable[[], int] = wall_clock_ms,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Fire every schedule of ``hub`` until cancelled: one task per schedule, started,
    restarted (when its declaration changes) and stopped as :meth:`hub.schedules`
    changes, leaving the others be. ``clock`` (ms since the epoch) is for tests that
    run on trio's autojump clock."""
    await _Scheduler(hub, store, clock).run(task_status)


class _Scheduler:
    def __init__(self, hub: ScheduleHub, store: Store, clock: Callable[[], int]) -> None:
        self.hub = hub
        self.store = store
        self.clock = clock
        self._run = uuid.uuid4().hex[:12]
        self._claims = itertools.count()
        self._outage = False
        self._refused: set[tuple[str, str, bytes]] = set()

    async def run(self, task_status: trio.TaskStatus[None]) -> None:
        running: dict[tuple[str, str], tuple[bytes, trio.CancelScope]] = {}
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                seen = self.hub.schedules_version
                wanted: dict[tuple[str, str], tuple[bytes, DeclaredSchedule]] = {}
                for declared in self.hub.schedules():
                    key = (declared.callback_id, schedule_id(declared.schedule))
                    wanted[key] = (declared.schedule.SerializeToString(deterministic=True), declared)
                for key, (data, scope) in list(running.items()):
                    if key not in wanted or wanted[key][0] != data:
                        scope.cancel()
                        del running[key]
                for key, (data, declared) in wanted.items():
                    if key in running:
                        continue
                    problem = schedule_problem(declared.schedule)
                    if problem is not None:
                        # Listen and the config refuse these; one that slips through is
                        # logged once, not fired.
                        if (*key, data) not in self._refused:
                            self._refused.add((*key, data))
                            log.error("callback %r: %s; it does not fire", key[0], problem)
                        continue
                    scope = trio.CancelScope()
                    running[key] = (data, scope)
                    nursery.start_soon(self._schedule, declared, scope)
                await self.hub.wait_schedules_changed(seen)

    # -- one schedule ---------------------------------------------------------------

    async def _schedule(self, declared: DeclaredSchedule, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await self._run_schedule(declared)
        except Exception:
            # A bug around one schedule (a cron corner cronsim trips on) stops that one,
            # not the others and not the bot.
            log.exception(
                "schedule %r of callback %r stopped after an unexpected error; it fires again after a restart",
                schedule_id(declared.schedule),
                declared.callback_id,
            )

    async def _run_schedule(self, declared: DeclaredSchedule) -> None:
        schedule = declared.schedule
        key = f"{declared.callback_id}/{schedule_id(schedule)}"
        last = await self._last_slot(key)
        now = self.clock()
        late = catch_up_slot(schedule, last, now)
        if late is not None:
            log.info(
                "schedule %r of callback %r: slot %s came due while no bot ran; firing it late (catch_up)",
                schedule_id(schedule),
                declared.callback_id,
                scheduled_time(schedule, late),
            )
            await self._fire(declared, key, late, late=True)
        cursor = max(now, last or 0)
        while True:
            slot = next_slot(schedule, cursor)
            if slot is None:
                log.warning(
                    "schedule %r of callback %r never comes due again", schedule_id(schedule), declared.callback_id
                )
                return
            await self._sleep_until(slot)
            # Slept through more than one slot (a suspended machine, a slow store):
            # only the most recent fires, as after a restart.
            newest = latest_slot(schedule, self.clock())
            if newest is not None and newest > slot:
                log.warning(
                    "schedule %r of callback %r fell behind; skipping to slot %s",
                    schedule_id(schedule),
                    declared.callback_id,
                    scheduled_time(schedule, newest),
                )
                slot = newest
            await self._fire(declared, key, slot, late=False)
            cursor = slot

    async def _read(self, key: str, backoff: Backoff) -> Item | None:
        """The schedule's record, read again until the store answers."""
        while True:
            try:
                item = await self.store.get(NAMESPACE, key)
            except StoreError as exc:
                self._unavailable(exc)
                await backoff.sleep()
                continue
            self._available()
            return item

    async def _last_slot(self, key: str) -> int | None:
        item = await self._read(key, Backoff(0.2, 5.0))
        return None if item is None else decode_state(item.value)[0]

    async def _fire(self, declared: DeclaredSchedule, key: str, slot: int, *, late: bool) -> None:
        """Claim ``slot`` and deliver its firing when the claim wins; give up at the
        schedule's next slot."""
        schedule = declared.schedule
        following = next_slot(schedule, slot)
        deadline = math.inf if following is None else trio.current_time() + (following - self.clock()) / 1000
        claimed = False
        if not self.hub.knows(declared.callback_id):
            # Another bot sharing the store may have the callback: let it claim the slot,
            # rather than keep the firing here where the callback never comes.
            log.debug("slot %s of %s left to other bots: callback not connected here", slot, key)
            return
        with trio.move_on_at(deadline):
            claimed = await self._claim(key, slot)
            if not claimed:
                log.debug("slot %s of %s was fired by another bot", slot, key)
                return
            await self._deliver(declared.callback_id, firing(schedule, slot, late=late))
            log.debug("fired slot %s of %s", slot, key)
            return
        log.error(
            "schedule %r of callback %r: slot %s %s before the next slot came due, so it does not fire",
            schedule_id(schedule),
            declared.callback_id,
            scheduled_time(schedule, slot),
            "was claimed but could not be kept in the store" if claimed else "could not be claimed (store unavailable)",
        )

    async def _claim(self, key: str, slot: int) -> bool:
        """Whether this bot won ``slot``: compare-and-set on the schedule's record."""
        claim = f"{self._run}-{next(self._claims)}"
        value = encode_state(slot, claim)
        backoff = Backoff(0.2, 5.0)
        while True:
            item = await self._read(key, backoff)
            version = 0
            if item is not None:
                stored, holder = decode_state(item.value)
                if stored >= slot:
                    # Ours only when a write whose outcome was unknown had landed.
                    return stored == slot and holder == claim
                version = item.version
            try:
                await self.store.set(NAMESPACE, key, value, expected_version=version)
            except VersionConflictError:
                continue  # another bot wrote first: read what it wrote
            except StoreError as exc:
                # It may have landed: the next read decides (see the module's docstring).
                self._unavailable(exc)
                await backoff.sleep()
                continue
            self._available()
            return True

    async def _deliver(self, callback_id: str, event: core_pb2.Event) -> None:
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                await self.hub.deliver(callback_id, event)
            except StoreError as exc:
                self._unavailable(exc)
                await backoff.sleep()
                continue
            self._available()
            return

    async def _sleep_until(self, slot_ms: int) -> None:
        """Sleep until the clock reaches ``slot_ms``, in steps, as the wall clock may jump."""
        while True:
            delay = (slot_ms - self.clock()) / 1000
            if delay <= 0:
                return
            await trio.sleep(min(delay, _MAX_SLEEP))

    def _unavailable(self, exc: StoreError) -> None:
        # One line an outage, however many schedules meet it.
        if not self._outage:
            self._outage = True
            log.warning("schedules: the store is unavailable (%s); retrying, and no slot fires unclaimed", exc)

    def _available(self) -> None:
        if self._outage:
            self._outage = False
            log.info("schedules: the store answers again")
