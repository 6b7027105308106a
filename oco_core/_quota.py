"""Per-namespace storage quotas (number of keys, total bytes), enforced over any store.

:class:`QuotaStore` wraps an open :class:`~oco_core.plugin.Store` and refuses, with
:class:`~oco_core.QuotaExceededError`, a write that would take a namespace past its
quota. Wrapping in the core, rather than teaching every store plugin, means every store
(SQL, Redis, a third party's) enforces the same quotas the same way.

How it stays exact: writes to a namespace that has a quota go one at a time (a trio
lock per namespace) and each is a compare-and-set against the version just read, so the
usage kept in memory always matches the store. Usage is measured once per namespace on
its first write (with the store's ``usage(namespace)`` when it can tell, else by paging
through :meth:`Store.list`) and measured again after any ambiguous failure. This assumes
the bot is the only writer of its store, as it is: one bot process per store. A write
from elsewhere goes uncounted until usage is next measured (after a failed or
conflicting write, or when the bot restarts). Namespaces without a quota (the bot's own, the adapters') pass through
untouched, with no lock.

What counts: a key counts once whatever its value; bytes are the key's UTF-8 bytes plus
the value's. A write that shrinks a namespace's usage is always allowed, so a namespace
already over a lowered quota can still be cleaned up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio
from pydantic import BaseModel, ConfigDict, Field

from ._errors import QuotaExceededError, ValueTooLargeError, VersionConflictError
from ._store import Item, Store

logger = logging.getLogger(__name__)

#: Namespaces of callbacks start with this; the id follows.
CALLBACK_NAMESPACE_PREFIX = "cb:"


class QuotaConfig(BaseModel):
    """A storage quota: ``max_keys`` and ``max_bytes`` (keys' UTF-8 bytes plus values'
    bytes); ``null`` means unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_keys: int | None = Field(default=100_000, ge=1)
    max_bytes: int | None = Field(default=100 * 1024 * 1024, ge=1)


@dataclass(slots=True)
class Usage:
    """What a namespace holds: how many keys, and their bytes (keys plus values)."""

    keys: int = 0
    bytes: int = 0


def item_bytes(key: str, value: bytes) -> int:
    """The bytes a key-value pair counts against ``max_bytes``."""
    return len(key.encode("utf-8")) + len(value)


async def measure_usage(store: Store, namespace: str) -> Usage:
    """Count a namespace's keys and bytes, asking the store when it can tell directly."""
    counted = await store.usage(namespace)
    if counted is not None:
        return Usage(*counted)
    usage = Usage()
    after = ""
    while True:
        page = await store.list(namespace, start_after=after, limit=1000)
        for item in page:
            usage.keys += 1
            usage.bytes += item_bytes(item.key, item.value)
        if len(page) < 1000:
            return usage
        after = page[-1].key


class QuotaStore(Store):
    """A store that enforces per-namespace quotas over another store.

    ``quota_for(namespace)`` returns the namespace's :class:`QuotaConfig`, or None for no
    quota; it is asked on every write, so it may change at run time. See
    :meth:`for_callbacks` for the usual mapping from callback ids.
    """

    def __init__(self, store: Store, quota_for: Callable[[str], QuotaConfig | None]) -> None:
        self.inner = store
        self._quota_for = quota_for
        self._usage: dict[str, Usage] = {}
        self._locks: dict[str, trio.Lock] = {}

    @classmethod
    def for_callbacks(
        cls, store: Store, default: QuotaConfig | None, per_callback: Mapping[str, QuotaConfig | None] | None = None
    ) -> QuotaStore:
        """Quotas for callback namespaces (``cb:<id>``): the callback's own entry in
        ``per_callback`` when it has one, else ``default``. Other namespaces (the bot's,
        the adapters') have none."""
        overrides = dict(per_callback or {})

        def quota_for(namespace: str) -> QuotaConfig | None:
            if not namespace.startswith(CALLBACK_NAMESPACE_PREFIX):
                return None
            callback_id = namespace[len(CALLBACK_NAMESPACE_PREFIX) :]
            return overrides.get(callback_id, default)

        return cls(store, quota_for)

    def reconfigure(self, default: QuotaConfig | None, per_callback: Mapping[str, QuotaConfig | None]) -> None:
        """New quotas for callback namespaces (a live reload), as :meth:`for_callbacks`
        maps them; what is stored is counted as before."""
        self._quota_for = QuotaStore.for_callbacks(self.inner, default, per_callback)._quota_for

    async def usage(self, namespace: str) -> tuple[int, int]:
        """Return (number of keys, total bytes) of ``namespace``, as quotas count them."""
        if namespace in self._usage:
            usage = self._usage[namespace]
            return usage.keys, usage.bytes
        usage = await measure_usage(self.inner, namespace)
        return usage.keys, usage.bytes

    # ---- reads pass through ----

    async def get(self, namespace: str, key: str) -> Item | None:
        """Return the item under ``key``, or None; see :meth:`Store.get`."""
        return await self.inner.get(namespace, key)

    async def list(
        self,
        namespace: str,
        prefix: str = "",
        *,
        start_after: str = "",
        limit: int = 100,
        keys_only: bool = False,
    ) -> list[Item]:
        """List items by prefix; see :meth:`Store.list`."""
        return await self.inner.list(namespace, prefix, start_after=start_after, limit=limit, keys_only=keys_only)

    # ---- writes are counted ----

    def _lock(self, namespace: str) -> trio.Lock:
        lock = self._locks.get(namespace)
        if lock is None:
            lock = self._locks[namespace] = trio.Lock()
        return lock

    async def _current_usage(self, namespace: str) -> Usage:
        usage = self._usage.get(namespace)
        if usage is None:
            usage = self._usage[namespace] = await measure_usage(self.inner, namespace)
        return usage

    def _forget(self, namespace: str) -> None:
        self._usage.pop(namespace, None)

    async def set(self, namespace: str, key: str, value: bytes, *, expected_version: int | None = None) -> int:
        """Store ``value`` under ``key`` unless that takes ``namespace`` past its quota;
        see :meth:`Store.set`."""
        quota = self._quota_for(namespace)
        if quota is None or (quota.max_keys is None and quota.max_bytes is None):
            return await self.inner.set(namespace, key, value, expected_version=expected_version)
        async with self._lock(namespace):
            while True:
                usage = await self._current_usage(namespace)
                old = await self.inner.get(namespace, key)
                old_version = 0 if old is None else old.version
                _expect_version(key, expected_version, old_version)
                added_keys = 0 if old is not None else 1
                added_bytes = item_bytes(key, value) - (0 if old is None else item_bytes(key, old.value))
                _check(namespace, quota, usage, added_keys, added_bytes)
                try:
                    version = await self.inner.set(namespace, key, value, expected_version=old_version)
                except VersionConflictError:
                    # Someone else wrote: the usage we hold is stale. Measure and retry.
                    logger.warning("store: namespace %s was written outside the bot; measuring its usage", namespace)
                    self._forget(namespace)
                    continue
                except ValueTooLargeError:
                    raise
                except BaseException:
                    # Unavailable, cancelled, failed: the write may or may not have
                    # happened, so measure again before the next one.
                    self._forget(namespace)
                    raise
                usage.keys += added_keys
                usage.bytes += added_bytes
                return version

    async def delete(self, namespace: str, key: str, *, expected_version: int | None = None) -> bool:
        """Delete ``key``; see :meth:`Store.delete`."""
        quota = self._quota_for(namespace)
        if quota is None or (quota.max_keys is None and quota.max_bytes is None):
            return await self.inner.delete(namespace, key, expected_version=expected_version)
        async with self._lock(namespace):
            while True:
                usage = await self._current_usage(namespace)
                old = await self.inner.get(namespace, key)
                old_version = 0 if old is None else old.version
                _expect_version(key, expected_version, old_version)
                if old is None:
                    return False
                try:
                    await self.inner.delete(namespace, key, expected_version=old_version)
                except VersionConflictError:
                    logger.warning("store: namespace %s was written outside the bot; measuring its usage", namespace)
                    self._forget(namespace)
                    continue
                except BaseException:
                    self._forget(namespace)
                    raise
                usage.keys -= 1
                usage.bytes -= item_bytes(key, old.value)
                return True


def _expect_version(key: str, expected: int | None, stored: int) -> None:
    """VersionConflictError unless a compare-and-set expecting ``expected`` may proceed."""
    if expected is not None and expected != stored:
        raise VersionConflictError(
            f"key {key!r}: expected version {expected}, but the stored version is {stored}", stored
        )


def _check(namespace: str, quota: QuotaConfig, usage: Usage, added_keys: int, added_bytes: int) -> None:
    if quota.max_keys is not None and added_keys > 0 and usage.keys + added_keys > quota.max_keys:
        raise QuotaExceededError(
            f"storage quota exceeded: {namespace} already holds {usage.keys} keys and its max_keys quota "
            f"is {quota.max_keys}; delete keys or raise the quota",
            namespace=namespace,
            quota="max_keys",
            limit=quota.max_keys,
        )
    if quota.max_bytes is not None and added_bytes > 0 and usage.bytes + added_bytes > quota.max_bytes:
        raise QuotaExceededError(
            f"storage quota exceeded: {namespace} would hold {usage.bytes + added_bytes} bytes and its max_bytes "
            f"quota is {quota.max_bytes}; delete keys or raise the quota",
            namespace=namespace,
            quota="max_bytes",
            limit=quota.max_bytes,
        )
