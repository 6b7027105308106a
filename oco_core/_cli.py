"""The ``oco`` command. The only place where errors become exit codes and one-line messages.

Start-up cost matters here: ``oco --version``, ``oco --help`` (of any command) and
``oco completion`` import nothing beyond the standard library's argparse. Every
argument is declared in this module for that reason; the modules that do the work
(pydantic, trio, grpc, SQLAlchemy behind them) are imported once a command runs.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ._version import __version__

if TYPE_CHECKING:
    from types import FrameType

    import pluggy

    from ._config import LoadedConfig
    from ._errors import OcoError
    from ._plugins import Plugins

T = TypeVar("T")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_PLUGIN = 4
EXIT_STORE = 5
EXIT_RUNTIME = 6
#: Ctrl-C before the bot's own shutdown took over: 128 + SIGINT, as a shell reports it.
EXIT_INTERRUPTED = 130

# -- arguments ------------------------------------------------------------------------

CONFIG_HELP = "YAML config file (default: $OCO_CONFIG, else built-in defaults)"
#: The kinds of audit record, for ``oco audit --kind`` (the ``kind`` values _audit writes).
AUDIT_KINDS = (
    "route",
    "rate_limit",
    "admin",
    "capability",
    "check_permission",
    "datastore",
    "authentication",
    "webhook",
)
#: ``oco audit --decision`` (``_audit.ALLOWED`` and ``_audit.DENIED``).
AUDIT_DECISIONS = ("allowed", "denied")
#: The shells ``oco completion`` writes a script for.
SHELLS = ("bash", "zsh", "fish")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
WHEN_FORMS = (
    "a time back from now (30s, 15m, 1h, 2d, 1w) or an ISO 8601 date or time "
    "(2024-05-01, 2024-05-01T14:30, 2024-05-01T14:30:00+02:00; local time without an offset)"
)


def parse_when(value: str, now: float | None = None) -> float:
    """Unix time for ``--since``/``--until``: ``1h`` (that long ago) or an ISO time."""
    text = value.strip()
    duration = _DURATION.fullmatch(text)
    if duration:
        return (time.time() if now is None else now) - float(duration.group(1)) * _UNITS[duration.group(2)]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a time: expected {WHEN_FORMS}") from None
    return moment.astimezone().timestamp()  # a naive time is local time


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {value!r}")
    return number


def callback_id(value: str) -> str:
    """argparse type: a valid callback id, or an error saying what one looks like."""
    from ._admin import callback_id_argument  # the config model's own check (pydantic): only for a given id

    return callback_id_argument(value)


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=os.environ.get("OCO_CONFIG"), help=CONFIG_HELP)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oco", description="OCO, an OpenChatOps bot: a chat hub for callback programs in any language."
    )
    parser.add_argument("--version", action="version", version=f"oco {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser("run", help="run the bot")
    _config_option(run)
    run.add_argument("--address-file", type=Path, help="write the gRPC address here once listening (handy with port 0)")
    check = commands.add_parser("check-config", help="validate a config file and the plugins it names")
    _config_option(check)
    reload = commands.add_parser(
        "reload",
        help="make a running bot read its config again (SIGHUP to the pid in its pid file)",
        description="Send SIGHUP to the running bot whose pid is in the pid file (pid_file in the config, by "
        "default beside grpc.address_file) and print how the reload went: exit 0 when the bot took the new "
        "config, 3 when it refused it (it runs on with the old one), another non-zero status when it could not "
        "be reached.",
    )
    _config_option(reload)
    reload.add_argument("--pid-file", type=Path, help="the bot's pid file (default: as the config says)")
    reload.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the bot's answer (default: 60)"
    )
    proto = commands.add_parser("proto", help="write the .proto files, to generate clients in other languages")
    proto.add_argument("--out", "-o", required=True, type=Path, help="directory to write them to")
    _callbacks_arguments(commands)
    _audit_arguments(commands)
    _roles_arguments(commands)
    _rules_arguments(commands)
    _console_arguments(commands)
    events = commands.add_parser(
        "events",
        help="show the durable events waiting for callbacks",
        description="Show, by callback, the durable events the core store keeps until a callback takes them "
        "(asynchronous webhooks, schedule firings, published events, matches of durable routes): how many, how "
        "large, the oldest, and the next to expire.",
    )
    _config_option(events)
    events.add_argument("--callback", type=callback_id, help="only this callback")
    _datastores_arguments(commands)
    _conformance_arguments(commands.add_parser("conformance", help="check any OCO bot as a callback sees it"))
    completion = commands.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh, fish)",
        description='Print a script that completes oco\'s commands and options. bash: eval "$(oco completion bash)" '
        'in ~/.bashrc; zsh: eval "$(oco completion zsh)" in ~/.zshrc; fish: oco completion fish > '
        "~/.config/fish/completions/oco.fish",
    )
    completion.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    return parser


def _callbacks_arguments(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    callbacks = commands.add_parser(
        "callbacks",
        help="manage the secrets of callbacks that dial in (the store keeps only their hashes)",
        description="Secrets of callbacks that dial in, generated here and kept in the core store as SHA-256 "
        "digests. A running bot sees a change within a few seconds.",
    )
    actions = callbacks.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (
        ("add", "generate a secret for a callback and print it once"),
        ("rotate", "replace a callback's secret (the old one stops working) and print the new one once"),
        ("remove", "delete a callback's secret: it can no longer connect"),
    ):
        action = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        action.add_argument("id", type=callback_id, help="the callback's id (as it calls itself: OCO_CALLBACK_ID)")
        _config_option(action)
    listing = actions.add_parser("list", help="callbacks with a secret in the store (never the secrets)")
    _config_option(listing)


def _audit_arguments(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser(
        "audit",
        help="show the audit log, filtered",
        description="Show the newest records of the audit log (permission decisions, admin commands, capability "
        f"refusals, delivered matches), oldest first. --since and --until take {WHEN_FORMS}.",
    )
    _config_option(audit)
    audit.add_argument("--since", type=parse_when, metavar="WHEN", help="only records at or after this time")
    audit.add_argument("--until", type=parse_when, metavar="WHEN", help="only records at or before this time")
    audit.add_argument("--user", default="", help="a user id (irc/alice) or person id")
    audit.add_argument("--callback", default="", help="a callback id")
    audit.add_argument("--kind", default="", help=f"one kind of record ({', '.join(AUDIT_KINDS)})")
    audit.add_argument("--decision", default="", choices=AUDIT_DECISIONS)
    audit.add_argument("--room", default="", help="a room id (irc/#ops)")
    audit.add_argument("--permission", default="", help="a permission name")
    audit.add_argument("--grep", default="", metavar="TEXT", help="records with TEXT in any field")
    audit.add_argument("--limit", type=_positive, default=50, help="show at most this many, the newest (default 50)")
    audit.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")


def _operator_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--as",
        dest="as_name",
        metavar="NAME",
        help="who makes the change, for the audit log (recorded as cli/NAME; default: your login name)",
    )


def _roles_arguments(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    roles = commands.add_parser(
        "roles",
        help="grant, revoke and list people's roles (kept in the core store)",
        description="People's roles in the core store, as admins manage them from chat with grant and revoke. "
        "Works whether a bot runs or not; a running bot applies a change within 5 s. Every change is audited as "
        "cli/NAME (--as NAME, or your login name).",
    )
    actions = roles.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (("grant", "give an account a role"), ("revoke", "take a role from an account")):
        action = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        action.add_argument("user", help="the account, as messages carry it: <adapter>/<user id> (irc/bob)")
        action.add_argument("role", help="the role (auth.roles in the config says what it grants)")
        _config_option(action)
        _operator_option(action)
    listing = actions.add_parser("list", help="who holds which role, and where it comes from (store or config)")
    listing.add_argument("user", nargs="?", default="", help="only this account: its roles and what they grant")
    _config_option(listing)


def _rules_arguments(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rules = commands.add_parser(
        "rules",
        help="set, unset and list route rules: who may run a callback's route, and where",
        description="Route rules: the permission a route needs and the rooms it may match in. The config seeds "
        "them (callbacks[].route_rules); rules set here or from chat (rule set) are kept in the core store and "
        "replace the config's rule of the same route; unset brings the config's back. Works whether a bot runs "
        "or not; a running bot applies a change within 5 s. Every change is audited as cli/NAME.",
    )
    actions = rules.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every rule in force and where it comes from (config or store)")
    listing.add_argument("--callback", type=callback_id, help="only this callback's rules")
    listing.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    _config_option(listing)
    text = "change a route's rule (kept in the store); options not given keep the rule's current value"
    change = actions.add_parser("set", help=text, description=text[0].upper() + text[1:] + ".")
    unset = actions.add_parser(
        "unset", help="remove a rule set at runtime: the config's rule for that route (if any) applies again"
    )
    for action in (change, unset):
        action.add_argument("callback", type=callback_id, help="the callback's id")
        action.add_argument(
            "route", help="the route's id (its pattern when it has none), or a shell-style pattern of ids (deploy*)"
        )
        _config_option(action)
        _operator_option(action)
    permission = change.add_mutually_exclusive_group()
    permission.add_argument("--permission", metavar="PERMISSION", help="the permission a person needs")
    permission.add_argument("--no-permission", action="store_true", help="anyone may run it")
    permission.add_argument(
        "--declared-permission", action="store_true", help="the permission the callback declared for the route"
    )
    allow = change.add_mutually_exclusive_group()
    allow.add_argument(
        "--allow", action="append", metavar="ROOM", help="only in these rooms (repeat; patterns: irc/#ops-*, private)"
    )
    allow.add_argument("--any-room", action="store_true", help="in any room not denied")
    deny = change.add_mutually_exclusive_group()
    deny.add_argument("--deny", action="append", metavar="ROOM", help="never in these rooms (repeat; patterns)")
    deny.add_argument("--no-deny", action="store_true", help="deny no room")


def _console_arguments(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    console = commands.add_parser(
        "console",
        help="manage the tokens operators log in to the web console with (the store keeps only their hashes)",
        description="Tokens for the operator console (console: in the config, served at /console on the HTTP "
        "server), kept in the core store as SHA-256 digests. Works whether a bot runs or not; a running bot's "
        "console sees a change at its next request.",
    )
    subjects = console.add_subparsers(dest="subject", metavar="SUBJECT", required=True)
    token = subjects.add_parser("token", help="create, list and revoke console tokens")
    actions = token.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser(
        "create",
        help="make a token and print it once",
        description="Make a console token and print it once (alone on stdout). An admin token may grant and "
        "revoke roles in the console; a viewer token only reads.",
    )
    create.add_argument("--role", required=True, choices=("admin", "viewer"), help="what the token may do")
    create.add_argument("--name", help="its name, shown in the console and the audit log (default: ROLE-<random>)")
    listing = actions.add_parser("list", help="the tokens: name, role, created, live sessions (never the tokens)")
    revoke = actions.add_parser("revoke", help="delete a token: its sessions end at their next request")
    revoke.add_argument("name", help="the token's name (oco console token list shows them)")
    for action in (create, listing, revoke):
        _config_option(action)
    for action in (create, revoke):
        _operator_option(action)


def _datastores_arguments(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    datastores = commands.add_parser(
        "datastores",
        help="who holds which specific data store; grant, rotate or revoke their credentials",
        description="Callbacks' access to the specific data stores under datastores: in the config. "
        "Credentials are generated by the bot on first use and kept in the core store.",
    )
    actions = datastores.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every grant: data store, callback, generation, since when, state")
    _config_option(listing)
    for name, text in (
        ("grant", "give a callback access to a data store now, or again after a revocation (new credentials)"),
        ("rotate", "give a callback new credentials for a data store (the old stop working, its sessions end)"),
        ("revoke", "take a callback's access to a data store away until granted again (data kept unless --drop-data)"),
    ):
        action = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        action.add_argument("callback", type=callback_id, help="the callback's id")
        action.add_argument("datastore", help="the data-store type (postgresql, redis, sqlite, ...)")
        _config_option(action)
        if name == "revoke":
            action.add_argument("--drop-data", action="store_true", help="also delete its schema, keys or file")


def _conformance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="HOST:PORT of the bot's gRPC API (required)")
    parser.add_argument("--id", help="the id of a callback in the bot's config, played by the suite (required)")
    parser.add_argument("--secret", help="that callback's secret (required; or $OCO_SECRET)")
    parser.add_argument("--other-id", help="a second callback's id, for isolation and fan-out checks")
    parser.add_argument("--other-secret", help="the second callback's secret")
    parser.add_argument(
        "--control", help="HOST:PORT of the memory adapter's control service (oco.MemoryControl), to write chat"
    )
    parser.add_argument(
        "--datastore", help="the data-store type the access checks ask for (default: the first the bot offers)"
    )
    parser.add_argument("--bot-name", default="oco", help="how the bot is addressed in chat (default: oco)")
    parser.add_argument("--http", help="URL of the bot's HTTP server (http://HOST:PORT), for the webhook checks")
    parser.add_argument(
        "--webhook-token", help="the bearer token of the callback's webhook_auth, if any (or $OCO_WEBHOOK_TOKEN)"
    )
    parser.add_argument("--room", default="general", help="memory adapter room the suite writes in (default: general)")
    parser.add_argument("--user", default="alice", help="memory adapter user the suite writes as (default: alice)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for one answer (default: 10)")
    parser.add_argument("--only", action="append", default=[], help="run only checks whose name starts with this")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")


# -- running them ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``oco`` command."""
    # Until the bot handles SIGINT itself (trio's signal receiver in _run, which puts
    # this handler back once the bot has stopped), Ctrl-C ends the process at once:
    # importing, loading plugins and reading the config leave nothing to undo, and no
    # callback runs yet. A KeyboardInterrupt would surface inside whatever import was
    # running, with a traceback, and at times as another error (a RuntimeError, when
    # it strikes in a class's __set_name__).
    previous = signal.getsignal(signal.SIGINT)
    in_charge = _handle_sigint(_exit_at_once)
    try:
        options = _parser().parse_args(argv)
        if not in_charge and options.command == "run":
            # trio's signal receiver, which stops the bot in order, needs the main thread.
            print("oco: error: oco run must run in the main thread (it handles SIGINT and SIGTERM)", file=sys.stderr)
            return EXIT_USAGE
        if in_charge and options.command not in ("run", "check-config"):
            # A one-shot command that may be changing the store unwinds instead (below).
            _handle_sigint(signal.default_int_handler)
        return _main(options)
    except KeyboardInterrupt:
        # Quietly, as an interrupted shell command does, and never by returning: once
        # a KeyboardInterrupt has passed through Python code that C code ran (grpc's
        # Cython module does so while it is imported), CPython ends the process by
        # SIGINT at exit whatever followed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    finally:
        if in_charge:  # a program that called main() gets its own handler back
            signal.signal(signal.SIGINT, previous)


def _handle_sigint(handler: Callable[[int, FrameType | None], object]) -> bool:
    """Install ``handler`` for SIGINT; False when main() runs in another thread than
    the main one (a program embedding it), where signals are not ours to handle."""
    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:
        return False
    return True


def _exit_at_once(signum: int, frame: FrameType | None) -> None:
    # No flushing in a signal handler: a buffered writer it interrupted refuses the
    # reentrant call. stderr is line-buffered, and nothing went to stdout yet.
    os._exit(EXIT_INTERRUPTED)


def _main(options: argparse.Namespace) -> int:
    if options.command == "completion":
        from ._completion import script

        sys.stdout.write(script(_parser(), options.shell))
        return EXIT_OK
    if options.command == "proto":
        return _write_protos(options.out)
    from ._errors import OcoError

    try:
        if options.command == "conformance":
            from ._conformance import main as conformance

            return conformance(options)
        from ._config import load_config

        if options.command == "reload":
            return _reload(options)
        loaded = load_config(options.config)
        if options.command in ("callbacks", "audit", "console", "datastores", "events", "roles", "rules"):
            return _admin(options, loaded)
        _setup_logging(loaded, options.debug, service=options.command == "run")
        if options.command == "check-config":
            return _check(loaded, options.debug)
        loaded = _overridden(loaded, options)
        return _run(loaded, options.debug, lambda: _overridden(load_config(options.config), options))
    except OcoError as exc:
        return _fail(exc, options.debug)


def _overridden(loaded: LoadedConfig, options: argparse.Namespace) -> LoadedConfig:
    """The config with what ``oco run``'s options override (--address-file)."""
    from ._config import LoadedConfig

    if options.address_file is None:
        return loaded
    config = loaded.config
    grpc_settings = config.grpc.model_copy(update={"address_file": options.address_file})
    return LoadedConfig(config.model_copy(update={"grpc": grpc_settings}), loaded.source, loaded.lines)


def _reload(options: argparse.Namespace) -> int:
    from ._reload import main, pid_path

    path = options.pid_file
    if path is None:
        from ._config import load_config

        path = pid_path(load_config(options.config).config)  # a config the bot would refuse stops here
    return main(path, options.timeout)


def _fail(exc: BaseException, debug: bool) -> int:
    import logging

    from ._errors import ConfigError, PluginError, SecretRefusedError, StoreError

    if debug:
        logging.getLogger("oco").error("failed", exc_info=exc)
    # A config with several problems has one line each; each gets the prefix, so every
    # line on stderr reads on its own (and greps as an error).
    for line in str(exc).splitlines() or [""]:
        print(f"oco: error: {line}", file=sys.stderr)
    if isinstance(exc, SecretRefusedError):
        return EXIT_ERROR
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, PluginError):
        return EXIT_PLUGIN
    if isinstance(exc, StoreError):
        return EXIT_STORE
    return EXIT_RUNTIME


def _setup_logging(loaded: LoadedConfig, debug: bool, *, quiet: bool = False, service: bool = False) -> None:
    import logging

    level = logging.DEBUG if debug else getattr(logging, loaded.config.log_level.upper())
    if service:  # oco run: log_format and log_file apply (one-shot commands log to stderr)
        from ._logs import configure

        configure(loaded, level)
        return
    if quiet and not debug:
        level = max(level, logging.WARNING)  # a command's output is what it prints, not the store's chatter
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _load_plugins(debug: bool, manager: pluggy.PluginManager | None = None) -> Plugins:
    """The installed plugins (or ``manager``'s), with the loggers they call noisy
    quieted unless --debug."""
    import logging

    from ._plugins import load_plugins

    plugins = load_plugins(manager)
    if not debug:
        # Libraries that log every request or frame at INFO drown the bot's own lines;
        # each plugin names its own (AdapterType/StoreType.noisy_loggers).
        for noisy in sorted(plugins.noisy_loggers()):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return plugins


def _check(loaded: LoadedConfig, debug: bool) -> int:
    from ._admin import configured_store
    from ._bot import Bot
    from ._errors import ConfigError
    from ._tls import load_server_tls

    plugins = _load_plugins(debug)
    bot = Bot(loaded, plugins)
    store_type, _ = configured_store(loaded, plugins)
    load_server_tls(loaded)  # the certificate files, as `oco run` would read them
    if loaded.config.http is not None:
        from ._http import load_http_tls

        load_http_tls(loaded)
    if bot.launch_problems:
        # `oco run` only logs these (see Bot.launch_problems); a check says them as errors.
        raise ConfigError("\n".join(str(problem) for problem in bot.launch_problems))
    config = loaded.config
    tls = config.grpc.tls
    transport = "plaintext" if tls is None else ("mutual TLS" if tls.client_ca is not None else "TLS")
    adapters = ", ".join(f"{a.instance_name} ({a.type})" for a in bot.adapter_entries)
    print(
        f"{loaded.source}: OK — adapters: {adapters};"
        f" store: {store_type.name}; gRPC: {config.grpc.listen} ({transport});"
        f" callbacks: {', '.join(c.id for c in config.callbacks) or 'none'};"
        f" admins: {', '.join(config.auth.admins) or 'none'}"
    )
    if config.datastores:
        print(f"data stores: {', '.join(d.type for d in config.datastores)}")
    for cb in config.callbacks:
        if cb.requires:  # Bot() above refused any that cannot be satisfied
            print(f"callback {cb.id!r} requires {', '.join(cb.requires)}: offered")
    return EXIT_OK


def _run(loaded: LoadedConfig, debug: bool, read: Callable[[], LoadedConfig] | None = None) -> int:
    import logging

    import trio

    from ._admin import configured_store
    from ._bot import Bot
    from ._store import mask_url

    log = logging.getLogger("oco")

    plugins = _load_plugins(debug)
    bot = Bot(loaded, plugins)
    for problem in bot.launch_problems:
        log.error("%s (the bot starts anyway and keeps trying to launch it)", problem)
    if loaded.source == "<defaults>":
        store_type, options = configured_store(loaded, plugins)
        url = getattr(options, "url", None)  # where the data lives, when the store has a URL
        store = store_type.name + (f" ({mask_url(url)})" if isinstance(url, str) else "")
        adapters = ", ".join(a.type for a in bot.adapter_entries)
        log.info("no config file: adapter %s, store %s, gRPC on %s", adapters, store, loaded.config.grpc.listen)

    from ._reload import Reloader, pid_file, pid_path, status_path

    pid_at = pid_path(loaded.config)
    reloader = Reloader(
        bot,
        read or (lambda: loaded),
        lambda: _load_plugins(debug),
        debug=debug,
        status_file=None if pid_at is None else status_path(pid_at),
    )

    async def serve() -> None:
        # SIGHUP reloads the config (_reload.py); the pid file, written once the
        # signals are ours, is how `oco reload` finds the process.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals, pid_file(pid_at):
            reloader.started()
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            log.info("received SIGHUP; reloading %s", loaded.source)
                            nursery.start_soon(reloader.reload)
                            continue
                        log.info("received %s; shutting down", signal.Signals(signum).name)
                        bot.shutdown()
                        nursery.cancel_scope.deadline = trio.current_time() + 30  # never hang forever

                nursery.start_soon(watch)
                await bot.run()
                nursery.cancel_scope.cancel()

    _trio_run(serve)
    return EXIT_OK


def _admin(options: argparse.Namespace, loaded: LoadedConfig) -> int:
    from ._admin import run
    from ._datastores_cli import run as run_datastores

    _setup_logging(loaded, options.debug, quiet=True)
    plugins = _load_plugins(options.debug)
    command = run_datastores if options.command == "datastores" else run
    if options.command in ("roles", "rules"):
        from ._auth_cli import run as command
    if options.command == "console":
        from ._console_cli import run as command
    return _trio_run(lambda: command(options, loaded, plugins))


def _trio_run(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main`` under trio; an OcoError (or, failing one, a KeyboardInterrupt)
    inside an exception group comes out alone."""
    import trio

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        error = _first_oco_error(group)
        if error is not None:
            raise error from None
        if group.split(KeyboardInterrupt)[1] is None:
            raise KeyboardInterrupt from None  # Ctrl-C reached several tasks at once
        raise


def _first_oco_error(error: BaseException) -> OcoError | None:
    from ._errors import OcoError

    if isinstance(error, OcoError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _first_oco_error(inner)
            if found is not None:
                return found
    return None


def _write_protos(out: Path) -> int:
    from importlib import resources

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in sorted(resources.files("oco_core._proto").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".proto"):
            (out / entry.name).write_text(entry.read_text(encoding="utf-8"), encoding="utf-8")
            written.append(entry.name)
    print(f"wrote {', '.join(written)} to {out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
