"""The options of the ``redis`` store and data store: apart from the code that talks to
Redis, so that a bot that has oco-store-redis installed but does not use it never
imports redis-py (the plugin is loaded, and these models read, at every start)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from oco_core.plugin import mask_url

#: Default largest value, in bytes (as the SQL store's).
DEFAULT_MAX_VALUE_BYTES = 1024 * 1024

# A command (``get``), a subcommand (``client|setname``) or a category (``@scripting``).
_COMMAND = re.compile(r"@?[a-z][a-z0-9_-]*(\|[a-z0-9_-]+)?")
# Glob syntax of ACL key patterns and SCAN MATCH, and what would split an ACL rule.
_GLOB_OR_SPACE = re.compile(r"[*?\[\]\\\s]")


def _redis_url(value: str, whose: str) -> str:
    """``value`` when its scheme is one redis-py reads, else the error saying which."""
    if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL{whose}")
    return value


class RedisStoreConfig(BaseModel):
    """Options of the ``redis`` store (``store: {type: redis, ...}`` in the bot's config).

    ``url`` is a redis-py URL: ``redis://[[user]:password@]host[:port][/db]``,
    ``rediss://`` for TLS, or ``unix:///path/to/redis.sock``. Its password never appears
    in ``repr`` or in error messages.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = "redis://127.0.0.1:6379/0"
    #: Every Redis key this store writes starts with this, so one Redis database can
    #: hold several bots (or other applications) side by side.
    prefix: str = Field(default="oco:", max_length=200)
    #: Largest value accepted, in bytes; larger writes raise ValueTooLargeError.
    max_value_bytes: int = Field(default=DEFAULT_MAX_VALUE_BYTES, ge=1, le=512 * 1024 * 1024)
    #: Connections in the pool (also the number of worker threads in use at once).
    max_connections: int = Field(default=10, ge=1, le=1000)
    #: Seconds a call waits for a free connection before failing as unavailable.
    pool_timeout: float = Field(default=30.0, gt=0)
    #: Seconds to wait for Redis to answer (and to connect) before failing as unavailable.
    socket_timeout: float = Field(default=5.0, gt=0)
    connect_timeout: float = Field(default=5.0, gt=0)
    #: A connection idle for longer than this many seconds is checked with PING before
    #: use, so a Redis restart costs no failed call; 0 turns the check off.
    health_check_interval: int = Field(default=2, ge=0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _redis_url(value, "")

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if "{" in value or "}" in value:
            raise ValueError("must not contain { or } (the store uses them as Redis Cluster hash tags)")
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield (name, mask_url(value) if name == "url" else value)


class RedisDataStoreConfig(BaseModel):
    """Options of the ``redis`` data store (``datastores: [{type: redis, ...}]``).

    ``url`` names an admin account that may run ``ACL SETUSER``, ``ACL GETUSER``,
    ``ACL DELUSER``, ``ACL SAVE``, ``CLIENT KILL``, ``SCAN`` and ``UNLINK`` (on the
    callbacks' keys) in its database; its password never appears in ``repr`` or in
    error messages. Callbacks get that database, on ``callback_host``:``callback_port``
    (the admin URL's host and port by default).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The admin account: ``redis://[user]:password@host[:port][/db]`` (``rediss://``
    #: for TLS). Callbacks get the same database and scheme.
    url: str
    #: Every callback's keys and channels start with ``<key_prefix><callback id>:``.
    key_prefix: str = Field(default="oco:cb:", max_length=200)
    #: Every callback's ACL user is named ``<user_prefix><callback id>``.
    user_prefix: str = Field(default="oco-cb-", max_length=100)
    #: The host and port callbacks dial when they reach Redis by another address than
    #: the bot (a container network, a proxy). Required when ``url`` is a unix socket.
    callback_host: str | None = None
    callback_port: int | None = Field(default=None, ge=1, le=65535)
    #: Commands or categories added back to the callbacks' users after the built-in
    #: policy (``["sort", "info"]``). Each weakens isolation the README describes.
    allow_commands: tuple[str, ...] = ()
    #: Commands or categories refused on top of the built-in policy
    #: (``["@scripting"]`` to refuse Lua scripts, whose run time nothing limits).
    deny_commands: tuple[str, ...] = ()
    #: Connections to Redis the provider keeps (also worker threads in use at once).
    max_connections: int = Field(default=4, ge=1, le=100)
    #: Seconds to wait for Redis to connect or answer before failing as unavailable.
    timeout: float = Field(default=5.0, gt=0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        _redis_url(value, " of an admin account")
        from redis.connection import parse_url  # redis-py's own reading, as the callbacks' will be

        try:
            parse_url(value)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        except ValueError as e:
            raise ValueError(f"{mask_url(value)}: {e}") from None
        return value

    @field_validator("key_prefix", "user_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if _GLOB_OR_SPACE.search(value):
            raise ValueError("must not contain spaces or the glob characters * ? [ ] \\ (it is used in ACL patterns)")
        return value

    @field_validator("user_prefix")
    @classmethod
    def _check_user_prefix(cls, value: str) -> str:
        if ":" in value or "@" in value or "/" in value:
            raise ValueError("must not contain ':', '@' or '/' (the user name goes into a URL)")
        return value

    @field_validator("allow_commands", "deny_commands")
    @classmethod
    def _check_commands(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not _COMMAND.fullmatch(name):
                raise ValueError(f"{name!r} is not a Redis command, command|subcommand or @category (lowercase)")
        return value

    @model_validator(mode="after")
    def _check_callback_host(self) -> RedisDataStoreConfig:
        if urlsplit(self.url).scheme == "unix" and not self.callback_host:
            raise ValueError(
                "url is a unix socket: set callback_host (and callback_port) to the TCP address callbacks dial"
            )
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield (name, mask_url(value) if name == "url" else value)
