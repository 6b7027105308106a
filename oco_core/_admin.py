"""The ``oco`` commands that work on the core store while the bot runs (or not):
``oco callbacks add|rotate|remove|list`` and ``oco audit``.

They open the configured store exactly as the bot does (:func:`configured_store` is
the one place that picks the store plugin, its options and their defaults), but fail
at once with one line when it cannot be reached instead of waiting for it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TextIO

from pydantic import BaseModel, ValidationError

from ._audit import AuditQuery, AuditRecord, query
from ._config import AdapterEntry, CallbackSettings, LoadedConfig, validate_section
from ._errors import ConfigError
from ._plugins import Plugins
from ._secrets import (
    CACHE_SECONDS,
    add_secret,
    expects_store_secret,
    registrations,
    remove_secret,
    rotate_secret,
)
from ._store import Store, StoreType

# -- the store, as the bot opens it ---------------------------------------------------


def configured_store(loaded: LoadedConfig, plugins: Plugins) -> tuple[StoreType, BaseModel]:
    """The store type the config names (or, when it names none, the installed plugin
    that offers itself as the default) and its validated options, beneath which go the
    plugin's ``default_options()``. ConfigError (naming the file, line and key) for an
    unknown type, a missing or ambiguous default, or bad options."""
    config = loaded.config
    try:
        store_type = plugins.default_store() if config.store.type is None else plugins.store(config.store.type)
    except ConfigError as exc:
        raise loaded.error(("store", "type"), str(exc)) from None
    options = {**(store_type.default_options() if store_type.default_options else {}), **config.store.options()}
    return store_type, validate_section(loaded, ("store",), store_type.config_model, options)


def configured_adapters(loaded: LoadedConfig, plugins: Plugins) -> list[AdapterEntry]:
    """The config's ``adapters:``, or, when it has none, the installed adapter type that
    offers itself as the default. ConfigError when none (or several) does."""
    if loaded.config.adapters is not None:
        return list(loaded.config.adapters)
    try:
        return [AdapterEntry(type=plugins.default_adapter().name)]
    except ConfigError as exc:
        raise loaded.error(("adapters",), str(exc)) from None


@asynccontextmanager
async def open_configured_store(loaded: LoadedConfig, plugins: Plugins) -> AsyncIterator[Store]:
    """Open the configured store once (StoreUnavailableError when it cannot be
    reached: a command should say so, not wait as the bot does)."""
    store_type, options = configured_store(loaded, plugins)
    async with store_type.open(options) as store:
        yield store


# -- arguments ------------------------------------------------------------------------


def callback_id_argument(value: str) -> str:
    """argparse type: a valid callback id, or an error saying what one looks like."""
    try:
        CallbackSettings.model_validate({"id": value})
    except ValidationError as exc:
        problem = exc.errors(include_input=False, include_url=False)[0]["msg"].removeprefix("Value error, ")
        raise argparse.ArgumentTypeError(f"invalid callback id {value!r}: {problem}") from None
    return value


# -- running them ---------------------------------------------------------------------


async def run(options: argparse.Namespace, loaded: LoadedConfig, plugins: Plugins) -> int:
    """Run ``oco callbacks ...`` or ``oco audit``; returns the exit code."""
    if options.command == "audit":
        since = options.since or 0.0
        until = math.inf if options.until is None else options.until
        if since > until:
            print("oco audit: error: --since is later than --until", file=sys.stderr)
            return 2
        filters = AuditQuery(
            since=since,
            until=until,
            kind=options.kind,
            decision=options.decision,
            user=options.user,
            room=options.room,
            callback=options.callback,
            permission=options.permission,
            text=options.grep,
        )
        async with open_configured_store(loaded, plugins) as store:
            # One more than asked tells whether older records were left out.
            found = await query(store, filters, options.limit + 1)
        show_audit(found[-options.limit :], json_lines=options.json, more=len(found) > options.limit)
        return 0
    if options.command == "events":
        from ._events import waiting_events

        async with open_configured_store(loaded, plugins) as store:
            waiting = await waiting_events(store, options.callback or "")
        if not waiting:
            print("no durable events are waiting" + (f" for callback {options.callback!r}" if options.callback else ""))
            return 0
        rows = [
            (
                entry.callback_id,
                str(entry.count),
                str(entry.bytes),
                local_time(entry.oldest),
                local_time(entry.next_expiry),
                ", ".join(f"{kind} {count}" for kind, count in sorted(entry.kinds.items())),
            )
            for entry in waiting
        ]
        print_table(("CALLBACK", "EVENTS", "BYTES", "OLDEST", "NEXT EXPIRY", "KINDS"), rows, sys.stdout)
        return 0
    if options.action in ("add", "rotate"):
        _refuse_if_configured(loaded, options.id)
    async with open_configured_store(loaded, plugins) as store:
        if options.action == "list":
            await _list(store, loaded)
        elif options.action == "remove":
            await remove_secret(store, options.id)
            print(
                f"removed the secret of callback {options.id!r}: it can no longer connect "
                f"(a running bot refuses it within {CACHE_SECONDS:.0f} s)"
            )
        else:
            change = add_secret if options.action == "add" else rotate_secret
            secret = await change(store, options.id)
            _announce(secret, options.id, loaded, rotated=options.action == "rotate")
    return 0


def _refuse_if_configured(loaded: LoadedConfig, callback_id: str) -> None:
    for index, cb in enumerate(loaded.config.callbacks):
        if cb.id == callback_id and not expects_store_secret(cb):
            key = "secret" if cb.secret is not None else "command"
            raise loaded.error(
                ("callbacks", index, key),
                f"callback {callback_id!r} gets its secret from the config ({key}:), which wins over the store; "
                f"to keep its secret in the store instead, delete its {key}: and run this again",
            )


def _announce(secret: str, callback_id: str, loaded: LoadedConfig, *, rotated: bool) -> None:
    # The secret alone on stdout, so `SECRET=$(oco callbacks add deploy)` takes just it;
    # how to use it on stderr, for the person at the terminal.
    print(secret, flush=True)
    print(
        f"oco: the secret of callback {callback_id!r} is shown only this once (the store keeps its hash): give it "
        f"to the callback as OCO_SECRET with OCO_CALLBACK_ID={callback_id}, or "
        f"Callback(id={callback_id!r}, secret=...) in the Python SDK"
        + (f"; the old secret stops working within {CACHE_SECONDS:.0f} s" if rotated else ""),
        file=sys.stderr,
    )
    if all(cb.id != callback_id for cb in loaded.config.callbacks):
        print(
            f"oco: note: {loaded.source} has no entry for {callback_id!r}, so it gets the default capabilities "
            "(every one); add it under callbacks: (with neither command: nor secret:) to narrow them",
            file=sys.stderr,
        )


async def _list(store: Store, loaded: LoadedConfig) -> None:
    stored = {r.callback_id: r for r in await registrations(store)}
    configured = {cb.id: cb for cb in loaded.config.callbacks}
    rows: list[tuple[str, ...]] = []
    for callback_id in sorted(set(stored) | {i for i, cb in configured.items() if expects_store_secret(cb)}):
        found = stored.get(callback_id)
        cb = configured.get(callback_id)
        if found is None:
            note = f"no secret yet: oco callbacks add {callback_id}"
        elif cb is not None and not expects_store_secret(cb):
            note = f"ignored: the config sets its secret; oco callbacks remove {callback_id}"
        elif cb is None:
            note = "default capabilities"
        else:
            note = ""
        created = local_time(found.created) if found is not None else "-"
        rows.append((callback_id, created, "yes" if cb is not None else "no", note))
    if not rows:
        print("no callback secrets in the store; `oco callbacks add <id>` makes one", file=sys.stderr)
        return
    print_table(("ID", "CREATED", "IN CONFIG", "NOTE"), rows, sys.stdout)


# -- output ---------------------------------------------------------------------------


def local_time(when: float) -> str:
    """``when`` (Unix time) in the local time zone, to the second."""
    return datetime.fromtimestamp(when).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _printable(text: str) -> str:
    # Audit records carry what people typed in chat: never let it steer the terminal.
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Columns aligned, control characters made visible."""
    cells = [[_printable(c) or "-" for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    for row in (list(headers), *cells):
        # The last column is not padded: it is free text (details, notes).
        out.write("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)) + "  " + row[-1] + "\n")


def _audit_row(entry: AuditRecord) -> tuple[str, ...]:
    who = entry.user or entry.person
    if entry.user and entry.person and entry.person != entry.user:
        who = f"{entry.user} ({entry.person})"
    where = "/".join(p for p in (entry.callback, entry.route) if p)
    return (local_time(entry.time), entry.kind, entry.decision, who, entry.room, where, entry.permission, entry.detail)


def show_audit(records: Sequence[AuditRecord], *, json_lines: bool, more: bool, out: TextIO | None = None) -> None:
    """Print audit records as a table (local time) or as JSON lines."""
    out = out or sys.stdout
    if json_lines:
        for entry in records:
            utc = datetime.fromtimestamp(entry.time, UTC).isoformat()
            out.write(json.dumps({"time_iso": utc, **asdict(entry)}) + "\n")
    elif records:
        headers = ("TIME", "KIND", "DECISION", "USER", "ROOM", "CALLBACK/ROUTE", "PERMISSION", "DETAIL")
        print_table(headers, [_audit_row(r) for r in records], out)
    else:
        print("no audit records match", file=sys.stderr)
    if more:
        print(
            f"oco audit: showing the newest {len(records)}; older ones match too (raise --limit or narrow --since)",
            file=sys.stderr,
        )


__all__: Sequence[str] = [
    "configured_store",
    "open_configured_store",
    "run",
    "show_audit",
]
