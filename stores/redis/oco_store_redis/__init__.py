"""oco-store-redis: the OCO core store on Redis (``store: {type: redis, url: redis://...}``).

Registered through the ``oco`` entry-point group as the ``redis`` store type.
"""

from __future__ import annotations

from oco_core.plugin import StoreType, hookimpl

from ._store import RedisStore as RedisStore
from ._store import RedisStoreConfig as RedisStoreConfig
from ._store import open_redis_store as open_redis_store

__all__ = ["RedisStore", "RedisStoreConfig", "oco_store_types", "open_redis_store"]


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
