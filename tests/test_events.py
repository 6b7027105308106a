"""Durable events, acknowledgements and publish/subscribe, through the gRPC API as a
client generated from our .proto files sees them (plain grpc stubs, in threads).

- Publish reaches each subscribing callback once, and no other.
- A stream that acknowledges gets a delivery id; what it did not acknowledge when it
  ended comes again (``redelivered``); what it acknowledged never does.
- Events for a callback that is away wait for it (in the store: across a bot restart),
  up to their time to live; those that expire are counted and logged.
- A stream that does not acknowledge (a client of the specification) gets each event
  once, when written.
- Capabilities bound what a callback may publish and subscribe to.
- Matches of a durable route wait for a callback that is away.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from oco_core._proto import core_pb2, robot_pb2, robot_pb2_grpc
from oco_core.testing import oco_cli, open_bot

SECRETS = {name: f"secret-{name}-0123456789abcdef" for name in ("pub", "sub1", "sub2", "other", "narrow")}


def config(tmp_path: Path, extra: str = "", narrow: str = "") -> str:
    callbacks = "\n".join(
        f"  - {{id: {name}, secret: {secret}}}" for name, secret in SECRETS.items() if name != "narrow"
    )
    return f"""
adapters: [{{type: memory}}]
store: {{url: "sqlite:///{tmp_path}/oco.db"}}
callbacks:
{callbacks}
  - id: narrow
    secret: {SECRETS["narrow"]}
    capabilities: {{publish: ["deploys.*"], subscribe: ["deploys.#"]{narrow}}}
{extra}"""


def _auth(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {SECRETS[name]}"),)


class Stream:
    """A Listen stream read in a thread; events land in ``events``."""

    def __init__(self, address: str, name: str, request: robot_pb2.ListenRequest) -> None:
        self.events: queue.Queue[core_pb2.Event | BaseException] = queue.Queue()
        self.ready = threading.Event()
        self.error: grpc.RpcError | None = None
        self._channel = grpc.insecure_channel(address)
        self._call = robot_pb2_grpc.RobotStub(self._channel).Listen(request, metadata=_auth(name))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            self._call.initial_metadata()
            self.ready.set()
            for event in self._call:
                self.events.put(event)
        except grpc.RpcError as exc:
            self.error = exc
            self.ready.set()
            self.events.put(exc)

    async def next(self, timeout: float = 10.0) -> core_pb2.Event:
        item = await trio.to_thread.run_sync(self.events.get, True, timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    async def nothing(self, wait: float = 0.5) -> None:
        await trio.sleep(wait)
        assert self.events.empty(), f"unexpected event: {self.events.get_nowait()}"

    def close(self) -> None:
        self._call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped
        self._thread.join(5)
        self._channel.close()


@contextmanager
def listening(address: str, name: str, **request: object) -> Iterator[Stream]:
    stream = Stream(address, name, robot_pb2.ListenRequest(**request))  # type: ignore[arg-type]
    try:
        yield stream
    finally:
        stream.close()


async def opened(address: str, name: str, **request: object) -> Stream:
    stream = Stream(address, name, robot_pb2.ListenRequest(**request))  # type: ignore[arg-type]
    await trio.to_thread.run_sync(stream.ready.wait, 10)
    if stream.error is not None:
        stream.close()
        raise stream.error
    return stream


async def call(address: str, name: str, method: str, request: object) -> object:
    def work() -> object:
        with grpc.insecure_channel(address) as channel:
            return getattr(robot_pb2_grpc.RobotStub(channel), method)(request, metadata=_auth(name), timeout=10)

    return await trio.to_thread.run_sync(work)


async def publish(address: str, name: str, topic: str, payload: bytes = b"{}") -> robot_pb2.PublishResponse:
    response = await call(address, name, "Publish", robot_pb2.PublishRequest(topic=topic, payload=payload))
    assert isinstance(response, robot_pb2.PublishResponse)
    return response


async def test_publish_reaches_each_subscriber_once_and_no_one_else(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        address = running.address
        streams = [
            await opened(address, "sub1", topics=["deploys.*"]),
            await opened(address, "sub1", topics=["deploys.*"]),  # a replica: the callback gets it once
            await opened(address, "sub2", topics=["deploys.#"]),
            await opened(address, "other", topics=["alerts.*"]),
        ]
        try:
            response = await publish(address, "pub", "deploys.finished", b'{"app": "api"}')
            assert response.subscribers == 2
            got = []
            for stream in streams[:3]:
                with suppress(queue.Empty):
                    got.append(await stream.next(timeout=1.0))
            assert len(got) == 2, got
            for event in got:
                assert event.published_event.topic == "deploys.finished"
                assert event.published_event.publisher == "pub"
                assert json.loads(event.published_event.payload) == {"app": "api"}
                assert event.delivery_id == ""  # these streams do not acknowledge
            await streams[3].nothing()
        finally:
            for stream in streams:
                stream.close()


async def test_unacknowledged_events_come_again_and_acknowledged_ones_never(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        address = running.address
        first = await opened(address, "sub1", topics=["jobs.*"], acknowledge=True)
        await publish(address, "pub", "jobs.one", b"1")
        event = await first.next()
        assert event.delivery_id
        assert event.redelivered == 0
        first.close()  # ends without acknowledging: as a callback killed mid-handler

        second = await opened(address, "sub1", topics=["jobs.*"], acknowledge=True)
        again = await second.next()
        assert again.published_event.id == event.published_event.id
        assert again.redelivered == 1
        await call(address, "sub1", "Acknowledge", robot_pb2.AcknowledgeRequest(delivery_ids=[again.delivery_id]))
        second.close()

        third = await opened(address, "sub1", topics=["jobs.*"], acknowledge=True)
        await third.nothing()
        third.close()
        assert running.bot.core.events.waiting("sub1") == 0


async def test_events_wait_for_a_callback_that_is_away_even_across_a_bot_restart(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        stream = await opened(running.address, "sub1", topics=["deploys.*"], acknowledge=True)
        stream.close()
        await trio.sleep(0.2)
        response = await publish(running.address, "pub", "deploys.started", b"kept")
        assert response.subscribers == 1  # away, and still a subscriber
    async with open_bot(config(tmp_path)) as running:
        stream = await opened(running.address, "sub1", topics=["deploys.*"], acknowledge=True)
        try:
            event = await stream.next()
            assert event.published_event.payload == b"kept"
        finally:
            stream.close()


async def test_a_stream_that_does_not_acknowledge_gets_each_event_once(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        stream = await opened(running.address, "sub1", topics=["jobs.*"])
        await publish(running.address, "pub", "jobs.two")
        assert (await stream.next()).published_event.topic == "jobs.two"
        stream.close()
        await trio.sleep(0.3)
        again = await opened(running.address, "sub1", topics=["jobs.*"])
        await again.nothing()
        again.close()
        assert running.bot.core.events.waiting("sub1") == 0


async def test_oco_events_shows_what_waits_for_each_callback(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        stream = await opened(running.address, "sub1", topics=["jobs.*"], acknowledge=True)
        stream.close()
        await trio.sleep(0.2)
        await publish(running.address, "pub", "jobs.a", b"x" * 100)
        await publish(running.address, "pub", "jobs.b")
    (tmp_path / "oco.yaml").write_text(config(tmp_path))
    shown = await trio.to_thread.run_sync(partial(oco_cli, "events", "-c", "oco.yaml", cwd=tmp_path))
    assert shown.returncode == 0, shown.stderr
    header, row = shown.stdout.splitlines()
    assert header.split()[:3] == ["CALLBACK", "EVENTS", "BYTES"]
    assert row.split()[:2] == ["sub1", "2"]
    assert row.endswith("published_event 2")
    other = await trio.to_thread.run_sync(
        partial(oco_cli, "events", "--callback", "sub2", "-c", "oco.yaml", cwd=tmp_path)
    )
    assert other.stdout.strip() == "no durable events are waiting for callback 'sub2'"


async def test_expired_events_are_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "oco_core._events")
    async with open_bot(config(tmp_path, "events: {ttl: 0.3}")) as running:
        stream = await opened(running.address, "sub1", topics=["jobs.*"], acknowledge=True)
        stream.close()
        await trio.sleep(0.1)
        await publish(running.address, "pub", "jobs.late")
        await trio.sleep(1.5)
        assert running.bot.core.events.stats.expired == 1
        assert "1 durable event(s) for callback 'sub1' expired" in caplog.text
        assert "events.ttl" in caplog.text


async def test_capabilities_bound_publish_and_subscribe(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        with pytest.raises(grpc.RpcError) as refused:
            await publish(running.address, "narrow", "alerts.fired")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        trailers: Any = refused.value.trailing_metadata()  # (key, value) pairs; the stubs say otherwise
        metadata = dict(trailers)
        assert metadata["oco-error-type"] == "CapabilityError"
        assert "capabilities.publish" in str(refused.value.details())
        assert (await publish(running.address, "narrow", "deploys.done")).subscribers == 0

        with pytest.raises(grpc.RpcError) as listen_refused:
            await opened(running.address, "narrow", topics=["#"])
        assert listen_refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        stream = await opened(running.address, "narrow", topics=["deploys.eu.*"])
        stream.close()

        with pytest.raises(grpc.RpcError) as large:
            await publish(running.address, "pub", "deploys.big", b"x" * (256 * 1024 + 1))
        assert large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "events.max_event_bytes" in str(large.value.details())
        attributes = {f"key{n}": "v" * 1000 for n in range(300)}  # small payload, large attributes
        with pytest.raises(grpc.RpcError) as heavy:
            await call(
                running.address,
                "pub",
                "Publish",
                robot_pb2.PublishRequest(topic="deploys.x", payload=b"1", attributes=attributes),
            )
        assert heavy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "events.max_event_bytes" in str(heavy.value.details())
        with pytest.raises(grpc.RpcError) as own:
            await publish(running.address, "pub", "oco.callback.connected")
        assert own.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as bad:
            await opened(running.address, "sub1", topics=["deploys.#.x"])
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'#' may only end a pattern" in str(bad.value.details())


async def test_the_bot_announces_callbacks_connecting_and_leaving(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        watcher = await opened(running.address, "other", topics=["oco.callback.*"])
        try:
            own = await watcher.next()  # its own arrival, first
            assert json.loads(own.published_event.payload) == {"callback": "other"}
            stream = await opened(running.address, "sub1")
            event = await watcher.next()
            assert event.published_event.topic == "oco.callback.connected"
            assert event.published_event.publisher == "oco"
            assert json.loads(event.published_event.payload) == {"callback": "sub1"}
            stream.close()
            event = await watcher.next()
            assert event.published_event.topic == "oco.callback.disconnected"
        finally:
            watcher.close()


async def test_matches_of_a_durable_route_wait_for_a_callback_that_is_away(tmp_path: Path) -> None:
    route = robot_pb2.Route(id="deploy", pattern=r"deploy (\w+)", respond=True, durable=True)
    plain = robot_pb2.Route(id="status", pattern=r"status", respond=True)
    async with open_bot(config(tmp_path)) as running:
        stream = await opened(running.address, "sub1", routes=[route, plain], acknowledge=True)
        stream.close()
        await trio.sleep(0.3)
        await running.adapter.inject("oco deploy api", user="alice", room="general")
        await running.adapter.inject("oco status", user="alice", room="general")
        back = await opened(running.address, "sub1", routes=[route, plain], acknowledge=True)
        try:
            event = await back.next()
            assert event.matched_message.route_id == "deploy"
            assert list(event.matched_message.groups) == ["deploy api", "api"]
            assert event.delivery_id
            await back.nothing()  # the plain route's match was not kept
        finally:
            back.close()


async def test_membership_changes_are_published_for_callbacks_that_watch_them(tmp_path: Path) -> None:
    from oco_core._adapter import MembershipKind

    async with open_bot(config(tmp_path)) as running:
        watcher = await opened(running.address, "other", topics=["oco.membership"])
        try:
            await running.adapter.member(MembershipKind.JOINED, "bob", "ops")
            event = await watcher.next()
            assert event.published_event.topic == "oco.membership"
            fields = json.loads(event.published_event.payload)
            assert fields["kind"] == "joined"
            assert fields["user"] == "memory/bob"
            assert fields["room"] == "memory/ops"
        finally:
            watcher.close()


async def test_topic_changes_are_published_with_the_new_topic(tmp_path: Path) -> None:
    from oco_core._adapter import ChatRoom

    async with open_bot(config(tmp_path)) as running:
        watcher = await opened(running.address, "other", topics=["oco.topic"])
        try:
            assert running.adapter.host is not None
            await running.adapter.host.topic(ChatRoom("ops", "ops", topic="deploy freeze"))
            fields = json.loads((await watcher.next()).published_event.payload)
            assert fields == {"room": "memory/ops", "topic": "deploy freeze", "user": ""}
        finally:
            watcher.close()


async def test_an_event_goes_only_to_a_stream_of_the_callback_that_asked_for_it(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        builds = await opened(running.address, "sub1", topics=["builds.*"], acknowledge=True)
        plain = await opened(running.address, "sub1", acknowledge=True)  # same callback, no topics
        try:
            for n in range(4):  # round robin would hand some to the plain stream
                await publish(running.address, "pub", f"builds.b{n}")
            topics = [(await builds.next()).published_event.topic for _ in range(4)]
            assert topics == [f"builds.b{n}" for n in range(4)]
            await plain.nothing()
        finally:
            builds.close()
            plain.close()


async def test_what_only_a_departed_replica_declared_goes_with_it(tmp_path: Path) -> None:
    # A rolling deploy: the old replica subscribes to old.*, the new one to new.*; once
    # the old one leaves, old.* has no subscriber left, and nothing waits for nobody.
    async with open_bot(config(tmp_path)) as running:
        old = await opened(running.address, "sub1", topics=["old.*"], acknowledge=True)
        new = await opened(running.address, "sub1", topics=["new.*"], acknowledge=True)
        try:
            assert (await publish(running.address, "pub", "old.thing")).subscribers == 1
            await old.next()
            old.close()
            await trio.sleep(0.2)
            assert (await publish(running.address, "pub", "old.thing")).subscribers == 0
            assert (await publish(running.address, "pub", "new.thing")).subscribers == 1
            assert (await new.next()).published_event.topic == "new.thing"
        finally:
            new.close()


async def test_an_unreadable_record_in_the_store_is_skipped_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from oco_core._events import NAMESPACE

    async with open_bot(config(tmp_path)) as running:
        await running.bot.core.store.set(NAMESPACE, "sub1/00000000000000000001-x-000000", b"\x00\x01junk")
        stream = await opened(running.address, "sub1", topics=["jobs.*"], acknowledge=True)
        stream.close()
        await trio.sleep(0.2)
        await publish(running.address, "pub", "jobs.readable")
    caplog.set_level(logging.ERROR, "oco_core._events")
    async with open_bot(config(tmp_path)) as running:  # starts, and hands out what it can read
        stream = await opened(running.address, "sub1", topics=["jobs.*"], acknowledge=True)
        try:
            assert (await stream.next()).published_event.topic == "jobs.readable"
        finally:
            stream.close()
    assert "is unreadable" in caplog.text
