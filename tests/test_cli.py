"""The ``oco`` command, run as a real process: --version, check-config, proto, and how
configuration errors come out (one line naming file, line and key; exit code 3), with
secrets never printed."""

from __future__ import annotations

import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import trio

from oco_core import __version__
from oco_core._cli import EXIT_CONFIG, EXIT_OK, EXIT_RUNTIME, main
from oco_core._config import BotSettings
from oco_core._proto import storage_pb2, storage_pb2_grpc
from oco_core.testing import free_port, oco_cli, run_oco

REPO = Path(__file__).resolve().parents[1]
PROTOS = ["core.proto", "directory.proto", "robot.proto", "storage.proto"]


def config_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one-line error of a run that failed on its config."""
    assert result.returncode == EXIT_CONFIG, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("oco: error: "), lines[0]
    return lines[0]


def write(path: Path, text: str) -> Path:
    """Write a config file."""
    path.write_text(text)
    return path


def check_config_error(tmp_path: Path, text: str) -> tuple[Path, str]:
    """Write ``text`` to bad.yaml and run ``oco check-config`` on it: the file, and the
    one-line error the run must fail with."""
    config = write(tmp_path / "bad.yaml", text)
    return config, config_error(oco_cli("check-config", "--config", str(config), cwd=tmp_path))


def test_version(tmp_path: Path) -> None:
    result = oco_cli("--version", cwd=tmp_path)
    assert result.returncode == EXIT_OK
    assert result.stdout.strip() == f"oco {__version__}"


def test_check_config_ok(tmp_path: Path) -> None:
    secret = "deploy-" + secrets.token_hex(16)
    config = write(
        tmp_path / "oco.yaml",
        f"""\
bot: {{name: oco, aliases: ["!"]}}
adapters: [{{type: shell, user: alice}}, {{type: memory}}]
store: {{url: "sqlite:///{tmp_path / "oco.db"}"}}
grpc: {{listen: "127.0.0.1:50999"}}
callbacks:
  - id: example
    command: ["python", "-m", "oco_core.examples.ping"]
  - id: deploy
    secret: "{secret}"
    routes: [{{pattern: "deploy (\\\\w+)", respond: true, help: "deploy <app>"}}]
""",
    )
    result = oco_cli("--debug", "check-config", "--config", str(config), cwd=tmp_path)
    assert result.returncode == EXIT_OK, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"{config}: OK"), line
    for part in ("shell", "memory", "sql", "127.0.0.1:50999 (plaintext)", "example", "deploy", "admins: none"):
        assert part in line
    assert not (tmp_path / "oco.db").exists(), "check-config must not create the store"
    assert secret not in result.stdout + result.stderr


def test_check_config_without_a_file_checks_the_defaults(tmp_path: Path) -> None:
    result = oco_cli("check-config", cwd=tmp_path)
    assert result.returncode == EXIT_OK, result.stderr
    assert "<defaults>: OK" in result.stdout
    assert "shell" in result.stdout
    assert "example" in result.stdout


def test_malformed_yaml(tmp_path: Path) -> None:
    config, error = check_config_error(tmp_path, 'bot:\n  name: oco\n  aliases: ["!"\n')
    assert str(config) in error
    assert "not valid YAML" in error
    assert "line 4" in error


def test_unknown_key_names_file_line_key_and_known_keys(tmp_path: Path) -> None:
    config, error = check_config_error(tmp_path, "bot:\n  name: oco\n  colour: red\n")
    assert f"{config}, line 3" in error
    assert "bot.colour" in error
    assert "unknown key 'colour'" in error
    # Every key of bot:, in order: the list grows with the bot, and stays whole.
    assert "known keys: " + ", ".join(sorted(BotSettings.model_fields)) in error


def test_unknown_top_level_key(tmp_path: Path) -> None:
    config, error = check_config_error(tmp_path, "bot: {name: oco}\n\ncallback: []\n")
    assert f"{config}, line 3" in error
    assert "unknown key 'callback'" in error
    assert "callbacks" in error


def test_missing_environment_variable(tmp_path: Path) -> None:
    config, error = check_config_error(tmp_path, "callbacks:\n  - id: deploy\n    secret: ${OCO_TEST_UNSET_SECRET}\n")
    assert f"{config}, line 3" in error
    assert "callbacks[0].secret" in error
    assert "OCO_TEST_UNSET_SECRET is not set" in error


def test_environment_variable_and_default_are_substituted(tmp_path: Path) -> None:
    config = write(
        tmp_path / "oco.yaml",
        "bot: {name: '${OCO_TEST_BOT_NAME}'}\ngrpc: {listen: '127.0.0.1:${OCO_TEST_UNSET_PORT:-50998}'}\n",
    )
    result = oco_cli("check-config", "--config", str(config), cwd=tmp_path, env={"OCO_TEST_BOT_NAME": "robo"})
    assert result.returncode == EXIT_OK, result.stderr
    assert "127.0.0.1:50998" in result.stdout


def test_invalid_route_pattern(tmp_path: Path) -> None:
    config = write(
        tmp_path / "bad.yaml",
        f"""\
callbacks:
  - id: deploy
    secret: "{"d" * 32}"
    routes:
      - pattern: "deploy (\\\\w+"
""",
    )
    error = config_error(oco_cli("check-config", "--config", str(config), cwd=tmp_path))
    assert f"{config}, line 5" in error
    assert "callbacks[0].routes[0].pattern" in error
    assert "invalid pattern 'deploy (\\\\w+'" in error
    assert "missing )" in error


@pytest.mark.parametrize(
    ("text", "kind", "installed", "where"),
    [
        ("adapters:\n  - type: shell\n  - type: xyz\n", "adapter", ["shell", "memory"], "line 3: adapters[1].type"),
        ("bot: {name: oco}\nstore:\n  type: xyz\n", "store", ["sql"], "line 3: store.type"),
    ],
    ids=["adapter", "store"],
)
def test_unknown_plugin_type(tmp_path: Path, text: str, kind: str, installed: list[str], where: str) -> None:
    config, error = check_config_error(tmp_path, text)
    assert f"unknown {kind} type 'xyz'" in error
    listed = error.split("installed: ", 1)[1]
    for name in installed:
        assert name in listed
    assert f"pip install oco-{kind}-xyz" in error
    # "file, key and line in every error": the type is a key of the file like any other.
    assert f"{config}, {where}" in error


def test_adapter_options_are_validated_by_the_adapter(tmp_path: Path) -> None:
    config, error = check_config_error(tmp_path, "adapters:\n  - type: shell\n    colour: red\n")
    assert f"{config}, line 3" in error
    assert "adapters[0].colour" in error
    assert "unknown key 'colour'" in error


def test_missing_config_file(tmp_path: Path) -> None:
    error = config_error(oco_cli("check-config", "--config", str(tmp_path / "nowhere.yaml"), cwd=tmp_path))
    assert "nowhere.yaml" in error


def test_run_fails_on_a_bad_config_before_starting(tmp_path: Path) -> None:
    config = write(tmp_path / "bad.yaml", f'store: {{url: "sqlite:///{tmp_path / "oco.db"}"}}\nbot: {{colour: red}}\n')
    error = config_error(oco_cli("run", "--config", str(config), cwd=tmp_path))
    assert "bot.colour" in error
    assert not (tmp_path / "oco.db").exists()


def test_config_file_from_environment(tmp_path: Path) -> None:
    config = write(tmp_path / "bad.yaml", "bot: {colour: red}\n")
    error = config_error(oco_cli("check-config", cwd=tmp_path, env={"OCO_CONFIG": str(config)}))
    assert str(config) in error


# -- secrets ---------------------------------------------------------------------------


def test_secrets_never_printed_by_config_errors(tmp_path: Path) -> None:
    literal = "literal-" + secrets.token_hex(12)
    from_env = "fromenv-" + secrets.token_hex(12)
    config = write(
        tmp_path / "bad.yaml",
        f"""\
callbacks:
  - id: deploy
    secret: "{literal}"
  - id: audit
    secret: ${{OCO_TEST_AUDIT_SECRET}}
  - id: broken
    secret: "{literal}"
    colour: red
grpc: {{listen: nonsense}}
""",
    )
    # --debug adds the traceback to the message: whatever it shows, it shows no secret.
    result = oco_cli(
        "--debug", "check-config", "--config", str(config), cwd=tmp_path, env={"OCO_TEST_AUDIT_SECRET": from_env}
    )
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "callbacks[2].colour" in result.stderr
    assert "grpc.listen" in result.stderr
    for secret in (literal, from_env):
        assert secret not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('"tiny-secret-42"', "at least 16 characters"),
        ("[tiny-secret-42]", "expected text, not a list"),
        ("{tiny-secret-42: 1}", "expected text, not a mapping"),
    ],
    ids=["too-short", "list", "mapping"],
)
def test_invalid_secret_is_not_echoed(tmp_path: Path, value: str, problem: str) -> None:
    _, error = check_config_error(tmp_path, f"callbacks:\n  - id: deploy\n    secret: {value}\n")
    assert problem in error
    assert "tiny-secret-42" not in error


def test_store_down_at_start_is_one_line_with_the_password_masked_and_retried(tmp_path: Path) -> None:
    """A database that is down when the bot starts is waited for: one log line a try,
    naming the store with its password masked; SIGTERM still stops the bot cleanly."""
    password = "pw-" + secrets.token_hex(8)
    config = write(
        tmp_path / "oco.yaml",
        f"""\
store: {{url: "postgresql+psycopg://oco:{password}@127.0.0.1:{free_port()}/oco"}}
grpc: {{listen: "127.0.0.1:0"}}
callbacks: []
""",
    )
    log = tmp_path / "oco.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "oco_core", "--debug", "run", "--config", str(config)],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                tries = [line for line in log.read_text().splitlines() if "store unavailable" in line]
                if len(tries) >= 2:
                    break
                assert process.poll() is None, log.read_text()
                time.sleep(0.1)
            else:
                raise AssertionError(f"no retried 'store unavailable' line within 60 s: {log.read_text()}")
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
    output = log.read_text()
    assert "oco:***@127.0.0.1" in tries[0]
    assert password not in output


def test_run_fails_when_the_grpc_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = write(
            tmp_path / "oco.yaml",
            f'store: {{url: "sqlite:///{tmp_path / "oco.db"}"}}\ngrpc: {{listen: "{address}"}}\ncallbacks: []\n',
        )
        result = oco_cli("run", "--config", str(config), cwd=tmp_path)
    assert result.returncode == EXIT_RUNTIME, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("oco: error: ")]
    assert len(error) == 1, result.stderr
    assert error[0] == (
        f"oco: error: cannot serve gRPC on {address}: Address already in use; is another bot running? "
        "Change grpc.listen (port 0 picks a free port)"
    )
    # Nothing of grpc's own: neither its C core's log line (E1130 ... add_port.cc] ...)
    # nor its advice about GRPC_VERBOSITY.
    assert "GRPC_VERBOSITY" not in result.stderr
    assert not [line for line in result.stderr.splitlines() if re.match(r"[EWI]\d{4} |.*\.cc:\d+\]", line)], (
        result.stderr
    )


async def test_secrets_never_in_run_logs(
    tmp_path: Path, bot_config: Callable[[str], str], example_command: str
) -> None:
    """At log level debug, with a launched callback using a configured secret and a
    callback calling in with its own, neither secret reaches the bot's output."""
    launched = "launched-" + secrets.token_hex(16)
    dialing = "dialing-" + secrets.token_hex(16)
    config = bot_config(
        f"""\
log_level: debug
callbacks:
  - id: example
    command: {example_command}
    secret: ${{OCO_TEST_EXAMPLE_SECRET}}
  - id: deploy
    secret: "{dialing}"
    routes: [{{pattern: "deploy (\\\\w+)", respond: true, help: "deploy <app>"}}]
"""
    )
    async with run_oco(config, tmp_path / "bot", env={"OCO_TEST_EXAMPLE_SECRET": launched}) as bot:
        await bot.write("oco ping")
        await bot.expect("^PONG$")
        await bot.write("oco count")
        await bot.expect("counted 1")

        def call_storage(secret: str) -> grpc.StatusCode:
            with grpc.insecure_channel(bot.address) as channel:
                stub = storage_pb2_grpc.StorageStub(channel)
                metadata = (("authorization", f"Bearer {secret}"),)
                try:
                    stub.Set(storage_pb2.SetRequest(key="k", value=b"v"), metadata=metadata, timeout=30)
                except grpc.RpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

        assert await trio.to_thread.run_sync(call_storage, dialing) == grpc.StatusCode.OK
        # A wrong secret that is almost right must not be echoed either.
        assert await trio.to_thread.run_sync(call_storage, dialing[:-1]) == grpc.StatusCode.UNAUTHENTICATED
        assert await bot.stop(signal.SIGTERM) == EXIT_OK
    output = "\n".join(bot.stdout_lines + bot.stderr_lines)
    assert "DEBUG" in output, "the bot did not log at debug level: the test proves nothing"
    for secret in (launched, dialing, dialing[:-1]):
        assert secret not in output


# -- proto -----------------------------------------------------------------------------


def test_proto_writes_the_protocol_files(tmp_path: Path) -> None:
    out = tmp_path / "out" / "protos"
    result = oco_cli("proto", "--out", str(out), cwd=tmp_path)
    assert result.returncode == EXIT_OK, result.stderr
    shipped = sorted(p.name for p in (REPO / "proto" / "oco").glob("*.proto"))
    assert set(PROTOS) <= set(shipped)
    assert sorted(p.name for p in out.iterdir()) == shipped
    for name in shipped:
        assert (out / name).read_bytes() == (REPO / "proto" / "oco" / name).read_bytes(), name
        assert name in result.stdout


def test_usage_errors(tmp_path: Path) -> None:
    assert oco_cli(cwd=tmp_path).returncode == 2
    assert oco_cli("proto", cwd=tmp_path).returncode == 2
    assert oco_cli("frobnicate", cwd=tmp_path).returncode == 2


def test_main_called_in_process_gives_the_caller_its_sigint_handler_back(tmp_path: Path) -> None:
    """A program (or a test) calling main() keeps its own Ctrl-C handling afterwards: the
    exit-at-once handler main() installs for start-up must not outlive it."""
    config = tmp_path / "oco.yaml"
    config.write_text(f'store: {{url: "sqlite:///{tmp_path / "oco.db"}"}}\ncallbacks: []\n')
    before = signal.getsignal(signal.SIGINT)
    assert main(["check-config", "--config", str(config)]) == 0
    assert signal.getsignal(signal.SIGINT) is before


def test_oco_run_outside_the_main_thread_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(main(["run"])))
    thread.start()
    thread.join(30)
    assert codes == [2]
    assert capsys.readouterr().err == (
        "oco: error: oco run must run in the main thread (it handles SIGINT and SIGTERM)\n"
    )
