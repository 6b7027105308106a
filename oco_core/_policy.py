"""What each callback may do: its capabilities, the operator's rules for its routes, and
its rate limit, all from ``callbacks[]`` in the config. Every refusal is recorded in the
audit log where it is decided, here.

A callback with no entry in the config (registered with ``oco callbacks add`` only) gets
the defaults, which allow everything; the README's Security section says how to narrow
them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ._audit import ALLOWED, DENIED
from ._config import CallbackSettings, Capabilities, Config, RouteRule
from ._errors import CapabilityError, RateLimitedError
from ._proto import robot_pb2
from ._router import Route
from ._timing import TokenBucket

if TYPE_CHECKING:
    from ._auth import Authorization

EVENT_NAMES: dict[int, str] = {robot_pb2.EVENT_KIND_MEMBERSHIP: "membership", robot_pb2.EVENT_KIND_TOPIC: "topic"}

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


@dataclass(frozen=True, slots=True)
class RouteAccess:
    """Who may run one route, and where: the operator's ``route_rules`` over what the
    callback declared."""

    #: The permission a person needs ("" for none).
    permission: str
    allow_rooms: Sequence[str] | None = None
    deny_rooms: Sequence[str] = ()

    def allows_room(self, room_id: str) -> bool:
        """Whether the route may match in ``room_id`` ("" for a private message)."""
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
    ) -> None:
        self.callback_id = callback_id
        self.capabilities = settings.capabilities if settings else Capabilities()
        self.route_rules: dict[str, RouteRule] = dict(settings.route_rules) if settings else {}
        self._where = where or "its entry in callbacks:"
        # rate_limit is per minute, and a whole minute's worth may come at once.
        self._bucket = (
            TokenBucket(settings.rate_limit, settings.rate_limit / 60) if settings and settings.rate_limit else None
        )
        #: The audit log's ``record`` (kind, decision, **details).
        self._record = record or (lambda *args, **details: None)

    def access(self, route: Route) -> RouteAccess:
        """The permission ``route`` needs and the rooms it may match in."""
        rule = self.route_rules.get(route.id)
        if rule is None:
            return RouteAccess(route.permission)
        permission = route.permission if rule.permission is None else rule.permission
        return RouteAccess(permission, rule.allow_rooms, rule.deny_rooms)

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

    def require_send(self, target: str, what: str) -> None:
        """Raise CapabilityError unless the callback may send to ``target`` (a room or user id)."""
        if not matches_any(target, self.capabilities.send):
            allowed = ", ".join(self.capabilities.send) or "nothing"
            raise self._refuse("send", f"{what} goes to {target!r}, and it may send to: {allowed}")

    def require_datastore(self, datastore: str) -> None:
        """Raise CapabilityError unless the callback may use the data store ``datastore``."""
        if not matches_any(datastore, self.capabilities.datastores):
            allowed = ", ".join(self.capabilities.datastores) or "none"
            raise self._refuse("datastores", f"it asked for the data store {datastore!r}, and it may use: {allowed}")

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

    def __init__(self, config: Config, auth: Authorization, record: Record, bot_name: str) -> None:
        self._auth = auth
        self._record = record
        self._rate_limit = config.auth.rate_limit
        self._bot_name = bot_name
        self._policies = {
            cb.id: CallbackPolicy(cb.id, cb, f"callbacks[{i}] ({cb.id})", record)
            for i, cb in enumerate(config.callbacks)
        }

    def policy(self, callback_id: str) -> CallbackPolicy:
        """The callback's capabilities, route rules and rate limit (defaults when the
        config does not name it)."""
        policy = self._policies.get(callback_id)
        if policy is None:
            policy = self._policies[callback_id] = CallbackPolicy(callback_id, record=self._record)
        return policy

    def may_run(self, user_id: str, room_id: str, callback_id: str, route: Route) -> bool:
        """Whether a person may run a route in a room (without recording it), for help."""
        access = self.policy(callback_id).access(route)
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

    def _record(self, kind: str, decision: str, **details: str) -> None:
        self._policies._record(
            kind, decision, user=self._user, person=self._auth.person(self._user), room=self._room, **details
        )

    def _record_route(self, decision: str, callback_id: str, route: Route, **details: str) -> None:
        self._record("route", decision, callback=callback_id, route=route.id, **details)

    def __call__(self, callback_id: str, route: Route) -> bool:
        self.asked += 1
        access = self._policies.policy(callback_id).access(route)
        permission = access.permission
        if not access.allows_room(self._room):
            where = self._room or PRIVATE_ROOM
            self._record_route(DENIED, callback_id, route, detail=f"not allowed in {where}: {self._what}")
            self.wrong_room = self.wrong_room or route.respond
            return False
        if permission:
            decision = self._auth.check(self._user, permission)
            if not decision.allowed:
                self._record_route(
                    DENIED, callback_id, route, permission=permission, detail=f"{decision.reason}: {self._what}"
                )
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
        if permission or route.respond:
            self._record_route(ALLOWED, callback_id, route, permission=permission, detail=self._what)
        return True

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
