"""Audit query benchmark: the console's audit page and ``oco audit`` on a large log.

    python bench/bench_audit_query.py [--records 200000] [--per-entry 5] [--rounds 5]

Writes ``--records`` audit records to a SQLite store (``--per-entry`` records a store
entry, as the bot's writer batches them; one every few seconds, so the log spans days),
then times :func:`oco_core._audit.query` (reads newest first, a window at a time)
against the full scan it replaced (every entry from ``since``, keeping the newest), the
two alternated, ``--rounds`` times each, for what the console and the command ask:

- page 1 and page 20 of the audit page (51 and 1,001 records, no filter);
- ``oco audit`` (50 records), and with ``--since 1h``;
- a filter one record in 1,000 passes (a user), page 1.

Prints the median and the spread (min-max) of each, in ms, the entries each read, and
the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from oco_core._audit import _BATCH_SPAN, _PAGE, NAMESPACE, AuditQuery, AuditRecord, _key, query
from oco_core._sql_store import SqlStoreConfig, open_sql_store
from oco_core._store import Store


async def full_scan(store: Store, filters: AuditQuery, limit: int = 100) -> list[AuditRecord]:
    """The query before: every entry from ``since`` on, keeping the newest ``limit``."""
    start = _key(filters.since - _BATCH_SPAN, 0) if filters.since > _BATCH_SPAN else ""
    found: list[AuditRecord] = []
    while True:
        page = await store.list(NAMESPACE, start_after=start, limit=_PAGE)
        for item in page:
            for line in item.value.split(b"\n"):
                entry = AuditRecord.from_json(line)
                if filters.matches(entry):
                    found.append(entry)
                    if len(found) > limit:
                        del found[0]
            await trio.lowlevel.checkpoint()
        if len(page) < _PAGE:
            return found
        start = page[-1].key


class Counting(Store):
    """A store that counts the audit entries it returns."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.read = 0

    async def get(self, namespace: str, key: str):  # type: ignore[no-untyped-def]
        return await self.inner.get(namespace, key)

    async def set(self, namespace: str, key: str, value: bytes, *, expected_version: int | None = None) -> int:
        return await self.inner.set(namespace, key, value, expected_version=expected_version)

    async def delete(self, namespace: str, key: str, *, expected_version: int | None = None) -> bool:
        return await self.inner.delete(namespace, key, expected_version=expected_version)

    async def list(  # type: ignore[no-untyped-def]
        self, namespace: str, prefix: str = "", *, start_after: str = "", limit: int = 100, keys_only: bool = False
    ):
        items = await self.inner.list(namespace, prefix, start_after=start_after, limit=limit, keys_only=keys_only)
        self.read += len(items) if not keys_only else 0
        return items

    async def usage(self, namespace: str) -> tuple[int, int] | None:
        return await self.inner.usage(namespace)


async def seed(store: Store, records: int, per_entry: int) -> None:
    now = time.time()
    entries = records // per_entry
    step = 3.0 * per_entry  # a record every 3 s
    for index in range(entries):
        when = now - (entries - index) * step
        lines = [
            AuditRecord(
                time=when + n * 0.01,
                kind="route",
                decision=("allowed", "denied")[(index + n) % 2],
                user=f"irc/user{(index * per_entry + n) % 1000}",
                callback="deploy",
                route="status",
                detail=f"record {index * per_entry + n}",
            ).to_json()
            for n in range(per_entry)
        ]
        await store.set(NAMESPACE, _key(when, index % 100_000_000), b"\n".join(lines))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--per-entry", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    cases: list[tuple[str, AuditQuery, int]] = [
        ("page 1", AuditQuery(), 51),
        ("page 20", AuditQuery(), 1001),
        ("oco audit", AuditQuery(), 50),
        ("oco audit --since 1h", AuditQuery(since=time.time() - 3600), 50),
        ("page 1, user=irc/user7", AuditQuery(user="irc/user7"), 51),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        config = SqlStoreConfig(url=f"sqlite:///{Path(tmp) / 'audit.db'}", sqlite_synchronous="NORMAL")
        async with open_sql_store(config) as inner:
            started = time.perf_counter()
            await seed(inner, options.records, options.per_entry)
            print(
                f"{options.records} records in {options.records // options.per_entry} entries, "
                f"written in {time.perf_counter() - started:.1f} s; load {os.getloadavg()}"
            )
            store = Counting(inner)
            contenders: list[tuple[str, Callable[[Store, AuditQuery, int], Awaitable[list[AuditRecord]]]]] = [
                ("full scan", full_scan),
                ("newest first", query),
            ]
            for label, filters, limit in cases:
                times: dict[str, list[float]] = {name: [] for name, _ in contenders}
                reads: dict[str, int] = {}
                results: dict[str, list[AuditRecord]] = {}
                for _ in range(options.rounds):
                    for name, run in contenders:  # alternated, round by round
                        store.read = 0
                        started = time.perf_counter()
                        results[name] = await run(store, filters, limit)
                        times[name].append((time.perf_counter() - started) * 1000)
                        reads[name] = store.read
                assert results["full scan"] == results["newest first"], label
                for name, _ in contenders:
                    got = times[name]
                    print(
                        f"{label:26} {name:13} median {statistics.median(got):8.1f} ms "
                        f"(min {min(got):.1f}, max {max(got):.1f})  entries read {reads[name]}"
                    )
            print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    trio.run(main)
