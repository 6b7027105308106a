"""The Redis store against the store contract, on the real Redis.

Redis's address comes from ``OCO_TEST_REDIS_URL`` (for example
``redis://127.0.0.1:6379/15``); each test writes under a random key prefix of its own
and deletes its keys afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis
import trio
from oco_store_redis import RedisStore, RedisStoreConfig, oco_store_types, open_redis_store

from oco_core import StoreUnavailableError
from oco_core.plugin import mask_url
from oco_core.testing.pytest_plugin import server_unavailable
from oco_core.testing.store_contract import StoreContract, unavailable_message


def delete_prefix(url: str, prefix: str) -> None:
    """Delete every Redis key starting with ``prefix``."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own on the test Redis, emptied afterwards."""
    url = redis_url
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    await trio.to_thread.run_sync(delete_prefix, url, prefix)


class TestRedisStore(StoreContract):
    """The contract on the real Redis, under a key prefix of the test's own."""

    @pytest.fixture
    async def store(self, redis_url: str, redis_prefix: str, max_value_bytes: int) -> AsyncIterator[RedisStore]:
        config = RedisStoreConfig(url=redis_url, prefix=redis_prefix, max_value_bytes=max_value_bytes)
        try:
            async with open_redis_store(config) as store:
                yield store
        except StoreUnavailableError as e:
            server_unavailable("Redis", str(e))


def test_registers_as_the_redis_store_type() -> None:
    [store_type] = oco_store_types()
    assert store_type.name == "redis"
    assert store_type.config_model is RedisStoreConfig
    assert store_type.package == "oco-store-redis"


def test_config_is_strict() -> None:
    with pytest.raises(ValueError, match="extra"):
        RedisStoreConfig.model_validate({"url": "redis://h", "db": 1})
    with pytest.raises(ValueError, match="redis://"):
        RedisStoreConfig(url="http://h")
    with pytest.raises(ValueError, match="hash tags"):
        RedisStoreConfig(prefix="oco{x}:")


def test_password_is_masked() -> None:
    config = RedisStoreConfig(url="redis://bot:s3cret@redis.example:6380/2")
    assert "s3cret" not in repr(config)
    assert mask_url(config.url) == "redis://bot:***@redis.example:6380/2"
    assert mask_url("redis://:s3cret@h/0") == "redis://:***@h/0"
    assert mask_url("redis://h:6379/0") == "redis://h:6379/0"


async def test_unreachable_redis_names_the_url_with_password_masked() -> None:
    config = RedisStoreConfig(url="redis://:s3cret@127.0.0.1:1/0", connect_timeout=2)
    message = await unavailable_message(open_redis_store(config))
    assert "redis://:***@127.0.0.1:1/0" in message
    assert "s3cret" not in message


async def test_keys_live_under_the_prefix(redis_url: str, redis_prefix: str) -> None:
    url = redis_url
    async with open_redis_store(RedisStoreConfig(url=url, prefix=redis_prefix)) as store:
        await store.set("cb:a", "k", b"v")
        await store.set("bot", "k", b"v")
    client = redis.Redis.from_url(url)
    try:
        keys = sorted(client.scan_iter(match=redis_prefix + "*"))
    finally:
        client.close()
    assert keys == sorted(f"{redis_prefix}{{{ns}}}:{kind}".encode() for ns in ("cb:a", "bot") for kind in "dz")


async def test_two_prefixes_do_not_see_each_other(redis_url: str, redis_prefix: str) -> None:
    url = redis_url
    first = RedisStoreConfig(url=url, prefix=redis_prefix + "one:")
    second = RedisStoreConfig(url=url, prefix=redis_prefix + "two:")
    async with open_redis_store(first) as one, open_redis_store(second) as two:
        await one.set("ns", "k", b"1")
        assert await two.get("ns", "k") is None
        assert await two.list("ns") == []


async def test_usage_counts_keys_and_bytes(redis_url: str, redis_prefix: str) -> None:
    async with open_redis_store(RedisStoreConfig(url=redis_url, prefix=redis_prefix)) as store:
        assert await store.usage("cb:q") == (0, 0)
        await store.set("cb:q", "ab", b"12345")
        await store.set("cb:q", "é", b"x:y")
        await store.set("cb:q", "é", b"x:yz")  # version 2, so a longer version prefix is not counted
        assert await store.usage("cb:q") == (2, 2 + 5 + 2 + 4)
