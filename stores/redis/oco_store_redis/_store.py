"""The core store on Redis.

Layout. Each namespace is two Redis keys under the configured prefix::

    {prefix}{<namespace>}:d   hash: field = the key's UTF-8 bytes, value = b"<version>:" + value
    {prefix}{<namespace>}:z   sorted set: every key of the namespace, all with score 0

The namespace is the whole text between the first ``{`` after the prefix and the fixed
suffix, so no choice of namespace and key can collide with another's. The braces are a
Redis Cluster hash tag: both keys of a namespace live in one slot, which the scripts
below need. Members of a sorted set with equal scores are ordered by their bytes, so
``ZRANGEBYLEX`` lists keys in exactly the order the store interface promises, a page at
a time, with no pattern syntax to escape.

Atomicity. Every write is one Lua script: it reads the version, compares it with the
expected one, and writes the hash and the index together. Redis runs a script with no
other command in between, so compare-and-set is atomic on the server, and the hash and
the index never disagree.

Threads. redis-py's asyncio client needs an asyncio loop; under trio this module runs
the synchronous client in worker threads (``trio.to_thread.run_sync``) behind a
:class:`trio.CapacityLimiter` as large as the connection pool.

Durability is Redis's own: see the README (``appendonly yes`` with ``appendfsync
always`` makes every acknowledged write survive a crash of Redis or of the machine).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar
from urllib.parse import urlsplit

import redis
import redis.exceptions
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from oco_core import StoreError, StoreUnavailableError, VersionConflictError
from oco_core.plugin import Item, Store, check_value, mask_url
from oco_core.plugin import encode_key as _encode_key
from oco_core.plugin import prefix_end as _prefix_end

from ._config import DEFAULT_MAX_VALUE_BYTES as DEFAULT_MAX_VALUE_BYTES
from ._config import RedisStoreConfig as RedisStoreConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

# KEYS: data hash, index. ARGV: key, value, expected version ('' for none).
# Returns {1, new version} or {0, current version} on a conflict.
_SET = """
local stored = redis.call('HGET', KEYS[1], ARGV[1])
local version = 0
if stored then
  version = tonumber(string.sub(stored, 1, string.find(stored, ':', 1, true) - 1))
end
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= version then
  return {0, version}
end
version = version + 1
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d:', version) .. ARGV[2])
if not stored then
  redis.call('ZADD', KEYS[2], 0, ARGV[1])
end
return {1, version}
"""

# KEYS: data hash, index. ARGV: key, expected version ('' for none).
# Returns {1, deleted version (0: there was none)} or {0, current version}.
_DELETE = """
local stored = redis.call('HGET', KEYS[1], ARGV[1])
local version = 0
if stored then
  version = tonumber(string.sub(stored, 1, string.find(stored, ':', 1, true) - 1))
end
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= version then
  return {0, version}
end
if stored then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return {1, version}
"""

# KEYS: data hash, index. ARGV: lex min, lex max, limit, keys only ('1' or '0').
# Returns key, stored, key, stored, ...; with keys only, stored is just b"<version>:".
_LIST = """
local keys = redis.call('ZRANGEBYLEX', KEYS[2], ARGV[1], ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, key in ipairs(keys) do
  local stored = redis.call('HGET', KEYS[1], key)
  if stored then
    if ARGV[4] == '1' then
      stored = string.sub(stored, 1, string.find(stored, ':', 1, true))
    end
    out[#out + 1] = key
    out[#out + 1] = stored
  end
end
return out
"""

# KEYS: data hash. Returns {number of keys, bytes of keys and values}.
_USAGE = """
local count = 0
local total = 0
local cursor = '0'
repeat
  local page = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', 1000)
  cursor = page[1]
  local fields = page[2]
  for i = 1, #fields, 2 do
    local stored = fields[i + 1]
    count = count + 1
    total = total + #fields[i] + #stored - string.find(stored, ':', 1, true)
  end
until cursor == '0'
return {count, total}
"""


def _split(stored: bytes) -> tuple[int, bytes]:
    version, _, value = stored.partition(b":")
    return int(version), value


class RedisStore(Store):
    """The core store on Redis. Create it with :func:`open_redis_store`."""

    def __init__(self, config: RedisStoreConfig) -> None:
        self.config = config
        self._masked_url = mask_url(config.url)
        self._password = urlsplit(config.url).password
        self._pool = redis.BlockingConnectionPool.from_url(
            config.url,
            max_connections=config.max_connections,
            timeout=config.pool_timeout,
            socket_timeout=config.socket_timeout,
            socket_connect_timeout=config.connect_timeout,
            health_check_interval=config.health_check_interval,
            # No automatic retries: a write retried after a lost reply could happen
            # twice. The caller sees UNAVAILABLE and decides.
            retry=Retry(NoBackoff(), 0),
        )
        self._client = redis.Redis(connection_pool=self._pool)
        self._limiter = trio.CapacityLimiter(config.max_connections)
        self._set = self._client.register_script(_SET)
        self._delete = self._client.register_script(_DELETE)
        self._list = self._client.register_script(_LIST)
        self._usage = self._client.register_script(_USAGE)

    def _keys(self, namespace: str) -> list[bytes]:
        base = f"{self.config.prefix}{{{namespace}}}:".encode()
        return [base + b"d", base + b"z"]

    async def _run(self, fn: Callable[[], T]) -> T:
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ReadOnlyError) as e:
            raise StoreUnavailableError(f"Redis {self._masked_url} is unavailable: {self._scrub(e)}") from e
        except redis.exceptions.RedisError as e:
            raise StoreError(f"Redis {self._masked_url} failed: {self._scrub(e)}") from e

    def _scrub(self, error: BaseException) -> str:
        text = " ".join(str(error).split()) or type(error).__name__
        if self._password:
            text = text.replace(self._password, "***")
        return text

    async def _start(self) -> None:
        await self._run(self._client.ping)

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await trio.to_thread.run_sync(self._pool.disconnect)

    # ---- the Store interface ----

    async def get(self, namespace: str, key: str) -> Item | None:
        """Return the item stored under ``key``, or None when there is none."""
        raw = _encode_key(key)
        data_key = self._keys(namespace)[0]
        stored = await self._run(lambda: self._client.hget(data_key, raw))
        if stored is None:
            return None
        version, value = _split(bytes(stored))  # type: ignore[arg-type]  # redis-py's sync/async union
        return Item(key, value, version)

    async def set(self, namespace: str, key: str, value: bytes, *, expected_version: int | None = None) -> int:
        """Store ``value`` under ``key`` and return the key's new version; see :meth:`Store.set`."""
        raw = _encode_key(key)
        value = check_value(value, self.config.max_value_bytes)
        expected = b"" if expected_version is None else str(expected_version).encode()
        keys = self._keys(namespace)
        ok, version = await self._run(lambda: self._set(keys=keys, args=[raw, value, expected]))
        if not ok:
            raise VersionConflictError(
                f"key {key!r}: expected version {expected_version}, but the stored version is {version}", int(version)
            )
        return int(version)

    async def delete(self, namespace: str, key: str, *, expected_version: int | None = None) -> bool:
        """Delete ``key``; return False when it did not exist. See :meth:`Store.delete`."""
        raw = _encode_key(key)
        expected = b"" if expected_version is None else str(expected_version).encode()
        keys = self._keys(namespace)
        ok, version = await self._run(lambda: self._delete(keys=keys, args=[raw, expected]))
        if not ok:
            raise VersionConflictError(
                f"key {key!r}: expected version {expected_version}, but the stored version is {version}", int(version)
            )
        return int(version) > 0

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
        low = prefix.encode("utf-8")
        after = start_after.encode("utf-8")
        high = _prefix_end(low)
        lex_min = b"(" + after if after >= low else b"[" + low
        lex_max = b"+" if high is None else b"(" + high
        keys = self._keys(namespace)
        flat = await self._run(
            lambda: self._list(keys=keys, args=[lex_min, lex_max, limit, b"1" if keys_only else b"0"])
        )
        items: list[Item] = []
        for i in range(0, len(flat), 2):
            version, value = _split(flat[i + 1])
            items.append(Item(flat[i].decode("utf-8"), value, version))
        return items

    async def usage(self, namespace: str) -> tuple[int, int]:
        """Return (number of keys, total bytes of keys and values) in ``namespace``."""
        data_key = self._keys(namespace)[0]
        count, total = await self._run(lambda: self._usage(keys=[data_key]))
        return int(count), int(total)


@asynccontextmanager
async def open_redis_store(config: RedisStoreConfig) -> AsyncIterator[RedisStore]:
    """Open the Redis store described by ``config`` (checking that Redis answers), and
    close its connections on exit.

    Raises :class:`~oco_core.StoreUnavailableError` (naming the URL, password masked)
    when Redis cannot be reached; the caller may retry.
    """
    store = RedisStore(config)
    try:
        await store._start()
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
