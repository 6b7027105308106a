"""The SQL store against the store contract, on SQLite and on the real PostgreSQL.

PostgreSQL's address comes from ``OCO_TEST_POSTGRES_URL`` (for example
``postgresql+psycopg://postgres@127.0.0.1:5432/test``); each test uses tables of its
own (a random table prefix) and drops them afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import trio

from oco_core import StoreUnavailableError
from oco_core._sql_store import (
    SCHEMA_VERSION,
    SqlStore,
    SqlStoreConfig,
    mask_url,
    migrate,
    oco_store_types,
    open_sql_store,
)
from oco_core.testing.pytest_plugin import server_unavailable
from oco_core.testing.store_contract import StoreContract, unavailable_message


class TestSqliteStore(StoreContract):
    """The contract on a SQLite file in WAL mode."""

    @pytest.fixture
    async def store(self, tmp_path: Path, max_value_bytes: int) -> AsyncIterator[SqlStore]:
        config = SqlStoreConfig(url=f"sqlite:///{tmp_path / 'oco.db'}", max_value_bytes=max_value_bytes)
        async with open_sql_store(config) as store:
            yield store


class TestSqliteMemoryStore(StoreContract):
    """The contract on an in-memory SQLite database (one shared connection)."""

    @pytest.fixture
    def max_value_bytes(self) -> int:
        return 4096

    @pytest.fixture
    async def store(self, max_value_bytes: int) -> AsyncIterator[SqlStore]:
        async with open_sql_store(SqlStoreConfig(url="sqlite://", max_value_bytes=max_value_bytes)) as store:
            yield store


class TestPostgresStore(StoreContract):
    """The contract on the real PostgreSQL, in tables of the test's own."""

    @pytest.fixture
    async def store(self, postgres_tables: tuple[str, str], max_value_bytes: int) -> AsyncIterator[SqlStore]:
        url, prefix = postgres_tables
        config = SqlStoreConfig(url=url, table_prefix=prefix, max_value_bytes=max_value_bytes)
        async with open_sql_store(config) as store:
            yield store


# ---- beyond the contract: what only the SQL store promises ----


def test_registers_as_the_sql_store_type() -> None:
    [store_type] = oco_store_types()
    assert store_type.name == "sql"
    assert store_type.config_model is SqlStoreConfig
    assert store_type.package == "oco-core"


def test_config_defaults_to_a_sqlite_file() -> None:
    config = SqlStoreConfig()
    assert config.url == "sqlite:///oco.db"
    assert config.max_value_bytes == 1024 * 1024


def test_config_refuses_unknown_keys_and_databases() -> None:
    with pytest.raises(ValueError, match="extra"):
        SqlStoreConfig.model_validate({"url": "sqlite://", "nope": 1})
    with pytest.raises(ValueError, match="unsupported database 'mysql'"):
        SqlStoreConfig(url="mysql://u@h/db")
    with pytest.raises(ValueError, match="psycopg"):
        SqlStoreConfig(url="postgresql+psycopg2://u@h/db")
    with pytest.raises(ValueError, match="not a database URL"):
        SqlStoreConfig(url="::::")
    with pytest.raises(ValueError, match="table_prefix"):
        SqlStoreConfig(table_prefix="x; DROP TABLE y")


def test_plain_postgresql_url_means_psycopg3() -> None:
    assert SqlStoreConfig(url="postgresql://u@h/db").sqlalchemy_url().drivername == "postgresql+psycopg"


def test_password_is_masked_in_repr() -> None:
    config = SqlStoreConfig(url="postgresql+psycopg://oco:s3cret@db.example/oco")
    assert "s3cret" not in repr(config)
    assert "oco:***@db.example" in repr(config)
    assert mask_url(config.url) == "postgresql+psycopg://oco:***@db.example/oco"


async def test_unreachable_database_names_the_url_with_password_masked() -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    config = SqlStoreConfig(url="postgresql+psycopg://oco:s3cret@127.0.0.1:1/oco", connect_timeout=2)
    message = await unavailable_message(open_sql_store(config))
    assert "postgresql+psycopg://oco:***@127.0.0.1:1/oco" in message
    assert "s3cret" not in message


async def test_unopenable_sqlite_file_is_unavailable(tmp_path: Path) -> None:
    config = SqlStoreConfig(url=f"sqlite:///{tmp_path / 'missing-dir' / 'oco.db'}")
    with pytest.raises(StoreUnavailableError, match="missing-dir"):
        async with open_sql_store(config):
            pass


async def test_sqlite_uses_wal_and_the_configured_synchronous(tmp_path: Path) -> None:
    config = SqlStoreConfig(url=f"sqlite:///{tmp_path / 'oco.db'}", sqlite_synchronous="NORMAL")
    async with open_sql_store(config) as store:
        await store.set("ns", "k", b"v")

        def pragmas() -> tuple[str, int]:
            with store._engine.connect() as conn:
                mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
                sync = conn.exec_driver_sql("PRAGMA synchronous").scalar()
                return str(mode), int(sync or 0)

        assert await trio.to_thread.run_sync(pragmas) == ("wal", 1)  # 1 is NORMAL


async def test_data_survives_reopening(tmp_path: Path) -> None:
    config = SqlStoreConfig(url=f"sqlite:///{tmp_path / 'oco.db'}")
    async with open_sql_store(config) as store:
        await store.set("ns", "k", b"v")
        await store.set("ns", "k", b"w")
    async with open_sql_store(config) as store:
        item = await store.get("ns", "k")
        assert item is not None
        assert (item.value, item.version) == (b"w", 2)


# ---- migrations ----


def _create_at_version(url: str, prefix: str, version: int) -> None:
    engine = sa.create_engine(SqlStoreConfig(url=url).sqlalchemy_url())
    try:
        with engine.begin() as conn:
            migrate(conn, prefix, target=version)
            conn.execute(
                sa.text(f"INSERT INTO {prefix}kv (namespace, key, value, version) VALUES (:n, :k, :v, 3)"),
                {"n": "cb:old", "k": b"kept", "v": b"from v1"},
            )
    finally:
        engine.dispose()


async def _check_upgrade(url: str, prefix: str) -> None:
    _create_at_version(url, prefix, 1)
    config = SqlStoreConfig(url=url, table_prefix=prefix)
    async with open_sql_store(config) as store:
        item = await store.get("cb:old", "kept")
        assert item is not None
        assert (item.value, item.version) == (b"from v1", 3)
        assert await store.set("cb:old", "kept", b"now", expected_version=3) == 4

        def schema_state() -> tuple[int, set[str]]:
            with store._engine.connect() as conn:
                version = conn.execute(sa.text(f"SELECT version FROM {prefix}schema_version")).scalar_one()
                columns = {c["name"] for c in sa.inspect(conn).get_columns(f"{prefix}kv")}
                return int(version), columns

        version, columns = await trio.to_thread.run_sync(schema_state)
        assert version == SCHEMA_VERSION
        assert "updated_ms" in columns
    # A second start finds nothing to do and keeps the data.
    async with open_sql_store(config) as store:
        item = await store.get("cb:old", "kept")
        assert item is not None
        assert item.version == 4


async def test_sqlite_upgrades_a_database_of_the_first_schema(tmp_path: Path) -> None:
    await _check_upgrade(f"sqlite:///{tmp_path / 'old.db'}", "oco_")


async def test_postgres_upgrades_a_database_of_the_first_schema(postgres_tables: tuple[str, str]) -> None:
    await _check_upgrade(*postgres_tables)


async def test_refuses_a_schema_newer_than_the_code(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    async with open_sql_store(SqlStoreConfig(url=url)):
        pass
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE oco_schema_version SET version = 999"))
    engine.dispose()
    with pytest.raises(Exception, match="version 999, newer than this oco-core"):
        async with open_sql_store(SqlStoreConfig(url=url)):
            pass


async def test_concurrent_starts_migrate_once(postgres_tables: tuple[str, str]) -> None:
    url, prefix = postgres_tables
    config = SqlStoreConfig(url=url, table_prefix=prefix)

    async def start() -> None:
        async with open_sql_store(config) as store:
            await store.set("ns", "k", b"v")

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(start)
    except* StoreUnavailableError as group:
        server_unavailable("PostgreSQL", str(group.exceptions[0]))
    async with open_sql_store(config) as store:
        item = await store.get("ns", "k")
        assert item is not None
        assert item.version == 5
