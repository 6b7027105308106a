"""What each callback may do: its capabilities, the operator's rules for its routes, and
its rate limit, all from ``callbacks[]`` in the config.

A callback with no entry in the config (registered with ``oco callbacks add`` only) gets
the defaults, which allow everything; the README's Security section says how to narrow
them.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field

from ._config import CallbackSettings, Capabilities, RouteRule
from ._errors import CapabilityError, RateLimitedError
from ._proto import robot_pb2

EVENT_NAMES: dict[int, str] = {robot_pb2.EVENT_KIND_MEMBERSHIP: "membership", robot_pb2.EVENT_KIND_TOPIC: "topic"}

#: Capabilities a call may need, and the config key that grants each.
CAPABILITIES = ("join", "storage", "directory", "check_permission")


def matches_any(ident: str, patterns: list[str]) -> bool:
    """Whether ``ident`` (a room or user id) matches one of the shell-style patterns."""
    return any(fnmatch.fnmatchcase(ident, p) for p in patterns)


@dataclass
class TokenBucket:
    """``per_minute`` tokens a minute, in bursts of up to that many."""

    per_minute: int
    tokens: float = field(init=False)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = float(self.per_minute)

    def take(self, count: int = 1) -> float:
        """Take ``count`` tokens and return 0, or take none and return the seconds until
        they would be there (infinity when ``count`` exceeds a whole minute's worth)."""
        now = time.monotonic()
        rate = self.per_minute / 60.0
        self.tokens = min(float(self.per_minute), self.tokens + (now - self.updated) * rate)
        self.updated = now
        if count > self.per_minute:
            return float("inf")
        if self.tokens >= count:
            self.tokens -= count
            return 0.0
        return (count - self.tokens) / rate


class CallbackPolicy:
    """One callback's capabilities, route rules and send rate limit."""

    def __init__(self, callback_id: str, settings: CallbackSettings | None = None, where: str = "") -> None:
        self.callback_id = callback_id
        self.capabilities = settings.capabilities if settings else Capabilities()
        self.route_rules: dict[str, RouteRule] = dict(settings.route_rules) if settings else {}
        self._where = where or "its entry in callbacks:"
        self._bucket = TokenBucket(settings.rate_limit) if settings and settings.rate_limit else None

    def _refuse(self, capability: str, what: str) -> CapabilityError:
        return CapabilityError(
            f"callback {self.callback_id!r} lacks the capability {capability!r}: {what} "
            f"(grant it in {self._where} capabilities.{capability.split(' ')[0]})",
            capability=capability,
        )

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
        if wait == float("inf"):
            raise RateLimitedError(
                f"callback {self.callback_id!r} may send {self._bucket.per_minute} messages a minute "
                f"(rate_limit); a request of {count} can never fit: split it",
                retry_after=wait,
            )
        if wait > 0:
            raise RateLimitedError(
                f"callback {self.callback_id!r} is over its rate limit of {self._bucket.per_minute} messages "
                f"a minute; retry in {wait:.1f} s",
                retry_after=wait,
            )
