"""High availability: which of several bots sharing one core store is the active one.

Every bot started with ``ha:`` runs a :class:`Leader`. They elect one active bot through
a lease kept in the core store itself, with nothing but its compare-and-set (so it works
on any store several bots share: PostgreSQL, Redis), under namespace ``ha``, key
``leader``: JSON ``{holder, token, grpc_address, http_address}``.

- The active bot renews the record every ``renew_interval`` by compare-and-set on the
  version it last wrote. A conflict means another bot holds it now: it steps down at once.
- A standby reads the record as often. It takes over when the record's *version* has
  not changed for ``lease`` seconds of its own monotonic clock (no synchronized clocks:
  nobody compares timestamps written by another machine), by compare-and-set on that
  version, with ``token + 1`` (the fencing token). Only a record a bot released as it
  stopped (``holder`` empty) is taken at once. A missing record is waited out for a
  full ``lease`` like an unrenewed one: it may have vanished (a store restarted without
  persistence, flushed, evicted) while its holder is still inside its fence. So the
  first bot of a fresh deployment becomes active one ``lease`` after it starts.
- The active bot fences itself: it acts (sends to chat, accepts chat, fires schedules,
  hands out durable events, takes webhooks) only until ``lease - fence_margin`` seconds
  after it *started* its last successful renewal. That write landed after it started,
  and a standby starts counting only once it has seen it, so every standby takes over
  later than that, by ``fence_margin`` at least (it counts from when its read
  *returned*, never from when it was sent): two bots never act at once, whatever the
  store's or the network's delays. :meth:`Leader.acting` checks the deadline itself
  (not a flag a task must have cleared), so a bot resumed after SIGSTOP sends nothing,
  even before its tasks have run.

What acts and what does not is wired in ``_bot`` (adapters, schedules, the EventHub),
``_outgoing`` (every send checks :meth:`Leader.check` right before it goes out),
``_incoming`` (a fenced bot drops what its adapters still deliver), ``_edge`` (a
standby refuses SendMessages, Join, Part and Publish with UNAVAILABLE naming the
active's address) and ``_webhooks`` (503 naming the active's HTTP address).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from ._config import HaSettings
from ._errors import StandbyError, StoreError, VersionConflictError
from ._store import Store
from ._timing import Throttle

log = logging.getLogger(__name__)

#: Where the lease lives in the core store.
NAMESPACE = "ha"
KEY = "leader"
#: Why ha: is refused on a store only one bot can open.
UNSHARED = "ha needs a store several bots share: PostgreSQL or Redis"
_LOG_INTERVAL = 10.0


def unshared_store_problem(store_type: str, options: object) -> str | None:
    """Why a store cannot carry a lease between bots (SQLite, the in-memory store), or
    None. Any other store type is taken at its word: it is shared if its compare-and-set
    is, as the store contract requires."""
    if store_type == "memory":
        return f"{UNSHARED}; the memory store lives inside one process"
    url = str(getattr(options, "url", "") or "")
    if store_type == "sql" and url.startswith("sqlite"):
        return f"{UNSHARED}; store.url is SQLite, a file one machine's processes share at best, with no lease expiry"
    return None


def advertised(listen_address: str, configured: str | None) -> str:
    """The address other bots and clients reach this one at: ``configured`` when set,
    else the address it listens on with this host's name for a wildcard host."""
    if configured:
        return configured
    host, sep, port = listen_address.rpartition(":")
    if not sep:
        return listen_address
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = socket.gethostname()
    return f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """The lease as the store holds it."""

    holder: str
    token: int
    grpc_address: str
    http_address: str

    def encode(self) -> bytes:
        """The JSON the store keeps."""
        return json.dumps(
            {
                "holder": self.holder,
                "token": self.token,
                "grpc_address": self.grpc_address,
                "http_address": self.http_address,
            }
        ).encode()

    @classmethod
    def decode(cls, value: bytes) -> LeaseRecord:
        """A record read back; one that is not ours to read counts as released (so a
        standby takes it over rather than wait on garbage forever)."""
        try:
            data: Any = json.loads(value)
            return cls(str(data["holder"]), int(data["token"]), str(data["grpc_address"]), str(data["http_address"]))
        except (ValueError, KeyError, TypeError):
            return cls("", 0, "", "")


class Solo:
    """The leadership of a bot without ``ha:``: always active."""

    state = "active"
    token = 0
    active_grpc_address = ""
    active_http_address = ""

    def acting(self) -> bool:
        """Always True."""
        return True

    def check(self) -> None:
        """Never raises."""

    async def wait_active(self) -> None:
        """Returns at once."""

    async def wait_stepped_down(self) -> None:
        """Never returns."""
        await trio.sleep_forever()


class Leader:
    """This bot's part in the election: run :meth:`run` in a nursery; ask
    :meth:`acting` (or :meth:`check`) before acting; wait on :meth:`wait_active` and
    :meth:`wait_stepped_down` to start and stop what only the active bot runs."""

    def __init__(
        self,
        store: Store,
        settings: HaSettings,
        *,
        grpc_address: str = "",
        http_address: str = "",
        name: str = "",
    ) -> None:
        self.settings = settings
        self._store = store
        #: Who this bot is in the record: host, pid and a random part (a restarted bot
        #: is a new holder; nothing else need be unique).
        self.holder = name or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.grpc_address = grpc_address
        self.http_address = http_address
        #: "standby" or "active".
        self.state = "standby"
        #: The fencing token of this bot's lease while active (0 before it ever was).
        self.token = 0
        #: The lease record last seen or written (the active's addresses), if any.
        self.record: LeaseRecord | None = None
        self._version = 0
        #: Trio's clock: when this bot stops acting unless a renewal lands first.
        self._fence = -math.inf
        self._changed = trio.Event()
        self._listeners: list[Callable[[bool], None]] = []
        self._logs = Throttle(_LOG_INTERVAL)
        self._fenced_logged = False
        #: Times this bot became active and stepped down, since start.
        self.takeovers = 0
        self.step_downs = 0

    # -- what the rest of the bot asks ------------------------------------------------

    def acting(self) -> bool:
        """Whether this bot may act now: active, and its lease confirmed recently enough
        that no standby can have taken over. A bot past its deadline steps down here,
        logging a WARNING once."""
        if self.state != "active":
            return False
        if trio.current_time() < self._fence:
            return True
        self._step_down(
            f"its lease was last confirmed more than {self.settings.lease - self.settings.fence_margin:g} s ago "
            "(ha.lease - ha.fence_margin): the store is unreachable or slow, or the process was paused"
        )
        return False

    def check(self) -> None:
        """Raise StandbyError (naming the active bot's address) unless :meth:`acting`."""
        if not self.acting():
            address = self.active_grpc_address
            where = f"the active bot is at {address}" if address else "no active bot is known yet"
            raise StandbyError(
                f"this bot is a standby (ha:); {where}: send there (the SDK does, given every bot's address in "
                "OCO_ADDRESS)",
                active_address=address,
            )

    @property
    def active_grpc_address(self) -> str:
        """The active bot's gRPC address ("" when none is known)."""
        record = self._active_record()
        return record.grpc_address if record is not None else ""

    @property
    def active_http_address(self) -> str:
        """The active bot's HTTP address ("" when none is known or it serves none)."""
        record = self._active_record()
        return record.http_address if record is not None else ""

    def _active_record(self) -> LeaseRecord | None:
        record = self.record
        if record is None or not record.holder:
            return None
        if record.holder == self.holder and self.state != "active":
            return None  # this bot's own, now stale: the next look finds who holds it
        return record

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(active)`` whenever this bot becomes active or steps down
        (health and metrics follow it)."""
        self._listeners.append(listener)

    async def wait_active(self) -> None:
        """Return once this bot is active (at once if it is)."""
        while not self.acting():
            await self._changed.wait()

    async def wait_stepped_down(self) -> None:
        """Return once this bot is no longer active (at once if it is not). Also wakes
        when the fence deadline passes with no renewal, without waiting for the store."""
        while self.acting():
            with trio.move_on_at(self._fence):
                await self._changed.wait()

    # -- the election -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew while active, watch while standing by, until cancelled; on the way out
        an active bot releases the lease so that a standby takes over at once."""
        try:
            async with trio.open_nursery() as nursery:
                # The deadline is watched apart from the renewals: a store call that hangs
                # (a thread offload is not cancellable) must not hold the step-down back.
                nursery.start_soon(self._watch_fence)
                task_status.started()
                await self._elect()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.settings.renew_interval * 2):
                await self._release()

    async def _elect(self) -> None:
        interval = self.settings.renew_interval
        # The version last seen (None: no record), and when the read that saw it first
        # RETURNED: a slow read may bring back a renewal begun long after it was sent,
        # and the active bot's fence counts from that renewal's start.
        seen_version: int | None = -1
        seen_at = 0.0
        next_tick = trio.current_time()
        while True:
            started = trio.current_time()
            if self.state == "active":
                await self._renew(started)
            else:
                answered, item = await self._read()
                now = trio.current_time()
                if answered:
                    version, record = item if item is not None else (None, None)
                    if record is not None:
                        self.record = record
                    if record is not None and not record.holder:
                        await self._take(version or 0, started, "the active bot released the lease")
                    elif version != seen_version:
                        # A new renewal, or a record that vanished (a store restarted
                        # without persistence, flushed, evicted): the bot that held it may
                        # still act until its fence, so the vanished record is waited out
                        # like an unrenewed one. Only an explicit release is taken at once.
                        seen_version, seen_at = version, now
                    elif now - seen_at >= self.settings.lease:
                        holder = f"the lease of {record.holder}" if record is not None else "no lease record"
                        await self._take(
                            version or 0,
                            started,
                            f"{holder} was not renewed for {now - seen_at:.1f} s",
                        )
                    if self.state == "active":
                        seen_version = -1
            next_tick = max(next_tick + interval, trio.current_time())
            await trio.sleep_until(next_tick)

    async def _read(self) -> tuple[bool, tuple[int, LeaseRecord] | None]:
        """Whether the store answered, and the record with its version (None: none)."""
        try:
            item = await self._store.get(NAMESPACE, KEY)
        except StoreError as exc:
            if self._logs.allow("read") is not None:
                log.warning("ha: cannot read the lease from the store (%s); standing by", exc)
            return False, None
        if item is None:
            return True, None
        return True, (item.version, LeaseRecord.decode(item.value))

    def _mine(self, token: int) -> LeaseRecord:
        return LeaseRecord(self.holder, token, self.grpc_address, self.http_address)

    async def _take(self, version: int, started: float, why: str) -> None:
        token = (self.record.token if self.record is not None else 0) + 1
        record = self._mine(token)
        try:
            new_version = await self._store.set(NAMESPACE, KEY, record.encode(), expected_version=version)
        except VersionConflictError:
            return  # another standby was faster; watch its record from the next look
        except StoreError as exc:
            if self._logs.allow("take") is not None:
                log.warning("ha: could not take over the lease (%s); still standing by", exc)
            return
        self._version = new_version
        self.record = record
        self.token = token
        self._fence = started + self.settings.lease - self.settings.fence_margin
        self.state = "active"
        self._fenced_logged = False
        self.takeovers += 1
        log.info("ha: this bot is now active (fencing token %d): %s", token, why)
        self._notify(True)

    async def _renew(self, started: float) -> None:
        record = self._mine(self.token)
        try:
            version = await self._store.set(NAMESPACE, KEY, record.encode(), expected_version=self._version)
        except VersionConflictError:
            self._step_down("another bot took the lease over (this one's renewals came too late)")
            return
        except StoreError as exc:
            if self._logs.allow("renew") is not None:
                log.warning(
                    "ha: could not renew the lease (%s); this bot stops acting %.1f s from now unless a renewal lands",
                    exc,
                    max(0.0, self._fence - trio.current_time()),
                )
            return
        if self.state != "active":
            # Fenced while the write was under way: it landed, but this bot stopped
            # acting meanwhile; hand the lease on rather than hold it idle for a lease.
            self._version = version
            await self._release()
            return
        self._version = version
        self._fence = max(self._fence, started + self.settings.lease - self.settings.fence_margin)

    async def _watch_fence(self) -> None:
        while True:
            await self.wait_active()
            await self.wait_stepped_down()  # acting() steps down when the deadline passes

    def _step_down(self, why: str) -> None:
        if self.state != "active":
            return
        self.state = "standby"
        self.step_downs += 1
        if not self._fenced_logged:
            self._fenced_logged = True
            log.warning("ha: this bot stopped acting and stands by: %s", why)
        self._notify(False)

    def _notify(self, active: bool) -> None:
        self._changed.set()
        self._changed = trio.Event()
        for listener in self._listeners:
            try:
                listener(active)
            except Exception:  # a listener's bug must not stop the election
                log.exception("ha: a leadership listener failed")

    async def _release(self) -> None:
        """Mark the lease released (holder empty), if this bot still holds it, so that a
        standby takes over at its next look instead of after a lease."""
        if self._version == 0 or (self.record is not None and self.record.holder != self.holder):
            return
        was_active = self.state == "active"
        self.state = "standby"
        if was_active:
            self._notify(False)
        released = LeaseRecord("", self.token, "", "")
        try:
            await self._store.set(NAMESPACE, KEY, released.encode(), expected_version=self._version)
        except StoreError:
            return  # taken over already, or the store is away: the standby waits a lease
        self._version = 0
        log.info("ha: released the lease")
