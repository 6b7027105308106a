"""oco_core.testing.RecordingHost: what adapter tests rely on (adapters' own suites use it
against real servers)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from oco_core.plugin import ChatRoom, ChatUser, IncomingMessage, MembershipEvent, MembershipKind
from oco_core.testing import MemoryStore, RecordingHost

ALICE = ChatUser("alice", "Alice", "alice")
OPS = ChatRoom("#ops", "ops")


def said(body: str) -> IncomingMessage:
    return IncomingMessage(body=body, user=ALICE, room=OPS)


async def test_next_message_returns_each_match_once_in_arrival_order() -> None:
    host = RecordingHost("irc")
    for body in ("one", "two", "three"):
        await host.receive(said(body))
    assert (await host.next_message(lambda m: m.body == "two")).body == "two"
    assert (await host.next_message()).body == "one"  # earlier, not yet returned
    assert (await host.next_message()).body == "three"
    assert [m.body for m in host.messages] == ["one", "two", "three"]


async def test_next_message_waits_for_one_that_arrives_later(nursery: trio.Nursery) -> None:
    host = RecordingHost()

    async def later() -> None:
        await trio.sleep(0.05)
        await host.receive(said("late"))

    nursery.start_soon(later)
    assert (await host.next_message(lambda m: m.body == "late", timeout=5)).body == "late"


async def test_a_wait_that_times_out_names_what_it_waited_for_and_what_came(
    autojump_clock: trio.testing.MockClock,
) -> None:
    host = RecordingHost("irc", timeout=3)
    await host.receive(said("hello"))
    with pytest.raises(AssertionError, match=r"no bob's hello within 3 s.*alice in #ops: 'hello'"):
        await host.next_message(lambda m: m.user.id == "bob", what="bob's hello")
    with pytest.raises(AssertionError, match=r"timed out after 2 s waiting for the topic"):
        await host.wait_for(lambda: host.topics, "the topic", timeout=2)


async def test_membership_topic_and_own_names_are_recorded() -> None:
    host = RecordingHost("matrix")
    await host.membership(MembershipEvent(MembershipKind.JOINED, ALICE, OPS))
    await host.topic(ChatRoom("#ops", "ops", "deploys"), ALICE)
    host.set_own_names(["oco"])
    host.set_own_names(["oco_", "oco"])
    event = await host.next_membership(lambda e: e.kind is MembershipKind.JOINED)
    assert event.user == ALICE
    room, who = await host.next_topic(lambda r: r.topic == "deploys")
    assert (room.id, who) == ("#ops", ALICE)
    assert host.own_names == ["oco_", "oco"]
    assert host.own_names_history == [["oco"], ["oco_", "oco"]]


async def test_store_is_namespaced_and_shareable_like_a_restarted_bots() -> None:
    memory = MemoryStore()
    first = RecordingHost("matrix", memory=memory)
    await first.store.set("token", b"t1")
    again = RecordingHost("matrix", memory=memory)
    item = await again.store.get("token")
    assert item is not None
    assert item.value == b"t1"
    assert await memory.get("adapter:matrix", "token") is not None


async def test_on_message_answers_in_the_adapters_task() -> None:
    host = RecordingHost()
    answered: list[str] = []

    async def answer(message: IncomingMessage) -> None:
        answered.append(message.body.upper())

    host.on_message = answer
    await host.receive(said("ping"))
    assert answered == ["PING"]


async def test_wait_idle_returns_after_a_quiet_spell(autojump_clock: trio.testing.MockClock) -> None:
    host = RecordingHost()
    await host.receive(said("x"))
    start = trio.current_time()
    await host.wait_idle(quiet=2, max_wait=10)
    assert 1.9 <= trio.current_time() - start <= 2.1
