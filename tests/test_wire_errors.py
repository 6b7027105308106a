"""Errors keep their class and attributes across the gRPC API.

Units: every class of the one table (``oco_core._errors.WIRE``) survives encoding and
decoding, and a status that names no class reads as its code says. End to end: a bot in
this process (memory adapter, and an adapter whose chat service is down), callbacks over
real gRPC, through the SDK (unary calls and SendMessageStream) and through plain
generated stubs, which see the trailing metadata robot.proto documents.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import grpc
import pytest
import trio

import oco_core
from oco_core import (
    AdapterError,
    Callback,
    CapabilityError,
    DataStoreUnavailableError,
    InvalidPatternError,
    InvalidRequestError,
    OcoError,
    QuotaExceededError,
    RateLimitedError,
    RequestTooLargeError,
    StoreUnavailableError,
    UnknownTargetError,
    ValueTooLargeError,
    VersionConflictError,
    _errors,
)
from oco_core._adapter import AdapterType, OutgoingMessage
from oco_core._errors import WIRE, from_status, from_wire, to_status, to_wire
from oco_core._plugins import Plugins, load_plugins
from oco_core._proto import core_pb2, robot_pb2, robot_pb2_grpc, storage_pb2, storage_pb2_grpc
from oco_core.testing import MemoryAdapter, MemoryConfig, RunningBot, open_bot, serving

ROOT = Path(__file__).resolve().parent.parent
SECRET = "secret-wire-0123456789abcdef"
NARROW = "secret-narrow-0123456789abcd"

# -- units: the table -----------------------------------------------------------------

#: One instance of every class in the table, with its attributes set.
SAMPLES: dict[type[OcoError], OcoError] = {
    e.__class__: e
    for e in [
        _errors.OcoError("something went wrong"),
        _errors.ConfigError("bot.name: must not be empty"),
        _errors.PluginError("no adapter type 'slack': pip install oco-adapter-slack"),
        _errors.SecretRefusedError("callback 'ops' already has a secret; rotate it instead"),
        _errors.StandbyError("this bot is a standby", active_address="oco-2.internal:50051"),
        _errors.ApprovalDeniedError("denied by irc/carol: not today", approval_id="7f3a", timed_out=True),
        _errors.QuestionUnansweredError("no answer within 60 s", question_id="9c1e", timed_out=True),
        AdapterError("the IRC connection is down", sent=2),
        UnknownTargetError("no room 'nowhere'"),
        _errors.StoreError("store database failed: disk full"),
        VersionConflictError("expected version 7, found 3", 3),
        StoreUnavailableError("the database cannot be reached"),
        ValueTooLargeError("value is 2000 bytes; the limit is 1000"),
        QuotaExceededError("quota exceeded", namespace="cb:alpha", quota="max_keys", limit=2),
        _errors.CallbackError("the callback misbehaved"),
        InvalidRequestError("the message has no target"),
        InvalidPatternError("ünï(", "missing ): ünï("),
        RequestTooLargeError("the message is 1001 bytes; the limit is 1000"),
        CapabilityError("callback 'ops' lacks the capability 'join'", capability="join"),
        DataStoreUnavailableError("this bot offers no data store 'mongo'", datastore="mongo"),
        RateLimitedError("over the rate limit; retry in 1.2 s", retry_after=1.25),
    ]
}


def attributes(exc: BaseException) -> dict[str, Any]:
    """What an exception carries: its message and the attributes the table names."""
    wire = next(w for w in WIRE if w.kind is type(exc))
    return {"message": str(exc), **{name: getattr(exc, name) for name in wire.fields}}


def test_every_class_of_the_tree_is_in_the_table_once() -> None:
    kinds = [w.kind for w in WIRE]
    assert len(kinds) == len(set(kinds))
    defined = {
        value
        for value in vars(_errors).values()
        if isinstance(value, type) and issubclass(value, OcoError) and value.__module__ == _errors.__name__
    }
    assert defined == set(kinds)
    # Everything the edge can raise is a subclass of these, and each is reachable from
    # the package, as the tree in the docstring says.
    assert all(getattr(oco_core, k.__name__) is k for k in kinds)
    assert set(SAMPLES) == set(kinds), "add a sample of the new class to SAMPLES"


@pytest.mark.parametrize("exc", list(SAMPLES.values()), ids=lambda e: type(e).__name__)
def test_every_class_round_trips_through_metadata_and_send_results(exc: OcoError) -> None:
    code, details, metadata = to_status(exc)
    assert code == next(w.code for w in WIRE if w.kind is type(exc))
    assert all(re.fullmatch(r"[a-z0-9-]+", k) and re.fullmatch(r"[!-~]*", v) for k, v in metadata), metadata
    back = from_status(code, details, metadata)
    assert type(back) is type(exc)
    assert attributes(back) == attributes(exc)
    wire = to_wire(exc)
    again = from_wire(wire.code, wire.details, wire.error_type, dict(wire.fields))
    assert type(again) is type(exc)
    assert attributes(again) == attributes(exc)


def test_the_old_tree_still_holds() -> None:
    from oco_core import _router, _secrets

    assert _router.InvalidPatternError is InvalidPatternError
    assert _secrets.SecretRefusedError is oco_core.SecretRefusedError
    assert issubclass(InvalidPatternError, ValueError)
    assert issubclass(InvalidPatternError, InvalidRequestError)


def test_a_subclass_outside_the_table_crosses_as_its_nearest_class() -> None:
    class ConnectionLostError(AdapterError):
        pass

    code, details, metadata = to_status(ConnectionLostError("the link to the server dropped", sent=1))
    back = from_status(code, details, metadata)
    assert (code, type(back), back.sent) == (grpc.StatusCode.UNAVAILABLE, AdapterError, 1)  # type: ignore[attr-defined]

    class TableMissingError(_errors.StoreError):
        pass

    code, details, metadata = to_status(TableMissingError("no table oco_kv"))
    assert (code, details) == (
        grpc.StatusCode.INTERNAL,
        "TableMissingError: no table oco_kv",
    )  # as generic clients saw it
    back = from_status(code, details, metadata)
    assert (type(back), str(back)) == (_errors.StoreError, "no table oco_kv")


def test_a_status_that_names_no_class_reads_as_its_code() -> None:
    implied: list[tuple[grpc.StatusCode, type[OcoError]]] = [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequestError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, RequestTooLargeError),
        (grpc.StatusCode.PERMISSION_DENIED, CapabilityError),
        (grpc.StatusCode.NOT_FOUND, UnknownTargetError),
        (grpc.StatusCode.ABORTED, VersionConflictError),
        (grpc.StatusCode.UNAVAILABLE, StoreUnavailableError),
        (grpc.StatusCode.UNAUTHENTICATED, _errors.CallbackError),
    ]
    for code, kind in implied:
        exc = from_status(code, "what the bot said", None)
        assert type(exc) is kind, code
        assert str(exc) == f"{code.name}: what the bot said"
    assert from_status(grpc.StatusCode.ABORTED, "", ()).current == -1  # type: ignore[attr-defined]
    assert from_status(grpc.StatusCode.PERMISSION_DENIED, "", ()).capability == ""  # type: ignore[attr-defined]
    # A class this client does not know (a newer bot), or one without its attributes:
    newer = [("oco-error-type", "ShinyNewError")]
    assert type(from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "x", newer)) is RequestTooLargeError
    bare = [("oco-error-type", "RateLimitedError")]
    assert type(from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "x", bare)) is RequestTooLargeError
    garbled = [("oco-error-type", "VersionConflictError"), ("oco-error-current", "seven")]
    assert from_status(grpc.StatusCode.ABORTED, "x", garbled).current == -1  # type: ignore[attr-defined]
    storage = {grpc.StatusCode.RESOURCE_EXHAUSTED: ValueTooLargeError}
    assert type(from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "x", (), implied=storage)) is ValueTooLargeError


def test_a_value_too_long_for_metadata_is_left_out() -> None:
    exc = InvalidPatternError("a" * 5000 + "(", "missing )")
    code, details, metadata = to_status(exc)
    assert sum(len(k) + len(v) for k, v in metadata) < 2 * _errors.MAX_FIELD_BYTES
    back = from_status(code, details, metadata)
    assert type(back) is InvalidRequestError  # the class is named, its pattern is not: the code decides
    assert "missing )" in str(back)


def test_robot_proto_documents_every_class_its_code_and_attributes() -> None:
    text = (ROOT / "proto" / "oco" / "robot.proto").read_text()
    rows = {
        m["name"]: (m["code"], m["rest"])
        for m in re.finditer(r"^// \| `(?P<name>\w+)` \| (?P<code>[A-Z_]+) \| (?P<rest>.*)\|$", text, re.M)
    }
    assert set(rows) == {w.kind.__name__ for w in WIRE}
    for wire in WIRE:
        code, rest = rows[wire.kind.__name__]
        assert code == wire.code.name, wire.kind.__name__
        documented = set(re.findall(r"`([a-z-]+)`", rest)) - {"inf", "max_keys", "max_bytes"}
        assert documented == {n.replace("_", "-") for n in wire.fields}, wire.kind.__name__
    assert "oco-error-type" in (ROOT / "docs" / "protocol.md").read_text()


# -- end to end -------------------------------------------------------------------------


class OutageAdapter(MemoryAdapter):
    """A memory adapter whose chat service goes away after ``allow`` messages: every
    send after that fails with AdapterError, as a dropped connection would."""

    allow = 0

    async def send(self, message: OutgoingMessage) -> str:
        if len(self.sent) >= self.allow:
            raise AdapterError("the chat service's connection is down; the message was not sent")
        return await super().send(message)


def plugins() -> tuple[Plugins, list[OutageAdapter]]:
    """The installed plugins plus the ``outage`` adapter type, and the adapters it makes."""
    made: list[OutageAdapter] = []

    def create(config: MemoryConfig) -> OutageAdapter:
        made.append(OutageAdapter(config))
        return made[-1]

    installed = load_plugins()
    outage = AdapterType("outage", create, MemoryConfig, description="a chat service that is down")
    return Plugins({**installed.adapters, "outage": outage}, installed.stores), made


def config(tmp_path: Path) -> str:
    return f"""
adapters: [{{type: memory}}, {{type: outage, name: down}}]
store: {{url: "sqlite:///{tmp_path}/oco.db", max_value_bytes: 100, quota: {{max_keys: 2}}}}
bot: {{max_message_bytes: 1000}}
callbacks:
  - {{id: wire, secret: {SECRET}, rate_limit: 6}}
  - id: narrow
    secret: {NARROW}
    capabilities: {{send: ["memory/general"], join: false, storage: false, directory: false,
                   check_permission: false}}
"""


@asynccontextmanager
async def bot_and_callback(tmp_path: Path, secret: str = SECRET) -> AsyncIterator[tuple[RunningBot, Callback]]:
    extra, _ = plugins()
    async with open_bot(config(tmp_path), plugins=extra) as running:
        cb = Callback(id="wire" if secret == SECRET else "narrow", secret=secret, address=running.address)
        async with serving(cb):
            yield running, cb


def _auth(secret: str = SECRET) -> tuple[tuple[str, str | bytes], ...]:
    return (("authorization", f"Bearer {secret}"),)


async def raw_error(running: RunningBot, call: Callable[[grpc.Channel], Any]) -> tuple[grpc.StatusCode, dict[str, str]]:
    """Run a call with plain generated stubs that must fail; its code and trailing metadata."""

    def work() -> tuple[grpc.StatusCode, dict[str, str]]:
        with grpc.insecure_channel(running.address) as channel:
            try:
                call(channel)
            except grpc.RpcError as exc:
                trailers: Any = exc.trailing_metadata()  # (key, value) pairs; the stubs say otherwise
                return exc.code(), dict(trailers or ())
        raise AssertionError("the call succeeded")

    return await trio.to_thread.run_sync(work)


def send_request(*rooms: str) -> robot_pb2.SendMessagesRequest:
    return robot_pb2.SendMessagesRequest(
        messages=[
            core_pb2.Message(body=f"to {room}", source=core_pb2.Source(room=core_pb2.Room(id=room))) for room in rooms
        ]
    )


async def test_a_compare_and_set_conflict_names_the_current_version(tmp_path: Path) -> None:
    async with bot_and_callback(tmp_path) as (running, cb):
        await cb.storage.set("k", b"1")
        await cb.storage.set("k", b"2")
        with pytest.raises(VersionConflictError) as caught:
            await cb.storage.set("k", b"3", expected_version=7)
        assert caught.value.current == 2
        with pytest.raises(VersionConflictError) as caught:
            await cb.storage.set("absent", b"x", expected_version=1)
        assert caught.value.current == 0

        # What any generated client sees: the documented trailing metadata.
        request = storage_pb2.SetRequest(key="k", value=b"x", expected_version=1)
        code, metadata = await raw_error(
            running, lambda channel: storage_pb2_grpc.StorageStub(channel).Set(request, metadata=_auth(), timeout=10)
        )
        assert code == grpc.StatusCode.ABORTED
        assert (metadata["oco-error-type"], metadata["oco-error-current"]) == ("VersionConflictError", "2")


async def test_a_quota_refusal_names_the_quota_and_its_limit(tmp_path: Path) -> None:
    async with bot_and_callback(tmp_path) as (_, cb):
        await cb.storage.set("one", b"1")
        await cb.storage.set("two", b"2")
        with pytest.raises(QuotaExceededError, match="max_keys") as caught:
            await cb.storage.set("three", b"3")
        assert (caught.value.quota, caught.value.limit, caught.value.namespace) == ("max_keys", 2, "cb:wire")
        with pytest.raises(ValueTooLargeError):  # a value too large is not a quota
            await cb.storage.set("two", b"x" * 101)


async def test_a_rate_limited_send_says_when_to_retry(tmp_path: Path) -> None:
    async with bot_and_callback(tmp_path) as (running, cb):
        # Six messages a minute (one more every ten seconds): the seventh is refused, over
        # SendMessageStream (the SDK) and over plain SendMessages.
        for n in range(6):
            await cb.send(f"message {n}", room="memory/general")
        with pytest.raises(RateLimitedError, match="rate limit of 6 messages a minute") as caught:
            await cb.send("one too many", room="memory/general")
        assert 0 < caught.value.retry_after <= 60

        request = send_request(*["memory/general"] * 3)
        code, metadata = await raw_error(
            running,
            lambda channel: robot_pb2_grpc.RobotStub(channel).SendMessages(request, metadata=_auth(), timeout=10),
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert metadata["oco-error-type"] == "RateLimitedError"
        assert 0 < float(metadata["oco-error-retry-after"]) <= 60
        assert len(running.adapter.sent) == 6  # nothing of the refused requests went out


async def test_a_capability_refusal_names_the_capability(tmp_path: Path) -> None:
    async with bot_and_callback(tmp_path, NARROW) as (running, cb):
        with pytest.raises(CapabilityError) as caught:
            await cb.storage.get("k")
        assert caught.value.capability == "storage"
        with pytest.raises(CapabilityError) as caught:
            await cb.directory.list_rooms()
        assert caught.value.capability == "directory"
        with pytest.raises(CapabilityError, match="memory/elsewhere") as caught:  # over SendMessageStream
            await cb.send("hi", room="memory/elsewhere")
        assert caught.value.capability == "send"

        join = robot_pb2.JoinRequest(room=core_pb2.Room(id="memory/new"))
        code, metadata = await raw_error(
            running, lambda channel: robot_pb2_grpc.RobotStub(channel).Join(join, metadata=_auth(NARROW), timeout=10)
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert (metadata["oco-error-type"], metadata["oco-error-capability"]) == ("CapabilityError", "join")


async def test_an_adapter_failure_arrives_as_an_adapter_error(tmp_path: Path) -> None:
    async with bot_and_callback(tmp_path) as (running, cb):
        with pytest.raises(AdapterError, match="connection is down") as caught:  # over SendMessageStream
            await cb.send("hello", room="down/general")
        assert type(caught.value) is AdapterError  # not StoreUnavailableError, as UNAVAILABLE used to read
        with pytest.raises(UnknownTargetError, match="nowhere"):
            await cb.send("hello", room="memory/nowhere")

        request = send_request("down/general")
        code, metadata = await raw_error(
            running,
            lambda channel: robot_pb2_grpc.RobotStub(channel).SendMessages(request, metadata=_auth(), timeout=10),
        )
        assert code == grpc.StatusCode.UNAVAILABLE
        assert metadata["oco-error-type"] == "AdapterError"


async def test_a_send_that_fails_part_way_says_how_many_went_out(tmp_path: Path) -> None:
    extra, made = plugins()
    async with open_bot(config(tmp_path), plugins=extra) as running:
        made[0].allow = 2
        request = send_request("down/general", "down/general", "down/general")
        code, metadata = await raw_error(
            running,
            lambda channel: robot_pb2_grpc.RobotStub(channel).SendMessages(request, metadata=_auth(), timeout=10),
        )
        assert (code, len(made[0].sent)) == (grpc.StatusCode.UNAVAILABLE, 2)
        assert metadata.get("oco-error-sent") == "2"


async def test_an_invalid_pattern_names_the_pattern_percent_encoded(tmp_path: Path) -> None:
    extra, _ = plugins()
    async with open_bot(config(tmp_path), plugins=extra) as running:
        listen = robot_pb2.ListenRequest(routes=[robot_pb2.Route(id="bad", pattern="ünï(")])
        code, metadata = await raw_error(
            running,
            lambda channel: list(robot_pb2_grpc.RobotStub(channel).Listen(listen, metadata=_auth(), timeout=10)),
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert metadata["oco-error-type"] == "InvalidPatternError"
        assert metadata["oco-error-pattern"] == "%C3%BCn%C3%AF("
        assert unquote(metadata["oco-error-pattern"]) == "ünï("
