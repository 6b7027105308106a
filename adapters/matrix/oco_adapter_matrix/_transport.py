"""HTTP to the homeserver under trio: nio builds the requests and parses the answers.

Why not matrix-nio's ``AsyncClient`` under trio-asyncio? Both were tried against Synapse
(login, sync, a long-poll sync cancelled by a trio cancel scope): both work. This one was
chosen because

- nothing runs on a second event loop: no asyncio at all in this adapter, trio's
  cancellation reaches every request directly, and no aiohttp session can be left
  unclosed (which ``filterwarnings = error`` turns into test failures);
- ``AsyncClient`` retries HTTP 429 inside itself, out of our sight; here the sender owns
  retries, so rate-limited messages keep their order and nothing is dropped;
- nio's sans-I/O parts do the hard work either way: ``nio.Api`` builds every request,
  the response classes parse them, and ``nio.Client.receive_response`` keeps rooms,
  members and the olm/megolm machine up to date. What ``AsyncClient`` adds on top (key
  upload, query, claim, group session sharing) is a few calls in ``_adapter.py``;
- trio-asyncio works by patching asyncio's event-loop policy, which recent Pythons
  deprecate.

httpx runs under trio through anyio. nio's ``Api`` puts the access token in the query
string; it is moved to an ``Authorization`` header here so that it never shows in a
logged URL.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import ssl
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import trio
from nio import ErrorResponse, Response  # type: ignore[import-untyped]  # nio ships no type information

from oco_core import AdapterError, RequestTooLargeError, UnknownTargetError
from oco_core.plugin import Backoff

log = logging.getLogger(__name__)

#: Seconds added to the sync long-poll before the client gives up on an answer.
SYNC_GRACE = 15.0


class TokenRejectedError(AdapterError):
    """The homeserver no longer accepts the access token (HTTP 401, ``M_UNKNOWN_TOKEN``)."""


class UnreachableError(AdapterError):
    """The homeserver could not be reached or answered with a server error."""


def _split_token(path: str) -> tuple[str, str | None]:
    parts = urlsplit(path)
    query = parse_qsl(parts.query, keep_blank_values=True)
    token = next((value for key, value in query if key == "access_token"), None)
    rest = urlencode([(key, value) for key, value in query if key != "access_token"])
    return urlunsplit(("", "", parts.path, rest, "")), token


class Transport:
    """Sends requests that ``nio.Api`` built, over one ``httpx.AsyncClient``.

    HTTP 429 is always waited out (``retry_after_ms``) and retried. With ``retry=True``
    network errors and server errors (5xx) are retried with backoff until they succeed
    or the caller is cancelled; otherwise they raise :class:`UnreachableError`.
    """

    def __init__(self, http: httpx.AsyncClient, backoff: Backoff | None = None) -> None:
        self._http = http
        # Copied per request: every request waits out an outage on its own schedule.
        self._backoff = backoff or Backoff(0.5, 30.0, jitter=0.2)

    @property
    def homeserver(self) -> str:
        """The homeserver's base URL, as log lines name it."""
        return str(self._http.base_url).rstrip("/")

    async def request(
        self,
        response_class: type[Response],
        method: str,
        path: str,
        data: str | None = None,
        *,
        response_data: Sequence[Any] = (),
        http_timeout: float = 30.0,
        retry: bool = False,
        content: bytes | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """Send one request; return nio's response object (a success or an
        ``ErrorResponse`` for client errors other than 429 and rejected tokens).

        The body is ``data`` (JSON, as ``nio.Api`` builds it), or ``content`` of
        ``content_type`` (a file to upload)."""
        path, token = _split_token(path)
        headers = {"Content-Type": content_type}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        template = self._backoff
        backoff = Backoff(template.initial, template.maximum, template.factor, jitter=template.jitter)
        while True:
            try:
                answer = await self._http.request(
                    method,
                    path,
                    content=data.encode() if data is not None else content,
                    headers=headers,
                    timeout=httpx.Timeout(http_timeout, connect=10.0),
                )
            except httpx.TransportError as error:
                # One line a try, naming the cause: httpx's own message is often empty or
                # "all attempts to connect failed", and its traceback three chained ones.
                cause = describe_failure(error, self.homeserver)
                if not retry:
                    raise UnreachableError(f"homeserver {self.homeserver}: {cause}") from None
                delay = backoff.next_delay()
                log.warning(
                    "matrix: homeserver %s: %s; retrying %s %s in %.1f s",
                    self.homeserver,
                    cause,
                    method,
                    _endpoint(path),
                    delay,
                )
                await trio.sleep(delay)
                continue
            if answer.status_code == 429:
                await _wait_out_rate_limit(answer, method, path)
                continue
            if answer.status_code >= 500:
                if not retry:
                    raise UnreachableError(
                        f"homeserver {self.homeserver} answered {answer.status_code} to {method} {_endpoint(path)}"
                    )
                delay = backoff.next_delay()
                log.warning(
                    "matrix: homeserver %s answered %d to %s %s; retrying in %.1f s",
                    self.homeserver,
                    answer.status_code,
                    method,
                    _endpoint(path),
                    delay,
                )
                await trio.sleep(delay)
                continue
            body = _json(answer)
            if answer.status_code == 401 and body.get("errcode") in ("M_UNKNOWN_TOKEN", "M_MISSING_TOKEN"):
                raise TokenRejectedError(f"the homeserver rejected the access token: {body.get('error', '')}")
            response = response_class.from_dict(body, *response_data)
            if isinstance(response, ErrorResponse):
                log.debug("matrix: %s %s: %s", method, _endpoint(path), response)
            return response

    async def download(self, path: str, token: str, max_bytes: int, *, http_timeout: float = 60.0) -> tuple[bytes, str]:
        """GET ``path`` (relative to the homeserver) with ``token``; return the body and
        its ``Content-Type``. Read as it arrives, and given up with
        :class:`RequestTooLargeError` as soon as it is past ``max_bytes`` (or says it will
        be). No retries: the caller asked now, and may ask again."""
        headers = {"Authorization": f"Bearer {token}"}
        timeout = httpx.Timeout(http_timeout, connect=10.0)
        try:
            async with self._http.stream("GET", path, headers=headers, timeout=timeout) as answer:
                if answer.status_code != 200:
                    raise await _download_error(answer, path)
                too_large = RequestTooLargeError(
                    f"the file {_endpoint(path)} is larger than the {max_bytes} bytes the bot may fetch "
                    "(bot.max_attachment_bytes); not read further"
                )
                length = answer.headers.get("Content-Length", "")
                if length.isdigit() and int(length) > max_bytes:
                    raise too_large
                data = await _read_at_most(answer, max_bytes)
                if data is None:
                    raise too_large
                media_type = answer.headers.get("Content-Type", "").strip() or "application/octet-stream"
                return data, media_type
        except httpx.TransportError as error:
            raise UnreachableError(
                f"homeserver {self.homeserver}: {describe_failure(error, self.homeserver)}"
            ) from None


async def _read_at_most(answer: httpx.Response, limit: int) -> bytes | None:
    """The body of ``answer``, or None as soon as it is past ``limit`` bytes."""
    chunks, size = [], 0
    with trio.CancelScope() as reading:
        async for chunk in answer.aiter_bytes():
            size += len(chunk)
            if size > limit:
                # Stopped by cancelling the read, not by a break: that ends each of
                # httpx's nested generators now, where a break would leave them to the
                # garbage collector (and trio warns of each).
                reading.cancel()
                continue
            chunks.append(chunk)
    return b"".join(chunks) if size <= limit else None


async def _download_error(answer: httpx.Response, path: str) -> AdapterError:
    # An error's body is a small JSON object; a larger one is not read.
    error = _json_of(await _read_at_most(answer, 65536) or b"", answer.status_code)
    what = f"{error.get('errcode', '')}: {error.get('error', '')}".strip(": ")
    if answer.status_code == 401 and error.get("errcode") in ("M_UNKNOWN_TOKEN", "M_MISSING_TOKEN"):
        return TokenRejectedError(f"the homeserver rejected the access token: {error.get('error', '')}")
    if answer.status_code == 404:
        return UnknownTargetError(f"the homeserver has no file at {_endpoint(path)} ({what})")
    return AdapterError(f"the homeserver answered {answer.status_code} to GET {_endpoint(path)} ({what})")


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, its causes and contexts, and the members of exception groups among them
    (trio reports every address it failed to connect to in a group)."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                todo.append(linked)


def describe_failure(error: httpx.TransportError, homeserver: str) -> str:
    """What went wrong reaching ``homeserver``, in words an operator can act on: a
    refused connection, a name that does not resolve, a failed TLS handshake (with the
    likely cause when the URL's scheme does not match the port), a timeout."""
    chain = list(_chain(error))
    host = httpx.URL(homeserver).host
    for cause in chain:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"its TLS certificate failed verification ({cause.verify_message})"
    for cause in chain:
        if isinstance(cause, ssl.SSLError):
            reason = cause.reason or str(cause)
            if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"):
                return (
                    f"TLS handshake failed ({reason}) — if the homeserver serves plain HTTP on this port, "
                    "use http:// in homeserver"
                )
            return f"TLS handshake failed ({reason})"
    for cause in chain:
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve {host} (DNS: {cause.strerror})"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused (is the homeserver running, and is the port right?)"
    if isinstance(error, httpx.TimeoutException):
        return f"no answer in time ({type(error).__name__})"
    if isinstance(error, httpx.RemoteProtocolError) and homeserver.startswith("http://"):
        return (
            f"the server did not answer in HTTP ({error}) — if it serves HTTPS on this port, use https:// in homeserver"
        )
    for cause in chain:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
    return str(error) or type(error).__name__


async def _wait_out_rate_limit(answer: httpx.Response, method: str, path: str) -> None:
    body = _json(answer)
    wait_ms = body.get("retry_after_ms")
    if not isinstance(wait_ms, int | float):
        # Newer homeservers may send only the standard Retry-After header (seconds).
        try:
            wait_ms = float(answer.headers.get("Retry-After", "1")) * 1000
        except ValueError:
            wait_ms = 1000.0
    wait = max(0.0, min(float(wait_ms), 300_000.0)) / 1000
    log.info("matrix: rate limited on %s %s; retrying in %.3f s", method, _endpoint(path), wait)
    # A little more than asked, so the retry does not land a hair too early.
    await trio.sleep(wait + 0.05 if math.isfinite(wait) else 1.0)


def _json(answer: httpx.Response) -> dict[str, Any]:
    return _json_of(answer.content, answer.status_code)


def _json_of(content: bytes, status: int) -> dict[str, Any]:
    try:
        body = json.loads(content or b"{}")
    except ValueError:
        return {"errcode": "M_NOT_JSON", "error": f"HTTP {status}, not JSON"}
    return body if isinstance(body, dict) else {"errcode": "M_NOT_JSON", "error": "not a JSON object"}


def _endpoint(path: str) -> str:
    # Log the path only: queries may hold sync tokens and filters, never useful in a log line.
    return path.split("?", 1)[0]
