"""The SQL store behind a real bot, through the Storage RPC: durability across SIGKILL,
50 callbacks on one counter, and a database outage (StorageServiceContract).

SQLite runs in WAL mode with its default synchronous=FULL; PostgreSQL comes from
``OCO_TEST_POSTGRES_URL`` and uses tables of the test's own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from oco_core._sql_store import SqlStoreConfig
from oco_core.testing.pytest_plugin import server_unavailable
from oco_core.testing.store_contract import ServerOutageContract, StorageServiceContract

POSTGRES_ENV = "OCO_TEST_POSTGRES_URL"


class TestSqliteService(StorageServiceContract):
    """SQLite (WAL, synchronous=FULL) behind a real bot."""

    @pytest.fixture
    def store_section(self, tmp_path: Path) -> str:
        return f'{{url: "sqlite:///{tmp_path / "oco.db"}"}}'


class TestSqliteNormalSyncService(StorageServiceContract):
    """SQLite with synchronous=NORMAL: still every acknowledged write survives the bot
    being killed (only power loss may lose the last transactions)."""

    test_fifty_callbacks_increment_one_counter_exactly = None  # type: ignore[assignment]

    @pytest.fixture
    def store_section(self, tmp_path: Path) -> str:
        return f'{{url: "sqlite:///{tmp_path / "oco.db"}", sqlite_synchronous: NORMAL}}'


def _postgres_url() -> str:
    url = os.environ.get(POSTGRES_ENV, "")
    if not url:
        server_unavailable("PostgreSQL", f"set {POSTGRES_ENV}, e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test")
    engine = sa.create_engine(SqlStoreConfig(url=url).sqlalchemy_url(), connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as e:
        server_unavailable("PostgreSQL", " ".join(str(e.orig).split()))
    finally:
        engine.dispose()
    return url


class TestPostgresService(StorageServiceContract, ServerOutageContract):
    """PostgreSQL behind a real bot, in tables of the test's own."""

    @pytest.fixture
    def pg(self) -> Iterator[tuple[str, str]]:
        url = _postgres_url()
        prefix = f"t{uuid.uuid4().hex[:12]}_"
        yield url, prefix
        engine = sa.create_engine(SqlStoreConfig(url=url).sqlalchemy_url())
        with engine.begin() as conn:
            for name in sa.inspect(conn).get_table_names():
                if name.startswith(prefix):
                    conn.execute(sa.text(f'DROP TABLE "{name}"'))
        engine.dispose()

    @pytest.fixture
    def store_section(self, pg: tuple[str, str]) -> str:
        url, prefix = pg
        return f'{{url: "{url}", table_prefix: {prefix}}}'

    @pytest.fixture
    def store_server(self, pg: tuple[str, str]) -> tuple[str, int, Callable[[str, int], str]]:
        url, prefix = pg
        parsed = make_url(url)

        def section_at(host: str, port: int) -> str:
            moved = parsed.set(host=host, port=port).render_as_string(hide_password=False)
            return f'{{url: "{moved}", table_prefix: {prefix}}}'

        return parsed.host or "127.0.0.1", parsed.port or 5432, section_at
