"""oco-store-redis: Redis for OCO, twice.

- the core store (``store: {type: redis, url: redis://...}``): the bot's users, rooms
  and every callback's key-value data;
- a specific data store (``datastores: [{type: redis, url: redis://admin@...}]``): an ACL
  user and a key prefix of its own for each callback that declares ``requires: ["redis"]``.

Both are registered through the ``oco`` entry-point group under the name ``redis``.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing
from contextlib import AbstractAsyncContextManager as _AsyncContext

from oco_core.plugin import DataStoreProvider as _DataStoreProvider
from oco_core.plugin import DataStoreType, StoreType, hookimpl
from oco_core.plugin import Store as _Store

from ._config import RedisDataStoreConfig as RedisDataStoreConfig
from ._config import RedisStoreConfig as RedisStoreConfig

if _typing.TYPE_CHECKING:
    from ._datastore import DENIED_COMMANDS as DENIED_COMMANDS
    from ._datastore import RedisDataStore as RedisDataStore
    from ._datastore import open_redis_datastore as open_redis_datastore
    from ._store import RedisStore as RedisStore
    from ._store import open_redis_store as open_redis_store

# redis-py takes a tenth of a second to import, and every `oco run` loads this plugin
# through its entry point: it waits until a bot opens a Redis store or data store (or
# someone asks for these names).
_LAZY = {
    "DENIED_COMMANDS": "._datastore",
    "RedisDataStore": "._datastore",
    "open_redis_datastore": "._datastore",
    "RedisStore": "._store",
    "open_redis_store": "._store",
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(_importlib.import_module(module, __name__), name)


def _open_store(config: RedisStoreConfig) -> _AsyncContext[_Store]:
    from ._store import open_redis_store

    return open_redis_store(config)


def _open_datastore(config: RedisDataStoreConfig) -> _AsyncContext[_DataStoreProvider]:
    from ._datastore import open_redis_datastore

    return open_redis_datastore(config)


__all__ = [
    "DENIED_COMMANDS",
    "RedisDataStore",
    "RedisDataStoreConfig",
    "RedisStore",
    "RedisStoreConfig",
    "oco_datastore_types",
    "oco_store_types",
    "open_redis_datastore",
    "open_redis_store",
]


@hookimpl
def oco_store_types() -> list[StoreType]:
    """The ``redis`` store type."""
    return [
        StoreType(
            name="redis",
            open=_open_store,
            config_model=RedisStoreConfig,
            package="oco-store-redis",
            description="Redis, keys under a configurable prefix; compare-and-set in Lua on the server",
        )
    ]


@hookimpl
def oco_datastore_types() -> list[DataStoreType]:
    """The ``redis`` data store: an ACL user and a key prefix per callback."""
    return [
        DataStoreType(
            name="redis",
            open=_open_datastore,
            config_model=RedisDataStoreConfig,
            package="oco-store-redis",
            description="Redis 7+, an ACL user per callback limited to its key prefix and a safe command set",
        )
    ]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
