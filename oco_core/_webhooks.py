"""Webhooks: HTTP requests to ``/hooks/<callback id>/<path>``, verified, then handed to
the callback that declared the route (``ListenRequest.webhooks``).

What a request goes through, in order; the first that fails answers:

1. a route: :meth:`~._events.EventHub.webhook_target` finds the callback's route for
   the method and path, else 404. The body is the same whether the callback exists or
   not, and a wrong method is 404 too, not 405: an answer that differs would let a
   stranger probe which callbacks and paths exist;
2. a bearer token (``webhook_auth.bearer``), before any of the body is read, else 401;
3. the body's size: ``Content-Length`` beyond ``http.max_body_bytes``, or a body that
   grows beyond it while read (reading stops there), is 413;
4. an HMAC signature of the body (``webhook_auth.hmac``, GitHub's form by default),
   else 401;
5. the route's rate limit (``http.webhook_rate_limit`` a minute), else 429 with
   Retry-After. It counts verified requests only, so strangers cannot use it up;
6. a synchronous route waits for the callback's ``RespondWebhook`` (504 after
   ``http.webhook_timeout``; 503 when no stream of it is connected, or when
   ``http.max_pending_webhooks`` requests already wait); an asynchronous one is kept
   in the store (:meth:`~._events.EventHub.deliver`) and answered 202.

A 401 says "unauthorized" and nothing more; the audit log has why (kind ``webhook``),
at most once a minute per client host, with a count of those left out, so a flood
cannot flood the log. Deliveries are not audited: they are the callback's business.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import unquote

import trio

from ._audit import DENIED
from ._config import CallbackSettings, WebhookAuth
from ._errors import StoreError, ValueTooLargeError
from ._events import NotConnectedError, webhook_route_id
from ._http import Receive, Scope, Send, respond
from ._proto import core_pb2, robot_pb2
from ._timing import Throttle, TokenBucket

if TYPE_CHECKING:
    from ._core import BotCore

log = logging.getLogger(__name__)

#: Where webhooks are mounted on the bot's HTTP server.
PREFIX = "/hooks"

#: What a 404 says, for an unknown callback, route or method alike.
NOT_FOUND = b"no such webhook\n"
UNAUTHORIZED = b"unauthorized"

#: Headers a callback's answer may not set: hop-by-hop ones (RFC 9110 7.6.1; HTTP/2
#: forbids them outright), and those the server writes itself.
FORBIDDEN_RESPONSE_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "date",
        "server",
    }
)

#: RFC 9110's token: what an HTTP method and a header name are made of.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: Characters of a route's path (RFC 3986's pchar and "/").
_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_MAX_METHOD = 32
_MAX_PATH = 1024
_MAX_ID = 256
_MAX_HELP = 1024
#: Seconds between audit records (and log lines) of refusals from one client host.
_REFUSAL_WINDOW = 60.0
#: Rate-limit buckets remembered before starting afresh (routes come and go).
_MAX_BUCKETS = 10_000


def webhook_route_problem(route: robot_pb2.WebhookRoute) -> str | None:
    """Why a callback may not declare ``route`` (a message naming it and the fix), or None."""
    shown = f"{route.method[:_MAX_METHOD]} {route.path[:80]!r}"
    if not route.method:
        return f"webhook route {route.path[:80]!r} has no method: give one, such as 'POST', or '*' for any"
    if len(route.method) > _MAX_METHOD or (route.method != "*" and not _TOKEN.fullmatch(route.method)):
        return f"webhook route {shown}: the method must be an HTTP method such as 'POST' (or '*' for any)"
    path = route.path
    if not path.startswith("/"):
        return f"webhook route {shown}: the path must start with '/', such as '/github'"
    if len(path) > _MAX_PATH:
        return f"webhook route {shown}...: the path is longer than {_MAX_PATH} characters"
    body = path.removesuffix("{rest}") if path.endswith("/{rest}") else path
    if "{" in body or "}" in body:
        return f"webhook route {shown}: '{{rest}}' may only be the whole last segment ('/github/{{rest}}')"
    if not _PATH.fullmatch(body):
        return (
            f"webhook route {shown}: the path may hold letters, digits and -._~!$&'()*+,;=:@%/ only "
            "(no spaces, '?' or '#')"
        )
    if "//" in path:
        return f"webhook route {shown}: the path has an empty segment ('//')"
    if any(segment in (".", "..") for segment in path.split("/")):
        return f"webhook route {shown}: the path may not have '.' or '..' segments"
    if len(route.id) > _MAX_ID:
        return f"webhook route {shown}: its id is longer than {_MAX_ID} characters"
    if len(route.help) > _MAX_HELP:
        return f"webhook route {shown}: its help is longer than {_MAX_HELP} characters"
    return None


# -- verification -------------------------------------------------------------------


def bearer_problem(token: str, authorization: str | None) -> str | None:
    """Why an ``Authorization`` header value does not carry ``token`` as a bearer
    token, or None. The comparison takes the same time wherever the tokens differ."""
    if authorization is None:
        return "no Authorization header"
    scheme, _, given = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return "the Authorization header is not a Bearer token"
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return "wrong bearer token"
    return None


def signature(secret: str, body: bytes, algorithm: str = "sha256") -> str:
    """The hex HMAC of ``body`` with ``secret`` (what a sender puts after the prefix)."""
    return hmac.new(secret.encode(), body, getattr(hashlib, algorithm)).hexdigest()


def hmac_problem(
    secret: str, body: bytes, given: str | None, *, header: str, algorithm: str = "sha256", prefix: str = "sha256="
) -> str | None:
    """Why ``given`` (the value of ``header``) is not the HMAC of ``body``, or None.
    The digest is compared in constant time; hex digits in either case are accepted."""
    if given is None:
        return f"no {header} header"
    given = given.strip()
    if not given.startswith(prefix):
        return f"the {header} header does not start with {prefix!r}"
    expected = signature(secret, body, algorithm)
    if not hmac.compare_digest(given[len(prefix) :].lower().encode(), expected.encode()):
        return f"the {header} signature does not match the body"
    return None


def pre_body_problem(auth: WebhookAuth | None, headers: Mapping[str, str]) -> str | None:
    """What verification can refuse before reading the body (a bearer token), or None."""
    if auth is not None and auth.bearer is not None:
        return bearer_problem(auth.bearer.get_secret_value(), headers.get("authorization"))
    return None


def body_problem(auth: WebhookAuth | None, headers: Mapping[str, str], body: bytes) -> str | None:
    """What verification refuses once the body is read (an HMAC signature), or None."""
    if auth is not None and auth.hmac is not None:
        settings = auth.hmac
        return hmac_problem(
            settings.secret.get_secret_value(),
            body,
            headers.get(settings.header.lower()),
            header=settings.header,
            algorithm=settings.algorithm,
            prefix=settings.prefix,
        )
    return None


# -- the /hooks application -----------------------------------------------------------


class _ClientGoneError(Exception):
    """The client went away while its body was read."""


def _headers(scope: Scope) -> dict[str, str]:
    joined: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        joined[name] = f"{joined[name]}, {value}" if name in joined else value
    return joined


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    if not client:
        return "unknown"
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _response_headers(callback_id: str, headers: Mapping[str, str]) -> list[tuple[str, str]]:
    kept = []
    for name, value in headers.items():
        if name.lower() in FORBIDDEN_RESPONSE_HEADERS:
            continue
        if not _TOKEN.fullmatch(name) or not _HEADER_VALUE.fullmatch(value):
            log.debug("callback %r answered a webhook with a malformed header %r; dropped", callback_id, name)
            continue
        kept.append((name, value))
    return kept


class Webhooks:
    """The ASGI application mounted at ``/hooks``."""

    def __init__(self, core: BotCore) -> None:
        if core.config.http is None:
            raise ValueError("webhooks need http: in the config")
        self.core = core
        self.settings = core.config.http
        self._auth: dict[str, WebhookAuth | None] = {cb.id: cb.webhook_auth for cb in core.config.callbacks}
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._refusals = Throttle(_REFUSAL_WINDOW)
        self._warned: set[str] = set()
        #: Synchronous requests waiting for their callback now.
        self.waiting = 0
        #: Requests whose body is being read now.
        self.reading = 0

    def set_auth(self, callbacks: Sequence[CallbackSettings]) -> None:
        """How each callback's requests are verified, anew (a live reload)."""
        self._auth = {cb.id: cb.webhook_auth for cb in callbacks}

    def warn_unverified(self) -> None:
        """One warning for each configured callback that may declare webhooks and has
        no ``webhook_auth``: anyone who can reach the server can call them."""
        for cb in self.core.config.callbacks:
            if cb.capabilities.webhooks and cb.webhook_auth is None:
                log.warning(
                    "callback %r may declare webhooks but has no webhook_auth: requests to %s/%s/... reach it "
                    "unverified; set webhook_auth (bearer, hmac, or none: true to accept them knowingly), or "
                    "capabilities.webhooks: false",
                    cb.id,
                    PREFIX,
                    cb.id,
                )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._handle(scope, receive, send)
        except _ClientGoneError:
            log.debug("webhook client %s went away before its request was read", _peer(scope))

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        leader = self.core.leader
        if not leader.acting():  # a standby (ha:): the load balancer or caller goes to the active bot
            active = leader.active_http_address
            where = f"the active bot serves HTTP at {active}" if active else "no active bot is known yet"
            extra = [("retry-after", "1")] + ([("oco-active-address", active)] if active else [])
            await respond(send, 503, f"this bot is a standby; {where}\n".encode(), extra)
            return
        received = time.time()
        split = _split_path(scope)
        if split is None:  # dot segments, empty segments, encoded slashes: never a route
            await respond(send, 404, NOT_FOUND)
            return
        callback_id, path = split
        method: str = scope["method"]
        peer = _peer(scope)
        headers = _headers(scope)
        auth = self._auth.get(callback_id)
        target = self.core.events.webhook_target(callback_id, method, path)
        # A verified callback's requests are verified before its routes are looked up:
        # a stranger gets 401 for every path, and learns none of them by probing.
        route_id = webhook_route_id(target.route) if target is not None else path
        if auth is None and target is None:
            await respond(send, 404, NOT_FOUND)
            return
        problem = pre_body_problem(auth, headers)
        if problem is not None:
            await self._refuse(send, callback_id, route_id, peer, problem)
            return
        if self.reading >= self.settings.max_concurrent_requests:
            await respond(
                send,
                503,
                b"too many requests are being read at once (http.max_concurrent_requests); retry later\n",
                [("retry-after", "1")],
            )
            return
        limit = self.settings.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self._too_large(send, callback_id, limit)
            return
        self.reading += 1
        try:
            with trio.move_on_after(self.settings.body_timeout) as reading:
                body = await _read_body(receive, limit)
        finally:
            self.reading -= 1
        if reading.cancelled_caught:
            timeout = self.settings.body_timeout
            await respond(send, 408, f"the body did not arrive within {timeout:g} s (http.body_timeout)\n".encode())
            return
        if body is None:
            await self._too_large(send, callback_id, limit)
            return
        problem = body_problem(auth, headers, body)
        if problem is not None:
            await self._refuse(send, callback_id, route_id, peer, problem)
            return
        if target is None:
            await respond(send, 404, NOT_FOUND)
            return
        if auth is not None and auth.bearer is not None:
            headers.pop("authorization", None)  # the operator's secret is not the callback's to see
        if auth is None and callback_id not in self._warned:
            self._warned.add(callback_id)
            log.warning(
                "webhook %r of callback %r called without verification (no webhook_auth for it in the config)",
                route_id,
                callback_id,
            )
        delay = self._bucket(callback_id, route_id).take()
        if delay:
            retry = str(max(1, math.ceil(delay)))
            body_429 = f"webhook {route_id} is over its rate limit (http.webhook_rate_limit); retry after {retry} s\n"
            await respond(send, 429, body_429.encode(), [("retry-after", retry)])
            return
        request = core_pb2.WebhookRequest(
            id=uuid.uuid4().hex,
            route_id=route_id,
            method=method.upper(),
            path=path,
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=headers,
            body=body,
            remote_address=peer,
            asynchronous=target.route.asynchronous,
            received_unix_ms=int(received * 1000),
        )
        log.debug("webhook %s %s of callback %r from %s (%d bytes)", method, path, callback_id, peer, len(body))
        if target.route.asynchronous:
            await self._deliver(send, callback_id, request)
        else:
            await self._call(send, callback_id, request)

    async def _deliver(self, send: Send, callback_id: str, request: core_pb2.WebhookRequest) -> None:
        try:
            await self.core.events.deliver(callback_id, core_pb2.Event(webhook_request=request))
        except ValueTooLargeError as exc:
            # Within http.max_body_bytes, yet over what the store keeps in one value.
            log.warning(
                "could not keep webhook %s for callback %r: %s; raise the store's max_value_bytes above "
                "http.max_body_bytes, or lower http.max_body_bytes",
                request.route_id,
                callback_id,
                exc,
            )
            await respond(send, 413, b"the request is too large for this bot to keep\n")
            return
        except StoreError as exc:
            log.warning("could not keep webhook %s for callback %r: %s", request.route_id, callback_id, exc)
            await respond(
                send,
                503,
                f"the request for callback {callback_id} cannot be kept now (the bot's store is unavailable); "
                "retry later\n".encode(),
                [("retry-after", "5")],
            )
            return
        await respond(send, 202, json.dumps({"id": request.id}).encode(), content_type="application/json")

    async def _call(self, send: Send, callback_id: str, request: core_pb2.WebhookRequest) -> None:
        if self.waiting >= self.settings.max_pending_webhooks:
            await respond(
                send,
                503,
                b"too many webhook requests wait for their callbacks (http.max_pending_webhooks); retry later\n",
                [("retry-after", "1")],
            )
            return
        timeout = self.settings.webhook_timeout
        answer: robot_pb2.WebhookResponse | None = None
        self.waiting += 1
        try:
            # On timeout the hub forgets the request: a late answer gets NOT_FOUND.
            with trio.move_on_after(timeout):
                answer = await self.core.events.call_webhook(callback_id, request)
        except NotConnectedError as exc:
            log.debug("webhook %s of callback %r not delivered: %s", request.route_id, callback_id, exc)
            await respond(send, 503, f"callback {callback_id} is not connected\n".encode(), [("retry-after", "5")])
            return
        finally:
            self.waiting -= 1
        if answer is None:
            await respond(
                send,
                504,
                f"callback {callback_id} did not answer within {timeout:g} s (http.webhook_timeout)\n".encode(),
            )
            return
        await self._answer(send, callback_id, answer)

    async def _answer(self, send: Send, callback_id: str, answer: robot_pb2.WebhookResponse) -> None:
        status = answer.status or 200
        body = answer.body
        if status < 200:
            # An interim status cannot end a request.
            log.warning("callback %r answered a webhook with status %d; sent 502 instead", callback_id, status)
            await respond(send, 502, f"callback {callback_id} answered with status {status}\n".encode())
            return
        if status in (204, 304):
            body = b""  # these have no body, whatever the callback says
        await respond(send, status, body, _response_headers(callback_id, answer.headers))

    async def _too_large(self, send: Send, callback_id: str, limit: int) -> None:
        log.debug("webhook of callback %r refused: body over %d bytes", callback_id, limit)
        await respond(send, 413, f"the body is larger than {limit} bytes (http.max_body_bytes)\n".encode())

    async def _refuse(self, send: Send, callback_id: str, route_id: str, peer: str, reason: str) -> None:
        host = peer.rpartition(":")[0] or peer
        skipped = self._refusals.allow(host)
        if skipped is not None:
            more = f" ({skipped} more from {host} in the minute before)" if skipped else ""
            log.warning("refused webhook %r of callback %r from %s: %s%s", route_id, callback_id, peer, reason, more)
            self.core.record(
                "webhook", DENIED, callback=callback_id, route=route_id, detail=f"{reason}; peer {peer}{more}"
            )
        await respond(send, 401, UNAUTHORIZED)

    def _bucket(self, callback_id: str, route_id: str) -> TokenBucket:
        key = (callback_id, route_id)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                self._buckets.clear()
            rate = self.settings.webhook_rate_limit
            bucket = self._buckets[key] = TokenBucket(rate, rate / 60)
        return bucket


def _split_path(scope: Scope) -> tuple[str, str] | None:
    """(callback id, path below it) from the request's raw path, segment by segment;
    None when a segment is empty, ``.`` or ``..``, or hides a ``/`` (``%2F``): such a
    path names no route, and must not reach a callback that maps paths to files."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    segments = raw.split(b"?", 1)[0][len(PREFIX) + 1 :].split(b"/")
    try:
        decoded = [unquote(segment.decode("ascii"), errors="strict") for segment in segments]
    except UnicodeError:  # not percent-encoded UTF-8
        return None
    if len(decoded) < 2 or any(part in ("", ".", "..") or "/" in part for part in decoded):
        return None
    return decoded[0], "/" + "/".join(decoded[1:])


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None as soon as it grows beyond ``limit`` bytes (the rest is
    never read); _ClientGoneError when the client leaves first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGoneError
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
