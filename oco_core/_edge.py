"""The gRPC edge: authenticates every call by its secret and hands it to the bot.

Services: the specification's ``oco.Robot`` (extended), and OCO's ``oco.Storage`` and
``oco.Directory``; plus the standard health and reflection services. Handlers are plain
trio functions; :mod:`._bridge` serves them over grpc.aio.

Who is calling is :mod:`._secrets`'s business; what the caller may do (its
capabilities) is checked here, before the call does anything.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import resource
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import trio

from ._approvals import Approvals
from ._audit import ALLOWED, DENIED
from ._auth import Authorization
from ._bridge import (
    Bridge,
    CallInfo,
    Method,
    RequestStream,
    RpcAbort,
    ServerHandle,
    ServerTls,
    StreamWriter,
    Undecodable,
    open_bridge,
)
from ._config import GrpcSettings
from ._conversations import Conversations
from ._datastores import DataStores
from ._directory import Directory, RoomRecord, UserRecord
from ._errors import InvalidRequestError, OcoError, RequestTooLargeError, to_status, to_wire
from ._events import EventHub, topic_pattern_problem, topic_problem
from ._health import Health
from ._metrics import Metrics
from ._policy import CallbackPolicy
from ._proto import authorization_pb2, core_pb2, datastores_pb2, directory_pb2, robot_pb2, storage_pb2
from ._router import ApprovalNeed, Queued, Route, Router, Subscription
from ._secrets import CACHE_SECONDS, Authenticator
from ._store import MAX_KEY_BYTES, Store
from ._timing import Throttle

log = logging.getLogger(__name__)

R = TypeVar("R")

ROBOT = "oco.Robot"
STORAGE = "oco.Storage"
DIRECTORY = "oco.Directory"
AUTHORIZATION = "oco.Authorization"
DATASTORES = "oco.DataStores"

#: Refused callers are audited once per host per this many seconds.
_REFUSAL_WINDOW = 60.0
#: How often an open Listen stream's secret is checked again.
RECHECK_SECONDS = CACHE_SECONDS
_LIST_DEFAULT = 100
_LIST_MAX = 1000


def _status(exc: OcoError) -> RpcAbort:
    """The gRPC status for an error the bot raised on purpose, with trailing metadata
    naming its class and attributes (one table for edge and SDK: :data:`._errors.WIRE`)."""
    return RpcAbort(*to_status(exc))


@contextmanager
def _statuses() -> Iterator[None]:
    """Errors raised on purpose inside the block end the RPC with their status."""
    try:
        yield
    except OcoError as exc:
        raise _status(exc) from None


async def _guard(call: Awaitable[R]) -> R:
    with _statuses():
        return await call


class CallbackListening(Protocol):
    """What the edge reads and sets of one callback's state."""

    #: Routes the operator declared for it in the config.
    routes: list[Route]
    #: Set once it has opened a Listen stream.
    connected: trio.Event


class EdgeHost(Protocol):
    """The running bot as the gRPC edge sees it: all an RPC may reach. Implemented by
    :class:`~._core.BotCore`; the edge never sees the rest of the bot."""

    @property
    def store(self) -> Store: ...
    @property
    def directory(self) -> Directory: ...
    @property
    def auth(self) -> Authorization: ...
    @property
    def router(self) -> Router: ...
    @property
    def events(self) -> EventHub: ...
    @property
    def datastores(self) -> DataStores: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def health(self) -> Health: ...
    @property
    def approvals(self) -> Approvals: ...
    @property
    def conversations(self) -> Conversations: ...

    async def fetch_file(self, url: str) -> tuple[bytes, str]:
        """A file a person sent lately, by its url (Robot.GetAttachment)."""

    def secrets(self) -> Mapping[str, str]:
        """The configured callbacks' secrets by id ("" where the store keeps its hash)."""

    def callback_state(self, callback_id: str) -> CallbackListening:
        """The state of a callback that has authenticated."""

    def policy(self, callback_id: str) -> CallbackPolicy:
        """A callback's capabilities and rate limit."""

    def record(self, kind: str, decision: str, **details: str) -> None:
        """Add a record to the audit log."""

    def canonical_user(self, user_id: str) -> str:
        """A user id as typed → the id messages carry."""

    async def send_messages(self, callback_id: str, request: robot_pb2.SendMessagesRequest) -> list[str]:
        """Send a request's messages, all checked before the first goes out."""

    async def join(self, room: core_pb2.Room, leave: bool = False) -> None:
        """Join or part a room."""


#: Events of a Listen stream that may wait between trio and the gRPC loop. Fewer bound
#: memory tighter (with 1 MB messages each costs 1 MB a stream), but the loop gives credit
#: back every quarter of them, each a thread wake-up: 8 cost about a fifth of the replies
#: a second with many in flight; 32 keep most of them (measured with bench_roundtrip.py, since replaced
#: by bench/bench_transport.py).
_LISTEN_WINDOW = 32
#: Open files the bot needs besides the API's connections (store, chat, callbacks' pipes).
_FILES_FOR_THE_REST = 256
#: Seconds between counts of the API's connections, and between warnings about them.
_CONNECTION_CHECK_INTERVAL = 5.0
_CONNECTION_WARNING_INTERVAL = 60.0


def _undecodable_result(name: str, request: Undecodable) -> robot_pb2.SendResult:
    """The answer to a request on a sending stream that is not the message it should be:
    it fails alone, the stream goes on."""
    return robot_pb2.SendResult(
        code=grpc.StatusCode.INVALID_ARGUMENT.value[0], error=f"not a valid {name}: {request.error}"
    )


class Services:
    """The trio implementations of every RPC, for one bot."""

    def __init__(self, bot: EdgeHost, settings: GrpcSettings) -> None:
        self.bot = bot
        self.settings = settings
        self.auth = Authenticator(dict(bot.secrets()), bot.store)
        self._refusals = Throttle(_REFUSAL_WINDOW)
        self._logged_refusals = Throttle(settings.refusal_log_interval)
        #: Set at shutdown: streams end (with OK) instead of waiting for more.
        self._ending = False
        #: The waits of open SendMessageStreams for their next request.
        self._idle_streams: set[trio.CancelScope] = set()
        #: Listen streams being registered, by callback: they count towards its limit.
        self._opening: dict[str, set[Subscription]] = {}

    def end_streams(self) -> None:
        """At shutdown: end every open stream with OK. Listen streams send what is
        already queued and end; SendMessageStreams end once the request being sent (if
        any) is answered. Neither would end by itself: the client decides when."""
        self._ending = True
        for subscription in self.bot.router.subscriptions():
            subscription.close()
        for idle in self._idle_streams:
            idle.cancel()

    def _log_refusal(self, info: CallInfo, callback_id: str, reason: str, details: str) -> None:
        """One WARNING line in the bot's log for a refused callback connection: the first
        of each (callback, reason) in ``grpc.refusal_log_interval`` seconds, with the
        count of those left out since, so an operator sees why a callback cannot connect
        without reading the audit log, and a callback retrying in a loop cannot flood it."""
        skipped = self._logged_refusals.allow((callback_id, reason))
        if skipped is None:
            return
        more = f" ({skipped} more since the last such line)" if skipped else ""
        who = repr(callback_id) if callback_id else "unknown"
        log.warning("refused callback %s from %s: %s%s", who, info.peer, details, more)

    def _refused(self, info: CallInfo, callback_id: str, details: str, reason: str = "") -> None:
        """Audit a caller refused for who it is: the first refusal from a host in a minute,
        with a count of those left out since, so a flood of bad secrets cannot flood the log."""
        self._log_refusal(info, callback_id, reason or details, details)
        host = info.peer.rpartition(":")[0] or info.peer
        skipped = self._refusals.allow(host)
        if skipped is None:
            return
        more = f" ({skipped} more from {host} in the minute before)" if skipped else ""
        self.bot.record("authentication", DENIED, callback=callback_id, detail=f"{details}; peer {info.peer}{more}")

    async def _caller(self, info: CallInfo, capability: str | None = None) -> str:
        """The calling callback's id, once its secret (and certificate) check out and,
        when ``capability`` is named, its configuration grants it."""
        try:
            callback_id = await self.auth.identify(info)
        except RpcAbort as exc:
            if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                self._refused(info, "", exc.details)
            elif exc.code == grpc.StatusCode.UNAVAILABLE:  # the store could not be asked
                self._log_refusal(info, "", "secrets unavailable", exc.details)
            raise
        tls = self.settings.tls
        if tls is not None and tls.client_ca is not None and callback_id not in info.peer_identities:
            # The secret says who is calling; under mutual TLS the certificate must agree.
            named = ", ".join(map(repr, info.peer_identities)) or "no common name or subject alternative name"
            details = (
                f"the client certificate is not for callback {callback_id!r}: it names {named}; under mutual TLS "
                "a callback's certificate needs its id as common name or subject alternative name"
            )
            self._refused(info, callback_id, details, "client certificate")
            raise RpcAbort(grpc.StatusCode.PERMISSION_DENIED, details)
        if capability is not None:
            with _statuses():
                self.bot.policy(callback_id).require(capability)
        return callback_id

    # -- oco.Robot -------------------------------------------------------------------

    async def listen(self, request: robot_pb2.ListenRequest, info: CallInfo, out: StreamWriter[Any]) -> None:
        """Register the stream's routes, then forward its events until the client leaves."""
        await self._listen(request, info, out, self._forward_events)

    async def listen_batches(self, request: robot_pb2.ListenRequest, info: CallInfo, out: StreamWriter[Any]) -> None:
        """Listen, with every event waiting at each write in one EventBatch."""
        await self._listen(request, info, out, self._forward_batches)

    @staticmethod
    async def _forward_events(subscription: Subscription, out: StreamWriter[Any]) -> None:
        while (queued := await subscription.next_queued()) is not None:
            await out.write(queued.event())
            if queued.on_written is not None:
                queued.on_written()

    async def _forward_batches(self, subscription: Subscription, out: StreamWriter[Any]) -> None:
        # Never waits to fill a batch: it takes what is queued when the previous write
        # is done. The stream's window is one batch (see table()), so while grpc writes
        # one, the next gathers in the subscription's queue, bounded as for Listen.
        most, most_bytes = self.settings.batch_max_events, self.settings.batch_max_bytes
        carried: Queued | None = None
        while True:
            first = carried if carried is not None else await subscription.next_queued()
            carried = None
            if first is None:
                return
            batch = [first]
            size = 0
            while len(batch) < most:
                try:
                    queued = subscription.take_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                size += queued.size
                if size > most_bytes:
                    carried = queued  # first of the next batch
                    break
                batch.append(queued)
            message = robot_pb2.EventBatch()
            events = message.events
            # Added one by one: upb's constructor given a list costs twice as much (4 -> 2 µs for three).
            for queued in batch:
                events.add().CopyFrom(queued.event())
            await out.write(message)
            for queued in batch:
                if queued.on_written is not None:
                    queued.on_written()

    async def _listen(
        self,
        request: robot_pb2.ListenRequest,
        info: CallInfo,
        out: StreamWriter[Any],
        forward: Callable[[Subscription, StreamWriter[Any]], Awaitable[None]],
    ) -> None:
        callback_id = await self._caller(info)
        try:
            if request.plugin_id and request.plugin_id != callback_id:
                raise RpcAbort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"plugin_id {request.plugin_id!r} is not the callback this secret belongs to ({callback_id!r})",
                )
            with _statuses():
                policy = self.bot.policy(callback_id)
                policy.require_events(set(request.events))
                for datastore in request.requires:
                    _check_datastore_type(datastore)
                    policy.require_datastore(datastore)
                self.bot.datastores.require(callback_id, request.requires)
                self._check_event_declarations(policy, request)
        except RpcAbort as exc:
            # A callback the bot will not let listen is the operator's business too.
            self._log_refusal(info, callback_id, exc.code.name, exc.details)
            raise
        chat_ttl = self.bot.events.settings.chat_ttl
        routes = [Route.declared(r, chat_ttl) for r in request.routes]
        state = self.bot.callback_state(callback_id)
        declared = {r.id for r in routes}
        routes += [r for r in state.routes if r.id not in declared]
        limit = self.settings.max_routes
        if len(routes) > limit:
            raise RpcAbort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(routes)} routes on one Listen stream; this bot's limit is {limit} (grpc.max_routes)",
            )
        ids: set[str] = set()
        for route in routes:
            if route.id in ids:
                raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, f"route id {route.id!r} is declared twice")
            ids.add(route.id)
        # Streams being registered count too (once: a registering stream joins the router's
        # before its tables are built): two opened at once cannot both slip under it.
        opening = self._opening.setdefault(callback_id, set())
        streams = len(opening.union(self.bot.router.subscriptions(callback_id)))
        if streams >= self.settings.max_streams_per_callback:
            raise RpcAbort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"callback {callback_id!r} already has {streams} Listen streams open; this bot's limit is "
                f"{self.settings.max_streams_per_callback} (grpc.max_streams_per_callback)",
            )
        subscription = Subscription(
            callback_id,
            routes,
            events=frozenset(request.events),
            queue_size=self.settings.stream_queue,
            queue_bytes=self.settings.stream_queue_bytes,
            acknowledge=request.acknowledge,
            peer=info.peer,
        )
        policy.check_rules(routes)  # before its routes go live: their ids are never rule patterns
        opening.add(subscription)
        try:
            with _statuses():
                await self.bot.router.register(subscription)
        finally:
            opening.discard(subscription)
            if not opening:
                self._opening.pop(callback_id, None)
        revoked: list[RpcAbort] = []
        try:
            if self._ending:  # registered as the bot began to shut down: end it like the others
                subscription.close()
            log.info("callback %r is listening (%d routes) from %s", callback_id, len(routes), info.peer)
            state.connected.set()
            self.bot.events.stream_opened(subscription, request)
            await out.send_initial_metadata([("oco-routes", str(len(routes)))])
            async with trio.open_nursery() as nursery:

                async def recheck() -> None:
                    # A stream outlives its secret's check: when the secret is rotated or
                    # removed (`oco callbacks rotate`), the stream ends too.
                    while True:
                        await trio.sleep(RECHECK_SECONDS)
                        try:
                            await self.auth.identify(info)
                        except RpcAbort as exc:
                            if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                                self._refused(
                                    info, callback_id, f"Listen stream ended: {exc.details}", "secret no longer valid"
                                )
                                revoked.append(RpcAbort(exc.code, f"the secret is no longer valid: {exc.details}"))
                                nursery.cancel_scope.cancel()
                                return

                nursery.start_soon(recheck)
                await forward(subscription, out)
                nursery.cancel_scope.cancel()
            if revoked:
                raise revoked[0]
        finally:
            lost = self.bot.router.unsubscribe(subscription)
            self.bot.events.stream_closed(subscription)
            if lost:
                log.warning(
                    "callback %r left with %d undelivered event(s) and no replica to take them", callback_id, lost
                )
            log.info("callback %r stopped listening", callback_id)

    def _check_event_declarations(self, policy: CallbackPolicy, request: robot_pb2.ListenRequest) -> None:
        """Refuse a Listen stream whose webhooks, schedules or topics are malformed, or
        that its configuration does not allow."""
        if request.webhooks:
            policy.require("webhooks")
        if request.schedules:
            policy.require("schedules")
        for topic in request.topics:
            problem = topic_pattern_problem(topic)
            if problem is not None:
                raise InvalidRequestError(problem)
            policy.require_topic("subscribe", topic)
        seen: set[str] = set()
        if request.webhooks:
            from ._webhooks import webhook_route_problem  # the HTTP side loads only when used
        for webhook in request.webhooks:
            problem = webhook_route_problem(webhook)
            if problem is not None:
                raise InvalidRequestError(problem)
            key = f"{webhook.method.upper()} {webhook.path}"
            if key in seen:
                raise InvalidRequestError(f"webhook route {key!r} is declared twice")
            seen.add(key)
        if request.schedules:
            from ._schedules import schedule_problem
        for schedule in request.schedules:
            problem = schedule_problem(schedule)
            if problem is not None:
                raise InvalidRequestError(problem)

    async def respond_webhook(
        self, request: robot_pb2.WebhookResponse, info: CallInfo
    ) -> robot_pb2.RespondWebhookResponse:
        """Pass a callback's answer to the HTTP client waiting for it."""
        callback_id = await self._caller(info)
        if request.status and not 100 <= request.status <= 599:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, f"HTTP status {request.status} is not between 100 and 599")
        if not self.bot.events.respond_webhook(callback_id, request):
            raise RpcAbort(
                grpc.StatusCode.NOT_FOUND,
                f"no webhook request {request.request_id!r} of callback {callback_id!r} waits for an answer: it was "
                "answered already, timed out (http.webhook_timeout) or its client went away",
            )
        return robot_pb2.RespondWebhookResponse()

    async def acknowledge(self, request: robot_pb2.AcknowledgeRequest, info: CallInfo) -> robot_pb2.AcknowledgeResponse:
        """Forget durable events the callback has handled."""
        callback_id = await self._caller(info)
        self.bot.events.acknowledge(callback_id, list(request.delivery_ids))
        return robot_pb2.AcknowledgeResponse()

    async def publish(self, request: robot_pb2.PublishRequest, info: CallInfo) -> robot_pb2.PublishResponse:
        """Hand an event to every callback subscribed to its topic."""
        callback_id = await self._caller(info)
        with _statuses():
            problem = topic_problem(request.topic)
            if problem is not None:
                raise InvalidRequestError(problem)
            if request.topic.split(".")[0] == "oco":
                raise InvalidRequestError(
                    f"topic {request.topic!r} is under 'oco.', which only the bot publishes; choose another"
                )
            limit = self.bot.events.settings.max_event_bytes
            size = len(request.payload) + sum(len(k) + len(v) for k, v in request.attributes.items())
            if size > limit:
                raise RequestTooLargeError(
                    f"a payload and attributes of {size} bytes are over this bot's limit of {limit} "
                    "(events.max_event_bytes)"
                )
            self.bot.policy(callback_id).require_topic("publish", request.topic)
        event_id, count = await _guard(
            self.bot.events.publish(callback_id, request.topic, request.payload, dict(request.attributes))
        )
        return robot_pb2.PublishResponse(id=event_id, subscribers=count)

    async def request_approval(
        self, request: robot_pb2.RequestApprovalRequest, info: CallInfo
    ) -> robot_pb2.RequestApprovalResponse:
        """Ask people in chat to approve what the callback is about to do; answer once
        it is decided (approved, denied or timed out)."""
        callback_id = await self._caller(info)
        with _statuses():
            rule, message = request.rule, request.message
            if not rule.role:
                raise InvalidRequestError("rule.role is empty: name the role whose holders approve (say, approvers)")
            room = message.source.room.id if not message.private else ""
            target = room or message.source.user.id
            if not target:
                raise InvalidRequestError("message.source names no user: pass the message the callback received")
            self.bot.policy(callback_id).require_send(target, "the request for approval")
            need = ApprovalNeed(rule.role, min(rule.count or 1, 10), float(min(rule.timeout_seconds or 600, 86400)))
        return await _guard(self.bot.approvals.request(callback_id, message, need, request.action))

    async def get_attachment(
        self, request: robot_pb2.GetAttachmentRequest, info: CallInfo
    ) -> robot_pb2.GetAttachmentResponse:
        """A file a person sent, fetched by its adapter with the bot's own credentials."""
        await self._caller(info)
        if not request.url:
            raise RpcAbort(
                grpc.StatusCode.INVALID_ARGUMENT, "GetAttachmentRequest.url is empty: give an Attachment.url"
            )
        data, media_type = await _guard(self.bot.fetch_file(request.url))
        return robot_pb2.GetAttachmentResponse(data=data, media_type=media_type)

    async def cancel_question(
        self, request: robot_pb2.CancelQuestionRequest, info: CallInfo
    ) -> robot_pb2.CancelQuestionResponse:
        """End one of the callback's open questions before it is answered."""
        callback_id = await self._caller(info)
        return robot_pb2.CancelQuestionResponse(
            cancelled=self.bot.conversations.cancel(callback_id, request.question_id)
        )

    async def send_messages(
        self, request: robot_pb2.SendMessagesRequest, info: CallInfo
    ) -> robot_pb2.SendMessagesResponse:
        """Send messages, all or none checked before the first goes out."""
        callback_id = await self._caller(info)
        ids = await _guard(self.bot.send_messages(callback_id, request))
        return robot_pb2.SendMessagesResponse(message_ids=ids)

    async def send_message_stream(
        self,
        requests: AsyncIterator[robot_pb2.SendMessagesRequest | Undecodable],
        info: CallInfo,
        out: StreamWriter[Any],
    ) -> None:
        """SendMessages over one stream; each request answered in order."""
        callback_id = await self._caller(info)
        await out.send_initial_metadata([])
        while (request := await self._next_request(requests)) is not None:
            if isinstance(request, Undecodable):
                await out.write(_undecodable_result("oco.SendMessagesRequest", request))
            else:
                await out.write(await self._send_result(callback_id, request))

    async def send_message_batches(
        self,
        batches: AsyncIterator[robot_pb2.SendMessagesBatch | Undecodable],
        info: CallInfo,
        out: StreamWriter[Any],
    ) -> None:
        """SendMessageStream with the requests in batches; each batch answered by one
        batch of results, in order."""
        callback_id = await self._caller(info)
        await out.send_initial_metadata([])
        while (batch := await self._next_request(batches)) is not None:
            if isinstance(batch, Undecodable):
                results = [_undecodable_result("oco.SendMessagesBatch", batch)]
            else:
                results = [await self._send_result(callback_id, request) for request in batch.requests]
            await out.write(robot_pb2.SendResultBatch(results=results))

    async def _next_request(self, requests: AsyncIterator[R]) -> R | None:
        """The next request of a sending stream; None once the client half-closed, or
        the bot is shutting down (the wait is cancelled by end_streams: the stream ends
        with OK)."""
        if self._ending:
            return None
        if isinstance(requests, RequestStream):
            # A request that has crossed the bridge already needs no idle scope (a cancel
            # scope costs more than the rest of taking it): nothing waits.
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                return requests.receive_nowait()  # type: ignore[no-any-return]
            except trio.WouldBlock:
                pass
            except trio.EndOfChannel:
                return None
        with trio.CancelScope() as idle:
            self._idle_streams.add(idle)
            try:
                return await anext(requests, None)
            finally:
                self._idle_streams.discard(idle)
        return None

    async def _send_result(self, callback_id: str, request: robot_pb2.SendMessagesRequest) -> robot_pb2.SendResult:
        try:
            ids = await self.bot.send_messages(callback_id, request)
        except OcoError as exc:
            wire = to_wire(exc)
            return robot_pb2.SendResult(
                request_id=request.request_id,
                code=wire.code.value[0],
                error=wire.details,
                error_type=wire.error_type,
                error_fields=wire.fields,
            )
        return robot_pb2.SendResult(request_id=request.request_id, message_ids=ids)

    async def join(self, request: robot_pb2.JoinRequest, info: CallInfo) -> robot_pb2.JoinResponse:
        """Join a room through its adapter."""
        await self._caller(info, "join")
        await _guard(self.bot.join(request.room))
        return robot_pb2.JoinResponse()

    async def part(self, request: robot_pb2.PartRequest, info: CallInfo) -> robot_pb2.PartResponse:
        """Part a room through its adapter."""
        await self._caller(info, "join")
        await _guard(self.bot.join(request.room, leave=True))
        return robot_pb2.PartResponse()

    # -- oco.Storage -----------------------------------------------------------------

    async def _namespace(self, info: CallInfo) -> str:
        return f"cb:{await self._caller(info, 'storage')}"

    @staticmethod
    def _check_key(key: str) -> None:
        if not key:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "the key is empty")
        if len(key.encode()) > MAX_KEY_BYTES:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, f"the key is longer than {MAX_KEY_BYTES} bytes")

    async def get(self, request: storage_pb2.GetRequest, info: CallInfo) -> storage_pb2.GetResponse:
        """Read one key of the caller's namespace."""
        namespace = await self._namespace(info)
        self._check_key(request.key)
        item = await _guard(self.bot.store.get(namespace, request.key))
        if item is None:
            return storage_pb2.GetResponse(found=False)
        return storage_pb2.GetResponse(found=True, value=item.value, version=item.version)

    async def set(self, request: storage_pb2.SetRequest, info: CallInfo) -> storage_pb2.SetResponse:
        """Write one key, optionally as a compare-and-set."""
        namespace = await self._namespace(info)
        self._check_key(request.key)
        expected = request.expected_version if request.HasField("expected_version") else None
        version = await _guard(self.bot.store.set(namespace, request.key, request.value, expected_version=expected))
        return storage_pb2.SetResponse(version=version)

    async def delete(self, request: storage_pb2.DeleteRequest, info: CallInfo) -> storage_pb2.DeleteResponse:
        """Delete one key, optionally only at an expected version."""
        namespace = await self._namespace(info)
        self._check_key(request.key)
        expected = request.expected_version if request.HasField("expected_version") else None
        deleted = await _guard(self.bot.store.delete(namespace, request.key, expected_version=expected))
        return storage_pb2.DeleteResponse(deleted=deleted)

    async def list(self, request: storage_pb2.ListRequest, info: CallInfo) -> storage_pb2.ListResponse:
        """List keys by prefix, a page at a time."""
        namespace = await self._namespace(info)
        limit = min(request.limit or _LIST_DEFAULT, _LIST_MAX)
        items = await _guard(
            self.bot.store.list(
                namespace, request.prefix, start_after=request.start_after, limit=limit, keys_only=request.keys_only
            )
        )
        return storage_pb2.ListResponse(
            items=[storage_pb2.Item(key=i.key, value=i.value, version=i.version) for i in items],
            next_start_after=items[-1].key if len(items) == limit else "",
        )

    # -- oco.Directory ---------------------------------------------------------------

    async def get_user(self, request: directory_pb2.GetUserRequest, info: CallInfo) -> core_pb2.User:
        """One known user."""
        await self._caller(info, "directory")
        with _statuses():
            user = self.bot.directory.user(request.id)
        return _user_pb(user)

    async def list_users(
        self, request: directory_pb2.ListUsersRequest, info: CallInfo
    ) -> directory_pb2.ListUsersResponse:
        """Known users, optionally of one room."""
        await self._caller(info, "directory")
        with _statuses():
            users = self.bot.directory.list_users(request.room_id)
        return directory_pb2.ListUsersResponse(users=[_user_pb(u) for u in users])

    async def get_room(self, request: directory_pb2.GetRoomRequest, info: CallInfo) -> core_pb2.Room:
        """One known room."""
        await self._caller(info, "directory")
        with _statuses():
            room = self.bot.directory.room(request.id)
        return _room_pb(room)

    async def list_rooms(
        self, request: directory_pb2.ListRoomsRequest, info: CallInfo
    ) -> directory_pb2.ListRoomsResponse:
        """Known rooms."""
        await self._caller(info, "directory")
        rooms = self.bot.directory.list_rooms()
        return directory_pb2.ListRoomsResponse(rooms=[_room_pb(r) for r in rooms])

    # -- oco.DataStores --------------------------------------------------------------

    async def list_datastores(
        self, request: datastores_pb2.ListDataStoresRequest, info: CallInfo
    ) -> datastores_pb2.ListDataStoresResponse:
        """The data-store types this bot offers."""
        await self._caller(info)
        return datastores_pb2.ListDataStoresResponse(types=self.bot.datastores.offered())

    async def get_datastore(
        self, request: datastores_pb2.GetDataStoreRequest, info: CallInfo
    ) -> datastores_pb2.DataStoreAccess:
        """The caller's access to its own corner of one data store."""
        callback_id = await self._caller(info)
        _check_datastore_type(request.type)
        with _statuses():
            self.bot.policy(callback_id).require_datastore(request.type)
        access, generation = await _guard(
            self.bot.datastores.access(callback_id, request.type, refresh=request.refresh)
        )
        return datastores_pb2.DataStoreAccess(
            type=request.type,
            url=access.url,
            namespace=access.namespace,
            details=dict(access.details),
            generation=generation,
        )

    # -- oco.Authorization -----------------------------------------------------------

    async def check_permission(
        self, request: authorization_pb2.CheckPermissionRequest, info: CallInfo
    ) -> authorization_pb2.CheckPermissionResponse:
        """Whether a user holds a permission; recorded in the audit log."""
        callback_id = await self._caller(info, "check_permission")
        if not request.user_id or not request.permission:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "CheckPermission needs both user_id and permission")
        decision = self.bot.auth.check(self.bot.canonical_user(request.user_id), request.permission)
        self.bot.record(
            "check_permission",
            ALLOWED if decision.allowed else DENIED,
            user=request.user_id,
            person=decision.person,
            room=request.room_id,
            callback=callback_id,
            permission=request.permission,
            detail=decision.reason,
        )
        return authorization_pb2.CheckPermissionResponse(
            allowed=decision.allowed, reason=decision.reason, roles=decision.roles, person_id=decision.person
        )

    def table(self) -> dict[str, dict[str, Method]]:
        """Every method, by service and name, for the bridge."""

        def m(
            kind: Any, impl: Callable[..., Awaitable[Any]], request: Any, response: Any, window: int | None = None
        ) -> Method:
            if kind == "bidi":  # each request of the stream is checked where it is read
                return Method(kind, impl, request.FromString, response.SerializeToString, window)
            name = request.DESCRIPTOR.full_name

            async def checked(message: Any, info: CallInfo, *rest: Any) -> Any:
                if isinstance(message, Undecodable):
                    await self._caller(info)  # a missing secret is still the first thing said
                    raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, f"not a valid {name}: {message.error}")
                return await impl(message, info, *rest)

            return Method(kind, checked, request.FromString, response.SerializeToString, window)

        return {
            ROBOT: {
                "Join": m("unary", self.join, robot_pb2.JoinRequest, robot_pb2.JoinResponse),
                # The subscription's queue is the stream's buffer, bounded in events and
                # bytes; the bridge's default window would hold 256 more events of any size.
                "Listen": m("server_stream", self.listen, robot_pb2.ListenRequest, core_pb2.Event, _LISTEN_WINDOW),
                "Part": m("unary", self.part, robot_pb2.PartRequest, robot_pb2.PartResponse),
                "SendMessages": m(
                    "unary", self.send_messages, robot_pb2.SendMessagesRequest, robot_pb2.SendMessagesResponse
                ),
                "SendMessageStream": m(
                    "bidi", self.send_message_stream, robot_pb2.SendMessagesRequest, robot_pb2.SendResult
                ),
                # One batch may wait between trio and the loop: while grpc writes it, the
                # next gathers in the subscription's queue (see _forward_batches).
                "ListenBatches": m(
                    "server_stream", self.listen_batches, robot_pb2.ListenRequest, robot_pb2.EventBatch, 1
                ),
                "SendMessageBatches": m(
                    "bidi", self.send_message_batches, robot_pb2.SendMessagesBatch, robot_pb2.SendResultBatch
                ),
                "RespondWebhook": m(
                    "unary", self.respond_webhook, robot_pb2.WebhookResponse, robot_pb2.RespondWebhookResponse
                ),
                "Acknowledge": m(
                    "unary", self.acknowledge, robot_pb2.AcknowledgeRequest, robot_pb2.AcknowledgeResponse
                ),
                "Publish": m("unary", self.publish, robot_pb2.PublishRequest, robot_pb2.PublishResponse),
                "RequestApproval": m(
                    "unary",
                    self.request_approval,
                    robot_pb2.RequestApprovalRequest,
                    robot_pb2.RequestApprovalResponse,
                ),
                "GetAttachment": m(
                    "unary", self.get_attachment, robot_pb2.GetAttachmentRequest, robot_pb2.GetAttachmentResponse
                ),
                "CancelQuestion": m(
                    "unary", self.cancel_question, robot_pb2.CancelQuestionRequest, robot_pb2.CancelQuestionResponse
                ),
            },
            STORAGE: {
                "Get": m("unary", self.get, storage_pb2.GetRequest, storage_pb2.GetResponse),
                "Set": m("unary", self.set, storage_pb2.SetRequest, storage_pb2.SetResponse),
                "Delete": m("unary", self.delete, storage_pb2.DeleteRequest, storage_pb2.DeleteResponse),
                "List": m("unary", self.list, storage_pb2.ListRequest, storage_pb2.ListResponse),
            },
            AUTHORIZATION: {
                "CheckPermission": m(
                    "unary",
                    self.check_permission,
                    authorization_pb2.CheckPermissionRequest,
                    authorization_pb2.CheckPermissionResponse,
                ),
            },
            DATASTORES: {
                "ListDataStores": m(
                    "unary",
                    self.list_datastores,
                    datastores_pb2.ListDataStoresRequest,
                    datastores_pb2.ListDataStoresResponse,
                ),
                "GetDataStore": m(
                    "unary", self.get_datastore, datastores_pb2.GetDataStoreRequest, datastores_pb2.DataStoreAccess
                ),
            },
            DIRECTORY: {
                "GetUser": m("unary", self.get_user, directory_pb2.GetUserRequest, core_pb2.User),
                "ListUsers": m(
                    "unary", self.list_users, directory_pb2.ListUsersRequest, directory_pb2.ListUsersResponse
                ),
                "GetRoom": m("unary", self.get_room, directory_pb2.GetRoomRequest, core_pb2.Room),
                "ListRooms": m(
                    "unary", self.list_rooms, directory_pb2.ListRoomsRequest, directory_pb2.ListRoomsResponse
                ),
            },
        }


async def serve(
    bot: EdgeHost,
    settings: GrpcSettings,
    tls: ServerTls | None,
    *,
    services: Services | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the bot's gRPC API until cancelled; ``task_status`` gets the bound address.
    ``services``: the RPCs' implementations, when the caller keeps them (a reload
    replaces their Authenticator); default: new ones.

    When cancelled, open Listen and SendMessageStream streams end at once with OK (the
    protocol's promise: a callback tells a shutdown from a failure), calls in flight get
    ``settings.shutdown_grace`` seconds, and only then is anything still running cancelled.
    """
    # Bind the address ourselves first: when it is taken, grpc's C core would print a
    # log line of its own to stderr and splice advice into its error.
    await _probe_listen(settings.listen)
    _check_open_files_limit(settings.max_connections)
    services = services or Services(bot, settings)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        address = await nursery.start(_run_server, services, settings, tls, stop)
        nursery.start_soon(_watch_connections, int(address.rpartition(":")[2]), settings.max_connections)
        task_status.started(address)
        try:
            await trio.sleep_forever()
        finally:
            stop.set()  # _run_server, shielded from our cancellation, shuts down in order


def _check_open_files_limit(max_connections: int) -> None:
    """Warn when the API's connection limit leaves too few of the process's open files
    for the rest (the store, chat, callbacks' pipes): at the limit new callbacks are only
    refused, past the open-files limit the bot could not even reach its store. Not raised
    here: launched callbacks would inherit it."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and max_connections > soft - _FILES_FOR_THE_REST:
        log.warning(
            "grpc.max_connections is %d but this process may open only %d files, and needs about %d for the rest: "
            "raise the limit (ulimit -n, systemd's LimitNOFILE=) or lower grpc.max_connections",
            max_connections,
            soft,
            _FILES_FOR_THE_REST,
        )


def _established(port: int) -> int:
    """TCP connections established to local ``port`` (Linux's /proc/net/tcp and tcp6)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as lines:
            next(lines, None)
            for line in lines:
                fields = line.split()
                if len(fields) > 3 and fields[3] == "01" and int(fields[1].rpartition(":")[2], 16) == port:
                    count += 1
    return count


async def _watch_connections(port: int, limit: int) -> None:
    """Say so in the log when the API's connections near their limit: new callbacks are
    refused then, with nothing else to show for it."""
    last_warning = -math.inf
    while True:
        await trio.sleep(_CONNECTION_CHECK_INTERVAL)
        count = await trio.to_thread.run_sync(_established, port)
        now = trio.current_time()
        if count >= limit * 0.9 and now - last_warning >= _CONNECTION_WARNING_INTERVAL:
            last_warning = now
            log.warning(
                "%d connections to the gRPC API on port %d, limit %d (grpc.max_connections): new callbacks are "
                "refused at the limit; connections without calls close after grpc.max_connection_idle",
                count,
                port,
                limit,
            )


async def _run_server(
    services: Services,
    settings: GrpcSettings,
    tls: ServerTls | None,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[str],
) -> None:
    """Run the server until ``stop`` is set, then shut it down in order.

    The handlers of every call run in the bridge's nursery, inside this task: were this
    task cancelled with the bot, every call would be cancelled before its stream could end
    cleanly, and the client would see UNAVAILABLE after the grace period instead of OK.
    So once the server is up this task is shielded, and ``stop`` tells it to shut down."""
    options = [
        ("grpc.max_receive_message_length", settings.max_receive_bytes),
        ("grpc.so_reuseport", 0),
        # Find callbacks that vanished without closing their streams.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Connections that hold no call (an idle client, one that never sent a secret)
        # are closed after a while, and there are never more than the limit: beyond it
        # the bot could not open its store's or chat's connections.
        ("grpc.max_connection_idle_ms", int(settings.max_connection_idle * 1000)),
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
    ]
    with trio.CancelScope() as scope:
        async with open_bridge() as bridge:
            try:
                server = await bridge.serve(
                    settings.listen,
                    services.bot.metrics.instrument(services.table()),
                    options=options,
                    health_services=[ROBOT, STORAGE, DIRECTORY, AUTHORIZATION, DATASTORES],
                    reflection_services=[ROBOT, STORAGE, DIRECTORY, AUTHORIZATION, DATASTORES],
                    tls=tls,
                )
            except OSError as exc:
                # Rare after the probe (the port taken in between); grpc's advice about
                # GRPC_VERBOSITY is not for OCO's users.
                reason = str(exc).partition("; set GRPC_VERBOSITY")[0]
                raise OcoError(
                    f"cannot serve gRPC on {settings.listen}: {reason}; is another bot running? "
                    "Change grpc.listen (port 0 picks a free port)"
                ) from None
            try:
                # Shielded from here on: a cancellation of the bot reaches this task only
                # as `stop`, so that the shutdown below runs with every call still alive.
                scope.shield = True
                host = settings.listen.rpartition(":")[0]
                address = f"{host}:{server.port}"
                if settings.address_file is not None:
                    _write_address(settings.address_file, address)
                task_status.started(address)
                async with trio.open_nursery() as followers:
                    followers.start_soon(_follow_health, bridge, server, services.bot.health)
                    await stop.wait()
                    followers.cancel_scope.cancel()
            finally:
                # Streams end only when told: end them first, so that they finish with OK
                # now and the grace period is for calls actually in flight.
                services.end_streams()
                await bridge.stop(server, settings.shutdown_grace)


async def _follow_health(bridge: Bridge, server: ServerHandle, health: Health) -> None:
    """Keep the gRPC health service saying what ``health`` says (SERVING when ready)."""
    version = health.version
    while True:
        await bridge.set_serving(server, health.ready)
        version = await health.wait_changed(version)


#: What a data-store type may look like (a plugin's name), so a caller cannot make the
#: bot log and remember megabytes of whatever it sends as one.
_DATASTORE_TYPE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


def _check_datastore_type(name: str) -> None:
    if not _DATASTORE_TYPE.fullmatch(name):
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise RpcAbort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{shown!r} is not a data-store type: lowercase letters, digits, '_', '.' or '-', at most 64",
        )


def _user_pb(user: UserRecord) -> core_pb2.User:
    return core_pb2.User(id=user.id, name=user.name, mention_name=user.mention_name)


def _room_pb(room: RoomRecord) -> core_pb2.Room:
    return core_pb2.Room(id=room.id, name=room.name, topic=room.topic)


def _write_address(path: Path, address: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(address + "\n")
    tmp.replace(path)


async def _probe_listen(listen: str) -> None:
    """OcoError when no address ``listen`` resolves to can be bound, bound as grpc binds
    (SO_REUSEADDR: a port a stopped bot's connections still linger on counts as free)."""
    host, _, port = listen.rpartition(":")
    if int(port) == 0:
        return
    try:
        found = await trio.socket.getaddrinfo(
            host.strip("[]"), int(port), type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE
        )
    except OSError as exc:
        raise OcoError(f"cannot serve gRPC on {listen}: cannot resolve {host!r} ({exc}); change grpc.listen") from None
    failure: OSError | None = None
    for family, kind, proto, _, address in found:
        with trio.socket.socket(family, kind, proto) as probe:
            probe.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
            try:
                await probe.bind(address)
            except OSError as exc:
                failure = failure or exc
            else:
                return  # grpc serves when any of the addresses binds
    if failure is not None:
        raise OcoError(
            f"cannot serve gRPC on {listen}: {failure.strerror or failure}; is another bot running? "
            "Change grpc.listen (port 0 picks a free port)"
        )
