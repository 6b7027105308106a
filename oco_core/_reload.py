"""Live reload: read the config again and apply what changed to the running bot.

SIGHUP to ``oco run`` (or ``oco reload``, which sends it) re-reads the config file and
its plugins, checks the new config as ``oco check-config`` does, and applies only the
difference, so chat connections and Listen streams nothing touches stay open:

- callbacks added (launched if they have ``command:``), removed (stopped; their streams
  end: a dial-in callback's within :data:`~._secrets.CACHE_SECONDS`, when the Listen
  recheck finds its secret gone), changed: a launched one is restarted only when how
  it is started changed (:data:`LAUNCH_KEYS`); its secret, routes, capabilities, route
  rules, rate limit, quota, schedules and webhook verification apply in place;
- ``auth`` (admins, roles, default roles, rate limit, link timeout), ``log_level`` and
  the ``bot`` keys read as the bot runs;
- adapters added, removed or changed: only those connect again.

Everything else (``grpc``, ``http``, ``store``, ``datastores``, ``events``,
``bot.name``, ``auth.audit``, ...) keeps its running value, with one WARNING naming
each key that differs: a restart applies it. A config that fails its checks changes
nothing: one ERROR says why, with the message ``oco check-config`` gives. A reload that
fails while applying a checked config (an adapter plugin that raises, say) keeps the
steps it already applied, and its ERROR and ``oco reload`` name them; the bot goes on
naming the old config as its own until a reload succeeds.

How ``oco reload`` reaches the bot: a signal, SIGHUP, to the process id ``oco run``
writes to its pid file (``pid_file``, by default beside ``grpc.address_file``). The
operating system is the authentication (only the bot's user, or root, may signal it),
nothing listens on a socket, and ``systemctl reload`` (``ExecReload=kill -HUP
$MAINPID``) and Kubernetes do the same. A signal carries no answer, so the bot writes
each reload's outcome to a status file beside the pid file (:func:`status_path`):
``oco reload`` waits for the next generation there and prints it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from pydantic import BaseModel

from ._config import Config, LoadedConfig
from ._errors import ConfigError, OcoError
from ._quota import QuotaStore
from ._router import InvalidPatternError, Route
from ._secrets import Authenticator

if TYPE_CHECKING:
    from ._bot import Bot
    from ._core import BotCore
    from ._plugins import Plugins

log = logging.getLogger(__name__)

#: Top-level keys a reload applies (below them, :data:`RESTART_KEYS` do not).
LIVE_KEYS = frozenset({"adapters", "callbacks", "auth", "log_level", "bot"})
#: Keys below the live ones that only a restart applies.
RESTART_KEYS = {"bot": ("name", "aliases"), "auth": ("audit",)}
#: A launched callback whose value of one of these changes is restarted.
LAUNCH_KEYS = ("command", "env", "inherit_env", "cwd", "tls_cert", "tls_key")
#: Read by a callback's supervisor once, when it starts: they apply at its next start.
SUPERVISOR_KEYS = ("restart_backoff_max", "give_up_after", "output_lines_per_second")
#: Seconds `oco reload` waits for the bot to say how the reload went.
REPLY_TIMEOUT = 60.0


@dataclass
class Change:
    """What differs between the running config and the new one."""

    callbacks_added: list[str] = field(default_factory=list)
    callbacks_removed: list[str] = field(default_factory=list)
    callbacks_changed: list[str] = field(default_factory=list)
    #: Changed launched callbacks whose process starts again.
    callbacks_restarted: list[str] = field(default_factory=list)
    adapters_added: list[str] = field(default_factory=list)
    adapters_removed: list[str] = field(default_factory=list)
    adapters_changed: list[str] = field(default_factory=list)
    auth: bool = False
    bot: bool = False
    log_level: str | None = None
    #: Keys (dotted) that differ and that only a restart applies.
    restart_only: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: ``callbacks +a -b ~c; adapters ~irc; auth; log level DEBUG``."""
        parts = []
        for what, added, removed, changed in (
            ("callbacks", self.callbacks_added, self.callbacks_removed, self.callbacks_changed),
            ("adapters", self.adapters_added, self.adapters_removed, self.adapters_changed),
        ):
            marks = [f"+{n}" for n in added] + [f"-{n}" for n in removed] + [f"~{n}" for n in changed]
            if marks:
                parts.append(f"{what} {' '.join(marks)}")
        if self.callbacks_restarted:
            parts.append(f"restarted {' '.join(self.callbacks_restarted)}")
        if self.auth:
            parts.append("auth")
        if self.bot:
            parts.append("bot")
        if self.log_level is not None:
            parts.append(f"log level {self.log_level.upper()}")
        return "; ".join(parts) or "nothing changed"


def differences(old: Any, new: Any, where: str) -> list[str]:
    """The dotted keys below ``where`` whose values differ (a whole list or mapping
    counts as one key)."""
    if old == new:
        return []
    if isinstance(old, BaseModel) and type(old) is type(new):
        found = []
        for name in type(old).model_fields:
            found += differences(getattr(old, name), getattr(new, name), f"{where}.{name}")
        extra_old, extra_new = old.model_extra or {}, new.model_extra or {}
        for name in sorted(set(extra_old) | set(extra_new)):
            if extra_old.get(name) != extra_new.get(name):
                found.append(f"{where}.{name}")
        return found or [where]
    return [where]


def diff(old: Config, new: Config, old_adapters: Sequence[Any], new_adapters: Sequence[Any]) -> Change:
    """What a reload from ``old`` to ``new`` changes; ``*_adapters`` are the
    :class:`~._config.AdapterEntry` lists each runs (the default one when none is named)."""
    change = Change()
    for key in type(old).model_fields:
        if key not in LIVE_KEYS:
            change.restart_only += differences(getattr(old, key), getattr(new, key), key)
    for key, below in RESTART_KEYS.items():
        for name in below:
            change.restart_only += differences(
                getattr(getattr(old, key), name), getattr(getattr(new, key), name), f"{key}.{name}"
            )
    before = {cb.id: cb for cb in old.callbacks}
    after = {cb.id: cb for cb in new.callbacks}
    change.callbacks_added = [cid for cid in after if cid not in before]
    change.callbacks_removed = [cid for cid in before if cid not in after]
    for cid, cb in after.items():
        was = before.get(cid)
        if was is None or was == cb:
            continue
        change.callbacks_changed.append(cid)
        launched = cb.command is not None or was.command is not None
        if launched and any(getattr(was, k) != getattr(cb, k) for k in LAUNCH_KEYS):
            if cb.command is not None:
                change.callbacks_restarted.append(cid)
        elif cb.command is not None:
            change.restart_only += [
                f"callbacks[{cid}].{k}" for k in SUPERVISOR_KEYS if getattr(was, k) != getattr(cb, k)
            ]
    olds = {entry.instance_name: entry for entry in old_adapters}
    news = {entry.instance_name: entry for entry in new_adapters}
    change.adapters_added = [name for name in news if name not in olds]
    change.adapters_removed = [name for name in olds if name not in news]
    change.adapters_changed = [
        name
        for name, entry in news.items()
        if name in olds and (olds[name].type, olds[name].options()) != (entry.type, entry.options())
    ]
    change.auth = old.auth.model_copy(update={"audit": new.auth.audit}) != new.auth
    change.bot = old.bot.model_copy(update={"name": new.bot.name, "aliases": new.bot.aliases}) != new.bot
    if old.log_level.upper() != new.log_level.upper():
        change.log_level = new.log_level
    return change


def effective(old: Config, new: Config) -> Config:
    """``new``, with what only a restart applies kept at its running (``old``) value."""
    update: dict[str, Any] = {key: getattr(old, key) for key in type(old).model_fields if key not in LIVE_KEYS}
    update["bot"] = new.bot.model_copy(update={name: getattr(old.bot, name) for name in RESTART_KEYS["bot"]})
    update["auth"] = new.auth.model_copy(update={name: getattr(old.auth, name) for name in RESTART_KEYS["auth"]})
    return new.model_copy(update=update)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one reload went."""

    ok: bool
    #: What changed (:meth:`Change.summary`), or why nothing did.
    message: str
    #: Keys that differ and that only a restart applies: `oco reload` names them, or a
    #: change of one (console: among them) would read "nothing changed".
    restart_only: tuple[str, ...] = ()


class Reloader:
    """Reloads a running bot, one reload at a time.

    ``read`` reads the config again (as ``oco run`` read it, its command-line overrides
    applied); ``load_plugins`` finds the installed plugins again. Both run in a worker
    thread. ``status_file``, if given, gets each outcome for ``oco reload``.
    """

    def __init__(
        self,
        bot: Bot,
        read: Callable[[], LoadedConfig],
        load_plugins: Callable[[], Plugins],
        *,
        debug: bool = False,
        status_file: Path | None = None,
    ) -> None:
        self._bot = bot
        self._read = read
        self._load_plugins = load_plugins
        self._debug = debug
        self._status_file = status_file
        self._lock = trio.Lock()
        self.generation = 0

    def started(self) -> None:
        """Write the status file's generation 0 (the bot runs; no reload yet)."""
        self._write_status(Outcome(True, "started"))

    async def reload(self) -> Outcome:
        """Read the config again and apply what changed (once the bot is up)."""
        async with self._lock:
            await self._bot.up.wait()
            try:
                outcome = await self._reload()
            except PartlyAppliedError as exc:
                log.error("reload failed part-way: %s", exc, exc_info=exc.__cause__)
                outcome = Outcome(False, str(exc))
            except OcoError as exc:
                log.error("reload refused, nothing changed: %s", exc)
                outcome = Outcome(False, str(exc))
            except Exception as exc:  # the boundary: a failed reload must not stop the bot
                log.exception("reload failed: %s: %s", type(exc).__name__, exc)
                outcome = Outcome(False, f"the reload failed ({type(exc).__name__}: {exc}); see the bot's log")
            self.generation += 1
            self._write_status(outcome)
            return outcome

    async def _reload(self) -> Outcome:
        from ._bot import Bot

        def prepare() -> tuple[LoadedConfig, Plugins]:
            return self._read(), self._load_plugins()

        loaded, plugins = await trio.to_thread.run_sync(prepare)
        bot = self._bot
        candidate = Bot(loaded, plugins)  # every check `oco check-config` makes of the file
        if not candidate.adapter_entries:
            raise ConfigError(
                f"{loaded.source}: adapters: a reload cannot remove every adapter (the bot stops when none "
                "runs); stop the bot instead"
            )
        for problem in candidate.launch_problems:
            log.error("%s (the bot keeps trying to launch it)", problem)
        change = diff(bot.config, loaded.config, bot.adapter_entries, candidate.adapter_entries)
        if change.restart_only:
            log.warning(
                "reload: %s cannot change while the bot runs; each keeps its running value until a restart applies it",
                ", ".join(change.restart_only),
            )
        await _apply(bot, candidate, effective(bot.config, loaded.config), loaded, change, self._debug)
        summary = change.summary()
        log.info("reloaded: %s", summary)
        return Outcome(True, summary, tuple(change.restart_only))

    def _write_status(self, outcome: Outcome) -> None:
        if self._status_file is None:
            return
        record = {
            "pid": os.getpid(),
            "generation": self.generation,
            "ok": outcome.ok,
            "message": outcome.message,
            "restart_only": list(outcome.restart_only),
        }
        try:
            _write_atomically(self._status_file, json.dumps(record) + "\n")
        except OSError as exc:
            log.warning("could not write the reload status file %s: %s", self._status_file, exc)


class PartlyAppliedError(Exception):
    """A reload failed after some of its steps were applied; the message names them."""


async def _apply(bot: Bot, candidate: Bot, config: Config, loaded: LoadedConfig, change: Change, debug: bool) -> None:
    """Make the running bot run ``config`` (checked as ``candidate``), step by step; the
    config objects change last, once every step is done (PartlyAppliedError, naming the
    steps applied, when one fails after others ran: the bot then runs a mix, which a
    further reload or a restart mends; undoing the steps could fail as well)."""
    core = bot.core
    old = bot.config
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []
    if change.log_level is not None and not debug:  # --debug keeps the bot at DEBUG

        async def log_level() -> None:
            logging.getLogger().setLevel(getattr(logging, config.log_level.upper()))

        steps.append(("log level", log_level))
    if change.auth:

        async def auth() -> None:
            core.policies.set_rate_limit(config.auth.rate_limit)
            core.auth.reconfigure(config.auth)

        steps.append(("auth", auth))
    if change.callbacks_added or change.callbacks_removed or change.callbacks_changed:
        steps.append(("callbacks", lambda: _apply_callbacks(bot, core, candidate, old, config, change)))
    if change.adapters_added or change.adapters_removed or change.adapters_changed:
        steps.append(("adapters", lambda: _apply_adapters(bot, core, candidate, change)))
    done: list[str] = []
    for name, step in steps:
        try:
            await step()
        except Exception as exc:
            if not done:
                raise
            rest = [n for n, _ in steps[len(done) + 1 :]]
            raise PartlyAppliedError(
                f"the reload failed while applying {name} ({type(exc).__name__}: {exc}) after applying "
                f"{', '.join(done)}; not applied: {', '.join([*rest, 'the other keys'])}. The bot runs a mix of "
                "both configs: fix the cause and reload again, or restart it; see the bot's log"
            ) from exc
        done.append(name)
    bot.config = core.config = config
    bot.loaded = LoadedConfig(config, loaded.source, loaded.lines)


async def _apply_callbacks(bot: Bot, core: BotCore, candidate: Bot, old: Config, new: Config, change: Change) -> None:
    after = {cb.id: cb for cb in new.callbacks}
    # Processes first: a removed or restarted one stops (TERM, then KILL) before its
    # successor starts, so two never run at once.
    stopping = [
        cid
        for cid in change.callbacks_removed + change.callbacks_changed
        if cid in bot.launched and (cid not in after or cid in change.callbacks_restarted or after[cid].command is None)
    ]
    async with trio.open_nursery() as nursery:
        for cid in stopping:
            nursery.start_soon(bot.launched.pop(cid).stop)
    for cid in change.callbacks_removed:
        core.callbacks.pop(cid, None)
        core.policies.reconfigure(cid, None)
    routes_changed: dict[str, list[Route]] = {}
    for cid in change.callbacks_added + change.callbacks_changed:
        fresh = candidate.callbacks[cid]
        state = core.callbacks.get(cid)
        if state is None:
            core.callbacks[cid] = fresh
        else:
            if not (state.launched and fresh.launched):  # a launched one keeps its secret
                state.secret = fresh.secret
            if state.routes != fresh.routes:
                routes_changed[cid] = state.routes
                state.routes = fresh.routes
            state.launched = fresh.launched
            state.given_up = None
    # The Authenticator maps secrets to callbacks: a new one knows the new secrets, and
    # the Listen recheck ends streams whose secret it no longer knows.
    if bot.services is not None:
        bot.services.auth = Authenticator(dict(core.secrets()), core.store)
    index = {cb.id: i for i, cb in enumerate(new.callbacks)}
    for cid in change.callbacks_added + change.callbacks_changed:
        core.policies.reconfigure(cid, after[cid], f"callbacks[{index[cid]}] ({cid})")
    for cid, old_routes in routes_changed.items():
        _reroute(core, cid, old_routes, core.callbacks[cid].routes)
    quotas = _quota_store(core.store)
    if quotas is not None:
        per_callback = {cb.id: cb.quota for cb in new.callbacks if cb.quota is not None}
        quotas.reconfigure(new.store.quota, per_callback)
    core.events.configure_schedules(new.callbacks)
    if bot.webhooks is not None:
        bot.webhooks.set_auth(new.callbacks)
    for cid in change.callbacks_added + change.callbacks_restarted:
        running = bot.launched.get(cid)
        # Running already: a reload that failed part-way started it (its config stayed).
        if after[cid].command is not None and (running is None or running.ended):
            bot.start_callback(after[cid])
    for cid in change.callbacks_changed:
        task = bot.launched.get(cid)
        # Newly launched, or given up on (a reload that changes it is the fix the
        # supervisor's ERROR line asked for).
        if after[cid].command is not None and (task is None or task.ended):
            bot.start_callback(after[cid])


def _reroute(core: BotCore, callback_id: str, old: Sequence[Route], new: Sequence[Route]) -> None:
    """Give the callback's open streams the config's new routes; the routes each stream
    declared itself stay (they win over the config's of the same id, as at Listen)."""
    for subscription in core.router.subscriptions(callback_id):
        own = [r for r in subscription.routes if not any(r is o for o in old)]
        ids = {r.id for r in own}
        routes = own + [r for r in new if r.id not in ids]
        try:
            core.router.reroute(subscription, routes)
        except InvalidPatternError as exc:
            log.error("reload: callback %r keeps its old routes on an open stream: %s", callback_id, exc)
            continue
        core.events.rerouted(subscription)


def _quota_store(store: object) -> QuotaStore | None:
    """The QuotaStore among the store's wrappers (others may wrap it: metrics)."""
    for _ in range(8):
        if isinstance(store, QuotaStore):
            return store
        store = getattr(store, "inner", None)
        if store is None:
            return None
    return None


async def _apply_adapters(bot: Bot, core: BotCore, candidate: Bot, change: Change) -> None:
    # The specs change and whether adapters run is read with no checkpoint between: a
    # standby that becomes active (ha:) connects either the new specs, or the old ones
    # before this, which then sees them running and changes them (the bot may have taken
    # over while the callbacks were being applied).
    bot.adapter_entries = candidate.adapter_entries
    bot._adapter_specs = candidate._adapter_specs
    async with bot.holding_adapters() as running:
        if not running:  # a standby: it connects the new specs once active
            return
        adapters = bot._adapters
        async with trio.open_nursery() as nursery:
            for name in change.adapters_removed + change.adapters_changed:
                task = bot.adapter_tasks.pop(name, None)
                if task is not None:
                    nursery.start_soon(task.stop)
        if bot._adapters is not adapters:  # stepped down meanwhile: it connects the new specs once active
            return
        for name in change.adapters_removed + change.adapters_changed:
            core.links.pop(name, None)
            log.info("adapter %r stopped (reload)", name)
        specs = {name: (kind, options) for name, kind, options in candidate._adapter_specs}
        for name in change.adapters_added + change.adapters_changed:
            kind, options = specs[name]
            bot.start_adapter(core, name, kind, options)


# -- the pid file, the status file, and `oco reload` ---------------------------------------


def pid_path(config: Config) -> Path | None:
    """Where `oco run` writes its pid: ``pid_file``, else beside ``grpc.address_file``
    (``oco.address`` → ``oco.pid``); None when the config names neither."""
    if config.pid_file is not None:
        return config.pid_file
    address = config.grpc.address_file
    if address is None:
        return None
    beside = address.with_suffix(".pid")
    return beside if beside != address else address.with_name(address.name + ".pid")


def status_path(pid_file: Path) -> Path:
    """Where the bot says how its last reload went: ``oco.pid`` → ``oco.pid.reload``."""
    return pid_file.with_name(pid_file.name + ".reload")


def _write_atomically(path: Path, text: str) -> None:
    # Written whole then renamed: a reader never sees half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


@contextlib.contextmanager
def pid_file(path: Path | None) -> Iterator[None]:
    """Write this process's pid to ``path`` for the block (removed after, if still ours)."""
    if path is None:
        yield
        return
    pid = str(os.getpid())
    try:
        _write_atomically(path, pid + "\n")
    except OSError as exc:
        raise ConfigError(
            f"pid_file: cannot write {path}: {exc}; fix the path or its directory's permissions"
        ) from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text(encoding="utf-8").strip() == pid:
                path.unlink()
        with contextlib.suppress(OSError):
            status = status_path(path)
            if json.loads(status.read_text(encoding="utf-8")).get("pid") == int(pid):
                status.unlink()


class ReloadError(OcoError):
    """`oco reload` could not reach the bot, or the bot did not answer."""


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _looks_like_oco(pid: int) -> bool:
    """Best effort (Linux's /proc): whether process ``pid`` runs oco, so a stale pid
    file reused by another program's process does not get our SIGHUP (which ends most)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc here: trust the pid file
    return _is_oco_command([arg for arg in command.decode(errors="replace").split("\0") if arg])


def _is_oco_command(args: Sequence[str]) -> bool:
    """Whether the command line ``args`` runs oco."""
    names = [os.path.basename(arg) for arg in args[:2]]
    # `oco run`, the script run by an interpreter (python /venv/bin/oco run), or
    # `python -m oco_core run` (coverage run -m oco_core ...); not any command line that
    # merely contains "oco" (geocoder), nor one that names a file called oco (less oco).
    if names[:1] == ["oco"] or (names[:1] != [] and names[0].startswith("python") and names[1:] == ["oco"]):
        return True
    for i, arg in enumerate(args):
        module = args[i + 1] if arg == "-m" and i + 1 < len(args) else arg[2:] if arg.startswith("-m") else ""
        if module in ("oco_core", "oco_core.__main__"):
            return True
    return False


def send_reload(pid_file_path: Path | None, timeout: float = REPLY_TIMEOUT) -> Outcome:
    """Signal the bot whose pid is in ``pid_file_path`` to reload, and wait for its
    outcome (ReloadError when it cannot be reached or does not answer)."""
    if pid_file_path is None:
        raise ReloadError(
            "no pid file to find the bot by: set pid_file: in the config (or grpc.address_file, which it goes "
            "beside), or pass --pid-file; or send SIGHUP to the bot's process yourself"
        )
    try:
        pid = int(pid_file_path.read_text(encoding="utf-8").strip())
    except FileNotFoundError:
        raise ReloadError(f"{pid_file_path}: no such pid file; is the bot running (oco run writes it)?") from None
    except (OSError, ValueError) as exc:
        raise ReloadError(f"{pid_file_path}: cannot read a pid from it: {exc}") from None
    status = status_path(pid_file_path)
    before = _read_status(status)
    seen = before.get("generation", -1) if before is not None and before.get("pid") == pid else -1
    if not _looks_like_oco(pid):
        raise ReloadError(f"process {pid} (from {pid_file_path}) is not an oco bot; the pid file is stale")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ReloadError(
            f"no process {pid} (from {pid_file_path}): the bot is not running; the pid file is stale"
        ) from None
    except PermissionError:
        raise ReloadError(f"not allowed to signal process {pid}: run oco reload as the bot's user (or root)") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = _read_status(status)
        if record is not None and record.get("pid") == pid and int(record.get("generation", -1)) > seen:
            keys = record.get("restart_only")
            restart_only = tuple(str(key) for key in keys) if isinstance(keys, list) else ()
            return Outcome(bool(record.get("ok")), str(record.get("message", "")), restart_only)
        time.sleep(0.05)
    raise ReloadError(
        f"sent SIGHUP to process {pid}, which did not say how the reload went within {timeout:.0f} s "
        f"(nothing in {status}); its log says"
    )


def main(pid_file_path: Path | None, timeout: float) -> int:
    """`oco reload`: 0 when the bot took the config, 3 when it refused it."""
    outcome = send_reload(pid_file_path, timeout)
    if outcome.ok:
        print(f"reloaded: {outcome.message}")
        if outcome.restart_only:
            print(f"kept as they run until a restart applies them: {', '.join(outcome.restart_only)}")
        return 0
    for line in outcome.message.splitlines() or [""]:
        print(f"oco: error: {line}", file=sys.stderr)
    print("oco: error: the bot refused the new config and runs on with the old one", file=sys.stderr)
    return 3
