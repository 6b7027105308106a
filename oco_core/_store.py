"""The core store: a small async key-value interface that every store plugin implements.

Keys live in namespaces. The bot keeps its own data (users, rooms) under the namespace
``bot``, each adapter under ``adapter:<name>``, and each callback under ``cb:<id>``; a
callback can only ever name keys of its own namespace, because the gRPC edge picks the
namespace from the caller's authenticated identity.

Every key has a version: 1 after its first write, one more on each later write. A write
or delete may name the version it expects (compare-and-set); 0 means "must not exist".
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from ._errors import StoreError, ValueTooLargeError

if TYPE_CHECKING:
    from pydantic import BaseModel  # only named here; a callback's SDK never needs pydantic

#: Largest key, in UTF-8 bytes, that every store must accept.
MAX_KEY_BYTES = 1024


def encode_key(key: str) -> bytes:
    """A key as the UTF-8 bytes stores keep and order by; StoreError for an empty or
    unencodable key, ValueTooLargeError past MAX_KEY_BYTES."""
    if not isinstance(key, str) or not key:
        raise StoreError("a key must be a non-empty string")
    try:
        data = key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise StoreError(f"a key must be valid Unicode (encodable as UTF-8): {e}") from e
    if len(data) > MAX_KEY_BYTES:
        raise ValueTooLargeError(f"key is {len(data)} bytes in UTF-8; the limit is {MAX_KEY_BYTES} bytes")
    return data


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with ``prefix``
    (None when there is none, i.e. no upper bound): the end of a prefix range scan."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return None
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def check_value(value: bytes | bytearray | memoryview, max_value_bytes: int) -> bytes:
    """``value`` as ``bytes``, checked the way every store must before writing it.

    Raises StoreError when ``value`` is not bytes-like (bytes, bytearray, memoryview)
    and ValueTooLargeError, naming the size and the limit, when it is longer than
    ``max_value_bytes`` (a value of exactly that size is accepted).
    """
    if not isinstance(value, bytes | bytearray | memoryview):
        raise StoreError(f"a value must be bytes, not {type(value).__name__}")
    value = bytes(value)
    if len(value) > max_value_bytes:
        raise ValueTooLargeError(
            f"value is {len(value)} bytes; the store's limit (max_value_bytes) is {max_value_bytes}"
        )
    return value


def mask_url(url: str) -> str:
    """``url`` with its password, if it has one, replaced by ``***``, for logs, error
    messages and the ``repr`` of config models (``redis://bot:***@host:6380/2``).

    A URL without a password comes back unchanged; one that cannot be parsed comes back
    as ``<unparseable URL>`` rather than risk showing a secret.
    """
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"  # an IPv6 address keeps its brackets
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    except ValueError:  # raised for a malformed netloc or port
        return "<unparseable URL>"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True, slots=True)
class Item:
    """One stored key with its value and version."""

    key: str
    value: bytes
    version: int


class Store(abc.ABC):
    """An open core store. All methods may be called concurrently from many tasks.

    Errors: :class:`~oco_core.VersionConflictError` when an expected version differs,
    :class:`~oco_core.ValueTooLargeError` past the store's limits,
    :class:`~oco_core.StoreUnavailableError` when the database cannot be reached, and
    :class:`~oco_core.StoreError` for anything else.
    """

    @abc.abstractmethod
    async def get(self, namespace: str, key: str) -> Item | None:
        """Return the item stored under ``key``, or None when there is none."""

    @abc.abstractmethod
    async def set(self, namespace: str, key: str, value: bytes, *, expected_version: int | None = None) -> int:
        """Store ``value`` under ``key`` and return the key's new version.

        With ``expected_version`` the write happens only if the stored version equals it
        (0: only if the key does not exist); otherwise VersionConflictError is raised.
        """

    @abc.abstractmethod
    async def delete(self, namespace: str, key: str, *, expected_version: int | None = None) -> bool:
        """Delete ``key``; return False when it did not exist.

        With ``expected_version`` the delete happens only if the stored version equals
        it; otherwise VersionConflictError is raised (also when the key does not exist,
        unless ``expected_version`` is 0, which means "absent": then it returns False).
        """

    @abc.abstractmethod
    async def list(
        self,
        namespace: str,
        prefix: str = "",
        *,
        start_after: str = "",
        limit: int = 100,
        keys_only: bool = False,
    ) -> list[Item]:
        """Return up to ``limit`` items whose keys start with ``prefix``, in key order
        (ordered by the keys' UTF-8 bytes), only keys greater than ``start_after``.
        With ``keys_only`` the values are returned empty."""

    async def usage(self, namespace: str) -> tuple[int, int] | None:
        """Return (number of keys, total bytes) of ``namespace``, or None when this store
        cannot tell without reading every item.

        Bytes are each key's UTF-8 bytes plus its value's bytes. Storage quotas measure
        a namespace once, on its first write after the bot starts: with this answer when
        there is one, else by paging through :meth:`list`. Override it when the database
        can count cheaply (a SQL ``COUNT``/``SUM``, a server-side script); this default
        returns None.
        """
        return None


@dataclass(frozen=True, slots=True)
class StoreType:
    """What a store plugin offers, returned by the ``oco_store_types`` hook.

    ``open(config)`` is an async context manager yielding an open :class:`Store` for a
    validated ``config`` (an instance of ``config_model``); leaving it closes the store.
    ``package`` is the distribution that provides it, for error messages.

    ``default`` offers this store for a config that names no ``store: {type: ...}``.
    The bot uses the one installed store type that says so; with none, or with more
    than one, such a config is an error that asks for a ``type``. A default store must
    work with no options at all.

    ``default_options()``, when given, returns options the bot fills in beneath the
    config's own keys each time it uses this store type: defaults that cannot be fixed
    in ``config_model`` because they depend on the machine (the built-in ``sql`` store
    puts its SQLite file under ``$XDG_DATA_HOME/oco``).

    ``noisy_loggers`` names loggers of the plugin's dependencies that log routine
    traffic at INFO; ``oco`` raises them to WARNING unless it runs with ``--debug``.
    """

    name: str
    open: Callable[[Any], AbstractAsyncContextManager[Store]]
    config_model: type[BaseModel]
    package: str = "oco-core"
    description: str = ""
    default: bool = False
    default_options: Callable[[], dict[str, Any]] | None = None
    noisy_loggers: tuple[str, ...] = ()


class NamespacedStore:
    """A view of a :class:`Store` fixed to one namespace, as adapters and the SDK see it."""

    def __init__(self, store: Store, namespace: str) -> None:
        self._store = store
        self.namespace = namespace

    async def get(self, key: str) -> Item | None:
        """Return the item under ``key``, or None."""
        return await self._store.get(self.namespace, key)

    async def set(self, key: str, value: bytes, *, expected_version: int | None = None) -> int:
        """Store ``value`` under ``key``; see :meth:`Store.set`."""
        return await self._store.set(self.namespace, key, value, expected_version=expected_version)

    async def delete(self, key: str, *, expected_version: int | None = None) -> bool:
        """Delete ``key``; see :meth:`Store.delete`."""
        return await self._store.delete(self.namespace, key, expected_version=expected_version)

    async def list(
        self, prefix: str = "", *, start_after: str = "", limit: int = 100, keys_only: bool = False
    ) -> list[Item]:
        """List items by prefix; see :meth:`Store.list`."""
        return await self._store.list(self.namespace, prefix, start_after=start_after, limit=limit, keys_only=keys_only)
