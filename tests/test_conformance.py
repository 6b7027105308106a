"""`oco conformance` against a real `oco run` process with the memory adapter's control service."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio

from oco_core.testing import run_oco

SECRET = "conformance-secret-0123456789"
OTHER_SECRET = "other-callback-secret-0123456789"

CONFIG = f"""
adapters:
  - type: memory
    control: "127.0.0.1:0"
    control_address_file: control.address
store: {{url: "sqlite:///./oco.db"}}
grpc: {{listen: "127.0.0.1:0"}}
callbacks:
  - {{id: conformance, secret: "{SECRET}"}}
  - {{id: other, secret: "{OTHER_SECRET}"}}
"""


async def _control_address(workdir: Path) -> str:
    path = workdir / "control.address"
    with trio.fail_after(30):
        while not path.exists():
            await trio.sleep(0.05)
    return path.read_text().strip()


async def _conformance(*args: str) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "oco_core", "conformance", *args]
    with trio.fail_after(300):
        return await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)


async def test_our_bot_conforms(tmp_path: Path) -> None:
    async with run_oco(CONFIG, tmp_path) as bot:
        control = await _control_address(tmp_path)
        done = await _conformance(
            "--address", bot.address,
            "--id", "conformance", "--secret", SECRET,
            "--other-id", "other", "--other-secret", OTHER_SECRET,
            "--control", control,
        )  # fmt: skip
    out = done.stdout.decode()
    lines = out.splitlines()
    assert done.returncode == 0, f"oco conformance failed:\n{out}\n{done.stderr.decode()}"
    checks = [line for line in lines if line.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]
    assert len(checks) >= 30
    assert all(line.startswith("PASS ") for line in checks), out
    assert lines[-1].startswith(f"SUMMARY {bot.address} conforms: {len(checks)} passed, 0 failed, 0 skipped")
    for name in ("auth/wrong-secret", "routes/invalid-pattern", "storage/isolation", "stream/cancel-removes-routes"):
        assert any(line.startswith(f"PASS {name}:") for line in checks), name


async def test_without_control_the_chat_checks_are_skipped_and_the_run_does_not_pass(tmp_path: Path) -> None:
    async with run_oco(CONFIG, tmp_path) as bot:
        done = await _conformance(
            "--address", bot.address, "--id", "conformance", "--secret", SECRET, "--only", "routes/"
        )  # fmt: skip
    out = done.stdout.decode()
    assert done.returncode == 1, out
    assert "SKIP routes/hear: needs --control" in out
    assert "PASS routes/invalid-pattern:" in out
    assert "FAIL" not in out
    assert out.splitlines()[-1].endswith("(skipped checks count as not passed)")


async def test_a_wrong_secret_fails_the_checks_that_need_one(tmp_path: Path) -> None:
    async with run_oco(CONFIG, tmp_path) as bot:
        done = await _conformance(
            "--address", bot.address, "--id", "conformance", "--secret", "not-the-secret-0123456789",
            "--only", "storage/roundtrip", "--only", "auth/missing-secret",
        )  # fmt: skip
    out = done.stdout.decode()
    assert done.returncode == 1, out
    assert "FAIL storage/roundtrip: unexpected UNAUTHENTICATED" in out
    assert "PASS auth/missing-secret" in out
