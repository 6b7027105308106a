"""What a launched callback inherits from the bot's environment: what programs need to
run, not the passwords the bot's config reads from it (unless the operator says so)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from oco_core.testing import run_oco

# Prints, for each name, whether the callback sees it; then waits to be stopped.
_PROBE = (
    "import os, time; "
    "print('env:', ' '.join(f'{n}={int(n in os.environ)}' for n in ('PATH', 'LANG', 'PGPASSWORD', 'DEPLOY_TOKEN')),"
    " flush=True); time.sleep(60)"
)


@pytest.mark.parametrize(
    ("inherit", "expected"),
    [
        ("", "PATH=1 LANG=1 PGPASSWORD=0 DEPLOY_TOKEN=0"),
        ('inherit_env: [PATH, "DEPLOY_*"]', "PATH=1 LANG=0 PGPASSWORD=0 DEPLOY_TOKEN=1"),
        ('inherit_env: ["*"]', "PATH=1 LANG=1 PGPASSWORD=1 DEPLOY_TOKEN=1"),
    ],
)
async def test_a_launched_callback_sees_only_the_environment_it_is_given(
    tmp_path: Path, bot_config: Callable[[str], str], inherit: str, expected: str
) -> None:
    config = bot_config(
        "callbacks:\n"
        f"  - id: probe\n"
        f"    command: [{sys.executable!r}, '-c', {_PROBE!r}]\n" + (f"    {inherit}\n" if inherit else "")
    )
    env = {"PGPASSWORD": "db-password", "DEPLOY_TOKEN": "token", "LANG": "C.UTF-8"}
    async with run_oco(config, tmp_path / "bot", env=env) as bot:
        await bot.expect(rf"oco\.callback\.probe: env: {expected}$", stream="stderr", timeout=30)
