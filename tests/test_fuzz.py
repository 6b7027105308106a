"""Every RPC of a real ``oco run``, fuzzed with hypothesis the way a hostile callback would.

The methods come from the service descriptors of the generated code in
``oco_core._proto``, so a new RPC is fuzzed without touching this file. Each gets raw
bytes (arbitrary protobuf wire format) and well-formed but hostile messages built from
its request descriptor: NUL and odd Unicode, strings at the key, body and request-size
limits, huge repeated fields, extreme integers, keys that try to leave the caller's
namespace, another callback's id as ``plugin_id``, patterns RE2 refuses. The calls come
from callback ``alpha`` with its secret, with no secret, and with wrong secrets.

What a user would notice if it broke:

- every call ends with a deliberate status: never UNKNOWN or INTERNAL (an exception
  nobody handled), never a hang;
- a call without the right secret is refused with UNAUTHENTICATED, whatever it carries;
- nothing ``alpha`` receives contains callback ``beta``'s data, and nothing ``alpha``
  does changes ``beta``'s stored data or ends ``beta``'s Listen stream;
- afterwards the bot still runs, reports SERVING, stores and reads, and has logged no
  traceback.

Bugs the fuzzing found (undecodable requests answered UNKNOWN, long values echoed past
grpc's trailer limit, the memory adapter's outbox filling) have tests of their own below.
"""

from __future__ import annotations

import importlib
import pkgutil
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import trio
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import oco_core._proto
from oco_core._proto import control_pb2, control_pb2_grpc, core_pb2, robot_pb2, storage_pb2, storage_pb2_grpc
from oco_core.testing import OcoProcess, run_oco

ALPHA, BETA = "alpha", "beta"
SECRET_A = "fuzz-alpha-secret-0123456789abcdef"
SECRET_B = "fuzz-beta-secret-fedcba9876543210"
#: grpc.max_receive_bytes: a quarter of the default, so requests around it are cheap.
MAX_RECEIVE = 1 << 20
MAX_MESSAGE = 16384  # bot.max_message_bytes (the default)
MAX_KEY = 1024  # the Storage service's key limit, in UTF-8 bytes
#: alpha's messages a minute: keeps the fuzz under the memory adapter's 100 000 messages
#: (see test_the_memory_adapter_takes_more_than_100_000_messages).
SEND_RATE_LIMIT = 20_000
#: Generous: a call that takes this long on an idle loopback is a hang.
CALL_TIMEOUT = 30.0
#: Calls that wait for people by design (RequestApproval waits until approvers decide):
#: the fuzzer gives them this long, and their deadline passing is their answer, not a hang.
WAITING_CALLS = {"/oco.Robot/RequestApproval"}
WAITING_TIMEOUT = 0.5

#: Examples per method: the fuzz test takes about 30 s on two cores.
RAW_EXAMPLES = 50
HOSTILE_EXAMPLES = 100

#: Services in the generated code that are not the callback API: the memory adapter's
#: test-only control service is served on an address of its own.
NOT_ON_THE_API = {"oco.MemoryControl"}

#: Services the bot may not serve yet, which may answer UNIMPLEMENTED. What is served is
#: read from the bot's reflection service: an entry here that the bot serves is fuzzed
#: like every other, and a service missing from reflection and from this list fails the
#: test instead of going unfuzzed.
NOT_SERVED_YET: set[str] = set()

#: How grpc reports trailers over its 16 KiB limit (the bot once echoed a long request
#: value into the status details, and the client never saw the bot's own status).
TRANSPORT_ECHO = "received metadata size exceeds"

FORBIDDEN = {
    grpc.StatusCode.UNKNOWN,  # an exception escaped a handler
    grpc.StatusCode.INTERNAL,  # the edge caught an exception it did not expect
    grpc.StatusCode.DEADLINE_EXCEEDED,  # a hang
    grpc.StatusCode.UNAVAILABLE,  # the server went away (SQLite and memory are never "down")
    grpc.StatusCode.DATA_LOSS,
}


# -- the API, from the descriptors -----------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    """One method of the API."""

    method: MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method.name}"

    @property
    def service(self) -> str:
        return str(self.method.containing_service.full_name)

    @property
    def request(self) -> Descriptor:
        return self.method.input_type

    @property
    def response(self) -> Descriptor:
        return self.method.output_type

    def __repr__(self) -> str:
        return self.path


def _generated_modules() -> Iterator[ModuleType]:
    for info in pkgutil.iter_modules(oco_core._proto.__path__):
        if info.name.endswith("_pb2"):
            yield importlib.import_module(f"oco_core._proto.{info.name}")


def api_rpcs() -> list[Rpc]:
    """Every method of every service of the callback API in the generated code."""
    rpcs = [
        Rpc(method)
        for module in _generated_modules()
        for service in module.DESCRIPTOR.services_by_name.values()
        if service.full_name not in NOT_ON_THE_API
        for method in service.methods
    ]
    return sorted(rpcs, key=lambda r: r.path)


def _rpc(path: str) -> Rpc:
    return next(r for r in api_rpcs() if r.path == path)


def _decodes(descriptor: Descriptor, data: bytes) -> bool:
    try:
        message_factory.GetMessageClass(descriptor).FromString(data)
    except DecodeError:
        return False
    return True


# -- callers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who makes a call: its metadata, and the callback it authenticates as (if any)."""

    name: str
    metadata: tuple[tuple[str, str], ...]
    callback: str | None = None

    def __repr__(self) -> str:
        return f"Caller({self.name!r}, {self.metadata!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how hypothesis shows it
        printer.text(repr(self))


AS_ALPHA = Caller(ALPHA, (("authorization", f"Bearer {SECRET_A}"),), ALPHA)
AS_BETA = Caller(BETA, (("authorization", f"Bearer {SECRET_B}"),), BETA)


def _authenticates(value: str) -> bool:
    scheme, _, secret = value.partition(" ")
    return scheme.lower() == "bearer" and secret in (SECRET_A, SECRET_B)


_NEAR_MISSES = [
    "",
    "Bearer",
    "Bearer ",
    SECRET_A,
    f"Bearer{SECRET_A}",
    f"Bearer  {SECRET_A}",
    f"Basic {SECRET_A}",
    f"Bearer {SECRET_A[:-1]}",
    f"Bearer {SECRET_A}x",
    f"Bearer {SECRET_A.upper()}",
    f"Bearer {SECRET_A}{SECRET_B}",
    f"Bearer {SECRET_A[:16]}",
    "Bearer alpha",
    "Bearer beta",
    "Bearer cb:alpha",
    "Bearer " + "A" * 2000,
]
_ASCII = st.characters(min_codepoint=0x21, max_codepoint=0x7E)  # what grpc lets a client send
_wrong_secret = st.one_of(
    st.sampled_from(_NEAR_MISSES),
    st.text(_ASCII, max_size=60).map(lambda s: f"Bearer {s}"),
    st.text(_ASCII, max_size=60),
).filter(lambda v: not _authenticates(v))

UNAUTHENTICATED_CALLERS = st.one_of(
    st.just(Caller("no secret", ())),
    _wrong_secret.map(lambda v: Caller("wrong secret", (("authorization", v),))),
    st.just(Caller("wrong header", (("x-authorization", f"Bearer {SECRET_A}"),))),
)
#: Two calls in three as alpha, where there is more to get wrong.
CALLERS = st.one_of(st.just(AS_ALPHA), st.just(AS_ALPHA), UNAUTHENTICATED_CALLERS)


# -- hostile values --------------------------------------------------------------------

HOSTILE = [
    "",
    "\x00",
    "a\x00b",
    "/",
    "//",
    ".",
    "..",
    "../",
    "../../",
    "./",
    "*",
    "%",
    "_",
    "\\",
    ":",
    "cb:",
    "cb:beta",
    "cb:beta/",
    "cb:beta/secret-of-beta",
    "cb:beta\x00secret-of-beta",
    "cb:alpha",
    "../cb:beta/secret-of-beta",
    "beta",
    "alpha",
    "example",
    "bot",
    "adapter:memory",
    "secret-of-beta",
    "secret-of-beta\x00",
    "memory/general",
    "memory/alice",
    "memory/bob",
    "memory/",
    "memory",
    "memory/../general",
    "memory/general\x00",
    "irc/#ops",
    "nope/nothing",
    "\u202e",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "\U0001f600",
    "\n",
    "\r\n",
    " ",
    "\t",
    "'; DROP TABLE oco_kv; --",
    "${HOME}",
    "%s%n%x",
    "{}",
]

RE2_HOSTILE = [
    "(a*)*$",
    "(a+)+b",
    "(?P<x>a)(?P<x>b)",
    "(?P<>a)",
    "(?P<name",
    "a{1001}",
    "a{1000}{1000}",
    "(a{999}){999}",
    "((a{100}){100}){100}",
    "(" * 1000 + "a" + ")" * 1000,
    "(" * 5000,
    ")",
    "[",
    "[z-a]",
    "\\",
    "\\1",
    "(a)\\1",
    "\\C",
    "\\C*",
    "(?<=a)b",
    "(?=a)",
    "(?!a)",
    "(?i)",
    "(?z)",
    "\\p{Greek}",
    "\\p{NoSuchClass}",
    "[[:alpha:]]",
    "[[:nope:]]",
    "x**",
    "a{2,1}",
    "\\Q(\\E",
    "^$",
    ".*",
    "(?s).",
    "\\z",
    "(|)*",
    "\x00",
    "\\x{110000}",
    "\\xff",
    "|".join(str(n) for n in range(20000)),
    ".{1000}" * 20,
]


def _sized(units: Sequence[str], low: int, high: int) -> st.SearchStrategy[str]:
    """Strings of ``low``..``high`` UTF-8 bytes (as near as a unit allows), cheap to build."""
    return st.builds(lambda unit, n: unit * (n // len(unit.encode())), st.sampled_from(units), st.integers(low, high))


_UNITS = ["x", "é", "\U0001f600", "\x00", "/..", "cb:beta/"]
_text_piece = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=6))
TEXT = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(min_size=1),  # any code point but surrogates (UTF-8 cannot carry them), NUL included
    st.lists(_text_piece, min_size=1, max_size=8).map("".join),
)
#: Around the largest request, and big but below it.
HUGE_TEXT = st.one_of(_sized(_UNITS, MAX_RECEIVE - 64, MAX_RECEIVE + 64), _sized(_UNITS, 64 << 10, 256 << 10))
KEYS = st.one_of(
    TEXT,
    _sized(_UNITS, MAX_KEY - 4, MAX_KEY + 4),
    st.lists(st.sampled_from(["cb:beta", "..", "/", "secret-of-beta", "\x00", "beta", "*"]), min_size=1).map("".join),
)
IDS = st.one_of(TEXT, st.sampled_from(["memory/general", "memory/alice", "memory/bob"]))
BODIES = st.one_of(TEXT, _sized(_UNITS, MAX_MESSAGE - 8, MAX_MESSAGE + 8))

#: Field names that deserve hostile values of their own; any other string gets TEXT.
STRINGS_BY_FIELD: dict[str, st.SearchStrategy[str]] = {
    "key": KEYS,
    "prefix": KEYS,
    "start_after": KEYS,
    "plugin_id": st.one_of(
        st.sampled_from(["", ALPHA]), TEXT, st.sampled_from([BETA, "Beta", f"{BETA} ", f"{ALPHA}\x00", "example"])
    ),
    "pattern": st.one_of(
        st.sampled_from(["^ping$", "(?P<app>\\w+) to (\\S+)", "(?i)\\bthanks\\b", "\\p{Greek}+", "^$"]),
        st.text(st.characters(categories=["L", "N", "Zs"]), min_size=1, max_size=12),
        st.sampled_from(RE2_HOSTILE),
        TEXT,
    ),
    "id": IDS,
    "room_id": IDS,
    "user_id": IDS,
    "body": BODIES,
}

U64 = st.one_of(
    st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)
I64 = st.one_of(st.sampled_from([-(2**63), -1, 0, 2**63 - 1]), st.integers(-(2**63), 2**63 - 1))
U32 = st.one_of(st.sampled_from([0, 1, 100, 1000, 1001, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
I32 = st.one_of(st.sampled_from([-(2**31), -1, 0, 2**31 - 1]), st.integers(-(2**31), 2**31 - 1))
_small_bytes = st.binary(max_size=64)
BYTES = st.one_of(
    _small_bytes,
    _small_bytes,
    _small_bytes,
    st.builds(
        lambda unit, n: unit * (n // len(unit)), st.binary(min_size=1, max_size=4), st.integers(256, MAX_RECEIVE)
    ),
)

_F = FieldDescriptor
_INTS = {
    _F.TYPE_UINT64: U64,
    _F.TYPE_FIXED64: U64,
    _F.TYPE_INT64: I64,
    _F.TYPE_SINT64: I64,
    _F.TYPE_SFIXED64: I64,
    _F.TYPE_UINT32: U32,
    _F.TYPE_FIXED32: U32,
    _F.TYPE_INT32: I32,
    _F.TYPE_SINT32: I32,
    _F.TYPE_SFIXED32: I32,
}


def _scalar(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if fd.message_type is not None:
        return messages(fd.message_type, depth + 1)
    if fd.type == _F.TYPE_STRING:
        return STRINGS_BY_FIELD.get(fd.name, TEXT)
    if fd.type == _F.TYPE_BYTES:
        return BYTES
    if fd.type == _F.TYPE_BOOL:
        return st.booleans()
    if fd.enum_type is not None:  # proto3 enums are open: any int32 arrives as it is
        return st.one_of(st.sampled_from([v.number for v in fd.enum_type.values]), I32)
    if fd.type in (_F.TYPE_DOUBLE, _F.TYPE_FLOAT):
        return st.floats(width=32 if fd.type == _F.TYPE_FLOAT else 64)
    return _INTS[fd.type]


def _size(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, ProtoMessage):
        return value.ByteSize()
    return 8


def _copies(values: list[Any], count: int) -> list[Any]:
    """``count`` copies of ``values``, fewer where that would pass twice the largest request."""
    each = sum(_size(v) + 2 for v in values)
    return values * max(1, min(count, 2 * MAX_RECEIVE // each))


def _repeated(element: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    few = st.lists(element, max_size=4)
    # Many copies of a few values: thousands of entries without thousands of draws.
    many = st.builds(_copies, st.lists(element, min_size=1, max_size=3), st.integers(50, 5000))
    return st.one_of(few, few, many)


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Well-formed, hostile instances of the message ``descriptor`` describes."""

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        message = message_factory.GetMessageClass(descriptor)()
        for fd in descriptor.fields:
            # Most fields set, some left out; an optional one (expected_version) half the time.
            if depth > 3 or not draw(st.integers(0, 1 if fd.has_presence and fd.containing_oneof else 3)):
                continue
            target = getattr(message, fd.name)
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                key_fd, value_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
                entries = draw(st.dictionaries(_scalar(key_fd, depth), _scalar(value_fd, depth), max_size=4))
                for k, v in entries.items():
                    if value_fd.type == _F.TYPE_MESSAGE:
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v
            elif fd.is_repeated:
                values = draw(_repeated(_scalar(fd, depth)))
                target.extend(values)
            elif fd.type == _F.TYPE_MESSAGE:
                target.CopyFrom(draw(_scalar(fd, depth)))
            else:
                setattr(message, fd.name, draw(_scalar(fd, depth)))
        # Now and then one string field about the size of the largest request.
        strings = [fd for fd in descriptor.fields if fd.type == _F.TYPE_STRING and not fd.is_repeated]
        if strings and depth == 0 and draw(st.integers(0, 15)) == 0:
            setattr(message, draw(st.sampled_from(strings)).name, draw(HUGE_TEXT))
        return message

    return build()


# -- raw wire format -------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def wire(descriptor: Descriptor | None, depth: int = 0) -> st.SearchStrategy[bytes]:
    """Protobuf wire format for ``descriptor`` (None: fields nobody declared): known and
    unknown field numbers, right and wrong wire types, nested and deeply nested fields."""
    known = {fd.number: fd for fd in descriptor.fields} if descriptor is not None else {}
    any_number = st.integers(1, 2**29 - 1)
    numbers = st.one_of(st.sampled_from(sorted(known)), any_number) if known else any_number

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        out = b""
        for _ in range(draw(st.integers(0, 5))):
            number = draw(numbers)
            fd = known.get(number)
            wire_type = draw(st.sampled_from([0, 1, 2, 5]))
            if wire_type == 0:
                payload = _varint(draw(U64))
            elif wire_type == 1:
                payload = draw(st.binary(min_size=8, max_size=8))
            elif wire_type == 5:
                payload = draw(st.binary(min_size=4, max_size=4))
            else:
                if fd is not None and fd.type == _F.TYPE_MESSAGE and depth < 3:
                    body = draw(wire(fd.message_type, depth + 1))
                elif fd is not None and fd.type == _F.TYPE_STRING:
                    body = draw(TEXT).encode()
                elif depth < 3:
                    body = draw(st.one_of(st.binary(max_size=16), TEXT.map(str.encode), wire(None, depth + 1)))
                else:
                    body = draw(st.binary(max_size=16))
                payload = _varint(len(body)) + body
            out += _varint(number << 3 | wire_type) + payload
        if depth == 0 and draw(st.integers(0, 7)) == 0:
            # An unknown field nested far deeper than any parser should recurse.
            nested = b""
            for _ in range(draw(st.integers(50, 500))):
                nested = _varint(99 << 3 | 2) + _varint(len(nested)) + nested
            out += nested
        return out

    return build()


@dataclass(frozen=True)
class Requests:
    """The request bytes of one call (one per message of a request stream). Its repr is
    short, for hypothesis to print; the blob hypothesis prints reproduces it exactly."""

    payloads: tuple[bytes, ...]
    messages: tuple[ProtoMessage, ...] = ()

    def __repr__(self) -> str:
        shown = []
        for n, payload in enumerate(self.payloads):
            # Text format only for small messages: hypothesis may ask for this repr often.
            small = n < len(self.messages) and len(payload) < 4096
            shown.append(f"{len(payload)} bytes: {_short(repr(str(self.messages[n]) if small else payload))}")
        return f"Requests({shown})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


def _short(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def _one_or_many(rpc: Rpc, one: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    if rpc.method.client_streaming:
        return st.lists(one, max_size=4)
    return one.map(lambda item: [item])


def raw_requests(rpc: Rpc) -> st.SearchStrategy[Requests]:
    one = st.one_of(st.binary(max_size=48), wire(rpc.request))
    return _one_or_many(rpc, one).map(lambda payloads: Requests(tuple(payloads)))


def hostile_requests(rpc: Rpc) -> st.SearchStrategy[Requests]:
    return _one_or_many(rpc, messages(rpc.request)).map(
        lambda ms: Requests(tuple(m.SerializeToString() for m in ms), tuple(ms))
    )


def undecodable_requests(rpc: Rpc) -> st.SearchStrategy[Requests]:
    bad = st.one_of(st.binary(min_size=1, max_size=48), wire(rpc.request)).filter(
        lambda data: not _decodes(rpc.request, data)
    )
    many = st.lists(bad, min_size=1, max_size=3) if rpc.method.client_streaming else bad.map(lambda data: [data])
    return many.map(lambda payloads: Requests(tuple(payloads)))


# -- calling the bot -------------------------------------------------------------------


@dataclass
class Outcome:
    """How one call ended, and everything it brought back."""

    code: grpc.StatusCode
    details: str = ""
    responses: list[bytes] = field(default_factory=list)
    metadata: list[tuple[str, Any]] = field(default_factory=list)
    #: A streaming call the server accepted: it answered with headers and kept it open.
    accepted: bool = False

    def everything(self) -> bytes:
        parts = [self.details.encode("utf-8", "surrogateescape"), *self.responses]
        for key, value in self.metadata:
            parts += [key.encode(), value if isinstance(value, bytes) else str(value).encode()]
        return b"\x00".join(parts)

    def __repr__(self) -> str:
        sizes = [len(r) for r in self.responses]
        return f"Outcome({self.code.name}, {self.details[:300]!r}, responses={sizes}, accepted={self.accepted})"


def _metadata(call: Any) -> list[tuple[str, Any]]:
    return [(key, value) for key, value in [*(call.initial_metadata() or ()), *(call.trailing_metadata() or ())]]


def call(channel: grpc.Channel, rpc: Rpc, payloads: Sequence[bytes], caller: Caller) -> Outcome:
    """Call ``rpc`` with raw request bytes (one for a unary request, any number for a
    request stream). A response stream is cancelled once the server has accepted it."""
    method, metadata = rpc.method, caller.metadata
    try:
        if not method.client_streaming and not method.server_streaming:
            # Only a caller the bot accepts waits for approvers; the others must be refused,
            # which can take longer than WAITING_TIMEOUT on a busy machine (hashing secrets).
            waits = rpc.path in WAITING_CALLS and caller.callback is not None
            timeout = WAITING_TIMEOUT if waits else CALL_TIMEOUT
            response, done = channel.unary_unary(
                rpc.path, request_serializer=None, response_deserializer=None
            ).with_call(payloads[0], metadata=metadata, timeout=timeout)
            return Outcome(done.code(), done.details() or "", [response], _metadata(done))
        if not method.client_streaming:
            start = channel.unary_stream(rpc.path, request_serializer=None, response_deserializer=None)
            stream: Any = start(payloads[0], metadata=metadata, timeout=CALL_TIMEOUT)  # also a grpc.Future
            if any(key == "oco-routes" for key, _ in stream.initial_metadata() or ()):
                accepted = True  # Listen sends these once its routes are registered
            else:
                try:
                    stream.exception(timeout=2.0)  # a refused call ends at once
                    accepted = False
                except grpc.FutureTimeoutError:
                    accepted = True
            if accepted:
                stream.cancel()
            return Outcome(stream.code(), stream.details() or "", [], _metadata(stream), accepted=accepted)
        if not method.server_streaming:
            response, done = channel.stream_unary(
                rpc.path, request_serializer=None, response_deserializer=None
            ).with_call(iter(payloads), metadata=metadata, timeout=CALL_TIMEOUT)
            return Outcome(done.code(), done.details() or "", [response], _metadata(done))
        bidi = channel.stream_stream(rpc.path, request_serializer=None, response_deserializer=None)(
            iter(payloads), metadata=metadata, timeout=CALL_TIMEOUT
        )
        responses = list(bidi)
        return Outcome(bidi.code(), bidi.details() or "", responses, _metadata(bidi))
    except grpc.RpcError as error:
        failed: Any = error  # also a grpc.Call
        return Outcome(failed.code(), failed.details() or "", [], _metadata(failed))


class Fuzzer:
    """Makes a call as someone and checks what came back."""

    def __init__(self, channel: grpc.Channel, served: set[str], marker: str) -> None:
        self.channel = channel
        self.served = served
        self.marker = marker.encode()
        self.seen: Counter[tuple[str, str, str]] = Counter()
        self.sample: dict[tuple[str, str, str], str] = {}

    def __call__(self, rpc: Rpc, payloads: Sequence[bytes], caller: Caller) -> Outcome:
        outcome = call(self.channel, rpc, payloads, caller)
        seen = (rpc.path, "alpha" if caller.callback else "unauthenticated", outcome.code.name)
        self.seen[seen] += 1
        self.sample.setdefault(seen, outcome.details[:120])
        where = f"{rpc.path} as {caller!r} -> {outcome!r}"
        everything = outcome.everything()
        assert self.marker not in everything, f"beta's data reached the caller: {where}"
        assert SECRET_B.encode() not in everything, f"beta's secret reached the caller: {where}"
        if rpc.service not in self.served and outcome.code == grpc.StatusCode.UNIMPLEMENTED:
            return outcome
        if rpc.path in WAITING_CALLS and outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED and caller.callback:
            return outcome  # accepted, and waiting for approvers when its deadline came
        assert outcome.code not in FORBIDDEN, f"no deliberate status: {where}"
        too_large = any(len(p) > MAX_RECEIVE for p in payloads)
        if caller.callback is None:
            allowed = {grpc.StatusCode.UNAUTHENTICATED} | ({grpc.StatusCode.RESOURCE_EXHAUSTED} if too_large else set())
            assert outcome.code in allowed, f"a call without the right secret was not refused: {where}"
            assert not outcome.accepted, f"a stream without the right secret was accepted: {where}"
            return outcome
        assert outcome.code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED), where
        if too_large:
            assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, f"a request over the limit: {where}"
            return outcome
        self._check_answer(rpc, payloads, outcome, where)
        return outcome

    def _check_answer(self, rpc: Rpc, payloads: Sequence[bytes], outcome: Outcome, where: str) -> None:
        """What alpha's call, within the size limit, must have been answered."""
        responses: list[Any] = [message_factory.GetMessageClass(rpc.response).FromString(r) for r in outcome.responses]
        requests: list[Any] = [message_factory.GetMessageClass(rpc.request).FromString(p) for p in payloads]
        plugin_id = getattr(requests[0], "plugin_id", "") if requests else ""
        if plugin_id not in ("", ALPHA):  # listening as another callback, or as anyone but itself
            assert outcome.code == grpc.StatusCode.PERMISSION_DENIED, f"plugin_id {_short(repr(plugin_id))}: {where}"
        if outcome.accepted and rpc.path == "/oco.Robot/Listen":
            routes = dict(outcome.metadata).get("oco-routes")
            assert routes == str(len(requests[0].routes)), f"oco-routes says {routes}: {where}"
        if outcome.code == grpc.StatusCode.OK and rpc.path == "/oco.Robot/SendMessageStream":
            # One result per request, in order, each with a deliberate code.
            assert [r.request_id for r in responses] == [r.request_id for r in requests], where
            codes = {grpc.StatusCode.UNKNOWN.value[0], grpc.StatusCode.INTERNAL.value[0]}
            assert not [r for r in responses if r.code in codes], where
        if outcome.code == grpc.StatusCode.OK and rpc.path == "/oco.Robot/SendMessageBatches":
            # One batch of results per batch, one result per request, in order.
            assert [[r.request_id for r in b.results] for b in responses] == [
                [r.request_id for r in b.requests] for b in requests
            ], where
            codes = {grpc.StatusCode.UNKNOWN.value[0], grpc.StatusCode.INTERNAL.value[0]}
            assert not [r for b in responses for r in b.results if r.code in codes], where
        if outcome.accepted and rpc.path == "/oco.Robot/ListenBatches":
            routes = dict(outcome.metadata).get("oco-routes")
            assert routes == str(len(requests[0].routes)), f"oco-routes says {routes}: {where}"
        if outcome.code == grpc.StatusCode.OK and rpc.path == "/oco.Storage/Set":
            # What was acknowledged reads back, whatever the key.
            get = [storage_pb2.GetRequest(key=requests[0].key).SerializeToString()]
            got = storage_pb2.GetResponse.FromString(self(_rpc("/oco.Storage/Get"), get, AS_ALPHA).responses[0])
            version = storage_pb2.SetResponse.FromString(outcome.responses[0]).version
            assert (got.found, got.value, got.version) == (True, requests[0].value, version), where

    def summary(self) -> str:
        lines = [f"  {k[0]} {k[1]}: {k[2]} x{n}, e.g. {self.sample[k]!r}" for k, n in sorted(self.seen.items())]
        return "\n".join(["calls by method, caller and status:", *lines])


FUZZ_SETTINGS = settings(
    deadline=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


def fuzz_raw(fuzzer: Fuzzer, rpc: Rpc) -> None:
    """Raw bytes that decode as the request (the rest: the undecodable xfail test)."""

    @settings(FUZZ_SETTINGS, max_examples=RAW_EXAMPLES)
    @given(requests=raw_requests(rpc), caller=CALLERS)
    def run(requests: Requests, caller: Caller) -> None:
        assume(all(_decodes(rpc.request, p) for p in requests.payloads))
        fuzzer(rpc, requests.payloads, caller)

    run()


def fuzz_hostile(fuzzer: Fuzzer, rpc: Rpc) -> None:
    """Well-formed requests full of hostile values."""

    @settings(FUZZ_SETTINGS, max_examples=HOSTILE_EXAMPLES)
    @given(requests=hostile_requests(rpc), caller=CALLERS)
    def run(requests: Requests, caller: Caller) -> None:
        fuzzer(rpc, requests.payloads, caller)

    run()


# -- the bot ---------------------------------------------------------------------------


def bot_config(workdir: Path, *, rate_limit: int | None = SEND_RATE_LIMIT) -> str:
    limit = f", rate_limit: {rate_limit}" if rate_limit else ""
    return (
        "adapters:\n"
        f'  - {{type: memory, control: "127.0.0.1:0", control_address_file: "{workdir / "control.address"}"}}\n'
        f'store: {{url: "sqlite:///{workdir / "oco.db"}", quota: {{max_keys: 20000, max_bytes: 16777216}}}}\n'
        f'grpc: {{listen: "127.0.0.1:0", max_receive_bytes: {MAX_RECEIVE}}}\n'
        f"bot: {{max_message_bytes: {MAX_MESSAGE}}}\n"
        "callbacks:\n"
        f"  - {{id: {ALPHA}, secret: {SECRET_A}{limit}}}\n"
        f"  - {{id: {BETA}, secret: {SECRET_B}}}\n"
    )


def open_channel(address: str) -> grpc.Channel:
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)])
    grpc.channel_ready_future(channel).result(timeout=30)
    return channel


def served_services(channel: grpc.Channel) -> set[str]:
    """What the bot says it serves, through its reflection service."""
    return set(ProtoReflectionDescriptorDatabase(channel).get_services())


def all_items(channel: grpc.Channel, caller: Caller) -> list[tuple[str, bytes, int]]:
    """Everything ``caller`` has stored, through the API."""
    storage = storage_pb2_grpc.StorageStub(channel)
    items: list[tuple[str, bytes, int]] = []
    after = ""
    while True:
        page = storage.List(
            storage_pb2.ListRequest(start_after=after, limit=1000), metadata=caller.metadata, timeout=30
        )
        items += [(i.key, i.value, i.version) for i in page.items]
        if not page.next_start_after:
            return items
        after = page.next_start_after


def play_chat(address: str) -> None:
    """Let the bot meet users and rooms, so that Directory calls find some, through the
    memory adapter's control service at ``address``."""
    with grpc.insecure_channel(address) as channel:
        control = control_pb2_grpc.MemoryControlStub(channel)
        control.Inject(control_pb2.InjectRequest(body="hello", user="alice", room="general"), timeout=30)
        control.Inject(control_pb2.InjectRequest(body="oco help", user="bob"), timeout=30)


def assert_healthy(process: OcoProcess, channel: grpc.Channel, served: set[str]) -> None:
    """Still running, SERVING, and a Set/Get round trip works."""
    assert process.process.poll() is None, "the bot exited"
    health = health_pb2_grpc.HealthStub(channel)
    for service in ["", *sorted(served & {r.service for r in api_rpcs()})]:
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    storage = storage_pb2_grpc.StorageStub(channel)
    key = f"after-the-fuzz-{uuid.uuid4().hex}"
    set_response = storage.Set(
        storage_pb2.SetRequest(key=key, value=b"still works"), metadata=AS_ALPHA.metadata, timeout=30
    )
    got = storage.Get(storage_pb2.GetRequest(key=key), metadata=AS_ALPHA.metadata, timeout=30)
    assert (got.found, got.value, got.version) == (True, b"still works", set_response.version)


def traceback_in(process: OcoProcess) -> str:
    """The first traceback the bot logged, with some context; empty when there is none."""
    text = "\n".join(process.stderr_lines)
    start = text.find("Traceback")
    return "" if start < 0 else text[max(0, start - 300) : start + 3000]


# -- the tests -------------------------------------------------------------------------


async def test_every_rpc_survives_hostile_callers_and_keeps_callbacks_apart(tmp_path: Path) -> None:
    rpcs = api_rpcs()
    assert {r.service for r in rpcs} >= {"oco.Robot", "oco.Storage", "oco.Directory"}
    marker = f"beta-only-{uuid.uuid4().hex}"

    def fuzz(process: OcoProcess, control: str) -> None:
        channel = open_channel(process.address)
        try:
            served = served_services(channel)
            unserved = {r.service for r in rpcs} - served
            assert unserved <= NOT_SERVED_YET, f"the bot does not serve {unserved}"
            play_chat(control)

            # beta's data, under its own names and under every name alpha is going to try...
            storage = storage_pb2_grpc.StorageStub(channel)
            for key in ["secret-of-beta", f"keys/{marker}", *(k for k in HOSTILE if k)]:
                value = f"{marker}:{key}".encode()
                storage.Set(storage_pb2.SetRequest(key=key, value=value), metadata=AS_BETA.metadata, timeout=30)
            before = all_items(channel, AS_BETA)
            # ... and a Listen stream of beta's, which nothing alpha does may end.
            request = robot_pb2.ListenRequest(plugin_id=BETA, routes=[robot_pb2.Route(id="all", pattern=".*")])
            listening: Any = channel.unary_stream(
                "/oco.Robot/Listen",
                request_serializer=robot_pb2.ListenRequest.SerializeToString,
                response_deserializer=core_pb2.Event.FromString,
            )(request, metadata=AS_BETA.metadata, timeout=600)
            assert ("oco-routes", "1") in list(listening.initial_metadata() or ())

            fuzzer = Fuzzer(channel, served, marker)
            try:
                for rpc in rpcs:
                    fuzz_raw(fuzzer, rpc)
                    fuzz_hostile(fuzzer, rpc)
            finally:
                print(fuzzer.summary())

            assert listening.is_active(), f"beta's Listen stream ended: {listening.code()} {listening.details()}"
            listening.cancel()
            assert all_items(channel, AS_BETA) == before, "beta's stored data changed"
            assert_healthy(process, channel, served)
        finally:
            channel.close()

    async with run_oco(bot_config(tmp_path), tmp_path) as process:
        # The memory adapter writes its control address when it is up, which may be after
        # the gRPC address run_oco waited for.
        control = await process.written("control.address")
        await trio.to_thread.run_sync(fuzz, process, control)
        assert process.process.poll() is None, "the bot exited"
        await process.stop()  # and its log read to the end
        assert not traceback_in(process), traceback_in(process)


async def test_undecodable_requests_are_refused_without_a_traceback(tmp_path: Path) -> None:
    def refuse(channel: grpc.Channel, served: set[str], rpc: Rpc) -> None:
        @settings(FUZZ_SETTINGS, max_examples=10)
        @given(requests=undecodable_requests(rpc), caller=CALLERS)
        @example(requests=Requests((b"\xff",)), caller=AS_ALPHA)
        @example(requests=Requests((b"\xff",)), caller=Caller("no secret", ()))
        def run(requests: Requests, caller: Caller) -> None:
            outcome = call(channel, rpc, requests.payloads, caller)
            where = f"{rpc.path} as {caller!r} -> {outcome!r}"
            if rpc.service not in served and outcome.code == grpc.StatusCode.UNIMPLEMENTED:
                return
            if caller.callback and rpc.path == "/oco.Robot/SendMessageStream":
                # The stream answers each request, a bad one too, and stays open.
                results = [robot_pb2.SendResult.FromString(r) for r in outcome.responses]
                assert outcome.code == grpc.StatusCode.OK, where
                assert len(results) == len(requests.payloads), where
                assert all(r.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for r in results), where
                assert all("not a valid oco.SendMessagesRequest" in r.error for r in results), where
                return
            if caller.callback and rpc.path == "/oco.Robot/SendMessageBatches":
                # Each batch that does not decode is answered by a batch of one failed result.
                batches = [robot_pb2.SendResultBatch.FromString(r) for r in outcome.responses]
                assert outcome.code == grpc.StatusCode.OK, where
                assert len(batches) == len(requests.payloads), where
                assert all(len(b.results) == 1 for b in batches), where
                failed = [b.results[0] for b in batches]
                assert all(r.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for r in failed), where
                assert all("not a valid oco.SendMessagesBatch" in r.error for r in failed), where
                return
            expected = grpc.StatusCode.INVALID_ARGUMENT if caller.callback else grpc.StatusCode.UNAUTHENTICATED
            assert outcome.code == expected, where
            if caller.callback:
                assert f"not a valid {rpc.request.full_name}" in outcome.details, where

        run()

    def fuzz(process: OcoProcess) -> None:
        channel = open_channel(process.address)
        try:
            served = served_services(channel)
            for rpc in api_rpcs():
                refuse(channel, served, rpc)
            assert_healthy(process, channel, served)
        finally:
            channel.close()

    async with run_oco(bot_config(tmp_path), tmp_path) as process:
        await trio.to_thread.run_sync(fuzz, process)
        await process.stop()  # and its log read to the end
        assert not traceback_in(process), traceback_in(process)


def _long_string_requests(descriptor: Descriptor, depth: int = 0) -> Iterator[tuple[str, ProtoMessage]]:
    """Two requests per string field (nested ones too) with that field 20 000 bytes
    long (unbalanced for a pattern, which the bot refuses) and every other field empty."""
    cls = message_factory.GetMessageClass(descriptor)
    for fd in descriptor.fields:
        if fd.type == _F.TYPE_STRING:
            # ASCII, and 4-byte characters that grpc percent-encodes to 12 bytes each.
            for filler in ("x" * 20_000, "\U0001f600" * 5_000):
                value = "(" + filler if fd.name == "pattern" else filler
                message = cls()
                if fd.is_repeated:
                    getattr(message, fd.name).append(value)
                else:
                    setattr(message, fd.name, value)
                yield fd.name, message
        elif fd.message_type is not None and not fd.message_type.GetOptions().map_entry and depth < 3:
            for path, inner in _long_string_requests(fd.message_type, depth + 1):
                message = cls()
                if fd.is_repeated:
                    getattr(message, fd.name).add().CopyFrom(inner)
                else:
                    getattr(message, fd.name).CopyFrom(inner)
                yield f"{fd.name}.{path}", message


async def test_long_values_in_a_request_still_get_the_bots_own_status(tmp_path: Path) -> None:
    def check(process: OcoProcess) -> list[str]:
        channel = open_channel(process.address)
        try:
            served = served_services(channel)
            lost = []
            for rpc in api_rpcs():
                if rpc.service not in served:
                    continue
                for path, message in _long_string_requests(rpc.request):
                    outcome = call(channel, rpc, [message.SerializeToString()], AS_ALPHA)
                    if TRANSPORT_ECHO in outcome.details:
                        lost.append(f"{rpc.path} with a long {path}: {outcome.details[:120]}")
            return lost
        finally:
            channel.close()

    async with run_oco(bot_config(tmp_path), tmp_path) as process:
        lost = await trio.to_thread.run_sync(check, process)
    assert not lost, "\n".join(lost)


async def test_the_memory_adapter_takes_more_than_100_000_messages(tmp_path: Path) -> None:
    def send(process: OcoProcess) -> list[grpc.StatusCode]:
        channel = open_channel(process.address)
        try:
            message = core_pb2.Message(body="x", source=core_pb2.Source(room=core_pb2.Room(id="memory/general")))
            request = robot_pb2.SendMessagesRequest(messages=[message] * 5000)
            codes = []
            for _ in range(21):  # 105 000 messages
                codes.append(
                    call(channel, _rpc("/oco.Robot/SendMessages"), [request.SerializeToString()], AS_ALPHA).code
                )
            return codes
        finally:
            channel.close()

    async with run_oco(bot_config(tmp_path, rate_limit=None), tmp_path) as process:
        codes = await trio.to_thread.run_sync(send, process)
    assert codes == [grpc.StatusCode.OK] * 21


async def test_the_standard_services_refuse_undecodable_requests_too(tmp_path: Path) -> None:
    """Health and reflection come from grpcio's own packages; bytes that are not their
    request get INVALID_ARGUMENT (no secret needed, as for those services) and no
    traceback, and a good Watch still streams."""

    def probe(process: OcoProcess) -> dict[str, grpc.StatusCode]:
        channel = open_channel(process.address)
        codes: dict[str, grpc.StatusCode] = {}
        try:
            calls: dict[str, Any] = {
                # No (de)serializers: raw bytes on the wire, which grpc-stubs cannot express.
                "Check": lambda: channel.unary_unary("/grpc.health.v1.Health/Check", None, None)(b"\xff", timeout=5),
                "Watch": lambda: list(
                    channel.unary_stream("/grpc.health.v1.Health/Watch", None, None)(b"\xff", timeout=5)
                ),
                "Reflection": lambda: list(
                    channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None, None)(
                        iter([b"\xff"]), timeout=5
                    )
                ),
            }
            for name, run in calls.items():
                try:
                    run()
                    codes[name] = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    codes[name] = exc.code()
            watch = channel.unary_stream(
                "/grpc.health.v1.Health/Watch",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )(health_pb2.HealthCheckRequest(service=""), timeout=30)
            # NOT_SERVING while the bot is still starting, then SERVING: Watch follows it.
            serving = any(status.status == health_pb2.HealthCheckResponse.SERVING for status in watch)
            codes["good Watch"] = grpc.StatusCode.OK if serving else grpc.StatusCode.UNKNOWN
            watch.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leave Call.cancel unannotated
        finally:
            channel.close()
        return codes

    async with run_oco(bot_config(tmp_path), tmp_path) as process:
        codes = await trio.to_thread.run_sync(probe, process)
        await process.stop()  # and its log read to the end
        assert not traceback_in(process), traceback_in(process)
    assert codes == {
        "Check": grpc.StatusCode.INVALID_ARGUMENT,
        "Watch": grpc.StatusCode.INVALID_ARGUMENT,
        "Reflection": grpc.StatusCode.INVALID_ARGUMENT,
        "good Watch": grpc.StatusCode.OK,
    }
