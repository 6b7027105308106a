"""The bot's one HTTP server: Hypercorn's trio worker serving a small ASGI application.

Off unless ``http:`` is configured. Webhooks (:mod:`._webhooks`) are mounted at
``/hooks``; health checks, metrics and a web console mount their own prefixes on the
same :class:`HttpApp` with :meth:`HttpApp.mount`, each an ASGI application::

    async def health(scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, 200, b"ok\\n")

    app.mount("/healthz", health)

Plain ASGI rather than Starlette. The webhook path needs exact control of the request
body: refuse by ``Content-Length``, read chunk by chunk and stop at ``http.max_body_bytes``,
verify a bearer token before reading any of it; Starlette's ``Request`` reads the body
whole and its responses add headers of their own. What Starlette would bring besides
(routing, middleware) is a dispatch on a handful of path prefixes here, a dozen lines
below, while it would add a dependency that must track anyio's releases. Hypercorn
speaks ASGI itself, so each mounted application is a plain coroutine function, and
one that wants Starlette later can mount a Starlette app as it is.

The listening socket is bound here, not by Hypercorn: a port already taken is then one
line naming ``http.listen`` (as for ``grpc.listen``), and port 0 yields the real port.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from ._config import HttpSettings
from ._errors import OcoError

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

    from ._config import LoadedConfig

log = logging.getLogger(__name__)

#: ASGI's three arguments, as this module uses them.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: An ASGI application.
App = Callable[[Scope, Receive, Send], Awaitable[None]]


async def respond(
    send: Send, status: int, body: bytes = b"", headers: Iterable[tuple[str, str]] = (), *, content_type: str = ""
) -> None:
    """Send a whole response: ``status``, ``headers``, and ``body`` (``text/plain``
    unless ``content_type`` or a Content-Type header says otherwise)."""
    raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    if not any(name == b"content-type" for name, _ in raw) and body:
        raw.append((b"content-type", (content_type or "text/plain; charset=utf-8").encode("latin-1")))
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class HttpApp:
    """The ASGI application the server runs: requests go to the application mounted at
    the longest prefix of their path, 404 otherwise. It answers the lifespan protocol
    itself (there is nothing to start: the bot's parts are open before the server)."""

    def __init__(self) -> None:
        self._mounts: list[tuple[str, App]] = []

    def mount(self, prefix: str, app: App) -> None:
        """Send requests for ``prefix`` (such as ``/hooks``) and everything below it
        (``/hooks/...``, not ``/hooksmith``) to ``app``. The app sees the whole path in
        ``scope["path"]`` and the prefix in ``scope["root_path"]``."""
        if not prefix.startswith("/") or (prefix.endswith("/") and prefix != "/"):
            raise ValueError(f"mount prefix {prefix!r} must start with '/' and not end with one")
        if any(existing == prefix for existing, _ in self._mounts):
            raise ValueError(f"something is already mounted at {prefix!r}")
        self._mounts.append((prefix, app))
        self._mounts.sort(key=lambda mount: len(mount[0]), reverse=True)

    def prefixes(self) -> list[str]:
        """What is mounted, longest prefix first."""
        return [prefix for prefix, _ in self._mounts]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return  # websockets: nothing serves them; returning closes the connection
        path: str = scope["path"]
        for prefix, app in self._mounts:
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                await app({**scope, "root_path": scope.get("root_path", "") + prefix}, receive, send)
                return
        await respond(send, 404, b"not found\n")


@dataclass(frozen=True, slots=True)
class HttpTls:
    """The server's certificate files, checked; with ``client_ca``, clients must
    present a certificate it signed."""

    cert: Path
    key: Path
    client_ca: Path | None = None


def load_http_tls(loaded: LoadedConfig) -> HttpTls | None:
    """Read and check the files ``http.tls`` names (blocking: call it in a thread).
    ConfigError names the key, its line and the path. None without ``http.tls``."""
    from ._tls import check_key_pair, read_pem

    http = loaded.config.http
    if http is None or http.tls is None:
        return None
    tls = http.tls
    for key, path, kind in (("cert", tls.cert, "certificate"), ("key", tls.key, "private key")):
        try:
            read_pem(path, kind)  # type: ignore[arg-type]  # the literals above
        except ValueError as exc:
            raise loaded.error(("http", "tls", key), str(exc)) from None
    try:
        check_key_pair(tls.cert, tls.key)
    except ValueError as exc:
        raise loaded.error(("http", "tls", "key"), str(exc)) from None
    if tls.client_ca is not None:
        try:
            read_pem(tls.client_ca, "certificate")
        except ValueError as exc:
            raise loaded.error(("http", "tls", "client_ca"), str(exc)) from None
    return HttpTls(tls.cert, tls.key, tls.client_ca)


#: How long sent data may stay unacknowledged before the kernel drops the connection.
_USER_TIMEOUT_MS = 30_000


async def _bind(listen: str) -> socket.socket:
    """A socket bound to ``listen`` (not yet listening); OcoError naming ``http.listen``
    when no address it resolves to can be bound."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        found = await trio.socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise OcoError(f"cannot serve HTTP on {listen}: cannot resolve {host!r} ({exc}); change http.listen") from None
    failure: OSError | None = None
    for family, kind, proto, _, address in found:
        sock = socket.socket(family, kind, proto)
        try:
            # As every server: a port a stopped bot's connections still linger on is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux; accepted sockets inherit it
                # Hypercorn writes inside a shielded scope: a client that stops reading an
                # event stream would block that write, and the bot's shutdown, until TCP
                # gives up (~15 min). This bounds unacknowledged data, zero windows included.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, _USER_TIMEOUT_MS)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            failure = failure or exc
            continue
        return sock
    reason = (failure.strerror or str(failure)) if failure is not None else "no address found"
    raise OcoError(
        f"cannot serve HTTP on {listen}: {reason}; is another bot running? "
        "Change http.listen (port 0 picks a free port)"
    )


class _QuietStart(logging.Filter):
    """Hypercorn's own "Running on ... (CTRL + C to quit)": the bot says where it listens."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Running on")


#: Where Hypercorn's own lines go (errors in an application, with their traceback).
_server_log = logging.getLogger(f"{__name__}.hypercorn")
_server_log.addFilter(_QuietStart())


def _hypercorn_config(settings: HttpSettings, tls: HttpTls | None, fd: int) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"fd://{fd}"]
    config.accesslog = None
    config.errorlog = _server_log
    config.include_server_header = False
    # No read timeout: Hypercorn's applies while a response is being sent too, and would
    # end the console's event streams (the client says nothing while it listens). A silent
    # client is dropped anyway: until its request's headers are in, and between requests,
    # by keep_alive_timeout (5 s, from the connection's start, not from its last byte);
    # while a webhook's body is read, by http.body_timeout.
    config.read_timeout = None
    # Bodies are bounded by the webhook app itself; this bounds the request line and headers.
    config.h11_max_incomplete_size = 64 * 1024
    if tls is not None:
        config.certfile = str(tls.cert)
        config.keyfile = str(tls.key)
        if tls.client_ca is not None:
            config.ca_certs = str(tls.client_ca)
            config.verify_mode = ssl.CERT_REQUIRED
    return config


def _write_address(path: Path, address: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(address + "\n")
    tmp.replace(path)


async def serve_http(
    app: App,
    settings: HttpSettings,
    tls: HttpTls | None = None,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``settings.listen`` until cancelled; ``task_status`` gets the
    bound address (``host:port``, the real port when the config says 0), also written to
    ``settings.address_file``. Cancelling ends the requests in flight with it."""
    sock = await _bind(settings.listen)
    host = settings.listen.rpartition(":")[0]
    address = f"{host}:{sock.getsockname()[1]}"
    # Hypercorn adopts the descriptor ("fd://"); ours lets go of it so that only one
    # socket object closes it.
    config = _hypercorn_config(settings, tls, sock.detach())
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, cast("ASGIFramework", app), config, mode="asgi"))
        if settings.address_file is not None:
            await trio.to_thread.run_sync(_write_address, settings.address_file, address)
        task_status.started(address)
