"""Route rules kept in the core store: who may run a callback's route, and where.

The config seeds them (``callbacks[].route_rules``); admins change them while the bot
runs, from chat (``oco rule set ...``) or from the command line (``oco rules set ...``),
and those changes live in the core store's ``auth`` namespace, one JSON record per rule
under ``rule/<callback id>/<rule key>``. **The store wins**: a stored rule replaces the
config's rule of the same key whole, and is tried first: a route's rule is the stored
one keyed by its id, else the config's keyed by it, else the first stored pattern
(``deploy-*``) matching it, else the first config pattern. ``oco rules unset`` removes a
stored rule, so the config's (if any) applies again. A config edit therefore never silently undoes what an admin
decided at runtime, and ``oco rules list`` shows each rule's origin, and the config rule
a stored one overrides.

Like roles (:mod:`._auth`), the rules are held in memory for checks that never wait,
written through to the store when they change, and read again every
:data:`~._auth.RELOAD_SECONDS`, so every bot on one store sees a change within seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from ._config import CallbackSettings, Config, RouteRule
from ._store import Store

log = logging.getLogger(__name__)

NAMESPACE = "auth"
PREFIX = "rule/"
_PAGE = 500
#: What makes a rule key a shell-style pattern over route ids (as in ``_policy``).
_WILDCARDS = frozenset("*?[")


@dataclass(frozen=True, slots=True)
class StoredRule:
    """One rule an admin set at runtime."""

    callback: str
    #: The route id (or shell-style pattern over route ids) it is for.
    key: str
    rule: RouteRule
    #: Who set it: a chat user id (``irc/alice``) or ``cli/<name>`` for ``oco rules set``.
    by: str = ""
    #: When (Unix time).
    time: float = 0.0

    def to_json(self) -> bytes:
        """The record as stored."""
        data = self.rule.model_dump(exclude_defaults=False)
        if data.get("approval") is None:  # a bot from before approvals refuses the key
            data.pop("approval", None)
        return json.dumps({"rule": data, "by": self.by, "time": self.time}).encode()


def _store_key(callback: str, key: str) -> str:
    return f"{PREFIX}{callback}/{key}"


def callback_id_problem(callback_id: str) -> str | None:
    """What is wrong with ``callback_id`` as a callback id (None: nothing)."""
    try:
        CallbackSettings.model_validate({"id": callback_id})
    except ValidationError as exc:
        message = exc.errors(include_input=False, include_url=False)[0]["msg"].removeprefix("Value error, ")
        return f"invalid callback id {callback_id!r}: {message}"
    return None


def describe(rule: RouteRule) -> tuple[str, str, str]:
    """A rule's permission, allowed rooms and denied rooms as people read them."""
    permission = "(the callback's)" if rule.permission is None else (rule.permission or "(none)")
    if rule.approval is not None:
        timeout = rule.approval.timeout
        within = f"{timeout:g} s" if timeout < 120 else f"{timeout / 60:g} min"
        permission += f"; approval by {rule.approval.count} of {rule.approval.role} within {within}"
    allow = "any" if rule.allow_rooms is None else (", ".join(rule.allow_rooms) or "(none)")
    deny = ", ".join(rule.deny_rooms) or "-"
    return permission, allow, deny


def changed_rule(
    base: RouteRule | None,
    *,
    permission: str | None = None,
    declared_permission: bool = False,
    allow: Sequence[str] | None = None,
    any_room: bool = False,
    deny: Sequence[str] | None = None,
    no_deny: bool = False,
) -> RouteRule:
    """``base`` (the rule in force for that key, None for none) with the fields given
    replaced; the others keep their value. ``permission=""`` needs no permission,
    ``declared_permission`` goes back to what the callback declared; ``any_room``
    lifts ``allow_rooms``, ``no_deny`` empties ``deny_rooms``. ValueError when two
    options contradict each other or nothing would change."""
    if permission is not None and declared_permission:
        raise ValueError("give a permission or ask for the callback's declared one, not both")
    if allow is not None and any_room:
        raise ValueError("give rooms to allow or allow any room, not both")
    if deny is not None and no_deny:
        raise ValueError("give rooms to deny or deny none, not both")
    changes = (permission, allow, deny)
    if changes == (None, None, None) and not (declared_permission or any_room or no_deny):
        raise ValueError("say what to change: a permission, rooms to allow, or rooms to deny")
    fields = (base or RouteRule()).model_dump()
    if permission is not None or declared_permission:
        fields["permission"] = permission
    if allow is not None or any_room:
        fields["allow_rooms"] = None if any_room else list(allow or [])
    if deny is not None or no_deny:
        fields["deny_rooms"] = [] if no_deny else list(deny or [])
    return RouteRule.model_validate(fields)


class RouteRules:
    """The route rules in the store, by callback, read again every few seconds."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._rules: dict[str, dict[str, StoredRule]] = {}
        #: Changes to the rules held in memory so far: what was worked out from them
        #: (``CallbackPolicy.kept_access``) is kept while this stays the same.
        self.version = 0
        # As in Authorization: a reload that overlaps a write keeps what is in memory
        # (its read may predate the write); the next reload catches up.
        self._writes = 0
        self._writing = 0

    async def load(self) -> None:
        """Read every stored rule (set by this bot, another one, or ``oco rules``)."""
        writes, quiet = self._writes, self._writing == 0
        rules: dict[str, dict[str, StoredRule]] = {}
        start = ""
        while True:
            page = await self._store.list(NAMESPACE, PREFIX, start_after=start, limit=_PAGE)
            for item in page:
                callback, sep, key = item.key.removeprefix(PREFIX).partition("/")
                try:
                    if not sep or not key:
                        raise ValueError(item.key)
                    data = json.loads(item.value)
                    stored = StoredRule(
                        callback, key, RouteRule.model_validate(data["rule"]), str(data["by"]), float(data["time"])
                    )
                except (ValueError, TypeError, KeyError, ValidationError):
                    log.warning(
                        "ignoring a malformed route rule %r in the store (oco rules unset removes it)", item.key
                    )
                    continue
                rules.setdefault(callback, {})[key] = stored
            if len(page) < _PAGE:
                break
            start = page[-1].key
        if quiet and self._writing == 0 and writes == self._writes:
            self._rules = rules
            self.version += 1

    def for_callback(self, callback_id: str) -> Mapping[str, RouteRule]:
        """The stored rules of one callback, by key, in key order."""
        found = self._rules.get(callback_id)
        return {key: stored.rule for key, stored in sorted(found.items())} if found else {}

    def stored(self, callback_id: str = "") -> list[StoredRule]:
        """Every stored rule (of one callback, when given), by callback and key."""
        return [
            self._rules[cid][key]
            for cid in sorted(self._rules)
            if not callback_id or cid == callback_id
            for key in sorted(self._rules[cid])
        ]

    def get(self, callback_id: str, key: str) -> StoredRule | None:
        """The stored rule for exactly that key, if any."""
        return self._rules.get(callback_id, {}).get(key)

    @contextlib.asynccontextmanager
    async def _writing_store(self) -> AsyncIterator[None]:
        self._writes += 1
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1

    async def set(self, callback_id: str, key: str, rule: RouteRule, by: str) -> StoredRule:
        """Store ``rule`` for the route (or pattern) ``key`` of a callback, replacing the
        stored one and overriding the config's of that key."""
        stored = StoredRule(callback_id, key, rule, by, time.time())
        async with self._writing_store():
            await self._store.set(NAMESPACE, _store_key(callback_id, key), stored.to_json())
            self._rules.setdefault(callback_id, {})[key] = stored
            self.version += 1
        return stored

    async def unset(self, callback_id: str, key: str) -> bool:
        """Remove the stored rule; False when there was none."""
        async with self._writing_store():
            removed = await self._store.delete(NAMESPACE, _store_key(callback_id, key))
            self._rules.get(callback_id, {}).pop(key, None)
            self.version += 1
        return removed


@dataclass(frozen=True, slots=True)
class ListedRule:
    """One row of ``oco rules list``: a rule and where it comes from."""

    callback: str
    key: str
    rule: RouteRule
    #: ``config`` or ``store``.
    origin: str
    #: For the config: where (``callbacks[0].route_rules``); for the store: who set it.
    source: str
    time: float = 0.0
    #: A config rule that a stored rule of the same key replaces.
    overridden: bool = False
    #: A stored rule that replaces a config rule of the same key.
    overrides: bool = False


def listing(config: Config, rules: RouteRules, callback_id: str = "") -> list[ListedRule]:
    """Every rule in force, config's and store's, with its origin: by callback (in the
    config's order, then those only the store names), each callback's rules in the order
    they are tried (``CallbackPolicy.rule``): keys that are route ids (the config's in its
    order, then keys only the store has), then the store's patterns, then the config's
    patterns; a config rule that a stored one overrides comes right after it, marked
    ``overridden``."""
    configured = {cb.id: (i, cb) for i, cb in enumerate(config.callbacks)}
    order = [cb.id for cb in config.callbacks] + sorted({s.callback for s in rules.stored()} - set(configured))
    rows: list[ListedRule] = []
    for cid in order:
        if callback_id and cid != callback_id:
            continue
        index, settings = configured.get(cid, (-1, None))
        from_config = settings.route_rules if settings is not None else {}
        declared = {r.id or r.pattern for r in settings.routes} if settings is not None else set()

        def pattern(key: str, declared: set[str] = declared) -> bool:
            return bool(_WILDCARDS.intersection(key)) and key not in declared

        stored = {s.key: s for s in rules.stored(cid)}
        exact = [k for k in from_config if not pattern(k)] + sorted(k for k in stored if not pattern(k))
        patterns = sorted(k for k in stored if pattern(k)) + [k for k in from_config if pattern(k)]
        for key in dict.fromkeys(exact + patterns):  # a key both have once, stored first
            found = stored.get(key)
            if found is not None:
                rows.append(
                    ListedRule(cid, key, found.rule, "store", found.by, found.time, overrides=key in from_config)
                )
            if key in from_config:
                where = f"callbacks[{index}].route_rules"
                rows.append(ListedRule(cid, key, from_config[key], "config", where, overridden=found is not None))
    return rows


__all__: Sequence[str] = ["RouteRules", "StoredRule", "callback_id_problem", "changed_rule", "describe", "listing"]
