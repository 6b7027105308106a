"""The audit log against a real SQLite store: batching, filters, retention, and records
queued at shutdown reaching the store."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from oco_core._audit import NAMESPACE, AuditLog, AuditQuery, AuditRecord, prune, query
from oco_core._sql_store import SqlStoreConfig, open_sql_store


def _config(tmp_path: Path) -> SqlStoreConfig:
    return SqlStoreConfig(url=f"sqlite:///{tmp_path / 'oco.db'}")


@asynccontextmanager
async def writing(log: AuditLog) -> AsyncIterator[AuditLog]:
    """``log`` with its writer running until the block ends (then, as when the bot stops,
    it writes what is still queued)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        yield log
        nursery.cancel_scope.cancel()


async def test_a_burst_is_written_in_few_entries_and_read_back_in_order(tmp_path: Path) -> None:
    async with open_sql_store(_config(tmp_path)) as store:
        async with writing(AuditLog(store, retention_days=None)) as log:
            for i in range(3000):
                log.record("route", "allowed", user=f"memory/u{i % 3}", route="ping", detail=f"#{i}")
            await log.flush()
        entries = await store.list(NAMESPACE, limit=10_000, keys_only=True)
        assert 1 <= len(entries) < 100  # batched, not one write per record
        records = await query(store, AuditQuery(), limit=10_000)
        assert [r.detail for r in records] == [f"#{i}" for i in range(3000)]
        last = await query(store, AuditQuery(user="memory/u1"), limit=2)
        assert [r.detail for r in last] == ["#2995", "#2998"]


async def test_filters_match_every_field(tmp_path: Path) -> None:
    async with open_sql_store(_config(tmp_path)) as store:
        async with writing(AuditLog(store, retention_days=None)) as log:
            log.record("route", "denied", user="irc/bob", person="irc/bob", room="irc/#ops", callback="ops",
                       route="deploy", permission="deploy", detail="missing permission")  # fmt: skip
            log.record("admin", "allowed", user="irc/alice", detail="grant bob deploy")
            log.record("check_permission", "allowed", user="matrix/@bob:x", person="irc/bob", callback="ops",
                       permission="deploy.prod")  # fmt: skip
            await log.flush()

        async def kinds(**filters: object) -> list[str]:
            return [r.kind for r in await query(store, AuditQuery(**filters))]  # type: ignore[arg-type]

        assert await kinds() == ["route", "admin", "check_permission"]
        assert await kinds(decision="denied") == ["route"]
        assert await kinds(user="irc/bob") == ["route", "check_permission"]  # the person, across accounts
        assert await kinds(callback="ops", permission="deploy.prod") == ["check_permission"]
        assert await kinds(room="irc/#ops") == ["route"]
        assert await kinds(text="grant bob") == ["admin"]
        assert await kinds(since=time.time() + 5) == []
        assert await kinds(until=time.time() - 3600) == []


async def test_records_queued_when_the_bot_stops_are_written(tmp_path: Path) -> None:
    async with open_sql_store(_config(tmp_path)) as store:
        async with writing(AuditLog(store, retention_days=None)) as log:
            # No flush: the writer's way out (the bot stopping) writes them.
            for i in range(500):
                log.record("route", "allowed", detail=str(i))
    async with open_sql_store(_config(tmp_path)) as store:
        assert len(await query(store, AuditQuery(), limit=1000)) == 500


async def test_retention_removes_old_batches_only(tmp_path: Path) -> None:
    async with open_sql_store(_config(tmp_path)) as store:
        old = AuditRecord(time=time.time() - 10 * 86400, kind="admin", decision="allowed", detail="old")
        await store.set(NAMESPACE, f"{int(old.time * 1e6):017d}-00000001", old.to_json())
        log = AuditLog(store, retention_days=7)
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)  # prunes once at start, then hourly
            log.record("admin", "allowed", detail="new")
            await log.flush()
            nursery.cancel_scope.cancel()
        assert [r.detail for r in await query(store, AuditQuery())] == ["new"]
        assert await prune(store, time.time() - 86400) == 0


async def test_a_batch_the_store_refuses_is_dropped_and_counted_and_later_records_are_written(
    tmp_path: Path,
) -> None:
    """A store whose max_value_bytes is below a burst's batch refuses it for good: the
    writer must not retry it forever and hold every later record back."""
    config = SqlStoreConfig(url=f"sqlite:///{tmp_path / 'oco.db'}", max_value_bytes=2000)
    async with open_sql_store(config) as store:
        async with writing(AuditLog(store, retention_days=None)) as log:
            for n in range(50):  # one burst: one batch, far over 2,000 bytes
                log.record("route", "allowed", user="shell/alice", detail=f"burst {n}")
            with trio.fail_after(10):
                await log.flush()
            assert log.lost == 50
            log.record("admin", "allowed", user="shell/alice", detail="after")
            with trio.fail_after(10):
                await log.flush()
        records = await query(store, AuditQuery())
    assert [r.detail for r in records] == ["after"]
