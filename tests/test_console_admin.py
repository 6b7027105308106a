"""The operator console's audit and people pages.

Audit: the page's filters and paging show what ``oco audit`` (a real command, on the
same store) prints for the same filters, newest first, 50 a page, and the stream adds
matching records as they come. People: an admin token's grant takes effect in chat at
once and is audited as ``console:<token name>``; a viewer token sees no forms and its
POST is refused.
"""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from oco_core._audit import NAMESPACE, AuditQuery, AuditRecord, _key, query, write_now
from oco_core._console import _admin_pages, _app
from oco_core._console._auth import create_token
from oco_core.testing import RunningBot, oco_cli, open_bot


def config(tmp_path: Path) -> str:
    return f"""
adapters: [{{type: memory}}]
store: {{url: "sqlite:///{tmp_path}/oco.db"}}
auth: {{admins: [memory/root], roles: {{ops: [deploy]}}}}
http: {{listen: "127.0.0.1:0"}}
callbacks: []
console: {{}}
"""


@asynccontextmanager
async def console_bot(tmp_path: Path) -> AsyncIterator[RunningBot]:
    (tmp_path / "oco.yaml").write_text(config(tmp_path))
    async with open_bot(config(tmp_path)) as running:
        yield running


@asynccontextmanager
async def logged_in(running: RunningBot, name: str, role: str) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A browser logged in with a new ``role`` token named ``name``, and its CSRF token."""
    token = await create_token(running.bot.core.store, name, role)
    async with httpx.AsyncClient(base_url=f"http://{running.bot.http_address}", timeout=10) as http:
        assert (await http.post("/console/login", data={"token": token})).status_code == 303
        page = (await http.get("/console/people")).text
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        assert found is not None
        yield http, found.group(1)


def text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment)).strip()


def element(page: str, element_id: str) -> str:
    found = re.search(rf'<(\w+)[^>]*\bid="{element_id}"[^>]*>(.*?)</\1>', page, re.DOTALL)
    assert found is not None, f"no #{element_id} in the page"
    return text(found.group(2))


def audit_rows(page: str) -> list[dict[str, str]]:
    """The audit table's rows: cell class → text."""
    rows = re.findall(r'<tr class="audit-record">(.*?)</tr>', page, re.DOTALL)
    return [
        {name: text(cell) for name, cell in re.findall(r'<td class="(\w+)[^"]*">(.*?)</td>', row, re.DOTALL)}
        for row in rows
    ]


def people_row(page: str, user: str) -> str:
    found = re.search(rf'<tr data-user="{re.escape(user)}">(.*?)</tr>', page, re.DOTALL)
    return found.group(1) if found else ""


def held_roles(page: str, user: str) -> list[str]:
    return [text(role) for role in re.findall(r'<span class="role"[^>]*>(.*?)</span>', people_row(page, user))]


async def seed_audit(running: RunningBot) -> None:
    """130 records in the last minutes and 20 from two hours ago, of mixed kinds,
    users, callbacks and decisions."""
    store = running.bot.core.store
    old = time.time() - 7200
    for index in range(20):
        entry = AuditRecord(time=old + index, kind="route", decision="denied", user="memory/old", detail=f"old {index}")
        await store.set(NAMESPACE, _key(entry.time, index), entry.to_json())
    for index in range(130):
        await write_now(
            store,
            ("route", "admin", "rate_limit")[index % 3],
            ("allowed", "denied")[index % 2],
            user=f"memory/{('ann', 'bob')[index % 2]}",
            callback=("deploy", "weather", "")[index % 3],
            detail=f"record {index}",
        )


def cli_audit(tmp_path: Path, *args: str) -> list[dict[str, str]]:
    """``oco audit --json`` for ``args``, newest first."""
    done = oco_cli("audit", "--json", "--limit", "1000", "-c", "oco.yaml", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()][::-1]


async def test_audit_filters_and_pages_show_what_oco_audit_prints(tmp_path: Path) -> None:
    async with console_bot(tmp_path) as running, logged_in(running, "alice", "viewer") as (http, _):
        await seed_audit(running)
        await running.bot.core.audit.flush()  # the login's own record, in the store too
        cases: list[tuple[dict[str, str], tuple[str, ...]]] = [
            ({}, ()),
            ({"since": "1h", "decision": "denied"}, ("--since", "1h", "--decision", "denied")),
            ({"user": "memory/ann", "kind": "admin"}, ("--user", "memory/ann", "--kind", "admin")),
            ({"callback": "deploy", "since": "1h"}, ("--callback", "deploy", "--since", "1h")),
        ]
        for page_query, cli_args in cases:
            expected = await trio.to_thread.run_sync(partial(cli_audit, tmp_path, *cli_args))
            assert expected
            shown: list[dict[str, str]] = []
            page_number = 1
            while True:
                answer = await http.get("/console/audit", params={**page_query, "page": str(page_number)})
                assert answer.status_code == 200
                rows = audit_rows(answer.text)
                assert len(rows) <= _admin_pages.PAGE_SIZE
                shown += rows
                older = re.search(r'<a id="older" href="([^"]+)"', answer.text)
                assert ('id="newer"' in answer.text) == (page_number > 1)
                if older is None:
                    break
                assert len(rows) == _admin_pages.PAGE_SIZE
                # The link keeps the filters.
                for name, value in page_query.items():
                    assert f"{name}={value.replace('/', '%2F')}" in html.unescape(older.group(1))
                page_number += 1
            assert [(r["detail"], r["kind"], r["decision"]) for r in shown] == [
                (e.get("detail", ""), e["kind"], e["decision"]) for e in expected
            ], page_query
            assert [r["user"] for r in shown] == [e.get("user", "") for e in expected]
        # With no filter, four pages: 150 records seeded, and the login's.
        everything = await trio.to_thread.run_sync(lambda: cli_audit(tmp_path))
        assert len(everything) == 151
        last = await http.get("/console/audit", params={"page": "4"})
        assert [row["detail"] for row in audit_rows(last.text)] == ["old 0"]
        assert 'id="older"' not in last.text
        # The filters fill the form again.
        denied = await http.get("/console/audit", params={"decision": "denied", "user": "memory/bob"})
        assert '<option value="denied" selected>' in denied.text
        assert 'value="memory/bob"' in denied.text


async def test_bad_audit_filters_say_which_and_how(tmp_path: Path) -> None:
    async with console_bot(tmp_path) as running, logged_in(running, "alice", "viewer") as (http, _):
        answer = await http.get("/console/audit", params={"since": "last week", "kind": "everything", "page": "0"})
        assert answer.status_code == 400
        error = element(answer.text, "error")
        assert "since: 'last week' is not a time: write a time back from now (30s, 15m, 1h" in error
        assert "kind: 'everything' is not a kind of record; choose one of route, rate_limit" in error
        assert "page: a number from 1 to 1000, not '0'" in error
        assert (await http.get("/console/audit/stream", params={"since": "soon"})).status_code == 400


async def test_the_audit_stream_adds_new_matching_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_admin_pages, "AUDIT_POLL", 0.1)
    monkeypatch.setattr(_app, "STREAM_RECHECK", 0.2)
    async with console_bot(tmp_path) as running, logged_in(running, "alice", "viewer") as (http, csrf):
        page = await http.get("/console/audit", params={"decision": "denied"})
        assert 'data-live="on" data-stream="/console/audit/stream?decision=denied"' in page.text
        assert '<script src="/console/static/audit.js"></script>' in page.text
        assert (await http.get("/console/static/audit.js")).status_code == 200
        async with http.stream("GET", "/console/audit/stream", params={"decision": "denied"}) as stream:
            running.bot.core.record("route", "allowed", user="memory/ann", detail="let through")
            running.bot.core.record("route", "denied", user="memory/bob", callback="deploy", detail="kept out")
            events: list[tuple[str, dict[str, str]]] = []
            with trio.fail_after(10):
                event = ""
                async for line in stream.aiter_lines():
                    if line.startswith("event: "):
                        event = line.removeprefix("event: ")
                    elif line.startswith("data: ") and event:
                        events.append((event, json.loads(line.removeprefix("data: "))))
                        # Logging out ends the stream (read to its end: nothing is left open).
                        assert (await http.post("/console/logout", data={"csrf": csrf})).status_code == 303
        assert len(events) == 1
        name, record = events[0]
        assert name == "record"
        assert (record["detail"], record["user"], record["callback"], record["decision"]) == (
            "kept out",
            "memory/bob",
            "deploy",
            "denied",
        )


async def test_an_admin_grant_takes_effect_in_chat_and_is_audited_as_the_token(tmp_path: Path) -> None:
    async with console_bot(tmp_path) as running, logged_in(running, "alice", "admin") as (http, csrf):
        chat = running.adapter
        await chat.inject("oco grant memory/carol ops", user="bob")
        assert "only admins may grant roles" in (await chat.next_sent()).body
        people = (await http.get("/console/people")).text
        assert 'id="grant"' in people
        for needle in ('<label for="grant-user">', '<label for="grant-role">', 'id="grant-submit"'):
            assert needle in people
        assert held_roles(people, "memory/root") == ["admin"]  # from auth.admins: no revoke form
        assert 'form class="revoke"' not in people_row(people, "memory/root")

        answer = await http.post("/console/people/grant", data={"user": "memory/bob", "role": "admin", "csrf": csrf})
        assert answer.status_code == 200
        assert element(answer.text, "notice") == "memory/bob now has the role admin"
        assert held_roles(answer.text, "memory/bob") == ["admin"]
        # At once in chat: bob may grant now.
        await chat.inject("oco grant memory/carol ops", user="bob")
        assert "memory/carol now has the role ops" in (await chat.next_sent()).body
        people = (await http.get("/console/people")).text
        assert held_roles(people, "memory/carol") == ["ops"]

        revoke = people_row(people, "memory/carol")
        assert 'action="/console/people/revoke"' in revoke
        answer = await http.post("/console/people/revoke", data={"user": "memory/carol", "role": "ops", "csrf": csrf})
        assert element(answer.text, "notice") == "memory/carol no longer has the role ops"
        assert running.bot.core.auth.roles("memory/carol") == ()
        again = await http.post("/console/people/revoke", data={"user": "memory/carol", "role": "ops", "csrf": csrf})
        assert "did not have the role ops in the store; nothing changed" in element(again.text, "notice")

        await running.bot.core.audit.flush()
        records = await query(running.bot.core.store, AuditQuery(kind="admin", user="console:alice"))
        assert [(r.decision, r.permission, r.detail) for r in records] == [
            ("allowed", "admin", "console grant memory/bob admin"),
            ("allowed", "ops", "console revoke memory/carol ops"),
        ]


async def test_a_grant_naming_no_account_of_the_bot_says_how_to_write_one(tmp_path: Path) -> None:
    async with console_bot(tmp_path) as running, logged_in(running, "alice", "admin") as (http, csrf):
        for user, role, words in (
            ("bob", "ops", "user: 'bob' is not an account of this bot: write it as <adapter>/<user id>"),
            ("irc/bob", "ops", "this bot's adapters: memory"),
            ("memory/bob", "two words", "role: 'two words' is not a role name"),
        ):
            answer = await http.post("/console/people/grant", data={"user": user, "role": role, "csrf": csrf})
            assert answer.status_code == 400
            assert words in element(answer.text, "error")
            assert f'value="{html.escape(user)}"' in answer.text  # the form keeps what was typed
        assert running.bot.core.auth.roles("memory/bob") == ()


async def test_a_viewer_sees_roles_but_no_forms_and_cannot_grant(tmp_path: Path) -> None:
    async with console_bot(tmp_path) as running:
        await running.bot.core.auth.grant("memory/carol", "ops")
        async with logged_in(running, "vic", "viewer") as (http, csrf):
            people = (await http.get("/console/people")).text
            assert held_roles(people, "memory/carol") == ["ops"]
            assert 'id="grant"' not in people
            assert 'class="revoke"' not in people
            assert "viewer" in element(people, "read-only")
            for action, fields in (
                ("grant", {"user": "memory/vic", "role": "admin"}),
                ("revoke", {"user": "memory/carol", "role": "ops"}),
            ):
                answer = await http.post(f"/console/people/{action}", data={**fields, "csrf": csrf})
                assert answer.status_code == 403
                assert "only an admin token may change things" in element(answer.text, "error")
            assert running.bot.core.auth.roles("memory/vic") == ()
            assert running.bot.core.auth.roles("memory/carol") == ("ops",)
            await running.bot.core.audit.flush()
            refused = await query(running.bot.core.store, AuditQuery(kind="admin", user="console:vic"))
            assert [(r.decision, r.detail) for r in refused] == [
                ("denied", "console: POST /console/people/grant refused: viewer token"),
                ("denied", "console: POST /console/people/revoke refused: viewer token"),
            ]
