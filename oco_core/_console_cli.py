"""``oco console token create|list|revoke``: the tokens operators log in to the console
with (:mod:`._console._auth` keeps them, hashed, in the core store).

Like ``oco roles``, they open the configured core store as the bot does, so they work
whether a bot runs or not; a running bot's console sees a change at its next request.
A token is printed once, by ``create``, alone on standard output (so
``TOKEN=$(oco console token create --role viewer)`` takes just it); ``list`` never shows
one. Creating and revoking are audited (kind ``admin``) as ``cli/<name>``.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Sequence

from ._admin import local_time, open_configured_store, print_table
from ._audit import ALLOWED, write_now
from ._auth_cli import UsageError, operator
from ._config import LoadedConfig
from ._console._auth import TokenNameError, create_token, list_tokens, live_sessions, revoke_token
from ._plugins import Plugins


async def run(options: argparse.Namespace, loaded: LoadedConfig, plugins: Plugins) -> int:
    """Run ``oco console token ...``; returns the exit code (2 for a command line that
    names something wrongly, with one line saying what)."""
    from ._cli import EXIT_USAGE

    try:
        return await _run(options, loaded, plugins)
    except (UsageError, TokenNameError) as exc:
        print(f"oco: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


async def _run(options: argparse.Namespace, loaded: LoadedConfig, plugins: Plugins) -> int:
    by = operator(options) if options.action != "list" else ""
    async with open_configured_store(loaded, plugins) as store:
        if options.action == "list":
            tokens = await list_tokens(store)
            if not tokens:
                print("no console tokens; `oco console token create --role viewer` makes one", file=sys.stderr)
                return 0
            sessions = await live_sessions(store)
            rows = [(t.name, t.role, local_time(t.created), str(sessions.get(t.name, 0))) for t in tokens]
            print_table(("NAME", "ROLE", "CREATED", "SESSIONS"), rows, sys.stdout)
            return 0
        if options.action == "revoke":
            if not await revoke_token(store, options.name):
                names = ", ".join(t.name for t in await list_tokens(store)) or "none"
                raise UsageError(f"no console token named {options.name!r} (the tokens: {names})")
            await write_now(store, "admin", ALLOWED, user=by, detail=f"oco console token revoke {options.name}")
            print(f"revoked the console token {options.name!r}: its sessions end at their next request")
            return 0
        name = options.name or f"{options.role}-{secrets.token_hex(3)}"
        token = await create_token(store, name, options.role)
        detail = f"oco console token create --role {options.role} --name {name}"
        await write_now(store, "admin", ALLOWED, user=by, detail=detail)
    _announce(token, name, options.role, loaded)
    return 0


def _announce(token: str, name: str, role: str, loaded: LoadedConfig) -> None:
    # The token alone on stdout; how to use it on stderr, for the person at the terminal.
    print(token, flush=True)
    config = loaded.config
    where = f"http://{config.http.listen}/console/login" if config.http is not None else "/console/login"
    if config.http is not None and config.http.tls is not None:
        where = where.replace("http://", "https://", 1)
    print(
        f"oco: the console token {name!r} ({role}) is shown only this once (the store keeps its hash): "
        f"paste it at {where}; `oco console token revoke {name}` ends it",
        file=sys.stderr,
    )
    if config.console is None:
        print(
            f"oco: note: {loaded.source} has no console: section, so the bot serves no console; add "
            "console: {} (with http:) and restart the bot",
            file=sys.stderr,
        )


__all__: Sequence[str] = ["run"]
