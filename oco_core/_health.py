"""Health: the one place that knows why the bot is not ready.

Both views read it: gRPC health (``grpc.health.v1``, every service the bot serves and
``""``: SERVING when ready, NOT_SERVING otherwise; the edge follows :meth:`Health.wait_changed`)
and ``GET /readyz`` on the HTTP server (200, or 503 with the reasons as JSON).

A reason is a *condition*: what is not ready and why. The bot sets these itself:

- ``starting``: until the bot is up (callbacks waited for, adapters started);
- ``store``: the core store is unreachable. Learnt two ways: every call that fails
  with StoreUnavailableError says so at once (:class:`~._metrics.MeteredStore`), and a
  probe (one ``get`` every :data:`PROBE_INTERVAL` seconds) finds it when nothing else
  is calling; a probe that has not answered within :data:`PROBE_TIMEOUT` counts as a
  failure, since a hung server answers nothing at all. Any call that completes
  clears it.
- ``adapters``: no chat adapter is connected (on the active bot only): each adapter's
  ``run`` has started and not ended, and the adapter, where it can tell
  (:attr:`~._adapter.Adapter.connected`), says it is connected. Logged only once it has
  lasted :data:`ADAPTER_GRACE` seconds since the bot became up or active: connecting
  after start-up or a takeover is no news;
- ``standby``: this bot is a standby (``ha:``), read from its leadership;
- ``stopping``: the bot is shutting down (load balancers stop sending before the
  servers close).

Anything else may add its own with :meth:`Health.set_condition` and remove it with
:meth:`Health.clear_condition`. A condition that appears or goes is logged once (a
changed reason for one already there is not: a store that stays down with a new error
text each try would fill the log); the bot returns to ready by itself when every
condition has gone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

import trio

from ._errors import StoreError, StoreUnavailableError

if TYPE_CHECKING:
    from ._incoming import AdapterLink
    from ._store import Store

log = logging.getLogger(__name__)

STARTING = "starting"
STORE = "store"
ADAPTERS = "adapters"
STANDBY = "standby"
STOPPING = "stopping"
#: The order conditions are listed in (others follow, by name).
_ORDER = (STOPPING, STARTING, STORE, STANDBY, ADAPTERS)
#: Conditions that are part of a normal life, logged at INFO; the rest at WARNING.
_EXPECTED = frozenset({STARTING, STANDBY, STOPPING})
#: Not logged: every start and stop has them, and says so in its own lines.
_UNLOGGED = frozenset({STARTING, STOPPING})

#: Seconds between store probes, and how long a probe may take before the store counts
#: as unreachable. Short enough that an orchestrator sees an outage within a few
#: seconds; one ``get`` of a missing key every 2 s costs the database nothing.
PROBE_INTERVAL = 2.0
PROBE_TIMEOUT = 5.0
#: Seconds between looks at the adapters and the leadership (which nothing announces).
EVALUATE_INTERVAL = 0.5
#: Seconds an active bot's adapters may take to connect before their absence is logged
#: (it makes the bot not ready at once all the same).
ADAPTER_GRACE = 10.0
#: Where the probe reads (a key nothing writes).
PROBE_NAMESPACE = "health"
PROBE_KEY = "probe"


class Leadership(Protocol):
    """What health reads of :class:`~._leader.Leader` (or ``Solo``)."""

    @property
    def active_grpc_address(self) -> str: ...

    def acting(self) -> bool: ...


class Health:
    """Why the bot is not ready, if it is not."""

    def __init__(self) -> None:
        self._conditions: dict[str, str] = {STARTING: "the bot is starting (callbacks and adapters connecting)"}
        self._logged: set[str] = set()
        self._changed = trio.Event()
        #: One more on every change of readiness or of the conditions listed.
        self.version = 0
        self._probing_since: float | None = None
        #: When this bot last became up and active (adapters get a grace to connect).
        self._acting_since: float | None = None
        self._sources: _Sources | None = None

    # -- reading ------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether nothing stands in the way."""
        return not self._conditions

    def not_ready(self) -> list[tuple[str, str]]:
        """Each condition as (what, why), in a fixed order."""
        rank = {what: i for i, what in enumerate(_ORDER)}
        return sorted(self._conditions.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))

    def report(self) -> bytes:
        """The JSON ``/readyz`` answers: ``{"ready": bool, "not_ready": [{"what", "why"}]}``."""
        body = {"ready": self.ready, "not_ready": [{"what": what, "why": why} for what, why in self.not_ready()]}
        return json.dumps(body).encode() + b"\n"

    async def wait_changed(self, seen: int) -> int:
        """Wait until :attr:`version` differs from ``seen``; return it."""
        while self.version == seen:
            await self._changed.wait()
        return self.version

    # -- changing -----------------------------------------------------------------------

    def set_condition(self, what: str, why: str, *, announce: bool = True) -> None:
        """Mark the bot not ready because of ``what`` (``store``, ``standby``, ...),
        saying ``why``. Logged once while it lasts; with ``announce`` False not yet (a
        later call with it True logs it then)."""
        previous = self._conditions.get(what)
        self._conditions[what] = why
        if previous is None:
            self._bump()
        if announce and what not in self._logged and what not in _UNLOGGED:
            self._logged.add(what)
            level = logging.INFO if what in _EXPECTED else logging.WARNING
            log.log(level, "not ready (gRPC health NOT_SERVING, /readyz 503): %s: %s", what, why)

    def clear_condition(self, what: str) -> None:
        """``what`` no longer stands in the way."""
        if self._conditions.pop(what, None) is None:
            return
        if what in self._logged:
            self._logged.discard(what)
            rest = ", ".join(w for w, _ in self.not_ready())
            log.info("%s: fine again; %s", what, f"still not ready: {rest}" if rest else "ready (SERVING)")
        self._bump()

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    # -- the store --------------------------------------------------------------------

    def store_failed(self, error: BaseException | str) -> None:
        """A store call found the store unreachable."""
        self.set_condition(STORE, f"the core store is unreachable: {error}")

    def store_answered(self) -> None:
        """A store call completed (whatever it answered): the store is reachable."""
        if STORE in self._conditions:
            self.clear_condition(STORE)

    # -- watching what nothing announces ------------------------------------------------

    async def watch(
        self,
        store: Store,
        links: Mapping[str, AdapterLink],
        leadership: Callable[[], Leadership],
        up: trio.Event,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Probe the store and look at the adapters and the leadership until cancelled."""
        self._sources = _Sources(links, leadership, up)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._probe, store)
                task_status.started()
                while True:
                    self.evaluate()
                    await trio.sleep(EVALUATE_INTERVAL)
        finally:
            self._sources = None

    def evaluate(self) -> None:
        """Look again at what nothing announces (also done before ``/readyz`` answers)."""
        sources = self._sources
        if sources is None:
            return
        since = self._probing_since
        if since is not None and trio.current_time() - since > PROBE_TIMEOUT:
            self.store_failed(f"no answer to a read within {PROBE_TIMEOUT:g} s")
        if not sources.up.is_set():
            return
        self.clear_condition(STARTING)
        leadership = sources.leadership()
        now = trio.current_time()
        if not leadership.acting():
            self._acting_since = None
            active = leadership.active_grpc_address
            where = f"the active bot is at {active}" if active else "no active bot is known yet"
            self.set_condition(STANDBY, f"this bot is a standby (ha:); {where}")
            self.clear_condition(ADAPTERS)  # a standby connects none, on purpose
            return
        if self._acting_since is None:
            self._acting_since = now
        self.clear_condition(STANDBY)
        links = sources.links
        if any(link.connected for link in links.values()):
            self.clear_condition(ADAPTERS)
        else:
            names = ", ".join(sorted(links)) or "none started"
            # Not ready at once, but logged only past the grace: a bot that has just
            # taken over (ha:) is connecting, which is no news.
            late = now - self._acting_since >= ADAPTER_GRACE
            self.set_condition(ADAPTERS, f"no chat adapter is connected ({names})", announce=late)

    async def _probe(self, store: Store) -> None:
        while True:
            self._probing_since = trio.current_time()
            try:
                await store.get(PROBE_NAMESPACE, PROBE_KEY)
            except StoreUnavailableError as exc:
                self.store_failed(exc)
            except StoreError:
                self.store_answered()  # it answered, if not as hoped: reachable
            else:
                self.store_answered()
            finally:
                self._probing_since = None
            await trio.sleep(PROBE_INTERVAL)


class _Sources:
    def __init__(self, links: Mapping[str, AdapterLink], leadership: Callable[[], Leadership], up: trio.Event) -> None:
        self.links = links
        self.leadership = leadership
        self.up = up
