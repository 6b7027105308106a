"""The pytest plugin every distribution's tests share (oco_core/testing/pytest_plugin.py),
through real pytest runs in a folder of their own: skips say why, test servers default to
the local ones when they answer, and the run says which servers it used."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from oco_core.testing import pytest_plugin

INI = "[pytest]\ntrio_mode = true\n"
SERVERS_ENV = ("OCO_TEST_POSTGRES_URL", "OCO_TEST_REDIS_URL", "OCO_REQUIRE_SERVERS")


def run_pytest(tmp_path: Path, tests: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """pytest on ``tests`` (a test module's source) in ``tmp_path``, with the servers'
    variables only as ``env`` gives them; its output, as text."""
    (tmp_path / "pytest.ini").write_text(INI)
    (tmp_path / "test_inner.py").write_text(tests)
    environment = {k: v for k, v in os.environ.items() if k not in SERVERS_ENV} | env
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), *args],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_skip_inside_trio_keeps_its_reason(tmp_path: Path) -> None:
    """pytest-trio alone reports these as a bare "Skipped" from its own source."""
    done = run_pytest(
        tmp_path,
        """
import pytest
import trio

@pytest.fixture
async def server():
    await trio.sleep(0)
    pytest.skip("no server in this fixture")
    yield

async def test_fixture(server):
    pass

async def test_body():
    await trio.sleep(0)
    pytest.skip("not in this test either")
""",
        {},
    )
    assert "2 skipped" in done.stdout, done.stdout
    assert "test_inner.py:8: no server in this fixture" in done.stdout
    assert "test_inner.py:16: not in this test either" in done.stdout
    assert "pytest_trio" not in done.stdout


USES_REDIS = """
from oco_core.testing.pytest_plugin import server_url

def test_redis():
    print("URL", server_url("redis"))
"""


@pytest.mark.parametrize("value", ["", "none"])
def test_an_empty_or_none_url_turns_the_server_off_and_says_so(tmp_path: Path, value: str) -> None:
    done = run_pytest(tmp_path, USES_REDIS, {"OCO_TEST_REDIS_URL": value})
    assert "1 skipped" in done.stdout, done.stdout
    assert f"Redis is not available: OCO_TEST_REDIS_URL={value!r} turns it off; unset it to use" in done.stdout
    assert "oco servers: Redis not available: " in done.stdout


def test_where_servers_are_required_a_missing_one_fails(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, USES_REDIS, {"OCO_TEST_REDIS_URL": "none", "OCO_REQUIRE_SERVERS": "1"})
    assert done.returncode == 1
    assert "1 failed" in done.stdout, done.stdout
    assert "OCO_REQUIRE_SERVERS is set, so this cannot be skipped" in done.stdout


def test_an_explicit_url_wins_and_the_run_names_it_with_its_password_masked(tmp_path: Path) -> None:
    url = "redis://:s3cret@127.0.0.1:1/15"  # not probed: the test's own check would find it down
    done = run_pytest(tmp_path, USES_REDIS, {"OCO_TEST_REDIS_URL": url}, "-s")
    assert done.returncode == 0, done.stdout
    assert f"URL {url}" in done.stdout
    masked = "redis=redis://:***@127.0.0.1:1/15 (from OCO_TEST_REDIS_URL)"
    lines = done.stdout.splitlines()
    # The header says what each server will be, the summary's end what the tests used.
    [header] = [line for line in lines if line.startswith("oco servers: postgresql=")]
    assert header.endswith(f", {masked}")
    assert f"oco servers: {masked}" in lines
    assert "s3cret" not in done.stdout.replace(f"URL {url}", "")


def test_unset_a_default_that_answers_is_used(tmp_path: Path) -> None:
    default = pytest_plugin.SERVERS["redis"].default
    refused = pytest_plugin._probe_redis(default)
    if refused is not None:
        pytest_plugin.server_unavailable("Redis", f"this test needs the default {default}, which {refused}")
    done = run_pytest(tmp_path, USES_REDIS, {}, "-s")
    assert done.returncode == 0, done.stdout
    assert f"URL {default}" in done.stdout
    assert f"oco servers: redis={default} (default, answered)" in done.stdout.splitlines()


def test_unset_a_default_that_does_not_answer_is_a_skip_that_says_what_to_set(tmp_path: Path) -> None:
    # The default's port moved to one nothing listens on.
    (tmp_path / "conftest.py").write_text(
        "from oco_core.testing import free_port, pytest_plugin\n"
        "pytest_plugin.SERVERS['redis'] = pytest_plugin._Server(\n"
        "    'Redis', 'OCO_TEST_REDIS_URL', f'redis://127.0.0.1:{free_port()}/15')\n"
    )
    done = run_pytest(tmp_path, USES_REDIS, {})
    assert "1 skipped" in done.stdout, done.stdout
    assert "Redis is not available: OCO_TEST_REDIS_URL is unset and the default redis://127.0.0.1:" in done.stdout
    assert "did not answer (Connection refused); set OCO_TEST_REDIS_URL to a server's URL" in done.stdout
