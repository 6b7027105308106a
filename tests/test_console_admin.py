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
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

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


def stream_url(page: str) -> str:
    """The audit page's stream, as its script opens it."""
    found = re.search(r'data-stream="([^"]+)"', page)
    assert found is not None
    return html.unescape(found.group(1))


async def stream_events(
    http: httpx.AsyncClient,
    url: str,
    until: Callable[[list[dict[str, str]]], bool],
    *,
    linger: float,
    last_event_id: str = "",
) -> list[dict[str, str]]:
    """The ``record`` events of the stream at ``url`` (each with its ``id:`` as "id")
    until ``until`` holds of them, and those of ``linger`` seconds more (a second copy
    of a record would come then); ``last_event_id``: as a reconnecting browser sends it."""
    events: list[dict[str, str]] = []
    deadline = math.inf
    headers = {"last-event-id": last_event_id} if last_event_id else {}
    with trio.move_on_at(math.inf) as scope, trio.fail_after(8):
        async with http.stream("GET", url, headers=headers) as stream:
            assert stream.status_code == 200
            event = ""
            async for line in stream.aiter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event == "record":
                    events.append(json.loads(line.removeprefix("data: ")))
                elif line.startswith("id: ") and event == "record":
                    events[-1]["id"] = line.removeprefix("id: ")
                if deadline == math.inf and until(events):
                    deadline = trio.current_time() + linger
                    scope.deadline = deadline
    return events


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
        assert 'data-live="on" data-stream="/console/audit/stream?decision=denied&amp;after=' in page.text
        assert '<script src="/console/static/audit.js"></script>' in page.text
        assert (await http.get("/console/static/audit.js")).status_code == 200
        async with http.stream("GET", stream_url(page.text)) as stream:
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


async def test_a_record_written_between_the_page_and_its_stream_arrives_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page reads the store, then the browser opens the stream: a record written in
    between is on neither unless the stream starts where the page stopped. The rows the
    page shows, and matches hidden on its next page, must not come again."""
    monkeypatch.setattr(_admin_pages, "AUDIT_POLL", 0.1)
    async with console_bot(tmp_path) as running, logged_in(running, "alice", "viewer") as (http, _):
        store = running.bot.core.store
        # Another writer's batch, keyed by its first record's time, whose record is newer
        # than the page's rows: the log's order puts it on the next page.
        began = time.time()
        other = AuditRecord(time=began + 3, kind="route", decision="denied", detail="next page, newer")
        await store.set(NAMESPACE, _key(began - 5, 1), other.to_json())
        for index in range(60):  # a full page, and 10 more on the next, all seconds old
            await write_now(store, "route", "denied", user="memory/bob", detail=f"before {index}")
        await write_now(store, "route", "allowed", user="memory/bob", detail="not a match")
        before_page = time.time()
        page = await http.get("/console/audit", params={"decision": "denied"})
        shown = [row["detail"] for row in audit_rows(page.text)]
        assert shown == [f"before {index}" for index in range(59, 9, -1)]
        await write_now(store, "route", "denied", user="memory/bob", detail="in between")
        # A bot's record reaches the store a moment after its time: one from before the
        # page's read (newer than its rows), written after it.
        late = AuditRecord(time=before_page, kind="route", decision="denied", detail="late")
        await store.set(NAMESPACE, _key(late.time, 7), late.to_json())
        events = await stream_events(
            http, stream_url(page.text), lambda got: {"in between", "late"} <= {e["detail"] for e in got}, linger=1.0
        )
        assert sorted(event["detail"] for event in events) == ["in between", "late"]
        # A browser that reconnects sends the same URL, and the last event's id: the
        # stream goes on from there, not from the page again.
        await write_now(store, "route", "denied", user="memory/bob", detail="while away")
        again = await stream_events(
            http,
            stream_url(page.text),
            lambda got: "while away" in {e["detail"] for e in got},
            linger=1.0,
            last_event_id=events[-1]["id"],
        )
        assert [event["detail"] for event in again] == ["while away"]


async def test_a_stream_url_with_a_bad_start_is_refused_naming_the_parameter(tmp_path: Path) -> None:
    async with console_bot(tmp_path) as running, logged_in(running, "alice", "viewer") as (http, _):
        for params, words in (
            ({"after": "yesterday"}, "after: 'yesterday' is not a time the audit page wrote"),
            ({"after": "nan"}, "after: 'nan' is not a time"),
            ({"after": "-5"}, "after: '-5' is not a time"),
            ({"after": "1", "shown": "abc"}, "shown: 'abc' is not the audit page's list of the rows it shows"),
            ({"after": "1", "shown": "!!!!!!!!"}, "shown: '!!!!!!!!'"),
            ({"after": "1", "shown": "A" * 8 * 101}, "up to 100 digests"),
        ):
            answer = await http.get("/console/audit/stream", params=params)
            assert answer.status_code == 400, params
            assert words in element(answer.text, "error"), params


async def test_a_stream_from_a_page_whose_clock_was_ahead_starts_now_and_ids_never_run_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bots behind one address (ha:) may disagree about the time: a page rendered by one
    whose clock is an hour ahead must not get a 400 (the browser would close the stream
    for good), and an event's id, which a reconnect resumes after, is never later than
    the serving bot's own read, even for a record stamped an hour ahead."""
    monkeypatch.setattr(_admin_pages, "AUDIT_POLL", 0.1)
    async with console_bot(tmp_path) as running, logged_in(running, "alice", "viewer") as (http, _):
        store = running.bot.core.store
        ahead = time.time() + 3600
        url = "/console/audit/stream?" + urlencode({"after": f"{ahead:.6f}", "shown": ""})
        stamped_ahead = AuditRecord(time=ahead, kind="route", decision="denied", detail="from a fast clock")
        await store.set(NAMESPACE, _key(stamped_ahead.time, 3), stamped_ahead.to_json())

        async def write_once_streaming() -> None:
            await trio.sleep(0.5)
            await write_now(store, "route", "denied", user="memory/bob", detail="now")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_once_streaming)
            events = await stream_events(
                http, url, lambda got: {"now", "from a fast clock"} <= {e["detail"] for e in got}, linger=0.5
            )
        assert sorted(event["detail"] for event in events) == ["from a fast clock", "now"]
        assert all(float(event["id"]) <= time.time() for event in events), events


async def test_the_first_audit_pages_of_a_large_log_read_its_newest_records_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy bot writes a record per command: the page must not read the whole log to
    show its newest 50 (the store's reads are counted, entry by entry)."""
    async with console_bot(tmp_path) as running, logged_in(running, "alice", "viewer") as (http, _):
        store = running.bot.core.store
        start = time.time() - 30 * 86400
        for index in range(2000):  # a month, a batch every 20 minutes
            entry = AuditRecord(
                time=start + index * 1200, kind="route", decision="allowed", user="memory/ann", detail=f"old {index}"
            )
            await store.set(NAMESPACE, _key(entry.time, index), entry.to_json())
        for index in range(120):
            await write_now(store, "route", "denied", user="memory/bob", detail=f"new {index}")
        await running.bot.core.audit.flush()

        read: list[str] = []
        listing = store.list

        async def counted(namespace: str, prefix: str = "", **options: Any) -> Any:
            items = await listing(namespace, prefix, **options)
            if namespace == NAMESPACE and not options.get("keys_only"):
                read.extend(item.key for item in items)
            return items

        monkeypatch.setattr(store, "list", counted)
        first = await http.get("/console/audit")
        assert [row["detail"] for row in audit_rows(first.text)][-1] == "new 70"
        assert 50 <= len(read) < 300, len(read)
        read.clear()
        third = await http.get("/console/audit", params={"page": "3"})
        rows = [row["detail"] for row in audit_rows(third.text)]
        assert rows[:20] == [f"new {index}" for index in range(19, -1, -1)]  # then the login's record
        assert rows[-1] == "old 1971"
        assert 150 <= len(read) < 600, len(read)
        # A filter matching only old records reads back as far as they go, and no further.
        read.clear()
        old = await http.get("/console/audit", params={"user": "memory/ann"})
        assert audit_rows(old.text)[0]["detail"] == "old 1999"
        assert len(read) < 600, len(read)


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
