"""`oco conformance` against a real `oco run` process with the memory adapter's control service."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import trio

from oco_core.plugin import corner_name
from oco_core.testing import run_oco

SECRET = "conformance-secret-0123456789"
WEBHOOK_TOKEN = "conformance-webhook-token-0123456789"
OTHER_SECRET = "other-callback-secret-0123456789"

CONFIG = f"""
adapters:
  - type: memory
    control: "127.0.0.1:0"
    control_address_file: control.address
store: {{url: "sqlite:///./oco.db"}}
grpc: {{listen: "127.0.0.1:0"}}
http: {{listen: "127.0.0.1:0", address_file: http.address}}
callbacks:
  - id: conformance
    secret: "{SECRET}"
    webhook_auth: {{bearer: "{WEBHOOK_TOKEN}"}}
    # events/capability-refusals needs topics it may not use.
    capabilities: {{publish: ["conformance.#"], subscribe: ["conformance.#"]}}
  - {{id: other, secret: "{OTHER_SECRET}"}}
"""


def with_sqlite(workdir: Path) -> str:
    """CONFIG, offering the built-in sqlite data store (files under ``workdir``)."""
    return CONFIG + f"datastores: [{{type: sqlite, directory: '{workdir / 'corners'}'}}]\n"


async def _conformance(*args: str) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "oco_core", "conformance", *args]
    with trio.fail_after(300):
        return await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)


async def test_our_bot_conforms(tmp_path: Path) -> None:
    async with run_oco(with_sqlite(tmp_path), tmp_path) as bot:
        control = await bot.written("control.address")
        http = await bot.written("http.address")
        done = await _conformance(
            "--address", bot.address,
            "--id", "conformance", "--secret", SECRET,
            "--other-id", "other", "--other-secret", OTHER_SECRET,
            "--control", control,
            "--http", f"http://{http}", "--webhook-token", WEBHOOK_TOKEN,
        )  # fmt: skip
    out = done.stdout.decode()
    lines = out.splitlines()
    assert done.returncode == 0, f"oco conformance failed:\n{out}\n{done.stderr.decode()}"
    checks = [line for line in lines if line.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]
    assert len(checks) >= 30
    assert all(line.startswith("PASS ") for line in checks), out
    assert lines[-1].startswith(f"SUMMARY {bot.address} conforms: {len(checks)} passed, 0 failed, 0 skipped")
    # The stream that read nothing got 1,000 (the bot's queue) and some the transport held;
    # the rest were counted: none went missing.
    dropped = re.search(r"^PASS stream/dropped-count: (\d+) arrived, (\d+) counted as dropped ", out, re.MULTILINE)
    assert dropped, out
    arrived, counted = int(dropped.group(1)), int(dropped.group(2))
    assert arrived >= 1000, out
    assert arrived + counted == 3000, out
    for name in ("auth/wrong-secret", "routes/invalid-pattern", "storage/isolation", "stream/cancel-removes-routes"):
        assert any(line.startswith(f"PASS {name}:") for line in checks), name
    for name in (
        "events/publish-subscribe",
        "events/acknowledge-redelivers",
        "events/capability-refusals",
        "webhooks/synchronous",
        "webhooks/asynchronous",
        "batches/listen-batches",
        "batches/send-message-batches",
        "approvals/request-needs-role",
        "approvals/route-held",
        "approvals/request-denied",
        "conversations/question-needs-id",
        "conversations/answer",
        "conversations/cancel",
        "rich/message-ids",
        "rich/reaction-event",
        "rich/edit-event",
        "rich/edit-own-only",
        "rich/get-attachment",
        "membership/renamed",
    ):
        assert any(line.startswith(f"PASS {name}:") for line in checks), name
    assert "PASS datastores/list: offers sqlite " in out
    assert "PASS datastores/access: sqlite: a sqlite: url, namespace '', generation 1 " in out
    assert "PASS datastores/access-stable: sqlite: the same url and generation 1 three times, once with refresh " in out
    # The access checks provisioned the suite's callback a file of its own.
    [corner] = (tmp_path / "corners").iterdir()
    assert corner.name == corner_name("conformance") + ".db"


async def test_a_bot_without_data_stores_skips_the_access_checks_and_still_conforms(tmp_path: Path) -> None:
    async with run_oco(CONFIG, tmp_path) as bot:
        done = await _conformance(
            "--address", bot.address, "--id", "conformance", "--secret", SECRET, "--only", "datastores/"
        )  # fmt: skip
    out = done.stdout.decode()
    assert done.returncode == 0, out
    lines = out.splitlines()
    assert lines[0] == "PASS datastores/list: offers none" or lines[0].startswith("PASS datastores/list: offers none ")
    assert "PASS datastores/listen-requires-unoffered: FAILED_PRECONDITION, DataStoreUnavailableError:" in out
    assert "PASS datastores/get-unoffered: FAILED_PRECONDITION, DataStoreUnavailableError:" in out
    for name in ("datastores/access", "datastores/access-stable"):
        assert f"SKIP {name}: the bot offers no data store (ListDataStores is empty; offering none is allowed) " in out
    assert lines[-1] == (
        f"SUMMARY {bot.address} conforms: 3 passed, 0 failed, 2 skipped of 5 checks "
        "(2 skipped for features the bot does not offer, which is not a failure)"
    )


async def test_asking_for_a_data_store_the_bot_lacks_is_a_skip_that_counts(tmp_path: Path) -> None:
    async with run_oco(with_sqlite(tmp_path), tmp_path) as bot:
        done = await _conformance(
            "--address", bot.address, "--id", "conformance", "--secret", SECRET,
            "--only", "datastores/access", "--datastore", "postgresql",
        )  # fmt: skip
    out = done.stdout.decode()
    assert done.returncode == 1, out
    assert "SKIP datastores/access: needs --datastore naming a type the bot offers (it offers: sqlite)" in out
    assert out.splitlines()[-1].endswith("(skipped checks for want of an option count as not passed)")


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
    assert out.splitlines()[-1].endswith("(skipped checks for want of an option count as not passed)")


async def test_a_callback_allowed_every_topic_skips_the_capability_check_and_does_not_pass(tmp_path: Path) -> None:
    async with run_oco(CONFIG, tmp_path) as bot:
        done = await _conformance(
            "--address", bot.address, "--id", "other", "--secret", OTHER_SECRET,
            "--only", "events/capability-refusals",
        )  # fmt: skip
    out = done.stdout.decode()
    assert done.returncode == 1, out
    assert "SKIP events/capability-refusals: needs the suite's callback (--id) not allowed to publish" in out


async def test_webhooks_without_the_token_fail_saying_the_bot_answered_itself(tmp_path: Path) -> None:
    async with run_oco(CONFIG, tmp_path) as bot:
        http = await bot.written("http.address")
        done = await _conformance(
            "--address", bot.address, "--id", "conformance", "--secret", SECRET,
            "--http", f"http://{http}", "--only", "webhooks/",
        )  # fmt: skip
    out = done.stdout.decode()
    assert done.returncode == 1, out
    assert (
        "FAIL webhooks/synchronous: the bot answered 401 b'unauthorized' without delivering the request to the "
        "callback (is --webhook-token the callback's webhook_auth bearer token?)"
    ) in out


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
