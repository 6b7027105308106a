"""The one exception tree of OCO.

::

    OcoError                  anything OCO raises on purpose
    ├── ConfigError           the configuration is malformed or names something unknown
    ├── PluginError           a plugin is missing, broken or misdeclared
    ├── AdapterError          a chat adapter cannot do what was asked
    │   └── UnknownTargetError    no such room or user on that adapter
    ├── StoreError            the core store failed
    │   ├── VersionConflictError       a compare-and-set found another version
    │   ├── StoreUnavailableError      the database cannot be reached (retry later)
    │   ├── ValueTooLargeError         a value or key exceeds the configured limit
    │   └── QuotaExceededError         a namespace's quota (keys or bytes) would be exceeded
    └── CallbackError         a callback program misbehaved or was refused
        ├── InvalidRequestError   a request is malformed (INVALID_ARGUMENT)
        ├── RequestTooLargeError  a message is over the configured size (RESOURCE_EXHAUSTED)
        ├── CapabilityError       the callback lacks a capability (PERMISSION_DENIED)
        └── RateLimitedError      the callback sent more than its rate limit (RESOURCE_EXHAUSTED)

Messages name the thing that was wrong and what to do about it. Only the CLI turns
these into exit codes.
"""

from __future__ import annotations


class OcoError(Exception):
    """Base of every error OCO raises on purpose."""


class ConfigError(OcoError):
    """The configuration is malformed, or names a plugin or value that does not exist."""


class PluginError(OcoError):
    """A plugin could not be found, loaded, or misbehaved when asked for its description."""


class AdapterError(OcoError):
    """A chat adapter could not do what was asked (send, join, part)."""


class UnknownTargetError(AdapterError):
    """The room or user a message or request names does not exist on its adapter."""


class StoreError(OcoError):
    """The core store failed to read or write."""


class VersionConflictError(StoreError):
    """A compare-and-set found a different version than expected.

    ``current`` is the version now stored (0 when the key does not exist).
    """

    def __init__(self, message: str, current: int) -> None:
        super().__init__(message)
        self.current = current


class StoreUnavailableError(StoreError):
    """The store's database cannot be reached; the operation may succeed later."""


class ValueTooLargeError(StoreError):
    """A key or value is larger than the store accepts."""


class QuotaExceededError(StoreError):
    """A write would take a namespace past its quota (number of keys or total bytes).

    ``quota`` names the quota (``max_keys`` or ``max_bytes``), ``limit`` is its value and
    ``namespace`` the namespace that would exceed it. The gRPC edge answers
    RESOURCE_EXHAUSTED.
    """

    def __init__(self, message: str, *, namespace: str, quota: str, limit: int) -> None:
        super().__init__(message)
        self.namespace = namespace
        self.quota = quota
        self.limit = limit


class CallbackError(OcoError):
    """A callback program misbehaved, or the bot refused what it asked."""


class InvalidRequestError(CallbackError):
    """A callback's request is malformed: a bad pattern, a message without a target."""


class RequestTooLargeError(CallbackError):
    """A callback sent a message larger than the bot accepts."""


class CapabilityError(CallbackError):
    """The callback's configuration does not give it the capability a call needs;
    ``capability`` names it. The gRPC edge answers PERMISSION_DENIED."""

    def __init__(self, message: str, *, capability: str) -> None:
        super().__init__(message)
        self.capability = capability


class RateLimitedError(CallbackError):
    """The callback sent more messages than its rate limit allows; ``retry_after`` is
    the seconds until the request would fit. The gRPC edge answers RESOURCE_EXHAUSTED."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
