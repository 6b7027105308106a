"""The operator console's door: tokens, login, sessions, CSRF, and what it never shows.

A bot runs in this process with the memory adapter, SQLite in ``tmp_path`` and its real
HTTP server; httpx talks to it as a browser would (cookies kept, redirects not followed,
so each answer is seen). ``oco console token ...`` runs as a real command, with and
without a bot on the same store.
"""

from __future__ import annotations

import html
import re
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import httpx
import pytest
import trio
import trio.testing
import trustme

from oco_core import _http
from oco_core._audit import AuditQuery, AuditRecord, query
from oco_core._config import HttpSettings, parse_config
from oco_core._console import _app
from oco_core._console._auth import create_token, list_tokens
from oco_core._errors import ConfigError
from oco_core._http import _hypercorn_config
from oco_core._router import Match, Queued
from oco_core.testing import RunningBot, oco_cli, open_bot

CALLBACK_SECRET = "callback-secret-0123456789abcdef"
BEARER_SECRET = "webhook-bearer-0123456789abcdef"
HMAC_SECRET = "webhook-hmac-0123456789abcdef"
#: Every page a logged-in operator can open (the status pages' once they exist).
PAGES = ("/console/", "/console/callbacks", "/console/audit", "/console/people", "/console/live")


def config(tmp_path: Path, console: str = "console: {}", http: str = '{listen: "127.0.0.1:0"}') -> str:
    return f"""
adapters: [{{type: memory}}]
store: {{url: "sqlite:///{tmp_path}/oco.db"}}
auth: {{admins: [memory/root]}}
http: {http}
callbacks:
  - id: deploy
    secret: {CALLBACK_SECRET}
    webhook_auth: {{bearer: {BEARER_SECRET}}}
  - id: github
    webhook_auth: {{hmac: {{secret: {HMAC_SECRET}}}}}
{console}
"""


@asynccontextmanager
async def console_bot(tmp_path: Path, console: str = "console: {}") -> AsyncIterator[RunningBot]:
    async with open_bot(config(tmp_path, console)) as running:
        yield running


def client(running: RunningBot, **options: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://{running.bot.http_address}", timeout=10, **options)  # type: ignore[arg-type]


def element(page: str, element_id: str) -> str:
    """The text of the element with ``element_id`` (our own markup: no nesting of the same tag)."""
    found = re.search(rf'<(\w+)[^>]*\bid="{element_id}"[^>]*>(.*?)</\1>', page, re.DOTALL)
    assert found is not None, f"no #{element_id} in the page"
    return html.unescape(re.sub(r"<[^>]+>", "", found.group(2))).strip()


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None, "no CSRF field in the page"
    return found.group(1)


async def login(http: httpx.AsyncClient, token: str) -> str:
    """Log in with ``token``; the session's CSRF token."""
    answer = await http.post("/console/login", data={"token": token})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/console/"
    return csrf_of((await http.get("/console/people")).text)


async def audited(running: RunningBot, **filters: str) -> list[AuditRecord]:
    await running.bot.core.audit.flush()
    return await query(running.bot.core.store, AuditQuery(**filters))  # type: ignore[arg-type]


async def test_without_a_session_pages_go_to_the_login_and_streams_and_posts_get_401(tmp_path: Path) -> None:
    async with console_bot(tmp_path) as running, client(running) as http:
        for path in ("/console/", "/console/audit?since=1h", "/console/people"):
            answer = await http.get(path)
            assert (answer.status_code, answer.headers["location"]) == (303, "/console/login"), path
        assert (await http.get("/console")).headers["location"] == "/console/"
        assert (await http.get("/console/audit/stream")).status_code == 401
        refused = await http.post("/console/people/grant", data={"user": "memory/bob", "role": "ops"})
        assert refused.status_code == 401
        assert running.bot.core.auth.roles("memory/bob") == ()
        # A cookie that names no session is no better.
        http.cookies.set("oco_console", "made-up", domain=running.bot.http_address.split(":")[0], path="/console")
        assert (await http.get("/console/people")).status_code == 303
        login = await http.get("/console/login")
        assert login.status_code == 200
        for needle in ('<form id="login" method="post" action="/console/login"', '<label for="token">'):
            assert needle in login.text
        assert re.search(r'<input id="token" name="token" type="password"', login.text)
        assert 'id="login-submit"' in login.text
        assert '<html lang="en">' in login.text
        assert 'class="skip-link" href="#main"' in login.text


async def test_a_bad_token_gets_401_naming_what_to_do_and_is_audited(tmp_path: Path) -> None:
    async with console_bot(tmp_path) as running, client(running) as http:
        await create_token(running.bot.core.store, "alice", "admin")
        for token, why in (
            ("occ_" + "x" * 43, "unknown or revoked token"),
            ("hunter2", "not a console token"),
        ):
            answer = await http.post("/console/login", data={"token": token})
            assert answer.status_code == 401
            assert "set-cookie" not in answer.headers
            error = element(answer.text, "error")
            assert why in error
            assert "oco console token create --role viewer" in error
            assert token not in answer.text  # not even a wrong token is shown back
        records = await audited(running, kind="authentication", decision="denied")
        assert [r.detail for r in records] == [
            "console login refused: unknown or revoked token (127.0.0.1)",
            "console login refused: not a console token (127.0.0.1)",
        ]


async def test_a_good_token_logs_in_with_a_strict_http_only_cookie(tmp_path: Path) -> None:
    async with console_bot(tmp_path) as running, client(running) as http:
        token = await create_token(running.bot.core.store, "alice", "admin")
        answer = await http.post("/console/login", data={"token": token})
        assert answer.status_code == 303
        assert answer.headers["location"] == "/console/"
        cookie = answer.headers["set-cookie"]
        flags = [flag.strip() for flag in cookie.split(";")]
        assert flags[0].startswith("oco_console=")
        assert {"HttpOnly", "SameSite=Strict", "Path=/console", "Max-Age=28800"} <= set(flags)
        assert "Secure" not in flags  # plain HTTP: a Secure cookie would never come back
        page = await http.get("/console/")
        assert page.status_code == 200
        assert element(page.text, "whoami") == "alice (admin)"
        menu = element_html(page.text, "menu")
        for href in ("/console/", "/console/callbacks", "/console/audit", "/console/people", "/console/live"):
            assert f'href="{href}"' in menu
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store"
        records = await audited(running, kind="authentication", decision="allowed")
        assert [(r.user, r.detail) for r in records] == [("console:alice", "console login as admin (127.0.0.1)")]
        # The login page of a logged-in browser goes to the console.
        assert (await http.get("/console/login")).headers["location"] == "/console/"


def element_html(page: str, element_id: str) -> str:
    found = re.search(rf'<(\w+)[^>]*\bid="{element_id}"[^>]*>(.*?)</\1>', page, re.DOTALL)
    assert found is not None, f"no #{element_id} in the page"
    return found.group(2)


async def test_under_tls_the_cookie_is_secure(tmp_path: Path) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "bot.crt"))
    server.private_key_pem.write_to_path(str(tmp_path / "bot.key"))
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    http_tls = f'{{listen: "127.0.0.1:0", tls: {{cert: "{tmp_path}/bot.crt", key: "{tmp_path}/bot.key"}}}}'
    async with open_bot(config(tmp_path, http=http_tls)) as running:
        token = await create_token(running.bot.core.store, "alice", "viewer")
        async with httpx.AsyncClient(
            base_url=f"https://{running.bot.http_address}", verify=trusting, timeout=10
        ) as http:
            answer = await http.post("/console/login", data={"token": token})
            assert answer.status_code == 303
            assert "Secure" in [flag.strip() for flag in answer.headers["set-cookie"].split(";")]
            assert element((await http.get("/console/people")).text, "whoami") == "alice (viewer)"


async def test_logging_out_ends_the_session(tmp_path: Path) -> None:
    async with console_bot(tmp_path) as running, client(running) as http:
        csrf = await login(http, await create_token(running.bot.core.store, "alice", "viewer"))
        cookie = http.cookies["oco_console"]
        page = (await http.get("/console/audit")).text
        assert '<form id="logout" method="post" action="/console/logout">' in page
        answer = await http.post("/console/logout", data={"csrf": csrf})
        assert (answer.status_code, answer.headers["location"]) == (303, "/console/login")
        assert "Max-Age=0" in answer.headers["set-cookie"]
        # The old cookie, replayed, opens nothing.
        async with client(running, cookies={"oco_console": cookie}) as replay:
            assert (await replay.get("/console/people")).status_code == 303
        records = await audited(running, kind="authentication", user="console:alice")
        assert [r.detail for r in records][-1] == "console logout"


async def test_forms_without_the_sessions_csrf_token_are_refused(tmp_path: Path) -> None:
    async with console_bot(tmp_path) as running, client(running) as http:
        store = running.bot.core.store
        csrf = await login(http, await create_token(store, "alice", "admin"))
        async with client(running) as other:  # another session's token is a forged one here
            other_csrf = await login(other, await create_token(store, "mallory", "admin"))
        for fields in (
            {"user": "memory/bob", "role": "ops"},
            {"user": "memory/bob", "role": "ops", "csrf": ""},
            {"user": "memory/bob", "role": "ops", "csrf": other_csrf},
            {"user": "memory/bob", "role": "ops", "csrf": csrf[:-1]},
        ):
            answer = await http.post("/console/people/grant", data=fields)
            assert answer.status_code == 403
            assert "CSRF" in element(answer.text, "error")
        assert running.bot.core.auth.roles("memory/bob") == ()
        assert (await http.post("/console/logout", data={})).status_code == 403
        assert (await http.get("/console/people")).status_code == 200  # still logged in
        refused = await audited(running, kind="admin", decision="denied", user="console:alice")
        assert len(refused) == 5
        assert all("missing or wrong CSRF token" in r.detail for r in refused)
        granted = await http.post("/console/people/grant", data={"user": "memory/bob", "role": "ops", "csrf": csrf})
        assert granted.status_code == 200
        assert running.bot.core.auth.roles("memory/bob") == ("ops",)


async def test_a_post_from_another_origin_is_refused(tmp_path: Path) -> None:
    async with console_bot(tmp_path) as running, client(running) as http:
        csrf = await login(http, await create_token(running.bot.core.store, "alice", "admin"))
        fields = {"user": "memory/bob", "role": "ops", "csrf": csrf}
        for origin in ("http://evil.example", "null", f"https://{running.bot.http_address}"):
            answer = await http.post("/console/people/grant", data=fields, headers={"origin": origin})
            assert answer.status_code == 403, origin
            assert "another site" in element(answer.text, "error")
        assert running.bot.core.auth.roles("memory/bob") == ()
        same = await http.post(
            "/console/people/grant", data=fields, headers={"origin": f"http://{running.bot.http_address}"}
        )
        assert same.status_code == 200
        assert running.bot.core.auth.roles("memory/bob") == ("ops",)


async def test_no_page_ever_shows_a_secret(tmp_path: Path) -> None:
    async with console_bot(tmp_path) as running, client(running) as http:
        token = await create_token(running.bot.core.store, "alice", "admin")
        secrets = [CALLBACK_SECRET, BEARER_SECRET, HMAC_SECRET, token, token.removeprefix("occ_")]
        shown = 0
        login_page = await http.get("/console/login")
        assert token not in login_page.text
        csrf = await login(http, token)
        await http.post("/console/people/grant", data={"user": "memory/bob", "role": "ops", "csrf": csrf})
        for path in (*PAGES, "/console/callbacks/deploy", "/console/callbacks/github"):
            page = await http.get(path)
            if page.status_code == 404:
                continue  # a status page not there yet (the status pages register their own)
            assert page.status_code == 200, path
            shown += 1
            for secret in secrets:
                assert secret not in page.text, f"{path} shows a secret"
        assert shown >= 3
        assert http.cookies["oco_console"] not in (await http.get("/console/people")).text


async def test_the_console_is_off_unless_configured(tmp_path: Path) -> None:
    async with console_bot(tmp_path, console="") as running, client(running) as http:
        for path in ("/console/", "/console/login", "/console/static/console.css"):
            assert (await http.get(path)).status_code == 404
        assert (await http.post("/console/login", data={"token": "occ_x"})).status_code == 404


def test_console_without_http_is_a_config_error_naming_both() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("console: {show_bodies: true}\n", "oco.yaml")
    message = str(caught.value)
    assert message.startswith("oco.yaml, line 1: console:")
    assert "http:" in message
    assert "http: {listen: 127.0.0.1:8080}" in message


@pytest.mark.parametrize(
    ("value", "seconds"), [("8h", 28800.0), ("30m", 1800.0), ("90s", 90.0), ("1d", 86400.0), (600, 600.0)]
)
def test_session_ttl_takes_a_duration(value: object, seconds: float) -> None:
    loaded = parse_config(f'http: {{listen: "127.0.0.1:0"}}\nconsole: {{session_ttl: {value}}}\n', "oco.yaml")
    assert loaded.config.console is not None
    assert loaded.config.console.session_ttl == seconds


def test_a_bad_session_ttl_names_the_key_and_the_forms() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config('http: {listen: "127.0.0.1:0"}\nconsole: {session_ttl: 8 hours}\n', "oco.yaml")
    assert "console.session_ttl: expected a duration such as 8h, 30m, 90s or 1d" in str(caught.value)


async def test_failed_logins_are_throttled_per_client_address(tmp_path: Path) -> None:
    async with console_bot(tmp_path, "console: {login_failures: 2}") as running, client(running) as http:
        token = await create_token(running.bot.core.store, "alice", "admin")
        for _ in range(2):
            assert (await http.post("/console/login", data={"token": "occ_wrong"})).status_code == 401
        # Past the limit even the right token is not looked at until the wait is over.
        throttled = await http.post("/console/login", data={"token": token})
        assert throttled.status_code == 429
        assert int(throttled.headers["retry-after"]) >= 1
        assert "too many failed logins" in element(throttled.text, "error")
        assert "set-cookie" not in throttled.headers
        records = await audited(running, kind="authentication", decision="denied")
        assert len(records) == 2  # what was refused unread is not audited one by one


async def test_a_revoked_tokens_session_and_stream_end_at_their_next_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_app, "STREAM_RECHECK", 0.2)
    (tmp_path / "oco.yaml").write_text(config(tmp_path))

    async def token_command(*args: str) -> subprocess.CompletedProcess[str]:
        return await trio.to_thread.run_sync(lambda: oco_cli("console", "token", *args, "-c", "oco.yaml", cwd=tmp_path))

    async with console_bot(tmp_path) as running, client(running) as http:
        # Made by the command while the bot runs, on the bot's store.
        made = await token_command("create", "--role", "viewer", "--name", "vic")
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip()
        await login(http, token)
        listed = await token_command("list")
        assert re.search(r"^vic\s+viewer\s+\S+ \S+\s+1$", listed.stdout, re.MULTILINE), listed.stdout
        async with http.stream("GET", "/console/audit/stream") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            revoked = await token_command("revoke", "vic", "--as", "ops")
            assert revoked.returncode == 0, revoked.stderr
            with trio.fail_after(10):
                async for _ in stream.aiter_bytes():
                    pass  # the stream ends once its session is found gone
        assert (await http.get("/console/people")).headers["location"] == "/console/login"
        assert (await http.post("/console/login", data={"token": token})).status_code == 401
        assert [r.detail for r in await audited(running, kind="admin", user="cli/ops")] == [
            "oco console token revoke vic"
        ]


def test_the_token_commands_without_a_bot(tmp_path: Path) -> None:
    (tmp_path / "oco.yaml").write_text(config(tmp_path))

    def oco(*args: str) -> tuple[int, str, str]:
        done = oco_cli("console", "token", *args, "-c", "oco.yaml", cwd=tmp_path)
        return done.returncode, done.stdout, done.stderr

    code, out, err = oco("create", "--role", "admin", "--name", "ann", "--as", "ops")
    assert code == 0, err
    token = out.strip()
    assert re.fullmatch(r"occ_[A-Za-z0-9_-]{43}", token)
    assert "shown only this once" in err
    assert "/console/login" in err
    code, out, err = oco("create", "--role", "viewer")
    assert code == 0, err
    viewer_name = re.search(r"console token '(viewer-[0-9a-f]{6})'", err)
    assert viewer_name is not None, err
    code, out, err = oco("create", "--role", "viewer", "--name", "ann")
    assert (code, out) == (2, "")
    assert "a console token named 'ann' exists already" in err
    code, _, err = oco("create", "--role", "owner")
    assert code == 2
    assert "invalid choice: 'owner'" in err
    code, out, _ = oco("list")
    assert code == 0
    assert re.search(r"^NAME\s+ROLE\s+CREATED\s+SESSIONS$", out, re.MULTILINE)
    assert re.search(r"^ann\s+admin\s", out, re.MULTILINE)
    assert re.search(rf"^{viewer_name.group(1)}\s+viewer\s", out, re.MULTILINE)
    assert "occ_" not in out
    code, out, _ = oco("revoke", "ann", "--as", "ops")
    assert code == 0
    assert "revoked the console token 'ann'" in out
    code, _, err = oco("revoke", "ann")
    assert code == 2
    assert f"no console token named 'ann' (the tokens: {viewer_name.group(1)})" in err
    code, out, _ = oco("list")
    assert "ann" not in out
    audit = oco_cli("audit", "--kind", "admin", "--json", "-c", "oco.yaml", cwd=tmp_path)
    details = [line for line in audit.stdout.splitlines() if "oco console token" in line]
    assert len(details) == 3  # two creations and one revocation: the refused ones changed nothing


async def test_the_store_keeps_no_token(tmp_path: Path) -> None:
    async with console_bot(tmp_path) as running:
        store = running.bot.core.store
        token = await create_token(store, "alice", "admin")
        (stored,) = await list_tokens(store)
        assert (stored.name, stored.role) == ("alice", "admin")
        items = await store.list("console", "", limit=100)
        assert items
        assert not any(token.encode() in item.value or token in item.key for item in items)


async def test_event_streams_have_no_read_timeout_but_silent_clients_are_still_dropped(tmp_path: Path) -> None:
    # Hypercorn's read timeout also runs while a response is sent, and ended every event
    # stream after 30 s (measured: the live views reconnected twice a minute, losing what
    # came meanwhile). Its idle timer still drops a client that never finishes a request.
    assert _hypercorn_config(HttpSettings(listen="127.0.0.1:0"), None, -1).read_timeout is None
    async with console_bot(tmp_path) as running:
        host, port = running.bot.http_address.rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(b"GET /console/login HTTP/1.1\r\nHost: x\r\n")  # and never the end
            with trio.fail_after(15):
                while await stream.receive_some(1000):
                    pass


async def test_a_login_whose_body_never_arrives_gets_408_and_too_many_get_503(tmp_path: Path) -> None:
    # Hypercorn's timers stop once the headers are in: without http.body_timeout, a
    # client that never sends its form (no token needed) held its socket forever.
    http = '{listen: "127.0.0.1:0", body_timeout: 1, max_concurrent_requests: 1}'
    async with open_bot(config(tmp_path, http=http)) as running:
        host, port = running.bot.http_address.rsplit(":", 1)
        head = (
            b"POST /console/login HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n"
        )
        first = await trio.open_tcp_stream(host, int(port))
        async with first, client(running) as other:
            with trio.fail_after(10):
                await first.send_all(head)
                # While that body is awaited, a second form is refused at once.
                while (busy := await other.post("/console/login", data={"token": "x"})).status_code != 503:
                    await trio.sleep(0.01)
                assert "http.max_concurrent_requests" in busy.text
                answer = b""
                while b"\r\n\r\n" not in answer:
                    chunk = await first.receive_some(1000)
                    assert chunk, "closed without an answer"
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 408")
            assert (await other.get("/console/login")).status_code == 200


async def test_a_stream_client_that_stops_reading_does_not_hang_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hypercorn writes in a shielded scope; without TCP_USER_TIMEOUT on the listening
    # socket, shutdown waited until TCP gave up on the non-reading client (~15 min).
    monkeypatch.setattr(_http, "_USER_TIMEOUT_MS", 1000)
    elapsed = None
    with trio.move_on_after(30):
        async with console_bot(tmp_path, "console: {show_bodies: true}") as running:
            async with client(running) as http:
                await login(http, await create_token(running.bot.core.store, "v", "viewer"))
                cookie = http.cookies["oco_console"]
            host, port = running.bot.http_address.rsplit(":", 1)
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect((host, int(port)))
            stalled = trio.SocketStream(sock)
            request = f"GET /console/live/stream HTTP/1.1\r\nHost: x\r\nCookie: oco_console={cookie}\r\n\r\n"
            await stalled.send_all(request.encode())
            feed = running.bot.core.activity.live
            assert feed is not None
            while not feed._watchers:
                await trio.testing.wait_all_tasks_blocked()
            body = "b" * 20000
            for _ in range(400):  # far more than the socket buffers hold
                feed.add(time.time(), "memory", "room", "u", body, [Match(None, cast(Queued, None), False, "cb", "r")])
                await trio.testing.wait_all_tasks_blocked()
            started = time.monotonic()
            running.bot.shutdown()
        elapsed = time.monotonic() - started
        await stalled.aclose()
    assert elapsed is not None, "shutdown hung on a client that stopped reading"
    assert elapsed < 10


async def test_a_failing_page_answers_500_and_the_console_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with console_bot(tmp_path) as running, client(running) as http:
        app = running.bot.http_app
        assert app is not None
        console = dict(app._mounts)["/console"]
        assert isinstance(console, _app.Console)

        async def broken(request: _app.Request) -> _app.Response:
            raise RuntimeError("a bug in a page")

        console.route("/broken", broken)
        await login(http, await create_token(running.bot.core.store, "alice", "viewer"))
        answer = await http.get("/console/broken")
        assert answer.status_code == 500
        assert element(answer.text, "error") == "this page failed; the bot's log has the details"
        assert "a bug in a page" not in answer.text
        assert any("GET /console/broken failed" in r.getMessage() for r in caplog.records)
        assert (await http.get("/console/people")).status_code == 200


async def test_behind_a_proxy_forms_come_from_the_public_origin_and_the_cookie_is_secure(tmp_path: Path) -> None:
    public = "https://ops.example.org"
    async with console_bot(tmp_path, f"console: {{public_origin: '{public}'}}") as running, client(running) as http:
        token = await create_token(running.bot.core.store, "alice", "admin")
        # The proxy forwards the browser's Origin; the bot's own address is not it.
        direct = await http.post(
            "/console/login", data={"token": token}, headers={"origin": f"http://{running.bot.http_address}"}
        )
        assert direct.status_code == 403
        answer = await http.post("/console/login", data={"token": token}, headers={"origin": public})
        assert answer.status_code == 303
        flags = [flag.strip() for flag in answer.headers["set-cookie"].split(";")]
        assert "Secure" in flags  # the browser speaks https to the proxy
        cookie = {"cookie": flags[0]}  # httpx keeps a Secure cookie from plain http: send it by hand
        csrf = csrf_of((await http.get("/console/people", headers=cookie)).text)
        fields = {"user": "memory/bob", "role": "ops", "csrf": csrf}
        grant = await http.post("/console/people/grant", data=fields, headers={**cookie, "origin": public})
        assert grant.status_code == 200
        assert running.bot.core.auth.roles("memory/bob") == ("ops",)


async def test_live_views_past_max_streams_get_503_and_a_closed_one_frees_its_place(tmp_path: Path) -> None:
    async with console_bot(tmp_path, "console: {max_streams: 1}") as running, client(running) as http:
        await login(http, await create_token(running.bot.core.store, "alice", "viewer"))
        async with http.stream("GET", "/console/live/stream") as first:
            assert first.status_code == 200
            second = await http.get("/console/live/stream")
            assert second.status_code == 503
            assert "console.max_streams" in second.text
        with trio.fail_after(10):
            while True:  # the first stream's end reaches the bot a moment after the client closed it
                async with http.stream("GET", "/console/live/stream") as third:
                    if third.status_code == 200:
                        break
                await trio.sleep(0.1)
