"""The router on its own: addressing, hear and respond, groups, replicas, overflow."""

from __future__ import annotations

import logging

import pytest
import re2
import trio

from oco_core._proto import core_pb2
from oco_core._router import InvalidPatternError, PatternLimits, Route, Router, Subscription


def message(body: str) -> core_pb2.Message:
    return core_pb2.Message(body=body, id="test/1")


def route_all(router: Router, body: str, adapter: str = "chat", direct: bool = False) -> list[core_pb2.Event]:
    text = body if direct else router.address(adapter, body)
    return [m.event for m in router.match(message(body), body, direct, text)]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("oco ping", "ping"),
        ("oco: ping", "ping"),
        ("oco, ping", "ping"),
        ("oco:ping", "ping"),
        ("@oco ping", "ping"),
        ("OCO: ping", "ping"),
        ("  oco   ping  ", "ping"),
        ("!ping", "ping"),
        ("! ping", "ping"),
        ("ocobot ping", None),
        ("ping oco", None),
        ("hello", None),
    ],
)
def test_addressing(body: str, expected: str | None) -> None:
    router = Router("oco", aliases=["!"])
    assert router.address("chat", body) == expected


def test_an_adapter_can_add_the_names_the_bot_has_there() -> None:
    router = Router("oco")
    router.set_own_names("irc", ["oco_", "OcoBot"])
    assert router.address("irc", "oco_: ping") == "ping"
    assert router.address("irc", "ocobot ping") == "ping"
    assert router.address("matrix", "oco_: ping") is None
    router.set_own_names("irc", ["oco_", "!"])  # a symbol works like an alias
    assert router.address("irc", "!ping") == "ping"
    assert router.address("matrix", "!ping") is None


def test_hear_sees_every_message_respond_only_addressed_ones() -> None:
    router = Router("oco")
    sub = Subscription("cb", [Route("h", "coffee"), Route("r", "^ping$", respond=True)])
    router.subscribe(sub)
    assert [e.matched_message.route_id for e in route_all(router, "who wants coffee?")] == ["h"]
    assert route_all(router, "ping") == []
    (event,) = route_all(router, "oco: ping")
    assert event.matched_message.route_id == "r"
    assert event.matched_message.text == "ping"
    assert event.matched_message.direct
    (event,) = route_all(router, "ping", direct=True)
    assert event.matched_message.route_id == "r"


def test_capture_groups_positional_and_named() -> None:
    router = Router("oco")
    router.subscribe(Subscription("cb", [Route("d", r"deploy (?P<app>\w+)(?: to (\w+))?(!)?", respond=True)]))
    (event,) = route_all(router, "oco deploy api to prod")
    matched = event.matched_message
    assert list(matched.groups) == ["deploy api to prod", "api", "prod", ""]
    assert dict(matched.named_groups) == {"app": "api"}
    assert matched.pattern == r"deploy (?P<app>\w+)(?: to (\w+))?(!)?"


def test_ignore_case() -> None:
    router = Router("oco")
    router.subscribe(Subscription("cb", [Route("p", "^ping$", respond=True, ignore_case=True)]))
    assert len(route_all(router, "oco PING")) == 1


def test_invalid_pattern_is_refused_with_its_name_and_the_reason() -> None:
    router = Router("oco")
    with pytest.raises(InvalidPatternError) as caught:
        router.subscribe(Subscription("cb", [Route("ok", "fine"), Route("bad", "deploy (unclosed")]))
    assert "deploy (unclosed" in str(caught.value)
    assert "missing )" in str(caught.value)
    assert router.subscriptions() == []  # nothing half-registered


def test_backreferences_are_not_re2_and_are_refused() -> None:
    with pytest.raises(InvalidPatternError, match="invalid escape"):
        Router("oco").subscribe(Subscription("cb", [Route("bad", r"(a)\1")]))


def test_every_callback_gets_its_match_and_replicas_share_theirs() -> None:
    router = Router("oco")
    a1 = Subscription("a", [Route("p", "ping")])
    a2 = Subscription("a", [Route("p", "ping")])
    b = Subscription("b", [Route("x", "ping")])
    for sub in (a1, a2, b):
        router.subscribe(sub)
    for _ in range(4):
        assert len(route_all(router, "ping")) == 2  # one for a, one for b
    assert (a1.queued(), a2.queued(), b.queued()) == (2, 2, 4)


def test_a_full_queue_overflows_to_a_replica_then_is_counted() -> None:
    router = Router("oco")
    slow = Subscription("a", [Route("p", "ping")], queue_size=1)
    router.subscribe(slow)
    assert len(route_all(router, "ping")) == 1
    assert route_all(router, "ping") == []
    assert slow.overflowed == 1
    assert router.overflowed == 1
    replica = Subscription("a", [Route("p", "ping")], queue_size=1)
    router.subscribe(replica)
    assert len(route_all(router, "ping")) == 1
    assert replica.queued() == 1


def test_routes_live_as_long_as_their_subscription() -> None:
    router = Router("oco")
    sub = Subscription("a", [Route("p", "ping")])
    router.subscribe(sub)
    assert len(route_all(router, "ping")) == 1
    router.unsubscribe(sub)
    assert route_all(router, "ping") == []


def test_ten_thousand_patterns_match_in_one_pass() -> None:
    router = Router("oco")
    routes = [Route(f"r{i}", rf"^cmd{i} (\w+)$", respond=True) for i in range(10_000)]
    router.subscribe(Subscription("many", routes, queue_size=10))
    (event,) = route_all(router, "oco cmd7777 now")
    assert event.matched_message.route_id == "r7777"
    assert list(event.matched_message.groups) == ["cmd7777 now", "now"]
    assert route_all(router, "oco cmd10000 now") == []
    assert router.pattern_count() == 10_000


def test_help_lists_live_routes_filtered_by_topic() -> None:
    router = Router("oco")
    router.subscribe(Subscription("a", [Route("d", "deploy", help="deploy <app> - ship it"), Route("n", "x")]))
    router.subscribe(Subscription("b", [Route("p", "ping", help="ping - PONG")]))
    assert router.help_lines() == ["deploy <app> - ship it", "ping - PONG"]
    assert router.help_lines("deploy") == ["deploy <app> - ship it"]


def test_events_queued_for_a_stream_that_ends_go_to_a_live_replica() -> None:
    router = Router("oco")
    leaving = Subscription("a", [Route("p", "ping")])
    staying = Subscription("a", [Route("p", "ping")], queue_size=1)
    router.subscribe(leaving)
    for n in range(3):
        route_all(router, f"ping {n}")
    router.subscribe(staying)
    assert router.unsubscribe(leaving) == 2  # the replica has room for one
    assert staying.take_nowait().event().matched_message.message.body == "ping 0"  # the oldest first
    assert staying.queued() == 0
    alone = Subscription("b", [Route("p", "ping")])
    router.subscribe(alone)
    route_all(router, "ping")
    assert router.unsubscribe(alone) == 1  # no replica: counted as lost


# -- hardening: no callback's pattern can break or stall routing for the others ------------


def test_a_pattern_that_can_split_a_utf8_character_is_refused() -> None:
    router = Router("oco")
    for pattern in (r"\C", r"caf\C", r"(?i)x\Cy"):
        with pytest.raises(InvalidPatternError, match=r"\\C \(any byte\) can split a UTF-8 character"):
            router.subscribe(Subscription("cb", [Route("bad", pattern)]))
    router.subscribe(Subscription("cb", [Route("ok", r"back\\Cslash")]))  # an escaped backslash, then C
    assert len(route_all(router, r"back\Cslash")) == 1


def test_a_costly_or_long_pattern_is_refused_naming_the_limit() -> None:
    router = Router("oco", limits=PatternLimits(length=100, program=20_000))
    with pytest.raises(InvalidPatternError, match=r"over this bot's limit of 20000 \(grpc.max_pattern_program\)"):
        router.subscribe(Subscription("cb", [Route("slow", r"\pL{300}")]))
    with pytest.raises(InvalidPatternError, match=r"101 characters is over this bot's limit of 100"):
        router.subscribe(Subscription("cb", [Route("long", "x" * 101)]))
    router.subscribe(Subscription("cb", [Route("fine", r"\pL+ (\w+)")]))
    assert router.subscriptions() != []


def test_a_route_that_fails_while_matching_does_not_cost_the_others_their_match(
    caplog: pytest.LogCaptureFixture,
) -> None:
    router = Router("oco")
    # No pattern the router accepts fails while matching any more; a \C compiled by RE2
    # itself (bypassing the router's check) stands in for the next such surprise.
    router._regexes[(r"^\C", False)] = re2.compile(r"^\C")
    router.subscribe(Subscription("broken", [Route("b", r"^\C")]))
    good = Subscription("good", [Route("g", "^é")])
    router.subscribe(good)
    with caplog.at_level(logging.ERROR, logger="oco_core._router"):
        assert [e.matched_message.route_id for e in route_all(router, "été")] == ["g"]
        assert [e.matched_message.route_id for e in route_all(router, "école")] == ["g"]
    failures = [r for r in caplog.records if "failed on a message" in r.getMessage()]
    assert len(failures) == 1  # logged once, not once per message
    assert "of broken" in failures[0].getMessage()


async def test_registered_routes_are_live_at_once_and_a_closed_stream_leaves_at_once() -> None:
    router = Router("oco")
    async with trio.open_nursery() as nursery:
        await nursery.start(router.maintain)
        first = Subscription("a", [Route("p", "^ping$")])
        await router.register(first)
        assert len(route_all(router, "ping")) == 1  # live as soon as register returns
        big = Subscription("b", [Route(f"r{i}", rf"^cmd{i} (\w+)$") for i in range(2000)])
        await router.register(big)
        assert [e.matched_message.route_id for e in route_all(router, "cmd1999 x")] == ["r1999"]
        # A stream that ends stops getting messages at once, before the next build, and
        # what it would have got after is not counted as dropped.
        lost = router.unsubscribe(first)  # the ping it never read is lost with it, and counted
        assert lost == 1
        assert route_all(router, "ping") == []
        assert router.overflowed == lost
        # An invalid pattern changes nothing.
        with pytest.raises(InvalidPatternError):
            await router.register(Subscription("c", [Route("bad", "(")]))
        assert router.subscriptions("c") == []
        nursery.cancel_scope.cancel()


async def test_a_durable_match_is_kept_when_its_last_stream_left_before_the_next_build() -> None:
    # Between a stream's end and the next build of the tables, the tables still name the
    # closed stream and not the ghost that keeps its durable routes: a match then must
    # still be kept for the callback, not lost.
    router = Router("oco")
    kept: list[tuple[str, str]] = []
    router.keep_durable = lambda callback, event, ttl: kept.append((callback, event.matched_message.route_id))
    async with trio.open_nursery() as nursery:
        await nursery.start(router.maintain)
        stream = Subscription("deploy", [Route("go", "^deploy (\\w+)$", durable_ttl=30)])
        await router.register(stream)
        router.unsubscribe(stream)  # no rebuild can run before the next checkpoint
        route_all(router, "deploy web")
        assert kept == [("deploy", "go")]
        nursery.cancel_scope.cancel()


def test_many_streams_close_and_each_callback_is_remembered_as_departed() -> None:
    # How long it takes is bench/bench_churn.py's: each close no longer scans every stream.
    router = Router("oco")
    subs = [Subscription(f"cb{i % 100}", [Route("p", "^ping$")], queue_size=1) for i in range(8000)]
    for sub in subs:
        router.subscribe(sub)
    assert len(route_all(router, "ping")) == 100  # one stream of each callback
    for sub in subs:
        router.unsubscribe(sub)
    assert router.subscriptions() == []
    assert sorted(router._departed) == sorted({f"cb{i}" for i in range(100)})


def test_a_stream_queue_is_bounded_in_bytes_and_the_next_event_counts_what_it_lost() -> None:
    router = Router("oco")
    slow = Subscription("slow", [Route("all", "^big")], queue_size=1000, queue_bytes=5000)
    router.subscribe(slow)
    body = "big " + "x" * 1000  # each event counts its message, its text and its groups
    for _ in range(5):
        route_all(router, body)
    assert slow.queued() == 2  # 1,000 events would fit; 5,000 bytes do not
    assert slow.overflowed == 3
    assert 4000 < slow.queued_bytes <= 5000
    assert [slow.take_nowait().event().dropped for _ in range(2)] == [0, 0]
    assert slow.queued_bytes == 0
    route_all(router, body)
    (event,) = [slow.take_nowait().event()]
    assert event.dropped == 3
    assert event.matched_message.message.body == body
    # One event larger than the bound still goes, alone.
    route_all(router, "big " + "y" * 10_000)
    assert slow.queued() == 1


def test_one_message_matched_by_many_routes_and_streams_is_held_once() -> None:
    router = Router("oco")
    streams = [Subscription(f"cb{i}", [Route(f"r{j}", f"^big{j}?") for j in range(5)]) for i in range(4)]
    for stream in streams:
        router.subscribe(stream)
    body = "big" + "x" * 100_000
    matches = router.match(message(body), body, False, None)
    assert len(matches) == 20
    # Until written, every queued match refers to the one message and text it was given.
    held = {id(m.queued._build.args[0]) for m in matches}  # type: ignore[attr-defined]
    texts = {id(m.queued._build.args[6]) for m in matches}  # type: ignore[attr-defined]
    assert len(held) == 1
    assert len(texts) == 1


def test_all_live_patterns_together_have_a_budget() -> None:
    router = Router("oco", limits=PatternLimits(program=20_000, total=40_000))
    router.subscribe(Subscription("a", [Route(f"r{i}", rf"^x{i}\pL{{10}}") for i in range(3)]))  # 35,892
    with pytest.raises(InvalidPatternError, match=r"over its limit of 40000 \(grpc.max_total_pattern_program\)"):
        router.subscribe(Subscription("b", [Route("big", r"^y\pL{10}")]))
    # A replica declaring the same patterns costs nothing more; leaving frees the budget.
    replica = Subscription("a", [Route(f"r{i}", rf"^x{i}\pL{{10}}") for i in range(3)])
    router.subscribe(replica)
    for sub in router.subscriptions("a"):
        router.unsubscribe(sub)
    router.subscribe(Subscription("b", [Route("big", r"^y\pL{10}")]))
    assert len(route_all(router, "yéééééééééé")) == 1


async def test_a_build_that_fails_refuses_only_the_new_streams_and_routing_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    router = Router("oco")
    async with trio.open_nursery() as nursery:
        await nursery.start(router.maintain)
        await router.register(Subscription("a", [Route("p", "^ping$")]))
        # RE2 refusing the set (its memory budget) is simulated by shrinking that budget:
        # no set of real routes fails under the bot's own limits.
        monkeypatch.setattr("oco_core._router._SET_MAX_MEM", 64)
        with pytest.raises(InvalidPatternError, match="RE2 could not build the bot's routes"):
            await router.register(Subscription("b", [Route(f"r{i}", rf"^cmd{i} (\w+)$") for i in range(200)]))
        assert router.subscriptions("b") == []
        assert len(route_all(router, "ping")) == 1
        monkeypatch.setattr("oco_core._router._SET_MAX_MEM", 512 << 20)
        await router.register(Subscription("b", [Route("q", "^pong$")]))
        assert len(route_all(router, "pong")) == 1
        nursery.cancel_scope.cancel()


def test_what_a_leaving_stream_lost_is_still_told_to_the_replica_that_takes_its_queue() -> None:
    router = Router("oco")
    leaving = Subscription("a", [Route("p", "^ping")], queue_size=1)
    router.subscribe(leaving)
    route_all(router, "ping 1")  # queued
    route_all(router, "ping 2")  # dropped: the queue holds one
    leaving.take_nowait()
    route_all(router, "ping 3")  # queued, carrying dropped=1
    staying = Subscription("a", [Route("p", "^ping")], queue_size=10)
    router.subscribe(staying)
    assert router.unsubscribe(leaving) == 0
    event = staying.take_nowait().event()
    assert event.matched_message.message.body == "ping 3"
    assert event.dropped == 1
