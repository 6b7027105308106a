"""What each callback may do: its capabilities, the operator's rules for its routes, and
its rate limit, all from ``callbacks[]`` in the config. Every refusal is recorded in the
audit log where it is decided, here.

A callback with no entry in the config (registered with ``oco callbacks add`` only) gets
the defaults, which allow everything; the README's Security section says how to narrow
them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._audit import DENIED
from ._config import CallbackSettings, Capabilities, RouteRule
from ._errors import CapabilityError, RateLimitedError
from ._proto import robot_pb2
from ._router import Route
from ._timing import TokenBucket

EVENT_NAMES: dict[int, str] = {robot_pb2.EVENT_KIND_MEMBERSHIP: "membership", robot_pb2.EVENT_KIND_TOPIC: "topic"}

#: Capabilities a call may need, and the config key that grants each.
CAPABILITIES = ("join", "storage", "directory", "check_permission")


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
        record: Callable[..., None] | None = None,
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
