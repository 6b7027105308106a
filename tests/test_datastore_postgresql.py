"""The ``postgresql`` data store against the real PostgreSQL at ``OCO_TEST_POSTGRES_URL``:
every callback connects with exactly what ``provision`` returned, and every refusal
asserted here is PostgreSQL's own."""

from __future__ import annotations

import base64
import hashlib
import hmac
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
import trio
from psycopg import errors, sql
from pydantic import ValidationError

from oco_core import ConfigError, StoreError, StoreUnavailableError
from oco_core._datastore_postgresql import PostgresDataStore, PostgresDataStoreConfig, open_postgres_datastore
from oco_core._plugins import load_plugins
from oco_core._sql_store import SqlStoreConfig, open_sql_store
from oco_core.plugin import DataStoreAccess, corner_name
from oco_core.testing import free_port

Conn = psycopg.Connection[tuple[Any, ...]]


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _with(url: str, *, user: str | None = None, database: str | None = None) -> str:
    """``url`` (no password: the test server trusts) for another user or database."""
    parts = urlsplit(_libpq(url))
    netloc = f"{user or parts.username}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{database}" if database else parts.path))


@dataclass
class Pg:
    """The test's corner of the server: the superuser URL (SQLAlchemy spelling, as the
    environment gives it), a name prefix of its own, and a superuser connection."""

    url: str
    prefix: str
    admin: Conn

    def config(self, **options: Any) -> PostgresDataStoreConfig:
        return PostgresDataStoreConfig.model_validate({"url": self.url, "name_prefix": self.prefix, **options})

    @asynccontextmanager
    async def provider(self, **options: Any) -> AsyncIterator[PostgresDataStore]:
        async with open_postgres_datastore(self.config(**options)) as provider:
            yield provider

    def scalar(self, query: str | sql.Composable, params: list[Any] | None = None) -> Any:
        row = self.admin.execute(query, params).fetchone()  # type: ignore[arg-type]
        return None if row is None else row[0]


@pytest.fixture
def pg(postgres_tables: tuple[str, str]) -> Iterator[Pg]:
    """A superuser connection and a prefix; afterwards every role and schema named with
    it is dropped (the conftest fixture drops the tables)."""
    url, prefix = postgres_tables
    admin = psycopg.connect(_libpq(url), autocommit=True)
    try:
        yield Pg(url, prefix, admin)
    finally:
        roles = admin.execute("SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)", [prefix]).fetchall()
        admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE starts_with(usename, %s)", [prefix]
        )
        for (role,) in roles:
            admin.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        admin.close()


def connect(access: DataStoreAccess, password: str | None = None) -> Conn:
    """A callback's session, opened with exactly the URL it was given (or that URL with
    another password)."""
    url = access.url
    if password is not None:
        url = url.replace(quote(access.details["password"], safe=""), quote(password, safe=""), 1)
    return psycopg.connect(url, autocommit=True, connect_timeout=5)


def refused(conn: Conn, statement: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        conn.execute(statement)


def verifier_matches(stored: str, role: str, password: str) -> bool:
    """Whether PostgreSQL's stored verifier (pg_authid.rolpassword) accepts ``password``."""
    if stored.startswith("md5"):
        return stored == "md5" + hashlib.md5((password + role).encode()).hexdigest()
    head, keys = stored.split("$", 1)[1].rsplit("$", 1)
    iterations, salt = head.split(":")
    stored_key = keys.split(":")[0]
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return base64.b64encode(hashlib.sha256(client_key).digest()).decode() == stored_key


def server_checks_passwords(access: DataStoreAccess) -> bool:
    """False where pg_hba.conf says ``trust`` for this role (as on CI's machine): then
    any password logs in and only the stored verifier shows which one is valid."""
    try:
        connect(access, password="certainly-not-" + uuid.uuid4().hex).close()
    except psycopg.OperationalError:
        return True
    return False


async def test_the_plugin_is_registered_through_the_oco_entry_points() -> None:
    offered = load_plugins().datastore("postgresql")
    assert offered.config_model is PostgresDataStoreConfig
    assert offered.open is open_postgres_datastore


async def test_two_callbacks_use_their_own_schemas_and_postgresql_refuses_everything_else(pg: Pg) -> None:
    # The core store's tables, as the SQL store creates them: in the admin's schema public.
    async with open_sql_store(SqlStoreConfig(url=pg.url, table_prefix=pg.prefix)) as store:
        await store.set("secrets", "token", b"core data")
    core_table = f"public.{pg.prefix}kv"
    async with pg.provider() as provider:
        accesses = {name: await provider.provision(name, f"pw-{name}-{uuid.uuid4().hex}") for name in ("alpha", "beta")}
    sessions = {name: connect(access) for name, access in accesses.items()}
    try:
        for name, conn in sessions.items():
            assert accesses[name].namespace == corner_name(name, pg.prefix)
            assert conn.execute("SELECT current_user, current_schema()").fetchone() == (
                accesses[name].details["user"],
                accesses[name].namespace,
            )
            conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
            conn.execute("INSERT INTO notes VALUES (1, %s)", [f"{name}'s note"])
            assert conn.execute("SELECT body FROM notes").fetchall() == [(f"{name}'s note",)]
        for name, other in (("alpha", "beta"), ("beta", "alpha")):
            conn, theirs = sessions[name], accesses[other].namespace
            denied = errors.InsufficientPrivilege
            refused(conn, f"SELECT * FROM {theirs}.notes", denied, f"permission denied for schema {theirs}")
            refused(conn, f"INSERT INTO {theirs}.notes VALUES (2, 'x')", denied, "permission denied for schema")
            refused(conn, f"DELETE FROM {theirs}.notes", denied, "permission denied for schema")
            refused(conn, f"DROP TABLE {theirs}.notes", denied, "permission denied for schema")
            refused(conn, f"DROP SCHEMA {theirs} CASCADE", denied, "must be owner of schema")
            refused(conn, f"CREATE TABLE {theirs}.planted (id int)", denied, "permission denied for schema")
            refused(conn, "CREATE TABLE public.planted (id int)", denied, "permission denied for schema public")
            refused(conn, f"SELECT * FROM {core_table}", denied, f"permission denied for table {pg.prefix}kv")
            refused(conn, f"DELETE FROM {core_table}", denied, f"permission denied for table {pg.prefix}kv")
            refused(conn, f"CREATE ROLE {pg.prefix}intruder", denied, "permission denied to create role")
            refused(conn, "CREATE SCHEMA elsewhere", denied, "permission denied for database")
            other_role = corner_name(other, pg.prefix)
            refused(conn, f"SET ROLE {other_role}", denied, f'permission denied to set role "{other_role}"')
        # Each one's data is untouched by the other's attempts.
        for name, conn in sessions.items():
            assert conn.execute("SELECT body FROM notes").fetchall() == [(f"{name}'s note",)]
        assert pg.scalar(f"SELECT count(*) FROM {core_table}") == 1
    finally:
        for conn in sessions.values():
            conn.close()


async def test_the_access_is_a_plain_postgresql_url_with_every_detail(pg: Pg) -> None:
    password = "p@ss:/w?rd #" + uuid.uuid4().hex  # characters a URL must escape
    async with pg.provider(callback_port=5432, callback_sslmode="disable") as provider:
        access = await provider.provision("Deploy.bot", password)
        assert pg.url.startswith("postgresql+psycopg://")
        assert access.url.startswith("postgresql://")
        role = access.details["user"]
        assert role.startswith(f"{pg.prefix}deploy_bot_")  # corner_name: folded plus a hash
        assert dict(access.details) == {
            "host": "127.0.0.1",
            "port": "5432",
            "user": role,
            "password": password,
            "database": "test",
            "schema": role,
            "sslmode": "disable",
        }
        assert access.namespace == role
        with connect(access) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
        assert password not in provider.describe()
        assert provider.describe().startswith("postgresql://")


async def test_provisioning_again_with_the_same_password_keeps_data_and_sessions(pg: Pg) -> None:
    async with pg.provider() as provider:
        first = await provider.provision("alpha", "same-password-1234567890")
        with connect(first) as session:
            session.execute("CREATE TABLE kept (n int)")
            session.execute("INSERT INTO kept VALUES (42)")
            again = await provider.provision("alpha", "same-password-1234567890")
            assert again == first
            # A replica's or a restarted bot's provision must not cut running callbacks off.
            assert session.execute("SELECT n FROM kept").fetchall() == [(42,)]


async def test_rotation_ends_open_sessions_and_only_the_new_password_is_valid(pg: Pg) -> None:
    async with pg.provider() as provider:
        old = await provider.provision("alpha", "old-password-" + uuid.uuid4().hex)
        role = old.details["user"]
        session = connect(old)
        session.execute("CREATE TABLE kept (n int)")
        session.execute("INSERT INTO kept VALUES (7)")
        new = await provider.provision("alpha", "new-password-" + uuid.uuid4().hex)
        with pytest.raises(psycopg.OperationalError, match="terminating connection due to administrator command"):
            session.execute("SELECT 1")
        session.close()
        stored = pg.scalar("SELECT rolpassword FROM pg_authid WHERE rolname = %s", [role])
        assert verifier_matches(stored, role, new.details["password"])
        assert not verifier_matches(stored, role, old.details["password"])
        assert not stored.endswith(old.details["password"]), "the password must reach the server hashed"
        if server_checks_passwords(new):
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                connect(old).close()
        with connect(new) as conn:
            assert conn.execute("SELECT n FROM kept").fetchall() == [(7,)]


async def test_revoke_keeps_the_data_and_refuses_login_until_provisioned_again(pg: Pg) -> None:
    async with pg.provider() as provider:
        access = await provider.provision("alpha", "pw-" + uuid.uuid4().hex)
        schema = access.namespace
        session = connect(access)
        session.execute("CREATE TABLE kept (n int)")
        session.execute("INSERT INTO kept VALUES (1)")
        await provider.revoke("alpha")
        with pytest.raises(psycopg.OperationalError, match="terminating connection"):
            session.execute("SELECT 1")
        session.close()
        with pytest.raises(psycopg.OperationalError, match=f'role "{schema}" is not permitted to log in'):
            connect(access).close()
        assert pg.scalar(f"SELECT n FROM {schema}.kept") == 1
        await provider.revoke("alpha")  # again: nothing to do, no error
        await provider.revoke("never-provisioned")
        back = await provider.provision("alpha", "pw-" + uuid.uuid4().hex)
        with connect(back) as conn:
            assert conn.execute("SELECT n FROM kept").fetchall() == [(1,)]


async def test_revoke_with_drop_data_removes_the_schema_and_the_role(pg: Pg) -> None:
    async with pg.provider() as provider:
        access = await provider.provision("alpha", "pw-" + uuid.uuid4().hex)
        with connect(access) as conn:
            conn.execute("CREATE TABLE doomed (n int)")
        await provider.revoke("alpha", drop_data=True)
        assert pg.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = %s", [access.namespace]) == 0
        assert pg.scalar("SELECT count(*) FROM pg_roles WHERE rolname = %s", [access.details["user"]]) == 0
        with pytest.raises(psycopg.OperationalError, match=r"does not exist|authentication failed"):
            connect(access).close()
        await provider.revoke("alpha", drop_data=True)  # again: nothing to do
        fresh = await provider.provision("alpha", "pw-" + uuid.uuid4().hex)
        with connect(fresh) as conn:
            with pytest.raises(errors.UndefinedTable):
                conn.execute("SELECT * FROM doomed")


async def test_the_connection_limit_is_enforced_per_callback(pg: Pg) -> None:
    async with pg.provider(connection_limit=2) as provider:
        access = await provider.provision("alpha", "pw-" + uuid.uuid4().hex)
        other = await provider.provision("beta", "pw-" + uuid.uuid4().hex)
    with connect(access), connect(access):
        with pytest.raises(psycopg.OperationalError, match=f'too many connections for role "{access.namespace}"'):
            connect(access).close()
        with connect(other) as conn:  # the limit is per callback, not shared
            assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_concurrent_provisioning_of_several_callbacks(pg: Pg) -> None:
    # GRANT ... ON DATABASE from concurrent transactions fails with "tuple concurrently
    # updated" unless the provider serialises them.
    names = [f"cb{i}" for i in range(6)]
    accesses: dict[str, DataStoreAccess] = {}

    async def provision(provider: PostgresDataStore, name: str) -> None:
        accesses[name] = await provider.provision(name, "pw-" + uuid.uuid4().hex)

    async with pg.provider() as provider, trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(provision, provider, name)
    for name in names:
        with connect(accesses[name]) as conn:
            assert conn.execute("SELECT current_schema()").fetchone() == (corner_name(name, pg.prefix),)


async def test_session_defaults_apply_to_the_callbacks_roles(pg: Pg) -> None:
    async with pg.provider(statement_timeout_ms=200, idle_in_transaction_timeout_ms=60_000) as provider:
        access = await provider.provision("alpha", "pw-" + uuid.uuid4().hex)
    with connect(access) as conn:
        assert conn.execute("SHOW idle_in_transaction_session_timeout").fetchone() == ("1min",)
        with pytest.raises(errors.QueryCanceled, match="statement timeout"):
            conn.execute("SELECT pg_sleep(2)")
    async with pg.provider() as provider:  # unset again: the server's defaults
        await provider.provision("alpha", access.details["password"])
    with connect(access) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)


async def test_a_least_privileged_admin_can_do_everything(pg: Pg) -> None:
    admin = f"{pg.prefix}admin"
    pg.admin.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEROLE").format(sql.Identifier(admin)))
    pg.admin.execute(sql.SQL("GRANT CREATE ON DATABASE test TO {}").format(sql.Identifier(admin)))
    url = _with(pg.url, user=admin)
    async with open_postgres_datastore(
        PostgresDataStoreConfig.model_validate({"url": url, "name_prefix": pg.prefix})
    ) as provider:
        old = await provider.provision("alpha", "pw-" + uuid.uuid4().hex)
        session = connect(old)
        session.execute("CREATE TABLE t (n int)")
        new = await provider.provision("alpha", "pw-" + uuid.uuid4().hex)
        with pytest.raises(psycopg.OperationalError, match="terminating connection"):
            session.execute("SELECT 1")
        session.close()
        with connect(new) as conn:
            conn.execute("INSERT INTO t VALUES (1)")
        await provider.revoke("alpha", drop_data=True)
    assert pg.scalar("SELECT count(*) FROM pg_roles WHERE rolname = %s", [new.details["user"]]) == 0


async def test_a_role_or_schema_it_did_not_make_is_never_taken_over(pg: Pg) -> None:
    squatter = sql.Identifier(corner_name("alpha", pg.prefix))
    pg.admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(squatter))
    pg.admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(corner_name("beta", pg.prefix))))
    async with pg.provider() as provider:
        made_by_someone = f"a role '{corner_name('alpha', pg.prefix)}' exists that this provider did not make"
        with pytest.raises(StoreError, match=made_by_someone):
            await provider.provision("alpha", "pw-" + uuid.uuid4().hex)
        with pytest.raises(StoreError, match="did not make"):
            await provider.revoke("alpha", drop_data=True)
        with pytest.raises(
            StoreError, match=f"schema '{corner_name('beta', pg.prefix)}' exists and belongs to 'postgres'"
        ):
            await provider.provision("beta", "pw-" + uuid.uuid4().hex)
    assert pg.scalar("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", [corner_name("alpha", pg.prefix)]) is True
    pg.admin.execute(sql.SQL("DROP SCHEMA {}").format(sql.Identifier(corner_name("beta", pg.prefix))))


async def test_public_schema_open_to_everyone_is_refused_unless_locked(pg: Pg) -> None:
    # A database of the test's own: lock_public_schema changes a database for everyone.
    database = f"{pg.prefix}db"
    pg.admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    try:
        url = _with(pg.url, database=database)
        with psycopg.connect(url, autocommit=True) as owner:
            owner.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")  # as before PostgreSQL 15
            owner.execute("CREATE TABLE public.shared (n int)")
            owner.execute("GRANT SELECT ON public.shared TO PUBLIC")
        config = {"url": url, "name_prefix": pg.prefix}
        with pytest.raises(StoreError, match="REVOKE CREATE ON SCHEMA public FROM PUBLIC"):
            async with open_postgres_datastore(PostgresDataStoreConfig.model_validate(config)):
                pass
        locked = PostgresDataStoreConfig.model_validate({**config, "lock_public_schema": True})
        async with open_postgres_datastore(locked) as provider:
            access = await provider.provision("alpha", "pw-" + uuid.uuid4().hex)
            assert access.details["database"] == database
            with connect(access) as conn:
                denied = errors.InsufficientPrivilege
                refused(conn, "SELECT * FROM public.shared", denied, "permission denied for schema public")
                refused(conn, "CREATE TABLE public.planted (n int)", denied, "permission denied for schema public")
            await provider.revoke("alpha", drop_data=True)
    finally:
        pg.admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(database)))


async def test_an_unfit_admin_account_is_told_what_to_grant(pg: Pg) -> None:
    weak = f"{pg.prefix}weak"
    pg.admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(weak)))
    url = _with(pg.url, user=weak)
    config = PostgresDataStoreConfig.model_validate({"url": url, "name_prefix": pg.prefix})
    with pytest.raises(StoreError, match=f'cannot create roles; as a superuser: ALTER ROLE "{weak}" CREATEROLE'):
        async with open_postgres_datastore(config):
            pass
    pg.admin.execute(sql.SQL("ALTER ROLE {} CREATEROLE").format(sql.Identifier(weak)))
    with pytest.raises(StoreError, match=f'GRANT CREATE ON DATABASE "test" TO "{weak}"'):
        async with open_postgres_datastore(config):
            pass


async def test_an_unreachable_server_is_unavailable_and_the_password_stays_hidden() -> None:
    url = f"postgresql://admin:hunter2-secret@127.0.0.1:{free_port()}/apps"
    config = PostgresDataStoreConfig(url=url)  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailableError) as caught:
        async with open_postgres_datastore(config):
            pass
    assert "postgresql://admin:***@127.0.0.1" in str(caught.value)
    assert "hunter2-secret" not in str(caught.value)
    assert "hunter2-secret" not in repr(config)


def test_the_config_checks_its_url_without_showing_it() -> None:
    with pytest.raises(ValidationError) as caught:
        PostgresDataStoreConfig(url="postgresql://admin:hunter2-secret@db:5432")  # type: ignore[arg-type]
    assert "name the database" in str(caught.value)
    assert "hunter2-secret" not in str(caught.value)
    with pytest.raises(ValidationError, match="put the password in the URL's user part"):
        PostgresDataStoreConfig(url="postgresql://admin@db/apps?password=hunter2-secret")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="unsupported scheme 'mysql'"):
        PostgresDataStoreConfig(url="mysql://admin@db/apps")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="PostgreSQL reserves role names starting with pg_"):
        PostgresDataStoreConfig(url="postgresql://admin@db/apps", name_prefix="pg_x")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        PostgresDataStoreConfig.model_validate({"url": "postgresql://admin@db/apps", "pasword": "x"})


async def test_without_psycopg_opening_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    config = PostgresDataStoreConfig(url="postgresql://admin@db/apps")  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "psycopg", None)  # what an uninstalled package looks like
    with pytest.raises(ConfigError, match=r"pip install 'oco-core\[postgresql\]'"):
        async with open_postgres_datastore(config):
            pass
    with pytest.raises(ValidationError, match=r"pip install 'oco-core\[postgresql\]'"):
        PostgresDataStoreConfig(url="postgresql://admin@db/apps")  # type: ignore[arg-type]
