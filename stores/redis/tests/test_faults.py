"""The Redis store on a Redis that stops answering: every call fails as unavailable
within socket_timeout instead of hanging, through the store and through a real bot's
Storage RPC, and the store heals by itself when Redis answers again.

Redis is the real one (``OCO_TEST_REDIS_URL``) behind a :class:`TcpProxy` of the test's
own, frozen: connections are accepted and their bytes read, nothing is answered (a hung
Redis, or a network dropping packets), which TCP keepalives cannot catch."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import pytest
import redis
import trio
from oco_store_redis import RedisStoreConfig, open_redis_store

from oco_core import StoreUnavailableError
from oco_core.testing._proxy import TcpProxy

#: The timeout the tests configure, short so that the tests are.
TIMEOUT = 1.0
#: What a call may take past its timeout on a busy machine before the test calls it a hang.
SLACK = 2.0


@asynccontextmanager
async def proxied(url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    """A running proxy in front of the Redis at ``url``, and the URL through it."""
    real = urlsplit(url)
    proxy = TcpProxy(real.hostname or "127.0.0.1", real.port or 6379)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        credentials = real.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{proxy.port}" if credentials else f"127.0.0.1:{proxy.port}"
        yield proxy, real._replace(netloc=netloc).geturl()
        nursery.cancel_scope.cancel()


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"faults-{uuid.uuid4().hex[:8]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
    finally:
        client.close()


async def timed_failure(call: Awaitable[object]) -> tuple[float, str]:
    """Seconds until the awaitable ``call`` raised StoreUnavailableError, and its message."""
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError) as caught:
        await call
    return time.monotonic() - start, str(caught.value)


async def test_calls_to_a_frozen_redis_fail_as_unavailable_within_the_timeout(redis_url: str, prefix: str) -> None:
    async with proxied(redis_url) as (proxy, through):
        config = RedisStoreConfig(url=through, prefix=prefix, socket_timeout=TIMEOUT, connect_timeout=TIMEOUT)
        async with open_redis_store(config) as store:
            assert await store.set("ns", "k", b"before") == 1
            proxy.freeze()

            took, message = await timed_failure(store.get("ns", "k"))
            assert TIMEOUT <= took < TIMEOUT + SLACK, took
            assert f"127.0.0.1:{proxy.port}" in message

            # Many calls at once, each on its own connection: all fail within the timeout.
            ends: list[float] = []

            async def one() -> None:
                ends.append((await timed_failure(store.set("ns", "k", b"during")))[0])

            async with trio.open_nursery() as nursery:
                for _ in range(config.max_connections):
                    nursery.start_soon(one)
            assert len(ends) == config.max_connections
            assert max(ends) < TIMEOUT + SLACK, sorted(ends)

            proxy.restore()
            with trio.fail_after(30):
                while True:
                    try:
                        item = await store.get("ns", "k")
                        break
                    except StoreUnavailableError:
                        await trio.sleep(0.1)
            assert item is not None
            # A timed-out write may have happened (held bytes reach Redis once restored).
            assert item.value in (b"before", b"during")
