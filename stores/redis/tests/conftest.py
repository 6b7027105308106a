"""Fixtures shared by oco-store-redis's tests."""

from __future__ import annotations

import os

import pytest
import redis
import redis.exceptions

from oco_core.testing.pytest_plugin import server_unavailable

REDIS_ENV = "OCO_TEST_REDIS_URL"


@pytest.fixture
def redis_url() -> str:
    """The test Redis's URL (an account allowed to manage ACL users), or skip (fail in CI)
    when it is not configured or does not answer."""
    url = os.environ.get(REDIS_ENV, "")
    if not url:
        server_unavailable("Redis", f"set {REDIS_ENV}, e.g. redis://127.0.0.1:6379/15")
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as e:
        server_unavailable("Redis", str(e))
    finally:
        client.close()
    return url
