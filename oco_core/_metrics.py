"""Metrics in Prometheus's format, and the HTTP endpoints operators' monitoring reads.

Each :class:`~._bot.Bot` has its own :class:`Metrics` with its own
``prometheus_client.CollectorRegistry``, never the library's global one: tests run
several bots in one process, and a global registry would sum them (or refuse the second
bot's metrics as duplicates).

Two kinds of metric:

- counted as things happen, by small hooks where they happen: messages received (the
  incoming path), matches (the router's matches, counted by the incoming path), messages
  sent and replies (the outgoing path), RPCs (each method of the gRPC edge is wrapped:
  :meth:`Metrics.instrument`), store calls (:class:`MeteredStore` wraps the store the
  bot uses), webhook requests (:meth:`Metrics.count_webhooks` wraps the ASGI app);
- read at scrape time from what the bot already counts (:class:`_Snapshot`): queue
  depths, connected callbacks and replicas, router overflow, the event hub's statistics,
  audit records lost, leadership, readiness.

Label values are bounded: adapters and callbacks are what the operator configured (or
registered with ``oco callbacks add``); routes are the ids callbacks declared, at most
:data:`MAX_ROUTES_PER_CALLBACK` per callback (later ones count as ``other``); never a
user id, room id, message id or path.

The endpoints (:func:`mount`) share the bot's one HTTP server: ``/metrics``,
``/healthz`` (200 while the process runs its event loop: the answer comes from it) and
``/readyz`` (200 when ready; 503 with JSON naming what is not, from :mod:`._health`).
They need no credentials, as monitoring expects: expose the HTTP port only where the
webhooks' callers and the monitoring reach it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import grpc
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from ._bridge import Method, RpcAbort
from ._errors import StoreError, StoreUnavailableError
from ._health import Health
from ._store import Item, Store
from ._version import __version__

if TYPE_CHECKING:
    from ._core import BotCore
    from ._http import App, HttpApp, Receive, Scope, Send
    from ._router import Match

log = logging.getLogger(__name__)

#: Distinct route labels kept per callback; matches and replies of later routes count
#: under ``route="other"`` (a callback that declares routes by the thousand must not
#: make thousands of series).
MAX_ROUTES_PER_CALLBACK = 50
OTHER = "other"
#: Matched messages remembered to find the route a reply answers.
_REMEMBERED_MATCHES = 10_000
#: Seconds: from a fraction of a millisecond (a cached store read, an RPC) to a few
#: seconds (a store behind a slow network).
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """One bot's metrics: counters its parts call, and what is read at scrape time."""

    def __init__(self, health: Health | None = None) -> None:
        self.registry = CollectorRegistry()
        self.health = health or Health()
        #: The running bot's parts, while it runs (scrape-time metrics read them).
        self.core: BotCore | None = None
        r = self.registry
        self.received = _Tally(r, "oco_messages_received", "Chat messages received, by adapter.", ["adapter"])
        self.sent = _Tally(r, "oco_messages_sent", "Chat messages sent, by adapter.", ["adapter"])
        self.matches = _Tally(
            r,
            "oco_matches",
            "Messages matched by a route, by callback and route (routes past the cap count as 'other').",
            ["callback", "route"],
        )
        self.replies = _Tally(
            r,
            "oco_replies",
            "Messages callbacks sent in reply to a matched message, by callback and the route that matched it "
            "('' when the message is not one the bot remembers).",
            ["callback", "route"],
        )
        self.rpc_duration = Histogram(
            "oco_rpc_duration_seconds",
            "Duration of unary gRPC calls to the bot, by service and method.",
            ["service", "method"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.rpcs = Counter(
            "oco_rpc_requests",
            "gRPC calls to the bot (streams counted when they end), by service, method and status code.",
            ["service", "method", "code"],
            registry=r,
        )
        self.store_duration = Histogram(
            "oco_store_operation_duration_seconds",
            "Duration of core store calls, by operation.",
            ["operation"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "oco_store_errors",
            "Core store calls that failed, by operation and error.",
            ["operation", "error"],
            registry=r,
        )
        self.webhooks = Counter(
            "oco_webhook_requests",
            "Webhook requests answered, by callback ('' for none configured by that name) and HTTP status.",
            ["callback", "status"],
            registry=r,
        )
        self.webhook_duration = Histogram(
            "oco_webhook_duration_seconds", "Time to answer a webhook request.", buckets=_BUCKETS, registry=r
        )
        r.register(_Snapshot(self))
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._routes: dict[str, set[str]] = {}
        self._capped: set[str] = set()
        #: message id → the (callback, route label) pairs that matched it, newest last.
        self._matched: OrderedDict[str, list[tuple[str, str]]] = OrderedDict()

    def attach(self, core: BotCore | None) -> None:
        """Read this running bot at scrape time (None: it stopped). Adapters and
        configured callbacks start at zero, so that rates exist from the first scrape."""
        self.core = core
        if core is None:
            return
        for cb in core.config.callbacks:
            for route in core.callbacks[cb.id].routes if cb.id in core.callbacks else ():
                self.matches.labels(cb.id, self._route(cb.id, route.id))

    def adapters_known(self, names: Iterable[str]) -> None:
        """Start these adapters' counters at zero."""
        for name in names:
            self.received.labels(name)
            self.sent.labels(name)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition, in the format ``accept`` asks for (Prometheus text by default)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    # -- chat ---------------------------------------------------------------------------

    def _route(self, callback_id: str, route_id: str) -> str:
        seen = self._routes.get(callback_id)
        if seen is None:
            seen = self._routes[callback_id] = set()
        elif route_id in seen:
            return route_id
        if len(seen) < MAX_ROUTES_PER_CALLBACK:
            seen.add(route_id)
            return route_id
        if callback_id not in self._capped:
            self._capped.add(callback_id)
            log.warning(
                "callback %r declared more than %d routes: metrics count the rest under route=%r",
                callback_id,
                MAX_ROUTES_PER_CALLBACK,
                OTHER,
            )
        return OTHER

    def message_received(self, adapter: str) -> None:
        """A chat message arrived through ``adapter``."""
        self.received.count((adapter,))

    def matched(self, message_id: str, matches: Sequence[Match]) -> None:
        """These routes matched message ``message_id``."""
        pairs = []
        for match in matches:
            labels = (match.callback_id, self._route(match.callback_id, match.route_id))
            self.matches.count(labels)
            pairs.append(labels)
        if pairs:
            self._matched[message_id] = pairs
            if len(self._matched) > _REMEMBERED_MATCHES:
                self._matched.popitem(last=False)

    def message_sent(self, adapter: str, callback_id: str = "", in_reply_to: str = "") -> None:
        """A message went out through ``adapter``; from a callback, in reply to a message
        (its full id) or not."""
        self.sent.count((adapter,))
        if callback_id and in_reply_to:
            route = ""
            for cb, matched in self._matched.get(in_reply_to, ()):
                if cb == callback_id:
                    route = matched
                    break
            self.replies.count((callback_id, route))

    # -- gRPC ---------------------------------------------------------------------------

    def instrument(self, table: dict[str, dict[str, Method]]) -> dict[str, dict[str, Method]]:
        """The edge's method table with each method timed and counted."""
        return {
            service: {
                name: replace(method, impl=self._timed(service, name, method)) for name, method in methods.items()
            }
            for service, methods in table.items()
        }

    def _timed(self, service: str, name: str, method: Method) -> Callable[..., Awaitable[Any]]:
        impl = method.impl
        histogram = self.rpc_duration.labels(service, name) if method.kind == "unary" else None
        rpcs = self.rpcs
        counted: dict[str, Any] = {}  # by status code: labels() is slow (see _children)

        async def timed(*args: Any) -> Any:
            code = "OK"
            started = time.perf_counter()
            try:
                return await impl(*args)
            except RpcAbort as exc:
                code = exc.code.name
                raise
            except trio.Cancelled:
                code = grpc.StatusCode.CANCELLED.name
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL.name
                raise
            finally:
                if histogram is not None:
                    histogram.observe(time.perf_counter() - started)
                counter = counted.get(code)
                if counter is None:
                    counter = counted[code] = rpcs.labels(service, name, code)
                counter.inc()

        return timed

    # -- HTTP ---------------------------------------------------------------------------

    def count_webhooks(self, app: App, prefix: str) -> App:
        """``app`` (mounted at ``prefix``), its answers counted by status."""

        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            status = 0

            async def watch(message: dict[str, Any] | Any) -> None:
                nonlocal status
                if message.get("type") == "http.response.start":
                    status = int(message["status"])
                await send(message)

            started = time.perf_counter()
            try:
                await app(scope, receive, watch)
            finally:
                if status:  # a client that went away before any answer is not counted
                    callback_id = str(scope.get("path", ""))[len(prefix) + 1 :].partition("/")[0]
                    core = self.core
                    known = core is not None and any(cb.id == callback_id for cb in core.config.callbacks)
                    self.webhooks.labels(callback_id if known else "", str(status)).inc()
                    self.webhook_duration.observe(time.perf_counter() - started)

        return counted


class _Tally:
    """A labelled prometheus Counter for the message path: :meth:`count` adds one to a
    plain int by label values, and reading the counter (a scrape, ``collect``) adds
    what was counted since to the Counter first, so every reader sees the same numbers
    as if each had been an ``inc``. An ``inc`` checks, locks and calls three layers
    down (about 1 µs), four times a message; a count is a dict update. The Counter
    (unregistered: this is what the registry collects) formats the samples, so
    /metrics reads as before, ``_created`` included: a series is made at its first
    count, as ``inc`` made it."""

    def __init__(self, registry: CollectorRegistry, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.counter = Counter(name, documentation, labels, registry=None)
        #: Counts by label values, never reset: only the thread counting (the bot's trio
        #: thread) writes them, so a scrape from another thread loses nothing.
        self._counts: dict[tuple[str, ...], int] = {}
        #: What :meth:`collect` has added to the Counter so far, by label values.
        self._added: dict[tuple[str, ...], int] = {}
        self._lock = threading.Lock()  # two scrapes at once add each count once
        registry.register(self)

    def count(self, labels: tuple[str, ...]) -> None:
        """One more for these label values."""
        counts = self._counts
        count = counts.get(labels)
        if count is None:
            self.counter.labels(*labels)
            count = 0
        counts[labels] = count + 1

    def labels(self, *values: str) -> Any:
        """The Counter's child for these label values: the series exists from now on, at 0."""
        return self.counter.labels(*values)

    def describe(self) -> Iterable[Metric]:
        return self.counter.describe()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            for labels, count in list(self._counts.items()):  # one C call: atomic under the GIL
                added = self._added.get(labels, 0)
                if count != added:
                    self.counter.labels(*labels).inc(count - added)
                    self._added[labels] = count
        return self.counter.collect()


class MeteredStore(Store):
    """A store whose calls are timed, whose failures are counted, and which tells
    health whether the store answers."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.inner = store
        self._metrics = metrics
        self._health = metrics.health
        self._durations = {op: metrics.store_duration.labels(op) for op in ("get", "set", "delete", "list", "usage")}

    async def _call(self, operation: str, call: Awaitable[Any]) -> Any:
        started = time.perf_counter()
        try:
            result = await call
        except StoreUnavailableError as exc:
            self._metrics.store_errors.labels(operation, type(exc).__name__).inc()
            self._health.store_failed(exc)
            raise
        except StoreError as exc:
            self._metrics.store_errors.labels(operation, type(exc).__name__).inc()
            self._health.store_answered()
            raise
        finally:
            self._durations[operation].observe(time.perf_counter() - started)
        self._health.store_answered()
        return result

    async def get(self, namespace: str, key: str) -> Item | None:
        """See :meth:`Store.get`."""
        item: Item | None = await self._call("get", self.inner.get(namespace, key))
        return item

    async def set(self, namespace: str, key: str, value: bytes, *, expected_version: int | None = None) -> int:
        """See :meth:`Store.set`."""
        version: int = await self._call("set", self.inner.set(namespace, key, value, expected_version=expected_version))
        return version

    async def delete(self, namespace: str, key: str, *, expected_version: int | None = None) -> bool:
        """See :meth:`Store.delete`."""
        deleted: bool = await self._call("delete", self.inner.delete(namespace, key, expected_version=expected_version))
        return deleted

    async def list(
        self,
        namespace: str,
        prefix: str = "",
        *,
        start_after: str = "",
        limit: int = 100,
        keys_only: bool = False,
    ) -> list[Item]:
        """See :meth:`Store.list`."""
        items: list[Item] = await self._call(
            "list", self.inner.list(namespace, prefix, start_after=start_after, limit=limit, keys_only=keys_only)
        )
        return items

    async def usage(self, namespace: str) -> tuple[int, int] | None:
        """See :meth:`Store.usage`."""
        usage: tuple[int, int] | None = await self._call("usage", self.inner.usage(namespace))
        return usage


class _Snapshot:
    """What is read from the running bot at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        health = metrics.health
        info = GaugeMetricFamily("oco_build_info", "The running oco-core's version (always 1).", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        health.evaluate()
        yield GaugeMetricFamily(
            "oco_ready", "1 when the bot is ready (gRPC health SERVING), else 0.", int(health.ready)
        )
        not_ready = GaugeMetricFamily(
            "oco_not_ready", "1 for each reason the bot is not ready (see /readyz).", labels=["what"]
        )
        for what, _ in health.not_ready():
            not_ready.add_metric([what], 1)
        yield not_ready
        core = metrics.core
        if core is None:
            return
        yield from _leadership(core)
        yield from _adapters(core)
        yield from _streams(core)
        yield from _events(core)
        yield CounterMetricFamily(
            "oco_audit_records_lost",
            "Audit records that could not be written (the store refused or was away too long).",
            core.audit.lost,
        )


def _leadership(core: BotCore) -> Iterator[Metric]:
    leader = core.leader
    yield GaugeMetricFamily(
        "oco_leader_active",
        "1 while this bot is the active one (always, without ha:), 0 on a standby.",
        int(leader.acting()),
    )
    yield CounterMetricFamily(
        "oco_leader_takeovers", "Times this bot became the active one (ha:).", getattr(leader, "takeovers", 0)
    )
    yield CounterMetricFamily(
        "oco_leader_step_downs", "Times this bot stopped being the active one (ha:).", getattr(leader, "step_downs", 0)
    )


def _adapters(core: BotCore) -> Iterator[Metric]:
    connected = GaugeMetricFamily("oco_adapter_connected", "1 while the adapter is connected.", labels=["adapter"])
    links = core.links
    for name in sorted(links):
        connected.add_metric([name], int(links[name].connected))
    yield connected


def _streams(core: BotCore) -> Iterator[Metric]:
    replicas = GaugeMetricFamily(
        "oco_callback_replicas",
        "Open Listen streams of each callback (0 for a configured callback that is not connected).",
        labels=["callback"],
    )
    depth = GaugeMetricFamily(
        "oco_stream_queue_depth",
        "Events waiting in a Listen stream's queue; stream is the stream's place among its callback's, oldest 0.",
        labels=["callback", "stream"],
    )
    size = GaugeMetricFamily(
        "oco_stream_queue_bytes",
        "Bytes of the events waiting in a Listen stream's queue.",
        labels=["callback", "stream"],
    )
    by_callback: dict[str, int] = {cb.id: 0 for cb in core.config.callbacks}
    for sub in core.router.subscriptions():
        by_callback[sub.callback_id] = by_callback.get(sub.callback_id, 0) + 1
    for callback_id in sorted(by_callback):
        replicas.add_metric([callback_id], by_callback[callback_id])
        for index, sub in enumerate(core.router.subscriptions(callback_id)):
            depth.add_metric([callback_id, str(index)], sub.queued())
            size.add_metric([callback_id, str(index)], sub.queued_bytes)
    yield GaugeMetricFamily(
        "oco_callbacks_connected",
        "Callbacks with at least one open Listen stream.",
        sum(1 for count in by_callback.values() if count),
    )
    yield replicas
    yield depth
    yield size


def _events(core: BotCore) -> Iterator[Metric]:
    yield CounterMetricFamily(
        "oco_events_dropped",
        "Events dropped because a callback's queue was full (chat matches and other live events).",
        core.router.overflowed,
    )
    stats = core.events.stats
    durable = CounterMetricFamily(
        "oco_durable_events",
        "Durable events (webhooks, schedules, published events, durable routes) by what happened to them.",
        labels=["outcome"],
    )
    for outcome in ("kept", "delivered", "acknowledged", "redelivered", "expired", "evicted"):
        durable.add_metric([outcome], getattr(stats, outcome))
    yield durable
    yield CounterMetricFamily("oco_events_published", "Events published to topics.", stats.published)
    pending = GaugeMetricFamily(
        "oco_durable_events_pending", "Durable events waiting for a callback's acknowledgement.", labels=["callback"]
    )
    for callback_id in sorted(core.events._outboxes):
        pending.add_metric([callback_id], len(core.events._outboxes[callback_id].pending))
    yield pending


def mount(app: HttpApp, metrics: Metrics) -> None:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``app``."""
    app.mount("/metrics", _metrics_app(metrics))
    app.mount("/healthz", _healthz)
    app.mount("/readyz", _readyz_app(metrics.health))


async def _allowed(scope: Scope, send: Send) -> bool:
    from ._http import respond

    if scope.get("method") in ("GET", "HEAD"):
        return True
    await respond(send, 405, b"method not allowed: use GET\n", [("allow", "GET, HEAD")])
    return False


def _metrics_app(metrics: Metrics) -> App:
    from ._http import respond

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        if not await _allowed(scope, send):
            return
        accept = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"accept"), "")
        body, content_type = metrics.render(accept)
        await respond(send, 200, b"" if scope["method"] == "HEAD" else body, content_type=content_type)

    return serve


async def _healthz(scope: Scope, receive: Receive, send: Send) -> None:
    from ._http import respond

    if await _allowed(scope, send):
        await respond(send, 200, b"ok\n")


def _readyz_app(health: Health) -> App:
    from ._http import respond

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        if not await _allowed(scope, send):
            return
        health.evaluate()
        await respond(send, 200 if health.ready else 503, health.report(), content_type="application/json")

    return serve
