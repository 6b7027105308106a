"""The built-in SQL store: the core store on SQLite (default) or PostgreSQL, via SQLAlchemy 2.

SQLAlchemy's async layer is asyncio-only, so this module uses the synchronous engine and
runs every database call in a worker thread (``trio.to_thread.run_sync``) behind a
:class:`trio.CapacityLimiter` sized to the connection pool: no thread ever waits for a
connection while holding a token another call could use. This is the one seam where the
storage code touches threads. On PostgreSQL each call is watched from the trio side: one
whose server has not answered within ``statement_timeout`` plus a second has its
connection shut down (see :class:`_Watch`) and fails as unavailable.

One table holds every namespace::

    {prefix}kv (namespace TEXT, key BLOB/BYTEA, value BLOB/BYTEA, version BIGINT,
                PRIMARY KEY (namespace, key))

Keys are stored as their UTF-8 bytes, so both databases order them by bytes (what
:meth:`Store.list` promises) whatever the database's collation, and a prefix search is a
plain index range scan with no ``LIKE`` wildcards to escape. A second table,
``{prefix}schema_version``, records which migrations have run; :data:`MIGRATIONS` creates
the schema on first start and upgrades it on later ones, inside one transaction that
holds a lock so that two bots starting at once cannot both migrate.

Every write is a single statement, atomic on both databases without explicit locking:
an upsert (``INSERT ... ON CONFLICT DO UPDATE``) for unconditional writes, ``INSERT ...
ON CONFLICT DO NOTHING`` for "must not exist" (expected version 0), and ``UPDATE/DELETE
... WHERE version = :expected`` for compare-and-set, each with ``RETURNING``.

SQLite runs in WAL mode (readers never block the writer) with a busy timeout (writers
wait for each other instead of failing). Its ``synchronous`` setting decides what a
committed write survives: ``FULL`` (the default here) survives power loss and operating
system crashes; ``NORMAL`` survives the bot process being killed but may lose the last
transactions on power loss, in exchange for fewer fsyncs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import outcome
import sqlalchemy as sa
import trio
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from ._config import default_data_dir
from ._errors import ConfigError, StoreError, StoreUnavailableError, VersionConflictError
from ._hookspecs import hookimpl
from ._store import Item, Store, StoreType, check_value
from ._store import encode_key as _encode_key
from ._store import prefix_end as _prefix_end

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Default largest value, in bytes.
DEFAULT_MAX_VALUE_BYTES = 1024 * 1024

_PREFIX_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")


class SqlStoreConfig(BaseModel):
    """Options of the ``sql`` store (the ``store:`` section of the bot's config).

    ``url`` is a SQLAlchemy URL: ``sqlite:///oco.db`` (a file beside the working
    directory; ``sqlite:////abs/path.db`` for an absolute path; ``sqlite://`` for a
    throw-away in-memory database) or ``postgresql+psycopg://user:password@host/db``
    (needs ``pip install 'oco-core[postgresql]'``). Its password never appears in
    ``repr`` or in error messages.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = "sqlite:///oco.db"
    #: Largest value accepted, in bytes; larger writes raise ValueTooLargeError.
    max_value_bytes: int = Field(default=DEFAULT_MAX_VALUE_BYTES, ge=1, le=256 * 1024 * 1024)
    #: Connections kept open in the pool (also the number of worker threads in use).
    pool_size: int = Field(default=5, ge=1, le=1000)
    #: Extra connections opened under load beyond ``pool_size``, closed when idle.
    max_overflow: int = Field(default=5, ge=0, le=1000)
    #: Seconds a call waits for a free connection before failing as unavailable.
    pool_timeout: float = Field(default=30.0, gt=0)
    #: Connections older than this many seconds are replaced (guards against servers
    #: and middleboxes that drop idle connections); -1 never recycles.
    pool_recycle: int = Field(default=3600, ge=-1)
    #: PostgreSQL: test each connection with a round trip before use. Off by default:
    #: it costs a round trip per call, and without it a database restart costs at most
    #: the writes in flight (reads are retried once; the pool is then renewed).
    pool_pre_ping: bool = False
    #: Seconds to wait when connecting to a server database before giving up.
    connect_timeout: int = Field(default=5, ge=1)
    #: PostgreSQL: seconds one call may take on its connection. The server cancels a
    #: statement that runs longer; a server that has not answered
    #: ``statement_timeout + 1`` seconds after a call began (hung, or behind a network
    #: that drops packets, where TCP keepalives still pass) has its connection closed
    #: and the call fails as unavailable.
    statement_timeout: float = Field(default=5.0, gt=0, le=3600)
    #: PostgreSQL: seconds after which a server that stopped answering (TCP keepalives
    #: unanswered, sent data unacknowledged) fails the call as unavailable.
    dead_server_timeout: int = Field(default=20, ge=2)
    #: Table names start with this, so several bots (or tests) can share a database.
    table_prefix: str = "oco_"
    #: SQLite only: milliseconds a writer waits for another writer before failing.
    sqlite_busy_timeout_ms: int = Field(default=10_000, ge=0)
    #: SQLite only: ``FULL`` survives power loss; ``NORMAL`` survives a killed process.
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except exc.ArgumentError as e:
            raise ValueError(f"not a database URL ({e}); expected sqlite:///FILE or postgresql+psycopg://...") from e
        backend, _, driver = url.drivername.partition("+")
        if backend == "sqlite":
            if driver not in ("", "pysqlite"):
                raise ValueError(f"unsupported SQLite driver {driver!r}; use sqlite:///FILE")
        elif backend in ("postgresql", "postgres"):
            if driver not in ("", "psycopg"):
                raise ValueError(f"unsupported PostgreSQL driver {driver!r}; use postgresql+psycopg://...")
            if importlib.util.find_spec("psycopg") is None:
                raise ValueError("PostgreSQL needs psycopg 3: pip install 'oco-core[postgresql]'")
        else:
            raise ValueError(
                f"unsupported database {backend!r}: the sql store supports sqlite:///FILE and postgresql+psycopg://..."
            )
        return value

    @field_validator("table_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not _PREFIX_RE.match(value):
            raise ValueError("must be letters, digits and underscores, not starting with a digit (at most 41)")
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # The URL may carry a password: repr (and so logs of the config) shows it masked.
        for name, value in super().__repr_args__():
            yield (name, mask_url(value) if name == "url" else value)

    def sqlalchemy_url(self) -> URL:
        """The URL with the driver spelled out (``postgresql://`` means psycopg 3 here)."""
        url = make_url(self.url)
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        return url


def default_url() -> str:
    """The SQLite file the bot uses when its config names no ``url``:
    ``$XDG_DATA_HOME/oco/oco.db`` (``~/.local/share/oco/oco.db``)."""
    return f"sqlite:///{default_data_dir() / 'oco.db'}"


def mask_url(url: str | URL) -> str:
    """Return ``url`` as a string with its password replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except exc.ArgumentError:
        return "<unparseable database URL>"


# ---- schema and migrations ----


@dataclass(frozen=True, slots=True)
class _Tables:
    kv: sa.Table
    schema_version: sa.Table


def _tables(prefix: str) -> _Tables:
    metadata = sa.MetaData()
    kv = sa.Table(
        f"{prefix}kv",
        metadata,
        sa.Column("namespace", sa.Text, primary_key=True),
        # UTF-8 bytes of the key: byte order on every database, whatever its collation.
        sa.Column("key", sa.LargeBinary, primary_key=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        # Milliseconds since the epoch of the last write: for operators (added by
        # migration 2), not part of the store interface.
        sa.Column("updated_ms", sa.BigInteger, nullable=True),
    )
    schema_version = sa.Table(
        f"{prefix}schema_version",
        metadata,
        sa.Column("version", sa.Integer, nullable=False),
    )
    return _Tables(kv, schema_version)


def _migrate_1(conn: Connection, prefix: str) -> None:
    # Written as literal DDL, not from the current Table objects, so that this step
    # always creates exactly the first schema, whatever later migrations add.
    blob = "BYTEA" if conn.dialect.name == "postgresql" else "BLOB"
    conn.execute(
        sa.text(
            f"CREATE TABLE {prefix}kv ("
            "namespace TEXT NOT NULL, "
            f"key {blob} NOT NULL, "
            f"value {blob} NOT NULL, "
            "version BIGINT NOT NULL, "
            f"CONSTRAINT {prefix}kv_pkey PRIMARY KEY (namespace, key))"
        )
    )


def _migrate_2(conn: Connection, prefix: str) -> None:
    conn.execute(sa.text(f"ALTER TABLE {prefix}kv ADD COLUMN updated_ms BIGINT"))


#: The schema's history: migration ``n`` takes a database from version ``n - 1`` to ``n``.
#: Append only; never edit a migration that has shipped.
MIGRATIONS: tuple[Callable[[Connection, str], None], ...] = (_migrate_1, _migrate_2)

#: The schema version this code reads and writes.
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: Connection, prefix: str, target: int = SCHEMA_VERSION) -> int:
    """Bring the schema to version ``target`` inside the caller's transaction; return
    the version found before. Refuses a database newer than this code knows."""
    tables = _tables(prefix)
    if conn.dialect.name == "postgresql":
        # Serialises concurrent starts: the second waits, then finds nothing to do.
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": f"oco-migrate-{prefix}"})
    tables.schema_version.create(conn, checkfirst=True)
    found = conn.execute(sa.select(sa.func.max(tables.schema_version.c.version))).scalar()
    current = int(found or 0)
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"the database schema is version {current}, newer than this oco-core knows ({SCHEMA_VERSION}); "
            "upgrade oco-core"
        )
    for version in range(current + 1, target + 1):
        logger.info("store: migrating schema %s to version %d", prefix, version)
        MIGRATIONS[version - 1](conn, prefix)
    if target > current:
        conn.execute(sa.delete(tables.schema_version))
        conn.execute(sa.insert(tables.schema_version).values(version=target))
    return current


# ---- the store ----


def _now_ms() -> int:
    return int(time.time() * 1000)


#: Seconds a PostgreSQL server gets past ``statement_timeout`` to report its own
#: cancellation before the client takes it for hung and closes the connection.
_GRACE = 1.0


class _Watch:
    """The connection one PostgreSQL call is using, so that the trio side can cut it off
    when the server stops answering.

    libpq has no timeout for a reply: a server that hangs, or a network that drops
    packets while the kernel at the far end still acknowledges them, leaves the worker
    thread blocked for good (TCP keepalives and ``tcp_user_timeout`` need unacknowledged
    data, and the server's statement_timeout never fires for a statement it never
    received). Shutting the socket down wakes the thread with an error; the pool then
    discards the connection. The socket is a duplicate of libpq's descriptor, so a
    descriptor closed and reused meanwhile is never the one shut down.
    """

    __slots__ = ("_lock", "_since", "_socket", "cut")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._since = 0.0
        self.cut = False

    def begin(self, conn: Connection) -> None:
        """In the worker thread: the call now runs on ``conn``."""
        fileno = conn.connection.dbapi_connection.fileno()  # type: ignore[union-attr]
        with self._lock:
            if self.cut:
                raise exc.TimeoutError("the call was cut off")
            self._socket = socket.socket(fileno=os.dup(fileno))
            self._since = time.monotonic()

    def end(self) -> None:
        """In the worker thread: the call is done with its connection."""
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def cut_if_late(self, limit: float) -> float | None:
        """In the trio thread: cut the call off if it has run ``limit`` seconds on its
        connection; else return the seconds until it will have (None once cut)."""
        with self._lock:
            if self._socket is None:
                # Still connecting (bounded by connect_timeout), or done.
                return limit
            left = self._since + limit - time.monotonic()
            if left > 0:
                return left
            self.cut = True
            with contextlib.suppress(OSError):  # already closed by the far end
                self._socket.shutdown(socket.SHUT_RDWR)
            return None


class _StaleConnectionError(Exception):
    """The pre-ping found a pooled connection dead (the pool is now renewed)."""


def _one_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__


class SqlStore(Store):
    """The core store on a SQL database. Create it with :func:`open_sql_store`."""

    def __init__(self, config: SqlStoreConfig) -> None:
        self.config = config
        self._url = config.sqlalchemy_url()
        self._masked_url = mask_url(self._url)
        self._password = self._url.password
        self._t = _tables(config.table_prefix)
        self._engine = self._create_engine()
        # On PostgreSQL every operation is one statement, atomic on its own: autocommit
        # saves the BEGIN and COMMIT round trips (measured: 2x the gets per second).
        # SQLite keeps explicit transactions, which cost nothing there.
        self._autocommit = self._engine.dialect.name == "postgresql"
        # Taken in trio before a call goes to its thread, so that waiting for a
        # connection is bounded by pool_timeout; the thread itself never waits.
        self._limiter = trio.CapacityLimiter(1 if self._in_memory else config.pool_size + config.max_overflow)
        self._threads = trio.CapacityLimiter(math.inf)
        # SQLite is a local file with its own busy timeout; only a server can hang.
        self._deadline = config.statement_timeout + _GRACE if self._autocommit else None
        self._prepare_statements()

    @property
    def _in_memory(self) -> bool:
        return self._url.get_backend_name() == "sqlite" and self._url.database in (None, "", ":memory:")

    def _create_engine(self) -> Engine:
        config = self.config
        kwargs: dict[str, Any] = {}
        if self._url.get_backend_name() == "sqlite":
            # The pysqlite driver's own transaction handling is off (isolation_level
            # None) and SQLAlchemy emits BEGIN itself, as SQLAlchemy's documentation
            # recommends: DDL becomes transactional, so migrations are all or nothing.
            connect_args: dict[str, Any] = {
                "timeout": config.sqlite_busy_timeout_ms / 1000,
                "isolation_level": None,
                "check_same_thread": False,
            }
            if self._in_memory:
                # One shared connection: every connection to :memory: is a new database.
                kwargs.update(poolclass=StaticPool)
            else:
                kwargs.update(pool_size=config.pool_size, max_overflow=config.max_overflow)
            kwargs.update(connect_args=connect_args)
        else:
            kwargs.update(
                pool_size=config.pool_size,
                max_overflow=config.max_overflow,
                isolation_level="AUTOCOMMIT",
                connect_args={
                    "connect_timeout": config.connect_timeout,
                    "application_name": "oco",
                    # A server that vanishes without closing the connection (a network
                    # partition, a dead host) is noticed within about dead_server_timeout
                    # seconds instead of the kernel's default of many minutes.
                    "keepalives": 1,
                    "keepalives_idle": max(1, config.dead_server_timeout // 3),
                    "keepalives_interval": max(1, config.dead_server_timeout // 6),
                    "keepalives_count": 3,
                    "tcp_user_timeout": config.dead_server_timeout * 1000,
                },
            )
        if not self._in_memory:
            kwargs.update(pool_timeout=config.pool_timeout, pool_recycle=config.pool_recycle)
        try:
            engine = sa.create_engine(self._url, **kwargs)
        except ImportError as e:
            raise ConfigError(
                f"cannot use {self._masked_url}: {e}; for PostgreSQL: pip install 'oco-core[postgresql]'"
            ) from e
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", self._on_sqlite_connect)
            event.listen(engine, "begin", self._on_sqlite_begin)
        else:
            event.listen(engine, "connect", self._on_postgresql_connect)
        return engine

    def _on_postgresql_connect(self, dbapi_connection: Any, _record: Any) -> None:
        # Set with SET rather than the `options` startup parameter, which PgBouncer
        # refuses unless told to ignore it. Outside a transaction, so that the pool's
        # rollback on return cannot undo it.
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        try:
            milliseconds = max(1, round(self.config.statement_timeout * 1000))
            dbapi_connection.execute(f"SET statement_timeout = {milliseconds}")
        finally:
            dbapi_connection.autocommit = autocommit

    def _on_sqlite_connect(self, dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            if not self._in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={self.config.sqlite_synchronous}")
            cursor.execute(f"PRAGMA busy_timeout={int(self.config.sqlite_busy_timeout_ms)}")
        finally:
            cursor.close()

    @staticmethod
    def _on_sqlite_begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock up front (waiting out the busy timeout), so a
        # transaction that reads before it writes cannot fail with SQLITE_BUSY later.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("oco_write") else "BEGIN")

    def _prepare_statements(self) -> None:
        # Built once: constructing a statement costs more than running it on SQLite
        # (measured 4x the gets per second with prepared statements).
        kv = self._t.kv
        ns = sa.bindparam("p_ns", type_=sa.Text)
        key = sa.bindparam("p_key", type_=sa.LargeBinary)
        this_key = sa.and_(kv.c.namespace == ns, kv.c.key == key)
        if self._engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
        new_row = insert(kv).values(
            namespace=ns,
            key=key,
            value=sa.bindparam("p_value", type_=sa.LargeBinary),
            version=1,
            updated_ms=sa.bindparam("p_now"),
        )
        self._get_stmt = sa.select(kv.c.value, kv.c.version).where(this_key)
        self._version_stmt = sa.select(kv.c.version).where(this_key)
        self._upsert_stmt = new_row.on_conflict_do_update(
            index_elements=[kv.c.namespace, kv.c.key],
            set_={
                "value": new_row.excluded.value,
                "version": kv.c.version + 1,
                "updated_ms": new_row.excluded.updated_ms,
            },
        ).returning(kv.c.version)
        self._create_stmt = new_row.on_conflict_do_nothing().returning(kv.c.version)
        self._cas_stmt = (
            sa.update(kv)
            .where(this_key, kv.c.version == sa.bindparam("p_expected"))
            .values(
                value=sa.bindparam("p_value", type_=sa.LargeBinary),
                version=kv.c.version + 1,
                updated_ms=sa.bindparam("p_now"),
            )
            .returning(kv.c.version)
        )
        self._delete_stmt = sa.delete(kv).where(this_key).returning(kv.c.version)
        self._delete_cas_stmt = (
            sa.delete(kv).where(this_key, kv.c.version == sa.bindparam("p_expected")).returning(kv.c.version)
        )
        # list: [low, high) past start_after, in key order; with and without an upper
        # bound, with and without values. One lower bound, the greater (as Redis's list
        # does): given both, SQLite's index search starts at `key >= low` and steps over
        # every key up to start_after, so each page of a long listing cost more than the
        # last (a page 190,000 keys in: 30 ms, not 0.03).
        self._list_stmts: dict[tuple[bool, bool, bool], Any] = {}
        for keys_only in (False, True):
            for bounded in (False, True):
                for past in (False, True):
                    columns = [kv.c.key, kv.c.version] if keys_only else [kv.c.key, kv.c.version, kv.c.value]
                    lower = (
                        kv.c.key > sa.bindparam("p_after", type_=sa.LargeBinary)
                        if past
                        else kv.c.key >= sa.bindparam("p_low", type_=sa.LargeBinary)
                    )
                    query = sa.select(*columns).where(kv.c.namespace == ns, lower)
                    if bounded:
                        query = query.where(kv.c.key < sa.bindparam("p_high", type_=sa.LargeBinary))
                    self._list_stmts[keys_only, bounded, past] = query.order_by(kv.c.key).limit(sa.bindparam("p_limit"))
        self._usage_stmt = sa.select(
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(sa.func.length(kv.c.key) + sa.func.length(kv.c.value)), 0),
        ).where(kv.c.namespace == ns)

    # ---- plumbing ----

    async def _run(
        self, fn: Callable[[Connection], T], *, write: bool, transaction: bool = False, unbounded: bool = False
    ) -> T:
        """Run ``fn`` on a pooled connection in a worker thread, in a transaction (always
        on SQLite; on PostgreSQL only when asked), and map database errors. ``unbounded``:
        no statement timeout and no watch (a migration may rightly take long)."""

        watch = _Watch() if self._deadline is not None and not unbounded else None

        def attempt() -> T:
            with self._engine.connect() as conn:
                if watch is not None:
                    watch.begin(conn)
                try:
                    if watch is not None and self.config.pool_pre_ping:
                        # SQLAlchemy's own pre-ping would run before the watch begins,
                        # where a hung server holds it for good.
                        try:
                            conn.exec_driver_sql("SELECT 1")
                            conn.rollback()  # ends SQLAlchemy's autobegin; no round trip in autocommit
                        except exc.DBAPIError as e:
                            if e.connection_invalidated and not watch.cut:
                                raise _StaleConnectionError from e
                            raise
                    if self._autocommit and not transaction:
                        return fn(conn)
                    if transaction and self._autocommit:
                        conn = conn.execution_options(isolation_level="READ COMMITTED")
                    elif write:
                        conn = conn.execution_options(oco_write=True)
                    with conn.begin():
                        return fn(conn)
                finally:
                    if watch is not None:
                        watch.end()
                        if watch.cut:  # cut just as it finished: its socket is shut, not fit for the pool
                            conn.invalidate()

        def work() -> T:
            try:
                return attempt()
            except _StaleConnectionError:
                # Only the ping was sent: a write is as safe to try again as a read.
                try:
                    return attempt()
                except _StaleConnectionError as again:
                    raise again.__cause__ from None  # type: ignore[misc]
            except exc.DBAPIError as e:
                # A connection that died while idle in the pool (the database
                # restarted): SQLAlchemy has now discarded every pooled connection. A
                # read is safe to try once more; a write is not (it may have happened).
                if write or not e.connection_invalidated or (watch is not None and watch.cut):
                    raise
                return attempt()

        # Only a server can hang; SQLite's calls wait their turn, however long, as before.
        with trio.move_on_after(self.config.pool_timeout if self._deadline is not None else math.inf) as waiting:
            await self._limiter.acquire()
        if waiting.cancelled_caught:
            raise StoreUnavailableError(
                f"store database {self._masked_url} is unavailable: no connection free within "
                f"pool_timeout ({self.config.pool_timeout:g} s)"
            )
        try:
            return await self._in_thread(work, watch)
        except StoreError:
            raise
        except exc.SQLAlchemyError as e:
            if watch is not None and watch.cut:
                raise StoreUnavailableError(
                    f"store database {self._masked_url} is unavailable: no answer within "
                    f"{self._deadline:g} s (statement_timeout + {_GRACE:g} s); its connection was closed"
                ) from e
            raise self._mapped(e) from e
        finally:
            self._limiter.release()

    async def _in_thread(self, work: Callable[[], T], watch: _Watch | None) -> T:
        """Run ``work`` in a worker thread; with a ``watch``, cut its connection off once
        it has waited ``statement_timeout + 1`` seconds for the server."""
        if watch is None or self._deadline is None:
            return await trio.to_thread.run_sync(work, limiter=self._threads)
        # trio.to_thread cannot wake its caller before the thread ends, and the watch
        # must act meanwhile: start the thread at the level below and wait for it here.
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: list[outcome.Outcome[T]] = []

        def deliver(got: outcome.Outcome[T]) -> None:
            result.append(got)
            token.run_sync_soon(done.set)

        trio.lowlevel.start_thread_soon(work, deliver)
        # Shielded: as trio.to_thread does by default, the thread is waited for even
        # when the caller is cancelled (it holds a pooled connection); the watch bounds
        # that wait.
        with trio.CancelScope(shield=True):
            wait: float | None = self._deadline
            while wait is not None:
                with trio.move_on_after(wait):
                    await done.wait()
                if done.is_set():
                    break
                wait = watch.cut_if_late(self._deadline)
            await done.wait()
        return result[0].unwrap()

    def _mapped(self, e: exc.SQLAlchemyError) -> StoreError:
        if isinstance(e, (exc.OperationalError, exc.InterfaceError, exc.TimeoutError, exc.DisconnectionError)):
            return StoreUnavailableError(self._unavailable_message(e))
        if isinstance(e, exc.DBAPIError) and e.connection_invalidated:
            return StoreUnavailableError(self._unavailable_message(e))
        return StoreError(f"store database {self._masked_url} failed: {self._scrub(_one_line(e))}")

    def _scrub(self, text: str) -> str:
        if self._password:
            text = text.replace(self._password, "***")
        return text

    def _unavailable_message(self, error: BaseException) -> str:
        return f"store database {self._masked_url} is unavailable: {self._scrub(_one_line(error))}"

    async def _start(self) -> None:
        if self.config.url == default_url():
            # The default file lives under $XDG_DATA_HOME, which may not exist yet. Only
            # the default: a mistyped path of the user's own should fail, not be created.
            Path(self._url.database or "").parent.mkdir(parents=True, exist_ok=True)

        def work(conn: Connection) -> int:
            if self._deadline is not None:  # PostgreSQL: a migration may rightly outlast statement_timeout
                conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
            return migrate(conn, self.config.table_prefix)

        before = await self._run(work, write=True, transaction=True, unbounded=True)
        if before != SCHEMA_VERSION:
            logger.info("store: schema at version %d (was %d) in %s", SCHEMA_VERSION, before, self._masked_url)

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await trio.to_thread.run_sync(self._engine.dispose, limiter=self._limiter)

    # ---- the Store interface ----

    async def get(self, namespace: str, key: str) -> Item | None:
        """Return the item stored under ``key``, or None when there is none."""
        params = {"p_ns": namespace, "p_key": _encode_key(key)}

        def work(conn: Connection) -> Item | None:
            row = conn.execute(self._get_stmt, params).first()
            return None if row is None else Item(key, bytes(row.value), int(row.version))

        return await self._run(work, write=False)

    async def set(self, namespace: str, key: str, value: bytes, *, expected_version: int | None = None) -> int:
        """Store ``value`` under ``key`` and return the key's new version; see :meth:`Store.set`."""
        params: dict[str, Any] = {
            "p_ns": namespace,
            "p_key": _encode_key(key),
            "p_value": check_value(value, self.config.max_value_bytes),
            "p_now": _now_ms(),
        }
        stmt: Any
        if expected_version is None:
            stmt = self._upsert_stmt
        elif expected_version == 0:
            stmt = self._create_stmt
        else:
            stmt, params["p_expected"] = self._cas_stmt, expected_version

        def work(conn: Connection) -> int:
            version = conn.execute(stmt, params).scalar()
            if version is None:
                raise self._conflict(conn, params, key, expected_version)
            return int(version)

        return await self._run(work, write=True)

    async def delete(self, namespace: str, key: str, *, expected_version: int | None = None) -> bool:
        """Delete ``key``; return False when it did not exist. See :meth:`Store.delete`."""
        params: dict[str, Any] = {"p_ns": namespace, "p_key": _encode_key(key)}
        stmt = self._delete_stmt
        if expected_version is not None:
            stmt, params["p_expected"] = self._delete_cas_stmt, expected_version

        def work(conn: Connection) -> bool:
            deleted = conn.execute(stmt, params).first() is not None
            if not deleted and expected_version is not None:
                conflict = self._conflict(conn, params, key, expected_version)
                if not (expected_version == 0 and conflict.current == 0):  # expected absent, is absent
                    raise conflict
            return deleted

        return await self._run(work, write=True)

    async def list(
        self,
        namespace: str,
        prefix: str = "",
        *,
        start_after: str = "",
        limit: int = 100,
        keys_only: bool = False,
    ) -> list[Item]:
        """Return up to ``limit`` items whose keys start with ``prefix``, ordered by the
        keys' UTF-8 bytes, only keys greater than ``start_after``; see :meth:`Store.list`."""
        if limit <= 0:
            return []
        try:
            low, after = prefix.encode("utf-8"), start_after.encode("utf-8")
        except UnicodeEncodeError as e:
            raise StoreError(f"a prefix must be valid Unicode (encodable as UTF-8): {e}") from e
        high = _prefix_end(low)
        params = {"p_ns": namespace, "p_low": low, "p_after": after, "p_high": high, "p_limit": limit}
        stmt = self._list_stmts[keys_only, high is not None, after >= low]

        def work(conn: Connection) -> list[Item]:
            return [
                Item(bytes(row.key).decode("utf-8"), b"" if keys_only else bytes(row.value), int(row.version))
                for row in conn.execute(stmt, params)
            ]

        return await self._run(work, write=False)

    async def usage(self, namespace: str) -> tuple[int, int]:
        """Return (number of keys, total bytes of keys and values) in ``namespace``."""

        def work(conn: Connection) -> tuple[int, int]:
            row = conn.execute(self._usage_stmt, {"p_ns": namespace}).one()
            return int(row[0]), int(row[1])

        return await self._run(work, write=False)

    # ---- helpers ----

    def _conflict(
        self, conn: Connection, params: dict[str, Any], key: str, expected: int | None
    ) -> VersionConflictError:
        # The version now stored, read just after the failed write (0: no such key).
        current = int(conn.execute(self._version_stmt, params).scalar() or 0)
        return VersionConflictError(
            f"key {key!r}: expected version {expected}, but the stored version is {current}", current
        )


@asynccontextmanager
async def open_sql_store(config: SqlStoreConfig) -> AsyncIterator[SqlStore]:
    """Open the SQL store described by ``config``: connect, create or upgrade the
    schema, and close every connection on exit.

    Raises :class:`~oco_core.StoreUnavailableError` (naming the URL, password masked)
    when the database cannot be reached; the caller may retry.
    """
    store = SqlStore(config)
    try:
        await store._start()
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


@hookimpl
def oco_store_types() -> list[StoreType]:
    """The built-in ``sql`` store: SQLite by default, PostgreSQL with the extra."""
    return [
        StoreType(
            name="sql",
            open=open_sql_store,
            config_model=SqlStoreConfig,
            package="oco-core",
            description="SQLite (default, a local file) or PostgreSQL via SQLAlchemy",
            # Found like any other store type; it is the default only because it says so.
            default=True,
            default_options=lambda: {"url": default_url()},
        )
    ]
