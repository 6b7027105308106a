"""Small fixtures shared by oco-core's end-to-end tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

#: The bundled example callback, as a config's `command:` list (YAML flow style).
EXAMPLE_COMMAND = f'["{sys.executable}", "-m", "oco_core.examples.ping"]'


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
