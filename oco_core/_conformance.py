"""``oco conformance``: checks that a bot speaks the OCO protocol, as its callbacks see it.

::

    oco conformance --address 127.0.0.1:50051 --id conformance --secret S \\
        [--other-id other --other-secret S2] [--control 127.0.0.1:50099]

It plays a callback program against any bot, ours or another implementation: the
specification's four RPCs with the specification's messages, secrets, route
registration, hear and respond semantics, capture groups, storage (compare-and-set,
isolation between two callbacks), refusal of invalid patterns, errors named in trailing
metadata, what cancelling a Listen stream does, the specific data stores' API
(``oco.DataStores``, ``ListenRequest.requires``), and events beyond chat: publish and
subscribe, acknowledgement and redelivery, webhooks (with ``--http``), and the protocol
of rich replies (ids of sent messages, reactions and edits as events, renames). Each
check prints one line (``PASS``, ``FAIL`` or ``SKIP``, its name, what it saw) and a
summary line follows.

Two kinds of skip: a check the suite cannot run with the options given (no
``--control``, no second callback) leaves the bot unproven, so the run does not pass;
a check of an optional feature the bot does not offer (data stores: a bot may offer
none) does not apply, and counts as not failed. The exit code is 0 when no check failed
and every skip was of the second kind.

To check what a callback receives, the suite has to write chat messages as a user
would. It does that through the memory adapter's test-only control service
(``oco.MemoryControl``, proto/oco/control.proto), which a bot serves only when its
config asks for it; without ``--control`` those checks are skipped (and the run does
not count as passed). The bot's config needs the callbacks the suite plays::

    adapters: [{type: memory, control: "127.0.0.1:50099"}]
    callbacks:
      - {id: conformance, secret: "at-least-16-characters"}
      - {id: other, secret: "another-16-character-secret"}

Every route pattern and storage key carries a random token of the run, so runs against
a long-lived bot never see each other's data; storage keys are deleted afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import ssl
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO, TypeVar

import grpc
import grpc.aio
import trio

from ._bridge import DEFAULT_WINDOW, Bridge, ResponseStream, open_bridge
from ._proto import (
    control_pb2,
    control_pb2_grpc,
    core_pb2,
    datastores_pb2,
    datastores_pb2_grpc,
    robot_pb2,
    robot_pb2_grpc,
    storage_pb2,
    storage_pb2_grpc,
)

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]
Status = Literal["PASS", "FAIL", "SKIP"]

#: A body larger than any bot should accept as one chat message (the gRPC limit is 4 MiB).
_TOO_LARGE = 1 << 20


@dataclass(frozen=True)
class Target:
    """The bot under test and the credentials the suite plays callbacks with."""

    address: str
    id: str
    secret: str = field(repr=False)
    other_id: str | None = None
    other_secret: str | None = field(default=None, repr=False)
    control: str | None = None
    #: The data-store type the access checks ask for (default: the first the bot offers).
    datastore: str | None = None
    bot_name: str = "oco"
    #: The bot's HTTP server ("http://127.0.0.1:8080"), for the webhook checks.
    http: str | None = None
    #: The bearer token the suite's callback's webhook_auth asks for, if any.
    webhook_token: str | None = field(default=None, repr=False)
    room: str = "general"
    user: str = "alice"
    timeout: float = 10.0


@dataclass(frozen=True)
class Result:
    """The outcome of one check."""

    name: str
    status: Status
    detail: str
    #: A skip because the bot does not offer an optional feature: not a failure.
    not_offered: bool = False

    def line(self) -> str:
        """The line printed for this check."""
        return f"{self.status} {self.name}: {self.detail}"

    @property
    def counts_against(self) -> bool:
        """Whether this result keeps the bot from conforming: a failure, or a skip for
        want of an option (the suite could not check what it should have)."""
        return self.status == "FAIL" or (self.status == "SKIP" and not self.not_offered)


class CheckFailed(Exception):  # noqa: N818 - a verdict, not an error of the suite
    """A check saw something the protocol does not allow."""


class CheckSkipped(Exception):  # noqa: N818 - a verdict, not an error of the suite
    """A check cannot run with the options given."""


class NotOffered(CheckSkipped):
    """The bot does not offer an optional feature the check is about: the check does not
    apply, and its skip does not count against the bot."""


@dataclass(frozen=True)
class Check:
    """One check: a name, what it needs (``control``, ``other``), and the function."""

    name: str
    needs: frozenset[str]
    doc: str
    run: Callable[[Suite], Awaitable[str]]


CHECKS: list[Check] = []


def check(name: str, *, needs: Sequence[str] = ()) -> Callable[[Callable[[Suite], Awaitable[str]]], Any]:
    """Register a check: an async function of the suite that returns what it saw, or
    raises :class:`CheckFailed`."""

    def register(fn: Callable[[Suite], Awaitable[str]]) -> Callable[[Suite], Awaitable[str]]:
        doc = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())
        CHECKS.append(Check(name, frozenset(needs), doc, fn))
        return fn

    return register


def _code(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"


class Listener:
    """One open Listen stream, read from trio."""

    def __init__(self, stream: ResponseStream, headers: dict[str, str], timeout: float) -> None:
        self._events = aiter(stream)
        self.headers = headers
        self.timeout = timeout

    async def event(self, within: float | None = None) -> core_pb2.Event:
        """The next event; CheckFailed when none comes ``within`` seconds or the stream ends."""
        wait = self.timeout if within is None else within
        with trio.move_on_after(wait):
            try:
                event: core_pb2.Event = await anext(self._events)
            except StopAsyncIteration:
                raise CheckFailed("the bot ended the Listen stream") from None
            return event
        raise CheckFailed(f"no event within {wait:g} s")

    async def published(self, within: float | None = None) -> core_pb2.Event:
        """The next event that is a published event."""
        while True:
            event = await self.event(within)
            if event.WhichOneof("type") == "published_event":
                return event

    async def matched(self, within: float | None = None) -> core_pb2.MatchedMessage:
        """The next matched message (other kinds of events are skipped)."""
        while True:
            event = await self.event(within)
            if event.WhichOneof("type") == "matched_message":
                return event.matched_message


class Suite:
    """The connections to the bot (and its control service) and the helpers checks use."""

    def __init__(self, target: Target, bridge: Bridge, channel: grpc.aio.Channel) -> None:
        self.target = target
        self.bridge = bridge
        self.timeout = target.timeout
        self.robot = robot_pb2_grpc.RobotStub(channel)
        self.storage = storage_pb2_grpc.StorageStub(channel)
        self.datastores = datastores_pb2_grpc.DataStoresStub(channel)
        self.control: control_pb2_grpc.MemoryControlAsyncStub | None = None
        #: A token unique to this run, in every pattern and key.
        self.token = secrets.token_hex(4)
        self._sent_seen = 0
        self._source: core_pb2.Source | None = None
        self._offered: tuple[str, ...] | None = None

    # -- calls -----------------------------------------------------------------------

    def metadata(self, secret: str | None = None) -> Metadata:
        """The metadata that authenticates a call with ``secret`` (default: the suite's)."""
        return (("authorization", f"Bearer {secret if secret is not None else self.target.secret}"),)

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one unary call (``fn`` makes it, on the bridge's loop)."""
        return await self.bridge.run_asyncio(fn)

    async def expect_code(self, what: str, code: grpc.StatusCode, fn: Callable[[], Awaitable[Any]]) -> str:
        """Run a unary call that must fail with ``code``; return its details."""
        return (await self.refusal(what, code, fn)).details() or ""

    async def refusal(self, what: str, code: grpc.StatusCode, fn: Callable[[], Awaitable[Any]]) -> grpc.aio.AioRpcError:
        """Run a unary call that must fail with ``code``; return the error (its details
        and trailing metadata)."""
        try:
            await self.call(fn)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != code:
                raise CheckFailed(f"{what}: expected {code.name}, got {_code(exc)}") from None
            return exc
        raise CheckFailed(f"{what}: expected {code.name}, but the call succeeded")

    def _listen_request(
        self,
        routes: Sequence[robot_pb2.Route],
        plugin_id: str | None,
        secret: str | None,
        topics: Sequence[str] = (),
        acknowledge: bool = False,
        events: Sequence[robot_pb2.EventKind.ValueType] = (),
    ) -> robot_pb2.ListenRequest:
        if plugin_id is None:
            plugin_id = self.target.other_id if secret is not None and secret == self.target.other_secret else None
        return robot_pb2.ListenRequest(
            plugin_id=self.target.id if plugin_id is None else plugin_id,
            routes=routes,
            topics=topics,
            acknowledge=acknowledge,
            events=events,
        )

    @asynccontextmanager
    async def listen(
        self,
        routes: Sequence[robot_pb2.Route] = (),
        *,
        secret: str | None = None,
        plugin_id: str | None = None,
        unbuffered: bool = False,
        topics: Sequence[str] = (),
        acknowledge: bool = False,
        events: Sequence[robot_pb2.EventKind.ValueType] = (),
        request: robot_pb2.ListenRequest | None = None,
    ) -> AsyncIterator[Listener]:
        """Open a Listen stream and wait for its response headers (the routes are then
        registered); leaving the block cancels the stream. ``unbuffered``: on a channel
        of its own whose HTTP/2 window stays small, read one event at a time, so that
        a stream not read holds events in the bot rather than in the transport.
        ``topics``, ``acknowledge`` and ``events`` as in ListenRequest; ``request``: this
        one instead."""
        if request is None:
            request = self._listen_request(routes, plugin_id, secret, topics, acknowledge, events)
        metadata = self.metadata(secret)
        robot, window = self.robot, DEFAULT_WINDOW
        async with contextlib.AsyncExitStack() as stack:
            if unbuffered:
                channel = await self.bridge.open_channel(self.target.address, _SMALL_WINDOW)
                stack.push_async_callback(self.bridge.close_channel, channel)
                robot, window = robot_pb2_grpc.RobotStub(channel), 1
            stream = await stack.enter_async_context(
                self.bridge.open_response_stream(lambda: robot.Listen(request, metadata=metadata), window)
            )
            headers: dict[str, str] | None = None
            with trio.move_on_after(self.timeout):
                headers = await stream.initial_metadata()
            if headers is None:
                raise CheckFailed(f"Listen: no response headers within {self.timeout:g} s")
            listener = Listener(stream, headers, self.timeout)
            if "oco-routes" not in headers:
                # A refused call ends without headers: show why.
                try:
                    await listener.event(0.5)
                except grpc.aio.AioRpcError as exc:
                    raise CheckFailed(f"Listen was refused: {_code(exc)}") from None
                except CheckFailed:
                    pass
                raise CheckFailed(
                    "Listen's response headers lack `oco-routes` (robot.proto: the bot sends them once "
                    f"the routes are registered); headers: {headers}"
                )
            yield listener

    async def expect_listen_refused(
        self, what: str, code: grpc.StatusCode, request: robot_pb2.ListenRequest, metadata: Metadata
    ) -> str:
        """Open a Listen stream that must fail with ``code``; return its details."""
        return (await self.listen_refusal(what, code, request, metadata)).details() or ""

    async def listen_refusal(
        self, what: str, code: grpc.StatusCode, request: robot_pb2.ListenRequest, metadata: Metadata
    ) -> grpc.aio.AioRpcError:
        """Open a Listen stream that must fail with ``code``; return the error (its
        details and trailing metadata)."""
        async with self.bridge.open_response_stream(lambda: self.robot.Listen(request, metadata=metadata)) as stream:
            with trio.move_on_after(self.timeout):
                try:
                    headers = await stream.initial_metadata()
                    if "oco-routes" in headers:
                        raise CheckFailed(f"{what}: expected {code.name}, but the bot registered the stream")
                    async for _ in stream:
                        raise CheckFailed(f"{what}: expected {code.name}, but the stream delivered an event")
                    raise CheckFailed(f"{what}: expected {code.name}, but the stream ended with OK")
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != code:
                        raise CheckFailed(f"{what}: expected {code.name}, got {_code(exc)}") from None
                    return exc
        raise CheckFailed(f"{what}: expected {code.name}, but the stream stayed open for {self.timeout:g} s")

    # -- the chat side, through the control service ---------------------------------

    def _control(self) -> control_pb2_grpc.MemoryControlAsyncStub:
        if self.control is None:
            raise CheckSkipped("needs --control")
        return self.control

    async def inject(
        self,
        body: str,
        *,
        room: str | None = None,
        user: str | None = None,
        id: str = "",
        edit_of: str = "",
        attachments: Sequence[core_pb2.Attachment] = (),
    ) -> None:
        """Write ``body`` as a chat user, in ``room`` (default: --room; "" for a private
        message), with the chat service's ``id`` if given; with ``edit_of``, as an edit of
        that message; with ``attachments``, files the user sent. Returns once the bot has
        routed it."""
        control = self._control()
        request = control_pb2.InjectRequest(
            body=body,
            user=user or self.target.user,
            room=self.target.room if room is None else room,
            direct=room == "",
            id=id,
            edit_of=edit_of,
            attachments=attachments,
        )
        await self.call(lambda: control.Inject(request, timeout=self.timeout))

    async def control_call(self, method: str, request: Any) -> None:
        """Call ``method`` of the control service; CheckSkipped when it lacks the method
        (a control service older than the check)."""
        call = getattr(self._control(), method)
        try:
            await self.call(lambda: call(request, timeout=self.timeout))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise CheckSkipped(f"the control service at --control does not offer {method}") from None
            raise

    async def sent(self, *bodies: str) -> list[control_pb2.SentMessage]:
        """The first message the bot sends with each of ``bodies`` (after those already
        seen), in the order of ``bodies``."""
        found: dict[str, control_pb2.SentMessage] = {}
        deadline = trio.current_time() + self.timeout
        while (left := deadline - trio.current_time()) > 0 and len(found) < len(bodies):
            for message in await self.list_sent(left):
                if message.body in bodies:
                    found.setdefault(message.body, message)
        missing = [b for b in bodies if b not in found]
        if missing:
            raise CheckFailed(f"the bot sent no message {missing[0]!r} through the memory adapter")
        return [found[b] for b in bodies]

    async def list_sent(self, within: float) -> list[control_pb2.SentMessage]:
        """The messages the bot sent since the last call, waiting up to ``within`` seconds."""
        control = self._control()
        request = control_pb2.ListSentRequest(after=self._sent_seen, wait_ms=int(within * 1000))
        response = await self.call(lambda: control.ListSent(request, timeout=within + 5))
        for message in response.messages:
            self._sent_seen = max(self._sent_seen, message.seq)
        return list(response.messages)

    async def source(self) -> core_pb2.Source:
        """Where a message of the suite's user in --room comes from, as callbacks see it."""
        if self._source is None:
            route = robot_pb2.Route(id="source", pattern=f"^source-{self.token}$")
            async with self.listen([route]) as listener:
                await self.inject(f"source-{self.token}")
                self._source = (await listener.matched()).message.source
        return self._source

    # -- storage ---------------------------------------------------------------------

    def key(self, name: str) -> str:
        """A storage key private to this run."""
        return f"conformance/{self.token}/{name}"

    async def set(self, key: str, value: bytes, expected: int | None = None, secret: str | None = None) -> int:
        """Storage.Set; returns the new version."""
        request = storage_pb2.SetRequest(key=key, value=value)
        if expected is not None:
            request.expected_version = expected
        metadata = self.metadata(secret)
        response = await self.call(lambda: self.storage.Set(request, metadata=metadata, timeout=self.timeout))
        return response.version

    async def get(self, key: str, secret: str | None = None) -> storage_pb2.GetResponse:
        """Storage.Get."""
        metadata = self.metadata(secret)
        request = storage_pb2.GetRequest(key=key)
        return await self.call(lambda: self.storage.Get(request, metadata=metadata, timeout=self.timeout))

    async def delete(self, key: str, expected: int | None = None, secret: str | None = None) -> bool:
        """Storage.Delete; True when the key existed."""
        request = storage_pb2.DeleteRequest(key=key)
        if expected is not None:
            request.expected_version = expected
        metadata = self.metadata(secret)
        response = await self.call(lambda: self.storage.Delete(request, metadata=metadata, timeout=self.timeout))
        return response.deleted

    async def list(self, prefix: str, *, limit: int = 0, after: str = "", keys_only: bool = False) -> Any:
        """Storage.List, one page."""
        request = storage_pb2.ListRequest(prefix=prefix, start_after=after, limit=limit, keys_only=keys_only)
        metadata = self.metadata()
        return await self.call(lambda: self.storage.List(request, metadata=metadata, timeout=self.timeout))

    # -- specific data stores --------------------------------------------------------

    async def offered(self) -> tuple[str, ...]:
        """The data-store types the bot offers (ListDataStores, asked once a run)."""
        if self._offered is None:
            request = datastores_pb2.ListDataStoresRequest()
            response = await self.call(
                lambda: self.datastores.ListDataStores(request, metadata=self.metadata(), timeout=self.timeout)
            )
            self._offered = tuple(response.types)
        return self._offered

    async def offered_datastore(self) -> str:
        """The type the access checks ask for: --datastore, else the first the bot
        offers; NotOffered when it offers none."""
        offered = await self.offered()
        wanted = self.target.datastore
        if wanted:
            if wanted not in offered:
                raise CheckSkipped(
                    f"needs --datastore naming a type the bot offers (it offers: {', '.join(offered) or 'none'})"
                )
            return wanted
        if not offered:
            raise NotOffered("the bot offers no data store (ListDataStores is empty; offering none is allowed)")
        return offered[0]

    def absent_datastore(self) -> str:
        """A data-store type no bot offers."""
        return f"conformance-absent-{self.token}"

    def get_datastore_call(self, type: str, refresh: bool = False) -> Awaitable[datastores_pb2.DataStoreAccess]:
        """A GetDataStore call, for :meth:`call` or :meth:`refusal`."""
        request = datastores_pb2.GetDataStoreRequest(type=type, refresh=refresh)
        return self.datastores.GetDataStore(request, metadata=self.metadata(), timeout=self.timeout)

    async def get_datastore(self, type: str, refresh: bool = False) -> datastores_pb2.DataStoreAccess:
        """DataStores.GetDataStore."""
        return await self.call(lambda: self.get_datastore_call(type, refresh))

    # -- events beyond chat ----------------------------------------------------------

    def topic(self, *segments: str) -> str:
        """A topic private to this run: ``conformance.<token>.<segments>``."""
        return ".".join(("conformance", self.token, *segments))

    async def publish(
        self, topic: str, payload: bytes = b"", *, attributes: dict[str, str] | None = None, secret: str | None = None
    ) -> robot_pb2.PublishResponse:
        """Robot.Publish; NotOffered when the bot does not implement it (an extension)."""
        request = robot_pb2.PublishRequest(topic=topic, payload=payload, attributes=attributes or {})
        metadata = self.metadata(secret)
        try:
            return await self.call(lambda: self.robot.Publish(request, metadata=metadata, timeout=self.timeout))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise NotOffered("the bot does not implement Robot.Publish (events are an extension)") from None
            raise

    async def acknowledge(self, *events: core_pb2.Event, secret: str | None = None) -> None:
        """Robot.Acknowledge the events' delivery ids."""
        request = robot_pb2.AcknowledgeRequest(delivery_ids=[e.delivery_id for e in events])
        metadata = self.metadata(secret)
        await self.call(lambda: self.robot.Acknowledge(request, metadata=metadata, timeout=self.timeout))

    async def cleanup(self, secret: str | None = None) -> None:
        """Delete every key this run wrote with ``secret``."""
        prefix = f"conformance/{self.token}/"
        metadata = self.metadata(secret)
        request = storage_pb2.ListRequest(prefix=prefix, keys_only=True, limit=1000)
        while True:
            page = await self.call(lambda: self.storage.List(request, metadata=metadata, timeout=self.timeout))
            for item in page.items:
                await self.delete(item.key, secret=secret)
            if not page.next_start_after:
                return


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def _typed(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    """The `oco-error-*` entries of a failed call's trailing metadata."""
    trailers: Any = exc.trailing_metadata()  # grpc.aio.Metadata: (key, value) pairs
    return {k: v for k, v in trailers or () if isinstance(v, str) and k.startswith("oco-error-")}


def _route(id: str, pattern: str, *, respond: bool = False, help: str = "", ignore_case: bool = False) -> Any:
    return robot_pb2.Route(id=id, pattern=pattern, respond=respond, help=help, ignore_case=ignore_case)


# ---- the specification's RPCs and messages ---------------------------------------------


@check("robot/listen-spec-request")
async def _listen_spec(s: Suite) -> str:
    """A ListenRequest with only the specification's plugin_id opens a stream."""
    async with s.listen() as listener:
        return f"stream open; response headers carry oco-routes={listener.headers['oco-routes']}"


@check("robot/listen-headers-mean-registered", needs=["control"])
async def _listen_headers(s: Suite) -> str:
    """Once Listen's response headers arrive, a message sent at once is matched."""
    routes = [_route("a", f"^headers-{s.token}$"), _route("b", f"^headers-b-{s.token}$", respond=True)]
    async with s.listen(routes) as listener:
        count = int(listener.headers["oco-routes"])
        _expect(count >= len(routes), f"oco-routes={count}, but the stream declared {len(routes)} routes")
        await s.inject(f"headers-{s.token}")
        matched = await listener.matched()
        _expect(matched.route_id == "a", f"expected route 'a', got {matched.route_id!r}")
    return f"oco-routes={count}; a message sent right after the headers was matched"


@check("robot/send-messages-spec-fields", needs=["control"])
async def _send_spec(s: Suite) -> str:
    """SendMessages with only the specification's fields (body, source.room) reaches the room."""
    source = await s.source()
    body = f"spec-reply-{s.token}"
    request = robot_pb2.SendMessagesRequest(
        WithMention=False, messages=[core_pb2.Message(body=body, source=core_pb2.Source(room=source.room))]
    )
    await s.call(lambda: s.robot.SendMessages(request, metadata=s.metadata(), timeout=s.timeout))
    [sent] = await s.sent(body)
    _expect(sent.room == s.target.room, f"sent to room {sent.room!r}, expected {s.target.room!r}")
    _expect(not sent.private, "sent privately, expected in the room")
    return f"sent to room {source.room.id!r} and seen there"


@check("robot/send-messages-with-mention", needs=["control"])
async def _send_mention(s: Suite) -> str:
    """WithMention with source.user and source.room mentions the user in the room."""
    source = await s.source()
    body = f"mention-{s.token}"
    request = robot_pb2.SendMessagesRequest(WithMention=True, messages=[core_pb2.Message(body=body, source=source)])
    await s.call(lambda: s.robot.SendMessages(request, metadata=s.metadata(), timeout=s.timeout))
    [sent] = await s.sent(body)
    _expect(sent.room == s.target.room, f"sent to room {sent.room!r}, expected {s.target.room!r}")
    _expect(sent.mention and sent.user == s.target.user, f"not a mention of {s.target.user!r}: {sent}")
    return f"sent to {source.room.id!r} mentioning {source.user.id!r}"


@check("robot/send-messages-private", needs=["control"])
async def _send_private(s: Suite) -> str:
    """A message with source.user only goes privately to that user."""
    source = await s.source()
    body = f"private-{s.token}"
    message = core_pb2.Message(body=body, source=core_pb2.Source(user=source.user))
    request = robot_pb2.SendMessagesRequest(messages=[message])
    await s.call(lambda: s.robot.SendMessages(request, metadata=s.metadata(), timeout=s.timeout))
    [sent] = await s.sent(body)
    _expect(sent.private and sent.user == s.target.user and not sent.room, f"not a private message: {sent}")
    return f"sent privately to {source.user.id!r}"


@check("robot/send-messages-in-order", needs=["control"])
async def _send_order(s: Suite) -> str:
    """Several messages in one SendMessages request are sent in order."""
    source = await s.source()
    bodies = [f"order-{i}-{s.token}" for i in range(3)]
    messages = [core_pb2.Message(body=b, source=core_pb2.Source(room=source.room)) for b in bodies]
    request = robot_pb2.SendMessagesRequest(messages=messages)
    await s.call(lambda: s.robot.SendMessages(request, metadata=s.metadata(), timeout=s.timeout))
    seqs = [m.seq for m in await s.sent(*bodies)]
    _expect(seqs == sorted(seqs), f"sent out of order (positions {seqs})")
    return f"{len(bodies)} messages sent in order"


@check("robot/send-messages-unknown-room")
async def _send_unknown(s: Suite) -> str:
    """A message to a room the bot does not know fails with NOT_FOUND."""
    room = core_pb2.Room(id=f"no-such-room-{s.token}")
    request = robot_pb2.SendMessagesRequest(messages=[core_pb2.Message(body="x", source=core_pb2.Source(room=room))])
    details = await s.expect_code(
        "SendMessages to an unknown room",
        grpc.StatusCode.NOT_FOUND,
        lambda: s.robot.SendMessages(request, metadata=s.metadata(), timeout=s.timeout),
    )
    return f"NOT_FOUND: {details}"


@check("robot/send-messages-no-target")
async def _send_no_target(s: Suite) -> str:
    """A message with neither source.room nor source.user fails with INVALID_ARGUMENT."""
    request = robot_pb2.SendMessagesRequest(messages=[core_pb2.Message(body="nowhere")])
    details = await s.expect_code(
        "SendMessages without a target",
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: s.robot.SendMessages(request, metadata=s.metadata(), timeout=s.timeout),
    )
    return f"INVALID_ARGUMENT: {details}"


@check("robot/send-messages-too-large")
async def _send_too_large(s: Suite) -> str:
    """A message body of 1 MiB fails with RESOURCE_EXHAUSTED."""
    room = (await s.source()).room if s.control is not None else core_pb2.Room(id=f"no-such-room-{s.token}")
    message = core_pb2.Message(body="x" * _TOO_LARGE, source=core_pb2.Source(room=room))
    request = robot_pb2.SendMessagesRequest(messages=[message])
    details = await s.expect_code(
        "SendMessages with a 1 MiB body",
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        lambda: s.robot.SendMessages(request, metadata=s.metadata(), timeout=s.timeout),
    )
    return f"RESOURCE_EXHAUSTED: {details}"


@check("robot/join-part")
async def _join_part(s: Suite) -> str:
    """Join and Part a room answer OK; a room with neither id nor name is INVALID_ARGUMENT."""
    prefix = ""
    if s.control is not None:
        room_id = (await s.source()).room.id
        prefix = room_id[: room_id.rfind("/") + 1]
    room = core_pb2.Room(id=f"{prefix}conformance-{s.token}")
    await s.call(lambda: s.robot.Join(robot_pb2.JoinRequest(room=room), metadata=s.metadata(), timeout=s.timeout))
    await s.call(lambda: s.robot.Part(robot_pb2.PartRequest(room=room), metadata=s.metadata(), timeout=s.timeout))
    await s.expect_code(
        "Join of an empty room",
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: s.robot.Join(robot_pb2.JoinRequest(room=core_pb2.Room()), metadata=s.metadata(), timeout=s.timeout),
    )
    return f"joined and parted {room.id!r}; an empty room is INVALID_ARGUMENT"


# ---- secrets ---------------------------------------------------------------------------


async def _every_rpc_refused(s: Suite, what: str, metadata: Metadata, code: grpc.StatusCode) -> str:
    room = core_pb2.Room(id=f"conformance-{s.token}")
    message = core_pb2.Message(body="x", source=core_pb2.Source(room=room))
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "Join": lambda: s.robot.Join(robot_pb2.JoinRequest(room=room), metadata=metadata, timeout=s.timeout),
        "Part": lambda: s.robot.Part(robot_pb2.PartRequest(room=room), metadata=metadata, timeout=s.timeout),
        "SendMessages": lambda: s.robot.SendMessages(
            robot_pb2.SendMessagesRequest(messages=[message]), metadata=metadata, timeout=s.timeout
        ),
        "Storage.Get": lambda: s.storage.Get(
            storage_pb2.GetRequest(key=s.key("x")), metadata=metadata, timeout=s.timeout
        ),
        "Storage.Set": lambda: s.storage.Set(
            storage_pb2.SetRequest(key=s.key("x"), value=b"x"), metadata=metadata, timeout=s.timeout
        ),
    }
    for name, call in calls.items():
        await s.expect_code(f"{name} with {what}", code, call)
    listen = robot_pb2.ListenRequest(plugin_id=s.target.id, routes=[_route("r", f"^refused-{s.token}$")])
    details = await s.expect_listen_refused(f"Listen with {what}", code, listen, metadata)
    return f"Listen, {', '.join(calls)}: {code.name} ({details})"


@check("auth/missing-secret")
async def _auth_missing(s: Suite) -> str:
    """Every RPC without `authorization` metadata fails with UNAUTHENTICATED."""
    return await _every_rpc_refused(s, "no secret", (), grpc.StatusCode.UNAUTHENTICATED)


@check("auth/wrong-secret")
async def _auth_wrong(s: Suite) -> str:
    """Every RPC with an unknown secret fails with UNAUTHENTICATED."""
    wrong = (("authorization", f"Bearer wrong-{secrets.token_urlsafe(24)}"),)
    return await _every_rpc_refused(s, "a wrong secret", wrong, grpc.StatusCode.UNAUTHENTICATED)


@check("auth/not-bearer")
async def _auth_not_bearer(s: Suite) -> str:
    """The right secret without the `Bearer` scheme fails with UNAUTHENTICATED."""
    bare = (("authorization", s.target.secret),)
    return await _every_rpc_refused(s, "the secret without `Bearer `", bare, grpc.StatusCode.UNAUTHENTICATED)


@check("auth/other-plugin-id")
async def _auth_other_id(s: Suite) -> str:
    """Listen with a valid secret but another callback's plugin_id fails with PERMISSION_DENIED."""
    other = s.target.other_id or f"someone-else-{s.token}"
    request = robot_pb2.ListenRequest(plugin_id=other)
    details = await s.expect_listen_refused(
        f"Listen as {other!r} with {s.target.id!r}'s secret", grpc.StatusCode.PERMISSION_DENIED, request, s.metadata()
    )
    seen = f"plugin_id {other!r}: PERMISSION_DENIED ({details})"
    if s.target.other_secret and s.target.other_id:
        request = robot_pb2.ListenRequest(plugin_id=s.target.id)
        metadata = s.metadata(s.target.other_secret)
        await s.expect_listen_refused(
            f"Listen as {s.target.id!r} with {other!r}'s secret", grpc.StatusCode.PERMISSION_DENIED, request, metadata
        )
        seen += "; and the other way round"
    return seen


# ---- routes ----------------------------------------------------------------------------


@check("routes/invalid-pattern")
async def _invalid_pattern(s: Suite) -> str:
    """A route with an invalid pattern fails Listen with INVALID_ARGUMENT naming the pattern."""
    bad = f"(unclosed-{s.token}"
    request = robot_pb2.ListenRequest(
        plugin_id=s.target.id, routes=[_route("ok", f"^ok-{s.token}$"), _route("bad", bad)]
    )
    details = await s.expect_listen_refused(
        "Listen with an invalid pattern", grpc.StatusCode.INVALID_ARGUMENT, request, s.metadata()
    )
    _expect(bad in details, f"the error does not name the pattern {bad!r}: {details!r}")
    return f"INVALID_ARGUMENT: {details}"


@check("routes/re2-syntax")
async def _re2_only(s: Suite) -> str:
    """Patterns are RE2: a backreference and a lookahead (PCRE only) are refused."""
    refused = []
    for bad in (f"(a)\\1-{s.token}", f"(?=look)ahead-{s.token}"):
        request = robot_pb2.ListenRequest(plugin_id=s.target.id, routes=[_route("bad", bad)])
        await s.expect_listen_refused(f"Listen with {bad!r}", grpc.StatusCode.INVALID_ARGUMENT, request, s.metadata())
        refused.append(bad)
    # And RE2 syntax beyond Python's re is accepted: \pL (a Unicode letter class).
    async with s.listen([_route("unicode", f"^\\pL+-{s.token}$")]):
        pass
    return f"refused {', '.join(map(repr, refused))}; accepted \\pL"


@check("routes/hear", needs=["control"])
async def _hear(s: Suite) -> str:
    """A hear route matches any message in a room, addressed to the bot or not."""
    pattern = f"hear-{s.token}"
    async with s.listen([_route("hear", pattern)]) as listener:
        body = f"I say hear-{s.token} to the room"
        await s.inject(body)
        m = await listener.matched()
        _expect(m.route_id == "hear", f"route_id {m.route_id!r}, expected 'hear'")
        _expect(m.pattern == pattern, f"pattern {m.pattern!r}, expected {pattern!r}")
        _expect(m.message.body == body, f"message.body {m.message.body!r}, expected {body!r}")
        _expect(bool(m.message.source.user.id), "message.source.user.id is empty")
        _expect(bool(m.message.source.room.id), "message.source.room.id is empty")
        _expect(not m.direct, "direct is true for a message not addressed to the bot")
        _expect(m.text == body, f"text {m.text!r}, expected the whole body")
        _expect(bool(m.message.id), "message.id is empty")
        addressed = f"{s.target.bot_name}: hear-{s.token} as well"
        await s.inject(addressed)
        m = await listener.matched()
        _expect(m.message.body == addressed, f"an addressed message was not heard (got {m.message.body!r})")
    return f"heard {body!r} and {addressed!r} from {m.message.source.user.id!r} in {m.message.source.room.id!r}"


@check("routes/direct-flag", needs=["control"])
async def _direct_flag(s: Suite) -> str:
    """MatchedMessage.direct is true exactly when the message was addressed to the bot,
    whatever kind of route matched it (core.proto)."""
    bot = s.target.bot_name
    routes = [_route("hear", f"direct-{s.token}"), _route("respond", f"^direct-{s.token}$", respond=True)]
    seen = []
    async with s.listen(routes) as listener:
        for body, room, addressed in (
            (f"direct-{s.token}", None, False),
            (f"{bot}: direct-{s.token}", None, True),
            (f"direct-{s.token}", "", True),
        ):
            await s.inject(body, room=room)
            for _ in range(2 if addressed else 1):
                m = await listener.matched()
                where = "privately" if room == "" else "in the room"
                _expect(
                    m.direct == addressed,
                    f"{body!r} {where} on the {m.route_id} route: direct={m.direct}, expected {addressed}",
                )
                seen.append(f"{m.route_id}:{m.direct}")
    return f"direct flags {', '.join(seen)}"


@check("routes/respond", needs=["control"])
async def _respond(s: Suite) -> str:
    """A respond route matches messages addressed to the bot (name, name:, @name, private),
    against the text after the address, and nothing else."""
    bot = s.target.bot_name
    routes = [_route("rsp", f"^rsp-{s.token} (\\w+)$", respond=True), _route("sentinel", f"^sentinel-{s.token}$")]
    forms = {f"{bot} rsp-{s.token} a": "a", f"{bot}: rsp-{s.token} b": "b", f"@{bot} rsp-{s.token} c": "c"}
    async with s.listen(routes) as listener:
        for body, word in forms.items():
            await s.inject(body)
            m = await listener.matched()
            _expect(m.route_id == "rsp", f"{body!r}: route_id {m.route_id!r}, expected 'rsp'")
            _expect(m.text == f"rsp-{s.token} {word}", f"{body!r}: text {m.text!r}, expected the text after the name")
            _expect(m.direct, f"{body!r}: direct is false for a message addressed to the bot")
            _expect(m.message.body == body, f"{body!r}: message.body is {m.message.body!r}")
        await s.inject(f"rsp-{s.token} d", room="")
        m = await listener.matched()
        _expect(m.route_id == "rsp" and m.direct, f"a private message was not matched as addressed ({m.route_id!r})")
        _expect(m.message.private, "message.private is false for a private message")
        # Not addressed: neither matches. The sentinel, written after them, must come first.
        await s.inject(f"rsp-{s.token} e")
        await s.inject(f"{bot}x rsp-{s.token} f")
        await s.inject(f"sentinel-{s.token}")
        m = await listener.matched()
        _expect(m.route_id == "sentinel", f"a message not addressed to the bot matched a respond route: {m.text!r}")
    return f"matched {', '.join(map(repr, forms))} and a private message; not unaddressed ones"


@check("routes/capture-positional", needs=["control"])
async def _capture_positional(s: Suite) -> str:
    """groups[0] is the whole match, groups[n] the n-th group, "" for one that took no part."""
    route = _route("cap", f"cap-{s.token} (\\w+) (\\d+)(?: (x+))?$")
    async with s.listen([route]) as listener:
        await s.inject(f"please cap-{s.token} deploy 42")
        m = await listener.matched()
    expected = [f"cap-{s.token} deploy 42", "deploy", "42", ""]
    _expect(list(m.groups) == expected, f"groups {list(m.groups)!r}, expected {expected!r}")
    return f"groups {expected!r}"


@check("routes/capture-named", needs=["control"])
async def _capture_named(s: Suite) -> str:
    """Named groups come in named_groups (absent when they took no part) and in groups."""
    route = _route("named", f"^named-{s.token} (?P<app>\\w+)(?: to (?P<env>\\w+))?$", respond=True)
    async with s.listen([route]) as listener:
        await s.inject(f"{s.target.bot_name} named-{s.token} web")
        first = await listener.matched()
        await s.inject(f"{s.target.bot_name} named-{s.token} web to prod")
        second = await listener.matched()
    _expect(dict(first.named_groups) == {"app": "web"}, f"named_groups {dict(first.named_groups)!r}, expected app only")
    expected = {"app": "web", "env": "prod"}
    _expect(dict(second.named_groups) == expected, f"named_groups {dict(second.named_groups)!r}, expected {expected}")
    _expect(list(second.groups[1:]) == ["web", "prod"], f"groups {list(second.groups)!r} lack the named groups")
    return f"named_groups {dict(first.named_groups)!r}, then {expected!r}"


@check("routes/ignore-case", needs=["control"])
async def _ignore_case(s: Suite) -> str:
    """A route with ignore_case matches whatever the case; one without does not."""
    routes = [
        _route("nocase", f"^case-{s.token}$", ignore_case=True),
        _route("case", f"^case-{s.token}$"),
        _route("sentinel", f"^sentinel-{s.token}$"),
    ]
    async with s.listen(routes) as listener:
        await s.inject(f"CASE-{s.token}")
        await s.inject(f"sentinel-{s.token}")
        first = await listener.matched()
        second = await listener.matched()
    _expect(first.route_id == "nocase", f"the ignore_case route did not match (got {first.route_id!r})")
    _expect(second.route_id == "sentinel", f"the case-sensitive route matched upper case ({second.route_id!r})")
    return "matched CASE-… with ignore_case only"


@check("routes/every-callback", needs=["control", "other"])
async def _fan_out(s: Suite) -> str:
    """Every callback whose route matches gets the message."""
    pattern = f"^fan-{s.token}$"
    async with (
        s.listen([_route("mine", pattern)]) as mine,
        s.listen([_route("theirs", pattern)], secret=s.target.other_secret) as theirs,
    ):
        await s.inject(f"fan-{s.token}")
        a = await mine.matched()
        b = await theirs.matched()
    _expect((a.route_id, b.route_id) == ("mine", "theirs"), f"route ids {a.route_id!r}, {b.route_id!r}")
    return f"both {s.target.id!r} and {s.target.other_id!r} got it"


async def _count_until_sentinel(listener: Listener) -> int:
    count = 0
    while not (await listener.matched()).route_id.startswith("sentinel"):
        count += 1
    return count


@check("routes/replicas", needs=["control"])
async def _replicas(s: Suite) -> str:
    """Two streams of one callback declaring the same route share its messages: each
    message goes to exactly one of them."""
    shared = _route("shared", f"^replica-{s.token} \\d+$")
    async with (
        s.listen([shared, _route("sentinel-a", f"^sentinel-a-{s.token}$")]) as a,
        s.listen([shared, _route("sentinel-b", f"^sentinel-b-{s.token}$")]) as b,
    ):
        total = 6
        for i in range(total):
            await s.inject(f"replica-{s.token} {i}")
        await s.inject(f"sentinel-a-{s.token}")
        await s.inject(f"sentinel-b-{s.token}")
        got_a = await _count_until_sentinel(a)
        got_b = await _count_until_sentinel(b)
    _expect(got_a + got_b == total, f"{total} messages gave {got_a} + {got_b} events: each must go to one stream")
    return f"{total} messages split {got_a} + {got_b}"


# ---- the stream's lifecycle ------------------------------------------------------------


@check("stream/cancel-removes-routes", needs=["control"])
async def _cancel(s: Suite) -> str:
    """Cancelling a Listen stream removes its routes: its replica then gets every message."""
    shared = _route("shared", f"^gone-{s.token} \\d+$")
    async with s.listen([shared, _route("sentinel", f"^sentinel-{s.token}$")]) as survivor:
        async with s.listen([shared]):
            pass  # leaving the block cancels the stream
        cancelled_at = time.monotonic()
        probes = 4
        deadline = trio.current_time() + s.timeout
        rounds = 0
        while True:
            rounds += 1
            for i in range(probes):
                await s.inject(f"gone-{s.token} {i}")
            await s.inject(f"sentinel-{s.token}")
            got = await _count_until_sentinel(survivor)
            if got == probes:
                break
            if trio.current_time() > deadline:
                raise CheckFailed(
                    f"{s.timeout:g} s after the stream was cancelled its route still took {probes - got} of "
                    f"{probes} messages"
                )
            await trio.sleep(0.05)
    return f"routes gone {time.monotonic() - cancelled_at:.2f} s after cancelling ({rounds} round(s) of probes)"


@check("stream/help-follows-stream", needs=["control"])
async def _help(s: Suite) -> str:
    """The `help` command lists a route's help text while its stream is open, and not after."""
    text = f"conformance-{s.token} <x> - a route of the conformance suite"
    ask = f"{s.target.bot_name} help conformance-{s.token}"

    async def reply() -> str:
        await s.inject(ask)
        deadline = trio.current_time() + s.timeout
        while (left := deadline - trio.current_time()) > 0:
            for message in await s.list_sent(left):
                if message.room == s.target.room:
                    return message.body
        raise CheckFailed(f"no answer to {ask!r}")

    async with s.listen([_route("helped", f"^conformance-{s.token} (\\w+)$", respond=True, help=text)]):
        listed = await reply()
        _expect(text in listed, f"`help` does not list the open stream's route: {listed!r}")
    deadline = trio.current_time() + s.timeout
    while text in (after := await reply()):
        if trio.current_time() > deadline:
            raise CheckFailed(f"`help` still lists the route {s.timeout:g} s after its stream was cancelled")
        await trio.sleep(0.1)
    return f"listed while open; after: {after!r}"


#: Messages written at a stream that is not read, to make the bot drop some.
_FLOOD = 3000
#: Channel options that keep a stream's HTTP/2 window at 16 KiB (no BDP probing, which
#: grows it to megabytes): a stream not read then backs up into the bot's queue.
_SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)]


@check("stream/dropped-count", needs=["control"])
async def _dropped_count(s: Suite) -> str:
    """A stream that falls behind loses events, and learns how many: the next event it
    gets carries the count in `dropped`. Every message is thus either received or counted
    (skipped when the bot dropped none: a bot may queue more than the suite writes)."""
    flood = f"flood-{s.token}"
    routes = [_route("flood", f"^{flood} \\d+$"), _route("last", f"^last-{s.token}$")]
    async with s.listen(routes, unbuffered=True) as slow:
        numbers = iter(range(_FLOOD))

        async def writer() -> None:
            for n in numbers:  # shared: the writers take turns on one sequence
                await s.inject(f"{flood} {n}")

        try:
            async with trio.open_nursery() as nursery:  # nothing reads the stream meanwhile
                for _ in range(8):
                    nursery.start_soon(writer)
        except BaseExceptionGroup as failed:  # the writers fail alike: report the first, as any check would
            raise failed.exceptions[0] from None
        received = dropped = 0
        while True:
            try:
                event = await slow.event(within=1.0)
            except CheckFailed:  # what was queued has all come
                break
            received += 1
            dropped += event.dropped
        # After the drops, one more message: it carries the count of those at the end.
        await s.inject(f"last-{s.token}")
        while True:
            event = await slow.event()
            dropped += event.dropped
            if event.matched_message.message.body == f"last-{s.token}":
                break
            received += 1
    if dropped == 0 and received == _FLOOD:
        raise NotOffered(f"the bot queued all {_FLOOD} messages for a stream that did not read: none was dropped")
    _expect(
        received + dropped == _FLOOD,
        f"of {_FLOOD} messages, {received} arrived and `dropped` counted {dropped}: "
        f"{_FLOOD - received - dropped} went missing uncounted",
    )
    return f"{received} arrived, {dropped} counted as dropped"


# ---- batched streams (an extension) -----------------------------------------------------

#: Messages written at a ListenBatches stream that is not read, so that several wait.
_BATCHED = 200


@check("batches/listen-batches", needs=["control"])
async def _listen_batches(s: Suite) -> str:
    """ListenBatches delivers what Listen would, in order, several events per stream
    message when several wait, and a lone event at once (a batch of one)."""
    pattern = f"batched-{s.token}"
    request = s._listen_request([_route("batched", f"^{pattern} (\\d+)$")], None, None)
    channel = await s.bridge.open_channel(s.target.address, _SMALL_WINDOW)
    try:
        robot = robot_pb2_grpc.RobotStub(channel)
        async with s.bridge.open_response_stream(
            lambda: robot.ListenBatches(request, metadata=s.metadata()), 1
        ) as stream:
            try:
                with trio.fail_after(s.timeout):
                    headers = await stream.initial_metadata()
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    raise NotOffered("the bot does not offer ListenBatches (UNIMPLEMENTED)") from None
                raise CheckFailed(f"ListenBatches was refused: {_code(exc)}") from None
            _expect(headers.get("oco-routes") == "1", f"response headers say oco-routes={headers.get('oco-routes')}")
            batches = aiter(stream)

            async def numbers(count: int) -> list[list[int]]:
                got: list[list[int]] = []
                with trio.move_on_after(s.timeout):
                    while sum(map(len, got)) < count:
                        batch = await anext(batches)
                        _expect(len(batch.events) > 0, "a batch without events")
                        got.append([int(e.matched_message.groups[1]) for e in batch.events])
                return got

            await s.inject(f"{pattern} 0")
            lone = await numbers(1)
            _expect(lone == [[0]], f"a lone event came as {lone}, not as a batch of one")
            for n in range(1, _BATCHED + 1):  # nothing reads the stream meanwhile
                await s.inject(f"{pattern} {n}")
            got = await numbers(_BATCHED)
    finally:
        await s.bridge.close_channel(channel)
    flat = [n for batch in got for n in batch]
    _expect(flat == list(range(1, _BATCHED + 1)), f"{len(flat)} of {_BATCHED} events came, or out of order")
    return f"{_BATCHED} events in {len(got)} batches (largest {max(map(len, got))}), in order; a lone one alone"


@check("batches/send-message-batches", needs=["control"])
async def _send_message_batches(s: Suite) -> str:
    """SendMessageBatches handles a batch's requests in order and answers with one result
    per request, in order; a bad request fails alone."""
    source = await s.source()
    bodies = [f"batch-{i}-{s.token}" for i in range(2)]
    nowhere = core_pb2.Source(room=core_pb2.Room(id=f"no-such-room-{s.token}"))
    requests = [
        robot_pb2.SendMessagesRequest(
            request_id=1, messages=[core_pb2.Message(body=bodies[0], source=core_pb2.Source(room=source.room))]
        ),
        robot_pb2.SendMessagesRequest(request_id=2, messages=[core_pb2.Message(body="x", source=nowhere)]),
        robot_pb2.SendMessagesRequest(
            request_id=3, messages=[core_pb2.Message(body=bodies[1], source=core_pb2.Source(room=source.room))]
        ),
    ]
    async with s.bridge.open_duplex_stream(
        lambda requests: s.robot.SendMessageBatches(requests, metadata=s.metadata())
    ) as (sender, results):
        try:
            with trio.fail_after(s.timeout):
                await results.initial_metadata()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise NotOffered("the bot does not offer SendMessageBatches (UNIMPLEMENTED)") from None
            raise CheckFailed(f"SendMessageBatches was refused: {_code(exc)}") from None
        await sender.send(robot_pb2.SendMessagesBatch(requests=requests))
        answer: robot_pb2.SendResultBatch | None = None
        with trio.move_on_after(s.timeout):
            answer = await anext(aiter(results))
        sender.close()
    if answer is None:
        raise CheckFailed(f"no SendResultBatch within {s.timeout:g} s")
    ids = [r.request_id for r in answer.results]
    _expect(ids == [1, 2, 3], f"results for request ids {ids}, not [1, 2, 3]")
    names = {code.value[0]: code.name for code in grpc.StatusCode}
    codes = [names.get(r.code, str(r.code)) for r in answer.results]
    _expect(codes == ["OK", "NOT_FOUND", "OK"], f"results {codes}, not OK, NOT_FOUND, OK")
    seqs = [m.seq for m in await s.sent(*bodies)]
    _expect(seqs == sorted(seqs), f"sent out of order (positions {seqs})")
    return "3 requests in one batch: OK, NOT_FOUND (unknown room), OK, in order"


# ---- storage ---------------------------------------------------------------------------


@check("storage/roundtrip")
async def _storage_roundtrip(s: Suite) -> str:
    """Set, Get, Delete: versions start at 1 and grow by one with each write."""
    key = s.key("roundtrip")
    got = await s.get(key)
    _expect(not got.found, f"a fresh key is found: {got}")
    v1 = await s.set(key, b"one")
    got = await s.get(key)
    _expect(got.found and got.value == b"one" and got.version == v1 == 1, f"after one write: {got} (Set said {v1})")
    v2 = await s.set(key, b"two")
    _expect(v2 == 2, f"the second write gave version {v2}, expected 2")
    _expect(await s.delete(key), "Delete of an existing key said deleted=false")
    _expect(not (await s.get(key)).found, "the key is still found after Delete")
    _expect(not await s.delete(key), "Delete of a missing key said deleted=true")
    return "versions 1, 2; deleted; deleted=false the second time"


@check("storage/compare-and-set")
async def _storage_cas(s: Suite) -> str:
    """expected_version: 0 means absent; a stale version fails with ABORTED, for Set and Delete."""
    key = s.key("cas")
    try:
        v1 = await s.set(key, b"a", expected=0)
        _expect(v1 == 1, f"create-if-absent gave version {v1}")

        def set_call(expected: int) -> Callable[[], Awaitable[Any]]:
            request = storage_pb2.SetRequest(key=key, value=b"x", expected_version=expected)
            return lambda: s.storage.Set(request, metadata=s.metadata(), timeout=s.timeout)

        await s.expect_code("Set with expected_version 0 on an existing key", grpc.StatusCode.ABORTED, set_call(0))
        await s.expect_code("Set with a stale expected_version", grpc.StatusCode.ABORTED, set_call(7))
        v2 = await s.set(key, b"b", expected=1)
        _expect(v2 == 2, f"Set at the right version gave version {v2}, expected 2")
        got = await s.get(key)
        _expect(got.value == b"b", f"the value is {got.value!r} after the failed writes, expected b'b'")
        await s.expect_code(
            "Delete with a stale expected_version",
            grpc.StatusCode.ABORTED,
            lambda: s.storage.Delete(
                storage_pb2.DeleteRequest(key=key, expected_version=1), metadata=s.metadata(), timeout=s.timeout
            ),
        )
        _expect(await s.delete(key, expected=2), "Delete at the right version said deleted=false")
    finally:
        await s.delete(key)
    return "create-if-absent, ABORTED on stale Set and Delete, success at the current version"


@check("storage/concurrent-increments")
async def _storage_concurrent(s: Suite) -> str:
    """Ten concurrent read-modify-write loops with compare-and-set lose no increment."""
    key = s.key("counter")
    conflicts = 0

    async def increment() -> None:
        nonlocal conflicts
        while True:
            got = await s.get(key)
            value = int(got.value or b"0") + 1
            try:
                await s.set(key, str(value).encode(), expected=got.version if got.found else 0)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.ABORTED:
                    raise
                conflicts += 1

    workers = 10
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(increment)
        final = await s.get(key)
        _expect(final.value == str(workers).encode(), f"the counter is {final.value!r}, expected {workers}")
    finally:
        await s.delete(key)
    return f"{workers} increments, {conflicts} conflict(s) retried"


@check("storage/list")
async def _storage_list(s: Suite) -> str:
    """List returns keys by prefix in key order, a page at a time; keys_only leaves values out."""
    names = ["b", "a", "e", "c", "d"]
    for name in names:
        await s.set(s.key(f"list/{name}"), name.encode())
    await s.set(s.key("listx"), b"not under the prefix")
    try:
        prefix = s.key("list/")
        keys: list[str] = []
        after = ""
        pages = 0
        while True:
            page = await s.list(prefix, limit=2, after=after)
            pages += 1
            _expect(len(page.items) <= 2, f"a page of limit 2 has {len(page.items)} items")
            for item in page.items:
                _expect(item.value == item.key[-1:].encode(), f"{item.key}: value {item.value!r}")
            keys += [i.key for i in page.items]
            if not page.next_start_after or pages > 10:
                break
            after = page.next_start_after
        expected = [s.key(f"list/{n}") for n in sorted(names)]
        _expect(keys == expected, f"listed {keys}, expected {expected}")
        bare = await s.list(prefix, keys_only=True)
        _expect(all(not i.value for i in bare.items) and len(bare.items) == len(names), f"keys_only gave {bare}")
    finally:
        await s.cleanup()
    return f"{len(names)} keys in key order over {pages} pages of 2"


@check("storage/invalid-key")
async def _storage_invalid_key(s: Suite) -> str:
    """An empty key fails with INVALID_ARGUMENT."""
    details = await s.expect_code(
        "Get of an empty key",
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: s.storage.Get(storage_pb2.GetRequest(key=""), metadata=s.metadata(), timeout=s.timeout),
    )
    return f"INVALID_ARGUMENT: {details}"


@check("storage/isolation", needs=["other"])
async def _storage_isolation(s: Suite) -> str:
    """Two callbacks using the same key never see each other's value."""
    other = s.target.other_secret
    assert other is not None
    key = s.key("shared-name")
    try:
        await s.set(key, b"mine")
        got = await s.get(key, secret=other)
        _expect(not got.found, f"{s.target.other_id!r} reads {s.target.id!r}'s key: {got}")
        version = await s.set(key, b"theirs", expected=0, secret=other)
        _expect(version == 1, f"the other callback's first write gave version {version}")
        mine = await s.get(key)
        _expect(mine.value == b"mine" and mine.version == 1, f"{s.target.id!r}'s value changed: {mine}")
        request = storage_pb2.ListRequest(prefix=f"conformance/{s.token}/")
        listed = await s.call(lambda: s.storage.List(request, metadata=s.metadata(other), timeout=s.timeout))
        _expect([i.value for i in listed.items] == [b"theirs"], f"the other callback lists {list(listed.items)}")
        _expect(await s.delete(key, secret=other), "the other callback could not delete its own key")
        _expect((await s.get(key)).found, f"deleting {s.target.other_id!r}'s key deleted {s.target.id!r}'s")
    finally:
        await s.cleanup()
        await s.cleanup(other)
    return f"{s.target.id!r} and {s.target.other_id!r} each have their own {key!r}"


# ---- typed errors ----------------------------------------------------------------------


@check("errors/typed-version-conflict")
async def _errors_typed(s: Suite) -> str:
    """A failed call names its error in trailing metadata (robot.proto, "Errors"): a
    stale compare-and-set answers ABORTED with `oco-error-type: VersionConflictError` and
    `oco-error-current`, the version stored (0 for a key that does not exist)."""
    key = s.key("typed")

    async def conflict(expected: int) -> dict[str, str]:
        request = storage_pb2.SetRequest(key=key, value=b"x", expected_version=expected)
        try:
            await s.call(lambda: s.storage.Set(request, metadata=s.metadata(), timeout=s.timeout))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED:
                raise CheckFailed(f"Set with expected_version {expected}: expected ABORTED, got {_code(exc)}") from None
            return _typed(exc)
        raise CheckFailed(f"Set with expected_version {expected} succeeded; expected ABORTED")

    try:
        absent = await conflict(1)
        _expect(
            absent == {"oco-error-type": "VersionConflictError", "oco-error-current": "0"},
            f"a key that does not exist, expected_version 1: trailing metadata {absent}, expected "
            "oco-error-type: VersionConflictError and oco-error-current: 0",
        )
        await s.set(key, b"a")
        version = await s.set(key, b"b")
        stale = await conflict(version + 5)
        _expect(
            stale == {"oco-error-type": "VersionConflictError", "oco-error-current": str(version)},
            f"version {version}, expected_version {version + 5}: trailing metadata {stale}, expected "
            f"oco-error-type: VersionConflictError and oco-error-current: {version}",
        )
    finally:
        await s.delete(key)
    return f"ABORTED with oco-error-type VersionConflictError, oco-error-current 0 and then {version}"


# ---- specific data stores --------------------------------------------------------------


def _expect_unavailable(what: str, exc: grpc.aio.AioRpcError, datastore: str) -> str:
    typed = _typed(exc)
    expected = {"oco-error-type": "DataStoreUnavailableError", "oco-error-datastore": datastore}
    _expect(
        {k: typed.get(k) for k in expected} == expected,
        f"{what}: trailing metadata {typed}, expected oco-error-type: DataStoreUnavailableError and "
        f"oco-error-datastore: {datastore}",
    )
    details = exc.details() or ""
    _expect(datastore in details, f"{what}: the error does not name {datastore!r}: {details!r}")
    return details


@check("datastores/list")
async def _datastores_list(s: Suite) -> str:
    """ListDataStores answers the types the bot offers, each once and in name order (an
    empty list is an answer: a bot may offer none)."""
    offered = await s.offered()
    _expect(list(offered) == sorted(set(offered)), f"types {list(offered)}: expected each once, in name order")
    _expect(all(offered), f"types {list(offered)}: one is empty")
    return f"offers {', '.join(offered)}" if offered else "offers none"


@check("datastores/listen-requires-unoffered")
async def _datastores_listen_unoffered(s: Suite) -> str:
    """A Listen whose `requires` names a type the bot does not offer is refused with
    FAILED_PRECONDITION, `oco-error-type: DataStoreUnavailableError` and
    `oco-error-datastore` naming the type."""
    absent = s.absent_datastore()
    request = robot_pb2.ListenRequest(
        plugin_id=s.target.id, routes=[_route("r", f"^requires-{s.token}$")], requires=[absent]
    )
    what = f"Listen requiring {absent!r}"
    exc = await s.listen_refusal(what, grpc.StatusCode.FAILED_PRECONDITION, request, s.metadata())
    return f"FAILED_PRECONDITION, DataStoreUnavailableError: {_expect_unavailable(what, exc, absent)}"


@check("datastores/get-unoffered")
async def _datastores_get_unoffered(s: Suite) -> str:
    """GetDataStore for a type the bot does not offer is refused the same way:
    FAILED_PRECONDITION, `oco-error-type: DataStoreUnavailableError`, `oco-error-datastore`."""
    absent = s.absent_datastore()
    what = f"GetDataStore({absent!r})"
    exc = await s.refusal(what, grpc.StatusCode.FAILED_PRECONDITION, lambda: s.get_datastore_call(absent))
    return f"FAILED_PRECONDITION, DataStoreUnavailableError: {_expect_unavailable(what, exc, absent)}"


@check("datastores/access")
async def _datastores_access(s: Suite) -> str:
    """GetDataStore for a type the bot offers answers that type, a non-empty url and a
    generation of at least 1 (skipped when the bot offers none)."""
    datastore = await s.offered_datastore()
    access = await s.get_datastore(datastore)
    _expect(access.type == datastore, f"GetDataStore({datastore!r}) answered type {access.type!r}")
    _expect(bool(access.url), f"GetDataStore({datastore!r}) answered an empty url")
    _expect(access.generation >= 1, f"GetDataStore({datastore!r}) answered generation {access.generation}")
    scheme = access.url.partition(":")[0]  # never the rest: it holds the password
    return f"{datastore}: a {scheme}: url, namespace {access.namespace!r}, generation {access.generation}"


@check("datastores/access-stable")
async def _datastores_access_stable(s: Suite) -> str:
    """Asking GetDataStore twice, and again with `refresh`, gives the same access (same
    url, same generation): the bot keeps a callback's credentials, it does not make new
    ones each time (skipped when the bot offers none)."""
    datastore = await s.offered_datastore()
    first = await s.get_datastore(datastore)
    for how, refresh in (("asked again", False), ("asked with refresh", True)):
        again = await s.get_datastore(datastore, refresh=refresh)
        _expect(
            first.generation == again.generation,
            f"GetDataStore({datastore!r}) {how}: generation {first.generation}, then {again.generation}",
        )
        # Compared, never shown: the url holds the callback's password.
        _expect(first.url == again.url, f"GetDataStore({datastore!r}) {how} answered another url")
    return f"{datastore}: the same url and generation {first.generation} three times, once with refresh"


# ---- events beyond chat ----------------------------------------------------------------

#: Topics the suite's callback must not be allowed to publish or subscribe to.
DENIED_TOPIC = "conformance-denied"


def _expect_published(
    what: str, event: core_pb2.Event, sent: robot_pb2.PublishResponse, topic: str, publisher: str, acknowledged: bool
) -> None:
    got = event.published_event
    _expect(got.id == sent.id, f"{what}: event id {got.id!r}, but Publish answered {sent.id!r}")
    _expect(got.topic == topic, f"{what}: topic {got.topic!r}, expected {topic!r}")
    _expect(got.publisher == publisher, f"{what}: publisher {got.publisher!r}, expected {publisher!r}")
    if acknowledged:
        _expect(bool(event.delivery_id), f"{what}: no delivery_id on a stream that acknowledges")
    else:
        _expect(
            not event.delivery_id, f"{what}: delivery_id {event.delivery_id!r} on a stream that does not acknowledge"
        )


@check("events/publish-subscribe", needs=["other"])
async def _events_publish_subscribe(s: Suite) -> str:
    """Robot.Publish hands an event to each callback subscribed to its topic, once, and
    to no other: with the suite's callback subscribed to `conformance.<token>.*` and the
    other to `conformance.<token>.#`, an event on `.a` reaches both (id, topic, payload,
    attributes and publisher as published); one on `.a.b` only the other (the next the
    suite's callback gets is the one after it, on `.c`). Skipped when the bot does not
    implement Publish (an extension)."""
    other = s.target.other_secret
    assert other is not None
    mine_pattern, theirs_pattern = s.topic("*"), s.topic("#")
    async with (
        s.listen(topics=[mine_pattern], acknowledge=True) as mine,
        s.listen(topics=[theirs_pattern], acknowledge=True, secret=other) as theirs,
    ):
        first = await s.publish(s.topic("a"), b'{"n": 1}', attributes={"n": "1"})
        _expect(bool(first.id), "Publish answered no event id")
        _expect(first.subscribers >= 2, f"Publish counted {first.subscribers} subscriber(s); expected at least 2")
        for name, listener, secret in (("suite's", mine, None), ("other", theirs, other)):
            event = await listener.published()
            _expect_published(f"the {name} callback", event, first, s.topic("a"), s.target.id, True)
            got = event.published_event
            _expect(got.payload == b'{"n": 1}', f"the {name} callback: payload {got.payload!r}")
            _expect(dict(got.attributes) == {"n": "1"}, f"the {name} callback: attributes {dict(got.attributes)}")
            await s.acknowledge(event, secret=secret)
        deeper = await s.publish(s.topic("a", "b"))
        event = await theirs.published()
        _expect_published("the other callback, on .a.b", event, deeper, s.topic("a", "b"), s.target.id, True)
        await s.acknowledge(event, secret=other)
        last = await s.publish(s.topic("c"))
        for name, listener, secret in (("suite's", mine, None), ("other", theirs, other)):
            event = await listener.published()
            if event.published_event.id == deeper.id:
                raise CheckFailed(f"the {name} callback got the event on .a.b, which {mine_pattern!r} does not name")
            _expect_published(f"the {name} callback, on .c", event, last, s.topic("c"), s.target.id, True)
            await s.acknowledge(event, secret=secret)
    return f"{mine_pattern!r} got .a and .c, {theirs_pattern!r} .a, .a.b and .c, each once"


@check("events/acknowledge-redelivers")
async def _events_acknowledge(s: Suite) -> str:
    """On a stream that acknowledges (ListenRequest.acknowledge), a published event
    carries a delivery_id; when the stream ends before Robot.Acknowledge names it, the
    next stream of the callback gets it again with `redelivered` ≥ 1; once acknowledged
    it never comes again (a later event comes next). Skipped when the bot does not
    implement Publish."""
    topics = [s.topic("ack", "*")]
    async with s.listen(topics=topics, acknowledge=True) as first:
        sent = await s.publish(s.topic("ack", "x"), b"x")
        event = await first.published()
        _expect_published("the first stream", event, sent, s.topic("ack", "x"), s.target.id, True)
        _expect(event.redelivered == 0, f"the first delivery has redelivered={event.redelivered}, expected 0")
    # That stream ended without acknowledging: the event must come again.
    async with s.listen(topics=topics, acknowledge=True) as second:
        again = await second.published()
        _expect(
            again.published_event.id == sent.id,
            f"the next stream got event {again.published_event.id!r} first, expected {sent.id!r} again",
        )
        _expect(again.redelivered >= 1, f"the event came again with redelivered={again.redelivered}, expected ≥ 1")
        _expect(bool(again.delivery_id), "the event came again without a delivery_id")
        await s.acknowledge(again)
        redelivered = again.redelivered
    async with s.listen(topics=topics, acknowledge=True) as third:
        later = await s.publish(s.topic("ack", "y"))
        event = await third.published()
        if event.published_event.id == sent.id:
            raise CheckFailed("an acknowledged event came a third time")
        _expect_published("the stream after the acknowledgement", event, later, s.topic("ack", "y"), s.target.id, True)
        await s.acknowledge(event)
    return f"redelivered (redelivered={redelivered}) after its stream ended unacknowledged, never after Acknowledge"


@check("events/without-acknowledge")
async def _events_without_acknowledge(s: Suite) -> str:
    """A stream that does not acknowledge (a client generated from the specification)
    gets published events without a delivery_id, once: the event counts as delivered when
    written, and a later stream does not get it again. Skipped when the bot does not
    implement Publish."""
    topics = [s.topic("plain", "*")]
    async with s.listen(topics=topics) as first:
        sent = await s.publish(s.topic("plain", "x"))
        _expect_published("the stream", await first.published(), sent, s.topic("plain", "x"), s.target.id, False)
    async with s.listen(topics=topics) as second:
        later = await s.publish(s.topic("plain", "y"))
        event = await second.published()
        if event.published_event.id == sent.id:
            raise CheckFailed("an event written to a stream that does not acknowledge came again")
        _expect_published("the next stream", event, later, s.topic("plain", "y"), s.target.id, False)
    return "no delivery_id, delivered once"


@check("events/capability-refusals")
async def _events_capabilities(s: Suite) -> str:
    """Publishing to a topic outside the callback's `capabilities.publish` fails with
    PERMISSION_DENIED, `oco-error-type: CapabilityError` and `oco-error-capability:
    publish`; a Listen subscribing outside `capabilities.subscribe` likewise (`subscribe`).
    Needs the suite's callback configured without `conformance-denied.#` in either (such
    as `capabilities: {publish: ["conformance.#"], subscribe: ["conformance.#"]}`); skipped
    when the bot does not implement Publish."""
    topic = f"{DENIED_TOPIC}.{s.token}"
    request = robot_pb2.PublishRequest(topic=topic, payload=b"")
    try:
        await s.call(lambda: s.robot.Publish(request, metadata=s.metadata(), timeout=s.timeout))
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            raise NotOffered("the bot does not implement Robot.Publish (events are an extension)") from None
        if exc.code() != grpc.StatusCode.PERMISSION_DENIED:
            raise CheckFailed(f"Publish to {topic!r}: expected PERMISSION_DENIED, got {_code(exc)}") from None
        published = exc
    else:
        raise CheckSkipped(
            f"needs the suite's callback (--id) not allowed to publish to {DENIED_TOPIC}.# (the bot published to "
            f"{topic!r}): configure it with capabilities: {{publish: ['conformance.#'], subscribe: ['conformance.#']}}"
        )
    listen = robot_pb2.ListenRequest(plugin_id=s.target.id, topics=[f"{DENIED_TOPIC}.#"])
    subscribed = await s.listen_refusal(
        f"Listen subscribing to {DENIED_TOPIC}.#", grpc.StatusCode.PERMISSION_DENIED, listen, s.metadata()
    )
    for what, refusal, capability in (("Publish", published, "publish"), ("Listen", subscribed, "subscribe")):
        typed = _typed(refusal)
        expected = {"oco-error-type": "CapabilityError", "oco-error-capability": capability}
        _expect(
            {k: typed.get(k) for k in expected} == expected,
            f"{what}: trailing metadata {typed}, expected oco-error-type: CapabilityError and "
            f"oco-error-capability: {capability}",
        )
    return "Publish and Listen refused with PERMISSION_DENIED, CapabilityError (publish, subscribe)"


# ---- approvals (an extension) ----------------------------------------------------------


async def _approval_asked(s: Suite) -> str:
    """The id in the bot's next message that says how to approve (``approve <id>``)."""
    deadline = trio.current_time() + s.timeout
    seen: list[str] = []
    while (left := deadline - trio.current_time()) > 0:
        for message in await s.list_sent(left):
            seen.append(message.body)
            found = re.search(r"\bapprove ([0-9a-f]+)", message.body)
            if found:
                return found.group(1)
    raise CheckFailed(f"the bot did not say how to approve (`approve <id>`); it said {seen[-3:]!r}")


@check("approvals/request-needs-role")
async def _approval_needs_role(s: Suite) -> str:
    """RequestApproval with a rule that names no role is INVALID_ARGUMENT."""
    request = robot_pb2.RequestApprovalRequest(rule=robot_pb2.ApprovalRule(role=""))
    details = await s.expect_code(
        "RequestApproval without a role",
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: s.robot.RequestApproval(request, metadata=s.metadata(), timeout=s.timeout),
    )
    return f"INVALID_ARGUMENT: {details}"


@check("approvals/route-held", needs=["control"])
async def _approval_route_held(s: Suite) -> str:
    """A match of a route declared with Route.approval is held: the bot asks in the room
    how to approve it, the asker's own approval does not count, and after the asker's
    deny the callback never gets the match."""
    bot = s.target.bot_name
    held = robot_pb2.Route(
        id="held",
        pattern=f"^held-{s.token}$",
        respond=True,
        approval=robot_pb2.ApprovalRule(role=f"approvers-{s.token}", timeout_seconds=60),
    )
    async with s.listen([held, _route("sentinel", f"^sentinel-{s.token}$")]) as listener:
        await s.inject(f"{bot} held-{s.token}")
        request_id = await _approval_asked(s)
        await s.inject(f"{bot} approve {request_id}")  # the asker: refused
        await s.inject(f"{bot} deny {request_id}")
        await s.inject(f"sentinel-{s.token}")
        m = await listener.matched()
        _expect(m.route_id == "sentinel", f"the held match reached the callback without approval ({m.text!r})")
    return f"held as {request_id}; the asker's approval did not count; denied, never delivered"


@check("approvals/request-denied", needs=["control"])
async def _approval_request_denied(s: Suite) -> str:
    """RequestApproval asks in the message's room and answers DECISION_DENIED, with the
    request's id and a reason, once the asker withdraws it (``deny <id>``)."""
    source = await s.source()
    message = core_pb2.Message(body=f"drop-{s.token}", source=source)
    request = robot_pb2.RequestApprovalRequest(
        message=message, rule=robot_pb2.ApprovalRule(role=f"approvers-{s.token}", timeout_seconds=60)
    )
    answers: list[robot_pb2.RequestApprovalResponse] = []

    async def ask() -> None:
        answers.append(
            await s.call(lambda: s.robot.RequestApproval(request, metadata=s.metadata(), timeout=s.timeout * 2))
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        request_id = await _approval_asked(s)
        await s.inject(f"{s.target.bot_name} deny {request_id}")
    answer = answers[0]
    denied = robot_pb2.RequestApprovalResponse.DECISION_DENIED
    _expect(answer.decision == denied, f"decision {answer.decision}, expected DECISION_DENIED")
    _expect(answer.approval.id == request_id, f"approval.id {answer.approval.id!r}, expected {request_id!r}")
    _expect(bool(answer.reason), "a denial came without a reason")
    return f"DECISION_DENIED for {request_id}: {answer.reason}"


# ---- conversations (an extension) ------------------------------------------------------


async def _ask(s: Suite, question_id: str, body: str) -> None:
    source = await s.source()
    question = core_pb2.Question(id=question_id, timeout_seconds=60)
    request = robot_pb2.SendMessagesRequest(messages=[core_pb2.Message(body=body, source=source, question=question)])
    await s.call(lambda: s.robot.SendMessages(request, metadata=s.metadata(), timeout=s.timeout))


async def _answer(listener: Listener, question_id: str) -> core_pb2.QuestionAnswer:
    event = await listener.event()
    kind = event.WhichOneof("type")
    _expect(kind == "answer", f"expected Event.answer for question {question_id!r}, got {kind}")
    _expect(event.answer.question_id == question_id, f"answer to {event.answer.question_id!r}, not {question_id!r}")
    return event.answer


@check("conversations/question-needs-id")
async def _question_needs_id(s: Suite) -> str:
    """A message whose Question has no id is INVALID_ARGUMENT, and nothing is sent."""
    source = await s.source()
    message = core_pb2.Message(body=f"question-{s.token}", source=source, question=core_pb2.Question())
    request = robot_pb2.SendMessagesRequest(messages=[message])
    details = await s.expect_code(
        "SendMessages with a question without id",
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: s.robot.SendMessages(request, metadata=s.metadata(), timeout=s.timeout),
    )
    return f"INVALID_ARGUMENT: {details}"


@check("conversations/answer", needs=["control"])
async def _question_answered(s: Suite) -> str:
    """The person's next message in the room answers a question (Event.answer,
    STATUS_ANSWERED, with the message) and no route sees it; the message after it goes
    to the routes again."""
    async with s.listen([_route("heard", f"^answer-{s.token}$")]) as listener:
        await _ask(s, f"q-{s.token}", f"question-{s.token}?")
        await s.inject(f"answer-{s.token}")
        answer = await _answer(listener, f"q-{s.token}")
        _expect(answer.status == core_pb2.QuestionAnswer.STATUS_ANSWERED, f"status {answer.status}, not ANSWERED")
        _expect(answer.message.body == f"answer-{s.token}", f"the answer's body is {answer.message.body!r}")
        await s.inject(f"answer-{s.token}")
        m = await listener.matched()
        _expect(m.route_id == "heard", f"matched {m.route_id!r}")
    return "answered with the person's next message, which no route saw; the next one was routed"


@check("conversations/cancel", needs=["control"])
async def _question_cancelled(s: Suite) -> str:
    """CancelQuestion ends an open question (cancelled true, Event.answer with
    STATUS_CANCELLED); cancelling it again answers cancelled false."""
    async with s.listen([_route("heard", f"^after-{s.token}$")]) as listener:
        question_id = f"c-{s.token}"
        await _ask(s, question_id, f"question-{s.token}?")
        request = robot_pb2.CancelQuestionRequest(question_id=question_id)
        first = await s.call(lambda: s.robot.CancelQuestion(request, metadata=s.metadata(), timeout=s.timeout))
        _expect(first.cancelled, "CancelQuestion of an open question answered cancelled=false")
        answer = await _answer(listener, question_id)
        _expect(answer.status == core_pb2.QuestionAnswer.STATUS_CANCELLED, f"status {answer.status}, not CANCELLED")
        again = await s.call(lambda: s.robot.CancelQuestion(request, metadata=s.metadata(), timeout=s.timeout))
        _expect(not again.cancelled, "CancelQuestion of an ended question answered cancelled=true")
        await s.inject(f"after-{s.token}")
        m = await listener.matched()
        _expect(m.route_id == "heard", f"matched {m.route_id!r}")
    return "cancelled, told on the stream; a second cancel is a no-op; the person is routed again"


# ---- rich replies (an extension) -------------------------------------------------------


def _adapter_prefix(source: core_pb2.Source) -> str:
    """The prefix of the ids of the suite's room ("memory/"): the bot's ids of what the
    control service names by the chat service's own ids."""
    return source.room.id.rpartition("/")[0] + "/"


async def _next_is(listener: Listener, route_id: str, what: str) -> None:
    """The stream's next event is the match of ``route_id`` (a sentinel): nothing of
    ``what`` came before it."""
    event = await listener.event()
    kind = event.WhichOneof("type")
    if kind != "matched_message" or event.matched_message.route_id != route_id:
        shown = event.matched_message.route_id if kind == "matched_message" else kind
        raise CheckFailed(f"{what}: expected the match of {route_id!r} next, got {shown}")


@check("rich/message-ids", needs=["control"])
async def _rich_message_ids(s: Suite) -> str:
    """SendMessages answers `message_ids`: one per message, in order, each the bot's id
    of the message sent (`<adapter>/<the chat service's id>`, as ListSent shows it) or ""
    where the service gives none; no two alike. A bot that answers none does not offer
    them (an extension)."""
    source = await s.source()
    bodies = [f"ids-{i}-{s.token}" for i in range(2)]
    messages = [core_pb2.Message(body=b, source=core_pb2.Source(room=source.room)) for b in bodies]
    request = robot_pb2.SendMessagesRequest(messages=messages)
    response = await s.call(lambda: s.robot.SendMessages(request, metadata=s.metadata(), timeout=s.timeout))
    ids = list(response.message_ids)
    sent = await s.sent(*bodies)
    if not ids:
        raise NotOffered("SendMessages answered no message_ids (the ids of sent messages are an extension)")
    _expect(len(ids) == len(bodies), f"{len(bodies)} messages sent, {len(ids)} ids answered: {ids}")
    prefix = _adapter_prefix(source)
    expected = [prefix + m.id if m.id else "" for m in sent]
    _expect(ids == expected, f"message_ids {ids}, but the messages sent have the ids {expected}")
    given = [i for i in ids if i]
    _expect(len(set(given)) == len(given), f"two messages got the same id: {ids}")
    return f"{len(ids)} messages, ids {ids}"


@check("rich/reaction-event", needs=["control"])
async def _rich_reaction_event(s: Suite) -> str:
    """A reaction (the control service's InjectReaction) reaches a stream that asked for
    EVENT_KIND_REACTION as Event.reaction, with the id of the message reacted to, the key,
    who and where; a stream that did not ask gets nothing of it."""
    source = await s.source()
    target = f"reacted-{s.token}"
    sentinel = f"^sentinel-{s.token}$"
    async with (
        s.listen([_route("sentinel-a", sentinel)], events=[robot_pb2.EVENT_KIND_REACTION]) as asked,
        s.listen([_route("sentinel-b", sentinel)]) as other,
    ):
        await s.inject(f"react-to-me-{s.token}", id=target)
        request = control_pb2.InjectReactionRequest(
            user=s.target.user, room=s.target.room, message_id=target, key="👍", id=f"reaction-{s.token}"
        )
        await s.control_call("InjectReaction", request)
        await s.inject(f"sentinel-{s.token}")
        event = await asked.event()
        _expect(event.WhichOneof("type") == "reaction", f"expected Event.reaction, got {event.WhichOneof('type')}")
        reaction = event.reaction
        prefix = _adapter_prefix(source)
        seen = (reaction.message_id, reaction.key, reaction.source.user.id, reaction.source.room.id)
        wanted = (prefix + target, "👍", source.user.id, source.room.id)
        _expect(seen == wanted, f"reaction (message_id, key, user, room) = {seen}, expected {wanted}")
        await _next_is(asked, "sentinel-a", "the stream that asked")
        await _next_is(other, "sentinel-b", "the stream that did not ask for reactions")
    return f"{reaction.key} on {reaction.message_id} by {reaction.source.user.id}, only to the stream that asked"


@check("rich/edit-event", needs=["control"])
async def _rich_edit_event(s: Suite) -> str:
    """An edit (Inject with edit_of) reaches a stream that asked for EVENT_KIND_EDIT as
    Event.edit, its new body with edit_of naming the message edited, and matches no
    route: neither that stream's nor one's that did not ask, which gets nothing of it."""
    source = await s.source()
    original = f"original-{s.token}"
    pattern, sentinel = f"^edited-{s.token}$", f"^sentinel-{s.token}$"
    async with (
        s.listen(
            [_route("edited-a", pattern), _route("sentinel-a", sentinel)], events=[robot_pb2.EVENT_KIND_EDIT]
        ) as asked,
        s.listen([_route("edited-b", pattern), _route("sentinel-b", sentinel)]) as other,
    ):
        await s.inject(f"before-{s.token}", id=original)
        await s.inject(f"edited-{s.token}", id=f"{original}-v2", edit_of=original)
        await s.inject(f"sentinel-{s.token}")
        event = await asked.event()
        kind = event.WhichOneof("type")
        _expect(kind == "edit", f"expected Event.edit, got {kind}")
        edit = event.edit
        prefix = _adapter_prefix(source)
        seen = (edit.body, edit.edit_of, edit.source.user.id, edit.source.room.id)
        wanted = (f"edited-{s.token}", prefix + original, source.user.id, source.room.id)
        _expect(seen == wanted, f"edit (body, edit_of, user, room) = {seen}, expected {wanted}")
        await _next_is(asked, "sentinel-a", "the edit matched a route of the stream that asked")
        await _next_is(other, "sentinel-b", "the stream that did not ask for edits")
    return f"Event.edit of {edit.edit_of} only to the stream that asked; no route matched it"


@check("rich/edit-own-only", needs=["control"])
async def _rich_edit_own_only(s: Suite) -> str:
    """An edit of the callback's own message (an id SendMessages gave) goes out as an
    edit of it; an edit naming any other id (one the bot never gave this callback) fails
    with NOT_FOUND and sends nothing."""
    source = await s.source()
    room = core_pb2.Source(room=source.room)
    body = f"to-edit-{s.token}"
    request = robot_pb2.SendMessagesRequest(messages=[core_pb2.Message(body=body, source=room)])
    response = await s.call(lambda: s.robot.SendMessages(request, metadata=s.metadata(), timeout=s.timeout))
    if not response.message_ids or not response.message_ids[0]:
        raise NotOffered("SendMessages gave the message no id to edit (message ids are an extension)")
    [original] = await s.sent(body)
    forged = robot_pb2.SendMessagesRequest(
        messages=[core_pb2.Message(body="forged", source=room, edit_of=f"{_adapter_prefix(source)}forged-{s.token}")]
    )
    details = await s.expect_code(
        "an edit of a message this callback did not send",
        grpc.StatusCode.NOT_FOUND,
        lambda: s.robot.SendMessages(forged, metadata=s.metadata(), timeout=s.timeout),
    )
    edited = f"edited-{s.token}"
    edit = robot_pb2.SendMessagesRequest(
        messages=[core_pb2.Message(body=edited, source=room, edit_of=response.message_ids[0])]
    )
    await s.call(lambda: s.robot.SendMessages(edit, metadata=s.metadata(), timeout=s.timeout))
    [sent] = await s.sent(edited)
    # An adapter that shows no edits gets a correction instead: then edit_of is empty.
    _expect(
        sent.edit_of in (original.id, ""),
        f"the edit went out as an edit of {sent.edit_of!r}, not of {original.id!r}",
    )
    return f"own message edited ({sent.edit_of or 'as a correction'}); another id: NOT_FOUND ({details})"


@check("rich/get-attachment", needs=["control"])
async def _rich_get_attachment(s: Suite) -> str:
    """A file a person sent reaches the callback as an attachment with its url, and
    Robot.GetAttachment with that url returns its content; a url the bot did not
    deliver fails with NOT_FOUND (the bot fetches no url a callback makes up)."""
    url = f"https://files.example.org/conformance/{s.token}"
    content = f"file-{s.token}".encode() * 16
    file = core_pb2.Attachment(name="notes.txt", media_type="text/plain", url=url, data=content)
    async with s.listen([_route("file", f"^file-{s.token}$")]) as listener:
        await s.inject(f"file-{s.token}", attachments=[file])
        event = await listener.event()
    urls = [a.url for a in event.matched_message.message.attachments]
    _expect(urls == [url], f"the message's attachments have the urls {urls}, expected [{url!r}]")
    request = robot_pb2.GetAttachmentRequest(url=url)
    try:
        response = await s.call(lambda: s.robot.GetAttachment(request, metadata=s.metadata(), timeout=s.timeout))
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            raise NotOffered("the bot does not offer GetAttachment (UNIMPLEMENTED)") from None
        raise CheckFailed(f"GetAttachment of the url it delivered: {_code(exc)}") from None
    _expect(response.data == content, f"GetAttachment returned {len(response.data)} bytes, not the file's")
    forged = robot_pb2.GetAttachmentRequest(url=f"https://files.example.org/forged/{s.token}")
    details = await s.expect_code(
        "GetAttachment of a url the bot did not deliver",
        grpc.StatusCode.NOT_FOUND,
        lambda: s.robot.GetAttachment(forged, metadata=s.metadata(), timeout=s.timeout),
    )
    return f"{len(response.data)} bytes back; a made-up url: NOT_FOUND ({details})"


@check("membership/renamed", needs=["control"])
async def _membership_renamed(s: Suite) -> str:
    """A person renamed in a room (InjectMembership, KIND_RENAMED) reaches a stream that
    asked for EVENT_KIND_MEMBERSHIP as one MembershipChange of KIND_RENAMED, with who
    they are now (user), who they were (previous) and the room: not a departure and an
    arrival."""
    source = await s.source()
    old, new = f"old{s.token}", f"new{s.token}"
    async with s.listen(
        [_route("sentinel", f"^sentinel-{s.token}$")], events=[robot_pb2.EVENT_KIND_MEMBERSHIP]
    ) as listener:
        request = control_pb2.InjectMembershipRequest(
            kind=core_pb2.MembershipChange.KIND_RENAMED, user=new, previous=old, room=s.target.room
        )
        await s.control_call("InjectMembership", request)
        await s.inject(f"sentinel-{s.token}")
        changes: list[core_pb2.MembershipChange] = []
        while (event := await listener.event()).WhichOneof("type") != "matched_message":
            change = event.membership_change
            if {change.user.id.rpartition("/")[2], change.previous.id.rpartition("/")[2]} & {old, new}:
                changes.append(change)
    kinds = [core_pb2.MembershipChange.Kind.Name(c.kind) for c in changes]
    _expect(kinds == ["KIND_RENAMED"], f"the rename came as {kinds or 'nothing'}, expected one KIND_RENAMED")
    [change] = changes
    prefix = _adapter_prefix(source)
    seen = (change.user.id, change.previous.id, change.room.id)
    wanted = (prefix + new, prefix + old, source.room.id)
    _expect(seen == wanted, f"(user, previous, room) = {seen}, expected {wanted}")
    return f"KIND_RENAMED {change.previous.id} -> {change.user.id} in {change.room.id}"


# ---- webhooks --------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpAnswer:
    """What the bot's HTTP server answered."""

    status: int
    headers: dict[str, str]
    body: bytes


async def http_request(
    base: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> HttpAnswer:
    """One HTTP/1.1 request to the bot's HTTP server at ``base`` ("http://host:port"; https
    with the system's roots), ``Connection: close``: enough for the webhook checks
    without an HTTP client among oco-core's dependencies."""
    url = urllib.parse.urlsplit(base)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise CheckSkipped(f"--http {base!r} is not an http:// or https:// URL such as http://127.0.0.1:8080")
    https = url.scheme == "https"
    stream: trio.abc.Stream = await trio.open_tcp_stream(url.hostname, url.port or (443 if https else 80))
    async with stream:
        if https:
            stream = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=url.hostname)
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: {url.netloc}",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise CheckFailed(f"{method} {path}: the HTTP server answered {status_line[:80]!r}, not an HTTP status line")
    answer_headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        answer_headers[name.strip().lower()] = value.strip()
    if answer_headers.get("transfer-encoding", "").lower() == "chunked":
        decoded = bytearray()
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            decoded += rest[:size]
            rest = rest[size + 2 :]
        rest = bytes(decoded)
    elif "content-length" in answer_headers:
        rest = rest[: int(answer_headers["content-length"])]
    return HttpAnswer(int(parts[1]), answer_headers, rest)


@contextlib.asynccontextmanager
async def _first_failure() -> AsyncIterator[None]:
    """A verdict raised inside a nursery, as itself rather than in a group."""
    try:
        yield
    except BaseExceptionGroup as group:
        failed = group.subgroup(CheckFailed)
        first: BaseException | None = failed
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        if first is None:
            raise
        raise first from None


def _answered_itself(answer: HttpAnswer) -> CheckFailed:
    hint = " (is --webhook-token the callback's webhook_auth bearer token?)" if answer.status == 401 else ""
    return CheckFailed(
        f"the bot answered {answer.status} {answer.body[:200]!r} without delivering the request to the callback{hint}"
    )


def _hook_path(s: Suite, path: str) -> str:
    return f"/hooks/{s.target.id}{path}"


def _hook_headers(s: Suite, **more: str) -> dict[str, str]:
    headers = dict(more)
    if s.target.webhook_token:
        headers["Authorization"] = f"Bearer {s.target.webhook_token}"
    return headers


async def _webhook_event(listener: Listener) -> core_pb2.Event:
    while True:
        event = await listener.event()
        if event.WhichOneof("type") == "webhook_request":
            return event


@check("webhooks/synchronous", needs=["http"])
async def _webhooks_synchronous(s: Suite) -> str:
    """A request to a synchronous webhook route (ListenRequest.webhooks) at
    `/hooks/<id><path>` reaches the callback as a WebhookRequest (route id, method, path,
    query, lower-case headers, body; no delivery_id: it is not kept), and the HTTP client
    gets what Robot.RespondWebhook answers (status, headers, body); a second answer to the
    same request fails with NOT_FOUND."""
    path = f"/conformance-{s.token}/echo"
    route = robot_pb2.WebhookRoute(id="echo", method="POST", path=path)
    answers: list[HttpAnswer] = []
    async with s.listen(request=robot_pb2.ListenRequest(plugin_id=s.target.id, webhooks=[route])) as listener:
        async with _first_failure(), trio.open_nursery() as nursery:
            waiting = trio.CancelScope()

            async def call() -> None:
                headers = _hook_headers(s, **{"X-Conformance": s.token, "Content-Type": "text/plain"})
                url = _hook_path(s, path) + "?x=1"
                answers.append(await http_request(s.target.http or "", "POST", url, b"ping", headers))
                waiting.cancel()  # answered before the callback was asked: the bot answered itself

            nursery.start_soon(call)
            with waiting:
                event = await _webhook_event(listener)
            if waiting.cancelled_caught:
                raise _answered_itself(answers[0])
            got = event.webhook_request
            _expect(bool(got.id), "the WebhookRequest has no id")
            _expect(got.route_id == "echo", f"route_id {got.route_id!r}, expected 'echo'")
            _expect(
                (got.method, got.path, got.query) == ("POST", path, "x=1"),
                f"method, path, query: {got.method} {got.path} {got.query!r}",
            )
            _expect(
                got.headers.get("x-conformance") == s.token,
                f"headers {dict(got.headers)} lack x-conformance: {s.token}",
            )
            _expect(got.body == b"ping", f"body {got.body!r}, expected b'ping'")
            _expect(not got.asynchronous, "a synchronous route's request says asynchronous")
            _expect(not event.delivery_id, f"a synchronous request carries delivery_id {event.delivery_id!r}")
            response = robot_pb2.WebhookResponse(
                request_id=got.id, status=201, headers={"x-answer": s.token}, body=b"pong"
            )
            await s.call(lambda: s.robot.RespondWebhook(response, metadata=s.metadata(), timeout=s.timeout))
        # The client has its answer now.
        answer = answers[0]
        _expect(answer.status == 201, f"the HTTP client got {answer.status}, expected the callback's 201")
        _expect(answer.headers.get("x-answer") == s.token, f"the HTTP client got headers {answer.headers}")
        _expect(answer.body == b"pong", f"the HTTP client got body {answer.body!r}, expected b'pong'")
        await s.expect_code(
            "a second RespondWebhook for the same request",
            grpc.StatusCode.NOT_FOUND,
            lambda: s.robot.RespondWebhook(response, metadata=s.metadata(), timeout=s.timeout),
        )
    return "the request reached the callback, its answer the client (201, header, body); a second answer NOT_FOUND"


@check("webhooks/asynchronous", needs=["http"])
async def _webhooks_asynchronous(s: Suite) -> str:
    """A request to an asynchronous route is answered 202 by the bot at once and reaches
    the callback as a durable event (asynchronous, with a delivery_id on a stream that
    acknowledges); a request to a path no route declares is answered 404."""
    path = f"/conformance-{s.token}/later"
    route = robot_pb2.WebhookRoute(id="later", method="POST", path=path, asynchronous=True)
    request = robot_pb2.ListenRequest(plugin_id=s.target.id, webhooks=[route], acknowledge=True)
    async with s.listen(request=request) as listener:
        answer = await http_request(s.target.http or "", "POST", _hook_path(s, path), b"later", _hook_headers(s))
        if answer.status != 202:
            raise (
                _answered_itself(answer) if answer.status >= 400 else CheckFailed(f"answered {answer.status}, not 202")
            )
        event = await _webhook_event(listener)
        got = event.webhook_request
        _expect(got.asynchronous, "an asynchronous route's request does not say asynchronous")
        _expect(got.body == b"later" and got.route_id == "later", f"route {got.route_id!r}, body {got.body!r}")
        _expect(bool(event.delivery_id), "an asynchronous request carries no delivery_id on a stream that acknowledges")
        await s.acknowledge(event)
        missing = await http_request(
            s.target.http or "", "POST", _hook_path(s, f"/conformance-{s.token}/nothing-here"), b"", _hook_headers(s)
        )
        _expect(missing.status == 404, f"a path no route declares: {missing.status}, expected 404")
    return "202 at once, then delivered with a delivery_id and acknowledged; 404 for an undeclared path"


# ---- running ---------------------------------------------------------------------------


async def run_checks(target: Target, out: TextIO = sys.stdout, only: Sequence[str] = ()) -> list[Result]:
    """Run every check (or those whose name starts with one of ``only``) against
    ``target``, printing one line each as it finishes."""
    results: list[Result] = []
    async with open_bridge() as bridge:
        channel = await bridge.open_channel(target.address)
        control_channel = await bridge.open_channel(target.control) if target.control else None
        try:
            suite = Suite(target, bridge, channel)
            if control_channel is not None:
                suite.control = control_pb2_grpc.MemoryControlStub(control_channel)
            for item in CHECKS:
                if only and not any(item.name.startswith(prefix) for prefix in only):
                    continue
                result = await _run_one(suite, item)
                results.append(result)
                print(result.line(), file=out, flush=True)
        finally:
            with trio.CancelScope(shield=True):
                await bridge.close_channel(channel)
                if control_channel is not None:
                    await bridge.close_channel(control_channel)
    return results


async def _run_one(suite: Suite, item: Check) -> Result:
    missing = []
    if "control" in item.needs and suite.control is None:
        missing.append("--control")
    if "other" in item.needs and not (suite.target.other_id and suite.target.other_secret):
        missing.append("--other-id and --other-secret")
    if "http" in item.needs and not suite.target.http:
        missing.append("--http")
    if missing:
        return Result(item.name, "SKIP", f"needs {' and '.join(missing)}: {item.doc}")
    began = time.monotonic()
    try:
        with trio.fail_after(suite.timeout * 4):
            detail = await item.run(suite)
    except CheckFailed as exc:
        return Result(item.name, "FAIL", str(exc))
    except NotOffered as exc:
        return Result(item.name, "SKIP", f"{exc} (an optional feature: not a failure)", not_offered=True)
    except CheckSkipped as exc:
        return Result(item.name, "SKIP", str(exc))
    except grpc.aio.AioRpcError as exc:
        return Result(item.name, "FAIL", f"unexpected {_code(exc)}")
    except trio.TooSlowError:
        return Result(item.name, "FAIL", f"did not finish within {suite.timeout * 4:g} s")
    return Result(item.name, "PASS", f"{detail} ({time.monotonic() - began:.2f} s)")


def conforms(results: Sequence[Result]) -> bool:
    """Whether a run shows the bot conforming: some check ran, none failed, and every
    skip was of a feature the bot does not offer."""
    return bool(results) and not any(r.counts_against for r in results)


def summary(results: Sequence[Result], target: Target) -> str:
    """The last line: how many checks passed, failed and were skipped."""
    counts = {status: sum(r.status == status for r in results) for status in ("PASS", "FAIL", "SKIP")}
    not_offered = sum(r.not_offered for r in results)
    verdict = "conforms" if conforms(results) else "does NOT conform"
    line = (
        f"SUMMARY {target.address} {verdict}: {counts['PASS']} passed, {counts['FAIL']} failed, "
        f"{counts['SKIP']} skipped of {len(results)} checks"
    )
    notes = []
    if not_offered:
        notes.append(f"{not_offered} skipped for features the bot does not offer, which is not a failure")
    if counts["SKIP"] > not_offered:
        notes.append("skipped checks for want of an option count as not passed")
    if notes:
        line += f" ({'; '.join(notes)})"
    return line


def main(options: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Run ``oco conformance``; 0 when no check failed and every skip was of a feature
    the bot does not offer, else 1."""
    if options.list:
        for item in CHECKS:
            needs = f" [needs {', '.join(sorted(item.needs))}]" if item.needs else ""
            print(f"{item.name}: {item.doc}{needs}", file=out)
        return 0
    options.secret = options.secret or os.environ.get("OCO_SECRET")
    missing = [f"--{name}" for name in ("address", "id", "secret") if not getattr(options, name)]
    if missing:
        print(f"oco conformance: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    if bool(options.other_id) != bool(options.other_secret):
        print("oco conformance: give both --other-id and --other-secret, or neither", file=sys.stderr)
        return 2
    target = Target(
        address=options.address,
        id=options.id,
        secret=options.secret,
        other_id=options.other_id,
        other_secret=options.other_secret,
        control=options.control,
        datastore=options.datastore,
        bot_name=options.bot_name,
        http=options.http,
        webhook_token=options.webhook_token or os.environ.get("OCO_WEBHOOK_TOKEN"),
        room=options.room,
        user=options.user,
        timeout=options.timeout,
    )
    results = trio.run(run_checks, target, out, options.only)
    print(summary(results, target), file=out, flush=True)
    return 0 if conforms(results) else 1
