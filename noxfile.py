"""Automation for the OCO monorepo: ``nox`` runs every default session.

Each distribution (oco-core at the root, each folder under adapters/ and stores/) is
tested in a virtual environment holding only oco-core and that distribution, which
catches undeclared dependencies. Tests that need a real server skip with a reason where
it is absent, unless OCO_REQUIRE_SERVERS=1 (set by .ci/run) turns the skip into a failure.
"""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).parent
DISTRIBUTIONS = sorted(p.parent for p in ROOT.glob("*/*/pyproject.toml") if p.parts[-3] in ("adapters", "stores"))
# grpcio-tools: tests generate a client from the specification's own .proto files.
# build and the build backend with its plugin: test_packaging builds every distribution
# without isolation (no download per build).
TEST_TOOLS = [
    "pytest>=8",
    "pytest-trio>=0.8",
    "pytest-timeout>=2.3",
    "hypothesis>=6.100",
    "trustme>=1.1",
    "grpcio-tools>=1.85.1",
    "build>=1.2",
    "hatchling>=1.27",
    "hatch-fancy-pypi-readme>=24.1",
    "httpx>=0.27",
    # The console's browser tests: Chromium through /usr/bin/chromedriver (installed by .ci/run).
    "selenium>=4.20",
]

nox.options.sessions = ["lint", "types", "proto", "docs", "tests", "distributions"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True


def _editable(*paths: Path | str) -> list[str]:
    args: list[str] = []
    for path in paths:
        args += ["-e", str(path)]
    return args


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting, with the one root configuration."""
    session.install("ruff>=0.15")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def types(session: nox.Session) -> None:
    """mypy --strict on every distribution's shipped code and on its tests."""
    session.install("mypy>=1.15", "types-PyYAML", "types-protobuf", "grpc-stubs", *TEST_TOOLS)
    session.install(*_editable(".[postgresql]", *DISTRIBUTIONS))
    packages = ["oco_core"] + [str(p) for d in DISTRIBUTIONS for p in d.glob("oco_*") if p.is_dir()]
    session.run("mypy", *packages)
    # One run per tests folder: each has a conftest module, and one mypy run cannot hold
    # two modules of the same name.
    for tests in [ROOT / "tests", *(d / "tests" for d in DISTRIBUTIONS if (d / "tests").is_dir())]:
        session.run("mypy", str(tests.relative_to(ROOT)))


@nox.session
def proto(session: nox.Session) -> None:
    """Fail when the committed generated protocol code is stale."""
    session.install("grpcio-tools==1.85.1", "mypy-protobuf==5.1.0")
    session.run("python", "tools/gen_proto.py", "--check")


@nox.session
def docs(session: nox.Session) -> None:
    """Fail when docs/protocol.md no longer matches the comments in the .proto files."""
    session.install("grpcio-tools==1.85.1")
    session.run("python", "tools/gen_protocol_docs.py", "--check")


@nox.session
def tests(session: nox.Session) -> None:
    """oco-core's tests, end to end with real `oco` processes and real gRPC clients."""
    session.install(*TEST_TOOLS)
    session.install(*_editable(".[postgresql]"))
    session.run("pytest", "tests", *session.posargs)


@nox.session
def distributions(session: nox.Session) -> None:
    """Each adapter and store distribution's own tests, beside oco-core alone."""
    for dist in DISTRIBUTIONS:
        venv = f"{session.virtualenv.location}-{dist.name}"
        session.run("python", "-m", "venv", venv, external=True, silent=True)
        pip = f"{venv}/bin/pip"
        # The IRC adapter's failover tests (test_ha_irc.py) run two bots on a shared
        # PostgreSQL, then Redis: their drivers come along there, and nowhere else.
        shared_stores = [".[postgresql]", ROOT / "stores" / "redis"] if dist.name == "irc" else ["."]
        session.run(pip, "install", "-q", *TEST_TOOLS, *_editable(*shared_stores, dist), external=True)
        session.run(f"{venv}/bin/pytest", str(dist / "tests"), "--rootdir", str(ROOT), *session.posargs, external=True)


@nox.session
def screenshots(session: nox.Session) -> None:
    """Refresh docs/console/*.png: the console's browser test (a real bot on ngircd with
    some traffic, Debian's Chromium at a fixed window size) photographs each page. Not a
    default session: run it when a page changes, and look at the pictures before committing."""
    session.install(*TEST_TOOLS)
    session.install(*_editable(".", ROOT / "adapters" / "irc"))
    session.run(
        "pytest",
        "adapters/irc/tests/test_console_browser.py",
        "--rootdir",
        str(ROOT),
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env={"OCO_CONSOLE_SCREENSHOTS": str(ROOT / "docs" / "console"), "OCO_REQUIRE_SERVERS": "1"},
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: print numbers (never part of the test run)."""
    # grpcio-tools: bench_transport generates the specification-only client's stubs.
    session.install("grpcio-tools>=1.85.1", *_editable(".[postgresql]", *DISTRIBUTIONS))
    session.run("python", "bench/bench_router.py")
    session.run("python", "bench/bench_activity.py")
    session.run("python", "bench/bench_churn.py")
    session.run("python", "bench/bench_memory.py")
    session.run("python", "bench/bench_startup.py", *session.posargs)  # --quick: 3 runs each
    # The transport beside bare grpc.aio, and against the commit before issue 17 (--quick: one round, no "before").
    session.run("python", "bench/bench_transport.py", *session.posargs)
    session.run("python", "bench/bench_webhooks.py", *session.posargs)  # --quick for a smoke run
    # ngircd, PostgreSQL and Redis: 20 SIGKILL failovers of two ha: bots (--quick: 3).
    session.run("python", "bench/bench_failover.py", *session.posargs)
    # PostgreSQL and Redis rows need OCO_TEST_POSTGRES_URL and OCO_TEST_REDIS_URL.
    session.run("python", "bench/bench_store.py", "--rpc", *session.posargs)
