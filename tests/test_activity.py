"""What a running bot knows of its own activity (``_activity.py``), for the operator
console: real messages through a bot in this process (memory adapter) answered by a real
SDK callback over gRPC move each callback's counts and latency and fill the live feed;
the feed is bounded, keeps bodies only when configured, and a watcher that does not read
loses updates without holding the bot back; a launched callback that fails is counted
and its last output line kept; the counts by minute cover the last hour.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import trio
import trio.testing

from oco_core import Callback, Message
from oco_core._activity import SAMPLE_INTERVAL, Activity, LiveFeed, Update
from oco_core._adapter import ChatRoom, ChatUser, IncomingMessage
from oco_core._metrics import Metrics
from oco_core._proto import core_pb2
from oco_core._router import Match, Queued
from oco_core.testing import RunningBot, open_bot, serving

SECRET = "secret-pinger-0123456789abcdef"
#: How long the callback takes before it answers: the latency it must show at least.
DELAY = 0.05


def config(tmp_path: Path, console: str = "{}", extra: str = "") -> str:
    return f"""
adapters: [{{type: memory}}]
store: {{url: "sqlite:///{tmp_path}/oco.db"}}
http: {{listen: "127.0.0.1:0"}}
console: {console}
callbacks:
  - {{id: pinger, secret: {SECRET}}}
{extra}
"""


def pinger(running: RunningBot, delay: float = DELAY) -> Callback:
    callback = Callback(id="pinger", secret=SECRET, address=running.address)

    @callback.respond(r"ping (?P<n>\d+)", id="ping")
    async def ping(message: Message) -> None:
        await trio.sleep(delay)
        await message.reply(f"pong {message.match('n')}")
        await message.reply("and a second reply, which is not the first")

    return callback


async def eventually(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    with trio.move_on_after(timeout):
        while not check():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"not within {timeout} s: {what}")


async def ping(running: RunningBot, count: int, user: str = "alice") -> None:
    """Send ``count`` pings, each answered (twice) before the next."""
    with trio.fail_after(10):
        for n in range(count):
            await running.adapter.inject(f"oco ping {n}", user=user, room="general")
            for _ in range(2):
                await running.adapter.next_sent()


async def test_answered_messages_move_counts_latency_and_the_live_feed(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        activity = running.bot.core.activity
        assert activity.latency("pinger") is None
        async with serving(pinger(running)):
            await running.adapter.inject("nothing for anyone", room="general")  # received, not matched
            await ping(running, 3)
            await eventually(lambda: activity.reading().of("pinger") == (3, 6), "3 matches and 6 replies counted")

        reading = activity.reading()
        assert (reading.received, reading.sent) == (4, 6)
        assert activity.callback_per_minute("pinger") == (3, 6)
        assert activity.callback_per_minute("nobody") == (0, 0)
        minutes = activity.per_minute()
        assert len(minutes) == 60
        assert minutes[-1] == (4, 6)  # this minute's
        assert sum(i for i, _ in minutes[:-1]) == 0
        latency = activity.latency("pinger")
        assert latency is not None
        p50, p99 = latency
        # From the match to the first reply: the handler's sleep, not the second reply's time too.
        assert DELAY <= p50 <= p99 < 5

        assert running.bot.core.activity.live is not None
        entries = running.bot.core.activity.live.recent()
        assert [e.id for e in entries] == [3, 2, 1]  # newest first; the unmatched message is not in it
        newest = entries[0]
        assert (newest.adapter, newest.room, newest.user) == ("memory", "memory/general", "memory/alice")
        assert (newest.route, newest.callback) == ("ping", "pinger")
        assert newest.duration is not None
        assert newest.duration >= DELAY
        assert newest.body is None  # bodies are hidden unless console.show_bodies
        assert newest.as_json()["body"] == "hidden"
        assert newest.as_json()["duration_ms"] == round(newest.duration * 1000)


async def test_bodies_are_kept_only_when_configured(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path, "{show_bodies: true}")) as running:
        async with serving(pinger(running, delay=0)):
            await ping(running, 1)
        live = running.bot.core.activity.live
        assert live is not None
        assert [e.body for e in live.recent()] == ["oco ping 0"]
        assert live.recent()[0].as_json()["body"] == "oco ping 0"


async def test_without_a_console_there_is_no_live_feed_but_latency_is_known(tmp_path: Path) -> None:
    text = config(tmp_path).replace("console: {}", "")
    async with open_bot(text) as running:
        async with serving(pinger(running, delay=0)):
            await ping(running, 2)
        activity = running.bot.core.activity
        assert activity.live is None
        assert activity.latency("pinger") is not None
        assert not activity._awaiting  # both answered: nothing left waiting


async def test_the_live_feed_keeps_the_configured_number_of_messages(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path, "{live_buffer: 3}")) as running:
        async with serving(pinger(running, delay=0)):
            await ping(running, 5)
        live = running.bot.core.activity.live
        assert live is not None
        assert [e.id for e in live.recent()] == [5, 4, 3]
        assert all(e.duration is not None for e in live.recent())


async def test_a_watcher_gets_each_message_then_its_reply(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        live = running.bot.core.activity.live
        assert live is not None
        async with serving(pinger(running)):
            with live.watch() as watcher:
                assert live.watchers == 1
                await ping(running, 2)
                got: list[Update] = []
                with trio.fail_after(10):
                    while len(got) < 4:
                        got += await watcher.next()
            assert live.watchers == 0
        assert [(kind, entry.id) for kind, entry in got] == [("message", 1), ("reply", 1), ("message", 2), ("reply", 2)]
        assert all(entry.duration is not None for _, entry in got)


def _match(callback_id: str, route_id: str) -> Match:
    return Match(None, Queued(0, core_pb2.Event), False, callback_id, route_id)


def _match_message(activity: Activity, n: int, *matches: Match) -> None:
    """Message ``irc/<n>`` from bob in #ops matched ``matches``."""
    incoming = IncomingMessage(body="oco deploy", user=ChatUser("bob", "Bob", "bob"), room=ChatRoom("#ops", "#ops"))
    activity.matched("irc", f"irc/{n}", "irc/#ops", incoming, list(matches))


async def test_a_watcher_that_does_not_read_loses_updates_and_holds_nothing_back() -> None:
    live = LiveFeed(size=10, watcher_buffer=4)
    activity = Activity(Metrics(), live)
    with live.watch() as slow, live.watch() as fast:
        received = []
        for n in range(1, 21):
            _match_message(activity, n, _match("deployer", "deploy"))  # never waits
            received += fast.take()
        # The one that reads got everything; the other, reading late, the last four.
        assert [entry.id for _, entry in received] == list(range(1, 21))
        assert [entry.id for _, entry in slow.take()] == [17, 18, 19, 20]
        assert slow.take() == []
        assert (slow.dropped, fast.dropped) == (16, 0)
        activity.replied("deployer", ["irc/20"])
        assert [(kind, entry.id) for kind, entry in slow.take()] == [("reply", 20)]
    assert live.dropped == 16
    assert live.watchers == 0
    assert [entry.id for entry in live.recent()] == list(range(20, 10, -1))
    _match_message(activity, 21, _match("deployer", "deploy"))  # nobody watches: fine too
    assert not live._log  # and nothing is logged for nobody


async def test_latency_is_per_callback_and_counts_each_callbacks_first_reply_only() -> None:
    activity = Activity(Metrics())
    _match_message(activity, 1, _match("deployer", "deploy"), _match("logger", "all"))
    await trio.sleep(0.02)
    activity.replied("deployer", ["irc/1"])
    activity.replied("deployer", ["irc/1"])  # its second reply
    assert activity.latency("logger") is None
    assert "irc/1" in activity._awaiting  # the logger has not answered yet
    activity.replied("logger", ["irc/1", "irc/unknown"])
    assert not activity._awaiting
    deployer, logger = activity.latency("deployer"), activity.latency("logger")
    assert deployer is not None
    assert logger is not None
    assert 0.02 <= deployer[0] <= logger[0]
    assert len(activity._latency["deployer"]) == 1


async def test_counts_by_minute_cover_the_last_hour(autojump_clock: trio.testing.MockClock) -> None:
    metrics = Metrics()
    activity = Activity(metrics)
    async with trio.open_nursery() as nursery:
        await nursery.start(activity.run)
        # Minute 0: 5 in, 2 out; minute 30: 1 in; now (minute 70): 3 in, 3 out.
        metrics.message_received("irc")
        for _ in range(4):
            metrics.message_received("matrix")
        metrics.message_sent("irc")
        metrics.message_sent("irc")
        await trio.sleep(30 * 60 + SAMPLE_INTERVAL / 2)  # between two readings
        metrics.message_received("irc")
        await trio.sleep(40 * 60)
        for _ in range(3):
            metrics.message_received("irc")
            metrics.message_sent("irc")
        minutes = activity.per_minute()
        nursery.cancel_scope.cancel()
    assert len(minutes) == 60
    assert minutes[-1] == (3, 3)
    # Minute 30 lies 40 minutes back; minute 0 is older than the chart's hour.
    assert minutes[-40] == (1, 0)
    assert sum(i for i, _ in minutes) == 4
    assert sum(o for _, o in minutes) == 3


# Both lines on one pipe: the bot reads stdout and stderr apart, so which of two lines
# written to different pipes it read last is not the order they were written in.
FAILING = """\
import sys
print("starting up", file=sys.stderr, flush=True)
print("cannot reach the deploy API: connection refused", file=sys.stderr, flush=True)
sys.exit(3)
"""


async def test_a_failing_launched_callback_counts_restarts_and_keeps_its_last_line(tmp_path: Path) -> None:
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    command = json.dumps([sys.executable, str(script)])
    extra = f"""  - {{id: failing, command: {command}, give_up_after: 0}}
bot: {{callback_startup_wait: 0.1}}"""
    async with open_bot(config(tmp_path, extra=extra)) as running:
        state = running.bot.callbacks["failing"]
        await eventually(lambda: state.restarts >= 1, "the failing callback restarted", timeout=20)
        assert state.last_error == "exit code 3: cannot reach the deploy API: connection refused"
        assert running.bot.callbacks["pinger"].restarts == 0


async def test_the_first_reply_ends_the_wait_for_idle_even_when_a_listening_callback_never_answers() -> None:
    # A respond route and a listen-only route of another callback both match: the shell
    # adapter's wait at the end of piped input must end once the answer came, not wait
    # for the callback that only listens.
    from oco_core._router import Router

    activity = Activity()
    message = IncomingMessage(body="oco deploy", user=ChatUser(id="alice"), room=ChatRoom(id="general"))
    build: Callable[[], core_pb2.Event] = core_pb2.Event
    matches = [
        Match(None, Queued(0, build), True, "deployer", "deploy"),
        Match(None, Queued(0, build), False, "logger", "all"),
    ]
    activity.matched("memory", "m1", "general", message, matches)
    activity.replied("deployer", ["m1"])
    with trio.fail_after(2):  # max_wait is 30 s: waiting for the logger would take that long
        await activity.wait_idle(Router("oco"), quiet=0.05, max_wait=30)
