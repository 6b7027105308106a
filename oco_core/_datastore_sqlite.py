"""The built-in ``sqlite`` data store: a database file of each callback's own.

For callbacks that run on the bot's machine (SQLite is a file, not a server): each gets
``<directory>/<corner name>.db``, created empty on first use. SQLite has no accounts, so
there is no password and no isolation beyond the file system: a program running as the
same user can open any file. Use it for callbacks the bot launches itself; give
callbacks on other machines, or ones you do not trust, PostgreSQL or Redis.

Revoking moves the file into ``<directory>/revoked/`` (the data is kept, and the callback
is no longer handed it; the next hand-out starts a new, empty file); with ``drop_data``
the file is deleted.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from pydantic import BaseModel, ConfigDict, Field

from ._config import default_data_dir
from ._datastore import DataStoreAccess, DataStoreProvider, DataStoreType, corner_name
from ._errors import StoreError
from ._hookspecs import hookimpl

_SUFFIXES = ("", "-wal", "-shm", "-journal")


def _default_directory() -> Path:
    return default_data_dir() / "datastores" / "sqlite"


class SqliteDataStoreConfig(BaseModel):
    """Options of the ``sqlite`` data store."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    directory: Path = Field(
        default_factory=_default_directory,
        description="Folder of the callbacks' database files (default: $XDG_DATA_HOME/oco/datastores/sqlite).",
    )


class SqliteDataStore(DataStoreProvider):
    """Database files under one folder, one per callback."""

    def __init__(self, config: SqliteDataStoreConfig) -> None:
        self.directory = config.directory.expanduser().absolute()

    def path(self, callback_id: str) -> Path:
        """The callback's database file."""
        return self.directory / f"{corner_name(callback_id)}.db"

    async def provision(self, callback_id: str, password: str, *, rotated: bool = False) -> DataStoreAccess:
        path = self.path(callback_id)

        def create() -> None:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not path.exists():
                sqlite3.connect(path).close()  # an empty database, so the path is a database
                os.chmod(path, 0o600)

        try:
            await trio.to_thread.run_sync(create)
        except OSError as exc:
            raise StoreError(f"cannot create the SQLite data store file {path}: {exc.strerror}") from None
        return DataStoreAccess(url=f"sqlite:///{path}", namespace="", details={"path": str(path)})

    async def revoke(self, callback_id: str, *, drop_data: bool = False) -> None:
        path = self.path(callback_id)
        aside = self.directory / "revoked"
        # Unique, so a second revocation never overwrites the first one's copy.
        stamp = f"{time.strftime('%Y%m%dT%H%M%S')}.{uuid.uuid4().hex[:8]}"

        def remove() -> None:
            for suffix in _SUFFIXES:
                found = Path(f"{path}{suffix}")
                if not found.exists():
                    continue
                if drop_data:
                    found.unlink()
                else:
                    aside.mkdir(exist_ok=True, mode=0o700)
                    found.rename(aside / f"{path.stem}.{stamp}.db{suffix}")

        try:
            await trio.to_thread.run_sync(remove)
        except OSError as exc:
            raise StoreError(f"cannot revoke the SQLite data store file {path}: {exc.strerror}") from None

    def describe(self) -> str:
        return f"SQLite files in {self.directory}"


@asynccontextmanager
async def open_sqlite_datastore(config: SqliteDataStoreConfig) -> AsyncIterator[DataStoreProvider]:
    """The ``sqlite`` data store (nothing to connect to or close)."""
    yield SqliteDataStore(config)


@hookimpl
def oco_datastore_types() -> list[DataStoreType]:
    """The ``sqlite`` data store."""
    return [
        DataStoreType(
            name="sqlite",
            open=open_sqlite_datastore,
            config_model=SqliteDataStoreConfig,
            description="a SQLite file of each callback's own, for callbacks on the bot's machine",
        )
    ]
