"""The console's ASGI application, mounted at ``/console`` on the bot's HTTP server.

It does what every page needs, so that a page handler does only its page: login and
logout, the session cookie, the redirect to the login page, the CSRF and Origin checks
of every POST, the admin check, security headers, error pages, static files and
server-sent event streams.

How to add a page
-----------------

A module of pages has a ``register(console)`` function and is named in
:data:`PAGE_MODULES`; it registers each page with :meth:`Console.route`::

    from ._app import Console, EventStream, HttpError, Request, Response, SendEvent

    async def overview(request: Request) -> Response:
        bot = request.bot                   # the Bot: config, statistics(), leader, ...
        core = request.core                 # its BotCore: links, router, auth, store, ...
        return request.render("overview.html", title="Overview", adapters=...)

    async def callback(request: Request) -> Response:
        cb = request.core.callbacks.get(request.params["id"])  # from "/callbacks/{id}"
        if cb is None:
            raise HttpError(404, f"no callback {request.params['id']!r}: see the callbacks page")
        ...

    async def live_stream(request: Request) -> EventStream:
        async def produce(send: SendEvent) -> None:
            while True:
                ...
                await send("message", json.dumps({...}))   # event name, data
        return EventStream(produce)

    def register(console: Console) -> None:
        console.route("/", overview)
        console.route("/callbacks/{id}", callback)
        console.route("/live/stream", live_stream, stream=True)

A handler gets a :class:`Request` (``session`` is always set: the login check happened
before; ``query`` and, for a POST, ``form`` hold the first value of each field) and
returns a :class:`Response` (:meth:`Request.render` renders a template into one) or, for
a ``stream=True`` route, an :class:`EventStream`, which runs until the client goes away,
the session ends (checked every few seconds) or the bot stops. Raise :class:`HttpError`
for an error page (its message goes in ``<p id="error" role="alert">``).

A template extends ``base.html`` and fills ``{% block content %}`` (``{% block scripts
%}`` for a ``<script src="{{ root }}/static/...">``). Every template gets ``root``
(``/console``), ``session`` (``.name``, ``.role``, ``.admin``), ``csrf`` (put it in every
POST form as ``<input type="hidden" name="csrf" value="{{ csrf }}">``), ``bot_name``
and ``title``. The Content-Security-Policy allows scripts and styles only from
``/console/static/``: no inline ``<script>``, ``onclick=`` or ``style=`` attributes (an
inline SVG chart styles itself with classes and presentation attributes such as
``fill``).

A POST route (``methods=("POST",)``) is checked for the session's CSRF token and, when
the browser sends one, an Origin of this server; ``admin=True`` refuses viewers with a
403 page. A handler that changes something audits it itself
(``request.audit(...)``), since only it knows what changed.
"""

from __future__ import annotations

import hmac
import importlib
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, urlsplit

import trio

from .._audit import ALLOWED, DENIED
from .._errors import StoreError
from .._http import Receive, Scope, Send
from ._auth import TOKEN_PREFIX, LoginThrottle, Session, Sessions, find_token
from ._html import environment, render, static_files

if TYPE_CHECKING:
    import jinja2

    from .._adapter import Adapter
    from .._bot import Bot
    from .._config import ConsoleSettings
    from .._core import BotCore

log = logging.getLogger(__name__)

#: Where the console is mounted on the HTTP server.
PREFIX = "/console"
#: The session cookie's name.
COOKIE = "oco_console"
#: Modules of pages (in this package), each with a ``register(console)``.
PAGE_MODULES = ("_admin_pages", "_status_pages")
#: The menu every page shows: path below PREFIX, label.
MENU = (
    ("/", "Overview"),
    ("/callbacks", "Callbacks"),
    ("/audit", "Audit"),
    ("/people", "People"),
    ("/live", "Live"),
)
#: Largest form body accepted (a grant is a few dozen bytes).
MAX_FORM_BYTES = 64 * 1024
#: Seconds between an event stream's checks that its session still holds.
STREAM_RECHECK = 5.0
#: Seconds of silence after which an event stream sends a comment, so proxies and
#: browsers keep it open.
STREAM_KEEPALIVE = 15.0

_SECURITY_HEADERS = (
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    # Not no-referrer: under it Chromium sends `Origin: null` with the console's own forms,
    # which the Origin check refuses; same-origin still tells other sites nothing.
    ("referrer-policy", "same-origin"),
    ("x-frame-options", "DENY"),
)
_TEXT = "text/plain; charset=utf-8"
_PARAM = re.compile(r"\{([a-z_]+)\}")


class HttpError(Exception):
    """An error page: ``status`` and a message saying what was wrong and what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Response:
    """A whole response; pages are ``text/html``."""

    body: bytes = b""
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "text/html; charset=utf-8"


def redirect(location: str, status: int = 303) -> Response:
    """A redirect (303: the browser follows with GET, as after a form)."""
    return Response(status=status, headers=[("location", location)], content_type="")


class SendEvent(Protocol):
    """``await send(event, data)``: one server-sent event (``data`` may hold newlines);
    ``event_id`` sets its ``id:``, which a browser sends back as ``Last-Event-ID`` when it
    reconnects (:meth:`Request.header`)."""

    def __call__(self, event: str, data: str, *, event_id: str = "") -> Awaitable[None]: ...


@dataclass(frozen=True, slots=True)
class EventStream:
    """A server-sent event stream: ``produce(send)`` runs until it returns, the client
    goes away, the session ends or the bot stops."""

    produce: Callable[[SendEvent], Awaitable[None]]


Handler = Callable[["Request"], Awaitable[Response | EventStream]]


@dataclass(frozen=True, slots=True)
class _Route:
    pattern: re.Pattern[str]
    path: str
    handler: Handler
    methods: tuple[str, ...]
    admin: bool
    stream: bool


@dataclass(slots=True)
class Request:
    """One request to a page, after the login check."""

    console: Console
    scope: Scope
    method: str
    #: The path below ``/console`` (``/people``).
    path: str
    session: Session
    #: Path parameters (``{id}`` in the route).
    params: dict[str, str]
    #: The query string's fields (the first value of each).
    query: dict[str, str]
    #: A POST's form fields (the first value of each); empty for GET.
    form: dict[str, str] = field(default_factory=dict)

    @property
    def bot(self) -> Bot:
        """The bot serving the console."""
        return self.console.bot

    @property
    def core(self) -> BotCore:
        """The running bot's parts."""
        return self.console.core

    @property
    def client(self) -> str:
        """The client's address (the peer: a proxy in front is not looked behind)."""
        return client_host(self.scope)

    @property
    def actor(self) -> str:
        """Who the audit log says made a change: ``console:<token name>``."""
        return f"console:{self.session.name}"

    def header(self, name: str) -> str:
        """A request header's value (``name`` in lower case; empty when not sent)."""
        return _headers(self.scope).get(name, "")

    def audit(self, kind: str, decision: str, **details: str) -> None:
        """Add an audit record as this session's token (``user=console:<name>``)."""
        self.core.record(kind, decision, user=self.actor, **details)

    def render(self, template: str, *, status: int = 200, **context: Any) -> Response:
        """``template`` rendered with ``context`` and what every page gets."""
        return Response(self.console.render(template, self.path, self.session, context), status=status)


def client_host(scope: Scope) -> str:
    """The peer's address (``unknown`` when the server does not say)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


def _first_values(raw: str) -> dict[str, str]:
    try:
        parsed = parse_qs(raw, keep_blank_values=True, max_num_fields=100)
    except ValueError:
        raise HttpError(400, "too many fields in the request: use the console's own forms") from None
    return {key: values[0] for key, values in parsed.items()}


def _cookie(headers: Mapping[str, str], name: str) -> str:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


class Console:
    """The console application for one bot (an ASGI app: mount it at :data:`PREFIX`)."""

    #: Where it is mounted, for links.
    prefix = PREFIX

    def __init__(self, bot: Bot, core: BotCore, settings: ConsoleSettings, *, secure: bool) -> None:
        self.bot = bot
        self.core = core
        self.settings = settings
        #: Whether browsers reach the console over TLS (the cookie is then ``Secure``).
        self.secure = secure or (settings.public_origin or "").startswith("https://")
        #: Event streams open now (capped by ``console.max_streams``).
        self._streams = 0
        self.sessions = Sessions(core.store, settings.session_ttl)
        self.throttle = LoginThrottle(settings.login_failures)
        self._env: jinja2.Environment = environment()
        self._static = static_files()
        self._routes: list[_Route] = []
        #: Form bodies being read now (capped by ``http.max_concurrent_requests``).
        self._reading = 0
        self._adapters: dict[str, Adapter] = {}
        for name in PAGE_MODULES:
            try:
                module = importlib.import_module(f"{__package__}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{__package__}.{name}":
                    raise
                continue  # a page module still being written
            module.register(self)
        if not any(route.path == "/" for route in self._routes):
            self.route("/", _placeholder_overview)

    def canonical_user(self, user_id: str) -> str:
        """A user id as a person wrote it (``irc/Bob``) → the id messages carry
        (``irc/bob``), as its adapter folds it: the running adapter's, or (a standby, an
        adapter still connecting) one built from the config, as ``oco roles`` does."""
        prefix, sep, native = user_id.partition("/")
        link = self.core.links.get(prefix) if sep else None
        if link is not None:
            return f"{prefix}/{link.adapter.user_id(native)}"
        adapter = self._adapters.get(prefix)
        if adapter is None:
            for name, kind, options in self.bot._adapter_specs:
                if name == prefix:
                    adapter = self._adapters[name] = kind.create(options)
        return f"{prefix}/{adapter.user_id(native)}" if adapter is not None and native else user_id

    # -- registering pages -------------------------------------------------------------

    def route(
        self,
        path: str,
        handler: Handler,
        *,
        methods: Sequence[str] = ("GET",),
        admin: bool = False,
        stream: bool = False,
    ) -> None:
        """Serve ``handler`` at ``path`` below ``/console`` (``{name}`` matches one path
        segment, given in ``request.params``). ``admin``: only admin tokens; ``stream``:
        it returns an EventStream (401, not a redirect, without a session)."""
        if not path.startswith("/"):
            raise ValueError(f"console route {path!r} must start with '/'")
        if any(route.path == path and set(route.methods) & set(methods) for route in self._routes):
            raise ValueError(f"console route {path!r} is registered twice")
        regex = "".join(
            f"(?P<{part[1:-1]}>[^/]+)" if _PARAM.fullmatch(part) else re.escape(part)
            for part in re.split(r"(\{[a-z_]+\})", path)
        )
        methods = tuple(m.upper() for m in methods)
        self._routes.append(_Route(re.compile(regex), path, handler, methods, admin, stream))

    # -- rendering ---------------------------------------------------------------------

    def render(self, template: str, path: str, session: Session | None, context: Mapping[str, Any]) -> bytes:
        """``template`` with ``context`` and the common context."""
        menu = [(PREFIX + href, label, _current(href, path)) for href, label in MENU]
        common = {
            "root": PREFIX,
            "bot_name": self.core.config.bot.name,
            "session": session,
            "csrf": session.csrf if session is not None else "",
            "menu": menu,
            "title": "",
        }
        return render(self._env, template, {**common, **context})

    def _error(self, status: int, message: str, session: Session | None = None, path: str = "") -> Response:
        titles = {
            400: "Bad request",
            401: "Not logged in",
            403: "Refused",
            404: "Not found",
            429: "Too many tries",
            500: "Page failed",
            503: "Store unavailable",
        }
        title = titles.get(status, "Error")
        body = self.render("error.html", path, session, {"title": title, "message": message, "status": status})
        return Response(body, status=status)

    # -- serving -----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        root: str = scope.get("root_path", PREFIX)
        path = scope["path"][len(root) :] if scope["path"].startswith(root) else scope["path"]
        method: str = scope["method"]
        try:
            response = await self._dispatch(scope, receive, send, path or "", method)
        except HttpError as exc:
            response = self._error(exc.status, exc.message)
        except StoreError as exc:
            log.warning("console: the store failed a request for %s: %s", path, exc)
            response = self._error(503, f"the bot's store did not answer ({exc}); try again in a moment")
        except Exception:
            # A page's bug: one page fails, with its traceback in the log, not the server.
            log.exception("console: %s %s%s failed", method, PREFIX, path)
            response = self._error(500, "this page failed; the bot's log has the details")
        if response is None:
            return  # an event stream, sent already
        await _send(send, response, head=method == "HEAD")

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send, path: str, method: str) -> Response | None:
        if path == "":
            return redirect(PREFIX + "/", 308)
        if path.startswith("/static/"):
            return self._static_file(path.removeprefix("/static/"), method)
        headers = _headers(scope)
        if path == "/login":
            return await self._login(scope, receive, headers, method)
        if path == "/logout":
            return await self._logout(scope, receive, headers, method)
        route, params = self._match(path)
        if route is None:
            raise HttpError(404, f"no console page at {PREFIX}{path}: the menu lists the pages")
        allowed = route.methods + (("HEAD",) if "GET" in route.methods else ())
        if method not in allowed:
            return Response(
                f"method not allowed: use {', '.join(route.methods)}\n".encode(),
                405,
                [("allow", ", ".join(allowed))],
                _TEXT,
            )
        cookie = _cookie(headers, COOKIE)
        session = await self.sessions.get(cookie) if cookie else None
        if session is None:
            if route.stream or method == "POST":
                return Response(b"not logged in: log in at /console/login\n", 401, [], _TEXT)
            gone = [("set-cookie", self._cookie_header("", 0))] if cookie else []
            return Response(status=303, headers=[("location", f"{PREFIX}/login"), *gone], content_type="")
        try:
            query = _first_values(scope.get("query_string", b"").decode("latin-1"))
            request = Request(self, scope, method, path, session, params, query)
            if method == "POST":
                request.form = await self._form(receive, headers)
                self._check_post(request, headers)
                if route.admin and not session.admin:
                    request.audit("admin", DENIED, detail=f"console: POST {PREFIX}{path} refused: viewer token")
                    raise HttpError(
                        403, f"the token {session.name!r} is a viewer's: only an admin token may change things"
                    )
            result = await route.handler(request)
        except HttpError as exc:
            return self._error(exc.status, exc.message, session, path)
        if isinstance(result, EventStream):
            most = self.settings.max_streams
            if self._streams >= most:
                return self._error(
                    503, f"{most} live views are open already (console.max_streams): close one", session, path
                )
            self._streams += 1
            try:
                await self._stream(scope, receive, send, cookie, result)
            finally:
                self._streams -= 1
            return None
        return result

    def _match(self, path: str) -> tuple[_Route | None, dict[str, str]]:
        for route in self._routes:
            found = route.pattern.fullmatch(path)
            if found is not None:
                return route, found.groupdict()
        return None, {}

    def _static_file(self, name: str, method: str) -> Response:
        found = self._static.get(name)
        if found is None:
            raise HttpError(404, f"no static file {name!r}")
        if method not in ("GET", "HEAD"):
            return Response(b"method not allowed: use GET\n", 405, [("allow", "GET, HEAD")], _TEXT)
        body, content_type = found
        return Response(body, 200, [("cache-control", "public, max-age=300")], content_type)

    async def _form(self, receive: Receive, headers: Mapping[str, str]) -> dict[str, str]:
        kind = headers.get("content-type", "").partition(";")[0].strip().lower()
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_FORM_BYTES:
            raise HttpError(413, f"form too large (over {MAX_FORM_BYTES} bytes)")
        http = self.core.config.http
        assert http is not None  # the config refuses console: without http:
        # Hypercorn stops its timers once the headers are in, so without a deadline a
        # client that never sends its body (no login needed) holds a socket forever.
        if self._reading >= http.max_concurrent_requests:
            raise HttpError(503, "too many forms are being read at once (http.max_concurrent_requests); retry later")
        body = bytearray()
        self._reading += 1
        try:
            with trio.move_on_after(http.body_timeout) as reading:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise HttpError(400, "the request ended before its body")
                    body += message.get("body", b"")
                    if len(body) > MAX_FORM_BYTES:
                        raise HttpError(413, f"form too large (over {MAX_FORM_BYTES} bytes)")
                    if not message.get("more_body", False):
                        break
        finally:
            self._reading -= 1
        if reading.cancelled_caught:
            raise HttpError(408, f"the form did not arrive within {http.body_timeout:g} s (http.body_timeout)")
        # Anything but a form has no fields, so no CSRF token either: refused as such.
        return _first_values(body.decode("utf-8", "replace")) if kind == "application/x-www-form-urlencoded" else {}

    def _check_origin(self, scope: Scope, headers: Mapping[str, str]) -> bool:
        """False when the browser says the request comes from another site's page."""
        origin = headers.get("origin")
        if origin is None:
            return True  # not sent (an older browser, curl): the CSRF token decides alone
        if self.settings.public_origin is not None:  # behind a proxy: Host is the proxy's business
            return origin.rstrip("/") == self.settings.public_origin.rstrip("/")
        scheme = scope.get("scheme", "http")
        host = headers.get("host", "")
        parts = urlsplit(origin)
        return origin != "null" and parts.scheme == scheme and parts.netloc == host

    def _check_post(self, request: Request, headers: Mapping[str, str]) -> None:
        if not self._check_origin(request.scope, headers):
            request.audit(
                "admin", DENIED, detail=f"console: POST {PREFIX}{request.path} refused: Origin {headers['origin']!r}"
            )
            raise HttpError(403, "refused: this form was sent from another site (its Origin is not this console's)")
        sent = request.form.get("csrf", "")
        if not sent or not hmac.compare_digest(sent.encode(), request.session.csrf.encode()):
            detail = f"console: POST {PREFIX}{request.path} refused: missing or wrong CSRF token"
            request.audit("admin", DENIED, detail=detail)
            raise HttpError(
                403,
                "refused: the form's CSRF token is missing or wrong (an old page, or another site's form); "
                "reload the page and send it again",
            )

    def _cookie_header(self, value: str, max_age: float) -> str:
        flags = f"Path={PREFIX}; HttpOnly; SameSite=Strict; Max-Age={math.floor(max_age)}"
        return f"{COOKIE}={value}; {flags}" + ("; Secure" if self.secure else "")

    # -- login and logout --------------------------------------------------------------

    async def _login(self, scope: Scope, receive: Receive, headers: Mapping[str, str], method: str) -> Response:
        if method in ("GET", "HEAD"):
            cookie = _cookie(headers, COOKIE)
            if cookie and await self.sessions.get(cookie) is not None:
                return redirect(f"{PREFIX}/")
            return Response(self.render("login.html", "/login", None, {"title": "Log in", "error": ""}))
        if method != "POST":
            return Response(b"method not allowed\n", 405, [("allow", "GET, HEAD, POST")], _TEXT)
        client = client_host(scope)
        wait = self.throttle.wait(client)
        if wait > 0:
            response = self._login_page(
                429, f"too many failed logins from {client}: wait {math.ceil(wait)} s and try again"
            )
            response.headers.append(("retry-after", str(math.ceil(wait))))
            return response
        if not self._check_origin(scope, headers):
            raise HttpError(403, "refused: this login was sent from another site (its Origin is not this console's)")
        form = await self._form(receive, headers)
        token = form.get("token", "").strip()
        found = await find_token(self.core.store, token) if token.startswith(TOKEN_PREFIX) else None
        if found is None:
            self.throttle.failed(client)
            if not token:
                why, what = "no token given", "paste a console token"
            elif not token.startswith(TOKEN_PREFIX):
                why, what = "not a console token", f"console tokens start with {TOKEN_PREFIX}"
            else:
                why, what = "unknown or revoked token", "check it was copied whole"
            detail = f"console login refused: {why} ({client})"
            self.core.record("authentication", DENIED, user="console", detail=detail)
            return self._login_page(
                401,
                f"login refused: {why}; {what}, or make one with `oco console token create --role viewer` "
                "(or --role admin) on the bot's host",
            )
        session_id, _ = await self.sessions.open(found)
        self.core.record(
            "authentication", ALLOWED, user=f"console:{found.name}", detail=f"console login as {found.role} ({client})"
        )
        cookie = self._cookie_header(session_id, self.settings.session_ttl)
        return Response(status=303, headers=[("location", f"{PREFIX}/"), ("set-cookie", cookie)], content_type="")

    def _login_page(self, status: int, error: str) -> Response:
        return Response(self.render("login.html", "/login", None, {"title": "Log in", "error": error}), status)

    async def _logout(self, scope: Scope, receive: Receive, headers: Mapping[str, str], method: str) -> Response:
        if method != "POST":
            return Response(b"method not allowed: log out with the page's button\n", 405, [("allow", "POST")], _TEXT)
        cookie = _cookie(headers, COOKIE)
        session = await self.sessions.get(cookie) if cookie else None
        if session is None:
            return redirect(f"{PREFIX}/login")
        request = Request(self, scope, method, "/logout", session, {}, {})
        request.form = await self._form(receive, headers)
        self._check_post(request, headers)
        await self.sessions.close(cookie)
        request.audit("authentication", ALLOWED, detail="console logout")
        return Response(
            status=303,
            headers=[("location", f"{PREFIX}/login"), ("set-cookie", self._cookie_header("", 0))],
            content_type="",
        )

    # -- event streams -----------------------------------------------------------------

    async def _stream(self, scope: Scope, receive: Receive, send: Send, cookie: str, stream: EventStream) -> None:
        lock = trio.Lock()
        last = trio.current_time()

        async def write(chunk: bytes) -> None:
            nonlocal last
            async with lock:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                last = trio.current_time()

        async def send_event(event: str, data: str, *, event_id: str = "") -> None:
            lines = "".join(f"data: {line}\n" for line in data.split("\n"))
            if event_id:
                lines += f"id: {event_id}\n"
            await write(f"event: {event}\n{lines}\n".encode())

        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),  # nginx: pass events on as they come
            *((k.encode(), v.encode()) for k, v in _SECURITY_HEADERS),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await write(b"retry: 3000\n\n")

        async def watch_client() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        async def watch_session() -> None:
            while True:
                await trio.sleep(STREAM_RECHECK)
                try:
                    alive = await self.sessions.get(cookie) is not None
                except StoreError:
                    alive = True  # an outage ends no session; the next check decides
                if not alive:
                    return
                if trio.current_time() - last >= STREAM_KEEPALIVE:
                    await write(b": keepalive\n\n")

        async def produce() -> None:
            await stream.produce(send_event)

        # Whichever ends first ends the stream: the client, the session, the producer.
        async with trio.open_nursery() as nursery:
            for task in (watch_client, watch_session, produce):

                async def until_first(task: Callable[[], Awaitable[None]] = task) -> None:
                    await task()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(until_first)
        # Not shielded: a client that stopped reading would block this forever, and
        # after a cancellation (shutdown) the end of the body does not matter.
        try:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception:  # the client has gone: nothing to finish
            log.debug("console: an event stream's client went before its end", exc_info=True)


def _current(href: str, path: str) -> bool:
    return path == href if href == "/" else path == href or path.startswith(href + "/")


async def _send(send: Send, response: Response, *, head: bool) -> None:
    headers: list[tuple[str, str]] = [*_SECURITY_HEADERS, *response.headers]
    if response.content_type:
        headers.append(("content-type", response.content_type))
    if not any(name == "cache-control" for name, _ in headers):
        headers.append(("cache-control", "no-store"))  # pages show live state and a CSRF token
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    raw.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": raw})
    await send({"type": "http.response.body", "body": b"" if head else response.body})


async def _placeholder_overview(request: Request) -> Response:
    # Until the status pages (_status_pages.register) serve "/".
    return request.render("placeholder.html", title="Overview")


def json_data(value: object) -> str:
    """``value`` as compact JSON, for an event's data."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


__all__: Sequence[str] = [
    "COOKIE",
    "PREFIX",
    "Console",
    "EventStream",
    "HttpError",
    "Request",
    "Response",
    "SendEvent",
    "json_data",
    "redirect",
]
