"""``console:`` settings and live reload: a reload keeps the console's settings as they
run (the Console is built once, with its session store, login throttle and live buffer),
and ``oco reload`` says so, naming the keys, rather than "nothing changed". Console
tokens live in the store, not the config: one made while the bot runs works at once."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import trio

from oco_core.testing import oco_cli, run_oco


def config(workdir: Path, console: str) -> str:
    return (
        "adapters: [{type: memory}]\n"
        "grpc: {listen: '127.0.0.1:0'}\n"
        f"http: {{listen: '127.0.0.1:0', address_file: {workdir / 'http.address'}}}\n"
        f"store: {{url: 'sqlite:///{workdir / 'oco.db'}'}}\n"
        f"pid_file: {workdir / 'bot.pid'}\n"
        "callbacks: []\n"
        f"console: {console}\n"
    )


async def test_oco_reload_says_console_changes_wait_for_a_restart(tmp_path: Path) -> None:
    async with run_oco(config(tmp_path, "{max_streams: 1}"), tmp_path) as bot:
        created = await trio.to_thread.run_sync(
            lambda: oco_cli("console", "token", "create", "--role", "viewer", "-c", "oco.yaml", cwd=tmp_path)
        )
        assert created.returncode == 0, created.stderr
        token = created.stdout.strip()  # alone on standard output
        (tmp_path / "oco.yaml").write_text(
            config(tmp_path, "{max_streams: 5, public_origin: 'https://ops.example.org'}")
        )
        command = [sys.executable, "-m", "oco_core", "reload", "--config", str(tmp_path / "oco.yaml")]
        with trio.fail_after(60):
            done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.decode() == (
            "reloaded: nothing changed\n"
            "kept as they run until a restart applies them: console.max_streams, console.public_origin\n"
        )
        assert any("console.max_streams" in line and "restart" in line for line in bot.stderr_lines)
        # What the command says holds: one live view at once still, as the bot started.
        address = (await bot.written("http.address")).strip()
        async with httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as http:
            login = await http.post("/console/login", data={"token": token})
            assert login.status_code == 303
            async with http.stream("GET", "/console/live/stream") as first:
                assert first.status_code == 200
                second = await http.get("/console/live/stream")
                assert second.status_code == 503
                assert "console.max_streams" in second.text
        assert bot.process.poll() is None
