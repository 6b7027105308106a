"""The ``oco`` command. The only place where errors become exit codes and one-line messages."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import trio

from ._config import LoadedConfig, load_config
from ._errors import ConfigError, OcoError, PluginError, StoreError
from ._secrets import SecretRefusedError
from ._store import mask_url
from ._version import __version__

if TYPE_CHECKING:
    import pluggy

    from ._plugins import Plugins

log = logging.getLogger("oco")

T = TypeVar("T")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_PLUGIN = 4
EXIT_STORE = 5
EXIT_RUNTIME = 6


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oco", description="OCO, an OpenChatOps bot: a chat hub for callback programs in any language."
    )
    parser.add_argument("--version", action="version", version=f"oco {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    config_help = "YAML config file (default: $OCO_CONFIG, else built-in defaults)"
    run = commands.add_parser("run", help="run the bot")
    run.add_argument("--config", "-c", default=os.environ.get("OCO_CONFIG"), help=config_help)
    run.add_argument("--address-file", type=Path, help="write the gRPC address here once listening (handy with port 0)")
    check = commands.add_parser("check-config", help="validate a config file and the plugins it names")
    check.add_argument("--config", "-c", default=os.environ.get("OCO_CONFIG"), help=config_help)
    proto = commands.add_parser("proto", help="write the .proto files, to generate clients in other languages")
    proto.add_argument("--out", "-o", required=True, type=Path, help="directory to write them to")
    from ._admin import add_arguments as admin_arguments
    from ._admin import callback_id_argument
    from ._conformance import add_arguments as conformance_arguments
    from ._datastores_cli import add_arguments as datastores_arguments

    admin_arguments(commands, config_help)

    def config_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", "-c", default=os.environ.get("OCO_CONFIG"), help=config_help)

    datastores_arguments(commands, config_option, callback_id_argument)

    conformance_arguments(commands.add_parser("conformance", help="check any OCO bot as a callback sees it"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``oco`` command."""
    options = _parser().parse_args(argv)
    try:
        if options.command == "proto":
            return _write_protos(options.out)
        if options.command == "conformance":
            from ._conformance import main as conformance

            return conformance(options)
        loaded = load_config(options.config)
        if options.command in ("callbacks", "audit", "datastores"):
            return _admin(options, loaded)
        _setup_logging(loaded, options.debug)
        if options.command == "check-config":
            return _check(loaded, options.debug)
        if options.address_file is not None:
            config = loaded.config
            grpc_settings = config.grpc.model_copy(update={"address_file": options.address_file})
            loaded = LoadedConfig(config.model_copy(update={"grpc": grpc_settings}), loaded.source, loaded.lines)
        return _run(loaded, options.debug)
    except OcoError as exc:
        return _fail(exc, options.debug)


def _fail(exc: BaseException, debug: bool) -> int:
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


def _setup_logging(loaded: LoadedConfig, debug: bool, *, quiet: bool = False) -> None:
    level = logging.DEBUG if debug else getattr(logging, loaded.config.log_level.upper())
    if quiet and not debug:
        level = max(level, logging.WARNING)  # a command's output is what it prints, not the store's chatter
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _load_plugins(debug: bool, manager: pluggy.PluginManager | None = None) -> Plugins:
    """The installed plugins (or ``manager``'s), with the loggers they call noisy
    quieted unless --debug."""
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
    from ._tls import load_server_tls

    plugins = _load_plugins(debug)
    bot = Bot(loaded, plugins)
    store_type, _ = configured_store(loaded, plugins)
    load_server_tls(loaded)  # the certificate files, as `oco run` would read them
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


def _run(loaded: LoadedConfig, debug: bool) -> int:
    from ._admin import configured_store
    from ._bot import Bot

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

    async def serve() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for signum in signals:
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
    return _trio_run(lambda: command(options, loaded, plugins))


def _trio_run(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main`` under trio; an OcoError inside an exception group comes out alone."""
    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        error = _first_oco_error(group)
        if error is None:
            raise
        raise error from None


def _first_oco_error(error: BaseException) -> OcoError | None:
    if isinstance(error, OcoError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _first_oco_error(inner)
            if found is not None:
                return found
    return None


def _write_protos(out: Path) -> int:
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
