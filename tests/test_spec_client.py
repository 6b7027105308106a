"""The compatibility promise: a callback generated from the OpenChatOps specification's
own two .proto files, unchanged, works against OCO.

``tests/spec_proto/core.proto`` and ``robot.proto`` are the specification's files as
PROTOCOL.md describes them. At test time protoc generates Python code from them, and
``tests/spec_proto/spec_client.py`` runs with only that code, in a process of its own (its
``oco`` package would clash with oco_core's in one descriptor pool). The bot is a real
``oco run`` with the shell adapter; the client's route is declared by the operator in the
bot's config, since a specification client has no way to declare one.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from google.protobuf import descriptor_pb2
from grpc_tools import protoc  # type: ignore[import-untyped]  # grpcio-tools ships no types

from oco_core.testing import Lines, run_oco

SPEC = Path(__file__).resolve().parent / "spec_proto"
OCO_PROTO = Path(__file__).resolve().parents[1] / "proto" / "oco"
SPEC_FILES = ["core.proto", "robot.proto"]


def run_protoc(*args: str) -> None:
    """Run protoc (from grpcio-tools) with its own well-known types on the path."""
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(["protoc", f"-I{include}", *args])
    assert code == 0, f"protoc {' '.join(args)} failed with {code}"


@pytest.fixture
def spec_stubs(tmp_path: Path) -> Path:
    """Python modules generated from the specification's files alone."""
    out = tmp_path / "spec_stubs"
    out.mkdir()
    run_protoc(f"-I{SPEC}", f"--python_out={out}", f"--grpc_python_out={out}", *SPEC_FILES)
    return out


async def test_spec_client_is_matched_and_replies(
    tmp_path: Path, spec_stubs: Path, bot_config: Callable[[str], str]
) -> None:
    secret = secrets.token_hex(16)
    config = bot_config(
        f"""\
log_level: debug
callbacks:
  - id: deploy
    secret: "{secret}"
    routes:
      - pattern: "deploy (\\\\w+)"
        respond: true
        help: "deploy <app>"
  - id: audit
    secret: "{secrets.token_hex(16)}"
"""
    )
    async with run_oco(config, tmp_path / "bot") as bot:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OCO_")},
            "PYTHONPATH": str(spec_stubs),
            "OCO_ADDRESS": bot.address,
            "SPEC_SECRET": secret,
            "SPEC_PLUGIN_ID": "deploy",
            "SPEC_OTHER_ID": "audit",
        }
        client = await trio.lowlevel.open_process(
            [sys.executable, str(SPEC / "spec_client.py")],
            cwd=spec_stubs,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = Lines("the client's stdout"), Lines("the client's stderr")
        try:
            async with trio.open_nursery() as nursery:
                assert client.stdout is not None
                assert client.stderr is not None
                nursery.start_soon(out.pump, client.stdout)
                nursery.start_soon(err.pump, client.stderr)
                try:
                    await out.wait_for("^listening")
                    # The help lists the operator's route while the client listens.
                    await bot.write("oco help deploy")
                    await bot.expect("^deploy <app>$")
                    await bot.write("oco deploy api")
                    await bot.expect("^alice: deploying api$")
                    await out.wait_for("^joined")
                    with trio.fail_after(30):
                        code = await client.wait()
                except AssertionError as exc:
                    raise AssertionError(f"{exc}\nclient stderr: {err.lines!r}") from None
        finally:
            if client.returncode is None:
                client.kill()
                with trio.CancelScope(shield=True):
                    await client.wait()
        assert code == 0, err.lines

        statuses = dict(line.split()[1:3] for line in out.lines if line.startswith("status "))
        assert statuses == {
            "listen-wrong-secret": "UNAUTHENTICATED",
            "listen-no-secret": "UNAUTHENTICATED",
            "listen-other-plugin-id": "PERMISSION_DENIED",
            "send-wrong-secret": "UNAUTHENTICATED",
        }
        matched = json.loads((await out.wait_for("^matched ")).string.removeprefix("matched "))
        assert matched["type"] == "matched_message"
        assert matched["pattern"] == r"deploy (\w+)"
        assert matched["body"] == "oco deploy api"
        assert matched["user"]["mention_name"] == "alice"
        assert matched["user"]["id"]
        assert matched["room"]["id"]
        assert matched["room"]["name"] == "shell"
        assert "must not be sent" not in "\n".join(bot.stdout_lines)

        assert await bot.stop() == 0
    assert secret not in "\n".join(bot.stdout_lines + bot.stderr_lines)


def descriptors(include: Path, files: list[str], out: Path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """The parsed descriptors of ``files`` (parsed only: nothing enters a descriptor pool)."""
    run_protoc(f"-I{include}", f"--descriptor_set_out={out}", *files)
    parsed = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return {f.name: f for f in parsed.file}


def test_oco_protocol_keeps_every_spec_name_number_and_type(tmp_path: Path) -> None:
    """OCO's .proto files extend the specification's without renumbering, retyping or
    renaming anything on the wire (the same check, statically, for every field)."""
    spec = descriptors(SPEC, SPEC_FILES, tmp_path / "spec.pb")
    ours = descriptors(OCO_PROTO, SPEC_FILES, tmp_path / "oco.pb")
    for name in SPEC_FILES:
        assert spec[name].package == ours[name].package == "oco"
        assert spec[name].syntax == ours[name].syntax == "proto3"
        our_messages = {m.name: m for m in ours[name].message_type}
        for message in spec[name].message_type:
            assert message.name in our_messages, f"{name}: message {message.name} is missing"
            mine = our_messages[message.name]
            our_fields = {f.number: f for f in mine.field}
            for field in message.field:
                theirs = our_fields.get(field.number)
                where = f"{name}: {message.name}.{field.name} = {field.number}"
                assert theirs is not None, f"{where} is missing"
                assert (theirs.name, theirs.type, theirs.type_name, theirs.label) == (
                    field.name,
                    field.type,
                    field.type_name,
                    field.label,
                ), where
                if field.HasField("oneof_index"):
                    assert theirs.HasField("oneof_index"), f"{where} left its oneof"
                    spec_oneof = message.oneof_decl[field.oneof_index].name
                    assert mine.oneof_decl[theirs.oneof_index].name == spec_oneof, where
        our_services = {s.name: s for s in ours[name].service}
        for service in spec[name].service:
            assert service.name in our_services, f"{name}: service {service.name} is missing"
            our_methods = {m.name: m for m in our_services[service.name].method}
            for method in service.method:
                our_method = our_methods.get(method.name)
                assert our_method is not None, f"{name}: rpc {service.name}.{method.name} is missing"
                assert (
                    our_method.input_type,
                    our_method.output_type,
                    our_method.client_streaming,
                    our_method.server_streaming,
                ) == (
                    method.input_type,
                    method.output_type,
                    method.client_streaming,
                    method.server_streaming,
                ), f"{name}: rpc {service.name}.{method.name}"
