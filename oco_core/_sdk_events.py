"""What the SDK hands handlers of events beyond chat, and what a webhook handler answers.

Pure values built from the protocol's messages (no I/O), so that they can be made and
tested without a bot: :class:`WebhookRequest` and :class:`Response` for
``@bot.webhook``, :class:`ScheduleFiring` for ``@bot.schedule`` and ``@bot.every``,
:class:`PublishedEvent` for ``@bot.on_event``.
"""

from __future__ import annotations

import json as _json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from ._proto import core_pb2, robot_pb2

#: What a synchronous webhook's caller gets when its handler raised: nothing about why
#: (the traceback is in the callback's log), which a caller could use to probe.
FAILED_BODY = b"the callback failed to handle this request\n"


def _datetime(unix_ms: int) -> datetime:
    return datetime.fromtimestamp(unix_ms / 1000, UTC)


class InvalidBodyError(ValueError):
    """A webhook request's body is not what :meth:`WebhookRequest.json` or
    :meth:`WebhookRequest.text` can read. Escaping a synchronous handler, it answers 400
    with its message (which says nothing the caller did not send)."""


class Headers(Mapping[str, str]):
    """HTTP headers, looked up case-insensitively (``headers["Content-Type"]``). A header
    sent several times is one entry, its values joined with ", "."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self._items = {name.lower(): value for name, value in (items or {}).items()}

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


class WebhookRequest:
    """An HTTP request to one of this callback's webhook routes
    (``/hooks/<callback id>/<path>`` on the bot's HTTP server)."""

    def __init__(self, event: core_pb2.Event) -> None:
        pb = event.webhook_request
        #: Identifies the request (the bot answers the caller with the response to it).
        self.id: str = pb.id
        #: The id of the route, as declared.
        self.route_id: str = pb.route_id
        #: The HTTP method, upper case ("POST").
        self.method: str = pb.method
        #: The path below the callback's prefix: "/ci" for ``/hooks/builds/ci``.
        self.path: str = pb.path
        #: The query string, undecoded, without "?" ("" for none).
        self.query: str = pb.query
        #: The query's parameters, decoded: the first value of each (see :meth:`param_list`).
        self.params: dict[str, str] = {name: values[0] for name, values in self._parsed_query().items()}
        #: The request's headers, looked up case-insensitively.
        self.headers: Headers = Headers(dict(pb.headers))
        #: The body as sent (at most the bot's ``http.max_body_bytes``).
        self.body: bytes = pb.body
        #: The client's address, "host:port".
        self.remote_address: str = pb.remote_address
        #: True for an asynchronous route: the caller was answered 202 and waits for nothing.
        self.asynchronous: bool = pb.asynchronous
        #: When the bot received the request.
        self.received: datetime = _datetime(pb.received_unix_ms)
        #: How many times this request was delivered before (asynchronous routes only:
        #: after a callback stopped before it had handled it).
        self.redelivered: int = event.redelivered
        #: Set when the bot keeps the request until the callback has handled it; the SDK
        #: acknowledges it after the handler.
        self.delivery_id: str = event.delivery_id

    def __repr__(self) -> str:
        return f"<WebhookRequest {self.method} {self.path} from {self.remote_address} ({len(self.body)} bytes)>"

    def _parsed_query(self) -> dict[str, list[str]]:
        return parse_qs(self.query, keep_blank_values=True)

    def param_list(self, name: str) -> list[str]:
        """Every value of the query parameter ``name`` (``?tag=a&tag=b``), in order."""
        return self._parsed_query().get(name, [])

    def _charset(self) -> str:
        for part in self.headers.get("content-type", "").split(";")[1:]:
            key, _, value = part.strip().partition("=")
            if key.lower() == "charset" and value:
                return value.strip('"')
        return "utf-8"

    def text(self) -> str:
        """The body as text, in the charset its Content-Type names (UTF-8 by default).
        InvalidBodyError when it is not text in that charset."""
        charset = self._charset()
        try:
            return self.body.decode(charset)
        except LookupError:
            raise InvalidBodyError(f"the request's Content-Type names charset {charset!r}, which is unknown") from None
        except UnicodeDecodeError as exc:
            raise InvalidBodyError(f"the request's body is not {charset} text (byte {exc.start})") from None

    def json(self) -> Any:
        """The body parsed as JSON. InvalidBodyError (a ValueError) naming where it is
        not JSON; escaping a synchronous handler, the caller gets 400 with that message."""
        if not self.body.strip():
            raise InvalidBodyError("the request's body is empty; JSON was expected")
        try:
            return _json.loads(self.text())
        except _json.JSONDecodeError as exc:
            raise InvalidBodyError(
                f"the request's body is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
            ) from None


@dataclass(slots=True)
class Response:
    """What a synchronous webhook handler answers its caller.

    ``Response(b"...", status=201, headers={...})``, or :meth:`json` and :meth:`text`.
    A handler that returns None answers 204 No Content.
    """

    body: bytes | str = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 599:
            raise ValueError(f"HTTP status {self.status} is not between 100 and 599")

    @classmethod
    def json(cls, value: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
        """``value`` as JSON (``application/json``)."""
        body = _json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
        return cls(body, status, {"content-type": "application/json", **(headers or {})})

    @classmethod
    def text(cls, value: str, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
        """``value`` as plain text in UTF-8."""
        return cls(value.encode(), status, {"content-type": "text/plain; charset=utf-8", **(headers or {})})

    def to_pb(self, request_id: str) -> robot_pb2.WebhookResponse:
        """The protocol's answer to the request ``request_id``."""
        body = self.body.encode() if isinstance(self.body, str) else bytes(self.body)
        headers = dict(self.headers)
        if isinstance(self.body, str) and not any(name.lower() == "content-type" for name in headers):
            headers["content-type"] = "text/plain; charset=utf-8"
        return robot_pb2.WebhookResponse(request_id=request_id, status=self.status, headers=headers, body=body)


class ScheduleFiring:
    """One of this callback's schedules came due."""

    def __init__(self, event: core_pb2.Event) -> None:
        pb = event.schedule_firing
        #: The id of the schedule, as declared (or the operator's ``callbacks[].schedules``).
        self.schedule_id: str = pb.schedule_id
        #: The slot that came due (not when the event was sent), in the schedule's time zone.
        self.scheduled_time: datetime = _scheduled_time(pb)
        #: True when the slot came due while no bot ran, and fires late within ``catch_up``.
        self.late: bool = pb.late
        #: How many times this firing was delivered before (after a callback stopped
        #: before it had handled it).
        self.redelivered: int = event.redelivered
        self.delivery_id: str = event.delivery_id

    def __repr__(self) -> str:
        late = " (late)" if self.late else ""
        return f"<ScheduleFiring {self.schedule_id!r} at {self.scheduled_time.isoformat()}{late}>"


def _scheduled_time(pb: core_pb2.ScheduleFiring) -> datetime:
    # The RFC 3339 form carries the schedule's time zone offset; the milliseconds are
    # the same instant, for a bot that left the string out.
    if pb.scheduled_time:
        try:
            parsed = datetime.fromisoformat(pb.scheduled_time)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is not None:
                return parsed
    return _datetime(pb.scheduled_unix_ms)


class PublishedEvent:
    """An event published to a topic this callback subscribes to (``@bot.on_event``)."""

    def __init__(self, event: core_pb2.Event) -> None:
        pb = event.published_event
        #: Unique id of the event, set by the bot (what :meth:`Callback.publish` returned).
        self.id: str = pb.id
        #: The topic, dot-separated ("deploys.finished").
        self.topic: str = pb.topic
        #: As published (the bot's own ``oco.*`` events carry JSON).
        self.payload: bytes = pb.payload
        #: Small metadata, as published.
        self.attributes: dict[str, str] = dict(pb.attributes)
        #: Who published it: a callback's id, or "oco" for the bot's own topics.
        self.publisher: str = pb.publisher
        #: When it was published.
        self.published: datetime = _datetime(pb.published_unix_ms)
        #: How many times this event was delivered before (after a callback stopped
        #: before it had handled it).
        self.redelivered: int = event.redelivered
        self.delivery_id: str = event.delivery_id

    def __repr__(self) -> str:
        return f"<PublishedEvent {self.topic} from {self.publisher} ({len(self.payload)} bytes)>"

    def text(self) -> str:
        """The payload as UTF-8 text."""
        return self.payload.decode()

    def json(self) -> Any:
        """The payload parsed as JSON; ValueError naming the topic when it is not JSON."""
        try:
            return _json.loads(self.payload)
        except ValueError as exc:
            raise ValueError(f"the payload of event {self.id} on {self.topic!r} is not JSON: {exc}") from None


def encode_payload(topic: str, payload: bytes | str | Mapping[str, Any] | list[Any]) -> bytes:
    """What :meth:`Callback.publish` sends: bytes as they are, text in UTF-8, anything
    else as JSON."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    try:
        return _json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the payload for topic {topic!r} cannot be sent as JSON ({exc}); pass bytes or str") from None


def whole_seconds(seconds: float, what: str) -> int:
    """``seconds`` rounded up to a whole number the protocol's uint32 fields hold."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{what} must be a finite number of seconds, not {seconds!r}")
    whole = math.ceil(seconds)
    if whole >= 1 << 32:
        raise ValueError(f"{what} of {seconds} seconds is too long (at most {(1 << 32) - 1})")
    return whole
