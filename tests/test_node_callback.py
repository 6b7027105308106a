"""The Node.js example callback (examples/node) end to end through a real `oco run`.

Its npm dependencies are installed with `npm ci` from the committed package-lock.json
into a copy of the example, and its .proto files are written by `oco proto --out`, as
its README says. Without node or npm the tests skip (fail where OCO_REQUIRE_SERVERS=1);
so does its notes test without the PostgreSQL at OCO_TEST_POSTGRES_URL.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio
from psycopg import sql

from oco_core.plugin import corner_name
from oco_core.testing import Lines, free_port, oco_cli, run_oco
from oco_core.testing.pytest_plugin import server_unavailable, server_url

pytestmark = pytest.mark.server("node")

SECRET = "node-callback-secret-0123456789"


async def test_launched_by_the_bot(node_example: Path, tmp_path: Path) -> None:
    config = f"""
adapters: [{{type: shell, user: alice}}]
store: {{url: "sqlite:///./oco.db"}}
grpc: {{listen: "127.0.0.1:0"}}
http: {{listen: "127.0.0.1:0", address_file: http.address}}
callbacks:
  - id: node
    command: ["node", "{node_example / "callback.js"}"]
    webhook_auth: {{bearer: "{SECRET}"}}
"""
    async with run_oco(config, tmp_path) as bot:
        await bot.write("oco ping")
        await bot.expect(r"^PONG from Node\.js$")
        await bot.write("hello node, how are you?")
        await bot.expect(r"^hello alice, from Node\.js v\d+")
        await bot.write("oco count")
        await bot.expect(r"^alice: node counter is 1$")
        await bot.write("oco: count 41")
        await bot.expect(r"^alice: node counter is 42$")
        await bot.write("oco help count")
        await bot.expect(r"^count \[n\] - adds n")
        await bot.expect(r"\[node-callback node\] connected to .*: 6 route\(s\) registered", stream="stderr")
        # A question (Message.question): the next line is the answer, and no route sees it.
        await bot.write("oco greet")
        await bot.expect(r"What is your name\?$")
        await bot.write("Ann")
        await bot.expect(r"^nice to meet you, Ann, from Node\.js$")

        # Its webhooks, over HTTP: one answered at once, one asynchronous and acknowledged.
        address = await bot.written("http.address")
        headers = {"authorization": f"Bearer {SECRET}"}
        async with httpx.AsyncClient(base_url=f"http://{address}/hooks/node", headers=headers, timeout=10) as http:
            answer = await http.post("/hello", json={"name": "alice"})
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"] == "application/json"
            assert re.fullmatch(r"hello alice, from Node\.js v[\d.]+", answer.json()["greeting"])
            answer = await http.post("/hello", content=b"{oops")
            assert answer.status_code == 400
            assert answer.text.startswith("not JSON: ")
            answer = await http.post("/count", content=b"8")
            assert answer.status_code == 202
            await bot.expect(r"\[node-callback node\] webhook count: added 8, counter is 50$", stream="stderr")
            refused = await http.post("/hello", json={}, headers={"authorization": "Bearer not-the-token"})
            assert refused.status_code == 401
        await bot.write("oco count")
        await bot.expect(r"^alice: node counter is 51$")
        # Acknowledged: soon nothing waits for it in the bot's store.
        with trio.fail_after(10):
            while True:
                waiting = await trio.to_thread.run_sync(
                    lambda: oco_cli("events", "--callback", "node", "--config", "oco.yaml", cwd=tmp_path)
                )
                assert waiting.returncode == 0, waiting.stderr
                if "webhook_request" not in waiting.stdout:
                    break
                await trio.sleep(0.1)


@asynccontextmanager
async def node_by_hand(example: Path, env: dict[str, str], stderr: Lines) -> AsyncIterator[trio.Process]:
    """The Node example started as an operator would, its stderr read into ``stderr``;
    killed on the way out if the block left it running."""
    process = await trio.lowlevel.open_process(["node", str(example / "callback.js")], env=env, stderr=subprocess.PIPE)
    async with trio.open_nursery() as nursery:
        assert process.stderr is not None
        nursery.start_soon(stderr.pump, process.stderr)
        try:
            yield process
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()


async def test_started_by_hand_reconnects_when_the_bot_restarts(node_example: Path, tmp_path: Path) -> None:
    port = free_port()
    config = f"""
adapters: [{{type: shell, user: alice}}]
store: {{url: "sqlite:///./oco.db"}}
grpc: {{listen: "127.0.0.1:{port}"}}
callbacks:
  - {{id: node, secret: "{SECRET}"}}
"""
    env = {**os.environ, "OCO_ADDRESS": f"127.0.0.1:{port}", "OCO_CALLBACK_ID": "node", "OCO_SECRET": SECRET}
    registered = r"connected to .*: 6 route\(s\) registered"
    stderr = Lines("the node callback's stderr")
    async with run_oco(config, tmp_path / "bot") as bot:
        async with node_by_hand(node_example, env, stderr) as callback:
            await stderr.wait_for(registered)
            await bot.write("oco count")
            await bot.expect(r"^alice: node counter is 1$")
            await bot.stop()
            await stderr.wait_for(r"Listen stream ended")

            # The same bot again, on the same port and with the same store.
            async with run_oco(config, tmp_path / "bot") as again:
                await stderr.wait_for(registered, count=2)
                await again.write("oco ping")
                await again.expect(r"^PONG from Node\.js$")
                await again.write("oco count")
                await again.expect(r"^alice: node counter is 2$")
            callback.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                assert await callback.wait() == 0


@pytest.fixture
def postgres_admin() -> Iterator[tuple[str, str, psycopg.Connection[tuple[Any, ...]]]]:
    """``(url, name_prefix, superuser connection)`` on the PostgreSQL at
    OCO_TEST_POSTGRES_URL, with a prefix of this test's own for the data store's roles and
    schemas; whatever the test leaves with that prefix is dropped afterwards."""
    url = server_url("postgresql")
    libpq = url.replace("postgresql+psycopg://", "postgresql://", 1)
    try:
        admin = psycopg.connect(libpq, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        server_unavailable("PostgreSQL", " ".join(str(exc).split()))
    prefix = f"oco_node_{uuid.uuid4().hex[:8]}_"
    try:
        yield url, prefix, admin
    finally:
        roles = admin.execute("SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)", [prefix]).fetchall()
        admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE starts_with(usename, %s)", [prefix]
        )
        for (role,) in roles:
            admin.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        admin.close()


async def test_notes_in_a_postgresql_schema_of_its_own(
    node_example: Path, tmp_path: Path, postgres_admin: tuple[str, str, psycopg.Connection[tuple[Any, ...]]]
) -> None:
    url, prefix, admin = postgres_admin
    config = f"""
adapters: [{{type: shell, user: alice}}]
store: {{url: "sqlite:///./oco.db"}}
grpc: {{listen: "127.0.0.1:0"}}
datastores: [{{type: postgresql, url: "{url}", name_prefix: {prefix}}}]
callbacks:
  - id: node
    command: ["node", "{node_example / "callback.js"}"]
    env: {{OCO_REQUIRES: postgresql}}
    requires: [postgresql]
"""
    async with run_oco(config, tmp_path) as bot:
        await bot.expect(r"\[node-callback node\] connected to .*: 6 route\(s\) registered", stream="stderr")
        await bot.write("oco note hello")
        await bot.expect(r"^alice: noted \(#1\)$")
        await bot.write("oco note from Node.js, twice")
        await bot.expect(r"^alice: noted \(#2\)$")
        await bot.write("oco notes")
        await bot.expect(r"^#1 hello \(shell/alice\)$")
        await bot.expect(r"^#2 from Node\.js, twice \(shell/alice\)$")
        await bot.expect(
            rf"PostgreSQL: schema {re.escape(corner_name('node', prefix))}, credentials generation 1", stream="stderr"
        )

    # The rows are in the callback's own schema, owned by its own role: what the bot
    # handed it through GetDataStore, not the admin's.
    schema = corner_name("node", prefix)
    owner = admin.execute(
        "SELECT tableowner FROM pg_tables WHERE schemaname = %s AND tablename = 'notes'", [schema]
    ).fetchone()
    assert owner == (schema,)
    rows = admin.execute(sql.SQL("SELECT author, body FROM {}.notes ORDER BY id").format(sql.Identifier(schema)))
    assert rows.fetchall() == [("shell/alice", "hello"), ("shell/alice", "from Node.js, twice")]

    # The operator removes the callback's role and schema with its data.
    revoked = await trio.to_thread.run_sync(
        lambda: oco_cli(
            "datastores", "revoke", "node", "postgresql", "--drop-data", "--config", "oco.yaml", cwd=tmp_path
        )
    )
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked the access of callback 'node' to postgresql and deleted its data" in revoked.stdout
    assert admin.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", [schema]).fetchone() is None
    assert admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [schema]).fetchone() is None


async def test_a_required_data_store_the_bot_lacks_stops_the_callback_naming_it(
    node_example: Path, tmp_path: Path
) -> None:
    port = free_port()
    config = f"""
adapters: [{{type: shell, user: alice}}]
store: {{url: "sqlite:///./oco.db"}}
grpc: {{listen: "127.0.0.1:{port}"}}
callbacks:
  - {{id: node, secret: "{SECRET}"}}
"""
    env = {**os.environ, "OCO_ADDRESS": f"127.0.0.1:{port}", "OCO_CALLBACK_ID": "node", "OCO_SECRET": SECRET}
    async with run_oco(config, tmp_path) as bot:
        # Without OCO_REQUIRES it runs, and its notes say what is missing.
        stderr = Lines("the node callback's stderr")
        async with node_by_hand(node_example, env, stderr) as plain:
            await stderr.wait_for(r"connected to .*: 6 route\(s\) registered")
            await bot.write("oco note hello")
            await bot.expect(r"^alice: notes need PostgreSQL, and this bot offers no postgresql data store")
            plain.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                assert await plain.wait() == 0
        # With it, the bot refuses the callback, which exits naming the data store.
        with trio.fail_after(30):
            done = await trio.run_process(
                ["node", str(node_example / "callback.js")],
                env={**env, "OCO_REQUIRES": "postgresql"},
                capture_stderr=True,
                check=False,
            )
    assert done.returncode == 1
    assert "FAILED_PRECONDITION): a data store this callback requires (OCO_REQUIRES), postgresql:" in (
        done.stderr.decode()
    )


async def test_after_a_rotation_it_asks_the_bot_again_and_keeps_its_notes(
    node_example: Path, tmp_path: Path, password_postgres: str
) -> None:
    # A cluster that checks passwords: on the machine's, which trusts loopback, the old
    # password would still log in and the callback would never need to ask again.
    prefix = f"oco_node_{uuid.uuid4().hex[:8]}_"
    config = f"""
adapters: [{{type: shell, user: alice}}]
store: {{url: "sqlite:///./oco.db"}}
grpc: {{listen: "127.0.0.1:0"}}
datastores: [{{type: postgresql, url: "{password_postgres}", name_prefix: {prefix}}}]
callbacks:
  - id: node
    command: ["node", "{node_example / "callback.js"}"]
    env: {{OCO_REQUIRES: postgresql}}
"""

    def oco(*args: str) -> subprocess.CompletedProcess[str]:
        return oco_cli("datastores", *args, "--config", "oco.yaml", cwd=tmp_path)

    try:
        async with run_oco(config, tmp_path) as bot:
            await bot.write("oco note before")
            await bot.expect(r"^alice: noted \(#1\)$")
            rotated = await trio.to_thread.run_sync(oco, "rotate", "node", "postgresql")
            assert rotated.returncode == 0, rotated.stderr
            await bot.write("oco note after")
            await bot.expect(r"^alice: noted \(#2\)$")
            await bot.expect(r"PostgreSQL refused the credentials \(28P01: password authentication", stream="stderr")
            await bot.expect(
                rf"PostgreSQL: schema {re.escape(corner_name('node', prefix))}, credentials generation 2",
                stream="stderr",
            )
            await bot.write("oco notes")
            await bot.expect(r"^#1 before \(shell/alice\)$")
            await bot.expect(r"^#2 after \(shell/alice\)$")
    finally:
        await trio.to_thread.run_sync(oco, "revoke", "node", "postgresql", "--drop-data")
