"""Secrets at rest: ``oco callbacks add|rotate|remove|list`` keeps only SHA-256 digests
in the core store, and a running bot accepts those secrets.

Everything runs for real: the ``oco`` command as a process, ``oco run`` as a process,
callbacks over gRPC through the Python SDK or generated stubs, SQLite files on disk
(and PostgreSQL when ``OCO_TEST_POSTGRES_URL`` is set).
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
import trio.testing
from pydantic import BaseModel, ConfigDict

from oco_core import Callback, Message, StoreUnavailableError
from oco_core._admin import open_configured_store
from oco_core._bridge import CallInfo, RpcAbort
from oco_core._cli import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, EXIT_STORE, EXIT_USAGE
from oco_core._config import parse_config
from oco_core._errors import CallbackError
from oco_core._plugins import load_plugins
from oco_core._proto import directory_pb2, directory_pb2_grpc, robot_pb2, robot_pb2_grpc, storage_pb2, storage_pb2_grpc
from oco_core._secrets import (
    CACHE_SECONDS,
    NAMESPACE,
    Authenticator,
    add_secret,
    check_store_secrets,
    registrations,
    rotate_secret,
)
from oco_core._store import Item, Store
from oco_core.testing import MemoryStore, free_port, oco_cli, run_oco

GENERATED = re.compile(r"^[A-Za-z0-9_-]{43}$")


async def aoco(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """:func:`~oco_core.testing.oco_cli` from a trio test, without blocking the bot's output pumps."""
    return await trio.to_thread.run_sync(lambda: oco_cli(*args, cwd=cwd))


def one_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The one ``oco: error:`` line of a run that failed with ``code``."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("oco: error: "), lines[0]
    return lines[0]


def added(result: subprocess.CompletedProcess[str]) -> str:
    """The secret ``oco callbacks add/rotate`` printed: alone, on stdout, once."""
    assert result.returncode == EXIT_OK, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, lines
    secret = lines[0]
    assert GENERATED.match(secret), secret
    assert secret not in result.stderr
    assert "OCO_SECRET" in result.stderr
    return secret


def bot_workdir(tmp_path: Path, config: str) -> tuple[Path, str]:
    """The bot's folder under ``tmp_path`` holding ``config`` as oco.yaml, and the path of
    that file, for ``oco callbacks --config`` before :func:`run_oco` starts the bot there."""
    workdir = tmp_path / "bot"
    workdir.mkdir()
    (workdir / "oco.yaml").write_text(config)
    return workdir, str(workdir / "oco.yaml")


def store_bytes(db: Path) -> bytes:
    """Everything SQLite keeps for ``db``: the file, its WAL and shared memory."""
    return b"".join(p.read_bytes() for p in sorted(db.parent.glob(db.name + "*")))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_yaml(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The ``store:`` line of a config: a SQLite file, or tables of this test's own on
    the test PostgreSQL (dropped afterwards)."""
    if request.param == "sqlite":
        yield f'store: {{url: "sqlite:///{tmp_path / "oco.db"}"}}\n'
        return
    url, prefix = request.getfixturevalue("postgres_tables")
    yield f'store: {{url: "{url}", table_prefix: "{prefix}"}}\n'


# -- the command ----------------------------------------------------------------------


def test_add_rotate_remove_list(tmp_path: Path, store_yaml: str) -> None:
    config = tmp_path / "oco.yaml"
    config.write_text(store_yaml + "callbacks:\n  - id: deploy\n  - id: waiting\n")
    c = str(config)

    listed = oco_cli("callbacks", "list", "--config", c, cwd=tmp_path)
    assert listed.returncode == EXIT_OK, listed.stderr
    assert re.search(r"^deploy\s+-\s+yes\s+no secret yet: oco callbacks add deploy$", listed.stdout, re.M)

    first = added(oco_cli("callbacks", "add", "deploy", "--config", c, cwd=tmp_path))
    error = one_error(oco_cli("callbacks", "add", "deploy", "--config", c, cwd=tmp_path), EXIT_ERROR)
    assert "already has a secret" in error
    assert "oco callbacks rotate deploy" in error

    roamer = oco_cli("callbacks", "add", "roamer", "--config", c, cwd=tmp_path)
    added(roamer)
    assert "default capabilities" in roamer.stderr  # not in the config: say what that means

    second = added(oco_cli("callbacks", "rotate", "deploy", "--config", c, cwd=tmp_path))
    assert second != first

    listed = oco_cli("callbacks", "list", "--config", c, cwd=tmp_path)
    assert listed.returncode == EXIT_OK, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert listed.stdout.split()[:4] == ["ID", "CREATED", "IN", "CONFIG"]
    assert set(rows) == {"deploy", "roamer", "waiting"}
    assert re.match(r"deploy\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+yes", rows["deploy"])
    assert re.match(r"roamer\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+no\s+default capabilities", rows["roamer"])
    for secret in (first, second):
        assert secret not in listed.stdout + listed.stderr
        assert hashlib.sha256(secret.encode()).hexdigest() not in listed.stdout + listed.stderr

    removed = oco_cli("callbacks", "remove", "roamer", "--config", c, cwd=tmp_path)
    assert removed.returncode == EXIT_OK, removed.stderr
    assert "removed the secret of callback 'roamer'" in removed.stdout
    assert "nothing to remove" in one_error(oco_cli("callbacks", "remove", "roamer", "--config", c, cwd=tmp_path), 1)
    rotated = oco_cli("callbacks", "rotate", "ghost", "--config", c, cwd=tmp_path)
    assert "oco callbacks add ghost" in one_error(rotated, 1)
    listed = oco_cli("callbacks", "list", "--config", c, cwd=tmp_path)
    assert "roamer" not in listed.stdout


def test_the_database_never_holds_a_secret(tmp_path: Path) -> None:
    db = tmp_path / "oco.db"
    config = tmp_path / "oco.yaml"
    config.write_text(f'store: {{url: "sqlite:///{db}"}}\ncallbacks: []\n')
    first = added(oco_cli("callbacks", "add", "deploy", "--config", str(config), cwd=tmp_path))
    second = added(oco_cli("callbacks", "rotate", "deploy", "--config", str(config), cwd=tmp_path))
    data = store_bytes(db)
    for secret in (first, second):
        assert secret.encode() not in data
    # The test reads the right file: the current secret's digest is there, the old one's gone.
    assert hashlib.sha256(second.encode()).hexdigest().encode() in data
    with sqlite3.connect(db) as conn:
        values = b"".join(bytes(row[0]) for row in conn.execute("SELECT value FROM oco_kv"))
    assert hashlib.sha256(first.encode()).hexdigest().encode() not in values


def test_defaults_without_a_config_use_the_bots_default_store(tmp_path: Path) -> None:
    """No --config: the same SQLite file under $XDG_DATA_HOME that `oco run` uses."""
    secret = added(oco_cli("callbacks", "add", "deploy", cwd=tmp_path))
    db = tmp_path / "xdg" / "oco" / "oco.db"
    assert db.exists()
    assert secret.encode() not in store_bytes(db)
    assert "deploy" in oco_cli("callbacks", "list", cwd=tmp_path).stdout


@pytest.mark.parametrize(
    ("entry", "key"),
    [('secret: "0123456789abcdef0123"', "secret"), ('command: ["python", "cb.py"]', "command")],
    ids=["secret", "command"],
)
def test_refuses_a_callback_whose_config_sets_its_secret(tmp_path: Path, entry: str, key: str) -> None:
    config = tmp_path / "oco.yaml"
    config.write_text(f'store: {{url: "sqlite:///{tmp_path / "oco.db"}"}}\ncallbacks:\n  - id: deploy\n    {entry}\n')
    for action in ("add", "rotate"):
        error = one_error(oco_cli("callbacks", action, "deploy", "--config", str(config), cwd=tmp_path), EXIT_CONFIG)
        assert f"{config}, line 4: callbacks[0].{key}" in error
        assert "wins over the store" in error
    assert "0123456789abcdef0123" not in error


@pytest.mark.parametrize("bad", ["", "_under", ".dot", "a/b", "x" * 65, "spa ce", "é"])
def test_refuses_an_invalid_id(tmp_path: Path, bad: str) -> None:
    result = oco_cli("callbacks", "add", bad, cwd=tmp_path)
    assert result.returncode == EXIT_USAGE
    assert result.stdout == ""
    assert "invalid callback id" in result.stderr
    assert "1-64 letters, digits" in result.stderr
    assert not (tmp_path / "xdg").exists(), "an invalid id must not even open the store"


def test_store_down_is_one_line_with_exit_5(tmp_path: Path) -> None:
    password = "pw-" + uuid.uuid4().hex
    config = tmp_path / "oco.yaml"
    port = free_port()  # nothing listens there: the store is down
    config.write_text(f'store: {{url: "postgresql+psycopg://oco:{password}@127.0.0.1:{port}/oco"}}\n')
    for args in (("add", "deploy"), ("list",)):
        error = one_error(oco_cli("callbacks", *args, "--config", str(config), cwd=tmp_path), EXIT_STORE)
        assert "unavailable" in error
        assert password not in error


# -- the running bot ------------------------------------------------------------------


def storage_call(address: str, secret: str) -> tuple[grpc.StatusCode, str]:
    """One Storage.Get with ``secret``, as any generated client makes it."""
    with grpc.insecure_channel(address) as channel:
        stub = storage_pb2_grpc.StorageStub(channel)
        try:
            stub.Get(storage_pb2.GetRequest(key="k"), metadata=(("authorization", f"Bearer {secret}"),), timeout=30)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""


async def refused_within(address: str, secret: str, limit: float) -> float:
    """Seconds until calls with ``secret`` fail with UNAUTHENTICATED (at most ``limit``)."""
    began = trio.current_time()
    while True:
        code, _ = await trio.to_thread.run_sync(storage_call, address, secret)
        waited = trio.current_time() - began
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return waited
        assert code == grpc.StatusCode.OK, code
        assert waited < limit, f"the old secret still worked after {waited:.1f} s"
        await trio.sleep(0.1)


@pytest.mark.slow
async def test_a_store_secret_connects_rotates_and_is_removed_while_the_bot_runs(
    tmp_path: Path, bot_config: Callable[[str], str]
) -> None:
    db = tmp_path / "oco.db"
    config = bot_config("callbacks:\n  - id: deploy\n    routes: [{pattern: '^deploy (\\w+)$', respond: true}]\n")
    workdir, c = bot_workdir(tmp_path, config)
    deploy = added(await aoco("callbacks", "add", "deploy", "--config", c, cwd=tmp_path))
    roamer = added(await aoco("callbacks", "add", "roamer", "--config", c, cwd=tmp_path))

    async with run_oco(config, workdir) as bot:
        # `roamer` is only in the store: it gets default capabilities (storage, directory, ...).
        cb = Callback(id="roamer", secret=roamer, address=bot.address)

        @cb.respond(r"^roam$")
        async def roam(message: Message) -> None:
            await cb.storage.set("seen", message.user.id)
            users = await cb.directory.list_users()
            await message.reply(f"roamed; stored {await cb.storage.get('seen')!r}; {len(users)} user(s) known")

        # `deploy` is in the config (its routes too) with its secret in the store.
        dep = Callback(id="deploy", secret=deploy, address=bot.address)

        @dep.respond(r"^deploy (\w+)$", id="deploy_app")
        async def deploy_app(message: Message) -> None:
            await message.reply(f"deploying {message.groups[1]}")

        async with trio.open_nursery() as nursery:
            await nursery.start(cb.serve)
            await nursery.start(dep.serve)
            await bot.write("oco roam")
            await bot.expect(r"roamed; stored b'shell/alice'; 1 user\(s\) known")
            await bot.write("oco deploy web")
            await bot.expect("deploying web")
            nursery.cancel_scope.cancel()

        rotated = added(await aoco("callbacks", "rotate", "roamer", "--config", c, cwd=tmp_path))
        # The new secret works at once (a store lookup); the old one within the cache time.
        assert await trio.to_thread.run_sync(storage_call, bot.address, rotated) == (grpc.StatusCode.OK, "")
        waited = await refused_within(bot.address, roamer, CACHE_SECONDS + 3)
        assert waited <= CACHE_SECONDS + 3
        code, details = await trio.to_thread.run_sync(storage_call, bot.address, roamer)
        assert (code, "unknown secret" in details) == (grpc.StatusCode.UNAUTHENTICATED, True)

        # The SDK with the old secret is told, not left retrying.
        stale = Callback(id="roamer", secret=roamer, address=bot.address)
        refused: list[BaseException] = []
        try:
            await stale.serve()
        except* CallbackError as group:  # the SDK's nurseries wrap it
            refused.extend(group.exceptions)
        assert refused, "the SDK kept retrying with a refused secret"
        assert "the bot refused this callback: unknown secret" in str(refused[0])

        removed = await aoco("callbacks", "remove", "roamer", "--config", c, cwd=tmp_path)
        assert removed.returncode == EXIT_OK, removed.stderr
        await refused_within(bot.address, rotated, CACHE_SECONDS + 3)
        assert await trio.to_thread.run_sync(storage_call, bot.address, deploy) == (grpc.StatusCode.OK, "")
        assert await bot.stop() == EXIT_OK

    output = "\n".join(bot.stdout_lines + bot.stderr_lines)
    data = store_bytes(db)
    for secret in (deploy, roamer, rotated):
        assert secret not in output
        assert secret.encode() not in data


def listen_until_ended(
    address: str, secret: str, opened: trio.Event, ended: list[tuple[grpc.StatusCode, str, float]]
) -> None:
    """Open a Listen stream (``opened`` is set once the bot has answered it) and wait for
    it to end: its status, details, and when. Runs in a thread started by trio."""
    with grpc.insecure_channel(address) as channel:
        stream = robot_pb2_grpc.RobotStub(channel).Listen(
            robot_pb2.ListenRequest(routes=[robot_pb2.Route(id="x", pattern="^x$")]),
            metadata=(("authorization", f"Bearer {secret}"),),
            timeout=60,
        )
        try:
            stream.initial_metadata()  # the bot's answer: routes accepted, or the stream refused
            trio.from_thread.run_sync(opened.set)
            for _ in stream:
                pass
        except grpc.RpcError as exc:
            ended.append((exc.code(), exc.details() or "", time.monotonic()))


@pytest.mark.slow
async def test_an_open_listen_stream_ends_when_its_secret_is_rotated(
    tmp_path: Path, bot_config: Callable[[str], str]
) -> None:
    config = bot_config("callbacks: []\n")
    workdir, c = bot_workdir(tmp_path, config)
    secret = added(await aoco("callbacks", "add", "roamer", "--config", c, cwd=tmp_path))
    async with run_oco(config, workdir) as bot:
        ended: list[tuple[grpc.StatusCode, str, float]] = []
        opened = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, listen_until_ended, bot.address, secret, opened, ended)
            with trio.fail_after(30):
                await opened.wait()
            assert not ended, ended  # the stream is open
            rotated_at = time.monotonic()
            added(await aoco("callbacks", "rotate", "roamer", "--config", c, cwd=tmp_path))
        code, details, when = ended[0]
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "no longer valid" in details
        assert when - rotated_at <= 2 * CACHE_SECONDS + 3


@pytest.mark.slow
async def test_the_config_wins_over_a_store_secret_for_the_same_id(
    tmp_path: Path, bot_config: Callable[[str], str]
) -> None:
    """A store secret left behind for a callback the config now gives a secret is refused."""
    configured = "configured-" + uuid.uuid4().hex
    config = bot_config(f'callbacks:\n  - id: deploy\n    secret: "{configured}"\n')
    loaded = parse_config(config)
    async with open_configured_store(loaded, load_plugins()) as store:
        leftover = await add_secret(store, "deploy")  # as if the config changed after `oco callbacks add`
        warnings = await check_store_secrets(store, loaded.config.callbacks)
    assert len(warnings) == 1
    assert "config sets its secret" in warnings[0]
    assert "oco callbacks remove deploy" in warnings[0]
    async with run_oco(config, tmp_path / "bot") as bot:
        code, details = await trio.to_thread.run_sync(storage_call, bot.address, leftover)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "configuration wins" in details
        assert await trio.to_thread.run_sync(storage_call, bot.address, configured) == (grpc.StatusCode.OK, "")
    assert leftover not in "\n".join(bot.stdout_lines + bot.stderr_lines)


async def test_a_store_that_fails_makes_calls_unavailable_not_crash() -> None:
    """A bot in this process on a store that can be taken down: a real gRPC client whose
    secret must be looked up gets UNAVAILABLE saying why, the bot goes on, and the same
    secret works once the store is back."""
    from oco_core._plugins import Plugins
    from oco_core._store import StoreType
    from oco_core.testing import open_bot

    store = CountingStore()
    secret = await add_secret(store, "roamer")

    class NoOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")

    @asynccontextmanager
    async def open_flaky(_: NoOptions) -> AsyncIterator[Store]:
        yield store

    installed = load_plugins()
    plugins = Plugins(installed.adapters, {**installed.stores, "flaky": StoreType("flaky", open_flaky, NoOptions)})
    async with open_bot(
        "adapters: [{type: memory}]\nstore: {type: flaky}\ncallbacks: []\n", plugins=plugins
    ) as running:
        store.down = StoreUnavailableError("store database sqlite:///oco.db is unavailable: disk I/O error")
        code, details = await trio.to_thread.run_sync(storage_call, running.address, secret)
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert "cannot check secrets now" in details
        assert "disk I/O error" in details
        store.down = None
        assert await trio.to_thread.run_sync(storage_call, running.address, secret) == (grpc.StatusCode.OK, "")


# -- the pieces, in this process ------------------------------------------------------


def info(secret: str) -> CallInfo:
    """A call carrying ``secret``."""
    return CallInfo({"authorization": f"Bearer {secret}"}, "ipv4:127.0.0.1:1")


class CountingStore(MemoryStore):
    """A MemoryStore that counts reads, and fails them while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.down: Exception | None = None

    async def get(self, namespace: str, key: str) -> Item | None:
        self.reads += 1
        if self.down is not None:
            raise self.down
        return await super().get(namespace, key)


async def refusal(auth: Authenticator, secret: str) -> RpcAbort:
    with pytest.raises(RpcAbort) as caught:
        await auth.identify(info(secret))
    return caught.value


async def test_cache_holds_a_positive_answer_for_cache_seconds(autojump_clock: trio.testing.MockClock) -> None:
    store = CountingStore()
    old = await add_secret(store, "roamer")
    auth = Authenticator({"fixed": "f" * 20, "waiting": ""}, store)
    assert await auth.identify(info(old)) == "roamer"
    reads = store.reads
    assert await auth.identify(info(old)) == "roamer"
    assert store.reads == reads, "a second call within the cache time reads nothing"
    new = await rotate_secret(store, "roamer")
    assert await auth.identify(info(new)) == "roamer"
    await trio.sleep(CACHE_SECONDS - 0.5)
    assert await auth.identify(info(old)) == "roamer"  # still cached: documented
    await trio.sleep(1)
    assert (await refusal(auth, old)).code == grpc.StatusCode.UNAUTHENTICATED


async def test_junk_and_configured_secrets_read_nothing() -> None:
    store = CountingStore()
    auth = Authenticator({"fixed": "f" * 20}, store)
    assert await auth.identify(info("f" * 20)) == "fixed"
    for junk in ("wrong", "x" * 42, "x" * 44, "x" * 42 + "!", "f" * 21):
        assert (await refusal(auth, junk)).code == grpc.StatusCode.UNAUTHENTICATED
    assert (await refusal(auth, "A" * 43)).code == grpc.StatusCode.UNAUTHENTICATED  # looked up, not found
    assert store.reads == 1


@pytest.mark.parametrize(
    "failure", [StoreUnavailableError("database gone"), RuntimeError("a plugin's own")], ids=["store", "other"]
)
async def test_a_failing_store_answers_unavailable(failure: Exception) -> None:
    store = CountingStore()
    secret = await add_secret(store, "roamer")
    auth = Authenticator({}, store)
    store.down = failure
    refused = await refusal(auth, secret)
    assert refused.code == grpc.StatusCode.UNAVAILABLE
    assert "cannot check secrets now" in refused.details
    assert secret not in refused.details
    store.down = None
    assert await auth.identify(info(secret)) == "roamer"


async def test_a_half_done_rotation_never_leaves_the_old_secret_working() -> None:
    """The digest index says yes, the callback's record names another digest: refused."""
    store = MemoryStore()
    old = await add_secret(store, "roamer")
    old_item = await store.get(NAMESPACE, "callback/roamer")
    assert old_item is not None
    await rotate_secret(store, "roamer")
    # Put the old index entry back, as a crash before its deletion would leave it.
    digest = hashlib.sha256(old.encode()).hexdigest()
    await store.set(NAMESPACE, f"digest/{digest}", b'{"callback_id": "roamer", "created": 0}')
    assert (await refusal(Authenticator({}, store), old)).code == grpc.StatusCode.UNAUTHENTICATED


async def test_check_store_secrets_names_each_missing_id() -> None:
    loaded = parse_config(
        'callbacks:\n  - id: ready\n  - id: missing\n  - id: launched\n    command: ["true"]\n  - id: other\n'
    )
    store = MemoryStore()
    await add_secret(store, "ready")
    warnings = await check_store_secrets(store, loaded.config.callbacks)
    assert len(warnings) == 2
    assert "'missing'" in warnings[0]
    assert "oco callbacks add missing" in warnings[0]
    assert "oco callbacks add other" in warnings[1]
    assert [r.callback_id for r in await registrations(store)] == ["ready"]

    class Down(MemoryStore):
        async def list(self, *args: Any, **kwargs: Any) -> list[Item]:
            raise StoreUnavailableError("database gone")

    assert await check_store_secrets(Down(), loaded.config.callbacks) == [
        "could not check the callback secrets in the store: database gone"
    ]


async def test_directory_call_with_a_store_secret(tmp_path: Path) -> None:
    """A generated client (no SDK) with a store secret: Directory works with default
    capabilities, in a bot in this process opened on the same store file."""
    from oco_core.testing import open_bot

    text = f'adapters: [{{type: memory}}]\nstore: {{url: "sqlite:///{tmp_path / "oco.db"}"}}\ncallbacks: []\n'
    async with open_configured_store(parse_config(text), load_plugins()) as store:
        secret = await add_secret(store, "roamer")
    async with open_bot(text) as running:
        await running.adapter.inject("hello")

        def rooms() -> list[str]:
            with grpc.insecure_channel(running.address) as channel:
                stub = directory_pb2_grpc.DirectoryStub(channel)
                reply = stub.ListRooms(
                    directory_pb2.ListRoomsRequest(), metadata=(("authorization", f"Bearer {secret}"),), timeout=30
                )
                return [r.id for r in reply.rooms]

        with trio.fail_after(10):
            while not (found := await trio.to_thread.run_sync(rooms)):
                await trio.sleep(0.05)
        assert found == ["memory/general"]
