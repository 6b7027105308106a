"""The built-in ``postgresql`` data store: a role and a schema of its own per callback.

For each callback the provider keeps, in the one database the admin URL names:

- a role named :func:`~oco_core.plugin.corner_name` of the callback's id: ``LOGIN`` with
  the password the bot gave, ``NOINHERIT``, no ``SUPERUSER``, ``CREATEDB``,
  ``CREATEROLE``, ``REPLICATION`` or ``BYPASSRLS``, a ``CONNECTION LIMIT``, ``CONNECT`` on
  this database, its ``search_path`` set to its schema, and no privilege of its own on
  schema ``public``;
- a schema of the same name owned by that role (``CREATE SCHEMA ... AUTHORIZATION``), so
  the callback may do anything inside it and nothing in another callback's schema, which
  grants nobody anything.

Privileges PostgreSQL grants to ``PUBLIC`` (every role) cannot be taken from one role;
see docs/datastores.md for what that leaves reachable and what ``lock_public_schema``
closes. Opening the provider refuses a database where ``PUBLIC`` may create objects in
``public`` (the default before PostgreSQL 15, kept by upgrades): a callback could plant
functions or tables there that other roles resolve by name.

The role's comment marks it as the provider's (``oco data store of callback <id>``) and
holds a fingerprint of its password, a slow salted hash of a password the bot generated:
that is how a second ``provision`` with the same password (a bot restart, a replica)
leaves the callback's sessions alone while one with a new password (a rotation) ends
them at once. A role or schema of the same name that the provider did not make is never
taken over or dropped. The password reaches the server only as a SCRAM (or MD5)
verifier computed by libpq, as ``psql``'s ``\\password`` does, so a server logging DDL
never logs it.

psycopg is blocking: every call runs on a connection of its own in a worker thread
(``trio.to_thread.run_sync``), one call at a time (provisioning is rare, and concurrent
``GRANT ... ON DATABASE`` statements fail with "tuple concurrently updated").
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import quote, unquote, urlsplit

import trio
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from ._datastore import DataStoreAccess, DataStoreProvider, DataStoreType, corner_name
from ._errors import ConfigError, StoreError, StoreUnavailableError
from ._hookspecs import hookimpl
from ._store import mask_url

if TYPE_CHECKING:
    import psycopg

logger = logging.getLogger(__name__)

T = TypeVar("T")

_INSTALL_HINT = "pip install 'oco-core[postgresql]'"
_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
#: Seconds the provider's own statements wait for a lock (a callback holding one on its
#: schema) before failing instead of hanging the bot's command.
_LOCK_TIMEOUT = "10s"
#: Milliseconds pg_terminate_backend waits for each ended session to be gone.
_TERMINATE_WAIT_MS = 5000


def _load_psycopg() -> ModuleType:
    try:
        return importlib.import_module("psycopg")
    except ImportError as e:
        raise ConfigError(f"the postgresql data store needs psycopg 3 ({e}): {_INSTALL_HINT}") from e


class PostgresDataStoreConfig(BaseModel):
    """Options of a ``type: postgresql`` entry under ``datastores:``."""

    # The URL holds the admin's password: no validation error may quote it.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    #: An account allowed to create roles and schemas in the database it names
    #: (``CREATEROLE`` and ``CREATE`` on the database; a superuser works but is more than
    #: needed): ``postgresql://oco_admin:PASSWORD@db.internal:5432/apps``. The
    #: ``postgresql+psycopg://`` spelling of the core store's config is accepted too.
    url: SecretStr
    #: Connections each callback's role may hold at once (PostgreSQL's ``CONNECTION
    #: LIMIT``): the only quota PostgreSQL enforces per role.
    connection_limit: int = Field(default=5, ge=1, le=10_000)
    #: The host callbacks dial, when it differs from the admin URL's (a public name, a
    #: pooler); default: the admin URL's host.
    callback_host: str | None = Field(default=None, min_length=1)
    #: The port callbacks dial; default: the admin URL's port (5432 when it names none).
    callback_port: int | None = Field(default=None, ge=1, le=65535)
    #: ``sslmode`` put in the callbacks' URL; default: the admin URL's, if it has one.
    callback_sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = None
    #: Roles and schemas are named this plus the callback's id, so several bots can
    #: share one database (give each its own prefix). Lowercase letters, digits and
    #: ``_``; not ``pg_``, which PostgreSQL reserves.
    name_prefix: str = Field(default="oco_cb_", pattern=r"^[a-z_][a-z0-9_]{0,19}$")
    #: Run ``REVOKE ALL ON SCHEMA public FROM PUBLIC`` when the provider opens, so that
    #: no role (callbacks included) can use schema ``public`` unless granted. It changes
    #: the database for everyone: roles other than the owner that use ``public`` (a core
    #: store under another account) then need their own ``GRANT``. Needs the admin to own
    #: schema ``public`` (be the database owner) or be a superuser.
    lock_public_schema: bool = False
    #: Default ``statement_timeout`` of callback roles, in milliseconds (a callback may
    #: still ``SET`` another in its session); unset: the server's.
    statement_timeout_ms: int | None = Field(default=None, ge=0)
    #: Default ``idle_in_transaction_session_timeout`` of callback roles, in
    #: milliseconds: a callback that leaves a transaction open loses its session instead
    #: of holding locks and old row versions; unset: the server's.
    idle_in_transaction_timeout_ms: int | None = Field(default=None, ge=0)
    #: Seconds to wait when connecting with the admin account.
    connect_timeout: int = Field(default=5, ge=1, le=300)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: SecretStr) -> SecretStr:
        # Messages never quote the URL: it holds the admin's password.
        url = value.get_secret_value()
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as e:
            raise ValueError(
                f"not a PostgreSQL URL ({e}); expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
            ) from e
        if parts.scheme not in _SCHEMES:
            raise ValueError(
                f"unsupported scheme {parts.scheme!r}; expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
            )
        if not parts.path.strip("/"):
            raise ValueError("name the database: postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
        if "password=" in parts.query:
            # mask_url hides the password of the user part only.
            raise ValueError("put the password in the URL's user part: postgresql://USER:PASSWORD@HOST/DATABASE")
        if "," in (parts.hostname or ""):
            raise ValueError("the URL names several hosts; name the one callbacks dial with callback_host")
        _load_psycopg_for_config()
        return value

    @field_validator("name_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if value.startswith("pg_"):
            raise ValueError("PostgreSQL reserves role names starting with pg_; choose another prefix")
        return value


def _load_psycopg_for_config() -> None:
    try:
        _load_psycopg()
    except ConfigError as e:
        raise ValueError(str(e)) from None


@dataclass(frozen=True, slots=True)
class _Target:
    """Where callbacks connect, from the admin URL and the callback_* options."""

    host: str
    port: str
    database: str
    sslmode: str | None


def _marker(callback_id: str) -> str:
    return f"oco data store of callback {callback_id}"


def _fingerprint(password: str, role: str) -> str:
    # Public to every role of the cluster (role comments are), so slow and salted; the
    # bot's passwords are random, which is what makes a short fingerprint safe to show.
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), f"oco-datastore-postgresql:{role}".encode(), 20_000)
    return digest[:12].hex()


def _url_host(host: str) -> str:
    if host.startswith("/"):
        return quote(host, safe="")  # a Unix-socket directory
    if ":" in host:
        return f"[{host}]"
    return host


class PostgresDataStore(DataStoreProvider):
    """The ``postgresql`` data-store provider; open it with :func:`open_postgres_datastore`."""

    def __init__(self, config: PostgresDataStoreConfig, psycopg_module: ModuleType) -> None:
        self.config = config
        self._pg = psycopg_module
        raw = config.url.get_secret_value()
        scheme, sep, rest = raw.partition("://")
        # libpq knows postgresql:// and postgres://, not SQLAlchemy's driver suffix.
        self._conninfo = f"postgresql{sep}{rest}" if scheme == "postgresql+psycopg" else raw
        self._masked = mask_url(self._conninfo)
        self._admin_password = unquote(urlsplit(self._conninfo).password or "")
        self._lock = trio.Lock()
        self._superuser = False
        self._server_version = 0
        self._target = self._callback_target()

    def _callback_target(self) -> _Target:
        from psycopg.conninfo import conninfo_to_dict

        try:
            params = conninfo_to_dict(self._conninfo)
        except self._pg.Error as e:
            raise ConfigError(f"PostgreSQL data store {self._masked}: not a valid URL: {self._scrub(str(e))}") from None
        config = self.config
        host = config.callback_host or str(params.get("host") or "")
        if config.callback_port is not None:
            port = str(config.callback_port)
        else:
            port = str(params.get("port") or ("5432" if host else ""))
        sslmode = config.callback_sslmode or params.get("sslmode")
        return _Target(host, port, str(params["dbname"]), None if sslmode is None else str(sslmode))

    def describe(self) -> str:
        """The admin URL, password masked, and how corners are named."""
        return f"{self._masked} (a role and a schema per callback, named {self.config.name_prefix}*)"

    # ---- plumbing ----

    def _scrub(self, text: str, *secrets: str) -> str:
        for secret in (self._admin_password, *secrets):
            if secret:
                text = text.replace(secret, "***").replace(quote(secret, safe=""), "***")
        return text

    async def _run(self, what: str, fn: Callable[[psycopg.Connection[Any]], T], *secrets: str) -> T:
        """Run ``fn`` on a fresh admin connection in a worker thread, in a transaction
        committed when it returns, and map psycopg's errors to the store's."""
        pg = self._pg

        def work() -> T:
            with pg.connect(
                self._conninfo,
                connect_timeout=self.config.connect_timeout,
                application_name="oco-datastore",
            ) as conn:
                conn.execute(f"SET lock_timeout = '{_LOCK_TIMEOUT}'")
                return fn(conn)

        try:
            async with self._lock:
                return await trio.to_thread.run_sync(work)
        except StoreError:
            raise
        except pg.Error as e:
            message = " ".join(str(e).split())
            detail = getattr(getattr(e, "diag", None), "message_detail", None)
            if detail:
                message += f" ({' '.join(detail.split())})"
            text = f"PostgreSQL data store {self._masked}: {what} failed: {self._scrub(message, *secrets)}"
            sqlstate = getattr(e, "sqlstate", None)
            if isinstance(e, pg.OperationalError) and (
                sqlstate is None or sqlstate.startswith("08") or sqlstate in ("57P01", "57P02", "57P03")
            ):
                raise StoreUnavailableError(text) from None
            raise StoreError(text) from None

    def _terminate(self, conn: psycopg.Connection[Any], role: str) -> int:
        """End every session of ``role``, in every database of the cluster."""
        wait = f", {_TERMINATE_WAIT_MS}" if self._server_version >= 140000 else ""
        rows = conn.execute(
            f"SELECT pg_terminate_backend(pid{wait}) FROM pg_stat_activity "  # noqa: S608 - a constant
            "WHERE usename = %s AND pid <> pg_backend_pid()",
            [role],
        ).fetchall()
        conn.commit()
        if rows:
            logger.info("postgresql data store: ended %d session(s) of role %s", len(rows), role)
        return len(rows)

    # ---- opening ----

    async def _start(self) -> None:
        config = self.config

        def work(conn: psycopg.Connection[Any]) -> list[str]:
            from psycopg import sql

            row = conn.execute(
                "SELECT current_user, current_database(), r.rolsuper, r.rolcreaterole,"
                " has_database_privilege(current_database(), 'CREATE'),"
                " current_setting('server_version_num')::int,"
                " EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'public')"
                " FROM pg_roles r WHERE r.rolname = current_user"
            ).fetchone()
            assert row is not None  # the current user is a role
            user, database, superuser, createrole, create_db, version, has_public = row
            self._superuser, self._server_version = bool(superuser), int(version)
            if database != self._target.database:
                raise StoreError(f"PostgreSQL data store {self._masked}: connected to {database!r}, not the URL's")
            if not (superuser or createrole):
                raise StoreError(
                    f"PostgreSQL data store {self._masked}: the account {user!r} cannot create roles; "
                    f"as a superuser: ALTER ROLE {sql.Identifier(user).as_string(conn)} CREATEROLE"
                )
            if not create_db:
                raise StoreError(
                    f"PostgreSQL data store {self._masked}: the account {user!r} cannot create schemas in "
                    f"{database!r}; as its owner: GRANT CREATE ON DATABASE {sql.Identifier(database).as_string(conn)}"
                    f" TO {sql.Identifier(user).as_string(conn)}"
                )
            if has_public and config.lock_public_schema:
                try:
                    conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
                except self._pg.errors.InsufficientPrivilege:
                    raise StoreError(
                        f"PostgreSQL data store {self._masked}: lock_public_schema is set, but only the owner of "
                        f"schema public in {database!r} (the database owner) or a superuser may revoke PUBLIC's "
                        "privileges on it; run REVOKE ALL ON SCHEMA public FROM PUBLIC as them, or use that account"
                    ) from None
            elif has_public:
                public_create = conn.execute("SELECT has_schema_privilege('public', 'public', 'CREATE')").fetchone()
                if public_create and public_create[0]:
                    raise StoreError(
                        f"PostgreSQL data store {self._masked}: every role may create objects in schema public of "
                        f"{database!r} (the default before PostgreSQL 15), so a callback could plant tables or "
                        "functions that other roles find by name; as the database owner run "
                        "REVOKE CREATE ON SCHEMA public FROM PUBLIC, or set lock_public_schema: true"
                    )
            others = conn.execute(
                "SELECT datname FROM pg_database WHERE datallowconn AND datname <> current_database()"
                " AND has_database_privilege('public', oid, 'CONNECT') ORDER BY datname"
            ).fetchall()
            return [str(name) for (name,) in others]

        others = await self._run("opening", work)
        if others:
            # PostgreSQL cannot deny one role what PUBLIC holds; pg_hba.conf can.
            logger.warning(
                "postgresql data store: callback roles can also connect to the databases %s (PUBLIC holds CONNECT "
                "there) and use what those grant to PUBLIC; to confine them to %r, reject roles named %s* there "
                "in pg_hba.conf, or REVOKE CONNECT ON DATABASE ... FROM PUBLIC (see docs/datastores.md)",
                ", ".join(others),
                self._target.database,
                self.config.name_prefix,
            )

    # ---- the DataStoreProvider interface ----

    async def provision(self, callback_id: str, password: str, *, rotated: bool = False) -> DataStoreAccess:
        """Create or update the callback's role and schema so that ``password`` is its
        only credential, and say how to reach them; see :meth:`DataStoreProvider.provision`.

        A new password (or ``rotated``) also ends the role's open sessions.
        """
        if not password or "\x00" in password:
            raise StoreError("a data-store password must be non-empty and hold no NUL character")
        role = corner_name(callback_id, self.config.name_prefix)
        fingerprint = await trio.to_thread.run_sync(_fingerprint, password, role)
        comment = f"{_marker(callback_id)}; credential {fingerprint}"

        def work(conn: psycopg.Connection[Any]) -> None:
            from psycopg import sql

            ident = sql.Identifier(role)
            limit = self.config.connection_limit
            found = self._role(conn, role, callback_id)

            def verifier() -> sql.Literal:
                # libpq hashes as the server's password_encryption says (SCRAM by default).
                return sql.Literal(conn.pgconn.encrypt_password(password.encode(), role.encode()).decode())

            new_password = found is None or found["comment"] != comment
            if found is None:
                conn.execute(
                    sql.SQL(
                        "CREATE ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION "
                        "NOBYPASSRLS CONNECTION LIMIT {} PASSWORD {}"
                    ).format(ident, sql.Literal(limit), verifier())
                )
            else:
                # Only what differs: PostgreSQL 15 refuses even NOSUPERUSER from a
                # non-superuser, so restating every attribute would fail for the
                # least-privileged admin this provider is meant to run as.
                wanted = {
                    "rolcanlogin": (True, "LOGIN"),
                    "rolsuper": (False, "NOSUPERUSER"),
                    "rolcreatedb": (False, "NOCREATEDB"),
                    "rolcreaterole": (False, "NOCREATEROLE"),
                    "rolinherit": (False, "NOINHERIT"),
                    "rolreplication": (False, "NOREPLICATION"),
                    "rolbypassrls": (False, "NOBYPASSRLS"),
                }
                fixes: list[sql.Composable] = [
                    sql.SQL(word) for column, (value, word) in wanted.items() if found[column] != value
                ]
                if found["rolconnlimit"] != limit:
                    fixes.append(sql.SQL("CONNECTION LIMIT {}").format(sql.Literal(limit)))
                if new_password:
                    fixes.append(sql.SQL("PASSWORD {}").format(verifier()))
                if fixes:
                    conn.execute(sql.SQL("ALTER ROLE {} WITH {}").format(ident, sql.SQL(" ").join(fixes)))
            if new_password:
                conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(ident, sql.Literal(comment)))
            self._admin_member_of(conn, ident)
            owner = self._schema_owner(conn, role)
            if owner is None:
                conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(ident, ident))
            elif owner != role:
                raise StoreError(
                    f"PostgreSQL data store {self._masked}: schema {role!r} exists and belongs to {owner!r}, not to "
                    f"the role of callback {callback_id!r}; it is left alone: rename or drop it, or choose another "
                    "name_prefix"
                )
            if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'public'").fetchone():
                # Only the role's own grants: what PUBLIC holds, the role keeps (see the docs).
                conn.execute(sql.SQL("REVOKE ALL ON SCHEMA public FROM {}").format(ident))
            database = sql.Identifier(self._target.database)
            conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(database, ident))
            # Its own CONNECT, so it keeps working where the operator revoked PUBLIC's.
            conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(database, ident))
            conn.execute(sql.SQL("ALTER ROLE {} SET search_path TO {}").format(ident, ident))
            for name, value in (
                ("statement_timeout", self.config.statement_timeout_ms),
                ("idle_in_transaction_session_timeout", self.config.idle_in_transaction_timeout_ms),
            ):
                if value is None:
                    conn.execute(sql.SQL("ALTER ROLE {} RESET {}").format(ident, sql.Identifier(name)))
                else:
                    conn.execute(
                        sql.SQL("ALTER ROLE {} SET {} TO {}").format(ident, sql.Identifier(name), sql.Literal(value))
                    )
            conn.commit()
            if found is not None and (new_password or rotated):
                self._terminate(conn, role)

        await self._run(f"provisioning callback {callback_id!r}", work, password)
        return self._access(role, password)

    async def revoke(self, callback_id: str, *, drop_data: bool = False) -> None:
        """Disable the callback's role (``NOLOGIN``, no password) and end its sessions;
        with ``drop_data`` drop its schema, everything it owns here, and the role."""
        role = corner_name(callback_id, self.config.name_prefix)

        def work(conn: psycopg.Connection[Any]) -> None:
            from psycopg import sql

            ident = sql.Identifier(role)
            found = self._role(conn, role, callback_id)
            if found is None:
                return
            if found["rolcanlogin"]:
                conn.execute(sql.SQL("ALTER ROLE {} WITH NOLOGIN PASSWORD NULL").format(ident))
            revoked = f"{_marker(callback_id)}; revoked"
            if found["comment"] != revoked:
                conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(ident, sql.Literal(revoked)))
            self._admin_member_of(conn, ident)
            conn.commit()
            self._terminate(conn, role)
            if not drop_data:
                return
            owner = self._schema_owner(conn, role)
            if owner == role:
                conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(ident))
            elif owner is not None:
                logger.warning("postgresql data store: schema %s belongs to %s, not to its callback; left", role, owner)
            # What it still owns or was granted here (tables in other schemas, grants).
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(ident))
            conn.commit()
            try:
                conn.execute(sql.SQL("DROP ROLE {}").format(ident))
            except self._pg.errors.DependentObjectsStillExist as e:
                conn.rollback()
                detail = " ".join((e.diag.message_detail or "").split())
                raise StoreError(
                    f"PostgreSQL data store {self._masked}: callback {callback_id!r}'s data in "
                    f"{self._target.database!r} is dropped and its role disabled, but the role {role!r} cannot "
                    f"be dropped: {detail}; run DROP OWNED BY {role} in each database named, then revoke again"
                ) from None

        what = "dropping the data store of" if drop_data else "revoking"
        await self._run(f"{what} callback {callback_id!r}", work)

    # ---- helpers ----

    def _role(self, conn: psycopg.Connection[Any], role: str, callback_id: str) -> dict[str, Any] | None:
        """The role's attributes and comment; StoreError when it exists but is not
        this provider's role for this callback (never take over someone's role)."""
        cursor = conn.execute(
            "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolinherit, rolreplication, rolbypassrls,"
            " rolconnlimit, shobj_description(oid, 'pg_authid') AS comment FROM pg_roles WHERE rolname = %s",
            [role],
        )
        row = cursor.fetchone()
        if row is None:
            return None
        assert cursor.description is not None
        found = {column.name: value for column, value in zip(cursor.description, row, strict=True)}
        comment = found["comment"] or ""
        if comment != _marker(callback_id) and not comment.startswith(_marker(callback_id) + ";"):
            raise StoreError(
                f"PostgreSQL data store {self._masked}: a role {role!r} exists that this provider did not make for "
                f"callback {callback_id!r}; it is left alone: rename or drop it, or choose another name_prefix"
            )
        return found

    def _admin_member_of(self, conn: psycopg.Connection[Any], ident: Any) -> None:
        # A non-superuser admin must be a member of the callback's role to create its
        # schema, end its sessions and drop what it owns.
        if not self._superuser:
            from psycopg import sql

            conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(ident))

    def _schema_owner(self, conn: psycopg.Connection[Any], schema: str) -> str | None:
        row = conn.execute(
            "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = %s",
            [schema],
        ).fetchone()
        return None if row is None else str(row[0])

    def _access(self, role: str, password: str) -> DataStoreAccess:
        target = self._target
        netloc = f"{role}:{quote(password, safe='')}@{_url_host(target.host)}"
        if target.port:
            netloc += f":{target.port}"
        url = f"postgresql://{netloc}/{quote(target.database, safe='')}"
        details = {
            "host": target.host,
            "port": target.port,
            "user": role,
            "password": password,
            "database": target.database,
            "schema": role,
        }
        if target.sslmode:
            url += f"?sslmode={target.sslmode}"
            details["sslmode"] = target.sslmode
        return DataStoreAccess(url=url, namespace=role, details=details)


@asynccontextmanager
async def open_postgres_datastore(config: PostgresDataStoreConfig) -> AsyncIterator[PostgresDataStore]:
    """Open the ``postgresql`` provider: check that the admin account can create roles
    and schemas and that schema ``public`` is safe to share (or lock it, when
    ``lock_public_schema`` says so).

    Raises :class:`~oco_core.ConfigError` when psycopg is missing,
    :class:`~oco_core.StoreUnavailableError` when the database cannot be reached, and
    :class:`~oco_core.StoreError` naming the fix when the account or database is unfit.
    """
    provider = PostgresDataStore(config, _load_psycopg())
    await provider._start()
    yield provider


@hookimpl
def oco_datastore_types() -> list[DataStoreType]:
    """The built-in ``postgresql`` data store (needs the ``postgresql`` extra)."""
    return [
        DataStoreType(
            name="postgresql",
            open=open_postgres_datastore,
            config_model=PostgresDataStoreConfig,
            package="oco-core",
            description="PostgreSQL: a role and a schema of its own per callback",
        )
    ]
