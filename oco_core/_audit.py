"""The audit log: every permission decision, admin command, capability refusal and
delivered respond match, kept in the core store's ``audit`` namespace.

Routing never waits for the store, so records are queued and written by one task in
the bot's nursery. While the store is unavailable the task keeps the batch it holds and
retries with backoff (up to 10 s apart) for as long as the outage lasts, and records
wait in the queue, in memory: up to 100,000 of them (some tens of MB). Records that do
not fit are counted, never waited for: the first one dropped logs one line, and the
count is logged once, when a write succeeds again (or when the bot stops). The task
writes what queued up in 0.1 s as one store entry (JSON lines), so a busy bot makes at
most ten writes a second rather than one per message: with SQLite's synchronous=FULL a
write per record halved the replies per second in bench/bench_roundtrip.py. Keys are the first
record's time in microseconds and a sequence number, so the store's key order is time
order: ``oco audit --since`` is a range scan, and :func:`query` reads the newest records
first, a window of keys at a time, stopping once it has as many as it shows.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import trio

from ._errors import StoreError, StoreUnavailableError, VersionConflictError
from ._store import Item, Store
from ._timing import Backoff

log = logging.getLogger(__name__)

NAMESPACE = "audit"
#: Records held in memory while the store is behind or away (``auth.audit.max_pending``);
#: more are dropped and counted.
DEFAULT_MAX_PENDING = 100_000
#: Seconds between attempts at a write while the store is unavailable: first, at most.
_RETRY_FIRST = 0.5
_RETRY_MAX = 10.0
#: With this many records waiting, the writer does not wait for more to gather.
_BACKLOG = 1000
#: Seconds the writer may go on writing what is queued once the bot stops.
_STOP_WAIT = 5.0
_PRUNE_EVERY = 3600.0
_PAGE = 100
#: Most bytes one store entry holds (stores accept 1 MiB values by default).
_BATCH_BYTES = 256 * 1024
#: How long the writer lets records gather before it writes them.
_BATCH_WAIT = 0.1
#: A batch's key is its first record's time; scans start this much earlier so a batch
#: begun just before ``since`` is still read (its records are filtered one by one).
_BATCH_SPAN = 60.0

ALLOWED = "allowed"
DENIED = "denied"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One decision. ``kind`` says what was decided:

    - ``route``: a person's message matched a route that needs a permission or is
      limited to some rooms (denied), or a respond route delivered its match (allowed);
    - ``rate_limit``: a person or a callback went over its rate limit (denied);
    - ``admin``: an admin command from chat (grant, revoke, link, rule, ...), or an
      operator's ``oco roles``/``oco rules`` change (user ``cli/<name>``);
    - ``capability``: a callback's call needed a capability it lacks (denied);
    - ``check_permission``: a callback asked CheckPermission;
    - ``authentication``: a caller was refused for who it is (an unknown secret, a
      client certificate for another callback), once per host a minute;
    - ``webhook``: a webhook request failed its callback's ``webhook_auth`` (denied),
      once per client host a minute.
    """

    time: float
    kind: str
    decision: str
    user: str = ""
    person: str = ""
    room: str = ""
    callback: str = ""
    route: str = ""
    permission: str = ""
    detail: str = ""

    def to_json(self) -> bytes:
        """The record as stored."""
        details = {name: getattr(self, name) for name in _DETAIL_NAMES}
        return _to_json(self.time, self.kind, self.decision, details)

    @classmethod
    def from_json(cls, data: bytes) -> AuditRecord:
        """A stored record; unknown fields (from a newer bot) are ignored."""
        raw = json.loads(data)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


_FIELD_NAMES = tuple(f.name for f in fields(AuditRecord))
#: The fields a record's details name: all but time, kind and decision.
_DETAIL_NAMES = _FIELD_NAMES[3:]
_DETAILS = frozenset(_DETAIL_NAMES)
_encode = json.JSONEncoder(ensure_ascii=False).encode

#: A record as :meth:`AuditLog.record` queues it: time, kind, decision and details.
_Queued = tuple[float, str, str, dict[str, str]]


def _to_json(when: float, kind: str, decision: str, details: dict[str, str]) -> bytes:
    """A record as stored: its fields in their order, those that are "" left out."""
    # Not dataclasses.asdict: it deep-copies every value, and a record is written for
    # every command a callback answers (a tenth of the bot's time for each in a
    # profile of 20,000 commands). One dict, and one encoder for all records
    # (json.dumps with an option builds an encoder per call): 5.1 -> 3.6 µs a record.
    data: dict[str, object] = {"time": when}
    if kind != "":
        data["kind"] = kind
    if decision != "":
        data["decision"] = decision
    for name in _DETAIL_NAMES:
        value = details.get(name, "")
        if value != "":
            data[name] = value
    return _encode(data).encode()


def _key(when: float, seq: int) -> str:
    return f"{int(when * 1_000_000):017d}-{seq:08d}"


class AuditLog:
    """Queues records and writes them to the store in the background."""

    def __init__(self, store: Store, retention_days: float | None, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self._store = store
        self._retention = retention_days * 86400 if retention_days else None
        self._max_pending = max_pending
        #: Each record with its sequence number: a batch's key is made from its first's.
        self._send, self._receive = trio.open_memory_channel[tuple[int, _Queued]](max_pending)
        self._seq = 0
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()
        #: Records never written: dropped with the queue full, or left when the bot stopped.
        self.lost = 0
        self._unreported = 0
        #: The batch taken off the queue and not yet written (kept across an outage).
        self._held: tuple[str, list[bytes]] | None = None

    def record(self, kind: str, decision: str, **details: str) -> None:
        """Queue one record (never waits); ``details`` are :class:`AuditRecord`'s other
        fields. Queued as it came, and written as JSON by the writer: an AuditRecord
        (a frozen dataclass of ten fields) made for each cost more than its JSON."""
        if not _DETAILS.issuperset(details):  # a wrong name fails here, as AuditRecord(...) would
            raise TypeError(f"an audit record has no field {sorted(details.keys() - _DETAILS)[0]!r}")
        entry = (time.time(), kind, decision, details)
        self._seq = (self._seq + 1) % 100_000_000
        try:
            self._send.send_nowait((self._seq, entry))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self._drop(1, entry)
            return
        self._pending += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle

    def _drop(self, count: int, entry: _Queued | None = None) -> None:
        if not self._unreported:
            # One line as dropping starts; the count follows once the store catches up.
            log.error(
                "audit log: the store is too far behind or unavailable and %d records wait in memory; "
                "dropping records until it catches up, e.g. %s",
                self._max_pending,
                None if entry is None else AuditRecord(entry[0], entry[1], entry[2], **entry[3]),
            )
        self.lost += count
        self._unreported += count

    def _report_dropped(self, why: str) -> None:
        if self._unreported:
            log.error("audit log: %d record(s) were dropped %s", self._unreported, why)
            self._unreported = 0

    async def flush(self) -> None:
        """Wait until every queued record is in the store (through an outage, until the
        store is back or the writer stops)."""
        await self._idle.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write queued records until cancelled; then write what is left (bounded wait)."""
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                if self._retention is not None:
                    nursery.start_soon(self._prune_hourly)
                async for first in self._receive:
                    try:
                        if self._receive.statistics().current_buffer_used < _BACKLOG:
                            # Let a burst gather: at a message a millisecond, one write per
                            # message would be a disk sync per message, on routing's heels.
                            await trio.sleep(_BATCH_WAIT)
                    finally:
                        # Taken off the queue, a batch is written even if the bot is stopping.
                        self._held = self._batch(first)
                    await self._write_held()
        finally:
            with trio.move_on_after(_STOP_WAIT) as scope:
                scope.shield = True
                while self._held is not None or self._pending:
                    if self._held is None:
                        try:
                            self._held = self._batch(self._receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                            break
                    await self._write_held()
            if self._held is not None or self._pending:
                left = self._pending
                self._held = None
                while True:
                    try:
                        self._receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                        break
                self._done(left)
                self.lost += left
                self._unreported += left
            self._report_dropped("(the store was unavailable or behind when the bot stopped)")

    def _batch(self, first: tuple[int, _Queued]) -> tuple[str, list[bytes]]:
        """``first`` and whatever else is queued, up to _BATCH_BYTES, and the key they
        are stored under."""
        seq, entry = first
        key = _key(entry[0], seq)
        lines = [_to_json(*entry)]
        size = len(lines[0])
        while size < _BATCH_BYTES:
            try:
                _, more = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            lines.append(_to_json(*more))
            size += len(lines[-1]) + 1
        return key, lines

    async def _write_held(self) -> None:
        """Write the held batch, retrying for as long as the store is unavailable."""
        assert self._held is not None
        key, lines = self._held
        backoff = Backoff(_RETRY_FIRST, _RETRY_MAX)
        failing_since: float | None = None
        while True:
            try:
                await self._store.set(NAMESPACE, key, b"\n".join(lines))
                break
            except StoreUnavailableError as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning(
                        "audit log: cannot write to the store (%s); keeping records in memory (up to %d) "
                        "and retrying until it is back",
                        exc,
                        self._max_pending,
                    )
                await backoff.sleep()
            except StoreError as exc:
                # The store refuses this batch itself (a value over its max_value_bytes, a
                # quota): retrying cannot help, and would hold every later record back.
                log.error("audit log: the store refused %d record(s): %s; they are dropped", len(lines), exc)
                self.lost += len(lines)
                break
        self._held = None
        self._done(len(lines))
        if failing_since is not None:
            log.warning(
                "audit log: writing to the store again after %.0f s; %d record(s) waiting",
                time.monotonic() - failing_since,
                self._pending,
            )
        self._report_dropped("while the store was behind or unavailable")

    def _done(self, count: int) -> None:
        self._pending -= count
        if self._pending == 0:
            self._idle.set()

    async def _prune_hourly(self) -> None:
        assert self._retention is not None
        while True:
            try:
                removed = await prune(self._store, time.time() - self._retention)
                if removed:
                    log.info("audit log: removed %d batch(es) of records older than the retention", removed)
            except StoreError as exc:
                log.warning("audit log: pruning failed (will retry): %s", exc)
            await trio.sleep(_PRUNE_EVERY)


async def write_now(store: Store, kind: str, decision: str, **details: str) -> AuditRecord:
    """Write one record at once, not through an AuditLog: for a one-shot command (``oco
    roles``, ``oco rules``) that has no writer task. Its key is made unique by a random
    sequence number and written only if absent, so it never replaces a bot's batch."""
    entry = AuditRecord(time=time.time(), kind=kind, decision=decision, **details)
    while True:
        try:
            await store.set(
                NAMESPACE, _key(entry.time, secrets.randbelow(100_000_000)), entry.to_json(), expected_version=0
            )
            return entry
        except VersionConflictError:
            continue


async def prune(store: Store, before: float) -> int:
    """Delete batches whose first record is older than ``before`` (unix time); return
    how many store entries went."""
    end = _key(before, 0)
    removed = 0
    while True:
        page = await store.list(NAMESPACE, limit=_PAGE, keys_only=True)
        old = [item.key for item in page if item.key < end]
        for key in old:
            removed += bool(await store.delete(NAMESPACE, key))
        if len(old) < len(page) or len(page) < _PAGE:
            return removed


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """What ``oco audit`` asks for; empty fields match anything. ``user`` matches the
    user id or the person id; ``text`` any field containing it."""

    since: float = 0.0
    until: float = math.inf
    kind: str = ""
    decision: str = ""
    user: str = ""
    room: str = ""
    callback: str = ""
    permission: str = ""
    text: str = ""

    def matches(self, entry: AuditRecord) -> bool:
        """Whether ``entry`` passes every filter."""
        checks: list[tuple[str, Any]] = [
            (self.kind, entry.kind),
            (self.decision, entry.decision),
            (self.room, entry.room),
            (self.callback, entry.callback),
            (self.permission, entry.permission),
        ]
        if any(want and want != have for want, have in checks):
            return False
        if self.user and self.user not in (entry.user, entry.person):
            return False
        if self.text and not any(self.text in str(v) for v in asdict(entry).values()):
            return False
        return self.since <= entry.time <= self.until


#: The newest window of time ``query`` reads first (seconds); each next one, older, is
#: 2 to 4 times as long, so a page reads about as many records as it shows, and a log
#: of any age is covered in a few dozen reads.
_FIRST_WINDOW = 1.0
#: Seconds back from now within which a query's ``since`` is read in one window: the
#: console's live stream asks every few seconds for the last minute or two.
_ONE_READ = 600.0


def _records(item: Item) -> list[AuditRecord]:
    records = []
    for line in item.value.split(b"\n"):
        try:
            records.append(AuditRecord.from_json(line))
        except (ValueError, TypeError):
            log.warning("audit log: ignoring a malformed record in %r", item.key)
    return records


async def _window(store: Store, after: str, last: str | None) -> list[AuditRecord]:
    """The records of the entries whose keys are greater than ``after`` and at most
    ``last`` (None: no end), in key order."""
    found: list[AuditRecord] = []
    while True:
        # Keys first: a list cannot stop at ``last``, and the entries past it (the newer
        # window, read already) would be read again for nothing, batches of records each.
        keys = await store.list(NAMESPACE, start_after=after, limit=_PAGE, keys_only=True)
        inside = [item.key for item in keys if last is None or item.key <= last]
        if not inside:
            return found
        page = await store.list(NAMESPACE, start_after=after, limit=len(inside))
        for item in page:
            if last is not None and item.key > last:
                return found
            found += _records(item)
            # Inside the bot (the console's audit page) a read shares the trio thread with
            # routing: one batch (up to _BATCH_BYTES) parsed at a time, then others run.
            await trio.lowlevel.checkpoint()
        if not page:
            return found
        ends = len(inside) < len(keys) or len(keys) < _PAGE
        if ends and page[-1].key >= inside[-1]:
            return found  # else entries came or went meanwhile: look again from here
        after = page[-1].key


async def query(store: Store, filters: AuditQuery, limit: int = 100) -> list[AuditRecord]:
    """The newest ``limit`` records that pass ``filters``, oldest first.

    Keys are times, so the log is read newest first, a window of keys at a time (one
    second, then longer ones, as the matches so far say) until ``limit`` records match or the log (or
    ``filters.since``) ends: the first page of a large log reads its newest records, not
    the whole log. Order is the store's (by batch, then within a batch): the time order,
    as one writer writes its records."""
    # Entries at or before `bottom` cannot hold a record at or after `since`.
    bottom = _key(filters.since - _BATCH_SPAN, 0) if filters.since > _BATCH_SPAN else ""
    first = await store.list(NAMESPACE, start_after=bottom, limit=1, keys_only=True)
    if not first:
        return []
    oldest = first[0].key
    # A batch holds records from its key's time on: one starting after until+span has none.
    top = None if math.isinf(filters.until) else _key(filters.until + _BATCH_SPAN, 99_999_999)
    end = first_end = min(time.time(), filters.until + _BATCH_SPAN)
    width = _FIRST_WINDOW
    if bottom and end - (filters.since - _BATCH_SPAN) <= _ONE_READ:
        width = end - (filters.since - _BATCH_SPAN)  # a recent `since` (the console's live stream): one read
    windows: list[list[AuditRecord]] = []  # newest first
    matched = 0
    while True:
        start = end - width
        after = _key(start, 0) if start > 0 else ""
        done = after < oldest or after <= bottom
        if done:
            after = bottom
        found = [entry for entry in await _window(store, after, top) if filters.matches(entry)]
        windows.append(found)
        matched += len(found)
        if done or matched >= limit:
            break
        # Each store read costs a round trip (a thread, for SQLite): the next window is as
        # long as the rate of matches so far says the rest needs, and a bit more; at
        # least twice the last (a log of any age takes a few dozen reads), at most four
        # times (a quiet hour says little of a busy day before it, and past a gap, the
        # window may reach far into what lies before it).
        rest = (limit - matched) * (first_end - start) / matched * 1.25 if matched else 0.0
        width = min(max(width * 2, rest), width * 4)
        top, end = after, start
    records = [entry for found in reversed(windows) for entry in found]
    return records[-limit:] if limit else []
