"""The SQL store on a PostgreSQL that stops answering: every call fails as unavailable
within its timeouts instead of hanging, through the store and through a real bot's
Storage RPC, and the store heals by itself when the server answers again. The audit log
rides such an outage out from memory and writes everything once the server is back.

The server is the real one (``OCO_TEST_POSTGRES_URL``) behind a :class:`TcpProxy` of the
test's own, frozen: connections are accepted and their bytes read, nothing is answered.
That is what a hung server or a network dropping packets looks like to the client, and
what TCP keepalives and the server's own statement_timeout cannot catch."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

import pytest
import sqlalchemy as sa
import trio
from sqlalchemy.engine import make_url

from oco_core import StoreUnavailableError
from oco_core._audit import AuditLog, AuditQuery, query
from oco_core._sql_store import SqlStore, SqlStoreConfig, open_sql_store
from oco_core.testing._proxy import TcpProxy

#: The timeouts the tests configure, short so that the tests are.
STATEMENT_TIMEOUT = 1.0
CONNECT_TIMEOUT = 1
#: What a call may take past its timeout on a busy machine before the test calls it a hang.
SLACK = 2.0


@asynccontextmanager
async def proxied(url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    """A running proxy in front of the PostgreSQL at ``url``, and the URL through it."""
    real = make_url(url)
    proxy = TcpProxy(real.host or "127.0.0.1", real.port or 5432)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        through = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        yield proxy, through
        nursery.cancel_scope.cancel()


def store_config(url: str, prefix: str, *, pool_pre_ping: bool = False) -> SqlStoreConfig:
    return SqlStoreConfig(
        url=url,
        table_prefix=prefix,
        statement_timeout=STATEMENT_TIMEOUT,
        connect_timeout=CONNECT_TIMEOUT,
        pool_pre_ping=pool_pre_ping,
    )


async def timed_failure(call: Awaitable[object]) -> tuple[float, str]:
    """Seconds until the awaitable ``call`` raised StoreUnavailableError, and its message."""
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError) as caught:
        await call
    return time.monotonic() - start, str(caught.value)


@pytest.mark.parametrize("pre_ping", [False, True], ids=["", "pool_pre_ping"])
async def test_calls_to_a_frozen_server_fail_as_unavailable_within_the_timeouts(
    postgres_tables: tuple[str, str], pre_ping: bool
) -> None:
    url, prefix = postgres_tables
    async with (
        proxied(url) as (proxy, through),
        open_sql_store(store_config(through, prefix, pool_pre_ping=pre_ping)) as store,
    ):
        assert await store.set("ns", "k", b"before") == 1
        proxy.freeze()

        # On the connection the pool already holds: the statement is sent, never answered.
        took, message = await timed_failure(store.get("ns", "k"))
        assert STATEMENT_TIMEOUT <= took < STATEMENT_TIMEOUT + 1 + SLACK, took
        assert f"127.0.0.1:{proxy.port}" in message
        assert "no answer within 2 s" in message, message

        # The pool discarded that connection; a new one never finishes its start-up.
        took, message = await timed_failure(store.set("ns", "k", b"during"))
        assert CONNECT_TIMEOUT <= took < CONNECT_TIMEOUT + SLACK, took
        assert "timeout" in message, message

        # Many calls at once: each fails within its own timeouts, none waits for another's.
        ends: list[float] = []

        async def one() -> None:
            ends.append((await timed_failure(store.get("ns", "k")))[0])

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
        assert len(ends) == 20
        assert max(ends) < 2 * (CONNECT_TIMEOUT + STATEMENT_TIMEOUT + 1) + SLACK, sorted(ends)

        proxy.restore()
        with trio.fail_after(30):
            while True:
                try:
                    item = await store.get("ns", "k")
                    break
                except StoreUnavailableError:
                    await trio.sleep(0.1)
        assert item is not None
        # The write during the freeze may have reached the server once restored (a
        # timed-out write may have happened, as UNAVAILABLE says); nothing else did.
        assert item.value in (b"before", b"during")


async def test_with_pre_ping_a_write_after_the_server_dropped_every_connection_succeeds(
    postgres_tables: tuple[str, str],
) -> None:
    # What pool_pre_ping is for (a database restart costs no failed write), kept now that
    # the store pings under its own watch.
    url, prefix = postgres_tables
    async with proxied(url) as (proxy, through):
        async with open_sql_store(store_config(through, prefix, pool_pre_ping=True)) as store:
            assert await store.set("ns", "k", b"1") == 1
            proxy.cut()
            proxy.restore()
            assert await store.set("ns", "k", b"2") == 2


async def test_a_statement_the_server_holds_too_long_is_cancelled_by_the_server(
    postgres_tables: tuple[str, str],
) -> None:
    # A live server waiting on a lock: PostgreSQL's own statement_timeout cancels it, so
    # the client's deadline is not needed and the connection stays usable.
    url, prefix = postgres_tables
    async with open_sql_store(store_config(url, prefix)) as store:
        assert await store.set("ns", "locked", b"1") == 1
        holder = sa.create_engine(SqlStoreConfig(url=url).sqlalchemy_url())
        try:
            with holder.connect() as conn, conn.begin():
                conn.execute(
                    sa.text(f"SELECT * FROM {prefix}kv WHERE namespace = 'ns' FOR UPDATE"),
                )
                took, message = await timed_failure(store.set("ns", "locked", b"2"))
                assert STATEMENT_TIMEOUT <= took < STATEMENT_TIMEOUT + SLACK, took
                assert "statement timeout" in message, message
        finally:
            holder.dispose()
        assert await store.set("ns", "locked", b"3") == 2


# ---- the audit log through an outage ----


@asynccontextmanager
async def audit_through(
    url: str, prefix: str, max_pending: int = 100_000
) -> AsyncIterator[tuple[TcpProxy, SqlStore, AuditLog]]:
    """An audit log writing to the PostgreSQL at ``url`` through a proxy, its writer running."""
    async with proxied(url) as (proxy, through), open_sql_store(store_config(through, prefix)) as store:
        log = AuditLog(store, retention_days=None, max_pending=max_pending)
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            yield proxy, store, log
            nursery.cancel_scope.cancel()


async def wait_for_log(caplog: pytest.LogCaptureFixture, text: str) -> None:
    """Wait until a captured log line contains ``text`` (the writer's own signal)."""
    with trio.fail_after(30):
        while not any(text in r.getMessage() for r in caplog.records):
            await trio.sleep(0.05)


def lines_with(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def test_the_audit_log_rides_out_an_outage_and_writes_everything_after(
    postgres_tables: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    # The server down (connections refused at once) for longer than the 7.5 s of
    # retries after which a batch used to be dropped. (A hung server is the next test's.)
    outage = 10.0
    url, prefix = postgres_tables
    async with audit_through(url, prefix) as (proxy, store, log):
        log.record("admin", "allowed", detail="before")
        await log.flush()
        proxy.cut()
        end = trio.current_time() + outage
        n = 0
        while trio.current_time() < end:
            log.record("route", "allowed", detail=f"#{n}")
            n += 1
            await trio.sleep(0.1)
        proxy.restore()
        with trio.fail_after(60):
            await log.flush()
        assert log.lost == 0
        records = await query(store, AuditQuery(), limit=10 * n)
    assert [r.detail for r in records] == ["before", *(f"#{i}" for i in range(n))]
    assert len(lines_with(caplog, "cannot write to the store")) == 1
    assert len(lines_with(caplog, "writing to the store again")) == 1
    assert not lines_with(caplog, "dropped")


async def test_records_past_the_queue_are_dropped_counted_and_logged_once(
    postgres_tables: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    over = 500
    held = 5000  # auth.audit.max_pending, lowered from 100,000 to keep the test short
    url, prefix = postgres_tables
    async with audit_through(url, prefix, max_pending=held) as (proxy, store, log):
        proxy.freeze()
        log.record("admin", "allowed", detail="held")
        # The writer holds that record's batch and retries: the queue is all that is left.
        await wait_for_log(caplog, "cannot write to the store")
        for n in range(held + over):
            log.record("route", "allowed", detail=f"#{n}")
        assert log.lost == over
        proxy.restore()
        with trio.fail_after(120):
            await log.flush()
        stored = await query(store, AuditQuery(), limit=held + over + 10)
    assert len(stored) == 1 + held
    assert [r.detail for r in stored[:2]] == ["held", "#0"]
    assert stored[-1].detail == f"#{held - 1}"
    assert len(lines_with(caplog, "dropping records until it catches up")) == 1
    assert lines_with(caplog, "dropped") == [
        f"audit log: {over} record(s) were dropped while the store was behind or unavailable"
    ]
