"""The specification's messages and the Robot service's four methods never change on the wire.

A callback generated from the OpenChatOps specification's own core.proto and robot.proto
must keep working (proto/README.md). The fixed lists below are those files' content, as
PROTOCOL.md records it; they are compared with the descriptors of the generated modules
in oco_core._proto. Extensions (new fields with new numbers, new methods) are allowed;
any change of a listed name, number, type, label or oneof is not.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from google.protobuf import descriptor_pb2

from oco_core._proto import core_pb2, robot_pb2

F = descriptor_pb2.FieldDescriptorProto
STRING, BOOL, MESSAGE = F.TYPE_STRING, F.TYPE_BOOL, F.TYPE_MESSAGE


@dataclass(frozen=True)
class Field:
    """A field of the specification: name, number, type, message type, repeated, oneof."""

    name: str
    number: int
    type: F.Type.ValueType
    message: str = ""
    repeated: bool = False
    oneof: str = ""


@dataclass(frozen=True)
class Rpc:
    """A method of the specification's Robot service."""

    name: str
    request: str
    response: str
    server_streaming: bool = False


SPEC_MESSAGES: dict[str, dict[str, list[Field]]] = {
    "core.proto": {
        "Event": [Field("matched_message", 1, MESSAGE, "oco.MatchedMessage", oneof="type")],
        "MatchedMessage": [Field("message", 1, MESSAGE, "oco.Message"), Field("pattern", 2, STRING)],
        "Message": [Field("body", 1, STRING), Field("source", 2, MESSAGE, "oco.Source")],
        "Room": [Field("id", 1, STRING), Field("name", 2, STRING)],
        "Source": [Field("user", 1, MESSAGE, "oco.User"), Field("room", 2, MESSAGE, "oco.Room")],
        "User": [Field("id", 1, STRING), Field("name", 2, STRING), Field("mention_name", 3, STRING)],
    },
    "robot.proto": {
        "JoinRequest": [Field("room", 1, MESSAGE, "oco.Room")],
        "JoinResponse": [],
        "ListenRequest": [Field("plugin_id", 1, STRING)],
        "PartRequest": [Field("room", 1, MESSAGE, "oco.Room")],
        "PartResponse": [],
        "SendMessagesRequest": [
            Field("WithMention", 1, BOOL),
            Field("messages", 2, MESSAGE, "oco.Message", repeated=True),
        ],
        "SendMessagesResponse": [],
    },
}

SPEC_ROBOT = [
    Rpc("Join", "oco.JoinRequest", "oco.JoinResponse"),
    Rpc("Listen", "oco.ListenRequest", "oco.Event", server_streaming=True),
    Rpc("Part", "oco.PartRequest", "oco.PartResponse"),
    Rpc("SendMessages", "oco.SendMessagesRequest", "oco.SendMessagesResponse"),
]


def _file(module: object) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)  # type: ignore[attr-defined]
    return proto


def _files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    return {"core.proto": _file(core_pb2), "robot.proto": _file(robot_pb2)}


def message_differences(file: descriptor_pb2.FileDescriptorProto, expected: dict[str, list[Field]]) -> list[str]:
    """Every way ``file``'s messages differ from the specification's ``expected`` fields."""
    problems: list[str] = []
    if file.package != "oco":
        problems.append(f"{file.name}: package {file.package!r}, expected 'oco'")
    if file.syntax != "proto3":
        problems.append(f"{file.name}: syntax {file.syntax!r}, expected 'proto3'")
    messages = {m.name: m for m in file.message_type}
    for name, fields in expected.items():
        message = messages.get(name)
        if message is None:
            problems.append(f"message {name} is gone from {file.name}")
            continue
        by_name = {f.name: f for f in message.field}
        by_number = {f.number: f for f in message.field}
        for spec in fields:
            where = f"{name}.{spec.name} = {spec.number}"
            found = by_name.get(spec.name)
            if found is None:
                other = by_number.get(spec.number)
                now = f"; number {spec.number} is now {other.name!r}" if other else ""
                problems.append(f"{where}: no field of that name{now}")
                continue
            if found.number != spec.number:
                problems.append(f"{where}: renumbered to {found.number}")
            if found.type != spec.type:
                problems.append(f"{where}: type {F.Type.Name(found.type)}, expected {F.Type.Name(spec.type)}")
            if found.type_name.lstrip(".") != spec.message:
                problems.append(f"{where}: message type {found.type_name.lstrip('.')!r}, expected {spec.message!r}")
            if (found.label == F.LABEL_REPEATED) != spec.repeated:
                problems.append(f"{where}: repeated is now {found.label == F.LABEL_REPEATED}")
            if found.proto3_optional:
                problems.append(f"{where}: became `optional`")
            oneof = message.oneof_decl[found.oneof_index].name if found.HasField("oneof_index") else ""
            if oneof != spec.oneof:
                problems.append(f"{where}: in oneof {oneof!r}, expected {spec.oneof!r}")
    return problems


def robot_differences(file: descriptor_pb2.FileDescriptorProto, expected: list[Rpc]) -> list[str]:
    """Every way ``file``'s Robot service differs from the specification's four methods."""
    services = {s.name: s for s in file.service}
    robot = services.get("Robot")
    if robot is None:
        return [f"service oco.Robot is gone from {file.name}"]
    problems: list[str] = []
    if "core.proto" not in file.dependency:
        problems.append(f"{file.name} no longer imports core.proto by that name")
    methods = {m.name: m for m in robot.method}
    for rpc in expected:
        method = methods.get(rpc.name)
        if method is None:
            problems.append(f"rpc Robot.{rpc.name} is gone (path /oco.Robot/{rpc.name})")
            continue
        got = (method.input_type.lstrip("."), method.output_type.lstrip("."))
        if got != (rpc.request, rpc.response):
            problems.append(f"rpc Robot.{rpc.name}: {got[0]} -> {got[1]}, expected {rpc.request} -> {rpc.response}")
        if method.client_streaming:
            problems.append(f"rpc Robot.{rpc.name}: became client streaming")
        if method.server_streaming != rpc.server_streaming:
            problems.append(f"rpc Robot.{rpc.name}: server streaming is now {method.server_streaming}")
    return problems


@pytest.mark.parametrize("filename", sorted(SPEC_MESSAGES))
def test_the_specification_messages_are_unchanged(filename: str) -> None:
    assert message_differences(_files()[filename], SPEC_MESSAGES[filename]) == []


def test_the_robot_service_keeps_the_specification_methods() -> None:
    assert robot_differences(_files()["robot.proto"], SPEC_ROBOT) == []


def test_the_fixed_list_is_the_specification() -> None:
    # PROTOCOL.md: six messages in core.proto, seven in robot.proto, four RPCs.
    assert sum(len(fields) for fields in SPEC_MESSAGES["core.proto"].values()) == 12
    requests = [f"{rpc}{kind}" for rpc in ("Join", "Part", "SendMessages") for kind in ("Request", "Response")]
    assert sorted(SPEC_MESSAGES["robot.proto"]) == sorted([*requests, "ListenRequest"])
    assert [rpc.name for rpc in SPEC_ROBOT] == ["Join", "Listen", "Part", "SendMessages"]


def _mutated(filename: str, message: str, field: str, **changes: object) -> descriptor_pb2.FileDescriptorProto:
    file = _files()[filename]
    target = next(f for m in file.message_type if m.name == message for f in m.field if f.name == field)
    for key, value in changes.items():
        setattr(target, key, value)
    return file


@pytest.mark.parametrize(
    ("message", "field", "changes", "problem"),
    [
        ("User", "mention_name", {"number": 9}, "renumbered to 9"),
        ("User", "mention_name", {"name": "mention"}, "no field of that name"),
        ("Message", "body", {"type": F.TYPE_BYTES}, "type TYPE_BYTES"),
        ("Source", "user", {"type_name": ".oco.Room"}, "message type 'oco.Room'"),
        ("Room", "name", {"label": F.LABEL_REPEATED}, "repeated is now True"),
    ],
)
def test_a_change_on_the_wire_is_caught(message: str, field: str, changes: dict[str, object], problem: str) -> None:
    file = _mutated("core.proto", message, field, **changes)
    problems = message_differences(file, SPEC_MESSAGES["core.proto"])
    assert any(problem in p for p in problems), problems


def test_a_renamed_spec_field_in_robot_proto_is_caught() -> None:
    file = _mutated("robot.proto", "SendMessagesRequest", "WithMention", name="with_mention")
    assert message_differences(file, SPEC_MESSAGES["robot.proto"]) == [
        "SendMessagesRequest.WithMention = 1: no field of that name; number 1 is now 'with_mention'"
    ]


def test_a_changed_robot_method_is_caught() -> None:
    file = _files()["robot.proto"]
    robot = next(s for s in file.service if s.name == "Robot")
    listen = next(m for m in robot.method if m.name == "Listen")
    listen.server_streaming = False
    part = next(m for m in robot.method if m.name == "Part")
    part.name = "Leave"
    problems = robot_differences(file, SPEC_ROBOT)
    assert "rpc Robot.Listen: server streaming is now False" in problems
    assert "rpc Robot.Part is gone (path /oco.Robot/Part)" in problems


def test_extensions_are_allowed() -> None:
    file = _files()["core.proto"]
    user = next(m for m in file.message_type if m.name == "User")
    user.field.add(name="avatar_url", number=4, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    assert message_differences(file, SPEC_MESSAGES["core.proto"]) == []
