"""The Redis data store end to end: a real bot hands SDK callbacks their own ACL users
and key prefixes, and ``oco datastores`` rotates and revokes them, checked by Redis
itself through redis-py. Redis's address comes from ``OCO_TEST_REDIS_URL``."""

from __future__ import annotations

import uuid
from functools import partial
from pathlib import Path

import pytest
import redis
import redis.exceptions
import trio

from oco_core import Callback
from oco_core.testing import oco_cli, open_bot, serving

ALPHA = "secret-alpha-0123456789abcdef"
BETA = "secret-beta-0123456789abcdefg"


def config(tmp_path: Path, url: str, tag: str) -> str:
    return f"""
adapters: [{{type: memory}}]
store: {{type: sql, url: "sqlite:///{tmp_path / "oco.db"}"}}
datastores: [{{type: redis, url: "{url}", user_prefix: "oco-test-{tag}-", key_prefix: "oco-test:{tag}:"}}]
callbacks:
  - {{id: alpha, secret: {ALPHA}, requires: [redis]}}
  - {{id: beta, secret: {BETA}}}
"""


def scores(url: str, key: str, member: str | None = None) -> list[bytes]:
    """Add ``member`` (if any) to the sorted set ``key`` through ``url``; its members."""
    with redis.Redis.from_url(url, socket_timeout=5) as client:
        if member is not None:
            client.zadd(key, {member: 1.0})
        return list(client.zrange(key, 0, -1))


def oco(tmp_path: Path, *args: str) -> tuple[int, str]:
    result = oco_cli(*args, "--config", str(tmp_path / "oco.yaml"), cwd=tmp_path)
    return result.returncode, result.stdout + result.stderr


async def test_callbacks_get_private_prefixes_and_rotation_locks_out_the_old_password(
    tmp_path: Path, redis_url: str
) -> None:
    url = redis_url
    tag = uuid.uuid4().hex[:8]
    (tmp_path / "oco.yaml").write_text(config(tmp_path, url, tag))
    try:
        async with open_bot(config(tmp_path, url, tag)) as running:
            alpha = Callback(id="alpha", secret=ALPHA, address=running.address, requires=["redis"])
            beta = Callback(id="beta", secret=BETA, address=running.address)
            async with serving(alpha, beta):
                mine = await alpha.datastore("redis")
                theirs = await beta.datastore("redis")
                assert mine.namespace == f"oco-test:{tag}:alpha:"
                board = mine.namespace + "board"
                assert await trio.to_thread.run_sync(scores, mine.url, board, "ada") == [b"ada"]
                with pytest.raises(redis.exceptions.NoPermissionError):
                    await trio.to_thread.run_sync(scores, theirs.url, board)  # beta reading alpha's key

                code, out = await trio.to_thread.run_sync(
                    partial(oco, tmp_path, "datastores", "rotate", "alpha", "redis")
                )
                assert code == 0, out
                with pytest.raises(redis.exceptions.AuthenticationError):
                    await trio.to_thread.run_sync(scores, mine.url, board)
                rotated = await alpha.datastore("redis")
                assert rotated.generation == 2
                assert await trio.to_thread.run_sync(scores, rotated.url, board) == [b"ada"]

                code, out = await trio.to_thread.run_sync(
                    partial(oco, tmp_path, "datastores", "revoke", "alpha", "redis")
                )
                assert code == 0, out
                with pytest.raises(redis.exceptions.AuthenticationError):
                    await trio.to_thread.run_sync(scores, rotated.url, board)
                assert await trio.to_thread.run_sync(scores, url, board) == [b"ada"]  # the data is kept
    finally:
        for name in ("alpha", "beta"):
            await trio.to_thread.run_sync(partial(oco, tmp_path, "datastores", "revoke", name, "redis", "--drop-data"))
