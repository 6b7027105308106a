"""The Redis data store against the real Redis: what a callback can and cannot do with
exactly what ``provision`` handed it, checked by Redis itself through redis-py.

Redis's address comes from ``OCO_TEST_REDIS_URL`` (for example
``redis://127.0.0.1:6379/15``, an account allowed to manage ACL users). Each test uses
a user-name and key prefix of its own and deletes its users and keys afterwards.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import redis.exceptions
import trio
from oco_store_redis import (
    DENIED_COMMANDS,
    RedisDataStore,
    RedisDataStoreConfig,
    oco_datastore_types,
    open_redis_datastore,
)
from redis.backoff import NoBackoff
from redis.retry import Retry

from oco_core import StoreError, StoreUnavailableError
from oco_core.plugin import DataStoreAccess
from oco_core.testing import free_port
from oco_core.testing.pytest_plugin import server_unavailable
from oco_core.testing.store_contract import TcpProxy, unavailable_message


class Corner:
    """A test's own user-name and key prefixes, and an admin client to look with."""

    def __init__(self, url: str) -> None:
        tag = uuid.uuid4().hex[:10]
        self.url = url
        self.user_prefix = f"oco-test-{tag}-"
        self.key_prefix = f"oco-test:{tag}:"
        self.admin = redis.Redis.from_url(url, socket_timeout=5)
        self.clients: list[redis.Redis] = []

    def config(self, **extra: Any) -> RedisDataStoreConfig:
        """A provider config under this test's prefixes."""
        return RedisDataStoreConfig(url=self.url, user_prefix=self.user_prefix, key_prefix=self.key_prefix, **extra)

    def connect(self, access: DataStoreAccess) -> redis.Redis:
        """A callback's client, exactly from what it was handed; no silent reconnects, so
        that a closed connection shows."""
        client = redis.Redis.from_url(access.url, socket_timeout=5, retry=Retry(NoBackoff(), 0))
        self.clients.append(client)
        return client

    def cleanup(self) -> None:
        for client in self.clients:
            client.close()
        users: list[bytes | str] = self.admin.acl_users()
        for user in users:
            name = user.decode() if isinstance(user, bytes) else user
            if name.startswith(self.user_prefix):
                self.admin.acl_deluser(name)
        keys = list(self.admin.scan_iter(match=self.key_prefix + "*", count=1000))
        if keys:
            self.admin.delete(*keys)
        self.admin.close()


@pytest.fixture
def corner(redis_url: str) -> Iterator[Corner]:
    """This test's prefixes on the test Redis, emptied afterwards."""
    made = Corner(redis_url)
    yield made
    made.cleanup()


@pytest.fixture
async def provider(corner: Corner) -> AsyncIterator[RedisDataStore]:
    """An open provider under this test's prefixes."""
    async with open_redis_datastore(corner.config()) as opened:
        yield opened


def new_id() -> str:
    """A callback id no other test uses."""
    return f"cb-{uuid.uuid4().hex[:8]}"


def send(client: redis.Redis, *args: str) -> Any:
    """Send one command as it is (redis-py leaves ``execute_command`` unannotated)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


class Held:
    """One connection held open, as a long-running callback holds it. redis-py's pool
    silently reconnects a connection the server closed, so closing is observed here, on
    the connection itself."""

    def __init__(self, client: redis.Redis) -> None:
        self.connection = client.connection_pool.get_connection()
        assert self.alive()

    def alive(self) -> bool:
        """Whether the server still answers on this very connection."""
        try:
            self.connection.send_command("PING")  # type: ignore[no-untyped-call]  # untyped in redis-py
            reply = self.connection.read_response()
        except redis.exceptions.ConnectionError:
            return False
        return reply in (b"PONG", "PONG", True)


def refused(call: Any, *args: Any) -> str:
    """Run ``call(*args)``, which Redis must refuse for lack of permission; return why."""
    with pytest.raises(redis.exceptions.NoPermissionError) as info:
        call(*args)
    return str(info.value)


# ---- what a callback can do in its own corner ----


async def test_two_callbacks_each_use_a_sorted_set_of_their_own(corner: Corner, provider: RedisDataStore) -> None:
    a_id, b_id = new_id(), new_id()
    a_access = await provider.provision(a_id, "password-of-a")
    b_access = await provider.provision(b_id, "password-of-b")
    assert a_access.namespace == f"{corner.key_prefix}{a_id}:"
    assert b_access.namespace == f"{corner.key_prefix}{b_id}:"
    assert a_access.details["user"] == f"{corner.user_prefix}{a_id}"
    assert a_access.details["key_prefix"] == a_access.namespace
    assert a_access.details["password"] == "password-of-a"

    for access, scores in ((a_access, {"alice": 3.0, "bob": 1.0}), (b_access, {"carol": 2.0})):
        client = corner.connect(access)
        board = access.namespace + "leaderboard"
        assert client.zadd(board, scores) == len(scores)
        assert client.zrange(board, 0, -1, withscores=True) == sorted(
            ((name.encode(), score) for name, score in scores.items()), key=lambda pair: pair[1]
        )

    # Ordinary data commands work: transactions, Lua on its own keys, expiry, Pub/Sub.
    a = corner.connect(a_access)
    pipe = a.pipeline(transaction=True)
    pipe.incr(a_access.namespace + "counter")
    pipe.expire(a_access.namespace + "counter", 60)
    assert pipe.execute() == [1, True]
    assert a.eval("return redis.call('ZCARD', KEYS[1])", 1, a_access.namespace + "leaderboard") == 2
    assert a.publish(a_access.namespace + "events", "hello") == 0
    assert send(a, "SELECT", a_access.details["db"]) in (b"OK", True)
    assert a.memory_usage(a_access.namespace + "leaderboard")
    # The admin sees each callback's data under its prefix and nowhere else.
    assert corner.admin.zcard(a_access.namespace + "leaderboard") == 2
    assert corner.admin.zcard(b_access.namespace + "leaderboard") == 1


async def test_each_callback_is_refused_the_others_keys_and_keys_outside_any_prefix(
    corner: Corner, provider: RedisDataStore
) -> None:
    a_access = await provider.provision(new_id(), "password-of-a")
    b_access = await provider.provision(new_id(), "password-of-b")
    outside = corner.key_prefix + "outside"
    corner.admin.zadd(b_access.namespace + "board", {"carol": 2})
    corner.admin.set(outside, "admin's")
    for mine, theirs in ((a_access, b_access), (b_access, a_access)):
        client = corner.connect(mine)
        for key in (theirs.namespace + "board", outside, "unprefixed"):
            assert "no permissions" in refused(client.zrange, key, 0, -1)
            refused(client.get, key)
            refused(client.zadd, key, {"mallory": 9})
            refused(client.set, key, "overwritten")
            refused(client.delete, key)
            refused(client.rename, mine.namespace + "x", key)
            # A script touching a key it did not declare is checked too.
            with pytest.raises(redis.exceptions.ResponseError, match="can't access"):
                client.eval("return redis.call('GET', ARGV[1])", 0, key)
        refused(client.publish, theirs.namespace + "events", "spoofed")
        pubsub = client.pubsub()  # type: ignore[no-untyped-call]  # untyped in redis-py
        pubsub.subscribe(theirs.namespace + "events")  # the refusal is the reply to it
        with pytest.raises(redis.exceptions.NoPermissionError):
            pubsub.get_message(timeout=2)
        pubsub.close()
    assert corner.admin.zrange(b_access.namespace + "board", 0, -1) == [b"carol"]
    assert corner.admin.get(outside) == b"admin's"


# Each forbidden command, spelled so that it would fail harmlessly (bad option, missing
# target) if Redis ever let it through instead of refusing it: ACLs are checked before
# options are parsed.
FORBIDDEN: list[tuple[str, ...]] = [
    ("FLUSHALL", "BOGUS"),
    ("FLUSHDB", "BOGUS"),
    ("SWAPDB", "15", "bogus"),
    ("KEYS", "*"),
    ("SCAN", "0"),
    ("RANDOMKEY",),
    ("DBSIZE",),
    ("SELECT", "0"),
    ("MOVE", "{own}x", "14"),
    ("COPY", "{own}x", "{own}y", "DB", "14"),
    ("CONFIG", "GET", "maxmemory"),
    ("CONFIG", "SET", "no-such-parameter", "1"),
    ("DEBUG", "SLEEP", "0"),
    ("SCRIPT", "KILL"),
    ("SCRIPT", "FLUSH", "BOGUS"),
    ("SCRIPT", "DEBUG", "BOGUS"),
    ("FUNCTION", "LIST"),
    ("FUNCTION", "FLUSH", "BOGUS"),
    ("FUNCTION", "LOAD", "bogus"),
    ("FCALL", "nosuchfunction", "0"),
    ("FCALL_RO", "nosuchfunction", "0"),
    ("ACL", "WHOAMI"),
    ("ACL", "LIST"),
    ("ACL", "SETUSER", "{user}", "allkeys", "bogus-rule"),
    ("MODULE", "LIST"),
    ("MODULE", "LOAD", "/nonexistent/module.so"),
    ("SHUTDOWN", "BOGUS"),
    ("MIGRATE", "127.0.0.1", "1", "", "0", "1", "KEYS", "{own}x"),
    ("CLIENT", "KILL", "ID", "999999999"),
    ("CLIENT", "LIST"),
    ("CLIENT", "PAUSE", "bogus"),
    ("CLIENT", "TRACKING", "ON", "BCAST"),
    ("REPLICAOF", "NO", "BOGUS"),
    ("SLAVEOF", "NO", "BOGUS"),
    ("SAVE",),
    ("BGSAVE", "BOGUS"),
    ("BGREWRITEAOF",),
    ("LASTSAVE",),
    ("MONITOR",),
    ("INFO",),
    ("SLOWLOG", "GET"),
    ("LATENCY", "LATEST"),
    ("MEMORY", "STATS"),
    ("PUBSUB", "CHANNELS"),
    ("SORT", "{own}list", "BY", "nosort"),
    ("RESTORE", "{own}restored", "0", "bogus-payload"),
    ("ROLE",),
    ("FAILOVER", "BOGUS"),
    ("SORT_RO", "{own}list"),
    ("CLIENT", "UNPAUSE"),
    ("CLIENT", "UNBLOCK", "999999999"),
    ("CLIENT", "NO-EVICT", "BOGUS"),
    ("CLIENT", "CACHING", "BOGUS"),
]
# Refused commands that would do harm if let through; asked of the ACL (ACL DRYRUN) only.
FORBIDDEN_DRY: list[tuple[str, ...]] = [("SYNC",), ("PSYNC", "?", "-1")]


async def test_forbidden_commands_are_refused_by_redis(corner: Corner, provider: RedisDataStore) -> None:
    access = await provider.provision(new_id(), "password")
    own, user = access.namespace, access.details["user"]
    client = corner.connect(access)
    client.rpush(own + "list", "1")
    client.set(own + "x", "1")
    let_through: list[str] = []
    for command in FORBIDDEN:
        args = [arg.replace("{own}", own).replace("{user}", user) for arg in command]
        try:
            send(client, *args)
        except redis.exceptions.NoPermissionError:
            continue
        except redis.exceptions.ResponseError as e:
            # DEBUG and MODULE are off on a default Redis (enable-debug-command and
            # enable-module-command), which answers before the ACL is consulted: ask
            # the ACL itself whether it would have let them through.
            verdict = send(corner.admin, "ACL", "DRYRUN", user, *args)
            if verdict in (b"OK", "OK", True):
                let_through.append(f"{' '.join(command)} (answered {e})")
        else:
            let_through.append(" ".join(command))
    for command in FORBIDDEN_DRY:
        verdict = send(corner.admin, "ACL", "DRYRUN", user, *command)
        if verdict in (b"OK", "OK", True):
            let_through.append(" ".join(command))
    assert let_through == [], f"Redis let these through: {let_through}"
    # Every command the policy names is tried above.
    tried = {part for command in FORBIDDEN + FORBIDDEN_DRY for part in (command[0], "|".join(command[:2]))}
    assert [name for name in DENIED_COMMANDS if name.upper() not in tried] == []
    # The data is untouched, and still the callback's.
    assert client.get(own + "x") == b"1"


# ---- rotation, revocation, idempotence ----


async def test_rotation_refuses_the_old_password_and_closes_its_connections(
    corner: Corner, provider: RedisDataStore
) -> None:
    callback = new_id()
    old = await provider.provision(callback, "old-password")
    corner.connect(old).set(old.namespace + "k", "v")
    running = Held(corner.connect(old))

    new = await provider.provision(callback, "new-password", rotated=True)

    assert new.namespace == old.namespace
    assert new.url != old.url
    assert not running.alive()  # the connection opened with the old password was closed
    with pytest.raises(redis.exceptions.AuthenticationError):
        corner.connect(old).ping()
    assert corner.connect(new).get(new.namespace + "k") == b"v"


async def test_provisioning_again_with_the_same_password_changes_nothing(
    corner: Corner, provider: RedisDataStore
) -> None:
    callback = new_id()
    first = await provider.provision(callback, "kept-password")
    corner.connect(first).set(first.namespace + "k", "v")
    running = Held(corner.connect(first))
    rules_before = corner.admin.acl_getuser(first.details["user"])

    again = await provider.provision(callback, "kept-password")  # as after a bot restart

    assert again == first
    assert corner.admin.acl_getuser(first.details["user"]) == rules_before
    assert running.alive()  # its open connection survived
    assert corner.connect(again).get(first.namespace + "k") == b"v"


async def test_a_changed_password_without_rotated_still_leaves_only_the_new_one(
    corner: Corner, provider: RedisDataStore
) -> None:
    callback = new_id()
    old = await provider.provision(callback, "first")
    running = Held(corner.connect(old))
    new = await provider.provision(callback, "second")
    assert not running.alive()
    with pytest.raises(redis.exceptions.AuthenticationError):
        corner.connect(old).ping()
    assert corner.connect(new).ping()


async def test_a_user_switched_off_by_hand_loses_its_lingering_connections_when_provisioned(
    corner: Corner, provider: RedisDataStore
) -> None:
    callback = new_id()
    access = await provider.provision(callback, "password")
    lingering = Held(corner.connect(access))
    send(corner.admin, "ACL", "SETUSER", access.details["user"], "off")
    assert lingering.alive()  # Redis keeps connections of a user switched off

    again = await provider.provision(callback, "password")

    assert not lingering.alive()
    assert corner.connect(again).ping()


async def test_revoke_refuses_login_and_keeps_the_data(corner: Corner, provider: RedisDataStore) -> None:
    callback = new_id()
    access = await provider.provision(callback, "password")
    corner.connect(access).zadd(access.namespace + "board", {"alice": 1})
    running = Held(corner.connect(access))

    await provider.revoke(callback)

    assert not running.alive()  # Redis closed the deleted user's connection
    with pytest.raises(redis.exceptions.AuthenticationError):
        corner.connect(access).ping()
    assert corner.admin.acl_getuser(access.details["user"]) is None
    assert corner.admin.zrange(access.namespace + "board", 0, -1) == [b"alice"]
    await provider.revoke(callback)  # idempotent
    # Provisioning again gives the data back.
    again = await provider.provision(callback, "password")
    assert corner.connect(again).zrange(access.namespace + "board", 0, -1) == [b"alice"]


async def test_revoke_with_drop_data_deletes_every_key_of_the_callback_and_nothing_else(
    corner: Corner, provider: RedisDataStore
) -> None:
    callback, neighbour = new_id(), new_id()
    access = await provider.provision(callback, "password")
    other = await provider.provision(neighbour, "other")
    pipe = corner.admin.pipeline(transaction=False)
    for i in range(2500):  # more than one SCAN page
        pipe.set(f"{access.namespace}{i}", i)
    pipe.set(other.namespace + "keep", "1")
    pipe.execute()

    await provider.revoke(callback, drop_data=True)

    assert list(corner.admin.scan_iter(match=access.namespace + "*", count=1000)) == []
    assert corner.admin.get(other.namespace + "keep") == b"1"
    await provider.revoke(callback, drop_data=True)  # idempotent


async def test_a_password_with_url_characters_works(corner: Corner, provider: RedisDataStore) -> None:
    access = await provider.provision(new_id(), "p@ss:w/rd?#% é")
    assert corner.connect(access).set(access.namespace + "k", "v")


# ---- configuration ----


async def test_command_policy_can_be_tightened_and_loosened(corner: Corner) -> None:
    config = corner.config(deny_commands=("@scripting",), allow_commands=("info",))
    async with open_redis_datastore(config) as provider:
        access = await provider.provision(new_id(), "password")
    client = corner.connect(access)
    refused(client.eval, "return 1", 0)
    assert "redis_version" in client.info()


async def test_an_unknown_command_in_the_policy_fails_at_start(corner: Corner) -> None:
    with pytest.raises(StoreError, match="allow_commands"):
        async with open_redis_datastore(corner.config(allow_commands=("nosuchcommand",))):
            pass
    assert corner.admin.acl_getuser(corner.user_prefix + "-probe") is None


async def test_an_admin_without_acl_rights_is_told_what_it_needs(corner: Corner) -> None:
    weak = corner.user_prefix + "weak-admin"
    send(corner.admin, "ACL", "SETUSER", weak, "on", ">weak-secret", "~*", "+@all", "-acl")
    url = corner.url.replace("redis://", f"redis://{weak}:weak-secret@", 1)
    with pytest.raises(StoreError, match="ACL SETUSER") as info:
        async with open_redis_datastore(RedisDataStoreConfig(url=url, user_prefix=corner.user_prefix)):
            pass
    assert "weak-secret" not in str(info.value)
    assert f"{weak}:***@" in str(info.value)


async def test_a_wrong_admin_password_is_a_configuration_error_not_an_outage(corner: Corner) -> None:
    admin = corner.user_prefix + "admin"
    send(corner.admin, "ACL", "SETUSER", admin, "on", ">right-secret", "~*", "+@all")
    url = corner.url.replace("redis://", f"redis://{admin}:wrong-secret@", 1)
    with pytest.raises(StoreError, match="admin account's user name or password") as info:
        async with open_redis_datastore(RedisDataStoreConfig(url=url, user_prefix=corner.user_prefix)):
            pass
    assert not isinstance(info.value, StoreUnavailableError)
    assert "wrong-secret" not in str(info.value)


async def test_unreachable_redis_names_the_url_with_password_masked() -> None:
    config = RedisDataStoreConfig(url="redis://admin:s3cret@127.0.0.1:1/0", timeout=2)
    message = await unavailable_message(open_redis_datastore(config))
    assert "redis://admin:***@127.0.0.1:1/0" in message
    assert "s3cret" not in message


def test_registers_as_the_redis_datastore_type() -> None:
    [datastore_type] = oco_datastore_types()
    assert datastore_type.name == "redis"
    assert datastore_type.config_model is RedisDataStoreConfig
    assert datastore_type.package == "oco-store-redis"


def test_config_is_strict_and_masks_the_password() -> None:
    config = RedisDataStoreConfig(url="redis://admin:s3cret@cache:6380/2")
    assert "s3cret" not in repr(config)
    assert RedisDataStore(config).describe() == "redis://admin:***@cache:6380/2"
    with pytest.raises(ValueError, match="extra"):
        RedisDataStoreConfig.model_validate({"url": "redis://h", "prefix": "x"})
    with pytest.raises(ValueError, match="redis://"):
        RedisDataStoreConfig(url="postgresql://h/db")
    with pytest.raises(ValueError, match="glob"):
        RedisDataStoreConfig(url="redis://h", key_prefix="oco:*:")
    with pytest.raises(ValueError, match="callback_host"):
        RedisDataStoreConfig(url="unix:///run/redis.sock")
    with pytest.raises(ValueError, match="not a Redis command"):
        RedisDataStoreConfig(url="redis://h", allow_commands=("allkeys ~*",))
    with pytest.raises(StoreError, match="callback id"):
        RedisDataStore(config).key_prefix("*")


def test_callbacks_dial_callback_host_and_port_and_keep_tls() -> None:
    config = RedisDataStoreConfig(url="rediss://admin:s3cret@10.0.0.5:6380/3", callback_host="cache.example")
    access = RedisDataStore(config)._access("oco-cb-x", "pw", "oco:cb:x:")
    assert access.url == "rediss://oco-cb-x:pw@cache.example:6380/3"
    parsed = redis.Redis.from_url(access.url).connection_pool.connection_kwargs
    assert (parsed["host"], parsed["port"], parsed["db"], parsed["username"]) == ("cache.example", 6380, 3, "oco-cb-x")
    assert access.details["tls"] == "true"
    unix = RedisDataStoreConfig(url="unix:///run/redis.sock?db=1", callback_host="::1", callback_port=7000)
    assert RedisDataStore(unix)._access("u", "p", "x:").url == "redis://u:p@[::1]:7000/1"


async def test_redis_down_during_provision_is_unavailable_and_recovers(corner: Corner) -> None:
    real = urlsplit(corner.url)
    proxy = TcpProxy(real.hostname or "127.0.0.1", real.port or 6379)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        # The bot reaches Redis through the proxy; callbacks dial Redis directly.
        via_proxy = urlunsplit(real._replace(netloc=f"127.0.0.1:{proxy.port}"))
        config = RedisDataStoreConfig(
            url=via_proxy,
            user_prefix=corner.user_prefix,
            key_prefix=corner.key_prefix,
            callback_port=real.port or 6379,
            timeout=2,
        )
        async with open_redis_datastore(config) as provider:
            proxy.cut()
            with pytest.raises(StoreUnavailableError, match=f"127.0.0.1:{proxy.port}"):
                await provider.provision(new_id(), "password")
            proxy.restore()
            access = await provider.provision(new_id(), "password")
        nursery.cancel_scope.cancel()
    assert corner.connect(access).ping()


# ---- a restart of Redis (a private redis-server of the test's own) ----


class PrivateRedis:
    """A redis-server started for one test, which it may restart; with ``aclfile`` its
    users are kept in a file, as an operator would configure it."""

    def __init__(self, folder: Path, *, aclfile: bool) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            server_unavailable("redis-server", "not installed (needed to restart a Redis of the test's own)")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.args += ["--dir", str(folder)]
        self.aclfile = folder / "users.acl" if aclfile else None
        if self.aclfile is not None:
            self.aclfile.write_text("user default on nopass ~* &* +@all\n")
            self.args += ["--aclfile", str(self.aclfile)]
        self.process: trio.Process | None = None

    async def start(self) -> None:
        """Start the server and wait until it answers."""
        self.process = await trio.lowlevel.open_process(self.args, stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        try:
            with trio.fail_after(10):
                while True:
                    try:
                        if await trio.to_thread.run_sync(client.ping):
                            return
                    except redis.exceptions.ConnectionError:
                        await trio.sleep(0.05)
        finally:
            client.close()

    async def stop(self) -> None:
        """Kill the server (no chance to save anything) and wait until it is gone."""
        if self.process is not None:
            self.process.kill()
            await self.process.wait()
            self.process = None


@pytest.fixture
async def private_redis(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[PrivateRedis]:
    """A redis-server of this test's own, killed afterwards."""
    server = PrivateRedis(tmp_path, aclfile=request.param)
    try:
        await server.start()
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await server.stop()


@pytest.mark.parametrize("private_redis", [True], indirect=True)
async def test_with_an_aclfile_users_survive_a_restart_of_redis(private_redis: PrivateRedis) -> None:
    async with open_redis_datastore(RedisDataStoreConfig(url=private_redis.url)) as provider:
        access = await provider.provision(new_id(), "password")
    assert private_redis.aclfile is not None
    assert access.details["user"] in private_redis.aclfile.read_text()  # ACL SAVE wrote it
    await private_redis.stop()
    await private_redis.start()
    client = redis.Redis.from_url(access.url, socket_timeout=5)
    try:
        assert client.set(access.namespace + "k", "v")
        refused(client.get, "elsewhere")
    finally:
        client.close()


@pytest.mark.parametrize("private_redis", [False], indirect=True)
async def test_without_an_aclfile_a_restart_of_redis_loses_users_until_provisioned_again(
    private_redis: PrivateRedis,
) -> None:
    callback = new_id()
    async with open_redis_datastore(RedisDataStoreConfig(url=private_redis.url)) as provider:
        access = await provider.provision(callback, "password")
        await private_redis.stop()
        await private_redis.start()
        client = redis.Redis.from_url(access.url, socket_timeout=5)
        try:
            with pytest.raises(redis.exceptions.AuthenticationError):
                client.ping()
            # What the bot does with the kept password on the callback's next request
            # after it restarts: the same access, working again.
            assert await provider.provision(callback, "password") == access
            assert client.ping()
        finally:
            client.close()


async def test_a_user_it_did_not_make_is_never_reset_or_deleted(corner: Corner, provider: RedisDataStore) -> None:
    callback_id = new_id()
    user = provider.user_name(callback_id)
    corner.admin.acl_setuser(user, enabled=True, keys=["someone-else:*"], commands=["+get"], reset=True)
    try:
        with pytest.raises(StoreError, match="did not make"):
            await provider.provision(callback_id, "pw-" + uuid.uuid4().hex)
        with pytest.raises(StoreError, match="did not make"):
            await provider.revoke(callback_id, drop_data=True)
        untouched = corner.admin.acl_getuser(user)
        assert untouched is not None
        assert untouched["keys"] == ["~someone-else:*"]
    finally:
        corner.admin.acl_deluser(user)
