"""The bot: checks a config against the installed plugins, then wires and runs the parts.

Start-up order, each step ready before the next: the store opens; the directory,
authorization and audit log load (:meth:`Bot.open` yields them as a
:class:`~._core.BotCore`); the gRPC server binds, then the HTTP server (with
``http:``); launched callbacks start and the bot
waits (a bounded time) for each to open its Listen stream, so that the first chat
message finds their routes; then the adapters connect. Shutdown (SIGINT, SIGTERM, or
every adapter ending) runs the other way, in the one nursery: adapters stop, callbacks
get TERM then KILL, the gRPC server gives running calls a grace period, the directory
flushes, and the store closes.

Where the rest lives: incoming messages and the adapters' host in :mod:`._incoming`,
the bot's own chat commands and help in :mod:`._commands`, the permission gate in
:mod:`._policy`, outgoing messages in :mod:`._outgoing`, the gRPC edge in :mod:`._edge`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING

import trio

from ._adapter import AdapterType
from ._admin import configured_adapters, configured_store
from ._audit import AuditLog
from ._auth import Authorization
from ._config import CallbackSettings, LoadedConfig, launch_problem, validate_section
from ._core import BotCore, BotStatistics, CallbackState
from ._datastores import configured_datastores, missing_hint, open_datastores
from ._directory import Directory
from ._edge import Services, serve
from ._errors import AdapterError, ConfigError, StoreUnavailableError
from ._events import EventHub
from ._incoming import AdapterLink
from ._leader import Leader, Solo, advertised, unshared_store_problem
from ._metrics import MeteredStore, Metrics
from ._plugins import Plugins
from ._policy import matches_any
from ._quota import QuotaStore
from ._router import InvalidPatternError, PatternLimits, Route, Router, compile_pattern
from ._schedules import run_schedules
from ._secrets import check_store_secrets, expects_store_secret, generate_secret
from ._store import Store
from ._supervisor import supervise_callback
from ._timing import Backoff
from ._tls import load_server_tls

if TYPE_CHECKING:
    from ._http import HttpApp
    from ._webhooks import Webhooks

log = logging.getLogger(__name__)


class Bot:
    """One OCO bot. Create it from a loaded config and the installed plugins (which
    checks every section), then ``await bot.run()`` (or ``nursery.start(bot.run)``,
    which returns the gRPC address)."""

    def __init__(self, loaded: LoadedConfig, plugins: Plugins) -> None:
        self.loaded = loaded
        config = loaded.config
        self.config = config
        self.router = Router(
            config.bot.name,
            config.bot.aliases,
            PatternLimits(
                config.grpc.max_pattern_length, config.grpc.max_pattern_program, config.grpc.max_total_pattern_program
            ),
        )
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
        # Validate every plugin section now, so `oco check-config` and start-up fail early.
        #: The adapters this bot runs: the config's, or the installed default.
        self.adapter_entries = configured_adapters(loaded, plugins)
        self._adapter_specs: list[tuple[str, AdapterType, object]] = []
        for index, entry in enumerate(self.adapter_entries):
            try:
                kind = plugins.adapter(entry.type)
            except ConfigError as exc:
                raise loaded.error(("adapters", index, "type"), str(exc)) from None
            options = validate_section(loaded, ("adapters", index), kind.config_model, entry.options())
            self._adapter_specs.append((entry.instance_name, kind, options))
        self._store_type, self._store_options = configured_store(loaded, plugins)
        if config.ha is not None:
            unshared = unshared_store_problem(self._store_type.name, self._store_options)
            if unshared is not None:
                raise loaded.error(("ha",), unshared)
        #: Whether this bot is the active one (``ha:``; without it, always).
        self.leader: Leader | Solo = Solo()
        offered = [kind.name for kind, _ in configured_datastores(loaded, plugins)]  # opened by open()
        for cb_index, cb in enumerate(config.callbacks):
            for r_index, datastore in enumerate(cb.requires):
                where = ("callbacks", cb_index, "requires", r_index)
                if datastore not in offered:
                    raise loaded.error(where, missing_hint(datastore, offered))
                if not matches_any(datastore, cb.capabilities.datastores):
                    raise loaded.error(
                        where,
                        f"callback {cb.id!r} requires {datastore!r}, but its capabilities.datastores "
                        f"({', '.join(cb.capabilities.datastores) or 'none'}) do not allow it",
                    )
        self._plugins = plugins
        adapter_names = [entry.instance_name for entry in self.adapter_entries]
        for index, admin in enumerate(config.auth.admins):
            if admin.partition("/")[0] not in adapter_names:
                raise loaded.error(
                    ("auth", "admins", index),
                    f"{admin!r} names no configured adapter (ids start with one of: {', '.join(adapter_names)})",
                )
        for cb_index, cb in enumerate(config.callbacks):
            for r_index, route in enumerate(self.callbacks[cb.id].routes):
                try:
                    compile_pattern(route.pattern, route.ignore_case, self.router.limits)
                except InvalidPatternError as exc:
                    raise loaded.error(("callbacks", cb_index, "routes", r_index, "pattern"), str(exc)) from None
        #: Launched callbacks this machine could not start now (a program not found, a
        #: missing cwd). Not a refusal: the bot's PATH when it runs as a service may
        #: differ from the shell's, and a program may appear after start-up, so
        #: `oco run` logs them and its supervisor tries anyway; `oco check-config`
        #: refuses them.
        self.launch_problems: list[ConfigError] = []
        for cb_index, cb in enumerate(config.callbacks):
            problem = launch_problem(cb)
            if problem is not None:
                key, message = problem
                self.launch_problems.append(loaded.error(("callbacks", cb_index, key), message))
        self.address = ""
        #: The HTTP server's address once it listens ("" without ``http:``), and the
        #: application it serves (mount more on it with ``http_app.mount``).
        self.http_address = ""
        self.http_app: HttpApp | None = None
        self._core: BotCore | None = None
        self._shutdown: trio.CancelScope | None = None
        #: The election's scope (ha:): a shutdown ends it first, releasing the lease.
        self._leading: trio.CancelScope | None = None
        self._starting: trio.CancelScope | None = None
        self._stats = BotStatistics()
        #: Its Prometheus metrics (its own registry) and health (why it is not ready).
        self.metrics = Metrics()
        self.health = self.metrics.health
        # What a reload (_reload.py) reaches into: the gRPC services (their
        # Authenticator), the webhooks, and each launched callback and adapter as a task
        # it can stop alone, in the nurseries that run them.
        self.up = trio.Event()
        self.services: Services | None = None
        self.webhooks: Webhooks | None = None
        self.launched: dict[str, StoppableTask] = {}
        self.adapter_tasks: dict[str, StoppableTask] = {}
        self._workers: trio.Nursery | None = None
        self._adapters: trio.Nursery | None = None

    @property
    def core(self) -> BotCore:
        """The running bot's parts (store, directory, auth, audit, adapters); a
        RuntimeError before :meth:`open` has opened them or after the bot stopped."""
        if self._core is None:
            raise RuntimeError("the bot is not running: its store, directory and adapters exist only inside Bot.open()")
        return self._core

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
        self.health.set_condition("stopping", "the bot is shutting down")
        if self._leading is not None:
            # Step down and release the lease first (shielded, briefly: Leader.run), so a
            # standby takes chat over while this bot's adapters and callbacks still stop.
            self._leading.cancel()
        if self._shutdown is not None:
            core = self._core
            if core is not None and core.conversations.open_count():
                # People waiting to answer a callback's question are told first, while
                # the adapters still run (briefly: then it stops all the same).
                core.spawn(partial(self._tell_then_stop, core, self._shutdown))
            else:
                self._shutdown.cancel()
        elif self._starting is not None:
            self._starting.cancel()

    @staticmethod
    async def _tell_then_stop(core: BotCore, shutdown: trio.CancelScope) -> None:
        with trio.move_on_after(3):
            await core.conversations.stop()
        shutdown.cancel()

    # -- opening the parts -------------------------------------------------------------

    @asynccontextmanager
    async def open(self) -> AsyncIterator[BotCore]:
        """Open the store (waiting for it while it is down), the directory,
        authorization and audit log, run their background tasks, and yield them as a
        :class:`BotCore`; on exit the tasks stop and the store closes."""
        config = self.config
        async with AsyncExitStack() as stack:
            store = QuotaStore.for_callbacks(
                MeteredStore(await self._open_store(stack), self.metrics),
                config.store.quota,
                {cb.id: cb.quota for cb in config.callbacks if cb.quota is not None},
            )
            await check_store_secrets(store, config.callbacks)
            directory = Directory(store)
            await directory.load()
            auth = Authorization(store, config.auth)
            await auth.load()
            audit = AuditLog(store, config.auth.audit.retention_days, config.auth.audit.max_pending)
            datastores = await stack.enter_async_context(
                open_datastores(self.loaded, self._plugins, store, audit.record)
            )
            if config.ha is not None:
                self.leader = Leader(store, config.ha)  # runs once the servers listen (_serve)
            tasks = await stack.enter_async_context(trio.open_nursery())
            await tasks.start(directory.run)
            await tasks.start(audit.run)
            await tasks.start(auth.run)
            await tasks.start(self.router.maintain)
            events = EventHub(config, store, self.router, tasks.start_soon)
            events.leader = self.leader
            await tasks.start(events.run)
            core = BotCore(
                config=config,
                router=self.router,
                callbacks=self.callbacks,
                store=store,
                directory=directory,
                auth=auth,
                audit=audit,
                datastores=datastores,
                tasks=tasks,
                stats=self._stats,
                events=events,
                metrics=self.metrics,
            )
            core.leader = self.leader
            await tasks.start(core.activity.run)  # counts by minute, for the console
            self._core = core
            self.metrics.attach(core)
            try:
                yield core
            finally:
                self.metrics.attach(None)
                self._core = None
                tasks.cancel_scope.cancel()

    async def _open_store(self, stack: AsyncExitStack) -> Store:
        # A database that is down at start-up is waited for, with one line a try, rather
        # than failing the bot: it usually comes up beside it (systemd, Kubernetes).
        backoff = Backoff(1.0, 30.0, jitter=0)  # no jitter: the log line names the next try
        while True:
            try:
                return await stack.enter_async_context(self._store_type.open(self._store_options))
            except StoreUnavailableError as exc:
                delay = backoff.next_delay()
                log.error("store unavailable: %s; retrying in %.0f s", exc, delay)
            await trio.sleep(delay)

    # -- running -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled or until every adapter has ended."""
        try:
            with trio.CancelScope() as self._starting:
                async with self.open() as core:
                    await self._serve(core, task_status)
        finally:
            stats = self.statistics()
            log.info(
                "bot stopped: %d message(s) received, %d match(es) delivered, %d message(s) sent, %d event(s) dropped",
                stats.received,
                stats.matched,
                stats.sent,
                stats.dropped,
            )

    async def _serve(self, core: BotCore, task_status: trio.TaskStatus[str]) -> None:
        tls = await trio.to_thread.run_sync(load_server_tls, self.loaded)
        async with trio.open_nursery() as nursery:
            self.metrics.adapters_known(name for name, _, _ in self._adapter_specs)
            await nursery.start(self.health.watch, core.store, core.links, lambda: core.leader, self.up)
            self.services = Services(core, self.config.grpc)
            self.address = await nursery.start(partial(serve, core, self.config.grpc, tls, services=self.services))
            # Schedules fire through the hub into the store; callbacks get them once connected.
            await nursery.start(self._while_active, partial(run_schedules, core.events, core.store))
            if self.config.http is not None:
                self.http_address = await nursery.start(self._serve_http, core)
            if isinstance(self.leader, Leader):
                assert self.config.ha is not None
                self.leader.grpc_address = advertised(self.address, self.config.ha.advertise_grpc)
                if self.http_address:
                    self.leader.http_address = advertised(self.http_address, self.config.ha.advertise_http)
            with trio.CancelScope() as self._shutdown:
                async with trio.open_nursery() as workers:
                    self._workers = workers
                    for cb in self.config.callbacks:
                        if cb.command is not None:
                            self.start_callback(cb)
                    await self._wait_for_callbacks()
                    if isinstance(self.leader, Leader):
                        # Only now: a standby that took over before its callbacks are
                        # connected would answer nothing.
                        await nursery.start(self._lead, self.leader)
                    await self._run_adapters(core, task_status)
                    log.info("every adapter has ended; shutting down")
                    workers.cancel_scope.cancel()
            nursery.cancel_scope.cancel()

    async def _lead(self, leader: Leader, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self._leading:
            await leader.run(task_status=task_status)

    async def _run_adapters(self, core: BotCore, task_status: trio.TaskStatus[str]) -> None:
        # Only the active bot connects to chat (ha:): a standby waits here, up and serving
        # gRPC; an active bot that steps down disconnects its adapters and waits again.
        started = False
        while True:
            if not self.leader.acting():
                if not started:
                    started = True
                    log.info("bot %r is up as a standby (ha:): gRPC on %s", self.config.bot.name, self.address)
                    self.up.set()
                    task_status.started(self.address)
                await self.leader.wait_active()
            with trio.CancelScope() as standing_down:
                async with trio.open_nursery() as guard:
                    guard.start_soon(self._stand_down_on, standing_down)
                    async with trio.open_nursery() as adapters:
                        self._adapters = adapters
                        # Adapters connect side by side; one whose server is down holds
                        # back neither the others nor start-up for longer than the wait.
                        attempts = {
                            name: self.start_adapter(core, name, kind, options)
                            for name, kind, options in self._adapter_specs
                        }
                        with trio.move_on_after(self.config.bot.adapter_startup_wait):
                            for attempt in attempts.values():
                                await attempt.wait()
                        slow = [name for name, attempt in attempts.items() if not attempt.is_set()]
                        if slow:
                            log.warning("adapter(s) %s still connecting; the bot is up meanwhile", ", ".join(slow))
                        if not started:
                            started = True
                            log.info("bot %r is up: gRPC on %s", self.config.bot.name, self.address)
                            self.up.set()
                            task_status.started(self.address)
                    self._adapters = None
                    guard.cancel_scope.cancel()
            if not standing_down.cancelled_caught:
                return  # every adapter ended: the bot stops
            self._adapters = None
            self.adapter_tasks.clear()
            core.links.clear()
            log.info("adapters disconnected: this bot stands by")

    async def _stand_down_on(self, scope: trio.CancelScope) -> None:
        await self.leader.wait_stepped_down()
        scope.cancel()

    async def _while_active(
        self, fn: Callable[..., Awaitable[object]], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run ``fn`` (started with ``task_status``) whenever this bot is the active one
        (always, without ``ha:``), cancelling it when the bot steps down."""
        task_status.started()
        while True:
            await self.leader.wait_active()
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._stand_down_on, scope)
                    await nursery.start(fn)

    async def _serve_http(self, core: BotCore, *, task_status: trio.TaskStatus[str]) -> None:
        # Imported here: a bot without http: never loads Hypercorn.
        from ._http import HttpApp, load_http_tls, serve_http
        from ._metrics import mount as mount_monitoring
        from ._webhooks import PREFIX, Webhooks

        settings = self.config.http
        assert settings is not None
        tls = await trio.to_thread.run_sync(load_http_tls, self.loaded)
        self.http_app = HttpApp()
        webhooks = self.webhooks = Webhooks(core)
        self.http_app.mount(PREFIX, self.metrics.count_webhooks(webhooks, PREFIX))
        mount_monitoring(self.http_app, self.metrics)  # /metrics, /healthz, /readyz
        if self.config.console is not None:
            from ._console import mount as mount_console

            mount_console(self.http_app, self, core, secure=tls is not None)
        webhooks.warn_unverified()
        async with trio.open_nursery() as nursery:
            address = await nursery.start(serve_http, self.http_app, settings, tls)
            log.info("HTTP on %s://%s (webhooks at %s/<callback id>/...)", "https" if tls else "http", address, PREFIX)
            task_status.started(address)

    def start_callback(self, cb: CallbackSettings) -> None:
        """Launch and supervise the configured callback ``cb`` (one with ``command:``),
        as a task :attr:`launched` can stop alone: at start-up, and when a reload adds or
        changes it."""
        assert self._workers is not None
        assert cb.command is not None
        state = self.callbacks[cb.id]
        task = self.launched[cb.id] = StoppableTask()
        self._workers.start_soon(
            task.run,
            partial(
                supervise_callback,
                cb,
                self.address,
                state.secret,
                cb.cwd,
                state.process_exited,
                self.config.grpc.tls,
                partial(setattr, state, "given_up"),
                state.restarting,
            ),
        )

    def start_adapter(self, core: BotCore, name: str, kind: AdapterType, options: object) -> trio.Event:
        """Create adapter ``name`` and supervise it as a task :attr:`adapter_tasks` can
        stop alone; the event is set once its first connection attempt is over."""
        assert self._adapters is not None
        link = core.links[name] = AdapterLink(core, name, kind.create(options), core.store)
        attempted = trio.Event()
        task = self.adapter_tasks[name] = StoppableTask()
        self._adapters.start_soon(task.run, partial(self._supervise_adapter, link, attempted))
        return attempted

    @asynccontextmanager
    async def holding_adapters(self) -> AsyncIterator[bool]:
        """While a reload stops and starts adapters: the adapters' nursery stays open
        even when the last one stops (ending it ends the bot). Yields False when the
        adapters are not running (still starting, or every one has ended)."""
        adapters = self._adapters
        if adapters is None:
            yield False
            return
        release = trio.Event()
        adapters.start_soon(release.wait)
        try:
            yield True
        finally:
            release.set()

    async def _wait_for_callbacks(self) -> None:
        launched = [cb for cb in self.callbacks.values() if cb.launched]
        wait = self.config.bot.callback_startup_wait
        with trio.move_on_after(wait):
            for cb in launched:
                await _first(cb.connected, cb.exited)
        late = [cb.id for cb in launched if not cb.connected.is_set()]
        if late:
            log.warning(
                "callback(s) %s did not open a Listen stream (exited, or not within %.0f s, "
                "bot.callback_startup_wait); starting the adapters anyway",
                ", ".join(late),
                wait,
            )

    async def _supervise_adapter(self, link: AdapterLink, attempted: trio.Event) -> None:
        # The supervision boundary for adapters: a failure is logged and retried with
        # backoff; returning normally means the adapter is done (the shell at end of input).
        backoff = Backoff(1.0, 60.0, healthy_after=60.0)
        while True:
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(partial(link.adapter.run, link))
                    link.running = True  # connected, as far as health can tell
                    attempted.set()
                log.info("adapter %r ended", link.name)
                link.ended = True
                return
            except* Exception as group:
                for exc in group.exceptions:
                    # An AdapterError's message says what is wrong (it was raised on
                    # purpose); a traceback is for the unexpected.
                    trace = None if isinstance(exc, AdapterError) else exc
                    log.error("adapter %r failed: %s: %s", link.name, type(exc).__name__, exc, exc_info=trace)
                    link.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                link.running = False
            attempted.set()
            delay = backoff.next_delay()
            log.info("restarting adapter %r in %.1f s", link.name, delay)
            await trio.sleep(delay)


class StoppableTask:
    """A task in a nursery that can be stopped alone, waiting until it has ended (its
    cancellation, such as a callback's TERM then KILL, done)."""

    def __init__(self) -> None:
        self._scope = trio.CancelScope()
        self._done = trio.Event()

    async def run(self, fn: Callable[[], Awaitable[object]]) -> None:
        """Run ``fn`` until it returns or :meth:`stop` is called."""
        try:
            with self._scope:
                await fn()
        finally:
            self._done.set()

    @property
    def ended(self) -> bool:
        """Whether it has ended (stopped, or returned: a callback given up on)."""
        return self._done.is_set()

    async def stop(self) -> None:
        """Cancel it and wait until it has ended."""
        self._scope.cancel()
        await self._done.wait()


async def _first(*events: trio.Event) -> None:
    """Wait until any of ``events`` is set."""
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)
