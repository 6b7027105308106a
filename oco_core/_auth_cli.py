"""``oco roles grant|revoke|list`` and ``oco rules set|unset|list``: the operator's hand
on people's roles and on route rules, from the command line.

They open the configured core store as the bot does and change the same records a
running bot reads again every few seconds (:data:`~._auth.RELOAD_SECONDS`), so they work
whether a bot runs or not, and every bot on the store sees the change. Each change is
written to the audit log at once (kind ``admin``), as the operator: ``cli/<name>``, the
name given with ``--as`` or else the operating-system user running the command.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Mapping, Sequence

from ._adapter import Adapter
from ._admin import configured_adapters, local_time, open_configured_store, print_table
from ._audit import ALLOWED, write_now
from ._auth import ADMIN_ROLE, RELOAD_SECONDS, Authorization
from ._config import LoadedConfig, validate_section
from ._errors import OcoError
from ._plugins import Plugins
from ._policy import CallbackPolicy
from ._rules import changed_rule, describe, listing
from ._store import Store

#: What a running bot needs to see a change, said after each one.
_WITHIN = f"a running bot applies it within {RELOAD_SECONDS:.0f} s"


class UsageError(OcoError):
    """A command line that names something wrongly; the message says what and how."""


def operator(options: argparse.Namespace) -> str:
    """Who the audit log says made the change: ``cli/<--as or the OS user>``."""
    name = options.as_name
    if name is None:
        try:
            name = getpass.getuser()
        except (OSError, KeyError):  # no login name and no password entry (a bare container)
            raise UsageError("cannot tell who you are (no login name): say it with --as NAME") from None
    return f"cli/{name}"


def _adapters(loaded: LoadedConfig, plugins: Plugins) -> dict[str, Adapter]:
    """The config's adapters, built but never started: they say how their service folds
    user ids (IRC: case), as the running bot would."""
    built: dict[str, Adapter] = {}
    for index, entry in enumerate(configured_adapters(loaded, plugins)):
        kind = plugins.adapter(entry.type)
        options = validate_section(loaded, ("adapters", index), kind.config_model, entry.options())
        built[entry.instance_name] = kind.create(options)
    return built


def user_id(ref: str, adapters: Mapping[str, Adapter]) -> str:
    """An account as the operator wrote it (``irc/Bob``) → the id messages carry
    (``irc/bob``); UsageError unless it names one of the config's adapters."""
    prefix, sep, native = ref.partition("/")
    adapter = adapters.get(prefix) if sep else None
    if adapter is None or not native:
        raise UsageError(
            f"{ref!r} is not an account of this bot: write it as <adapter>/<user id>, as messages carry it "
            f"(irc/bob, matrix/@bob:example.org); this config's adapters: {', '.join(adapters)}"
        )
    return f"{prefix}/{adapter.user_id(native)}"


async def run(options: argparse.Namespace, loaded: LoadedConfig, plugins: Plugins) -> int:
    """Run ``oco roles ...`` or ``oco rules ...``; returns the exit code (2 for a
    command line that names something wrongly, with one line saying what)."""
    from ._cli import EXIT_USAGE

    try:
        return await _run(options, loaded, plugins)
    except UsageError as exc:
        print(f"oco: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


async def _run(options: argparse.Namespace, loaded: LoadedConfig, plugins: Plugins) -> int:
    by = operator(options) if options.action != "list" else ""
    adapters = _adapters(loaded, plugins) if options.command == "roles" else {}
    async with open_configured_store(loaded, plugins) as store:
        auth = Authorization(store, loaded.config.auth)
        await auth.load()
        if options.command == "roles":
            return await _roles(options, loaded, store, auth, adapters, by)
        return await _rules(options, loaded, store, auth, by)


async def _audit(store: Store, by: str, detail: str, **details: str) -> None:
    await write_now(store, "admin", ALLOWED, user=by, detail=detail, **details)


async def _roles(
    options: argparse.Namespace,
    loaded: LoadedConfig,
    store: Store,
    auth: Authorization,
    adapters: Mapping[str, Adapter],
    by: str,
) -> int:
    settings = loaded.config.auth
    auth.canonical = lambda account: user_id(account, adapters) if account.partition("/")[0] in adapters else account
    if options.action == "list":
        if options.user:
            who = user_id(options.user, adapters)
            roles = auth.roles(who)
            admin = " (admin: auth.admins)" if any(a in auth._admins() for a in auth.accounts(who)) else ""
            if not admin and auth.is_admin(who):
                admin = " (admin: the admin role)"
            accounts = auth.accounts(who)
            print(f"{who}{admin}: roles: {', '.join(roles) or 'none'}")
            if len(accounts) > 1:
                print(f"linked accounts: {', '.join(accounts)}")
            for role in roles:
                print(f"  {role} grants {', '.join(auth.permissions_of(role))}")
            return 0
        rows = [(", ".join(p.accounts), ", ".join(sorted(p.roles)), "store") for p in auth._people.values() if p.roles]
        rows.sort()
        rows += [(admin, ADMIN_ROLE, "config: auth.admins") for admin in settings.admins]
        if settings.default_roles:
            rows.append(("(everyone)", ", ".join(settings.default_roles), "config: auth.default_roles"))
        if not rows:
            print("nobody holds a role; `oco roles grant <adapter>/<user> <role>` gives one", file=sys.stderr)
            return 0
        print_table(("ACCOUNTS", "ROLES", "ORIGIN"), rows, sys.stdout)
        return 0
    who = user_id(options.user, adapters)
    role = options.role
    detail = f"oco roles {options.action} {who} {role}"
    if options.action == "grant":
        if not await auth.grant(who, role):
            print(f"{who} already has the role {role}; nothing changed")
            return 0
        await _audit(store, by, detail, permission=role)
        print(f"{who} now has the role {role} ({_WITHIN})")
        return 0
    if not await auth.revoke(who, role):
        print(f"{who} did not have the role {role} in the store; nothing changed")
    else:
        await _audit(store, by, detail, permission=role)
        print(f"{who} no longer has the role {role} ({_WITHIN})")
    if role == ADMIN_ROLE and any(a in auth._admins() for a in auth.accounts(who)):
        print(f"note: {who} is still an admin: auth.admins in {loaded.source} names them", file=sys.stderr)
    elif role in settings.default_roles:
        print(f"note: everyone holds {role}: auth.default_roles in {loaded.source} names it", file=sys.stderr)
    return 0


async def _rules(options: argparse.Namespace, loaded: LoadedConfig, store: Store, auth: Authorization, by: str) -> int:
    config = loaded.config
    rules = auth.rules
    if options.action == "list":
        rows = listing(config, rules, options.callback or "")
        if options.json:
            for row in rows:
                record = {
                    "callback": row.callback,
                    "route": row.key,
                    **row.rule.model_dump(),
                    "origin": row.origin,
                    "source": row.source,
                    "overridden": row.overridden,
                    "overrides": row.overrides,
                }
                if row.origin == "store":
                    record["time"] = row.time
                print(json.dumps(record))
            return 0
        if not rows:
            which = f" for callback {options.callback!r}" if options.callback else ""
            print(
                f"no route rules{which}; `oco rules set <callback> <route> --permission <p>` makes one", file=sys.stderr
            )
            return 0
        table: list[tuple[str, ...]] = []
        for row in rows:
            if row.origin == "store":
                origin = f"store (set by {row.source}, {local_time(row.time)}" + (
                    "; overrides the config)" if row.overrides else ")"
                )
            else:
                origin = f"config ({row.source}" + ("; overridden by the store)" if row.overridden else ")")
            table.append((row.callback, row.key, *describe(row.rule), origin))
        print_table(("CALLBACK", "ROUTE", "PERMISSION", "ROOMS", "NOT IN", "ORIGIN"), table, sys.stdout)
        return 0
    key = options.route
    detail = f"oco rules {options.action} {options.callback} {key}"
    configured = next((cb for cb in config.callbacks if cb.id == options.callback), None)
    from_config = configured.route_rules.get(key) if configured is not None else None
    if options.action == "unset":
        if not await rules.unset(options.callback, key):
            where = " (the config's rule cannot be removed from here: edit the config)" if from_config else ""
            raise UsageError(
                f"callback {options.callback!r} has no rule for {key!r} in the store{where}; "
                "`oco rules list` shows the rules and their origin"
            )
        await _audit(store, by, detail, callback=options.callback, route=key)
        back = "; the config's rule for it applies again" if from_config is not None else ""
        print(f"removed the stored rule for {options.callback} {key}{back} ({_WITHIN})")
        return 0
    # From the rule in force for that key (a config pattern such as deploy*, say), so the
    # fields not named keep what they were, not the defaults.
    in_force = CallbackPolicy(options.callback, configured).rule(key, rules.for_callback(options.callback))
    try:
        rule = changed_rule(
            in_force,
            permission="" if options.no_permission else options.permission,
            declared_permission=options.declared_permission,
            allow=options.allow,
            any_room=options.any_room,
            deny=options.deny,
            no_deny=options.no_deny,
        )
    except ValueError as exc:
        raise UsageError(f"oco rules set: {exc} (oco rules set --help lists the options)") from None
    await rules.set(options.callback, key, rule, by)
    changes = " ".join(_changes(options))
    await _audit(
        store, by, f"{detail} {changes}", callback=options.callback, route=key, permission=rule.permission or ""
    )
    permission, allow, deny = describe(rule)
    print(
        f"{options.callback} {key}: permission {permission}; rooms: {allow}; not in: {deny} "
        f"(kept in the store{', over the config' if from_config is not None else ''}; {_WITHIN})"
    )
    rooms = (*(rule.allow_rooms or []), *rule.deny_rooms)
    bare = [room for room in rooms if "/" not in room and room != "private" and not set("*?[") & set(room)]
    if bare:
        print(
            f"note: {', '.join(repr(room) for room in bare)} match no room: room ids start with their adapter "
            "(irc/#ops), and a private message is the room 'private'",
            file=sys.stderr,
        )
    if configured is None:
        print(
            f"note: {loaded.source} has no callback {options.callback!r}: the rule applies once a callback "
            "of that id connects",
            file=sys.stderr,
        )
    elif configured.routes and not any(r.id == key or (r.id is None and r.pattern == key) for r in configured.routes):
        ids = ", ".join(repr(r.id or r.pattern) for r in configured.routes)
        print(
            f"note: none of the routes in the config of {options.callback!r} is {key!r} ({ids}); the rule "
            "applies if the callback declares such a route as it connects (or to ids its pattern matches)",
            file=sys.stderr,
        )
    return 0


def _changes(options: argparse.Namespace) -> Sequence[str]:
    """The options of ``oco rules set`` as given, for the audit record."""
    words: list[str] = []
    if options.permission is not None:
        words.append(f"--permission {options.permission}")
    words += ["--no-permission"] * options.no_permission + ["--declared-permission"] * options.declared_permission
    words += [f"--allow {room}" for room in options.allow or []] + ["--any-room"] * options.any_room
    words += [f"--deny {room}" for room in options.deny or []] + ["--no-deny"] * options.no_deny
    return words


__all__: Sequence[str] = ["run", "user_id"]
