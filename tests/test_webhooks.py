"""Webhooks: HTTP requests to ``/hooks/<callback id>/<path>`` reach the callback that
declared the route, verified first, bounded, and answered by it.

- Route declarations are checked (``webhook_route_problem``), and the verification
  functions (bearer, HMAC in GitHub's form) accept what they should and nothing else.
- The HTTP server routes by prefix, writes its address file, and a port already taken
  is one clear line.
- End to end (a bot with real HTTP and gRPC servers, a callback of plain generated
  stubs in a thread, httpx): a synchronous route is answered by the callback; HMAC
  and bearer requests are delivered when signed and refused (401, audited, never
  delivered) when not; 404 hides whether a callback exists; 413, 429, 503 and 504;
  an asynchronous route answers 202 and delivers when the callback comes back.
- A real ``oco run`` serves a GitHub-signed webhook and says where it listens.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trio
import trustme
from pydantic import SecretStr

from oco_core._audit import AuditQuery, AuditRecord, query
from oco_core._config import HmacSettings, HttpSettings, WebhookAuth, parse_config
from oco_core._errors import ConfigError, OcoError
from oco_core._http import HttpApp, HttpTls, Receive, Scope, Send, load_http_tls, respond, serve_http
from oco_core._proto import core_pb2, robot_pb2, robot_pb2_grpc
from oco_core._webhooks import (
    bearer_problem,
    body_problem,
    hmac_problem,
    pre_body_problem,
    signature,
    webhook_route_problem,
)
from oco_core.testing import RunningBot, free_port, oco_cli, open_bot, run_oco

SECRETS = {name: f"secret-{name}-0123456789abcdef" for name in ("gh", "am", "open")}
GITHUB_SECRET = "It's a Secret to Everybody"
TOKEN = "alertmanager-token-0123456789"


# -- route declarations ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/github"), ("*", "/"), ("get", "/a/b-c_d.e~f"), ("PUT", "/files/{rest}"), ("POST", "/{rest}")],
)
def test_good_routes_pass(method: str, path: str) -> None:
    assert webhook_route_problem(robot_pb2.WebhookRoute(method=method, path=path)) is None


@pytest.mark.parametrize(
    ("method", "path", "words"),
    [
        ("", "/ci", "has no method"),
        ("PO ST", "/ci", "HTTP method"),
        ("POST", "ci", "must start with '/'"),
        ("POST", "/a//b", "empty segment"),
        ("POST", "/a/../b", "'..' segments"),
        ("POST", "/a/.", "'..' segments"),
        ("POST", "/{rest}/x", "'{rest}' may only be"),
        ("POST", "/a{rest}", "'{rest}' may only be"),
        ("POST", "/a b", "no spaces"),
        ("POST", "/a?b=1", "no spaces, '?'"),
        ("POST", "/" + "a" * 1100, "longer than 1024"),
    ],
)
def test_bad_routes_are_refused_with_a_message_naming_them(method: str, path: str, words: str) -> None:
    problem = webhook_route_problem(robot_pb2.WebhookRoute(method=method, path=path))
    assert problem is not None
    assert words in problem
    assert problem.startswith("webhook route")


# -- verification ---------------------------------------------------------------------


def test_bearer_tokens_are_checked() -> None:
    assert bearer_problem(TOKEN, f"Bearer {TOKEN}") is None
    assert bearer_problem(TOKEN, f"bearer  {TOKEN} ") is None  # the scheme is case-insensitive
    assert bearer_problem(TOKEN, None) == "no Authorization header"
    assert bearer_problem(TOKEN, f"Basic {TOKEN}") == "the Authorization header is not a Bearer token"
    assert bearer_problem(TOKEN, f"Bearer {TOKEN}x") == "wrong bearer token"
    assert bearer_problem(TOKEN, "Bearer ") == "wrong bearer token"
    assert bearer_problem(TOKEN, "Bearer tökén") == "wrong bearer token"


def test_hmac_in_githubs_form() -> None:
    # The example in GitHub's documentation ("Validating webhook deliveries").
    body = b"Hello, World!"
    given = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    header = "X-Hub-Signature-256"
    assert signature(GITHUB_SECRET, body) == given.removeprefix("sha256=")
    assert hmac_problem(GITHUB_SECRET, body, given, header=header) is None
    assert hmac_problem(GITHUB_SECRET, body, given.upper().replace("SHA256=", "sha256="), header=header) is None
    assert hmac_problem(GITHUB_SECRET, body + b"!", given, header=header) == (
        "the X-Hub-Signature-256 signature does not match the body"
    )
    assert hmac_problem("another secret", body, given, header=header) is not None
    assert hmac_problem(GITHUB_SECRET, body, None, header=header) == "no X-Hub-Signature-256 header"
    assert hmac_problem(GITHUB_SECRET, body, given.removeprefix("sha256="), header=header) == (
        "the X-Hub-Signature-256 header does not start with 'sha256='"
    )
    assert hmac_problem(GITHUB_SECRET, body, "sha256=zz", header=header) is not None


def test_hmac_with_another_algorithm_and_no_prefix() -> None:
    digest = hmac.new(b"k", b"body", hashlib.sha512).hexdigest()
    assert hmac_problem("k", b"body", digest, header="X-Sig", algorithm="sha512", prefix="") is None
    assert hmac_problem("k", b"body", digest, header="X-Sig", algorithm="sha256", prefix="") is not None


def test_webhook_auth_settings_drive_verification() -> None:
    bearer = WebhookAuth(bearer=SecretStr(TOKEN))
    signed = WebhookAuth(hmac=HmacSettings(secret=SecretStr(GITHUB_SECRET)))
    unsigned = WebhookAuth(none=True)
    good = {"x-hub-signature-256": "sha256=" + signature(GITHUB_SECRET, b"x")}
    assert pre_body_problem(bearer, {}) == "no Authorization header"
    assert pre_body_problem(bearer, {"authorization": f"Bearer {TOKEN}"}) is None
    assert body_problem(bearer, {}, b"x") is None  # nothing more to check once the token is good
    assert pre_body_problem(signed, {}) is None  # an HMAC needs the body
    assert body_problem(signed, good, b"x") is None
    assert body_problem(signed, good, b"y") is not None
    assert body_problem(signed, {}, b"x") == "no X-Hub-Signature-256 header"
    for auth in (unsigned, None):
        assert pre_body_problem(auth, {}) is None
        assert body_problem(auth, {}, b"x") is None


# -- the HTTP server ------------------------------------------------------------------


def _answering(text: str) -> Callable[[Scope, Receive, Send], Any]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, 200, f"{text} {scope['root_path']} {scope['path']}".encode())

    return app


async def test_the_server_routes_by_prefix_and_writes_its_address(tmp_path: Path) -> None:
    app = HttpApp()
    app.mount("/hooks", _answering("hooks"))
    app.mount("/hooks/special", _answering("special"))
    app.mount("/healthz", _answering("health"))
    with pytest.raises(ValueError, match="already mounted"):
        app.mount("/hooks", _answering("again"))
    with pytest.raises(ValueError, match="must start with '/'"):
        app.mount("metrics", _answering("metrics"))
    settings = HttpSettings(listen="127.0.0.1:0", address_file=tmp_path / "http.address")
    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve_http, app, settings)
        assert (tmp_path / "http.address").read_text().strip() == address
        async with httpx.AsyncClient(base_url=f"http://{address}") as client:
            assert (await client.get("/hooks/a/b")).text == "hooks /hooks /hooks/a/b"
            assert (await client.get("/hooks")).text == "hooks /hooks /hooks"
            assert (await client.get("/hooks/special/x")).text == "special /hooks/special /hooks/special/x"
            assert (await client.get("/healthz")).text == "health /healthz /healthz"
            other = await client.get("/hooksmith")
            assert (other.status_code, other.text) == (404, "not found\n")
            assert "server" not in other.headers
        nursery.cancel_scope.cancel()


async def test_a_port_already_taken_is_one_clear_error() -> None:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve_http, HttpApp(), HttpSettings(listen="127.0.0.1:0"))
        with pytest.raises(OcoError) as caught:
            await serve_http(HttpApp(), HttpSettings(listen=address))
        assert str(caught.value) == (
            f"cannot serve HTTP on {address}: Address already in use; is another bot running? "
            "Change http.listen (port 0 picks a free port)"
        )
        nursery.cancel_scope.cancel()


# -- end to end -----------------------------------------------------------------------


def config(tmp_path: Path, http: str = "") -> str:
    return f"""
adapters: [{{type: memory}}]
store: {{url: "sqlite:///{tmp_path}/oco.db"}}
http: {{listen: "127.0.0.1:0", max_body_bytes: 1024, webhook_timeout: 1{http}}}
events: {{redeliver_after: 5}}
callbacks:
  - id: gh
    secret: {SECRETS["gh"]}
    webhook_auth: {{hmac: {{secret: "{GITHUB_SECRET}"}}}}
  - id: am
    secret: {SECRETS["am"]}
    webhook_auth: {{bearer: {TOKEN}}}
  - {{id: open, secret: {SECRETS["open"]}}}
"""


Answer = Callable[[core_pb2.WebhookRequest], robot_pb2.WebhookResponse | None]


def _echo(request: core_pb2.WebhookRequest) -> robot_pb2.WebhookResponse:
    return robot_pb2.WebhookResponse(
        request_id=request.id,
        status=201,
        headers={"content-type": "application/json", "x-seen": request.route_id, "connection": "upgrade"},
        body=json.dumps({"got": request.body.decode(), "path": request.path}).encode(),
    )


class Hooked:
    """A callback of plain generated stubs: a Listen stream declaring webhook routes,
    read in a thread; each webhook request lands in ``requests`` and is answered with
    ``answer`` (None: never answered)."""

    def __init__(self, address: str, name: str, routes: list[robot_pb2.WebhookRoute], answer: Answer | None) -> None:
        self.requests: queue.Queue[core_pb2.Event] = queue.Queue()
        self.ready = threading.Event()
        self.error: grpc.RpcError | None = None
        self._metadata = (("authorization", f"Bearer {SECRETS[name]}"),)
        self._answer = answer
        self._channel = grpc.insecure_channel(address)
        self._stub = robot_pb2_grpc.RobotStub(self._channel)
        request = robot_pb2.ListenRequest(webhooks=routes, acknowledge=True)
        self._call = self._stub.Listen(request, metadata=self._metadata)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            self._call.initial_metadata()
            self.ready.set()
            for event in self._call:
                if not event.HasField("webhook_request"):
                    continue
                self.requests.put(event)
                webhook = event.webhook_request
                if event.delivery_id:
                    self._stub.Acknowledge(
                        robot_pb2.AcknowledgeRequest(delivery_ids=[event.delivery_id]), metadata=self._metadata
                    )
                if not webhook.asynchronous and self._answer is not None:
                    answer = self._answer(webhook)
                    if answer is not None:
                        self._stub.RespondWebhook(answer, metadata=self._metadata)
        except grpc.RpcError as exc:
            self.error = exc
            self.ready.set()

    async def next(self, timeout: float = 10.0) -> core_pb2.Event:
        return await trio.to_thread.run_sync(self.requests.get, True, timeout)

    def close(self) -> None:
        self._call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped
        self._thread.join(5)
        self._channel.close()


@contextmanager
def _closing(hooked: Hooked) -> Iterator[Hooked]:
    try:
        yield hooked
    finally:
        hooked.close()


async def hooked(
    running: RunningBot, name: str, routes: list[robot_pb2.WebhookRoute], answer: Answer | None = _echo
) -> Hooked:
    callback = Hooked(running.address, name, routes, answer)
    await trio.to_thread.run_sync(callback.ready.wait, 10)
    if callback.error is not None:
        callback.close()
        raise callback.error
    return callback


def route(method: str, path: str, **more: Any) -> robot_pb2.WebhookRoute:
    return robot_pb2.WebhookRoute(method=method, path=path, **more)


async def client(running: RunningBot) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://{running.bot.http_address}", timeout=10)


async def audit(running: RunningBot) -> list[AuditRecord]:
    await running.bot.core.audit.flush()
    return await query(running.bot.core.store, AuditQuery(kind="webhook"), limit=1000)


async def gone(running: RunningBot, name: str) -> None:
    with trio.fail_after(10):
        while running.bot.core.router.subscriptions(name):
            await trio.sleep(0.01)


def github_headers(body: bytes, secret: str = GITHUB_SECRET) -> dict[str, str]:
    return {"X-Hub-Signature-256": "sha256=" + signature(secret, body), "X-GitHub-Event": "push"}


@pytest.fixture
async def bot(tmp_path: Path) -> AsyncIterator[RunningBot]:
    async with open_bot(config(tmp_path)) as running:
        yield running


async def test_a_synchronous_route_is_answered_by_the_callback(bot: RunningBot) -> None:
    with _closing(await hooked(bot, "open", [route("POST", "/ci", id="ci"), route("*", "/files/{rest}")])) as cb:
        async with await client(bot) as http:
            answer = await http.post(
                "/hooks/open/ci?ref=main&x=%20", content=b"hello", headers=[("X-Twice", "a"), ("X-Twice", "b")]
            )
            assert answer.status_code == 201
            assert answer.json() == {"got": "hello", "path": "/ci"}
            assert answer.headers["x-seen"] == "ci"
            assert answer.headers["content-type"] == "application/json"
            assert "upgrade" not in answer.headers.get("connection", "")  # hop-by-hop: dropped
            webhook = (await cb.next()).webhook_request
            assert (webhook.route_id, webhook.method, webhook.path, webhook.query) == (
                "ci",
                "POST",
                "/ci",
                "ref=main&x=%20",
            )
            assert webhook.headers["x-twice"] == "a, b"
            assert webhook.body == b"hello"
            assert webhook.remote_address.startswith("127.0.0.1:")
            assert not webhook.asynchronous
            assert len(webhook.id) == 32
            assert webhook.received_unix_ms > 0
            # {rest} takes what follows; any method.
            answer = await http.delete("/hooks/open/files/a/b.txt")
            assert answer.json() == {"got": "", "path": "/files/a/b.txt"}
            # Unknown callback, unknown path, wrong method: one answer for all.
            for method, url in [
                ("POST", "/hooks/nobody/ci"),
                ("POST", "/hooks/open/cd"),
                ("GET", "/hooks/open/ci"),
                ("POST", "/hooks/open"),
                ("POST", "/hooks/"),
            ]:
                missing = await http.request(method, url)
                assert (missing.status_code, missing.text) == (404, "no such webhook\n"), url
            assert cb.requests.qsize() == 1  # /files only: nothing else reached it


async def test_hmac_signed_requests_are_delivered_and_others_refused_and_audited(bot: RunningBot) -> None:
    with _closing(await hooked(bot, "gh", [route("POST", "/github")])) as cb:
        async with await client(bot) as http:
            body = json.dumps({"ref": "refs/heads/main"}).encode()
            answer = await http.post("/hooks/gh/github", content=body, headers=github_headers(body))
            assert answer.status_code == 201
            assert (await cb.next()).webhook_request.headers["x-github-event"] == "push"
            for headers in (
                github_headers(body, "wrong secret"),
                github_headers(b"another body"),
                {},
            ):
                refused = await http.post("/hooks/gh/github", content=body, headers=headers)
                assert (refused.status_code, refused.text) == (401, "unauthorized")
        await trio.sleep(0.2)
        assert cb.requests.empty(), "a refused request reached the callback"
    records = await audit(bot)
    # One record a minute from one host, with the count of those left out in the next.
    assert len(records) == 1
    (record,) = records
    assert (record.decision, record.callback, record.route) == ("denied", "gh", "POST /github")
    assert record.detail.startswith("the X-Hub-Signature-256 signature does not match the body; peer 127.0.0.1:")


async def test_bearer_tokens_are_checked_before_the_body(bot: RunningBot) -> None:
    with _closing(await hooked(bot, "am", [route("POST", "/alerts")])) as cb:
        async with await client(bot) as http:
            answer = await http.post(
                "/hooks/am/alerts", json={"alerts": []}, headers={"Authorization": f"Bearer {TOKEN}"}
            )
            assert answer.status_code == 201
            await cb.next()
            # Refused before its body is read: even one over the size limit is a 401.
            refused = await http.post("/hooks/am/alerts", content=b"x" * 5000, headers={"Authorization": "Bearer nope"})
            assert (refused.status_code, refused.text) == (401, "unauthorized")
        assert cb.requests.empty()
    (record,) = await audit(bot)
    assert record.detail.startswith("wrong bearer token; peer 127.0.0.1:")


async def test_a_verified_callbacks_routes_cannot_be_found_by_probing(bot: RunningBot) -> None:
    with _closing(await hooked(bot, "am", [route("POST", "/alerts")])) as cb:
        async with await client(bot) as http:
            # Without the token, a real route and a made-up one answer alike.
            for url in ("/hooks/am/alerts", "/hooks/am/made-up"):
                refused = await http.post(url, content=b"{}")
                assert (refused.status_code, refused.text) == (401, "unauthorized"), url
            token = {"Authorization": f"Bearer {TOKEN}"}
            missing = await http.post("/hooks/am/made-up", content=b"{}", headers=token)
            assert missing.status_code == 404
            answered = await http.post("/hooks/am/alerts", content=b"{}", headers=token)
            assert answered.status_code == 201
            # The operator's token is checked by the bot, and not passed on to the callback.
            assert "authorization" not in (await cb.next()).webhook_request.headers


async def test_dot_segments_and_encoded_slashes_reach_no_route(bot: RunningBot) -> None:
    with _closing(await hooked(bot, "open", [route("*", "/files/{rest}"), route("POST", "/a/b")])) as cb:
        async with await client(bot) as http:
            for url in (
                "/hooks/open/files/%2e%2e/%2e%2e/etc/passwd",
                "/hooks/open/files/x/%2E/y",
                "/hooks/open/a%2Fb",
                "/hooks/open%2Fa/b",
                "/hooks/open/files//x",
                "/hooks/open/files/%ff",
            ):
                refused = await http.post(url, content=b"x")
                assert refused.status_code == 404, url
            ok = await http.post("/hooks/open/files/a%20b/c.txt", content=b"x")
            assert ok.status_code == 201
        assert (await cb.next()).webhook_request.path == "/files/a b/c.txt"
        assert cb.requests.empty()


async def test_a_body_that_does_not_arrive_in_time_is_408(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path, ", body_timeout: 0.5")) as running:
        with _closing(await hooked(running, "open", [route("POST", "/slow")])) as cb:
            host, _, port = running.bot.http_address.rpartition(":")
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                # Headers promise 100 bytes; 10 come, then nothing.
                await stream.send_all(
                    b"POST /hooks/open/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"y" * 10
                )
                answer = b""
                with trio.fail_after(5):
                    while b"http.body_timeout" not in answer:
                        chunk = await stream.receive_some(4096)
                        assert chunk, f"closed after {answer!r}"
                        answer += chunk
            assert answer.startswith(b"HTTP/1.1 408")
            assert b"http.body_timeout" in answer
            assert cb.requests.empty()


async def test_a_body_over_the_limit_is_413_and_never_delivered(bot: RunningBot) -> None:
    with _closing(await hooked(bot, "open", [route("POST", "/ci")])) as cb:
        async with await client(bot) as http:
            too_big = await http.post("/hooks/open/ci", content=b"x" * 1025)
            assert too_big.status_code == 413
            assert too_big.text == "the body is larger than 1024 bytes (http.max_body_bytes)\n"

            async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
                for _ in range(4):
                    yield b"y" * 400

            assert (await http.post("/hooks/open/ci", content=chunks())).status_code == 413
            assert (await http.post("/hooks/open/ci", content=b"x" * 1024)).status_code == 201
        assert (await cb.next()).webhook_request.body == b"x" * 1024
        assert cb.requests.empty()


async def test_a_callback_that_does_not_answer_is_504_and_one_that_left_503(bot: RunningBot) -> None:
    with _closing(await hooked(bot, "open", [route("POST", "/slow")], answer=None)) as cb:
        async with await client(bot) as http:
            with trio.fail_after(5):
                late = await http.post("/hooks/open/slow", content=b"x")
            assert (late.status_code, late.text) == (
                504,
                "callback open did not answer within 1 s (http.webhook_timeout)\n",
            )
            await cb.next()
    await gone(bot, "open")
    async with await client(bot) as http:
        # Its route is remembered (events.ttl): not a 404, but nobody to answer now.
        away = await http.post("/hooks/open/slow", content=b"x")
        assert (away.status_code, away.text) == (503, "callback open is not connected\n")
        assert away.headers["retry-after"] == "5"


async def test_an_asynchronous_route_answers_202_and_delivers_when_the_callback_is_back(bot: RunningBot) -> None:
    routes = [route("POST", "/queue", asynchronous=True)]
    with _closing(await hooked(bot, "open", routes)) as cb:
        async with await client(bot) as http:
            now = await http.post("/hooks/open/queue", content=b"first")
            assert now.status_code == 202
            event = await cb.next()
            assert event.webhook_request.id == now.json()["id"]
            assert event.webhook_request.asynchronous
            assert event.delivery_id
    await gone(bot, "open")
    async with await client(bot) as http:
        later = await http.post("/hooks/open/queue", content=b"second")
        assert later.status_code == 202
        assert later.headers["content-type"] == "application/json"
    with _closing(await hooked(bot, "open", routes)) as cb:
        event = await cb.next()
        assert (event.webhook_request.id, event.webhook_request.body) == (later.json()["id"], b"second")


async def test_an_asynchronous_request_the_store_cannot_keep_is_413(tmp_path: Path) -> None:
    # Within http.max_body_bytes (1024) but over the store's largest value: the caller
    # hears it is too large (not that the bot is down), the operator what to change.
    text = config(tmp_path).replace('oco.db"}', 'oco.db", max_value_bytes: 900}')
    async with open_bot(text) as running:
        with _closing(await hooked(running, "open", [route("POST", "/queue", asynchronous=True)])) as cb:
            async with await client(running) as http:
                refused = await http.post("/hooks/open/queue", content=b"x" * 1000)
                assert (refused.status_code, refused.text) == (413, "the request is too large for this bot to keep\n")
                assert (await http.post("/hooks/open/queue", content=b"x" * 10)).status_code == 202
            assert (await cb.next()).webhook_request.body == b"x" * 10
            assert cb.requests.empty()


async def test_rate_limit_and_pending_limit(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path, ", webhook_rate_limit: 2, max_pending_webhooks: 1")) as running:
        routes = [route("POST", "/fast"), route("POST", "/slow")]

        def answer(request: core_pb2.WebhookRequest) -> robot_pb2.WebhookResponse | None:
            return None if request.path == "/slow" else robot_pb2.WebhookResponse(request_id=request.id, status=204)

        with _closing(await hooked(running, "open", routes, answer)) as cb:
            async with await client(running) as http:
                for _ in range(2):
                    ok = await http.post("/hooks/open/fast")
                    assert (ok.status_code, ok.text) == (204, "")
                over = await http.post("/hooks/open/fast")
                assert over.status_code == 429
                assert over.headers["retry-after"] == "30"  # 2 a minute: the next in 30 s
                assert "http.webhook_rate_limit" in over.text
                # Each route has its own bucket; one request waiting fills max_pending_webhooks.
                for _ in range(2):
                    await cb.next()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(http.post, "/hooks/open/slow")
                    await cb.next()  # it waits for an answer that never comes
                    busy = await http.post("/hooks/open/slow")
                    assert busy.status_code == 503
                    assert "http.max_pending_webhooks" in busy.text


async def test_oco_run_serves_a_github_webhook(tmp_path: Path) -> None:
    port = free_port()
    text = config(tmp_path).replace(
        'http: {listen: "127.0.0.1:0"',
        f'grpc: {{listen: "127.0.0.1:0"}}\nhttp: {{address_file: http.address, listen: "127.0.0.1:{port}"',
    )
    async with run_oco(text, tmp_path) as oco:
        await oco.expect(
            rf"HTTP on http://127\.0\.0\.1:{port} \(webhooks at /hooks/<callback id>/\.\.\.\)", stream="stderr"
        )
        await oco.expect(r"callback 'open' may declare webhooks but has no webhook_auth", stream="stderr")
        assert await oco.written("http.address") == f"127.0.0.1:{port}"
        callback = Hooked(oco.address, "gh", [route("POST", "/github")], _echo)
        with _closing(callback):
            await trio.to_thread.run_sync(callback.ready.wait, 10)
            body = b'{"zen": "Keep it logically awesome."}'
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                answer = await http.post("/hooks/gh/github", content=body, headers=github_headers(body))
                assert answer.status_code == 201, answer.text
                refused = await http.post("/hooks/gh/github", content=body, headers=github_headers(b"{}"))
                assert refused.status_code == 401
        await oco.expect(
            r"refused webhook 'POST /github' of callback 'gh' from 127\.0\.0\.1:\d+: the X-Hub", stream="stderr"
        )
        # A second bot on the same HTTP port: one line, no traceback.
        second = tmp_path / "second"
        second.mkdir()
        (second / "oco.yaml").write_text(
            text.replace("address_file: http.address, ", "").replace(str(tmp_path / "oco.db"), str(second / "oco.db"))
        )
        ran = await trio.to_thread.run_sync(lambda: oco_cli("run", "--config", "oco.yaml", cwd=second, timeout=60))
        assert ran.returncode != 0
        assert f"cannot serve HTTP on 127.0.0.1:{port}: Address already in use; is another bot running?" in ran.stderr
        assert "Traceback" not in ran.stderr
        # SIGTERM stops the first one in order, its HTTP server with it.
        assert await oco.stop() == 0
        assert not [line for line in oco.stderr_lines if "Traceback" in line or "ERROR" in line]


async def test_https_and_client_certificates(tmp_path: Path) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client_cert = ca.issue_cert("alertmanager")
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "bot.crt"))
    server.private_key_pem.write_to_path(str(tmp_path / "bot.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    app = HttpApp()
    app.mount("/hooks", _answering("hooks"))
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    for client_ca in (None, tmp_path / "ca.crt"):
        tls = HttpTls(tmp_path / "bot.crt", tmp_path / "bot.key", client_ca)
        async with trio.open_nursery() as nursery:
            address = await nursery.start(serve_http, app, HttpSettings(listen="127.0.0.1:0"), tls)
            async with httpx.AsyncClient(base_url=f"https://{address}", verify=trusting) as http:
                if client_ca is None:
                    assert (await http.get("/hooks/x")).text == "hooks /hooks /hooks/x"
                else:
                    with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
                        await http.get("/hooks/x")
            if client_ca is not None:
                presenting = ssl.create_default_context()
                ca.configure_trust(presenting)
                client_cert.configure_cert(presenting)
                async with httpx.AsyncClient(base_url=f"https://{address}", verify=presenting) as http:
                    assert (await http.get("/hooks/x")).status_code == 200
            nursery.cancel_scope.cancel()


def test_tls_files_are_checked_with_the_key_named(tmp_path: Path) -> None:
    (tmp_path / "bot.crt").write_text("not a certificate")
    loaded = parse_config(
        f"http: {{listen: 127.0.0.1:0, tls: {{cert: {tmp_path}/bot.crt, key: {tmp_path}/bot.key}}}}\n", "oco.yaml"
    )
    with pytest.raises(ConfigError) as caught:
        load_http_tls(loaded)
    assert "http.tls.cert" in str(caught.value)
    assert "holds no PEM certificate" in str(caught.value)


async def test_unverified_webhooks_are_warned_about(bot: RunningBot, caplog: pytest.LogCaptureFixture) -> None:
    with _closing(await hooked(bot, "open", [route("POST", "/ci")])):
        async with await client(bot) as http:
            for _ in range(2):
                assert (await http.post("/hooks/open/ci")).status_code == 201
    warnings = [r.getMessage() for r in caplog.records if "called without verification" in r.getMessage()]
    assert warnings == [
        "webhook 'POST /ci' of callback 'open' called without verification (no webhook_auth for it in the config)"
    ]
