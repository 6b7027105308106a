"""A core store in memory, for tests of adapters and callbacks."""

from __future__ import annotations

import trio

from .._errors import ValueTooLargeError, VersionConflictError
from .._store import Item, Store, encode_key


class MemoryStore(Store):
    """A core store kept in a dict. It behaves like the real ones (versions,
    compare-and-set, keys ordered by their UTF-8 bytes, the value limit) and passes the
    same contract suite, so a test written against it means the same on SQLite."""

    def __init__(self, max_value_bytes: int = 1024 * 1024) -> None:
        self.max_value_bytes = max_value_bytes
        self._data: dict[str, dict[bytes, tuple[bytes, int]]] = {}

    def _version(self, namespace: str, key: bytes) -> int:
        found = self._data.get(namespace, {}).get(key)
        return found[1] if found else 0

    @staticmethod
    def _check(key: str, expected: int | None, current: int) -> None:
        if expected is not None and expected != current:
            raise VersionConflictError(
                f"key {key!r}: expected version {expected}, but the stored version is {current}", current
            )

    async def get(self, namespace: str, key: str) -> Item | None:
        await trio.lowlevel.checkpoint()
        found = self._data.get(namespace, {}).get(encode_key(key))
        return Item(key, found[0], found[1]) if found else None

    async def set(self, namespace: str, key: str, value: bytes, *, expected_version: int | None = None) -> int:
        await trio.lowlevel.checkpoint()
        raw = encode_key(key)
        if len(value) > self.max_value_bytes:
            raise ValueTooLargeError(
                f"value is {len(value)} bytes; the limit is {self.max_value_bytes} bytes (max_value_bytes)"
            )
        current = self._version(namespace, raw)
        self._check(key, expected_version, current)
        self._data.setdefault(namespace, {})[raw] = (bytes(value), current + 1)
        return current + 1

    async def delete(self, namespace: str, key: str, *, expected_version: int | None = None) -> bool:
        await trio.lowlevel.checkpoint()
        raw = encode_key(key)
        self._check(key, expected_version, self._version(namespace, raw))
        return self._data.get(namespace, {}).pop(raw, None) is not None

    async def list(
        self,
        namespace: str,
        prefix: str = "",
        *,
        start_after: str = "",
        limit: int = 100,
        keys_only: bool = False,
    ) -> list[Item]:
        await trio.lowlevel.checkpoint()
        if limit <= 0:
            return []
        low, after = prefix.encode("utf-8"), start_after.encode("utf-8")
        keys = sorted(k for k in self._data.get(namespace, {}) if k.startswith(low) and k > after)[:limit]
        entries = self._data[namespace] if keys else {}
        return [Item(k.decode("utf-8"), b"" if keys_only else entries[k][0], entries[k][1]) for k in keys]
