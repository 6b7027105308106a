"""The Redis store behind a real bot, through the Storage RPC: acknowledged writes
survive the bot's SIGKILL, 50 callbacks on one counter, and a Redis outage
(StorageServiceContract). Redis's address comes from ``OCO_TEST_REDIS_URL``."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from oco_core.testing.store_contract import ServerOutageContract, StorageServiceContract


class TestRedisService(StorageServiceContract, ServerOutageContract):
    """Redis behind a real bot, under a key prefix of the test's own."""

    hang_options = "socket_timeout: 1, connect_timeout: 1"
    hang_within = 3.0

    @pytest.fixture
    def target(self, redis_url: str) -> Iterator[tuple[str, str]]:
        url = redis_url
        client = redis.Redis.from_url(url, socket_connect_timeout=3)
        prefix = f"test:{uuid.uuid4().hex[:12]}:"
        yield url, prefix
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()

    @pytest.fixture
    def store_section(self, target: tuple[str, str]) -> str:
        url, prefix = target
        return f'{{type: redis, url: "{url}", prefix: "{prefix}"}}'

    @pytest.fixture
    def store_server(self, target: tuple[str, str]) -> tuple[str, int, Callable[[str, int], str]]:
        url, prefix = target
        parts = urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]

        def section_at(host: str, port: int) -> str:
            netloc = (f"{credentials}@" if credentials else "") + f"{host}:{port}"
            moved = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
            return f'{{type: redis, url: "{moved}", prefix: "{prefix}"}}'

        return parts.hostname or "127.0.0.1", parts.port or 6379, section_at
