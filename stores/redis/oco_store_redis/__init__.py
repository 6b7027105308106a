"""oco-store-redis: Redis for OCO, twice.

- the core store (``store: {type: redis, url: redis://...}``): the bot's users, rooms
  and every callback's key-value data;
- a specific data store (``datastores: [{type: redis, url: redis://admin@...}]``): an ACL
  user and a key prefix of its own for each callback that declares ``requires: ["redis"]``.

Both are registered through the ``oco`` entry-point group under the name ``redis``.
"""

from __future__ import annotations

from oco_core.plugin import DataStoreType, StoreType, hookimpl

from ._datastore import DENIED_COMMANDS as DENIED_COMMANDS
from ._datastore import RedisDataStore as RedisDataStore
from ._datastore import RedisDataStoreConfig as RedisDataStoreConfig
from ._datastore import open_redis_datastore as open_redis_datastore
from ._store import RedisStore as RedisStore
from ._store import RedisStoreConfig as RedisStoreConfig
from ._store import open_redis_store as open_redis_store

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
            open=open_redis_store,
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
            open=open_redis_datastore,
            config_model=RedisDataStoreConfig,
            package="oco-store-redis",
            description="Redis 7+, an ACL user per callback limited to its key prefix and a safe command set",
        )
    ]
