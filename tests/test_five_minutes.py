"""The README's "Write a callback in five minutes", followed word for word.

A fresh virtual environment gets ``pip install -e .`` and is never activated: the bot is
started as ``.venv/bin/oco run`` with a PATH on which ``python`` is not that venv's (here:
no ``python`` at all), and the callback's ``command: ["python", "weather.py"]`` must still
run the venv's Python, which has oco_core. The code and config come from the README itself,
so the README cannot drift from what works.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent
#: A PATH without any virtual environment or pyenv shim on it.
BARE_PATH = "/usr/bin:/bin"


def readme_block(after: str) -> str:
    """The first fenced code block that follows the README line containing ``after``."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(re.escape(after) + r".*?\n```\w*\n(.*?)\n```", readme, re.DOTALL)
    assert found, f"the README no longer has a code block after {after!r}"
    return found.group(1) + "\n"


def python_on_bare_path_has_oco_core() -> bool:
    python = shutil.which("python", path=BARE_PATH)
    return python is not None and subprocess.run([python, "-c", "import oco_core"], check=False).returncode == 0


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's set-up command, in a new directory: a venv with oco-core installed."""
    venv = tmp_path_factory.mktemp("fresh") / ".venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "-e", str(ROOT)], capture_output=True, text=True, check=False
    )
    assert installed.returncode == 0, f"pip install -e . failed:\n{installed.stdout}\n{installed.stderr}"
    return venv


@pytest.mark.slow  # a virtual environment and an install of oco-core
async def test_the_readme_callback_runs_from_an_unactivated_venv(fresh_venv: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "weather.py").write_text(readme_block("save this as `weather.py`"))
    config = readme_block("Tell the bot to launch it, in `oco.yaml`")
    assert 'command: ["python", "weather.py"]' in config
    # The one departure from the README: a free port, so that tests can run side by side.
    (work / "oco.yaml").write_text(config + 'grpc: {listen: "127.0.0.1:0"}\n')
    assert not python_on_bare_path_has_oco_core(), "this test needs a PATH whose python (if any) lacks oco_core"
    env = {"PATH": BARE_PATH, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"), "LANG": "C.UTF-8"}
    with trio.fail_after(120):
        done = await trio.run_process(
            [str(fresh_venv / "bin" / "oco"), "run", "--config", "oco.yaml"],
            cwd=work,
            env=env,
            stdin=b"oco weather paris\noco weather paris\noco ping\n",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out, log = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, log
    lines = out.splitlines()
    assert "PONG" in lines, log
    assert any(line.endswith("sunny in paris (asked 2 times)") for line in lines), (out, log)
    assert not any("Traceback" in line for line in log.splitlines()), log
