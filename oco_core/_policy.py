"""What each callback may do: its capabilities, the operator's rules for its routes, and
its rate limit, all from ``callbacks[]`` in the config. Every refusal is recorded in the
audit log where it is decided, here.

A callback with no entry in the config (registered with ``oco callbacks add`` only) gets
the defaults, which allow everything; the README's Security section says how to narrow
them.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from ._audit import ALLOWED, DENIED
from ._config import CallbackSettings, Capabilities, Config, RouteRule
from ._errors import CapabilityError, RateLimitedError
from ._proto import robot_pb2
from ._router import ApprovalNeed, Route
from ._timing import TokenBucket

if TYPE_CHECKING:
    from ._auth import Authorization
    from ._rules import RouteRules

log = logging.getLogger(__name__)

EVENT_NAMES: dict[int, str] = {
    robot_pb2.EVENT_KIND_MEMBERSHIP: "membership",
    robot_pb2.EVENT_KIND_TOPIC: "topic",
    robot_pb2.EVENT_KIND_REACTION: "reaction",
    robot_pb2.EVENT_KIND_EDIT: "edit",
}

#: Capabilities a call may need, and the config key that grants each.
CAPABILITIES = ("join", "storage", "directory", "check_permission")


class Record(Protocol):
    """The audit log's ``record``: one record of ``kind`` with ``decision`` and details."""

    def __call__(self, kind: str, decision: str, **details: str) -> object: ...


#: Where a route's room rules see a private message.
PRIVATE_ROOM = "private"


def matches_any(ident: str, patterns: Sequence[str]) -> bool:
    """Whether ``ident`` (a room or user id) matches one of the shell-style patterns."""
    return any(fnmatch.fnmatchcase(ident, p) for p in patterns)


#: Rewrites room patterns from the config into the ids messages carry (see fold_patterns).
CanonicalRooms = Callable[[Sequence[str]], Sequence[str]]

_WILDCARDS = frozenset("*?[")


@functools.lru_cache(maxsize=1024)
def _pattern_parts(pattern: str) -> tuple[tuple[bool, str], ...]:
    """A shell-style pattern as (is_literal, text) parts: literal runs, and the ``*``,
    ``?`` and ``[...]`` that fnmatch gives a meaning (a ``[`` without its ``]`` is
    literal there, so it is here)."""
    parts: list[tuple[bool, str]] = []
    literal = ""
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c in "*?":
            parts += [(True, literal)] if literal else []
            parts.append((False, c))
            literal = ""
            i += 1
            continue
        if c == "[":
            j = i + 1
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":  # a ] first in the set is a member
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j < n:
                parts += [(True, literal)] if literal else []
                parts.append((False, pattern[i : j + 1]))
                literal = ""
                i = j + 1
                continue
        literal += c
        i += 1
    if literal:
        parts.append((True, literal))
    return tuple(parts)


def fold_pattern(pattern: str, fold: Callable[[str], str]) -> str:
    """``pattern`` with its literal text folded by ``fold`` (an adapter's ``room_id``)
    and its wildcards kept: ``#Ops-*`` → ``#ops-*`` on IRC. In a ``[...]`` set each
    member character is folded alone (``[A-C]`` → ``[a-c]``)."""
    out: list[str] = []
    for literal, text in _pattern_parts(pattern):
        if literal:
            out.append(fold(text))
        elif text.startswith("["):
            start = 2 if text.startswith("[!") else 1
            members = "".join(c if c in "-]" else _fold_char(c, fold) for c in text[start:-1])
            out.append(text[:start] + members + "]")
        else:
            out.append(text)
    return "".join(out)


def _fold_char(c: str, fold: Callable[[str], str]) -> str:
    folded = fold(c)
    return folded if len(folded) == 1 else c


def fold_patterns(patterns: Sequence[str], folds: Mapping[str, Callable[[str], str]]) -> list[str]:
    """Room (or user) patterns as written in the config → patterns over the ids messages
    carry, folded by the adapter each names before its ``/`` (``folds``: adapter name →
    its ``room_id``). A wildcard adapter name (``*/#Ops``) becomes one pattern per
    adapter it matches; patterns naming no known adapter are kept as written."""
    out: list[str] = []
    for pattern in patterns:
        prefix, sep, rest = pattern.partition("/")
        if not sep:
            out.append(pattern)
        elif not _WILDCARDS.intersection(prefix):
            fold = folds.get(prefix)
            out.append(f"{prefix}/{fold_pattern(rest, fold)}" if fold is not None else pattern)
        else:
            named = [(name, f) for name, f in folds.items() if fnmatch.fnmatchcase(name, prefix)]
            out += [f"{name}/{fold_pattern(rest, f)}" for name, f in named] or [pattern]
    return out


def _as_written(patterns: Sequence[str]) -> Sequence[str]:
    return patterns


def _rule_names_route(name: str, route_id: str, declared: Collection[str] = ()) -> bool:
    """Whether the ``route_rules`` key ``name`` covers the route ``route_id``: the same
    id, or a shell-style pattern matching it, unless ``name`` is itself the id of a
    declared route (a route without an id has its regex for one: ``help.*``)."""
    if name == route_id:
        return True
    return name not in declared and bool(_WILDCARDS.intersection(name)) and fnmatch.fnmatchcase(route_id, name)


@dataclass(frozen=True, slots=True)
class RouteAccess:
    """Who may run one route, and where: the operator's ``route_rules`` over what the
    callback declared."""

    #: The permission a person needs ("" for none).
    permission: str
    allow_rooms: Sequence[str] | None = None
    deny_rooms: Sequence[str] = ()
    #: Who must approve a match first (the rule's, else the route's); None: nobody.
    approval: ApprovalNeed | None = None

    def allows_room(self, room_id: str) -> bool:
        """Whether the route may match in ``room_id`` ("" for a private message). The
        patterns are over the ids messages carry (already folded by fold_patterns)."""
        if self.allow_rooms is None and not self.deny_rooms:
            return True  # most routes: no room rule to match
        where = room_id or PRIVATE_ROOM
        if matches_any(where, self.deny_rooms):
            return False
        return self.allow_rooms is None or matches_any(where, self.allow_rooms)


class CallbackPolicy:
    """One callback's capabilities, route rules and send rate limit."""

    def __init__(
        self,
        callback_id: str,
        settings: CallbackSettings | None = None,
        where: str = "",
        record: Record | None = None,
        canonical_rooms: CanonicalRooms = _as_written,
    ) -> None:
        self.callback_id = callback_id
        self.capabilities = settings.capabilities if settings else Capabilities()
        self.route_rules: dict[str, RouteRule] = dict(settings.route_rules) if settings else {}
        self._where = where or "its entry in callbacks:"
        #: Folds room patterns as the adapters fold room ids (irc/#Ops → irc/#ops); asked
        #: at each check, since an IRC server says how it folds only once connected.
        self._canonical_rooms = canonical_rooms
        #: Rules already warned about as naming no route the callback declared.
        self._warned: set[str] = set()
        #: The ids of every route it declared so far (in config, or as it connected).
        self._declared: set[str] = {r.id or r.pattern for r in settings.routes} if settings else set()
        # rate_limit is per minute, and a whole minute's worth may come at once.
        self._rate_limit = settings.rate_limit if settings else None
        self._bucket = (
            TokenBucket(settings.rate_limit, settings.rate_limit / 60) if settings and settings.rate_limit else None
        )
        #: The audit log's ``record`` (kind, decision, **details).
        self._record = record or (lambda *args, **details: None)
        #: What :meth:`kept_access` worked out, by route id: the stored rules' version
        #: it was worked out at, the route, its rule, and its access (None when the
        #: rule names rooms, which are folded anew each time).
        self._accesses: dict[str, tuple[int, Route, RouteRule | None, RouteAccess | None]] = {}

    def carry_over(self, previous: CallbackPolicy) -> None:
        """Keep what ``previous`` (this callback's policy before a live reload) learnt:
        the routes it declared, the rules already warned about, and, under the same rate
        limit, what it has used of it."""
        self._declared |= previous._declared
        self._accesses.clear()  # a declared id is never a rule pattern: rules may name other routes now
        self._warned |= previous._warned
        if previous._rate_limit == self._rate_limit:
            self._bucket = previous._bucket

    def rule(self, route_id: str, stored: Mapping[str, RouteRule] | None = None) -> RouteRule | None:
        """The operator's rule for a route. ``stored``: the rules admins set at runtime
        (``_rules``, in key order), which win over the config's: the first found of the
        stored rule keyed by the route's id, the config's keyed by it, the first stored
        pattern key (``deploy*``) that matches it, the first config pattern key that
        does (in the order the config lists them). A stored rule replaces the config's
        of the same key whole. ``_rules.listing`` lists them in this order."""
        stored = stored or {}
        for rules in (stored, self.route_rules):
            rule = rules.get(route_id)
            if rule is not None:
                return rule
        for rules in (stored, self.route_rules):
            for name, rule in rules.items():
                if (rules is stored or name not in stored) and _rule_names_route(name, route_id, self._declared):
                    return rule
        return None

    def access(self, route: Route, stored: Mapping[str, RouteRule] | None = None) -> RouteAccess:
        """The permission ``route`` needs and the rooms it may match in (``stored``: as
        for :meth:`rule`)."""
        return self._access_of(route, self.rule(route.id, stored))

    def kept_access(self, route: Route, stored: RouteRules) -> RouteAccess:
        """:meth:`access` with the rules ``stored`` holds for this callback, worked out
        once and kept until they change (``stored.version``), the callback declares
        routes (:meth:`check_rules`: a declared id is never a rule pattern) or the
        route differs; a reload makes a new policy. The gate asks for every route
        that matches every message: looking the rules up cost more than the match."""
        kept = self._accesses.get(route.id)
        if kept is not None and kept[0] == stored.version:
            was = kept[1]
            if was is route or (was.permission == route.permission and was.approval == route.approval):
                return kept[3] or self._access_of(route, kept[2])
        version = stored.version
        rule = self.rule(route.id, stored.for_callback(self.callback_id))
        access = self._access_of(route, rule)
        # Room patterns are folded as the adapters fold room ids, which IRC settles only
        # once connected to its server: an access with rooms is worked out each time.
        rooms = rule is not None and (rule.allow_rooms is not None or bool(rule.deny_rooms))
        self._accesses[route.id] = (version, route, rule, None if rooms else access)
        return access

    def _access_of(self, route: Route, rule: RouteRule | None) -> RouteAccess:
        if rule is None:
            return RouteAccess(route.permission, approval=route.approval)
        permission = route.permission if rule.permission is None else rule.permission
        allow = None if rule.allow_rooms is None else self._canonical_rooms(rule.allow_rooms)
        approval = route.approval
        if rule.approval is not None:
            approval = ApprovalNeed(rule.approval.role, rule.approval.count, rule.approval.timeout)
        return RouteAccess(permission, allow, self._canonical_rooms(rule.deny_rooms), approval)

    def unmatched_rules(self, route_ids: Sequence[str]) -> list[str]:
        """The ``route_rules`` keys that name none of ``route_ids``."""
        return [
            name for name in self.route_rules if not any(_rule_names_route(name, r, self._declared) for r in route_ids)
        ]

    def check_rules(self, routes: Sequence[Route]) -> None:
        """Note the routes the callback declared as it connects (before they go live: a
        key that is one of their ids is never a pattern), and warn, once per rule,
        about ``route_rules`` that name none of them: such a rule protects nothing, and a
        typo in a route id would otherwise leave the route open without a word."""
        ids = [route.id for route in routes]
        self._declared.update(ids)
        self._accesses.clear()  # as in carry_over
        for name in self.unmatched_rules(ids):
            if name not in self._warned:
                self._warned.add(name)
                log.warning(
                    "%s: route_rules.%s names no route the callback declared as it connected, so it applies to "
                    "nothing (its routes: %s); rules match a route's id (its pattern when it has none) exactly, or "
                    "as a shell-style pattern such as 'deploy*'",
                    self._where,
                    name,
                    ", ".join(repr(i) for i in ids) or "none",
                )

    def _refuse(self, capability: str, what: str) -> CapabilityError:
        """The error for a missing capability, recorded in the audit log."""
        error = CapabilityError(
            f"callback {self.callback_id!r} lacks the capability {capability!r}: {what} "
            f"(grant it in {self._where} capabilities.{capability})",
            capability=capability,
        )
        self._record("capability", DENIED, callback=self.callback_id, permission=capability, detail=str(error))
        return error

    def require(self, capability: str) -> None:
        """Raise CapabilityError unless ``capability`` (one of CAPABILITIES) is granted."""
        if not getattr(self.capabilities, capability):
            raise self._refuse(capability, f"the call needs {capability}")

    @property
    def sends_anywhere(self) -> bool:
        """Whether the callback may send everywhere (``capabilities.send`` has "*", the
        default): :meth:`require_send` has nothing to fold or match."""
        return "*" in self.capabilities.send

    def require_send(self, target: str, what: str) -> None:
        """Raise CapabilityError unless the callback may send to ``target`` (a room or
        user id as messages carry it: the one the adapter delivers to)."""
        if self.sends_anywhere:
            return
        if not matches_any(target, self._canonical_rooms(self.capabilities.send)):
            allowed = ", ".join(self.capabilities.send) or "nothing"
            raise self._refuse("send", f"{what} goes to {target!r}, and it may send to: {allowed}")

    def require_datastore(self, datastore: str) -> None:
        """Raise CapabilityError unless the callback may use the data store ``datastore``."""
        if not matches_any(datastore, self.capabilities.datastores):
            allowed = ", ".join(self.capabilities.datastores) or "none"
            raise self._refuse("datastores", f"it asked for the data store {datastore!r}, and it may use: {allowed}")

    def require_topic(self, capability: Literal["publish", "subscribe"], topic: str) -> None:
        """Raise CapabilityError unless the callback may publish to ``topic``, or
        subscribe to every topic the pattern ``topic`` names."""
        from ._events import topic_covers

        allowed: list[str] = getattr(self.capabilities, capability)
        if not any(topic_covers(grant, topic) for grant in allowed):
            raise self._refuse(
                capability,
                f"it asked to {capability} {topic!r}, and it may {capability}: {', '.join(allowed) or 'none'}",
            )

    def require_events(self, kinds: set[int]) -> None:
        """Raise CapabilityError unless every event kind in ``kinds`` is allowed."""
        for kind in sorted(kinds):
            name = EVENT_NAMES.get(kind)
            if name is not None and name not in self.capabilities.events:
                raise self._refuse("events", f"it asked for {name} events")

    def take_send(self, count: int) -> None:
        """Count ``count`` messages against the rate limit, or raise RateLimitedError."""
        if self._bucket is None or count == 0:
            return
        wait = self._bucket.take(count)
        if wait == 0:
            return
        if wait == float("inf"):
            message = (
                f"callback {self.callback_id!r} may send {self._bucket.capacity:.0f} messages a minute "
                f"(rate_limit); a request of {count} can never fit: split it"
            )
        else:
            message = (
                f"callback {self.callback_id!r} is over its rate limit of {self._bucket.capacity:.0f} messages "
                f"a minute; retry in {wait:.1f} s"
            )
        self._record("rate_limit", DENIED, callback=self.callback_id, detail=message)
        raise RateLimitedError(message, retry_after=wait)


class Policies:
    """Every callback's policy, and the gate each incoming message passes: the operator's
    room rules, the person's permissions and the person's rate limit."""

    def __init__(
        self,
        config: Config,
        auth: Authorization,
        record: Record,
        bot_name: str,
        canonical_rooms: CanonicalRooms = _as_written,
    ) -> None:
        self._auth = auth
        self._record = record
        self._rate_limit = config.auth.rate_limit
        self._bot_name = bot_name
        self._canonical_rooms = canonical_rooms
        self._policies = {
            cb.id: CallbackPolicy(cb.id, cb, f"callbacks[{i}] ({cb.id})", record, canonical_rooms)
            for i, cb in enumerate(config.callbacks)
        }
        for i, cb in enumerate(config.callbacks):
            # Routes declared only as the callback connects are checked then (check_rules).
            if cb.routes:
                ids = [route.id or route.pattern for route in cb.routes]
                for name in self._policies[cb.id].unmatched_rules(ids):
                    log.warning(
                        "callbacks[%d] (%s): route_rules.%s names none of the routes in its config (%s); it "
                        "applies only if the callback declares such a route as it connects. Rules match a route's "
                        "id (its pattern when it has none) exactly, or as a shell-style pattern such as 'deploy*'",
                        i,
                        cb.id,
                        name,
                        ", ".join(repr(r) for r in ids),
                    )

    def set_rate_limit(self, limit: int | None) -> None:
        """A new ``auth.rate_limit`` (a live reload)."""
        self._rate_limit = limit

    def reconfigure(self, callback_id: str, settings: CallbackSettings | None, where: str = "") -> None:
        """A live reload: the callback's new settings (None: it is gone). What the
        callback declared as it connected stays known, and when its rate limit is
        unchanged, so does what it has used of it."""
        previous = self._policies.pop(callback_id, None)
        if settings is None:
            return
        policy = CallbackPolicy(callback_id, settings, where, self._record, self._canonical_rooms)
        if previous is not None:
            policy.carry_over(previous)
        self._policies[callback_id] = policy

    def policy(self, callback_id: str) -> CallbackPolicy:
        """The callback's capabilities, route rules and rate limit (defaults when the
        config does not name it)."""
        policy = self._policies.get(callback_id)
        if policy is None:
            policy = self._policies[callback_id] = CallbackPolicy(
                callback_id, record=self._record, canonical_rooms=self._canonical_rooms
            )
        return policy

    def rule(self, callback_id: str, key: str) -> RouteRule | None:
        """The rule in force for the route (or pattern) ``key`` of a callback: stored or
        the config's, keyed by it or by a pattern matching it (see CallbackPolicy.rule)."""
        policy = self._policies.get(callback_id) or CallbackPolicy(callback_id, canonical_rooms=self._canonical_rooms)
        return policy.rule(key, self._auth.rules.for_callback(callback_id))

    def access(self, callback_id: str, route: Route) -> RouteAccess:
        """Who may run ``route`` of a callback, and where: the rules admins set at
        runtime (kept in the store) over the config's, over what the callback declared."""
        policy = self._policies.get(callback_id) or self.policy(callback_id)
        return policy.kept_access(route, self._auth.rules)

    def may_run(self, user_id: str, room_id: str, callback_id: str, route: Route) -> bool:
        """Whether a person may run a route in a room (without recording it), for help."""
        access = self.access(callback_id, route)
        if not access.allows_room(room_id):
            return False
        return not access.permission or self._auth.check(user_id, access.permission).allowed

    def gate(self, user_id: str, room_id: str, respond_text: str | None) -> MessageGate:
        """The gate for one incoming message (``respond_text``: what was addressed to the
        bot, None for a message it overheard)."""
        return MessageGate(self, user_id, room_id, respond_text)


class MessageGate:
    """Decides, for one incoming message, which routes that matched may receive it; it
    records every decision in the audit log and knows what to tell the person."""

    def __init__(self, policies: Policies, user_id: str, room_id: str, respond_text: str | None) -> None:
        self._policies = policies
        self._auth = policies._auth
        self._user = user_id
        self._room = room_id
        self._addressed = respond_text is not None
        self._what = (respond_text or "")[:200]
        self._wait: float | None = None
        self.missing: list[str] = []
        self.wrong_room = False
        #: Routes that matched and were asked about: none means no route matched at all.
        self.asked = 0
        #: Admitted matches held back for approval (``_approvals``), not delivered.
        self.held: list[tuple[str, Route, ApprovalNeed]] = []

    def _record(self, kind: str, decision: str, **details: str) -> None:
        self._policies._record(
            kind, decision, user=self._user, person=self._auth.person(self._user), room=self._room, **details
        )

    def _record_route(self, decision: str, callback_id: str, route: Route, permission: str, detail: str) -> None:
        # Every delivered respond match is recorded: one call down, not three with **details.
        self._policies._record(
            "route",
            decision,
            user=self._user,
            person=self._auth.person(self._user),
            room=self._room,
            callback=callback_id,
            route=route.id,
            permission=permission,
            detail=detail,
        )

    def __call__(self, callback_id: str, route: Route) -> bool:
        self.asked += 1
        access = self._policies.access(callback_id, route)
        permission = access.permission
        if not access.allows_room(self._room):
            where = self._room or PRIVATE_ROOM
            self._record_route(DENIED, callback_id, route, "", f"not allowed in {where}: {self._what}")
            self.wrong_room = self.wrong_room or route.respond
            return False
        if permission:
            decision = self._auth.check(self._user, permission)
            if not decision.allowed:
                self._record_route(DENIED, callback_id, route, permission, f"{decision.reason}: {self._what}")
                if route.respond and permission not in self.missing:
                    self.missing.append(permission)
                return False
        if self._wait is None:  # one command, however many routes it matches
            self._wait = self._auth.take(self._user)
            if self._wait:
                limit = self._policies._rate_limit
                self._record("rate_limit", DENIED, detail=f"over {limit} commands a minute: {self._what}")
        if self._wait:
            return False
        if access.approval is not None:
            self.held.append((callback_id, route, access.approval))
            return False
        if permission or route.respond:
            self._record_route(ALLOWED, callback_id, route, permission, self._what)
        return True

    @property
    def refused(self) -> bool:
        """Whether anything was refused that :meth:`refusal` might have to tell."""
        return bool(self._wait or self.missing or self.wrong_room)

    def refusal(self, delivered: bool) -> str:
        """What to tell the person: one line, or "" when nothing was refused that they
        asked for (overheard messages are refused silently, and recorded)."""
        if self._wait and self._addressed and self._auth.should_warn(self._user, self._wait):
            return (
                f"slow down: you may run {self._policies._rate_limit} commands a minute; "
                f"commands in the next {self._wait:.0f} s are ignored"
            )
        if delivered or not self._addressed:
            return ""
        if self.missing:
            needed = " or ".join(f"`{p}`" for p in self.missing)
            name = self._policies._bot_name
            return f"you need the permission {needed} for that; `{name} who can {self.missing[0]}` says who has it"
        if self.wrong_room:
            return "that command is not available here"
        return ""
