"""The SDK's side of events beyond chat: webhooks, schedules, publish/subscribe and
acknowledgements. Pure parts (the request, response and event objects) first, then
callbacks over real gRPC against a bot in this process (memory adapter) or a real
`oco run`, some callbacks in subprocesses so that they can be killed mid-handler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import trio

from oco_core import (
    Callback,
    CapabilityError,
    InvalidRequestError,
    Message,
    PublishedEvent,
    Response,
    ScheduleFiring,
    WebhookRequest,
)
from oco_core._proto import core_pb2
from oco_core.testing import Lines, RunningBot, open_bot, serving

# -- the objects handlers get ---------------------------------------------------------


def webhook_event(headers: dict[str, str] | None = None, **fields: object) -> core_pb2.Event:
    request = core_pb2.WebhookRequest(
        id="r1",
        route_id="POST /ci",
        method="POST",
        path="/ci",
        remote_address="127.0.0.1:5555",
        received_unix_ms=1_700_000_000_000,
    )
    request.headers.update(headers or {})
    for name, value in fields.items():
        setattr(request, name, value)
    return core_pb2.Event(webhook_request=request, delivery_id="d1", redelivered=2)


def test_a_webhook_request_reads_its_query_headers_and_body() -> None:
    request = WebhookRequest(
        webhook_event(
            query="ref=main&tag=a&tag=b&empty=",
            headers={"content-type": "application/json; charset=utf-8", "x-github-event": "push"},
            body=b'{"ok": true}',
        )
    )
    assert (request.method, request.path, request.route_id, request.id) == ("POST", "/ci", "POST /ci", "r1")
    assert request.params == {"ref": "main", "tag": "a", "empty": ""}
    assert request.param_list("tag") == ["a", "b"]
    assert request.param_list("missing") == []
    # Headers come lower case from the bot; any case finds them.
    assert request.headers["X-GitHub-Event"] == "push"
    assert "Content-Type" in request.headers
    assert request.headers.get("X-Missing") is None
    assert request.json() == {"ok": True}
    assert request.text() == '{"ok": true}'
    assert request.remote_address == "127.0.0.1:5555"
    assert request.received == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert (request.delivery_id, request.redelivered, request.asynchronous) == ("d1", 2, False)


def test_a_webhook_body_that_is_not_json_says_where() -> None:
    bad = WebhookRequest(webhook_event(body=b'{"ok": tru}'))
    with pytest.raises(
        ValueError, match=r"^the request's body is not valid JSON: Expecting value at line 1, column 8$"
    ):
        bad.json()
    with pytest.raises(ValueError, match="body is empty; JSON was expected"):
        WebhookRequest(webhook_event(body=b"  ")).json()
    latin = WebhookRequest(webhook_event(body="café".encode("latin-1"), headers={"content-type": "text/plain"}))
    with pytest.raises(ValueError, match=r"body is not utf-8 text \(byte 3\)"):
        latin.text()
    declared = WebhookRequest(
        webhook_event(body="café".encode("latin-1"), headers={"content-type": 'text/plain; charset="latin-1"'})
    )
    assert declared.text() == "café"


def test_responses() -> None:
    as_json = Response.json({"ok": True, "name": "café"}, status=201).to_pb("r1")
    assert (as_json.request_id, as_json.status) == ("r1", 201)
    assert json.loads(as_json.body) == {"ok": True, "name": "café"}
    assert as_json.headers["content-type"] == "application/json"
    as_text = Response.text("hello", headers={"x-a": "1"}).to_pb("r2")
    assert (as_text.status, as_text.body, dict(as_text.headers)) == (
        200,
        b"hello",
        {"content-type": "text/plain; charset=utf-8", "x-a": "1"},
    )
    raw = Response(b"\x00\x01", status=202, headers={"Content-Type": "application/octet-stream"}).to_pb("r3")
    assert dict(raw.headers) == {"Content-Type": "application/octet-stream"}
    assert Response("text").to_pb("r4").headers["content-type"] == "text/plain; charset=utf-8"
    with pytest.raises(ValueError, match="HTTP status 700 is not between 100 and 599"):
        Response(status=700)


def test_schedule_firings_and_published_events() -> None:
    firing = ScheduleFiring(
        core_pb2.Event(
            schedule_firing=core_pb2.ScheduleFiring(
                schedule_id="standup",
                scheduled_unix_ms=1_764_489_600_000,
                scheduled_time="2025-11-30T09:00:00+01:00",
                late=True,
            ),
            delivery_id="d",
        )
    )
    assert firing.scheduled_time == datetime(2025, 11, 30, 8, 0, tzinfo=UTC)
    assert firing.scheduled_time.utcoffset() == timedelta(hours=1)  # in the schedule's own zone
    assert (firing.schedule_id, firing.late, firing.redelivered) == ("standup", True, 0)
    # A bot that leaves the string out: the same instant, in UTC.
    bare = ScheduleFiring(core_pb2.Event(schedule_firing=core_pb2.ScheduleFiring(scheduled_unix_ms=1_764_489_600_000)))
    assert bare.scheduled_time == firing.scheduled_time

    event = PublishedEvent(
        core_pb2.Event(
            published_event=core_pb2.PublishedEvent(
                id="e1",
                topic="deploys.finished",
                payload=b'{"app": "api"}',
                attributes={"env": "prod"},
                publisher="ci",
                published_unix_ms=1_700_000_000_500,
            ),
            redelivered=1,
        )
    )
    assert event.json() == {"app": "api"}
    assert (event.topic, event.publisher, event.attributes, event.redelivered) == (
        "deploys.finished",
        "ci",
        {"env": "prod"},
        1,
    )
    assert event.published == datetime(2023, 11, 14, 22, 13, 20, 500_000, tzinfo=UTC)
    with pytest.raises(ValueError, match=r"the payload of event e2 on 'x' is not JSON"):
        PublishedEvent(core_pb2.Event(published_event=core_pb2.PublishedEvent(id="e2", topic="x", payload=b"{"))).json()


def test_declarations_are_checked_where_they_are_written() -> None:
    bot = Callback(id="cb", secret="s")

    async def hook(request: WebhookRequest) -> Response | None:
        return None

    async def tick(firing: ScheduleFiring) -> None:
        pass

    bot.webhook("post", "/ci")(hook)
    with pytest.raises(ValueError, match=r"webhook route POST /ci is declared twice"):
        bot.webhook("POST", "/ci", id="other")(hook)
    with pytest.raises(ValueError, match=r"two webhook routes are called 'POST /ci'"):
        bot.webhook("GET", "/ci", id="POST /ci")(hook)
    with pytest.raises(ValueError, match=r"webhook route POST 'ci': the path must start with '/'"):
        bot.webhook("POST", "ci")
    with pytest.raises(ValueError, match=r"the method must be an HTTP method"):
        bot.webhook("PO ST", "/x")
    bot.webhook("*", "/github/{rest}")(hook)
    assert [w.route.id for w in bot._webhooks] == ["POST /ci", "* /github/{rest}"]

    with pytest.raises(
        ValueError, match=r"schedule '\*/5 \* \*': cron expression '\*/5 \* \*' has 3 field\(s\); it needs five"
    ):
        bot.schedule("*/5 * *")
    with pytest.raises(ValueError, match=r"schedule '0 9 \* \* \*': unknown time zone 'Mars/Olympus'"):
        bot.schedule("0 9 * * *", tz="Mars/Olympus")
    bot.schedule("0  9 * * mon-fri", tz="Europe/Paris", catch_up=90.5)(tick)
    bot.every(minutes=1, seconds=0.5)(tick)
    with pytest.raises(ValueError, match=r"two schedules are called 'every 61s'"):
        bot.every(seconds=61)(tick)
    with pytest.raises(ValueError, match=r"cron expression '61 \* \* \* \*' is not valid"):
        bot.schedule("61 * * * *")
    with pytest.raises(ValueError, match=r"every needs a positive interval"):
        bot.every()
    declared = [
        (s.schedule.id, s.schedule.cron, s.schedule.every_seconds, s.schedule.catch_up_seconds) for s in bot._schedules
    ]
    assert declared == [("0 9 * * mon-fri", "0 9 * * mon-fri", 0, 91), ("every 61s", "", 61, 0)]

    with pytest.raises(ValueError, match=r"'#' before its last segment"):
        bot.on_event("deploys.#.x")
    with pytest.raises(ValueError, match=r"durable_ttl is for durable routes; pass durable=True too"):
        bot.respond("x", durable_ttl=5)


# -- against a bot --------------------------------------------------------------------

PUBLISHER = "secret-publisher-0123456789abc"
WORKER = "secret-worker-0123456789abcdef"


def events_config(tmp_path: Path, callbacks: Sequence[str], extra: str = "", **capabilities: str) -> str:
    """A bot with the memory adapter and these callbacks (secrets as :func:`callback`
    expects), ``capabilities`` by callback id as YAML flow mappings."""
    entries = "\n".join(
        f"  - {{id: {c}, secret: secret-{c}-0123456789abcdef"
        + (f", capabilities: {capabilities[c]}" if c in capabilities else "")
        + "}"
        for c in callbacks
    )
    return f"""
adapters: [{{type: memory}}]
store: {{url: "sqlite:///{tmp_path}/oco.db"}}
callbacks:
{entries}
{extra}
"""


def callback(running: RunningBot, id: str) -> Callback:
    return Callback(id=id, secret=f"secret-{id}-0123456789abcdef", address=running.address)


async def settled(running: RunningBot, *callbacks: str) -> None:
    """Wait until no durable event waits for these callbacks: each was acknowledged."""
    hub = running.bot.core.events
    with trio.fail_after(10):
        while any(hub.waiting(c) for c in callbacks):
            await trio.sleep(0.01)


async def test_publish_reaches_each_subscriber_once_and_no_other(tmp_path: Path) -> None:
    async with open_bot(
        events_config(tmp_path, ["ci", "alpha", "beta", "gamma", "narrow"], narrow="{publish: ['builds.*']}")
    ) as running:
        got: dict[str, list[PublishedEvent]] = {"alpha": [], "beta": [], "gamma": []}
        arrived = trio.Event()
        subscribers: list[Callback] = []
        for name, topic in (("alpha", "deploys.*"), ("beta", "deploys.#"), ("gamma", "builds.#")):
            sub = callback(running, name)

            def make(seen: list[PublishedEvent]) -> Callable[[PublishedEvent], Awaitable[None]]:
                async def on_event(event: PublishedEvent) -> None:
                    seen.append(event)
                    if all(got.values()) and len(got["gamma"]) >= 1:
                        arrived.set()

                return on_event

            sub.on_event(topic)(make(got[name]))
            subscribers.append(sub)
        ci = callback(running, "ci")
        narrow = callback(running, "narrow")
        async with serving(ci, narrow, *subscribers):
            event_id = await ci.publish("deploys.finished", {"app": "api", "ok": True}, attributes={"env": "prod"})
            # A later event to the third subscriber: had the first gone to it, it would be
            # there first (a callback's events arrive in order).
            await ci.publish("builds.done", "green")
            with trio.fail_after(10):
                await arrived.wait()
            await settled(running, "alpha", "beta", "gamma")
            for name in ("alpha", "beta"):
                (event,) = got[name]
                assert (event.id, event.topic, event.publisher) == (event_id, "deploys.finished", "ci")
                assert event.json() == {"app": "api", "ok": True}
                assert event.attributes == {"env": "prod"}
                assert event.delivery_id
                assert event.redelivered == 0
            assert [(e.topic, e.payload) for e in got["gamma"]] == [("builds.done", b"green")]

            # Capabilities: `narrow` may publish to builds.* only.
            assert await narrow.publish("builds.x", b"")
            with pytest.raises(CapabilityError, match=r"deploys\.finished") as refused:
                await narrow.publish("deploys.finished", {})
            assert refused.value.capability == "publish"
            with pytest.raises(InvalidRequestError, match=r"under 'oco\.'"):
                await ci.publish("oco.callback.connected", {})
            await settled(running, "alpha", "beta", "gamma")
            assert len(got["gamma"]) == 2


async def test_acknowledgements_go_in_batches_and_a_lone_one_at_once(tmp_path: Path) -> None:
    async with open_bot(events_config(tmp_path, ["ci", "worker"])) as running:
        hub = running.bot.core.events
        calls: list[int] = []
        acknowledge = hub.acknowledge

        def counting(callback_id: str, delivery_ids: Sequence[str]) -> int:
            calls.append(len(delivery_ids))
            return acknowledge(callback_id, delivery_ids)

        hub.acknowledge = counting  # type: ignore[method-assign]  # a spy on the real hub
        gate = trio.Event()
        handling = 0
        worker = callback(running, "worker")

        @worker.on_event("jobs.*")
        async def job(event: PublishedEvent) -> None:
            nonlocal handling
            handling += 1
            await gate.wait()

        ci = callback(running, "ci")
        async with serving(ci, worker):
            for n in range(20):
                await ci.publish(f"jobs.n{n}", b"")
            with trio.fail_after(10):
                while handling < 20:
                    await trio.sleep(0.01)
            assert calls == []  # nothing is acknowledged before its handler returns
            gate.set()
            await settled(running, "worker")
            assert sum(calls) == 20
            assert len(calls) <= 2, calls  # twenty handlers done in one moment: one call (two at worst)

            # A lone event is acknowledged without waiting for company.
            calls.clear()
            await ci.publish("jobs.lone", b"")
            with trio.fail_after(2):
                while calls != [1]:
                    await trio.sleep(0.005)


async def test_a_handler_that_raises_is_acknowledged_all_the_same(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_bot(events_config(tmp_path, ["ci", "worker"])) as running:
        worker = callback(running, "worker")
        seen: list[int] = []

        @worker.on_event("jobs.#")
        async def job(event: PublishedEvent) -> None:
            seen.append(event.redelivered)
            raise RuntimeError("boom")

        ci = callback(running, "ci")
        async with serving(ci, worker):
            await ci.publish("jobs.fail", b"")
            await settled(running, "worker")
            await trio.sleep(0.2)  # nothing comes back
        assert seen == [0]
        assert "handler failed for published_event (acknowledged all the same)" in caplog.text
        assert "RuntimeError: boom" in caplog.text


async def test_durable_chat_routes_wait_for_the_callback_and_are_acknowledged(tmp_path: Path) -> None:
    async with open_bot(events_config(tmp_path, ["deploy"])) as running:
        seen: list[Message] = []

        def make() -> Callback:
            cb = callback(running, "deploy")

            @cb.respond(r"^deploy (\w+)$", durable=True, durable_ttl=30)
            async def deploy(message: Message) -> None:
                seen.append(message)
                await message.reply(f"deploying {message.match(1)}")

            return cb

        async with serving(make()):
            await running.adapter.inject("oco deploy api", room="general")
            with trio.fail_after(10):
                assert (await running.adapter.next_sent()).body == "deploying api"
            await settled(running, "deploy")
        assert seen[0].delivery_id
        # Away: the match waits in the bot (its ghost route takes it), and comes when the
        # callback is back.
        with trio.fail_after(10):
            while running.bot.core.router.subscriptions("deploy"):
                await trio.sleep(0.01)
        await running.adapter.inject("oco deploy web", room="general")
        with trio.fail_after(10):
            while not running.bot.core.events.waiting("deploy"):
                await trio.sleep(0.01)
        async with serving(make()):
            with trio.fail_after(10):
                assert (await running.adapter.next_sent()).body == "deploying web"
            await settled(running, "deploy")
        assert [m.match(1) for m in seen] == ["api", "web"]


async def test_webhooks_answered_by_handlers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    extra = 'http: {listen: "127.0.0.1:0"}'
    async with open_bot(events_config(tmp_path, ["builds"], extra)) as running:
        cb = callback(running, "builds")
        seen: list[WebhookRequest] = []
        handled = trio.Event()

        @cb.webhook("POST", "/ci", help="CI results")
        async def ci(request: WebhookRequest) -> Response | None:
            seen.append(request)
            build = request.json()
            return Response.json(
                {"build": build["id"], "ref": request.params.get("ref"), "event": request.headers["X-Event"]},
                status=201,
            )

        @cb.webhook("GET", "/quiet")
        async def quiet(request: WebhookRequest) -> Response | None:
            return None

        @cb.webhook("POST", "/broken")
        async def broken(request: WebhookRequest) -> Response | None:
            raise RuntimeError("secret internals")

        @cb.webhook("*", "/files/{rest}")
        async def files(request: WebhookRequest) -> Response | None:
            return Response.text(f"{request.method} {request.path}", headers={"x-route": request.route_id})

        @cb.webhook("POST", "/later", asynchronous=True)
        async def later(request: WebhookRequest) -> Response | None:
            seen.append(request)
            handled.set()
            return None

        async with serving(cb), httpx.AsyncClient(base_url=f"http://{running.bot.http_address}/hooks/builds") as http:
            answer = await http.post("/ci?ref=main", json={"id": 7}, headers={"x-event": "push"})
            assert (answer.status_code, answer.json()) == (201, {"build": 7, "ref": "main", "event": "push"})
            assert answer.headers["content-type"] == "application/json"
            assert seen[0].remote_address.startswith("127.0.0.1:")
            assert not seen[0].delivery_id  # a synchronous request is not kept: nothing to acknowledge

            answer = await http.post("/ci", content=b"{not json")
            assert answer.status_code == 400
            assert answer.text == (
                "the request's body is not valid JSON: Expecting property name enclosed in double quotes "
                "at line 1, column 2\n"
            )

            answer = await http.get("/quiet")
            assert (answer.status_code, answer.content) == (204, b"")

            answer = await http.post("/broken")
            assert answer.status_code == 500
            assert answer.text == "the callback failed to handle this request\n"  # nothing of the exception
            assert "RuntimeError: secret internals" in caplog.text

            answer = await http.delete("/files/a/b.txt")
            assert (answer.status_code, answer.text) == (200, "DELETE /files/a/b.txt")
            assert answer.headers["x-route"] == "* /files/{rest}"

            answer = await http.post("/later", content=b"x")
            assert answer.status_code == 202
            with trio.fail_after(10):
                await handled.wait()
            assert seen[-1].asynchronous
            assert seen[-1].delivery_id
            await settled(running, "builds")


async def test_schedules_fire_their_handlers(tmp_path: Path) -> None:
    async with open_bot(events_config(tmp_path, ["clock"])) as running:
        cb = callback(running, "clock")
        firings: list[ScheduleFiring] = []
        enough = trio.Event()

        @cb.every(seconds=1)
        async def tick(firing: ScheduleFiring) -> None:
            firings.append(firing)
            if len(firings) >= 2:
                enough.set()

        @cb.schedule("0 0 1 1 *", tz="Europe/Paris", id="new-year")
        async def new_year(firing: ScheduleFiring) -> None:
            raise AssertionError("it is not new year")

        async with serving(cb):
            with trio.fail_after(10):
                await enough.wait()
            await settled(running, "clock")
        first, second = firings[:2]
        assert first.schedule_id == second.schedule_id == "every 1s"
        assert second.scheduled_time - first.scheduled_time == timedelta(seconds=1)
        assert first.scheduled_time.tzinfo is not None
        assert first.scheduled_time.timestamp() % 1 == 0  # slots aligned to the epoch
        assert not first.late
        assert datetime.now(UTC) - second.scheduled_time < timedelta(seconds=5)
        ids = {d.schedule.id for d in running.bot.core.events.schedules() if d.callback_id == "clock"}
        assert ids == {"every 1s", "new-year"}


# -- a callback killed mid-handler ----------------------------------------------------

WORKER_PROGRAM = """
import sys, trio
from oco_core import Callback, PublishedEvent

bot = Callback()

@bot.on_event("jobs.*")
async def job(event: PublishedEvent) -> None:
    print(f"handling {event.topic} {event.payload.decode()} redelivered={event.redelivered}", flush=True)
    if event.redelivered == 0:
        await trio.sleep_forever()  # killed here
    print(f"done {event.topic}", flush=True)

bot.run()
"""


@asynccontextmanager
async def worker_process(tmp_path: Path, running: RunningBot, output: Lines) -> AsyncIterator[trio.Process]:
    program = tmp_path / "worker.py"
    program.write_text(textwrap.dedent(WORKER_PROGRAM))
    env = {
        **os.environ,
        "OCO_ADDRESS": running.address,
        "OCO_CALLBACK_ID": "worker",
        "OCO_SECRET": "secret-worker-0123456789abcdef",
    }
    process = await trio.lowlevel.open_process(
        [sys.executable, str(program)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    async with trio.open_nursery() as nursery:
        assert process.stdout is not None
        nursery.start_soon(output.pump, process.stdout)
        try:
            yield process
        finally:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def test_an_event_whose_callback_was_killed_mid_handler_comes_again_and_is_acknowledged_once(
    tmp_path: Path,
) -> None:
    async with open_bot(events_config(tmp_path, ["ci", "worker"])) as running:
        hub = running.bot.core.events
        ci = callback(running, "ci")
        async with serving(ci):
            first = Lines("the first worker")
            async with worker_process(tmp_path, running, first) as process:
                await first.wait_for(r"connected to .* with 0 route\(s\), 1 event handler\(s\)", timeout=20)
                await ci.publish("jobs.build", b"42")
                await first.wait_for(r"^handling jobs\.build 42 redelivered=0$")
                process.kill()  # SIGKILL: no goodbye, no acknowledgement
            assert hub.waiting("worker") == 1

            second = Lines("the second worker")
            async with worker_process(tmp_path, running, second) as process:
                await second.wait_for(r"^handling jobs\.build 42 redelivered=1$", timeout=20)
                await second.wait_for(r"^done jobs\.build$")
                await settled(running, "worker")
                acknowledged = hub.stats.acknowledged
                # Acknowledged once: nothing more comes, on this stream or another.
                await ci.publish("jobs.after", b"43")
                await second.wait_for(r"^handling jobs\.after 43 redelivered=0$")
                assert len(second.matches(r"^handling jobs\.build")) == 1
                assert hub.stats.acknowledged == acknowledged
                process.kill()
