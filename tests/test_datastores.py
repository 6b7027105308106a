"""Specific data stores through a real bot: a callback declares what it needs, the bot
hands it a corner of its own, keeps the credentials, and the operator lists, rotates and
revokes them with ``oco datastores``.

The built-in ``sqlite`` provider runs everywhere; PostgreSQL and Redis run end to end
when OCO_TEST_POSTGRES_URL and OCO_TEST_REDIS_URL name servers (CI requires them). Their
providers' isolation, checked by the databases themselves, is proven in
tests/test_datastore_postgresql.py and stores/redis/tests/test_datastore.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from oco_core import Callback, CallbackError, CapabilityError, DataStore, DataStoreUnavailableError
from oco_core._audit import AuditQuery, query
from oco_core._proto import datastores_pb2, datastores_pb2_grpc, robot_pb2, robot_pb2_grpc
from oco_core.testing import RunningBot, oco_cli, open_bot, serving

ALPHA = "secret-alpha-0123456789abcdef"
BETA = "secret-beta-0123456789abcdefg"
NARROW = "secret-narrow-0123456789abcd"


def config(tmp_path: Path, datastores: str = "") -> str:
    offered = datastores or f"[{{type: sqlite, directory: '{tmp_path / 'corners'}'}}]"
    return f"""
adapters: [{{type: memory}}]
store: {{type: sql, url: "sqlite:///{tmp_path / "oco.db"}"}}
datastores: {offered}
callbacks:
  - {{id: alpha, secret: {ALPHA}, requires: [sqlite]}}
  - {{id: beta, secret: {BETA}}}
  - {{id: narrow, secret: {NARROW}, capabilities: {{datastores: []}}}}
"""


def callback(running: RunningBot, name: str, secret: str, requires: tuple[str, ...] = ()) -> Callback:
    return Callback(id=name, secret=secret, address=running.address, requires=requires)


def write_and_read(access: DataStore, value: str) -> list[str]:
    with sqlite3.connect(access.details["path"]) as db:
        db.execute("create table if not exists notes (body text)")
        db.execute("insert into notes values (?)", (value,))
        return [row[0] for row in db.execute("select body from notes order by rowid")]


async def test_each_callback_gets_a_database_of_its_own_that_survives_a_restart(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        alpha = callback(running, "alpha", ALPHA, ("sqlite",))
        beta = callback(running, "beta", BETA)
        async with serving(alpha, beta):
            assert await alpha.offered_datastores() == ["sqlite"]
            mine = await alpha.datastore("sqlite")
            theirs = await beta.datastore("sqlite")
            assert (mine.type, mine.generation) == ("sqlite", 1)
            assert mine.url == f"sqlite:///{mine.details['path']}"
            assert mine.details["path"] != theirs.details["path"]
            assert Path(mine.details["path"]).parent == tmp_path / "corners"
            assert await trio.to_thread.run_sync(write_and_read, mine, "alpha's") == ["alpha's"]
            assert await trio.to_thread.run_sync(write_and_read, theirs, "beta's") == ["beta's"]
            # A database that forgot the corner (a Redis restarted without an ACL file)
            # gets it back when the callback asks with refresh=True.
            Path(theirs.details["path"]).unlink()
            assert await beta.datastore("sqlite", refresh=True) == theirs
            assert Path(theirs.details["path"]).exists()
            # A replica (another stream with the same id) gets the same corner.
            replica = callback(running, "alpha", ALPHA, ("sqlite",))
            async with serving(replica):
                assert await replica.datastore("sqlite") == mine
    async with open_bot(config(tmp_path)) as again:
        alpha = callback(again, "alpha", ALPHA, ("sqlite",))
        async with serving(alpha):
            kept = await alpha.datastore("sqlite")
    assert kept == mine
    assert await trio.to_thread.run_sync(write_and_read, kept, "after restart") == ["alpha's", "after restart"]


async def raw_failure(
    running: RunningBot, call: Callable[[grpc.Channel], object]
) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """Run a call with plain generated stubs that must fail: its code, details and trailers."""

    def work() -> tuple[grpc.StatusCode, str, dict[str, str]]:
        with grpc.insecure_channel(running.address) as channel:
            try:
                call(channel)
            except grpc.RpcError as exc:
                trailers: Any = exc.trailing_metadata()
                return exc.code(), exc.details() or "", dict(trailers or ())
        raise AssertionError("the call succeeded")

    return await trio.to_thread.run_sync(work)


async def test_a_callback_requiring_a_data_store_the_bot_lacks_is_refused(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        metadata = (("authorization", f"Bearer {BETA}"),)
        listen = robot_pb2.ListenRequest(requires=["mongodb"])
        code, details, trailers = await raw_failure(
            running, lambda channel: list(robot_pb2_grpc.RobotStub(channel).Listen(listen, metadata=metadata))
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "offers no data store 'mongodb' (it offers: sqlite)" in details
        assert "datastores: [{type: mongodb, ...}]" in details
        assert trailers["oco-error-type"] == "DataStoreUnavailableError"
        assert trailers["oco-error-datastore"] == "mongodb"
        # Through the SDK: the stream is refused for good, and so is a direct request.
        beta = callback(running, "beta", BETA, ("mongodb",))
        refused: list[Exception] = []
        try:
            with trio.fail_after(10):
                await beta.serve()
        except* CallbackError as group:
            refused.extend(group.exceptions)
        assert "offers no data store 'mongodb'" in str(refused[0])
        plain = callback(running, "beta", BETA)
        async with serving(plain):
            with pytest.raises(DataStoreUnavailableError) as caught:
                await plain.datastore("mongodb")
        assert caught.value.datastore == "mongodb"
        await running.bot.core.audit.flush()
        refusals = await query(running.bot.core.store, AuditQuery(kind="datastore", decision="denied"))
        assert [(r.callback, r.permission) for r in refusals] == [("beta", "mongodb")]  # logged once


async def test_a_callback_without_the_capability_is_refused_naming_it(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        narrow = callback(running, "narrow", NARROW)
        async with serving(narrow):
            with pytest.raises(CapabilityError) as caught:
                await narrow.datastore("sqlite")
        assert caught.value.capability == "datastores"
        assert "capabilities.datastores" in str(caught.value)
        metadata = (("authorization", f"Bearer {NARROW}"),)
        request = datastores_pb2.GetDataStoreRequest(type="sqlite")
        code, _, trailers = await raw_failure(
            running,
            lambda channel: datastores_pb2_grpc.DataStoresStub(channel).GetDataStore(request, metadata=metadata),
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert trailers["oco-error-capability"] == "datastores"


def oco(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    result = oco_cli(*args, "--config", str(tmp_path / "oco.yaml"), cwd=tmp_path)
    return result.returncode, result.stdout, result.stderr


async def test_the_operator_lists_rotates_and_revokes(tmp_path: Path) -> None:
    (tmp_path / "oco.yaml").write_text(config(tmp_path))
    run = partial(trio.to_thread.run_sync)
    async with open_bot(config(tmp_path)) as running:
        alpha = callback(running, "alpha", ALPHA, ("sqlite",))
        async with serving(alpha):
            first = await alpha.datastore("sqlite")
            await trio.to_thread.run_sync(write_and_read, first, "kept")

            code, out, err = await run(lambda: oco(tmp_path, "datastores", "list"))
            assert code == 0, err
            assert out.splitlines()[1].split()[:3] == ["sqlite", "alpha", "1"]
            assert f"offered: sqlite: SQLite files in {tmp_path / 'corners'}" in err

            code, out, err = await run(lambda: oco(tmp_path, "datastores", "rotate", "alpha", "sqlite"))
            assert code == 0, err
            assert "generation 2" in out
            rotated = await alpha.datastore("sqlite")
            assert rotated.generation == 2
            assert rotated.details["path"] == first.details["path"]  # same corner, same data

            code, out, err = await run(lambda: oco(tmp_path, "datastores", "revoke", "alpha", "sqlite"))
            assert code == 0, err
            assert "its data is kept" in out
            assert not Path(first.details["path"]).exists()
            aside = list((tmp_path / "corners" / "revoked").glob("*.db"))
            assert len(aside) == 1
            assert await trio.to_thread.run_sync(
                lambda: sqlite3.connect(aside[0]).execute("select body from notes").fetchall()
            ) == [("kept",)]

            code, out, err = await run(lambda: oco(tmp_path, "datastores", "list"))
            assert out.splitlines()[1].split()[:3] == ["sqlite", "alpha", "2"]
            assert out.splitlines()[1].split()[-1] == "revoked"
            # Asking again does not undo the revocation, refresh or not.
            for refresh in (False, True):
                with pytest.raises(CapabilityError, match="oco datastores grant alpha sqlite") as refused:
                    await alpha.datastore("sqlite", refresh=refresh)
                assert refused.value.capability == "datastores"
            assert not Path(first.details["path"]).exists()

            code, out, err = await run(lambda: oco(tmp_path, "datastores", "grant", "alpha", "sqlite"))
            assert code == 0, err
            assert "generation 3" in out  # generations only grow: new credentials are never old ones
            fresh = await alpha.datastore("sqlite")
            assert fresh.generation == 3
            assert await trio.to_thread.run_sync(write_and_read, fresh, "new") == ["new"]

            code, out, err = await run(lambda: oco(tmp_path, "datastores", "revoke", "alpha", "sqlite", "--drop-data"))
            assert code == 0, err
            assert not Path(fresh.details["path"]).exists()
            assert len(list((tmp_path / "corners" / "revoked").glob("*.db"))) == 1
        details = [r.detail for r in await query(running.bot.core.store, AuditQuery(kind="datastore"), limit=100)]
    for expected in ("provisioned", "rotated 2", "revoked", "granted 3", "revoked and dropped its data"):
        assert expected in details


async def test_check_config_refuses_a_requirement_the_bot_cannot_meet(tmp_path: Path) -> None:
    good = tmp_path / "oco.yaml"
    good.write_text(config(tmp_path))
    result = await trio.to_thread.run_sync(partial(oco_cli, "check-config", "--config", str(good), cwd=tmp_path))
    assert result.returncode == 0, result.stderr
    assert "callback 'alpha' requires sqlite: offered" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(config(tmp_path).replace("requires: [sqlite]", "requires: [sqlite, postgresql]"))
    result = await trio.to_thread.run_sync(partial(oco_cli, "check-config", "--config", str(bad), cwd=tmp_path))
    assert result.returncode == 3
    assert "callbacks[0].requires[1]" in result.stderr
    assert "offers no data store 'postgresql' (it offers: sqlite)" in result.stderr
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text(
        config(tmp_path).replace("capabilities: {datastores: []}", "requires: [sqlite], capabilities: {datastores: []}")
    )
    result = await trio.to_thread.run_sync(partial(oco_cli, "check-config", "--config", str(narrow), cwd=tmp_path))
    assert result.returncode == 3
    assert "capabilities.datastores" in result.stderr


async def test_an_unknown_data_store_type_says_how_to_get_it(tmp_path: Path) -> None:
    path = tmp_path / "oco.yaml"
    path.write_text(config(tmp_path, "[{type: couchdb}]").replace("requires: [sqlite]", "requires: []"))
    result = await trio.to_thread.run_sync(partial(oco_cli, "check-config", "--config", str(path), cwd=tmp_path))
    assert result.returncode == 3
    assert "datastores[0].type" in result.stderr
    assert "pip install oco-datastore-couchdb" in result.stderr


# ---- PostgreSQL and Redis, end to end through the bot ----


def pg_config(tmp_path: Path, admin_url: str) -> str:
    return config(tmp_path, f'[{{type: postgresql, url: "{admin_url}", connection_limit: 3}}]').replace(
        "requires: [sqlite]", "requires: [postgresql]"
    )


def pg_notes(url: str, note: str | None = None) -> list[str]:
    """Add ``note`` (if any) to the callback's own table through ``url``; all its notes."""
    import psycopg

    with psycopg.connect(url, connect_timeout=5, autocommit=True) as db:
        db.execute("create table if not exists notes (body text)")
        if note is not None:
            db.execute("insert into notes values (%s)", (note,))
        return [row[0] for row in db.execute("select body from notes order by body")]


async def test_postgresql_corners_are_private_and_rotation_locks_out_the_old_password(
    tmp_path: Path, password_postgres: str
) -> None:
    import psycopg

    (tmp_path / "oco.yaml").write_text(pg_config(tmp_path, password_postgres))
    async with open_bot(pg_config(tmp_path, password_postgres)) as running:
        alpha = callback(running, "alpha", ALPHA, ("postgresql",))
        beta = callback(running, "beta", BETA)
        async with serving(alpha, beta):
            mine = await alpha.datastore("postgresql")
            theirs = await beta.datastore("postgresql")
            assert mine.url.startswith("postgresql://")
            assert mine.namespace != theirs.namespace
            assert await trio.to_thread.run_sync(pg_notes, mine.url, "alpha's") == ["alpha's"]
            assert await trio.to_thread.run_sync(pg_notes, theirs.url, "beta's") == ["beta's"]

            def peek(url: str, schema: str) -> None:
                with psycopg.connect(url, connect_timeout=5) as db:
                    db.execute(f'select * from "{schema}".notes')

            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await trio.to_thread.run_sync(peek, theirs.url, mine.namespace)

            def hold(url: str) -> psycopg.Connection[Any]:
                return psycopg.connect(url, connect_timeout=5, autocommit=True)

            held = await trio.to_thread.run_sync(hold, mine.url)
            code, _, err = await trio.to_thread.run_sync(
                lambda: oco(tmp_path, "datastores", "rotate", "alpha", "postgresql")
            )
            assert code == 0, err
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                await trio.to_thread.run_sync(pg_notes, mine.url)
            with pytest.raises(psycopg.OperationalError):  # the session of the old password ended
                await trio.to_thread.run_sync(lambda: held.execute("select 1"))
            held.close()
            rotated = await alpha.datastore("postgresql")
            assert (rotated.generation, rotated.namespace) == (2, mine.namespace)
            assert await trio.to_thread.run_sync(pg_notes, rotated.url) == ["alpha's"]
            # Beta's credentials did not change.
            assert await trio.to_thread.run_sync(pg_notes, theirs.url) == ["beta's"]

            code, _, err = await trio.to_thread.run_sync(
                lambda: oco(tmp_path, "datastores", "revoke", "alpha", "postgresql")
            )
            assert code == 0, err
            with pytest.raises(psycopg.OperationalError):
                await trio.to_thread.run_sync(pg_notes, rotated.url)

            def as_admin() -> list[tuple[Any, ...]]:
                with psycopg.connect(password_postgres) as db:
                    return db.execute(f'select body from "{mine.namespace}".notes').fetchall()

            assert await trio.to_thread.run_sync(as_admin) == [("alpha's",)]
        for name in ("alpha", "beta"):
            await trio.to_thread.run_sync(
                partial(oco, tmp_path, "datastores", "revoke", name, "postgresql", "--drop-data")
            )
