"""The SQL store behind a real bot, through the Storage RPC: durability across SIGKILL,
50 callbacks on one counter, and a database outage (StorageServiceContract).

SQLite runs in WAL mode with its default synchronous=FULL; PostgreSQL comes from
``OCO_TEST_POSTGRES_URL`` and uses tables of the test's own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from oco_core.testing.store_contract import ServerOutageContract, StorageServiceContract


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


class TestPostgresService(StorageServiceContract, ServerOutageContract):
    """PostgreSQL behind a real bot, in tables of the test's own."""

    hang_options = "statement_timeout: 1, connect_timeout: 1"
    hang_within = 4.0  # the statement timeout, then a second for the server's own cancel

    @pytest.fixture
    def store_section(self, postgres_tables: tuple[str, str]) -> str:
        url, prefix = postgres_tables
        return f'{{url: "{url}", table_prefix: {prefix}}}'

    @pytest.fixture
    def store_server(self, postgres_tables: tuple[str, str]) -> tuple[str, int, Callable[[str, int], str]]:
        url, prefix = postgres_tables
        parsed = make_url(url)

        def section_at(host: str, port: int) -> str:
            moved = parsed.set(host=host, port=port).render_as_string(hide_password=False)
            return f'{{url: "{moved}", table_prefix: {prefix}}}'

        return parsed.host or "127.0.0.1", parsed.port or 5432, section_at
