"""Small fixtures shared by oco-core's end-to-end tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from oco_core.testing.pytest_plugin import server_unavailable, server_url, server_used

#: The bundled example callback, as a config's `command:` list (YAML flow style).
EXAMPLE_COMMAND = f'["{sys.executable}", "-m", "oco_core.examples.ping"]'
#: The Node.js example callback's sources.
NODE_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"


@pytest.fixture
def bot_config(tmp_path: Path) -> Callable[[str], str]:
    """Make a config for ``run_oco``: SQLite in ``tmp_path``, gRPC on a free port, the shell
    adapter with the user ``alice`` (so mentions are known), plus the YAML given."""

    def make(extra: str = "") -> str:
        return (
            f'store: {{url: "sqlite:///{tmp_path / "oco.db"}"}}\n'
            'grpc: {listen: "127.0.0.1:0"}\n'
            "adapters: [{type: shell, user: alice}]\n" + extra
        )

    return make


@pytest.fixture
def example_command() -> str:
    """The bundled example callback's command, as YAML."""
    return EXAMPLE_COMMAND


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's: the pid was reused
        return True
    try:  # a zombie has exited; only its parent has not collected the exit code yet
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


@pytest.fixture
def process_running() -> Callable[[int], bool]:
    """Whether the process ``pid`` is still running (a zombie counts as ended)."""
    return _running


@pytest.fixture(scope="session")
def node_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of examples/node with its dependencies installed (`npm ci`, once per test
    run) and its .proto files written; without node or npm the test is skipped (a failure
    where OCO_REQUIRE_SERVERS=1)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        server_unavailable("node", "the Node.js example needs `node` and `npm` on PATH (Node.js 18 or later)")
    server_used("node", node)
    workdir = tmp_path_factory.mktemp("node-example")
    for name in ("package.json", "package-lock.json", "callback.js"):
        shutil.copy(NODE_EXAMPLE / name, workdir / name)
    installed = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if installed.returncode != 0:
        server_unavailable("npm registry", f"`npm ci` failed: {installed.stderr[-2000:]}")
    # The example loads the files `oco proto --out` writes (build/proto beside it by default).
    subprocess.run([sys.executable, "-m", "oco_core", "proto", "--out", str(workdir / "build" / "proto")], check=True)
    return workdir


@pytest.fixture
def postgres_tables() -> Iterator[tuple[str, str]]:
    """``(url, table_prefix)``: tables of this test's own on the PostgreSQL at
    ``OCO_TEST_POSTGRES_URL`` (else the local default, when it answers), dropped afterwards;
    skipped (a failure where OCO_REQUIRE_SERVERS=1) when there is none or it does not answer."""
    import sqlalchemy as sa

    from oco_core._sql_store import SqlStoreConfig

    url = server_url("postgresql")
    engine = sa.create_engine(SqlStoreConfig(url=url).sqlalchemy_url(), connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as e:
        server_unavailable("PostgreSQL", " ".join(str(e.orig).split()))
    finally:
        engine.dispose()
    prefix = f"t{uuid.uuid4().hex[:12]}_"
    yield url, prefix
    engine = sa.create_engine(SqlStoreConfig(url=url).sqlalchemy_url())
    try:
        with engine.begin() as conn:
            for name in sa.inspect(conn).get_table_names():
                if name.startswith(prefix):
                    conn.execute(sa.text(f'DROP TABLE "{name}"'))
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def password_postgres() -> Iterator[str]:
    """A PostgreSQL cluster of the test session's own that checks passwords (SCRAM) for
    every connection, unlike the machine's, which trusts loopback: what proves that
    rotated or revoked credentials stop working. Its URL names a superuser with a
    password. Built with the machine's initdb (the PostgreSQL server package), run as the
    ``postgres`` account when the tests run as root, since PostgreSQL refuses root."""
    from oco_core.testing import free_port

    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    # Debian's server binaries, newest first; else whatever initdb is on PATH.
    found = str(binaries[-1]) if binaries else shutil.which("initdb")
    if found is None:
        server_unavailable("PostgreSQL (initdb)", "install the PostgreSQL server package (apt-get install postgresql)")
    bindir = Path(found).parent
    server_used("initdb", str(bindir))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    # Not under pytest's temporary folder: the postgres account cannot enter root's.
    workdir = Path(tempfile.mkdtemp(prefix="oco-password-postgres-"))
    data = workdir / "data"
    password = uuid.uuid4().hex
    (workdir / "pw").write_text(password + "\n")
    if as_postgres:
        shutil.chown(workdir, "postgres")
        shutil.chown(workdir / "pw", "postgres")
    initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "oco_admin", "--auth=scram-sha-256"]
    subprocess.run([*as_postgres, *initdb, f"--pwfile={workdir / 'pw'}"], check=True, capture_output=True, timeout=120)
    port = free_port()
    options = ["-p", str(port), "-k", str(workdir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]
    log = (workdir / "server.log").open("w")
    server = subprocess.Popen(
        [*as_postgres, str(bindir / "postgres"), "-D", str(data), *options], stdout=subprocess.DEVNULL, stderr=log
    )
    try:
        ready = [str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]
        for _ in range(300):
            if subprocess.run(ready, check=False).returncode == 0:
                break
            if server.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited: {(workdir / 'server.log').read_text()[-2000:]}")
            time.sleep(0.1)
        else:
            raise RuntimeError(f"PostgreSQL did not start: {(workdir / 'server.log').read_text()[-2000:]}")
        yield f"postgresql://oco_admin:{password}@127.0.0.1:{port}/postgres"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
