"""Health and metrics, against real servers: a bot in this process with its real HTTP
and gRPC servers (memory adapter), scraped with httpx and parsed with prometheus-client's
own parser; gRPC health asked with the standard stub.

- A chat message answered by a callback moves the counters it should (received,
  matched, replied, sent, RPCs, store calls) and no label carries a user or room; the
  same through a real ``oco run`` with its launched callback, which then stops cleanly.
- ``/healthz`` answers; ``/readyz`` and gRPC health say NOT_SERVING, naming the store,
  while the PostgreSQL behind a :class:`TcpProxy` is cut off, and SERVING again by
  themselves once it is back; likewise while no adapter is connected, and on a standby
  (``ha:``) until it takes over.
- The Grafana dashboard in docs/ is valid JSON and every expression in it names metrics
  the bot exports.
- Route labels are capped per callback; two bots in one process keep their own counts.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from oco_core import Callback, Message
from oco_core._metrics import MAX_ROUTES_PER_CALLBACK, OTHER, Metrics
from oco_core.testing import RunningBot, free_port, open_bot, run_oco, serving
from oco_core.testing._proxy import TcpProxy

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"
SECRET = "secret-pinger-0123456789abcdef"

#: {sample name: {frozenset(labels): value}}
Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def config(tmp_path: Path, extra: str = "", *, store: str = "", adapters: str = "[{type: memory}]") -> str:
    store = store or f'{{url: "sqlite:///{tmp_path}/oco.db"}}'
    return f"""
adapters: {adapters}
store: {store}
http: {{listen: "127.0.0.1:0"}}
callbacks:
  - {{id: pinger, secret: {SECRET}}}
{extra}
"""


async def scrape(client: httpx.AsyncClient) -> tuple[Samples, set[str], str]:
    """Every sample of ``/metrics`` by name and labels, the family names, and the text."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    families = set()
    for family in text_string_to_metric_families(response.text):
        families.add(family.name)
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples, families, response.text


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly these labels (0 when it is absent)."""
    return samples.get(name, {}).get(frozenset(labels.items()), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include these."""
    wanted = set(labels.items())
    return sum(v for key, v in samples.get(name, {}).items() if wanted <= key)


@asynccontextmanager
async def http_client(running: RunningBot) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://{running.bot.http_address}", timeout=10) as client:
        yield client


def grpc_health(address: str, service: str = "") -> int:
    """gRPC health's answer, asked as a load balancer or Kubernetes would (blocking)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status: int = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        return status


async def eventually(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll the coroutine function ``check`` until it returns something true."""
    with trio.move_on_after(timeout):
        while True:
            got = await check()
            if got:
                return got
            await trio.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


# -- counting ---------------------------------------------------------------------------


async def test_a_message_answered_by_a_callback_moves_the_counters(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running, http_client(running) as client:
        pinger = Callback(id="pinger", secret=SECRET, address=running.address)

        @pinger.respond(r"ping", id="ping")
        async def ping(message: Message) -> None:
            await pinger.storage.set("pings", "1")  # a unary RPC, timed
            await message.reply("pong")

        async with serving(pinger):
            before, _, _ = await scrape(client)
            assert value(before, "oco_callback_replicas", callback="pinger") == 1
            assert value(before, "oco_callbacks_connected") == 1
            assert value(before, "oco_leader_active") == 1
            assert value(before, "oco_ready") == 1
            assert value(before, "oco_adapter_connected", adapter="memory") == 1
            assert value(before, "oco_messages_received_total", adapter="memory") == 0  # there from the start

            await running.adapter.inject("oco ping", user="alice", room="general")
            reply = await running.adapter.next_sent()
            assert reply.body == "pong"

            async def replied() -> Samples | None:
                after, _, _ = await scrape(client)
                return after if value(after, "oco_replies_total", callback="pinger", route="ping") >= 1 else None

            after = await eventually(replied, "the reply counted")
            assert value(after, "oco_messages_received_total", adapter="memory") == 1
            assert value(after, "oco_matches_total", callback="pinger", route="ping") == 1
            assert value(after, "oco_replies_total", callback="pinger", route="ping") == 1
            assert value(after, "oco_messages_sent_total", adapter="memory") == 1
            sets = dict(service="oco.Storage", method="Set")
            assert value(after, "oco_rpc_requests_total", **sets, code="OK") == 1
            assert value(after, "oco_rpc_duration_seconds_count", **sets) == 1
            assert value(after, "oco_rpc_duration_seconds_bucket", **sets, le="+Inf") == 1
            # Listen is a stream: counted when it ends, never timed.
            listens = after.get("oco_rpc_duration_seconds_count", {})
            assert not [key for key in listens if ("method", "Listen") in key]
            assert total(after, "oco_store_operation_duration_seconds_count") > total(
                before, "oco_store_operation_duration_seconds_count"
            )
            assert value(after, "oco_stream_queue_depth", callback="pinger", stream="0") == 0
            assert value(after, "oco_events_dropped_total") == 0
            assert value(after, "oco_audit_records_lost_total") == 0
            assert value(after, "oco_build_info", version=__import__("oco_core").__version__) == 1
            assert total(after, "process_cpu_seconds_total") > 0  # the process collector is there too

            # Nobody's identity becomes a label: not the user, not the room, not the message.
            _, _, text = await scrape(client)
            labels = " ".join(re.findall(r"\{[^}]*\}", text))
            for private in ("alice", "general", "memory/"):
                assert private not in labels

        # The stream ended: the callback is still listed (configured), with no replica.
        async def gone() -> Samples | None:
            now, _, _ = await scrape(client)
            return now if value(now, "oco_callback_replicas", callback="pinger") == 0 else None

        now = await eventually(gone, "the stream's end seen")
        assert value(now, "oco_callbacks_connected") == 0
        # Streams are counted as they end (the SDK's are the batched ones).
        assert total(now, "oco_rpc_requests_total", service="oco.Robot", method="ListenBatches") == 1
        assert total(now, "oco_rpc_requests_total", service="oco.Robot", method="SendMessageBatches") == 1


async def test_oco_run_counts_a_command_answered_by_its_launched_callback(
    tmp_path: Path, bot_config: Callable[[str], str]
) -> None:
    # The shell adapter and the bundled example callback (id "example"), launched by the bot.
    text = bot_config('http: {listen: "127.0.0.1:0", address_file: http.address}\n')
    async with run_oco(text, tmp_path) as bot:
        base = f"http://{await bot.written('http.address')}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:

            async def ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await eventually(ready, "the bot ready")
            await bot.write("oco ping")
            await bot.expect("PONG")

            async def replied() -> Samples | None:
                got, _, _ = await scrape(client)
                return got if value(got, "oco_replies_total", callback="example", route="ping") == 1 else None

            got = await eventually(replied, "the reply counted")
            assert value(got, "oco_messages_received_total", adapter="shell") == 1
            assert value(got, "oco_matches_total", callback="example", route="ping") == 1
            assert value(got, "oco_callback_replicas", callback="example") == 1
        assert await bot.stop() == 0
        assert not [line for line in bot.stderr_lines if "Traceback" in line or "ERROR" in line]


async def test_healthz_and_readyz_answer_and_refuse_other_methods(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running, http_client(running) as client:
        healthz = await client.get("/healthz")
        assert (healthz.status_code, healthz.text) == (200, "ok\n")
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"ready": True, "not_ready": []}
        assert ready.headers["content-type"] == "application/json"
        refused = await client.post("/metrics")
        assert refused.status_code == 405
        assert refused.headers["allow"] == "GET, HEAD"
        head = await client.head("/readyz")
        assert (head.status_code, head.content) == (200, b"")
        serving_now = await trio.to_thread.run_sync(grpc_health, running.address)
        assert serving_now == health_pb2.HealthCheckResponse.SERVING


async def test_two_bots_in_one_process_count_apart(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (
        open_bot(config(tmp_path / "a")) as a,
        open_bot(config(tmp_path / "b")) as b,
        http_client(a) as client_a,
        http_client(b) as client_b,
    ):
        await a.adapter.inject("hello")
        await a.adapter.inject("hello again")
        got_a, _, _ = await scrape(client_a)
        got_b, _, _ = await scrape(client_b)
        assert value(got_a, "oco_messages_received_total", adapter="memory") == 2
        assert value(got_b, "oco_messages_received_total", adapter="memory") == 0


def test_route_labels_are_capped_per_callback(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    labels = [metrics._route("many", f"r{i}") for i in range(MAX_ROUTES_PER_CALLBACK + 10)]
    assert labels[:MAX_ROUTES_PER_CALLBACK] == [f"r{i}" for i in range(MAX_ROUTES_PER_CALLBACK)]
    assert set(labels[MAX_ROUTES_PER_CALLBACK:]) == {OTHER}
    assert metrics._route("many", "r3") == "r3"  # one already counted keeps its label
    assert metrics._route("other-callback", "x") == "x"  # the cap is per callback
    assert len([r for r in caplog.records if "more than" in r.getMessage()]) == 1


# -- readiness --------------------------------------------------------------------------


async def not_ready_for(client: httpx.AsyncClient, what: str) -> dict[str, Any] | None:
    response = await client.get("/readyz")
    if response.status_code != 503:
        return None
    body: dict[str, Any] = response.json()
    return body if any(entry["what"] == what for entry in body["not_ready"]) else None


async def test_an_unreachable_store_makes_the_bot_not_ready_until_it_is_back(
    tmp_path: Path, postgres_tables: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="oco_core._health")
    url, prefix = postgres_tables
    real = make_url(url)
    proxy = TcpProxy(real.host or "127.0.0.1", real.port or 5432)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        through = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        store = f'{{type: sql, url: "{through}", table_prefix: {prefix}, statement_timeout: 1, connect_timeout: 1}}'
        async with open_bot(config(tmp_path, store=store)) as running, http_client(running) as client:
            assert (await client.get("/readyz")).status_code == 200

            proxy.cut()
            body = await eventually(lambda: not_ready_for(client, "store"), "/readyz naming the store")
            assert body["ready"] is False
            (entry,) = [e for e in body["not_ready"] if e["what"] == "store"]
            assert "unreachable" in entry["why"]
            status = await trio.to_thread.run_sync(grpc_health, running.address)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            robot = await trio.to_thread.run_sync(grpc_health, running.address, "oco.Robot")
            assert robot == health_pb2.HealthCheckResponse.NOT_SERVING
            # Alive all the while: only readiness fails.
            assert (await client.get("/healthz")).status_code == 200
            samples, _, _ = await scrape(client)
            assert value(samples, "oco_ready") == 0
            assert value(samples, "oco_not_ready", what="store") == 1
            assert total(samples, "oco_store_errors_total", error="StoreUnavailableError") >= 1

            proxy.restore()

            async def ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await eventually(ready, "/readyz 200 again")
            status = await trio.to_thread.run_sync(grpc_health, running.address)
            assert status == health_pb2.HealthCheckResponse.SERVING
        nursery.cancel_scope.cancel()
    # The reason was logged once when it appeared, and its end once.
    went = [r for r in caplog.records if r.name == "oco_core._health" and "not ready" in r.getMessage()]
    assert len(went) == 1, [r.getMessage() for r in went]
    assert went[0].levelname == "WARNING"
    back = [r for r in caplog.records if r.name == "oco_core._health" and "store: fine again" in r.getMessage()]
    assert len(back) == 1


async def test_no_connected_adapter_makes_the_bot_not_ready_until_one_connects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The memory adapter's control service cannot bind a port that is taken: the adapter
    # fails to start and is retried, as one whose chat server is down.
    caplog.set_level(logging.INFO, logger="oco_core._health")
    monkeypatch.setattr("oco_core._health.ADAPTER_GRACE", 1.0)
    port = free_port()
    taken = socket.socket()
    taken.bind(("127.0.0.1", port))
    taken.listen()
    try:
        adapters = f'[{{type: memory, control: "127.0.0.1:{port}"}}]'
        text = config(tmp_path, "bot: {adapter_startup_wait: 0.5}", adapters=adapters)
        async with open_bot(text) as running, http_client(running) as client:
            body = await eventually(lambda: not_ready_for(client, "adapters"), "/readyz naming the adapters")
            (entry,) = body["not_ready"]
            assert "no chat adapter is connected (memory)" in entry["why"]
            status = await trio.to_thread.run_sync(grpc_health, running.address)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            samples, _, _ = await scrape(client)
            assert value(samples, "oco_adapter_connected", adapter="memory") == 0

            def logged(text: str) -> list[logging.LogRecord]:
                return [r for r in caplog.records if r.name == "oco_core._health" and text in r.getMessage()]

            async def warned() -> bool:
                return bool(logged("not ready"))

            # Logged once the grace is over (not ready at once, all the same).
            await eventually(warned, "a WARNING about the adapters")
            (warning,) = logged("not ready")
            assert warning.levelname == "WARNING"
            assert "adapters: no chat adapter is connected (memory)" in warning.getMessage()

            taken.close()  # the next attempt connects

            async def ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await eventually(ready, "/readyz 200 once the adapter runs", timeout=30)
            status = await trio.to_thread.run_sync(grpc_health, running.address)
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert len(logged("not ready")) == 1
            assert len(logged("adapters: fine again")) == 1
    finally:
        taken.close()


async def test_a_condition_set_by_another_part_shows_and_clears(tmp_path: Path) -> None:
    # What the HA helper does for a standby, any part may do: say why, and clear it.
    async with open_bot(config(tmp_path)) as running, http_client(running) as client:
        running.bot.health.set_condition("maintenance", "draining for an upgrade")
        body = await not_ready_for(client, "maintenance")
        assert body == {"ready": False, "not_ready": [{"what": "maintenance", "why": "draining for an upgrade"}]}

        async def grpc_is(status: int) -> bool:
            return await trio.to_thread.run_sync(grpc_health, running.address) == status

        await eventually(lambda: grpc_is(health_pb2.HealthCheckResponse.NOT_SERVING), "NOT_SERVING")
        running.bot.health.clear_condition("maintenance")
        assert (await client.get("/readyz")).status_code == 200
        await eventually(lambda: grpc_is(health_pb2.HealthCheckResponse.SERVING), "SERVING")


# -- the dashboard ----------------------------------------------------------------------


def exprs(node: Any) -> list[str]:
    """Every ``expr`` string in a Grafana dashboard's JSON."""
    found = []
    if isinstance(node, dict):
        for key, item in node.items():
            if key == "expr" and isinstance(item, str):
                found.append(item)
            else:
                found += exprs(item)
    elif isinstance(node, list):
        for item in node:
            found += exprs(item)
    return found


async def test_the_grafana_dashboard_uses_only_metrics_the_bot_exports(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"]
    expressions = exprs(dashboard)
    assert len(expressions) >= 10
    async with open_bot(config(tmp_path)) as running, http_client(running) as client:
        samples, families, _ = await scrape(client)
    exported = set(samples) | families
    for family in families:  # a labelled metric with no samples yet still has its forms
        exported |= {family + suffix for suffix in ("_total", "_bucket", "_sum", "_count")}
    used = {name for expr in expressions for name in re.findall(r"\b(?:oco|process)_[a-z_]+\b", expr)}
    assert used, "the dashboard names no metric"
    missing = sorted(used - exported)
    assert not missing, f"the dashboard uses metrics the bot does not export: {missing}"


async def test_a_standby_is_not_ready_until_it_takes_over(tmp_path: Path, postgres_tables: tuple[str, str]) -> None:
    url, prefix = postgres_tables
    text = config(tmp_path, "ha: {}", store=f'{{url: "{url}", table_prefix: {prefix}}}')

    async def status_of(running: RunningBot) -> int:
        return await trio.to_thread.run_sync(grpc_health, running.address)

    async with trio.open_nursery() as nursery:
        first_scope = trio.CancelScope()
        first_up = trio.Event()
        bots: dict[str, RunningBot] = {}

        async def run_first() -> None:
            with first_scope:
                async with open_bot(text) as running:
                    bots["first"] = running
                    first_up.set()
                    await trio.sleep_forever()

        nursery.start_soon(run_first)
        await first_up.wait()
        first = bots["first"]
        async with http_client(first) as client:

            async def first_ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await eventually(first_ready, "the first bot active and ready")
        async with open_bot(text) as second, http_client(second) as client:
            body = await eventually(lambda: not_ready_for(client, "standby"), "/readyz naming the standby")
            (entry,) = body["not_ready"]  # not "adapters": a standby connects none on purpose
            assert entry["why"].startswith("this bot is a standby (ha:); the active bot is at ")
            assert await status_of(second) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await status_of(first) == health_pb2.HealthCheckResponse.SERVING
            samples, _, _ = await scrape(client)
            assert value(samples, "oco_leader_active") == 0
            assert value(samples, "oco_not_ready", what="standby") == 1

            first_scope.cancel()  # the active bot stops and releases its lease

            async def ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await eventually(ready, "the standby active and ready")
            assert await status_of(second) == health_pb2.HealthCheckResponse.SERVING
            samples, _, _ = await scrape(client)
            assert value(samples, "oco_leader_active") == 1
            assert value(samples, "oco_leader_takeovers_total") == 1
