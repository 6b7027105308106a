"""Redis as a specific data store: an ACL user and a key prefix per callback.

``datastores: [{type: redis, url: redis://oco_admin:${REDIS_ADMIN}@cache:6379/0}]`` in
the bot's config offers it; a callback that declares ``requires: ["redis"]`` gets
``redis://oco-cb-<id>:<password>@cache:6379/0`` and the key prefix ``oco:cb:<id>:``.

Isolation is Redis's own (ACLs, Redis 7.0 or later), not a convention: each callback's
user may touch only keys and Pub/Sub channels starting with its prefix (``~prefix*``,
``&prefix*``), log in only with the one password the bot gave it, and run only the
commands of :data:`DENIED_COMMANDS`'s complement. What that policy refuses, and why, is
documented next to each entry; what Redis cannot enforce (memory, CPU) is in the README.

Every change is one ``ACL SETUSER`` beginning with ``reset``: Redis applies all its
rules at once or none, so a user is never seen half-configured. The password is sent
as its SHA-256 (``#<hash>``), the form Redis stores, so it never crosses the admin
connection; comparing that hash with ``ACL GETUSER``'s tells a rotation (open
connections are then closed) from a re-provisioning with the same password (they are
left alone, so a bot restart does not cut its callbacks off).

Threads: as the core store, the synchronous redis-py client runs in worker threads
(``trio.to_thread.run_sync``) behind a :class:`trio.CapacityLimiter` as large as its
connection pool.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar, cast
from urllib.parse import quote, unquote, urlsplit

import redis
import redis.exceptions
import trio
from redis.backoff import NoBackoff
from redis.connection import SSLConnection, UnixDomainSocketConnection
from redis.connection import parse_url as _untyped_parse_url
from redis.retry import Retry

from oco_core import StoreError, StoreUnavailableError
from oco_core.plugin import DataStoreAccess, DataStoreProvider, mask_url

from ._config import RedisDataStoreConfig as RedisDataStoreConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

# redis-py's own URL parser (so that host, port, db and TLS are read exactly as the
# callbacks' redis-py will read them), which it leaves unannotated.
_parse_url = cast("Callable[[str], dict[str, Any]]", _untyped_parse_url)

#: Commands refused to every callback user, on top of the categories ``@admin`` and
#: ``@dangerous`` (which already hold most of them: they are listed anyway so that the
#: policy does not depend on how a Redis version sorts commands into categories).
DENIED_COMMANDS: tuple[str, ...] = (
    # Whole-database destruction and server state.
    "flushall",
    "flushdb",
    "swapdb",
    "config",
    "debug",
    "module",
    "shutdown",
    "save",
    "bgsave",
    "bgrewriteaof",
    "replicaof",
    "slaveof",
    "failover",
    "sync",
    "psync",
    "monitor",  # would show every client's commands, passwords' hashes aside
    "acl",
    "info",
    "latency",
    "slowlog",  # holds other clients' command arguments
    "lastsave",
    "role",
    # Key names are not filtered by ACLs: KEYS, SCAN and RANDOMKEY return every key of
    # the database, other callbacks' included (checked on Redis 7.0), and DBSIZE counts
    # them. A callback keeps its own index (a set or sorted set) if it needs to list keys.
    "keys",
    "scan",
    "randomkey",
    "dbsize",
    # Other databases: SELECT is allowed for the callback's own database only (added
    # back below as select|<db>); MOVE and COPY ... DB write into another database.
    "select",
    "move",
    "copy",
    # MIGRATE copies keys to another server; RESTORE loads an unchecked serialized
    # payload; SORT's BY and GET read keys by pattern.
    "migrate",
    "restore",
    "sort",
    "sort_ro",
    # Other clients: killing, pausing, unblocking or listing them. Broadcast client-side
    # caching (CLIENT TRACKING ... BCAST) reports every modified key's name, other
    # callbacks' included, so tracking is refused as a whole.
    "client|kill",
    "client|list",
    "client|pause",
    "client|unpause",
    "client|unblock",
    "client|no-evict",
    "client|tracking",
    "client|caching",
    # PUBSUB CHANNELS / NUMSUB / SHARDCHANNELS list other callbacks' channels.
    "pubsub",
    # Scripts are shared by the whole server: killing or flushing them, or the Lua
    # debugger (SCRIPT DEBUG SYNC blocks the server), would reach other clients.
    # EVAL itself stays: Redis checks every key a script touches against the user.
    "script|kill",
    "script|flush",
    "script|debug",
    # Functions are server-wide libraries: a callback may not load, delete or flush them,
    # and with none of its own it has nothing to FCALL.
    "function",
    "fcall",
    "fcall_ro",
    # Server-wide memory reports; MEMORY USAGE of its own keys is added back below.
    "memory",
)

#: Rules added back after :data:`DENIED_COMMANDS` (``select|<db>`` is added too).
_ALLOWED_BACK = ("+memory|usage",)

# What ``DataStoreProvider`` promises about callback ids; checked again here because an
# id with a glob character would widen the key pattern to other callbacks' keys.
_CALLBACK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_NO_ACL_FILE = "not configured to use an acl file"
# Suffix of the short-lived user the provider creates at start-up to check that its
# rules and its admin account work; callback ids never start with "-", so no callback's
# user can have this name.
_PROBE_SUFFIX = "-probe"


def _password_hash(password: str) -> str:
    # The form in which Redis keeps passwords and ACL GETUSER reports them.
    return hashlib.sha256(password.encode()).hexdigest()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _opening_hashes(info: dict[str, Any] | None) -> list[str] | None:
    """The hashes of the passwords that open a user now: None when it does not exist,
    none when it is off (connections opened before it was switched off survive that in
    Redis, so they count as opened with another password)."""
    if info is None:
        return None
    if "on" not in info.get("flags", ()):
        return []
    return [_text(h) for h in info.get("passwords", ())]


class RedisDataStore(DataStoreProvider):
    """One Redis server offered to callbacks. Create it with :func:`open_redis_datastore`."""

    def __init__(self, config: RedisDataStoreConfig) -> None:
        self.config = config
        self._masked_url = mask_url(config.url)
        self._admin_password = urlsplit(config.url).password
        parts = _parse_url(config.url)
        self._db = int(parts.get("db", 0))
        self._tls = parts.get("connection_class") is SSLConnection
        if parts.get("connection_class") is UnixDomainSocketConnection:
            self._host = ""
            self._port = 6379
        else:
            self._host = str(parts.get("host", "localhost"))
            self._port = int(parts.get("port", 6379))
        self._host = config.callback_host or self._host
        self._port = config.callback_port or self._port
        self._pool = redis.BlockingConnectionPool.from_url(
            config.url,
            max_connections=config.max_connections,
            timeout=config.timeout,
            socket_timeout=config.timeout,
            socket_connect_timeout=config.timeout,
            # Every call here is idempotent, but one that failed is better reported
            # than repeated behind the operator's back.
            retry=Retry(NoBackoff(), 0),
        )
        self._client = redis.Redis(connection_pool=self._pool, decode_responses=False)
        self._limiter = trio.CapacityLimiter(config.max_connections)
        # None until ACL SAVE first answers: then whether this Redis has an ACL file.
        self._acl_file: bool | None = None

    # ---- names ----

    def user_name(self, callback_id: str) -> str:
        """The ACL user of ``callback_id``."""
        return self.config.user_prefix + self._checked(callback_id)

    def key_prefix(self, callback_id: str) -> str:
        """The prefix of every key and channel of ``callback_id``."""
        return f"{self.config.key_prefix}{self._checked(callback_id)}:"

    @staticmethod
    def _checked(callback_id: str) -> str:
        if not _CALLBACK_ID.fullmatch(callback_id):
            raise StoreError(
                f"callback id {callback_id!r} cannot name a Redis user and key prefix: "
                "expected letters, digits, '_', '.' or '-', starting with a letter or digit, at most 64 characters"
            )
        return callback_id

    def _rules(self, prefix: str) -> list[str]:
        return [
            "reset",  # first: whatever the user had before is gone
            "on",
            f"~{prefix}*",
            "resetchannels",
            f"&{prefix}*",
            "+@all",
            "-@admin",
            "-@dangerous",
            *(f"-{name}" for name in DENIED_COMMANDS),
            # Clients select the URL's database when they connect.
            f"+select|{self._db}",
            *_ALLOWED_BACK,
            *(f"+{name}" for name in self.config.allow_commands),
            *(f"-{name}" for name in self.config.deny_commands),
        ]

    # ---- talking to Redis ----

    async def _run(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter)
        except redis.exceptions.AuthenticationError as e:
            # A ConnectionError to redis-py, but waiting will not fix a wrong password.
            raise StoreError(
                f"Redis {self._masked_url} refused the admin account's user name or password: {self._scrub(e)}; "
                "check url:"
            ) from e
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise StoreUnavailableError(f"Redis {self._masked_url} is unavailable ({what}): {self._scrub(e)}") from e
        except redis.exceptions.NoPermissionError as e:
            raise StoreError(
                f"Redis {self._masked_url} refused {what} to the admin account: {self._scrub(e)}; the account in url: "
                "must be allowed ACL SETUSER, GETUSER, DELUSER and SAVE, CLIENT KILL, and SCAN and UNLINK on the "
                f"keys {self.config.key_prefix}*"
            ) from e
        except redis.exceptions.RedisError as e:
            raise StoreError(f"Redis {self._masked_url}: {what} failed: {self._scrub(e)}") from e

    def _scrub(self, error: BaseException) -> str:
        text = " ".join(str(error).split()) or type(error).__name__
        if self._admin_password:
            # As written in the URL (percent-encoded) and as redis-py sends it (decoded).
            for form in {self._admin_password, unquote(self._admin_password)}:
                text = text.replace(form, "***")
        return text

    def _command(self, *args: str) -> Any:
        return self._client.execute_command(*args)  # type: ignore[no-untyped-call]  # untyped in redis-py

    def _set_user(self, user: str, password_hash: str | None, prefix: str) -> None:
        # Without a password hash the user exists but no password opens it (the probe).
        secret = [f"#{password_hash}"] if password_hash else []
        rules = self._rules(prefix)
        self._command("ACL", "SETUSER", user, *rules[:2], *secret, *rules[2:])

    @staticmethod
    def _refuse_foreign(user: str, prefix: str, info: dict[str, Any] | None) -> None:
        """StoreError for an existing user that this provider did not make (its keys are
        not exactly the callback's prefix): another application's user is never reset
        or deleted, even when a careless user_prefix makes its name collide."""
        if info is None:
            return
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k in info.get("keys") or []]
        if keys and keys != [f"~{prefix}*"]:
            raise StoreError(
                f"Redis already has a user {user!r} that this data store did not make (its keys are "
                f"{', '.join(keys)}); choose another user_prefix, or remove that user if it is stale"
            )

    def _user(self, user: str) -> dict[str, Any] | None:
        """``ACL GETUSER``: the user's flags, passwords and rules, None when there is none."""
        info: dict[str, Any] | None = self._client.acl_getuser(user)
        return info or None

    async def _save_acl(self) -> None:
        """Write the users to Redis's ACL file when it has one, so that they survive a
        restart of Redis; without one they live in memory only (see the README)."""
        if self._acl_file is False:
            return
        try:
            await trio.to_thread.run_sync(self._client.acl_save, limiter=self._limiter)
        except redis.exceptions.ResponseError as e:
            if _NO_ACL_FILE in str(e).lower():
                self._acl_file = False
                logger.info(
                    "Redis %s has no ACL file: callbacks' users are lost when Redis restarts, "
                    "until the bot provisions them again",
                    self._masked_url,
                )
                return
            # The change is live; only its persistence failed. Say so, do not undo it.
            logger.warning(
                "Redis %s: ACL SAVE failed, users may not survive its restart: %s", self._masked_url, self._scrub(e)
            )
            return
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise StoreUnavailableError(f"Redis {self._masked_url} is unavailable (ACL SAVE): {self._scrub(e)}") from e
        self._acl_file = True

    async def _start(self) -> None:
        """Check, once, that Redis answers and accepts this provider's rules from its
        admin account, so that a misconfiguration fails when the bot starts rather
        than at a callback's first request."""
        await self._run("PING", self._client.ping)
        probe = self.config.user_prefix + _PROBE_SUFFIX
        prefix = f"{self.config.key_prefix}{_PROBE_SUFFIX}:"
        try:
            await self._run("ACL SETUSER (checking the command policy)", lambda: self._set_user(probe, None, prefix))
        except StoreError as e:
            if isinstance(e, StoreUnavailableError) or isinstance(e.__cause__, redis.exceptions.NoPermissionError):
                raise
            raise StoreError(
                f"{e} (Redis 7.0 or later is needed; allow_commands and deny_commands must name existing commands)"
            ) from e
        finally:
            # The SETUSER failure above, if any, is the one worth reporting.
            with trio.CancelScope(shield=True), contextlib.suppress(StoreError):
                await self._run("ACL DELUSER", partial(self._client.acl_deluser, probe))

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await trio.to_thread.run_sync(self._pool.disconnect)

    # ---- the DataStoreProvider interface ----

    async def provision(self, callback_id: str, password: str, *, rotated: bool = False) -> DataStoreAccess:
        """Give ``callback_id`` its ACL user with ``password`` as its only password and
        its key prefix, then return how to reach them. When the password changed, the
        user's open connections are closed; with the same password they are kept."""
        user = self.user_name(callback_id)
        prefix = self.key_prefix(callback_id)
        wanted = _password_hash(password)
        before = await self._run(f"ACL GETUSER {user}", partial(self._user, user))
        self._refuse_foreign(user, prefix, before)
        await self._run(f"ACL SETUSER {user}", lambda: self._set_user(user, wanted, prefix))
        had = _opening_hashes(before)
        if had is not None and (rotated or had != [wanted]):
            # Redis keeps connections authenticated with an old password open: end them,
            # so that a rotation takes effect now and not at the next reconnect.
            killed = await self._run(f"CLIENT KILL USER {user}", partial(self._client.client_kill_filter, user=user))
            logger.info("Redis data store: new password for %s, %s connection(s) closed", user, killed)
        elif had is None:
            logger.info("Redis data store: %s may use keys %s*", user, prefix)
        # Re-provisioning an unchanged user (a bot restart, a replica asking) is common
        # and should not rewrite the ACL file each time.
        if await self._run(f"ACL GETUSER {user}", partial(self._user, user)) != before:
            await self._save_acl()
        return self._access(user, password, prefix)

    def _access(self, user: str, password: str, prefix: str) -> DataStoreAccess:
        host = f"[{self._host}]" if ":" in self._host else self._host
        scheme = "rediss" if self._tls else "redis"
        url = f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{self._port}/{self._db}"
        return DataStoreAccess(
            url=url,
            namespace=prefix,
            details={
                "host": self._host,
                "port": str(self._port),
                "user": user,
                "password": password,
                "db": str(self._db),
                "key_prefix": prefix,
                "tls": "true" if self._tls else "false",
            },
        )

    async def revoke(self, callback_id: str, *, drop_data: bool = False) -> None:
        """Delete ``callback_id``'s ACL user (Redis closes its connections); with
        ``drop_data`` also delete every key under its prefix. Idempotent."""
        user = self.user_name(callback_id)
        prefix = self.key_prefix(callback_id)
        self._refuse_foreign(user, prefix, await self._run(f"ACL GETUSER {user}", partial(self._user, user)))
        deleted = await self._run(f"ACL DELUSER {user}", partial(self._client.acl_deluser, user))
        if deleted:
            logger.info("Redis data store: %s deleted", user)
            await self._save_acl()
        if drop_data:
            count = await self._drop_keys(prefix)
            logger.info("Redis data store: %d key(s) under %s deleted", count, prefix)

    async def _drop_keys(self, prefix: str) -> int:
        # A page at a time, each in its own thread call, so that dropping a large
        # corner neither blocks Redis (UNLINK frees memory in the background) nor
        # ignores cancellation. The prefix holds no glob characters (checked).
        cursor = 0
        count = 0
        while True:
            page: tuple[int, list[bytes | str]] = await self._run(
                f"SCAN MATCH {prefix}*", partial(self._client.scan, cursor, match=f"{prefix}*", count=1000)
            )
            cursor, keys = page
            if keys:
                unlinked: int = await self._run(f"UNLINK {prefix}*", partial(self._client.unlink, *keys))
                count += unlinked
            if cursor == 0:
                return count

    def describe(self) -> str:
        """The admin URL, password masked."""
        return self._masked_url


@asynccontextmanager
async def open_redis_datastore(config: RedisDataStoreConfig) -> AsyncIterator[RedisDataStore]:
    """Open the Redis data store described by ``config`` and close its connections on
    exit.

    Checks that Redis answers (else :class:`~oco_core.StoreUnavailableError`, the URL's
    password masked) and that the admin account may create users with this provider's
    command policy (else :class:`~oco_core.StoreError` saying what to fix).
    """
    store = RedisDataStore(config)
    try:
        await store._start()
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
