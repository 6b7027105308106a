"""The audit query that the console's audit page and ``oco audit`` share reads the log
newest first, a window of keys at a time: it must return exactly what reading the whole
log in key order returns (the newest ``limit`` matches, oldest first), whatever the
log's shape (gaps of a year, bursts, records stamped in the future by a skewed clock,
batches) and filters, on each kind of store."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from oco_core._audit import _BATCH_SPAN, NAMESPACE, AuditQuery, AuditRecord, _key, query
from oco_core._sql_store import SqlStoreConfig, open_sql_store
from oco_core._store import Store
from oco_core.testing import MemoryStore


@asynccontextmanager
async def a_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if kind == "memory":
        yield MemoryStore()
    elif kind == "sqlite":
        async with open_sql_store(SqlStoreConfig(url=f"sqlite:///{tmp_path / 'oco.db'}")) as store:
            yield store
    else:
        url, prefix = request.getfixturevalue("postgres_tables")
        async with open_sql_store(SqlStoreConfig(url=url, table_prefix=prefix)) as store:
            yield store


async def everything_in_key_order(store: Store, filters: AuditQuery, limit: int) -> list[AuditRecord]:
    """What the query must return: every entry read, in key order, the newest matches kept."""
    start = _key(filters.since - _BATCH_SPAN, 0) if filters.since > _BATCH_SPAN else ""
    records: list[AuditRecord] = []
    for item in await store.list(NAMESPACE, start_after=start, limit=100_000):
        records += [AuditRecord.from_json(line) for line in item.value.split(b"\n")]
    matching = [entry for entry in records if filters.matches(entry)]
    return matching[-limit:] if limit else []


async def seed(store: Store, now: float) -> None:
    """About 600 records in about 300 entries: a year back, a day back, the last
    minutes in a burst, and a few seconds ahead."""
    rng = random.Random(16)
    starts = (
        [now - 400 * 86400 + rng.uniform(0, 3600) for _ in range(40)]
        + [now - 86400 + rng.uniform(0, 7200) for _ in range(60)]
        + [now - rng.uniform(0, 300) for _ in range(180)]
        + [now + rng.uniform(0, 5) for _ in range(10)]
    )
    for index, start in enumerate(starts):
        lines = [
            AuditRecord(
                time=start + n * 0.05,
                kind="route",
                decision=rng.choice(("allowed", "denied")),
                user=rng.choice(("irc/ann", "irc/bob", "irc/cy")),
                detail=f"entry {index} record {n}",
            ).to_json()
            for n in range(rng.randint(1, 3))
        ]
        await store.set(NAMESPACE, _key(start, rng.randrange(100_000_000)), b"\n".join(lines))


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgresql"])
async def test_the_query_returns_what_reading_the_whole_log_returns(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with a_store(kind, tmp_path, request) as store:
        assert await query(store, AuditQuery(), 50) == []
        now = time.time()
        await seed(store, now)
        filters = [
            AuditQuery(),
            AuditQuery(decision="denied"),
            AuditQuery(user="irc/cy", decision="allowed"),
            AuditQuery(since=now - 120),
            AuditQuery(since=now - 2 * 86400, until=now - 3600),
            AuditQuery(until=now - 30 * 86400),
            AuditQuery(since=now - 400 * 86400 + 1800, until=now - 400 * 86400 + 2400),
            AuditQuery(since=now + 60),
            AuditQuery(user="nobody"),
        ]
        for wanted in filters:
            for limit in (0, 1, 7, 50, 101, 1000):
                expected = await everything_in_key_order(store, wanted, limit)
                assert await query(store, wanted, limit) == expected, (wanted, limit)
        # The newest records include those a skewed clock stamped ahead of now.
        newest = await query(store, AuditQuery(), 3)
        assert newest[-1].time > now
