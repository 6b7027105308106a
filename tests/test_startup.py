"""Start-up: what each ``oco`` command imports before it answers, and Ctrl-C while a
real ``oco run`` is starting (no traceback, the usual exit code, no callback left).

How long start-up takes is measured by bench/bench_startup.py, not asserted here: on a
shared machine a time limit is either loose enough to prove nothing or flaky. What makes
the time, which modules a command imports, is asserted instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from oco_core import _audit, _cli
from oco_core.testing import Lines

#: Heavy libraries the bot needs and a command that only prints must not import.
HEAVY = ("grpc", "pydantic", "trio", "sqlalchemy", "yaml", "google.protobuf", "pluggy", "re2")


def imported_by(code: str) -> set[str]:
    """The modules a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize(
    "args",
    [
        ["--version"],
        ["--help"],
        ["run", "--help"],
        ["audit", "--help"],
        ["callbacks", "add", "--help"],
        ["datastores", "revoke", "--help"],
        ["conformance", "--help"],
        ["completion", "bash"],
    ],
)
def test_printing_commands_import_only_the_standard_library(args: list[str]) -> None:
    # `oco --version` took 2-3 s on a busy machine when it imported grpc and pydantic.
    code = "import contextlib, io\nfrom oco_core._cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n"
    code += f"    try:\n        main({args!r})\n    except SystemExit:\n        pass"
    assert heavy(imported_by(code)) == []


def test_a_callback_imports_neither_the_config_nor_the_store_libraries() -> None:
    # A launched callback's start-up is on the way to the bot's first answer.
    modules = imported_by("import oco_core\noco_core.Callback, oco_core.Message, oco_core.Item, oco_core.OcoError")
    assert "oco_core._sdk" in modules
    assert [m for m in modules if m.split(".")[0] in ("pydantic", "yaml", "sqlalchemy", "pluggy")] == []


def test_loading_plugins_leaves_the_libraries_of_unused_ones_unimported() -> None:
    # Every installed plugin is loaded through its entry point at each start; an
    # adapter's chat library, or a store's client, waits until a bot uses it.
    modules = imported_by("from oco_core._plugins import load_plugins\nprint(sorted(load_plugins().adapters))")
    assert [m for m in modules if m.split(".")[0] in ("nio", "aiohttp", "irc", "jaraco", "redis")] == []


def test_the_cli_lists_what_the_audit_log_writes() -> None:
    # The CLI declares these without importing _audit, to stay fast.
    assert _cli.AUDIT_DECISIONS == (_audit.ALLOWED, _audit.DENIED)


def _leftovers(marker: str) -> list[int]:
    """Processes still running whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue  # gone meanwhile
            if marker.encode() in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


#: Moments of start-up: a shared library the process has loaded (while it imports:
#: grpc's first, then pydantic's for the config), or a line in its log.
MOMENTS = [
    ("loaded", "cygrpc"),
    ("loaded", "_pydantic_core"),
    ("log", r"started callback 'example'"),
    ("log", r"callback 'example' is listening"),
]


async def _reached(process: trio.Process, stderr: Lines, moment: tuple[str, str]) -> None:
    kind, what = moment
    if kind == "log":
        await stderr.wait_for(what, timeout=60)
        return
    maps = Path(f"/proc/{process.pid}/maps")
    with trio.fail_after(60):
        while what not in maps.read_text():
            await trio.sleep(0.002)  # nothing to wait on: the process does not say when it loads a library


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="watches the process through /proc (Linux)")
@pytest.mark.parametrize("moment", MOMENTS, ids=[what for _, what in MOMENTS])
async def test_ctrl_c_during_start_up_stops_quietly(tmp_path: Path, moment: tuple[str, str]) -> None:
    """SIGINT at a moment of start-up: no traceback on stderr, exit code 130
    (interrupted before the bot took over) or 0 (the bot's orderly shutdown), and the
    launched callback is gone."""
    marker = f"oco-startup-test-{os.getpid()}-{tmp_path.name}"
    config = tmp_path / "oco.yaml"
    # The defaults (shell adapter, SQLite, the ping callback), on a free port, with a
    # marker in the callback's command line to find it by.
    command = [sys.executable, "-m", "oco_core.examples.ping", marker]
    config.write_text(
        f'grpc: {{listen: "127.0.0.1:0"}}\ncallbacks: [{{id: example, command: {json.dumps(command)}}}]\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "OCO_CONFIG"}
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "oco_core", "run", "--config", str(config)],
        env=env,
        stdin=subprocess.PIPE,  # kept open: the shell adapter waits for input
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    stderr = Lines("stderr")
    try:
        async with trio.open_nursery() as nursery:
            assert process.stderr is not None
            nursery.start_soon(stderr.pump, process.stderr)
            await _reached(process, stderr, moment)
            process.send_signal(signal.SIGINT)
            with trio.fail_after(60):
                code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = "\n".join(stderr.lines)
    assert "Traceback" not in text, text
    assert code in (0, _cli.EXIT_INTERRUPTED), (code, text)
    if moment[0] == "log":
        assert code == 0, text  # the bot had taken over: an orderly shutdown
    else:
        assert code == _cli.EXIT_INTERRUPTED, text
    assert _leftovers(marker) == [], f"callback left running after SIGINT; log:\n{text}"
