"""A callback program that knows only the OpenChatOps specification's two .proto files.

tests/test_spec_client.py generates ``core_pb2``, ``robot_pb2`` and ``robot_pb2_grpc``
from ``tests/spec_proto/`` and runs this script in a process of its own with them on
``PYTHONPATH`` (they would clash with oco_core's modules of the same package in one
descriptor pool). It uses nothing else of OCO: plain grpcio and the generated stubs.

Environment: ``OCO_ADDRESS``; ``SPEC_SECRET`` (this callback's secret); ``SPEC_PLUGIN_ID``
(this callback's id); ``SPEC_OTHER_ID`` (another configured callback's id).

It prints one line per finding on stdout, ``name value``, for the test to check:

- ``status <check> <CODE>`` for each call that must fail (wrong secret, no secret,
  another callback's plugin_id);
- ``listening`` once the Listen stream's response headers arrived (the bot sends them
  after registering the stream, so from then on no matched message can be missed);
- ``matched <json>`` with the event it received;
- ``sent`` after its SendMessages reply was accepted, ``joined`` after Join.
"""

from __future__ import annotations

import json
import os
import re
import sys

import core_pb2
import grpc
import robot_pb2
import robot_pb2_grpc

DEADLINE = 30.0


def bearer(secret: str) -> list[tuple[str, str]]:
    """The metadata that authenticates a call."""
    return [("authorization", f"Bearer {secret}")]


def failing_listen(robot: robot_pb2_grpc.RobotStub, plugin_id: str, metadata: list[tuple[str, str]]) -> str:
    """The status code of a Listen call that the bot must refuse."""
    stream = robot.Listen(robot_pb2.ListenRequest(plugin_id=plugin_id), metadata=metadata, timeout=DEADLINE)
    try:
        event = next(stream)
    except grpc.RpcError as exc:
        return exc.code().name
    stream.cancel()
    return f"OK(got {event.WhichOneof('type')})"


def failing_send(robot: robot_pb2_grpc.RobotStub, source: core_pb2.Source, metadata: list[tuple[str, str]]) -> str:
    """The status code of a SendMessages call that the bot must refuse."""
    request = robot_pb2.SendMessagesRequest(messages=[core_pb2.Message(body="must not be sent", source=source)])
    try:
        robot.SendMessages(request, metadata=metadata, timeout=DEADLINE)
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


def report(name: str, value: str = "") -> None:
    """One finding, for the test."""
    print(f"{name} {value}".rstrip(), flush=True)


def main() -> int:
    """Run the checks, then serve one matched message."""
    address = os.environ["OCO_ADDRESS"]
    secret = os.environ["SPEC_SECRET"]
    plugin_id = os.environ["SPEC_PLUGIN_ID"]
    other_id = os.environ["SPEC_OTHER_ID"]
    assert robot_pb2.DESCRIPTOR.package == "oco"
    assert "oco_core" not in sys.modules

    with grpc.insecure_channel(address) as channel:
        robot = robot_pb2_grpc.RobotStub(channel)
        wrong = "x" * len(secret) if secret[0] != "x" else "y" * len(secret)
        report("status listen-wrong-secret", failing_listen(robot, plugin_id, bearer(wrong)))
        report("status listen-no-secret", failing_listen(robot, plugin_id, []))
        report("status listen-other-plugin-id", failing_listen(robot, other_id, bearer(secret)))

        stream = robot.Listen(robot_pb2.ListenRequest(plugin_id=plugin_id), metadata=bearer(secret), timeout=DEADLINE)
        stream.initial_metadata()  # the bot has registered this stream's routes
        report("listening")
        event = next(stream)
        kind = event.WhichOneof("type")
        matched = event.matched_message
        message = matched.message
        report(
            "matched",
            json.dumps(
                {
                    "type": kind,
                    "pattern": matched.pattern,
                    "body": message.body,
                    "user": {
                        "id": message.source.user.id,
                        "name": message.source.user.name,
                        "mention_name": message.source.user.mention_name,
                    },
                    "room": {"id": message.source.room.id, "name": message.source.room.name},
                }
            ),
        )
        # A specification client has no capture groups: it matches again itself.
        found = re.search(matched.pattern, message.body)
        app = found.group(1) if found else "?"
        reply = core_pb2.Message(body=f"deploying {app}", source=message.source)
        robot.SendMessages(
            robot_pb2.SendMessagesRequest(WithMention=True, messages=[reply]), metadata=bearer(secret), timeout=DEADLINE
        )
        report("sent")
        report("status send-wrong-secret", failing_send(robot, message.source, bearer(wrong)))
        robot.Join(robot_pb2.JoinRequest(room=message.source.room), metadata=bearer(secret), timeout=DEADLINE)
        report("joined")
        stream.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
