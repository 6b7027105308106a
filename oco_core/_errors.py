"""The one exception tree of OCO, and how its errors cross the gRPC API.

::

    OcoError                  anything OCO raises on purpose
    ├── ConfigError           the configuration is malformed or names something unknown
    ├── PluginError           a plugin is missing, broken or misdeclared
    ├── SecretRefusedError    `oco callbacks add/rotate/remove` refused (secret present, absent, configured)
    ├── StandbyError          this bot is a standby (or fenced): ask the active one (UNAVAILABLE; ``active_address``)
    ├── ApprovalDeniedError   people in chat denied a callback's request for approval, or it timed out (SDK only)
    ├── QuestionUnansweredError  a callback's question got no answer: timed out or cancelled (SDK only)
    ├── AdapterError          a chat adapter cannot do what was asked (UNAVAILABLE; ``sent``)
    │   └── UnknownTargetError    no such room or user on that adapter (NOT_FOUND)
    ├── StoreError            the core store failed
    │   ├── VersionConflictError       a compare-and-set found another version (ABORTED; ``current``)
    │   ├── StoreUnavailableError      the database cannot be reached, retry later (UNAVAILABLE)
    │   ├── ValueTooLargeError         a value or key exceeds the configured limit (RESOURCE_EXHAUSTED)
    │   └── QuotaExceededError         a namespace's quota (keys or bytes) would be exceeded
    │                                  (RESOURCE_EXHAUSTED; ``quota``, ``limit``, ``namespace``)
    └── CallbackError         a callback program misbehaved or was refused
        ├── InvalidRequestError   a request is malformed (INVALID_ARGUMENT)
        │   └── InvalidPatternError   a route pattern is not RE2 (also a ValueError; ``pattern``, ``reason``)
        ├── RequestTooLargeError  a message is over the configured size (RESOURCE_EXHAUSTED)
        ├── CapabilityError       the callback lacks a capability (PERMISSION_DENIED; ``capability``)
        ├── DataStoreUnavailableError  the bot offers no such data store (FAILED_PRECONDITION; ``datastore``)
        └── RateLimitedError      the callback sent more than its rate limit (RESOURCE_EXHAUSTED; ``retry_after``)

Messages name the thing that was wrong and what to do about it. Only the CLI turns
these into exit codes.

On the wire
-----------

:data:`WIRE` is the one table of how each class crosses the gRPC API: its status code
(the codes in brackets above; INTERNAL for the rest) and the attributes it carries. The
bot's edge turns an error into a status with :func:`to_status` (details, plus trailing
metadata naming the class and its attributes); the SDK turns it back with
:func:`from_status`. On SendMessageStream the same travels inside ``SendResult``
(:func:`to_wire`, :func:`from_wire`). The keys, documented for other languages in
proto/oco/robot.proto:

- ``oco-error-type``: the class name, e.g. ``RateLimitedError``;
- ``oco-error-<attribute>`` for each attribute, ``_`` written ``-``: ``oco-error-retry-after: 1.25``,
  ``oco-error-current: 7``; values percent-encoded UTF-8.

A status without them (an older or another bot, a refusal made before any of this code
runs) still becomes an exception: the class its code implies (:data:`IMPLIED`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import grpc


class OcoError(Exception):
    """Base of every error OCO raises on purpose."""


class ConfigError(OcoError):
    """The configuration is malformed, or names a plugin or value that does not exist."""


class PluginError(OcoError):
    """A plugin could not be found, loaded, or misbehaved when asked for its description."""


class SecretRefusedError(OcoError):
    """``oco callbacks add/rotate/remove`` refused: the callback already has a secret,
    has none, or the configuration sets its secret itself."""


class AdapterError(OcoError):
    """A chat adapter could not do what was asked (send, join, part).

    ``sent``: when sending a request of several messages failed part-way, how many of
    them had already gone out (None when not known or not a send). The gRPC edge answers
    UNAVAILABLE. A bot that stops being the active one (``ha:``) part-way through a
    request raises this too (with ``sent`` > 0), not :class:`StandbyError`: the SDK
    resends a refused request to the active bot whole, which would repeat what went out.
    """

    def __init__(self, message: str, *, sent: int | None = None) -> None:
        super().__init__(message)
        self.sent = sent


class UnknownTargetError(AdapterError):
    """The room or user a message or request names does not exist on its adapter.
    The gRPC edge answers NOT_FOUND."""


class StandbyError(OcoError):
    """This bot is a standby (``ha:``), or an active one that could not renew its lease
    and stopped acting: only the active bot sends to chat, publishes and takes webhooks.

    ``active_address`` is the active bot's gRPC address as its lease record says ("" when
    none is known); the gRPC edge answers UNAVAILABLE with it in trailing metadata
    (``oco-error-active-address``), and the SDK retries there.
    """

    def __init__(self, message: str, *, active_address: str = "") -> None:
        super().__init__(message)
        self.active_address = active_address


class StoreError(OcoError):
    """The core store failed to read or write."""


class VersionConflictError(StoreError):
    """A compare-and-set found a different version than expected.

    ``current`` is the version now stored (0 when the key does not exist; -1 when a bot
    answered ABORTED without saying). The gRPC edge answers ABORTED.
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


#: The exit status of a launched callback that must not be restarted: the bot refused it
#: (bad secret, bad pattern) and starting it again cannot help. EX_CONFIG of sysexits.h,
#: as systemd's RestartPreventExitStatus= would be used; any language's callback may use it.
EXIT_REFUSED = 78


class InvalidRequestError(CallbackError):
    """A callback's request is malformed: a bad pattern, a message without a target."""


class InvalidPatternError(InvalidRequestError, ValueError):
    """A route's pattern is not valid RE2 syntax (``pattern``, and ``reason`` as RE2 put it).

    Also a ValueError, as it was before it joined this tree."""

    def __init__(self, pattern: str, reason: str) -> None:
        super().__init__(f"invalid pattern {pattern!r}: {reason} (patterns use RE2 syntax, as Go's regexp)")
        self.pattern = pattern
        self.reason = reason


class RequestTooLargeError(CallbackError):
    """A callback sent a message larger than the bot accepts."""


class CapabilityError(CallbackError):
    """The callback's configuration does not give it the capability a call needs;
    ``capability`` names it ("" when a bot answered PERMISSION_DENIED without saying).
    The gRPC edge answers PERMISSION_DENIED."""

    def __init__(self, message: str, *, capability: str) -> None:
        super().__init__(message)
        self.capability = capability


class DataStoreUnavailableError(CallbackError):
    """A callback requires (or asked for) a specific data store that this bot does not
    offer; ``datastore`` names its type. The gRPC edge answers FAILED_PRECONDITION."""

    def __init__(self, message: str, *, datastore: str) -> None:
        super().__init__(message)
        self.datastore = datastore


class RateLimitedError(CallbackError):
    """The callback sent more messages than its rate limit allows; ``retry_after`` is
    the seconds until the request would fit (``inf`` when it never can: split it). The
    gRPC edge answers RESOURCE_EXHAUSTED."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ApprovalDeniedError(OcoError):
    """A callback's ``message.request_approval(...)`` was denied in chat, or nobody
    approved it in time (``timed_out``); the message says who denied it and why. Raised
    by the SDK from RequestApproval's answer, never sent as a gRPC status."""

    def __init__(self, message: str, *, approval_id: str = "", timed_out: bool = False) -> None:
        super().__init__(message)
        self.approval_id = approval_id
        self.timed_out = timed_out


class QuestionUnansweredError(OcoError):
    """A callback's ``message.ask(...)`` got no answer: the time ran out (``timed_out``),
    or the question was cancelled (a newer question to the same person there, or
    Robot.CancelQuestion). Raised by the SDK from Event.answer, never sent as a gRPC status."""

    def __init__(self, message: str, *, question_id: str = "", timed_out: bool = False) -> None:
        super().__init__(message)
        self.question_id = question_id
        self.timed_out = timed_out


# ---- on the wire --------------------------------------------------------------------

#: Trailing-metadata key naming the error's class.
TYPE_KEY = "oco-error-type"
#: Prefix of the trailing-metadata keys that carry the error's attributes.
FIELD_PREFIX = "oco-error-"

_Parse = Callable[[str], Any]


@dataclass(frozen=True, slots=True)
class WireType:
    """How one error class crosses gRPC.

    ``fields``: the attributes carried, each with how to read it back from text;
    ``optional`` names those that may be absent (None). ``build`` makes the exception
    from its message and attributes (default: ``kind(message, **attributes)``).
    """

    kind: type[OcoError]
    code: grpc.StatusCode
    fields: Mapping[str, _Parse] = field(default_factory=dict)
    optional: frozenset[str] = frozenset()
    build: Callable[[str, dict[str, Any]], OcoError] | None = None

    def make(self, message: str, attributes: dict[str, Any]) -> OcoError:
        """The exception, from its message and attributes."""
        if self.build is not None:
            return self.build(message, attributes)
        maker: Callable[..., OcoError] = self.kind
        return maker(message, **attributes)


def _entry(
    kind: type[OcoError],
    code: grpc.StatusCode,
    build: Callable[[str, dict[str, Any]], OcoError] | None = None,
    optional: Iterable[str] = (),
    **fields: _Parse,
) -> WireType:
    return WireType(kind, code, fields, frozenset(optional), build)


_C = grpc.StatusCode

#: Every class of the tree, most specific first: its status code and the attributes that
#: travel with it. The edge and the SDK both read this; nothing else maps errors to codes.
WIRE: tuple[WireType, ...] = (
    _entry(InvalidPatternError, _C.INVALID_ARGUMENT, lambda _, a: InvalidPatternError(**a), pattern=str, reason=str),
    _entry(InvalidRequestError, _C.INVALID_ARGUMENT),
    _entry(RequestTooLargeError, _C.RESOURCE_EXHAUSTED),
    _entry(RateLimitedError, _C.RESOURCE_EXHAUSTED, retry_after=float),
    _entry(CapabilityError, _C.PERMISSION_DENIED, capability=str),
    _entry(DataStoreUnavailableError, _C.FAILED_PRECONDITION, datastore=str),
    _entry(CallbackError, _C.INTERNAL),
    _entry(ValueTooLargeError, _C.RESOURCE_EXHAUSTED),
    _entry(QuotaExceededError, _C.RESOURCE_EXHAUSTED, namespace=str, quota=str, limit=int),
    _entry(VersionConflictError, _C.ABORTED, current=int),
    _entry(StoreUnavailableError, _C.UNAVAILABLE),
    _entry(StoreError, _C.INTERNAL),
    _entry(UnknownTargetError, _C.NOT_FOUND, optional=["sent"], sent=int),
    _entry(AdapterError, _C.UNAVAILABLE, optional=["sent"], sent=int),
    _entry(SecretRefusedError, _C.INTERNAL),
    _entry(StandbyError, _C.UNAVAILABLE, active_address=str),
    # Never sent by the bot (RequestApproval answers a decision); listed for completeness.
    _entry(ApprovalDeniedError, _C.INTERNAL, approval_id=str, timed_out=lambda text: text.lower() == "true"),
    # Never sent by the bot either (Event.answer says how a question ended).
    _entry(QuestionUnansweredError, _C.INTERNAL, question_id=str, timed_out=lambda text: text.lower() == "true"),
    _entry(ConfigError, _C.INTERNAL),
    _entry(PluginError, _C.INTERNAL),
    _entry(OcoError, _C.INTERNAL),
)
_BY_CLASS = {w.kind: w for w in WIRE}
_BY_NAME = {w.kind.__name__: w for w in WIRE}

#: The class a status code implies when the status names none (an older or another bot,
#: or a refusal the edge makes before the bot's code runs); other codes: CallbackError.
IMPLIED: Mapping[grpc.StatusCode, Callable[[str], OcoError]] = {
    _C.INVALID_ARGUMENT: InvalidRequestError,
    _C.RESOURCE_EXHAUSTED: RequestTooLargeError,
    _C.PERMISSION_DENIED: lambda message: CapabilityError(message, capability=""),
    _C.NOT_FOUND: UnknownTargetError,
    _C.ABORTED: lambda message: VersionConflictError(message, -1),
    # The edge answers UNAVAILABLE itself when the store that checks secrets is down.
    _C.UNAVAILABLE: StoreUnavailableError,
}


#: Longest attribute value carried (UTF-8 bytes): trailing metadata shares the client's
#: header limit (8 KiB by default) with the details. A longer one is left out.
MAX_FIELD_BYTES = 1024


def _name(attribute: str) -> str:
    """An attribute's name on the wire: ``retry_after`` → ``retry-after``."""
    return attribute.replace("_", "-")


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _escape(value: str) -> str:
    """Percent-encoded UTF-8: gRPC metadata values are printable ASCII; ``%`` and
    everything outside ``!``..``~`` (spaces too, which proxies may trim) become %XX."""
    return "".join(
        chr(b) if 0x21 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in value.encode("utf-8", "surrogatepass")
    )


@dataclass(frozen=True, slots=True)
class WireError:
    """An error as it crosses the wire: the status code, the details, the class name and
    its attributes as text (keys as in the metadata, without ``oco-error-``)."""

    code: grpc.StatusCode
    details: str
    error_type: str
    fields: dict[str, str]

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """The trailing-metadata pairs that carry the class and its attributes."""
        return ((TYPE_KEY, self.error_type), *((FIELD_PREFIX + k, _escape(v)) for k, v in self.fields.items()))


def to_wire(exc: OcoError) -> WireError:
    """How ``exc`` crosses the wire: the entry of its nearest class in :data:`WIRE` (a
    plugin's own subclass of AdapterError crosses as an AdapterError)."""
    wire = next(_BY_CLASS[k] for k in type(exc).__mro__ if k in _BY_CLASS)
    fields = {
        _name(name): text
        for name in wire.fields
        if (value := getattr(exc, name, None)) is not None
        and len((text := _text(value)).encode("utf-8", "surrogatepass")) <= MAX_FIELD_BYTES
    }
    details = str(exc)
    if wire.code == _C.INTERNAL:
        details = f"{type(exc).__name__}: {details}"  # a generic client sees what failed, too
    return WireError(wire.code, details, wire.kind.__name__, fields)


def to_status(exc: OcoError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The gRPC status for ``exc``: code, details, trailing metadata."""
    wire = to_wire(exc)
    return wire.code, wire.details, wire.trailing_metadata()


def from_wire(
    code: grpc.StatusCode,
    details: str,
    error_type: str,
    fields: Mapping[str, str],
    *,
    implied: Mapping[grpc.StatusCode, Callable[[str], OcoError]] | None = None,
) -> OcoError:
    """The exception for a failed call: the class ``error_type`` names, with its
    attributes from ``fields``. When ``error_type`` is empty or unknown, or an attribute
    is missing or unreadable: the class the code implies (``implied`` overrides
    :data:`IMPLIED` per code), whose message then starts with the code's name."""
    wire = _BY_NAME.get(error_type)
    if wire is not None:
        try:
            attributes = {
                name: parse(fields[_name(name)])
                for name, parse in wire.fields.items()
                if name not in wire.optional or _name(name) in fields
            }
        except (KeyError, ValueError):
            pass  # a bot that names the class but not its attributes: as if it named none
        else:
            message = details
            if wire.code == _C.INTERNAL:  # to_wire put the class's name in front
                message = re.sub(r"^[A-Za-z_]\w*: ", "", message, count=1)
            return wire.make(message, attributes)
    make = {**IMPLIED, **(implied or {})}.get(code, CallbackError)
    return make(f"{code.name}: {details}")


def from_status(
    code: grpc.StatusCode,
    details: str,
    metadata: Iterable[tuple[str, str | bytes]] | None,
    *,
    implied: Mapping[grpc.StatusCode, Callable[[str], OcoError]] | None = None,
) -> OcoError:
    """The exception for a failed unary call, from its code, details and trailing
    metadata (see :func:`from_wire`)."""
    error_type = ""
    fields: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, bytes) or not key.startswith(FIELD_PREFIX):
            continue
        if key == TYPE_KEY:
            error_type = value
        else:
            fields[key.removeprefix(FIELD_PREFIX)] = unquote(value, errors="replace")
    return from_wire(code, details, error_type, fields, implied=implied)
