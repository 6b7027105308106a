"""Fixtures shared by oco-store-redis's tests."""

from __future__ import annotations

import pytest
import redis
import redis.exceptions

from oco_core.testing.pytest_plugin import server_unavailable, server_url


@pytest.fixture
def redis_url() -> str:
    """The test Redis's URL (an account allowed to manage ACL users): ``OCO_TEST_REDIS_URL``,
    else the local default when it answers; skip (fail in CI) when there is none or it does
    not answer."""
    url = server_url("redis")
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as e:
        server_unavailable("Redis", str(e))
    finally:
        client.close()
    return url
