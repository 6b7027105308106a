"""The one seam between trio and grpcio: nothing else in OCO imports asyncio or threading.

grpcio's non-blocking API (``grpc.aio``) runs on an asyncio event loop; OCO runs on trio.
This module runs one asyncio loop in one dedicated thread for the whole process, and lets
each side call the other without ever blocking its own loop:

- trio awaits work on the asyncio loop with :meth:`Bridge.run_asyncio`;
- gRPC handlers on the asyncio loop await trio functions, run in the bridge's trio
  nursery, through :meth:`Bridge.serve`, which turns plain trio functions into a
  ``grpc.aio`` server;
- streams cross in both directions through :class:`_TrioToAsyncio` and
  :class:`_AsyncioToTrio`, each with credit-based flow control: at most ``window``
  items are in flight, so a slow reader holds back its writer instead of growing a
  queue without bound, and credits go back in batches so a busy stream costs few
  cross-thread wake-ups.

Why a thread and not the other bridges (docs/architecture.md says what was measured):
grpcio's threaded server ties one worker thread to every open Listen stream (an exhausted
pool blocks unary calls); grpc.aio hosted by trio-asyncio in trio's own thread failed on
grpc's Cython async generators, and adds a loop emulation that must follow every trio
release; grpclib (pure Python HTTP/2) in trio's thread worked but was slower for the chat
path, since h2's framing then shares the one thread with routing while the second core
idles.
Here the loop is plain asyncio, as grpc.aio is tested against, and the only cost is two
thread hops per call (bench/bench_transport.py measures the whole path; docs/architecture.md
says where the time goes).

Cancellation crosses too: cancelling the trio side of a call cancels its asyncio task,
and a client that goes away cancels the trio task serving it.

TLS material crosses as PEM bytes (:class:`ServerTls`, :class:`ClientTls`); reading and
checking the files is :mod:`._tls`'s business, so that errors name the setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import grpc
import grpc.aio
import outcome
import trio

log = logging.getLogger(__name__)


class _QuietWhenTheClientLeft(logging.Filter):
    """grpc's Cython server logs an ERROR with a traceback when it finishes a stream whose
    client left mid-write (its status cannot be sent: GRPC_CALL_ERROR_TOO_MANY_OPERATIONS);
    the pump already treats a client that left as no error of ours (a DEBUG line). Seen
    under the fuzz test's hostile clients on a busy machine; any other error still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if "GRPC_CALL_ERROR_TOO_MANY_OPERATIONS" not in f"{record.getMessage()} {error}":
            return True
        log.debug("a client left while its stream was finishing (grpc: %s)", record.getMessage())
        return False


logging.getLogger("grpc._cython.cygrpc").addFilter(_QuietWhenTheClientLeft())

T = TypeVar("T")

#: Items in flight per stream direction before the writer waits for the reader.
DEFAULT_WINDOW = 256


class _End:
    """Marks the end of a stream crossing the bridge."""


_END = _End()


@dataclass(slots=True)
class RpcAbort(Exception):  # noqa: N818 - it is an instruction, not a failure of ours
    """Raised by a trio handler to end its RPC with a gRPC status.

    ``trailing_metadata``: pairs sent with the status (keys lower case, values printable
    ASCII), e.g. the error's class and attributes (:func:`._errors.to_status`).
    """

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What a trio handler may know about the call it serves (read on the asyncio side).

    ``peer_identities``: the names in the client's certificate, as the TLS handshake
    verified it: its common name, then its subject alternative names. Empty when the
    client presented no certificate (plaintext, or TLS without client certificates).
    """

    metadata: Mapping[str, str]
    peer: str
    peer_identities: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServerTls:
    """What :meth:`Bridge.serve` needs to serve over TLS (PEM bytes).

    With ``client_ca``, every client must present a certificate that CA signed
    (mutual TLS); the handshake fails otherwise.
    """

    cert_chain: bytes
    key: bytes = field(repr=False)
    client_ca: bytes | None = None


@dataclass(frozen=True, slots=True)
class ClientTls:
    """What :meth:`Bridge.open_channel` needs to dial over TLS (PEM bytes).

    ``ca``: the roots that may sign the server's certificate (None: the system's).
    ``cert_chain`` and ``key``: the client's certificate, for mutual TLS.
    ``server_name``: the name expected in the server's certificate, when it is not the
    host dialled (an IP address, a name only the certificate knows).
    """

    ca: bytes | None = None
    cert_chain: bytes | None = None
    key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None


#: Where grpc's auth context keeps the verified names of the peer's certificate.
_CERT_NAME_KEYS = ("x509_common_name", "x509_subject_alternative_name")


def _peer_identities(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, ...]:
    auth = context.auth_context() or {}
    names = (value.decode("utf-8", "replace") for key in _CERT_NAME_KEYS for value in auth.get(key, ()))
    return tuple(name for name in names if name)  # a subject without a CN reads as ""


#: Most UTF-8 bytes of status details sent: grpc carries them percent-encoded (up to
#: three times as long) in a trailer, and past its 8 KiB soft limit the client may see a
#: transport error instead of our status (a request's long value quoted in an error
#: would do it).
MAX_DETAILS_BYTES = 1000


def _shorten(details: str) -> str:
    data = details.encode("utf-8", "surrogateescape")
    if len(data) <= MAX_DETAILS_BYTES:
        return details
    cut = data[:MAX_DETAILS_BYTES].decode("utf-8", "ignore")  # never half a character
    return f"{cut}... ({len(data)} bytes in all)"


class _RefuseUndecodable(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """The standard health and reflection services deserialize inside grpc, where a
    request that is not protobuf ends the call UNKNOWN and logs a traceback, for anyone,
    without a secret. This gives their methods our answer instead: INVALID_ARGUMENT."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        method = str(details.method)
        if handler is None or not method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return handler
        parse = handler.request_deserializer
        if parse is None:
            return handler

        def deserialize(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as exc:
                return Undecodable(f"{type(exc).__name__}: {exc}")

        async def refuse(context: grpc.aio.ServicerContext[Any, Any], found: Undecodable) -> None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _shorten(f"not a valid request: {found.error}"))

        if handler.unary_unary is not None:
            inner_uu: Any = handler.unary_unary  # the stubs type these as the sync server's

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if isinstance(request, Undecodable):
                    await refuse(context, request)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=deserialize, response_serializer=handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_us: Any = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
                if isinstance(request, Undecodable):
                    await refuse(context, request)
                result = inner_us(request, context)
                if hasattr(result, "__aiter__"):  # an async generator: pass on what it yields
                    async for response in result:
                        await context.write(response)
                else:  # a coroutine that writes through the context itself (health's Watch)
                    await result

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=deserialize, response_serializer=handler.response_serializer
            )
        if handler.stream_stream is not None:
            inner_ss: Any = handler.stream_stream

            async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                async def checked() -> AsyncIterator[Any]:
                    async for request in requests:
                        if isinstance(request, Undecodable):
                            await refuse(context, request)
                        yield request

                async for response in inner_ss(checked(), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, request_deserializer=deserialize, response_serializer=handler.response_serializer
            )
        return handler


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What a handler gets instead of a request whose bytes its deserializer refused
    (not the message it should be): it answers INVALID_ARGUMENT, after checking who
    is calling. Raising in the deserializer would end the call UNKNOWN, with a traceback
    in the log that anyone could provoke."""

    error: str


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC served by a trio function.

    ``unary``: ``await impl(request, info) -> response``.
    ``server_stream``: ``await impl(request, info, out)`` writing to ``out``.
    ``bidi``: ``await impl(requests, info, out)``; ``requests`` is an async iterator.
    A request that does not decode arrives as :class:`Undecodable`. ``window``: how many
    responses may wait between trio and the loop, when the server's is too many (a
    stream with its own bounded queue in trio).
    """

    kind: Literal["unary", "server_stream", "bidi"]
    impl: Callable[..., Awaitable[Any]]
    request_deserializer: Callable[[bytes], Any]
    response_serializer: Callable[[Any], bytes]
    #: Responses that may wait between trio and the loop (None: the server's window).
    window: int | None = None


class _TrioToAsyncio(Generic[T]):
    """A stream written from trio and read on the asyncio loop."""

    def __init__(self, bridge: Bridge, window: int) -> None:
        self._bridge = bridge
        self._queue: asyncio.Queue[T | _End | BaseException] = asyncio.Queue()
        self._credits = trio.Semaphore(window)
        self._window = window
        self._owed = 0
        #: An item was taken and is being written; its credit goes back once it is.
        self._taken = False

    # trio side
    async def send(self, item: T) -> None:
        """Queue ``item``; waits while ``window`` items are unread.

        A cancellation point, but a schedule point only when it waits: a write per event
        or reply made trio run its scheduler once more for each (3-7 µs). A writer
        cannot hog the thread: with ``window`` items unread it waits."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._credits.acquire_nowait()
        except trio.WouldBlock:
            await self._credits.acquire()
        self._bridge._call_asyncio_soon(self._queue.put_nowait, item)

    def close(self, error: BaseException | None = None) -> None:
        """End the stream (with ``error``, the reader raises it)."""
        self._bridge._call_asyncio_soon(self._queue.put_nowait, error if error is not None else _END)

    # asyncio side
    async def get(self) -> T | _End:
        """Next item, or _END. Asking for the next item says the previous one is
        written: its credit is owed only then, so that ``window`` counts what grpc has
        not taken yet, not only what waits in the queue (with a window of one, the
        writer gathers a batch while grpc writes the previous one)."""
        if self._taken:
            self._taken = False
            self._owed += 1
            # Credits go back in batches: each return wakes the other thread. A writer
            # can only be blocked with all `window` items unwritten, and then a quarter
            # of them is certainly owed, so batching never stalls it.
            if self._owed * 4 >= self._window:
                owed, self._owed = self._owed, 0
                self._bridge._call_trio_soon(self._return_credits, owed)
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if not isinstance(item, _End):
            self._taken = True
        return item

    def _return_credits(self, count: int) -> None:
        for _ in range(count):
            self._credits.release()


class _AsyncioToTrio(Generic[T]):
    """A stream written on the asyncio loop and read from trio."""

    def __init__(self, bridge: Bridge, window: int) -> None:
        self._bridge = bridge
        self._window = window
        self._send, self._receive = trio.open_memory_channel[T | BaseException](window + 1)
        self._credits = asyncio.Semaphore(window)
        self._owed = 0

    # asyncio side
    async def send(self, item: T) -> None:
        """Queue ``item`` for trio; waits while ``window`` items are unread."""
        await self._credits.acquire()
        self._bridge._call_trio_soon(self._deliver, item)

    def _deliver(self, item: T) -> None:
        # The trio reader may have left (abandon) while items were crossing: a client
        # that closed a stream mid-flow, a bot that went away. Nobody wants them.
        with suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self._send.send_nowait(item)

    def close(self, error: BaseException | None = None) -> None:
        """End the stream, optionally with an error the trio reader raises."""
        if error is not None:
            self._bridge._call_trio_soon(self._send_error_and_close, error)
        else:
            self._bridge._call_trio_soon(self._send.close)

    def _send_error_and_close(self, error: BaseException) -> None:
        # BrokenResourceError: the reader has left (a refused stream's headers already
        # raised the error), and nobody is there to receive it again.
        with suppress(trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self._send.send_nowait(error)
        self._send.close()

    # trio side
    async def receive(self) -> T:
        """Next item; raises trio.EndOfChannel at the end, or the writer's error.

        A schedule point only when it waits, as _TrioToAsyncio.send: a reader cannot hog
        the thread either, since items arrive only while trio runs its scheduler."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            item = self._receive.receive_nowait()
        except trio.WouldBlock:
            item = await self._receive.receive()
        return self._took(item)

    def receive_nowait(self) -> T:
        """The next item if one has crossed already; trio.WouldBlock if none has,
        trio.EndOfChannel at the end, or the writer's error."""
        return self._took(self._receive.receive_nowait())

    def _took(self, item: T | BaseException) -> T:
        if isinstance(item, BaseException):
            raise item
        self._owed += 1
        if self._owed * 4 >= self._window:  # batched, as in _TrioToAsyncio.get
            owed, self._owed = self._owed, 0
            self._bridge._call_asyncio_soon(self._return_credits, owed)
        return item

    def __aiter__(self) -> _AsyncioToTrio[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def _return_credits(self, count: int) -> None:
        for _ in range(count):
            self._credits.release()

    def abandon(self) -> None:
        """The trio reader stops reading; drop what is queued."""
        self._receive.close()


#: What a streaming RPC's trio handler reads its requests from (an AsyncIterator with
#: ``receive_nowait`` besides, for a reader that would rather not wait).
RequestStream = _AsyncioToTrio


class StreamWriter(Generic[T]):
    """What a trio handler of a streaming RPC writes its responses to."""

    def __init__(self, pipe: _TrioToAsyncio[Any]) -> None:
        self._pipe = pipe

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        """Send the response headers now (before the first message)."""
        await self._pipe.send(_InitialMetadata(tuple(metadata)))

    async def write(self, message: T) -> None:
        """Send one response message; waits while the client is behind."""
        await self._pipe.send(message)


@dataclass(frozen=True, slots=True)
class _InitialMetadata:
    metadata: tuple[tuple[str, str], ...]


@dataclass(slots=True)
class _TrioCall:
    """State of one trio task started for the asyncio side; touched only in trio."""

    scope: trio.CancelScope | None = None
    cancelled: bool = False


@dataclass(slots=True)
class ServerHandle:
    """A running gRPC server, as :meth:`Bridge.serve` returns it."""

    port: int
    _server: grpc.aio.Server = field(repr=False)
    #: The standard health service and the names it answers for (with ``health_services``).
    _health: Any = field(default=None, repr=False)
    _health_names: tuple[str, ...] = ()


class Bridge:
    """The asyncio loop thread and the trio nursery that serves calls from it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, nursery: trio.Nursery) -> None:
        self._loop = loop
        self._nursery = nursery
        self._token = trio.lowlevel.current_trio_token()
        self._to_trio: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._to_asyncio: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._trio_woken = False
        self._asyncio_woken = False

    # -- crossing primitives ---------------------------------------------------------
    #
    # Every wake-up of the other thread is a system call and a context switch, so calls
    # are queued and the other side is woken only when it is not already about to run
    # the queue: under load many calls cross per wake-up. The order of calls is kept.
    # Correct under the GIL because each side appends before it reads the flag, and the
    # runner clears the flag before it empties the queue.

    def _call_trio_soon(self, fn: Callable[..., object], *args: Any) -> None:
        self._to_trio.append((fn, args))
        if not self._trio_woken:
            self._trio_woken = True
            with contextlib.suppress(trio.RunFinishedError):  # trio is gone: nobody left to tell
                self._token.run_sync_soon(self._run_queued, self._to_trio, "_trio_woken")

    def _call_asyncio_soon(self, fn: Callable[..., object], *args: Any) -> None:
        self._to_asyncio.append((fn, args))
        if not self._asyncio_woken:
            self._asyncio_woken = True
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                self._loop.call_soon_threadsafe(self._run_queued, self._to_asyncio, "_asyncio_woken")

    def _run_queued(self, calls: deque[tuple[Callable[..., object], tuple[Any, ...]]], flag: str) -> None:
        setattr(self, flag, False)
        while calls:
            fn, args = calls.popleft()
            try:
                fn(*args)
            except Exception:  # one bad call must not take the loop (or trio's run) down
                log.exception("error in a call crossing the gRPC bridge")

    async def run_asyncio(self, fn: Callable[[], Awaitable[T]]) -> T:
        """From trio: run ``await fn()`` on the asyncio loop and return its result.

        ``fn`` is called on the loop, so it may create grpc.aio objects. Cancelling the
        trio caller cancels the asyncio task.
        """

        async def call() -> T:
            return await fn()

        done = trio.Event()
        future = asyncio.run_coroutine_threadsafe(call(), self._loop)
        future.add_done_callback(lambda _: self._call_trio_soon(done.set))
        try:
            await done.wait()
        finally:
            if not future.done():
                future.cancel()
        return future.result()

    async def run_trio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From asyncio: run ``await fn(*args)`` in the bridge's trio nursery.

        Cancelling the asyncio caller cancels the trio task.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        state = _TrioCall()

        def resolve(result: outcome.Outcome[T] | None) -> None:
            if future.done():
                return
            if result is None:
                future.cancel()
            elif isinstance(result, outcome.Value):
                future.set_result(result.value)
            else:
                assert isinstance(result, outcome.Error)
                future.set_exception(result.error)

        async def runner() -> None:
            result: outcome.Outcome[T] | None = None
            try:
                with trio.CancelScope() as scope:
                    state.scope = scope
                    if state.cancelled:
                        scope.cancel()
                    try:
                        result = outcome.Value(await fn(*args))
                    except Exception as exc:
                        result = outcome.Error(exc)
            finally:
                self._call_asyncio_soon(resolve, result)

        def cancel() -> None:
            state.cancelled = True
            if state.scope is not None:
                state.scope.cancel()

        self._call_trio_soon(self._nursery.start_soon, runner)
        try:
            return await future
        except asyncio.CancelledError:
            self._call_trio_soon(cancel)
            raise

    # -- server ----------------------------------------------------------------------

    async def serve(
        self,
        address: str,
        services: Mapping[str, Mapping[str, Method]],
        *,
        options: Sequence[tuple[str, Any]] = (),
        health_services: Iterable[str] = (),
        reflection_services: Iterable[str] = (),
        window: int = DEFAULT_WINDOW,
        tls: ServerTls | None = None,
    ) -> ServerHandle:
        """Start a grpc.aio server on ``address`` serving ``services`` (full service name
        → method name → :class:`Method`), plus the standard health and reflection
        services; over TLS when ``tls`` is given, plaintext otherwise. Raises OSError
        when the address cannot be bound (or grpc refuses the TLS material: check it
        beforehand for a clearer message)."""

        async def start() -> ServerHandle:
            server = grpc.aio.server(options=list(options), interceptors=[_RefuseUndecodable()])
            handlers = [
                grpc.method_handlers_generic_handler(
                    service, {name: self._handler(method, window) for name, method in methods.items()}
                )
                for service, methods in services.items()
            ]
            server.add_generic_rpc_handlers(handlers)
            names = list(health_services)
            servicer = None
            if names:
                from grpc_health.v1 import health, health_pb2, health_pb2_grpc

                servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
                health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
                for name in ["", *names]:
                    await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            reflected = list(reflection_services)
            if reflected:
                from grpc_reflection.v1alpha import reflection

                reflection.enable_server_reflection([*reflected, reflection.SERVICE_NAME], server)
            try:
                if tls is None:
                    port = server.add_insecure_port(address)
                else:
                    credentials = grpc.ssl_server_credentials(
                        [(tls.key, tls.cert_chain)],
                        root_certificates=tls.client_ca,
                        require_client_auth=tls.client_ca is not None,
                    )
                    port = server.add_secure_port(address, credentials)
            except RuntimeError as exc:
                raise OSError(f"cannot listen on {address}: {exc}") from None
            await server.start()
            return ServerHandle(port=port, _server=server, _health=servicer, _health_names=("", *names))

        return await self.run_asyncio(start)

    async def set_serving(self, server: ServerHandle, serving: bool) -> None:
        """Make ``server``'s health service answer SERVING (or NOT_SERVING) for every
        service it names, ``""`` (the whole server) included."""
        servicer = server._health
        if servicer is None:
            return
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING

        async def set_all() -> None:
            for name in server._health_names:
                await servicer.set(name, status)

        await self.run_asyncio(set_all)

    async def stop(self, server: ServerHandle, grace: float) -> None:
        """Stop ``server``: refuse new calls, give running ones ``grace`` seconds, then
        cancel them."""
        await self.run_asyncio(lambda: server._server.stop(grace))

    def _handler(self, method: Method, window: int) -> grpc.RpcMethodHandler[Any, Any]:
        bridge = self

        def deserialize(data: bytes) -> Any:
            try:
                return method.request_deserializer(data)
            except Exception as exc:  # whatever the decoder raises, the request is malformed
                return Undecodable(f"{type(exc).__name__}: {exc}")

        def info(context: grpc.aio.ServicerContext[Any, Any]) -> CallInfo:
            metadata = {k.lower(): v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
            return CallInfo(metadata=metadata, peer=context.peer(), peer_identities=_peer_identities(context))

        async def abort(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> None:
            if isinstance(error, RpcAbort):
                if error.trailing_metadata:
                    context.set_trailing_metadata(error.trailing_metadata)
                await context.abort(error.code, _shorten(error.details))
            log.error("internal error in %s", method.impl.__qualname__, exc_info=error)
            await context.abort(grpc.StatusCode.INTERNAL, _shorten(f"internal error: {type(error).__name__}: {error}"))

        if method.kind == "unary":

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    return await bridge.run_trio(method.impl, request, info(context))
                except Exception as exc:
                    await abort(context, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=deserialize,
                response_serializer=method.response_serializer,
            )

        async def pump(
            context: grpc.aio.ServicerContext[Any, Any], run: Callable[[StreamWriter[Any]], Awaitable[None]]
        ) -> None:
            pipe: _TrioToAsyncio[Any] = _TrioToAsyncio(bridge, method.window or window)
            task = asyncio.ensure_future(bridge.run_trio(run, StreamWriter(pipe)))
            task.add_done_callback(lambda _: pipe._queue.put_nowait(_END))
            try:
                while not isinstance(item := await pipe.get(), _End):
                    try:
                        if isinstance(item, _InitialMetadata):
                            await context.send_initial_metadata(item.metadata)
                        else:
                            await context.write(item)
                    except (grpc.aio.InternalError, grpc.aio.UsageError) as exc:
                        # The client left while we wrote to it: grpc fails the write
                        # (ExecuteBatchError) before it cancels the call. Not our error,
                        # and nobody is left to tell; the handler's own log line says
                        # the stream ended.
                        log.debug("%s: the client left during a write (%s)", context.peer(), type(exc).__name__)
                        task.cancel()
                        return
                await task
            except asyncio.CancelledError:
                task.cancel()
                raise
            except Exception as exc:
                task.cancel()
                await abort(context, exc)

        if method.kind == "server_stream":

            async def server_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
                call = info(context)
                await pump(context, lambda out: method.impl(request, call, out))

            return grpc.unary_stream_rpc_method_handler(
                server_stream,
                request_deserializer=deserialize,
                response_serializer=method.response_serializer,
            )

        async def bidi(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> None:
            call = info(context)
            incoming: _AsyncioToTrio[Any] = _AsyncioToTrio(bridge, window)

            async def feed() -> None:
                try:
                    async for request in requests:
                        await incoming.send(request)
                except asyncio.CancelledError:
                    incoming.close()
                    raise
                except Exception as exc:
                    incoming.close(exc)
                else:
                    incoming.close()

            feeder = asyncio.ensure_future(feed())
            try:
                await pump(context, lambda out: method.impl(incoming, call, out))
            finally:
                feeder.cancel()

        return grpc.stream_stream_rpc_method_handler(
            bidi,
            request_deserializer=deserialize,
            response_serializer=method.response_serializer,
        )

    # -- client ----------------------------------------------------------------------

    async def open_channel(
        self, target: str, options: Sequence[tuple[str, Any]] = (), tls: ClientTls | None = None
    ) -> grpc.aio.Channel:
        """Create a grpc.aio channel on the loop (use its stubs only via the bridge);
        over TLS when ``tls`` is given, plaintext otherwise."""

        async def create() -> grpc.aio.Channel:
            if tls is None:
                return grpc.aio.insecure_channel(target, options=list(options))
            credentials = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert_chain)
            extra = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
            return grpc.aio.secure_channel(target, credentials, options=[*options, *extra])

        return await self.run_asyncio(create)

    async def close_channel(self, channel: grpc.aio.Channel) -> None:
        """Close ``channel``, cancelling its calls."""
        await self.run_asyncio(lambda: channel.close(None))

    @asynccontextmanager
    async def open_response_stream(
        self, start: Callable[[], Any], window: int = DEFAULT_WINDOW
    ) -> AsyncIterator[ResponseStream]:
        """From trio: start a server-streaming call (``start()`` runs on the loop and
        returns the grpc.aio call) and read it. Leaving the block cancels the call."""
        incoming: _AsyncioToTrio[Any] = _AsyncioToTrio(self, window)
        headers: _AsyncioToTrio[Any] = _AsyncioToTrio(self, 1)

        async def read() -> None:
            call = start()
            try:
                metadata = await call.initial_metadata()
                # A call that failed before the server answered gives empty headers
                # rather than an error: look at how it ended.
                if call.done() and (code := await call.code()) != grpc.StatusCode.OK:
                    # With its trailers: they name the error's type (oco-error-*).
                    trailers = await call.trailing_metadata()
                    raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, await call.details(), "")
                await headers.send(tuple(metadata or ()))
                headers.close()
                async for message in call:
                    await incoming.send(message)
            except asyncio.CancelledError:
                call.cancel()
                raise
            except Exception as exc:
                headers.close(exc)
                incoming.close(exc)
            else:
                incoming.close()

        future = asyncio.run_coroutine_threadsafe(read(), self._loop)
        try:
            yield ResponseStream(incoming, headers)
        finally:
            future.cancel()
            incoming.abandon()

    @asynccontextmanager
    async def open_duplex_stream(
        self, start: Callable[[AsyncIterator[Any]], Any], window: int = DEFAULT_WINDOW
    ) -> AsyncIterator[tuple[DuplexSender, ResponseStream]]:
        """From trio: start a bidirectional call (``start(requests)`` runs on the loop)
        and yield a sender for requests and a stream of responses."""
        outgoing: _TrioToAsyncio[Any] = _TrioToAsyncio(self, window)
        try:
            async with self.open_response_stream(lambda: start(_Requests(outgoing)), window) as responses:
                yield DuplexSender(outgoing), responses
        finally:
            # grpc's task that reads the requests waits for the next one until told
            # there are none; left waiting after the call ended, it is destroyed pending
            # and asyncio logs that as an ERROR in the callback's output.
            outgoing.close()


class _Requests:
    """The request side of a duplex call as grpc.aio reads it.

    A class rather than an async generator: grpc.aio closes the iterator of a cancelled
    call from another task, which an async generator that is waiting refuses
    ("aclose(): asynchronous generator is already running")."""

    def __init__(self, pipe: _TrioToAsyncio[Any]) -> None:
        self._pipe = pipe

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        item = await self._pipe.get()
        if isinstance(item, _End):
            raise StopAsyncIteration
        return item


class ResponseStream:
    """The responses of a streaming call, read from trio."""

    def __init__(self, incoming: _AsyncioToTrio[Any], headers: _AsyncioToTrio[Any]) -> None:
        self._incoming = incoming
        self._headers = headers

    async def initial_metadata(self) -> dict[str, str]:
        """Wait for the response headers (the server accepted the call)."""
        metadata = await self._headers.receive()
        return {k: v for k, v in metadata if isinstance(v, str)}

    def __aiter__(self) -> _AsyncioToTrio[Any]:
        return self._incoming


class DuplexSender:
    """The request side of a bidirectional call, written from trio."""

    def __init__(self, pipe: _TrioToAsyncio[Any]) -> None:
        self._pipe = pipe

    async def send(self, request: Any) -> None:
        """Send one request; waits while the server is behind."""
        await self._pipe.send(request)

    def close(self) -> None:
        """Half-close: no more requests."""
        self._pipe.close()


@asynccontextmanager
async def open_bridge() -> AsyncIterator[Bridge]:
    """Start the asyncio loop thread; stop it (cancelling what runs there) on exit."""
    # Two threads hand work to each other all the time here; Python's default switch
    # interval (5 ms) would let the busy one hold the GIL that long after waking the
    # other. 0.5 ms keeps hand-offs quick (measured with bench_roundtrip.py, since
    # replaced by bench/bench_transport.py).
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_run_loop, args=(loop,), name="oco-grpc-asyncio", daemon=True)
    thread.start()
    try:
        async with trio.open_nursery() as nursery:
            bridge = Bridge(loop, nursery)
            try:
                yield bridge
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            loop.call_soon_threadsafe(loop.stop)
            await trio.to_thread.run_sync(thread.join)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        # Let cancelled tasks (calls, servers) unwind before the loop closes.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
