"""Core store benchmark: get and set operations per second on SQLite, PostgreSQL and Redis.

    python bench/bench_store.py [--quick] [--rpc]

Two levels:

- the store interface (``Store.get`` / ``Store.set`` called from trio in this process);
- with ``--rpc``, the Storage RPC: a real ``oco run`` process on each store, and Python
  SDK callbacks (``oco_core.Callback``) in this process calling ``storage.get`` and
  ``storage.set`` over gRPC on loopback.

Each is measured with one caller (each call waits for the last) and with 50 concurrent
callers (50 trio tasks on the interface; 50 callbacks, each its own id and connection,
over the RPC). One row puts SQLite behind QuotaStore, to show what quotas cost.
Values are 100 bytes; gets read keys that exist; sets write fresh
versions of existing keys, each caller its own keys. PostgreSQL and Redis come from
``OCO_TEST_POSTGRES_URL`` and ``OCO_TEST_REDIS_URL`` (a row is skipped when unset); the
benchmark writes under a table or key prefix of its own and removes it afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import sqlalchemy as sa
import trio

from oco_core._quota import QuotaConfig, QuotaStore
from oco_core._sql_store import SqlStoreConfig, open_sql_store
from oco_core._store import Store

VALUE = b"v" * 100
CALLERS = 50


# ---- the stores under test ----


@contextlib.asynccontextmanager
async def sqlite_store(tmp: Path, synchronous: str) -> AsyncIterator[Store]:
    config = SqlStoreConfig(url=f"sqlite:///{tmp / f'bench-{synchronous}.db'}", sqlite_synchronous=synchronous)  # type: ignore[arg-type]
    async with open_sql_store(config) as store:
        yield store


@contextlib.asynccontextmanager
async def with_quotas(opened: contextlib.AbstractAsyncContextManager[Store]) -> AsyncIterator[Store]:
    """The store behind QuotaStore, every callback namespace under the default quota
    (each write then also reads the old value, and writes of one namespace queue)."""
    async with opened as store:
        yield QuotaStore.for_callbacks(store, QuotaConfig())


@contextlib.asynccontextmanager
async def postgres_store(url: str) -> AsyncIterator[Store]:
    prefix = f"bench{uuid.uuid4().hex[:8]}_"
    config = SqlStoreConfig(url=url, table_prefix=prefix, pool_size=10, max_overflow=10)
    try:
        async with open_sql_store(config) as store:
            yield store
    finally:
        drop_pg_tables(url, prefix)


def drop_pg_tables(url: str, prefix: str) -> None:
    engine = sa.create_engine(SqlStoreConfig(url=url).sqlalchemy_url())
    with engine.begin() as conn:
        for name in sa.inspect(conn).get_table_names():
            if name.startswith(prefix):
                conn.execute(sa.text(f'DROP TABLE "{name}"'))
    engine.dispose()


@contextlib.asynccontextmanager
async def redis_store(url: str) -> AsyncIterator[Store]:
    from oco_store_redis import RedisStoreConfig, open_redis_store

    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    try:
        async with open_redis_store(RedisStoreConfig(url=url, prefix=prefix, max_connections=20)) as store:
            yield store
    finally:
        delete_redis_prefix(url, prefix)


def delete_redis_prefix(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


# ---- measuring ----


async def rate(callers: int, per_caller: int, op: Callable[[int, int], Awaitable[object]]) -> float:
    """Operations per second of ``op(caller, n)`` run by ``callers`` concurrent tasks."""

    async def caller(c: int) -> None:
        for n in range(per_caller):
            await op(c, n)

    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for c in range(callers):
            nursery.start_soon(caller, c)
    return callers * per_caller / (time.perf_counter() - began)


async def measure(
    get: Callable[[int, str], Awaitable[object]],
    set_: Callable[[int, str, bytes], Awaitable[object]],
    ops: int,
) -> list[float]:
    """[get 1, get 50, set 1, set 50] in operations per second."""
    keys = 20
    for c in range(CALLERS):
        for k in range(keys):
            await set_(c, f"key{c}/{k}", VALUE)
    results = []
    for callers in (1, CALLERS):
        per = max(ops // callers, 20)
        await rate(callers, 20, lambda c, n: get(c, f"key{c}/{n % keys}"))  # warm up
        results.append(await rate(callers, per, lambda c, n: get(c, f"key{c}/{n % keys}")))
    for callers in (1, CALLERS):
        per = max(ops // callers, 20)
        results.append(await rate(callers, per, lambda c, n: set_(c, f"key{c}/{n % keys}", VALUE)))
    return results


def row(name: str, numbers: list[float] | str) -> None:
    if isinstance(numbers, str):
        print(f"| {name:<34} | {numbers} |")
        return
    print(f"| {name:<34} | " + " | ".join(f"{n:>9,.0f}" for n in numbers) + " |")


def header(title: str) -> None:
    print(f"\n{title}\n")
    print(f"| {'store':<34} | {'get 1':>9} | {'get 50':>9} | {'set 1':>9} | {'set 50':>9} |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 11}|")


def cases(tmp: Path) -> list[tuple[str, Callable[[], contextlib.AbstractAsyncContextManager[Store]] | None, str]]:
    """(name, opener or None when unavailable, why unavailable)."""
    pg = os.environ.get("OCO_TEST_POSTGRES_URL", "")
    rd = os.environ.get("OCO_TEST_REDIS_URL", "")
    try:
        import oco_store_redis  # noqa: F401

        redis_missing = ""
    except ImportError:
        redis_missing = "oco-store-redis is not installed"
    return [
        ("SQLite (WAL, synchronous=FULL)", lambda: sqlite_store(tmp, "FULL"), ""),
        ("SQLite (WAL, synchronous=NORMAL)", lambda: sqlite_store(tmp, "NORMAL"), ""),
        ("SQLite (FULL) behind QuotaStore", lambda: with_quotas(sqlite_store(tmp, "FULL")), ""),
        ("PostgreSQL", (lambda: postgres_store(pg)) if pg else None, "OCO_TEST_POSTGRES_URL unset"),
        (
            "Redis",
            (lambda: redis_store(rd)) if rd and not redis_missing else None,
            redis_missing or "OCO_TEST_REDIS_URL unset",
        ),
    ]


async def interface_level(tmp: Path, ops: int) -> None:
    header("Store interface (ops/s; 1 caller, 50 concurrent trio tasks)")
    for name, opener, why in cases(tmp):
        if opener is None:
            row(name, f"skipped: {why}")
            continue
        async with opener() as store:
            numbers = await measure(
                lambda c, key: store.get(f"cb:bench{c}", key),
                lambda c, key, value: store.set(f"cb:bench{c}", key, value),
                ops,
            )
        row(name, numbers)


# ---- through the Storage RPC ----


def bot_config(tmp: Path, store_yaml: str, address_file: Path) -> str:
    callbacks = "\n".join(f"  - {{id: bench{i}, secret: bench-secret-{i}-0123456789}}" for i in range(CALLERS))
    return f"""
adapters: [{{type: memory}}]
store: {store_yaml}
grpc: {{listen: "127.0.0.1:0", address_file: "{address_file}"}}
log_level: WARNING
callbacks:
{callbacks}
"""


@contextlib.asynccontextmanager
async def running_bot(tmp: Path, store_yaml: str) -> AsyncIterator[str]:
    address_file = tmp / f"address-{uuid.uuid4().hex[:6]}"
    config = tmp / "bench-bot.yaml"
    config.write_text(bot_config(tmp, store_yaml, address_file))
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "oco_core", "run", "--config", str(config)], stdin=subprocess.PIPE
    )
    try:
        with trio.fail_after(60):
            while not address_file.exists():
                if process.poll() is not None:
                    raise RuntimeError(f"oco run exited with {process.returncode}")
                await trio.sleep(0.05)
        yield address_file.read_text().strip()
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        process.kill()


async def measure_rpc(address: str, ops: int) -> list[float]:
    """Connect 50 SDK callbacks to the bot at ``address`` and measure their storage calls."""
    from oco_core import Callback

    callbacks = [
        Callback(id=f"bench{i}", secret=f"bench-secret-{i}-0123456789", address=address) for i in range(CALLERS)
    ]
    async with trio.open_nursery() as nursery:
        for callback in callbacks:
            await nursery.start(callback.serve)
        numbers = await measure(
            lambda c, key: callbacks[c].storage.get_item(key),
            lambda c, key, value: callbacks[c].storage.set(key, value),
            ops,
        )
        nursery.cancel_scope.cancel()
    return numbers


async def rpc_level(tmp: Path, ops: int) -> None:
    header("Storage RPC through a real `oco run` (ops/s; 1 callback, 50 callbacks each with its own connection)")
    pg = os.environ.get("OCO_TEST_POSTGRES_URL", "")
    rd = os.environ.get("OCO_TEST_REDIS_URL", "")
    stores: list[tuple[str, str | None, Callable[[], None]]] = []
    stores.append(("SQLite (WAL, synchronous=FULL)", f'{{url: "sqlite:///{tmp}/rpc-full.db"}}', lambda: None))
    stores.append(
        (
            "SQLite (WAL, synchronous=NORMAL)",
            f'{{url: "sqlite:///{tmp}/rpc-normal.db", sqlite_synchronous: NORMAL}}',
            lambda: None,
        )
    )
    pg_prefix = f"bench{uuid.uuid4().hex[:8]}_"
    stores.append(
        (
            "PostgreSQL",
            f'{{url: "{pg}", table_prefix: {pg_prefix}, pool_size: 10, max_overflow: 10}}' if pg else None,
            lambda: drop_pg_tables(pg, pg_prefix),
        )
    )
    rd_prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    stores.append(
        (
            "Redis",
            f'{{type: redis, url: "{rd}", prefix: "{rd_prefix}", max_connections: 20}}' if rd else None,
            lambda: delete_redis_prefix(rd, rd_prefix),
        )
    )
    for name, store_yaml, cleanup in stores:
        if store_yaml is None:
            row(name, "skipped: server URL unset")
            continue
        try:
            async with running_bot(tmp, store_yaml) as address:
                row(name, await measure_rpc(address, ops))
        finally:
            cleanup()


async def main(quick: bool, rpc: bool) -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    ops = 1000 if quick else 5000
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        await interface_level(tmp, ops)
        if rpc:
            await rpc_level(tmp, ops)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations, for a smoke run")
    parser.add_argument("--rpc", action="store_true", help="also measure through the Storage RPC of `oco run`")
    options = parser.parse_args()
    trio.run(main, options.quick, options.rpc)
