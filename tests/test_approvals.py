"""Approvals (the two-person rule), end to end through a real ``oco run``: a route the
operator marks as needing approval is held until a holder of the role (not the asker)
approves it in chat, then reaches the callback with who approved; denials and timeouts
are answered in chat and the callback never sees the match; a route the callback itself
declares as needing approval, and a callback asking for approval mid-work
(``message.request_approval``), work the same way; every step is in the audit log.

Chat is played through the memory adapter's control service.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from oco_core._cli import EXIT_OK
from oco_core.testing import ControlChat, oco_cli, run_oco

CALLBACK = """
from oco_core import ApprovalDeniedError, Callback, Message

bot = Callback()


@bot.respond(r"^deploy (\\w+)$", id="deploy")
async def deploy(message: Message) -> None:
    await message.send(f"deployed {message.match(1)} (approved by {', '.join(message.approved_by) or 'nobody'})")


@bot.respond(r"^restart (\\w+)$", approval={"role": "approvers", "count": 2})
async def restart(message: Message) -> None:
    await message.send(f"restarted {message.match(1)} (approved by {', '.join(message.approved_by)})")


@bot.respond(r"^drop (\\w+)$")
async def drop(message: Message) -> None:
    await message.send(f"about to drop {message.match(1)}")
    try:
        approvers = await message.request_approval("approvers", timeout=30, action=f"drop table {message.match(1)}")
    except ApprovalDeniedError as exc:
        await message.send(f"not dropping: {exc}")
        return
    await message.send(f"dropped {message.match(1)} (approved by {', '.join(approvers)})")


bot.run()
"""


def bot_yaml(tmp_path: Path) -> str:
    script = tmp_path / "deployer.py"
    script.write_text(CALLBACK)
    return (
        "adapters:\n  - {type: memory, control: '127.0.0.1:0', control_address_file: control.address}\n"
        "grpc: {listen: '127.0.0.1:0'}\n"
        f"store: {{url: 'sqlite:///{tmp_path / 'oco.db'}'}}\n"
        "auth: {admins: [memory/alice]}\n"
        "callbacks:\n"
        f"  - id: deployer\n    command: [{json.dumps(sys.executable)}, {json.dumps(str(script))}]\n"
        "    route_rules:\n"
        "      deploy: {approval: {role: approvers, timeout: 3s}}\n"
    )


def request_id_of(lines: list[str]) -> str:
    found = re.search(r"`oco approve ([0-9a-f]+)`", " ".join(lines))
    assert found, lines
    return found.group(1)


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    result: subprocess.CompletedProcess[str] = oco_cli(
        "audit", "--kind", "approval", "--json", "--config", str(tmp_path / "oco.yaml"), cwd=tmp_path
    )
    assert result.returncode == EXIT_OK, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


async def test_a_route_needing_approval_is_held_then_approved_denied_or_timed_out(tmp_path: Path) -> None:
    async with run_oco(bot_yaml(tmp_path), tmp_path) as bot:
        address = await bot.written("control.address")
        await bot.expect(r"callback 'deployer' is listening", stream="stderr")
        admin = ControlChat(address, user="alice")
        assert "now has the role approvers" in await admin.say("oco grant memory/carol approvers")
        assert "now has the role approvers" in await admin.say("oco grant memory/bob approvers")
        room = ControlChat(address)
        room.seen = admin.seen

        # Held: the bot asks, and the callback has not seen it.
        asked = await room.say_as("bob", "oco deploy prod", until="wants to run")
        assert asked == [
            f"Bob wants to run `deploy prod`; an approver (approvers) can say `oco approve {request_id_of(asked)}` "
            f"or `oco deny {request_id_of(asked)}` (within 3 s)"
        ]
        first = request_id_of(asked)
        # Not by the asker (though bob holds the role), nor by someone without it.
        assert await room.say_as("bob", f"oco approve {first}", until="someone else") == [
            f"you asked for {first}: someone else with the role approvers has to approve it"
        ]
        assert await room.say_as("dave", f"oco approve {first}", until="only people") == [
            f"only people with the role approvers may approve {first}"
        ]
        approved = await room.say_as("carol", f"oco approve {first}", until="deployed prod")
        assert approved == [
            f"`deploy prod` ({first}) approved by memory/carol; it runs now",
            "deployed prod (approved by memory/carol)",
        ]
        assert "no request" in (await room.say_as("carol", f"oco approve {first}", until="no request"))[0]

        # Denied: answered, and the callback never gets it.
        second = request_id_of(await room.say_as("bob", "oco deploy staging", until="wants to run"))
        assert await room.say_as("carol", f"oco deny {second} not on a Friday", until="denied") == [
            f"`deploy staging` ({second}) was denied by memory/carol: not on a Friday; it will not run"
        ]

        # Timed out after the rule's 3 s.
        third = request_id_of(await room.say_as("bob", "oco deploy qa", until="wants to run"))
        timed_out = await room.wait_for("in time", timeout=10)
        assert timed_out == [
            f"nobody approved `deploy qa` in time: approval {third} timed out after 3 s with 0 of 1 approvals"
        ]
        assert "no request" in (await room.say_as("carol", f"oco approve {third}", until="no request"))[0]

        # The callback declared approval by two people on `restart`.
        fourth = request_id_of(await room.say_as("dave", "oco restart api", until="wants to run"))
        assert await room.say_as("carol", f"oco approve {fourth}", until="noted") == [
            f"approval 1 of 2 for {fourth} noted; 1 more needed"
        ]
        assert (await room.say_as("carol", f"oco approve {fourth}", until="already"))[0] == (
            f"you approved {fourth} already; it needs 1 more"
        )
        assert (await room.say_as("bob", f"oco approve {fourth}", until="restarted api"))[-1] == (
            "restarted api (approved by memory/carol, memory/bob)"
        )

        # Mid-work: the callback asks, and waits for the answer.
        lines = await room.say_as("dave", "oco drop users", until="wants to run")
        assert lines[0] == "about to drop users"
        fifth = request_id_of(lines)
        assert "Dave wants to run `drop table users`" in lines[-1]
        assert (await room.say_as("carol", f"oco approve {fifth}", until="dropped users"))[-1] == (
            "dropped users (approved by memory/carol)"
        )
        sixth = request_id_of(await room.say_as("dave", "oco drop orders", until="wants to run"))
        assert (await room.say_as("dave", f"oco deny {sixth} wrong table", until="not dropping"))[-1] == (
            "not dropping: `drop table orders` was withdrawn by the asker: wrong table"
        )
        assert await bot.stop() == EXIT_OK

    decisions = [(r["decision"], r.get("user", ""), r["detail"].split(":")[0]) for r in audit(tmp_path)]
    assert decisions == [
        ("requested", "memory/bob", first),
        ("refused", "memory/bob", first),
        ("refused", "memory/dave", first),
        ("approve", "memory/carol", first),
        ("approved", "memory/carol", first),
        ("requested", "memory/bob", second),
        ("denied", "memory/carol", second),
        ("requested", "memory/bob", third),
        ("timed_out", "", third),
        ("requested", "memory/dave", fourth),
        ("approve", "memory/carol", fourth),
        ("approve", "memory/bob", fourth),
        ("approved", "memory/bob", fourth),
        ("requested", "memory/dave", fifth),
        ("approve", "memory/carol", fifth),
        ("approved", "memory/carol", fifth),
        ("requested", "memory/dave", sixth),
        ("denied", "memory/dave", sixth),
    ]
    records = audit(tmp_path)
    assert {(r["callback"], r["permission"]) for r in records} == {("deployer", "approvers")}
    # The operator sees the rule, and what it asks, in `oco rules list`.
    listed = oco_cli("rules", "list", "--config", str(tmp_path / "oco.yaml"), cwd=tmp_path)
    assert "(the callback's); approval by 1 of approvers within 3 s" in listed.stdout, listed
    listed = oco_cli("rules", "list", "--json", "--config", str(tmp_path / "oco.yaml"), cwd=tmp_path)
    assert json.loads(listed.stdout)["approval"] == {"role": "approvers", "count": 1, "timeout": 3.0}
    assert records[0]["route"] == "deploy"
    assert records[0]["room"] == "memory/general"


def test_a_malformed_approval_rule_is_refused_naming_the_key() -> None:
    from oco_core._config import parse_config
    from oco_core._errors import ConfigError

    base = "callbacks:\n  - id: deploy\n    secret: s3cret-s3cret-s3cret\n    route_rules:\n      deploy: "
    for rule, expected in (
        ("{approval: {count: 2}}", "callbacks[0].route_rules.deploy.approval.role"),
        ("{approval: {role: approvers, count: 0}}", "callbacks[0].route_rules.deploy.approval.count"),
        ("{approval: {role: approvers, timeout: soon}}", "expected a duration such as 8h"),
        ("{approval: {role: approvers, timeout: 2d}}", "callbacks[0].route_rules.deploy.approval.timeout"),
    ):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            parse_config(base + rule + "\n", "oco.yaml")
    loaded = parse_config(base + "{approval: {role: approvers, timeout: 10m}}\n", "oco.yaml")
    approval = loaded.config.callbacks[0].route_rules["deploy"].approval
    assert approval is not None
    assert (approval.role, approval.count, approval.timeout) == ("approvers", 1, 600.0)


async def test_a_request_whose_caller_stopped_waiting_is_withdrawn_in_chat(tmp_path: Path) -> None:
    from oco_core._proto import core_pb2, robot_pb2, robot_pb2_grpc

    secret = "asker-secret-0123456789abcdef"
    config = (
        "adapters:\n  - {type: memory, control: '127.0.0.1:0', control_address_file: control.address}\n"
        "grpc: {listen: '127.0.0.1:0'}\n"
        f"store: {{url: 'sqlite:///{tmp_path / 'oco.db'}'}}\n"
        f"callbacks:\n  - {{id: asker, secret: {secret}}}\n"
    )
    message = core_pb2.Message(
        body="rotate keys",
        source=core_pb2.Source(
            user=core_pb2.User(id="memory/erin", name="Erin"), room=core_pb2.Room(id="memory/general")
        ),
    )
    request = robot_pb2.RequestApprovalRequest(message=message, rule=robot_pb2.ApprovalRule(role="approvers"))

    def ask(address: str) -> grpc.StatusCode:
        with grpc.insecure_channel(address) as channel:
            try:
                robot_pb2_grpc.RobotStub(channel).RequestApproval(
                    request, metadata=(("authorization", f"Bearer {secret}"),), timeout=2
                )
            except grpc.RpcError as exc:
                return exc.code()
        raise AssertionError("RequestApproval answered before anyone approved or denied")

    async with run_oco(config, tmp_path) as bot:
        room = ControlChat(await bot.written("control.address"))
        assert await trio.to_thread.run_sync(ask, bot.address) == grpc.StatusCode.DEADLINE_EXCEEDED
        lines = await room.wait_for("no longer needed")
        assert lines[0].startswith("Erin wants to run `rotate keys`; an approver (approvers) can say `oco approve ")
        request_id = request_id_of(lines)
        assert lines[-1] == f"approval {request_id} is no longer needed: the asker callback stopped waiting"
        assert "no request" in (await room.say_as("carol", f"oco approve {request_id}", until="no request"))[0]
        assert await bot.stop() == EXIT_OK
    assert [r["decision"] for r in audit(tmp_path)] == ["requested", "withdrawn"]


def test_the_sdk_checks_an_approval_where_it_is_written() -> None:
    from oco_core import Callback

    bot = Callback(id="deployer", secret="secret-0123456789abcdef", address="127.0.0.1:1")
    for approval, expected in (
        ({"role": ""}, "role must name the role"),
        ({"role": "approvers", "count": 0}, "count must be a whole number from 1 to 10"),
        ({"role": "approvers", "timeout": -1}, "timeout must be seconds"),
        ({"role": "approvers", "who": "carol"}, "unknown key(s) who"),
    ):
        with pytest.raises(ValueError, match=re.escape(expected)):
            bot.respond(r"^deploy$", approval=approval)
