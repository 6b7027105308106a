"""Schedules: slots (cron in a time zone across DST changes, epoch-aligned intervals),
catch-up, and each slot fired once across bots sharing a store and across restarts."""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
import pytest
import trio
import trio.testing

from oco_core._config import parse_config
from oco_core._errors import ConfigError, StoreUnavailableError
from oco_core._events import DeclaredSchedule
from oco_core._proto import core_pb2, robot_pb2, robot_pb2_grpc
from oco_core._schedules import (
    NAMESPACE,
    catch_up_slot,
    decode_state,
    encode_state,
    latest_slot,
    next_slot,
    run_schedules,
    schedule_problem,
    scheduled_time,
)
from oco_core._sql_store import SqlStoreConfig, open_sql_store
from oco_core._store import Item, Store
from oco_core.testing import MemoryStore, open_bot
from oco_core.testing._process import run_oco

PARIS = ZoneInfo("Europe/Paris")
MINUTE = 60_000


def paris_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, tzinfo=PARIS).timestamp() * 1000)


def cron(expression: str, zone: str = "Europe/Paris", **fields: object) -> robot_pb2.Schedule:
    return robot_pb2.Schedule(cron=expression, time_zone=zone, **fields)  # type: ignore[arg-type]


def every(seconds: int, **fields: object) -> robot_pb2.Schedule:
    return robot_pb2.Schedule(every_seconds=seconds, **fields)  # type: ignore[arg-type]


def slots(schedule: robot_pb2.Schedule, after: int, count: int) -> list[str]:
    found = []
    for _ in range(count):
        following = next_slot(schedule, after)
        assert following is not None
        found.append(scheduled_time(schedule, following))
        after = following
    return found


# -- slots ------------------------------------------------------------------------------


def test_interval_slots_are_multiples_of_the_interval_since_the_epoch() -> None:
    schedule = every(300)
    assert next_slot(schedule, 1_000) == 300_000
    assert next_slot(schedule, 300_000) == 600_000  # strictly after
    assert next_slot(schedule, 299_999) == 300_000
    assert latest_slot(schedule, 600_000) == 600_000  # at or before
    assert latest_slot(schedule, 899_999) == 600_000
    # Any two bots, whenever they started, name the same slots.
    assert next_slot(every(7), 1_700_000_000_123) == 1_700_000_001_000  # 7 * 242_857_143 s


def test_a_daily_cron_fires_once_on_both_dst_changes() -> None:
    daily = cron("30 2 * * *")
    # Spring forward: 02:30 does not exist on 29 March; it fires right after the jump.
    assert slots(daily, paris_ms(2026, 3, 27, 12), 3) == [
        "2026-03-28T02:30:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
    ]
    # Fall back: 02:30 happens twice on 25 October; it fires once.
    assert slots(daily, paris_ms(2026, 10, 24, 12), 3) == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
        "2026-10-27T02:30:00+01:00",
    ]


def test_a_frequent_cron_follows_real_time_through_the_repeated_hour() -> None:
    assert slots(cron("*/20 * * * *"), paris_ms(2026, 10, 25, 1, 50), 7) == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:20:00+02:00",
        "2026-10-25T02:40:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T02:20:00+01:00",
        "2026-10-25T02:40:00+01:00",
        "2026-10-25T03:00:00+01:00",
    ]
    assert slots(cron("0 9 * * mon-fri"), paris_ms(2026, 11, 27, 10), 2) == [
        "2026-11-30T09:00:00+01:00",  # Friday 27 -> Monday 30
        "2026-12-01T09:00:00+01:00",
    ]


@pytest.mark.parametrize("expression", ["30 2 * * *", "*/20 * * * *", "15 1-3 * * *", "0 0 29 2 *"])
def test_the_latest_slot_is_the_one_forward_iteration_fires(expression: str) -> None:
    schedule = cron(expression)
    for day in (paris_ms(2026, 3, 29, 0), paris_ms(2026, 10, 25, 0)):
        for at in range(day, day + 5 * 3_600_000, 7 * MINUTE + 13):
            latest = latest_slot(schedule, at)
            assert latest is not None
            assert latest <= at
            following = next_slot(schedule, latest)
            assert following is not None
            assert following > at, (scheduled_time(schedule, at), latest)


def test_catch_up_fires_only_the_latest_missed_slot_within_its_window() -> None:
    hourly = every(3600, catch_up_seconds=600)
    now = 10 * 3_600_000 + 5 * MINUTE  # 10:05
    # Missed 08:00, 09:00 and 10:00: only 10:00, five minutes old, fires.
    assert catch_up_slot(hourly, 7 * 3_600_000, now) == 10 * 3_600_000
    assert catch_up_slot(hourly, 10 * 3_600_000, now) is None  # fired already
    assert catch_up_slot(every(3600, catch_up_seconds=240), 7 * 3_600_000, now) is None  # too old
    assert catch_up_slot(every(3600), 7 * 3_600_000, now) is None  # no catch_up
    assert catch_up_slot(hourly, None, now) is None  # never seen: no past slot fires


def test_schedule_problems_name_the_schedule_and_the_fix() -> None:
    assert schedule_problem(cron("*/5 * * * *")) is None
    assert schedule_problem(every(1)) is None
    bad_field = schedule_problem(cron("61 * * * *", id="report"))
    assert bad_field is not None
    assert bad_field.startswith("schedule 'report': cron expression '61 * * * *' is not valid: Bad minute")
    assert "has 6 field(s); it needs five" in (schedule_problem(cron("0 * * * * *")) or "")
    assert "unknown time zone 'Mars/Olympus'" in (schedule_problem(cron("* * * * *", "Mars/Olympus")) or "")
    assert "unknown time zone 'Europe'" in (schedule_problem(cron("* * * * *", "Europe")) or "")
    assert "both cron and every_seconds" in (schedule_problem(cron("* * * * *", every_seconds=5)) or "")
    assert "neither cron nor every_seconds" in (schedule_problem(robot_pb2.Schedule(id="x")) or "")


def test_scheduled_time_is_rfc3339_in_the_schedules_zone() -> None:
    assert scheduled_time(cron("0 9 * * *"), paris_ms(2026, 11, 30, 9)) == "2026-11-30T09:00:00+01:00"
    assert scheduled_time(every(60), 0) == "1970-01-01T00:00:00+00:00"


@pytest.mark.parametrize(
    ("entry", "line", "says"),
    [
        ('{cron: "61 * * * *"}', 5, "schedules[0].cron: cron expression '61 * * * *' is not valid: Bad minute"),
        ('{cron: "0 9 * *"}', 5, "schedules[0].cron: cron expression '0 9 * *' has 4 field(s)"),
        ("\n        cron: '0 9 * * *'\n        time_zone: Europe/Pariss", 7, "unknown time zone 'Europe/Pariss'"),
        ("{every: 0}", 5, "schedules[0].every: must be more than 0"),
        ('{cron: "* * * * *", every: 5}', 5, "give either cron"),
    ],
)
def test_a_bad_schedule_in_the_config_is_an_error_at_its_line(entry: str, line: int, says: str) -> None:
    text = f'callbacks:\n  - id: reports\n    secret: "{"s" * 20}"\n    schedules:\n      - {entry}\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "oco.yaml")
    message = str(caught.value)
    assert message.startswith(f"oco.yaml, line {line}: callbacks[0].schedules[0]"), message
    assert says in message, message


def test_the_state_record_reads_back_and_a_foreign_one_reads_as_no_slot() -> None:
    assert decode_state(encode_state(123_000, "abc-1")) == (123_000, "abc-1")
    assert decode_state(b"not json") == (0, "")


# -- the scheduler, on trio's autojump clock ----------------------------------------------


class RecordingHub:
    """The scheduler's side of the EventHub: a list of schedules that tests change, and
    the firings delivered."""

    def __init__(self, *declared: DeclaredSchedule) -> None:
        self._declared = list(declared)
        self.schedules_version = 0
        self._changed = trio.Event()
        self.fired: list[tuple[str, core_pb2.ScheduleFiring]] = []
        self.failures = 0

    def schedules(self) -> list[DeclaredSchedule]:
        return list(self._declared)

    def change(self, *declared: DeclaredSchedule) -> None:
        self._declared = list(declared)
        self.schedules_version += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_schedules_changed(self, seen: int) -> int:
        while self.schedules_version == seen:
            await self._changed.wait()
        return self.schedules_version

    def knows(self, callback_id: str) -> bool:
        return True

    async def deliver(self, callback_id: str, event: core_pb2.Event, *, ttl: float | None = None) -> None:
        await trio.lowlevel.checkpoint()
        if self.failures:
            self.failures -= 1
            raise StoreUnavailableError("the events table is unreachable")
        self.fired.append((callback_id, event.schedule_firing))

    def slots(self, schedule_id: str | None = None) -> list[int]:
        return [f.scheduled_unix_ms for _, f in self.fired if schedule_id in (None, f.schedule_id)]


class FaultyStore(MemoryStore):
    """A memory store whose writes fail on demand: before writing, or after (the write
    lands and the caller cannot tell), as a connection lost mid-commit does."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_before = 0
        self.fail_after = 0
        self.down = False

    async def get(self, namespace: str, key: str) -> Item | None:
        if self.down:
            raise StoreUnavailableError("connection refused")
        return await super().get(namespace, key)

    async def set(self, namespace: str, key: str, value: bytes, *, expected_version: int | None = None) -> int:
        if self.down or self.fail_before:
            self.fail_before = max(0, self.fail_before - 1)
            raise StoreUnavailableError("connection refused")
        version = await super().set(namespace, key, value, expected_version=expected_version)
        if self.fail_after:
            self.fail_after -= 1
            raise StoreUnavailableError("server closed the connection unexpectedly")
        return version


#: 10:00:30 UTC on some day: the virtual clocks below start there.
START = 1_800_000_000_000 // 3_600_000 * 3_600_000 + 30_000


def virtual_clock(start: int = START) -> Callable[[], int]:
    began = trio.current_time()
    return lambda: start + round((trio.current_time() - began) * 1000)


@asynccontextmanager
async def scheduler(hub: RecordingHub, store: Store, clock: Callable[[], int]) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: run_schedules(hub, store, clock=clock, task_status=task_status))
        yield
        nursery.cancel_scope.cancel()


def declared(schedule: robot_pb2.Schedule, callback_id: str = "reports") -> DeclaredSchedule:
    if not schedule.id:
        schedule.id = "s"
    return DeclaredSchedule(callback_id, schedule, True)


async def test_each_slot_fires_once_on_time_and_past_slots_of_a_new_schedule_do_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = RecordingHub(declared(every(60, catch_up_seconds=3600)))
    store = MemoryStore()
    clock = virtual_clock()
    async with scheduler(hub, store, clock):
        await trio.sleep(5 * 60)
    assert hub.slots() == [START - 30_000 + n * MINUTE for n in range(1, 6)]
    assert {cid for cid, _ in hub.fired} == {"reports"}
    assert not any(f.late for _, f in hub.fired)
    state = await store.get(NAMESPACE, "reports/s")
    assert state is not None
    assert decode_state(state.value)[0] == hub.slots()[-1]


async def test_after_a_restart_no_slot_fires_twice_and_only_the_latest_missed_one_catches_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    clock = virtual_clock()
    first = RecordingHub(declared(every(60, catch_up_seconds=90)))
    async with scheduler(first, store, clock):
        await trio.sleep(3 * 60)
    await trio.sleep(5 * 60 + 10)  # no bot runs: five slots come due
    second = RecordingHub(declared(every(60, catch_up_seconds=90)))
    async with scheduler(second, store, clock):
        await trio.sleep(2 * 60)
    fired = first.slots() + second.slots()
    assert len(fired) == len(set(fired)), fired
    late = [f for _, f in second.fired if f.late]
    assert [f.scheduled_unix_ms for f in late] == [second.slots()[0]]  # only the latest missed slot
    assert second.slots()[0] == (clock() - 2 * 60 * 1000) // MINUTE * MINUTE

    # Without catch_up (or past it) the missed slots are skipped.
    await trio.sleep(10 * 60)
    third = RecordingHub(declared(every(60)))
    async with scheduler(third, store, clock):
        await trio.sleep(60)
    assert len(third.fired) == 1
    assert not third.fired[0][1].late


async def test_schedules_come_and_go_without_restarting_the_others(autojump_clock: trio.testing.MockClock) -> None:
    minutely = declared(every(60, id="minutely"))
    hub = RecordingHub(minutely)
    async with scheduler(hub, MemoryStore(), virtual_clock()):
        await trio.sleep(2 * 60)
        hub.change(minutely, declared(every(20, id="often")))
        await trio.sleep(60)
        hub.change(declared(every(20, id="often")))
        await trio.sleep(60)
    minutes = hub.slots("minutely")
    assert len(minutes) == 3
    assert minutes == sorted(set(minutes))
    assert len(hub.slots("often")) == 6


class BrokenHub(RecordingHub):
    async def deliver(self, callback_id: str, event: core_pb2.Event, *, ttl: float | None = None) -> None:
        if event.schedule_firing.schedule_id == "broken":
            raise RuntimeError("a bug")
        await super().deliver(callback_id, event, ttl=ttl)


async def test_an_unexpected_error_stops_only_its_own_schedule(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    hub = BrokenHub(declared(every(60, id="broken")), declared(every(60, id="fine")))
    async with scheduler(hub, MemoryStore(), virtual_clock()):
        await trio.sleep(3 * 60)
    assert len(hub.slots("fine")) == 3
    assert "schedule 'broken' of callback 'reports' stopped after an unexpected error" in caplog.text


async def test_a_claim_whose_write_outcome_was_unknown_fires_once(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = FaultyStore()
    hub = RecordingHub(declared(every(60)))
    async with scheduler(hub, store, virtual_clock()):
        await trio.sleep(60)
        store.fail_after = 1  # the claim lands, and its writer hears it failed
        await trio.sleep(60)
        store.fail_before = 2  # the claim does not land, twice
        await trio.sleep(60)
        hub.failures = 2  # the claim wins, then keeping the firing fails twice
        await trio.sleep(60)
    assert hub.slots() == [START - 30_000 + n * MINUTE for n in range(1, 5)]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING].count(
        "schedules: the store is unavailable (server closed the connection unexpectedly); retrying, and no slot "
        "fires unclaimed"
    ) == 1


async def test_a_slot_nobody_can_claim_before_the_next_does_not_fire(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = FaultyStore()
    hub = RecordingHub(declared(every(60)))
    async with scheduler(hub, store, virtual_clock()):
        await trio.sleep(60)
        store.down = True
        await trio.sleep(3 * 60)
        store.down = False
        await trio.sleep(60 + 1)
    # Slots 2 and 3 came and went while no claim could be made; slot 4's claim went
    # through once the store was back, before slot 5.
    assert hub.slots() == [START - 30_000 + k * MINUTE for k in (1, 4, 5)]
    assert sum("does not fire" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR) == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "unavailable" in r.getMessage()]
    assert len(warnings) == 1  # one line an outage


# -- real stores, real time ---------------------------------------------------------------


async def race(stores: list[Store], seconds: float) -> list[int]:
    """Run one scheduler per store (each a bot), every second, for ``seconds``; the slots fired."""
    hubs = [RecordingHub(declared(every(1))) for _ in stores]
    async with trio.open_nursery() as nursery:
        for hub, store in zip(hubs, stores, strict=True):
            await nursery.start(lambda task_status, h=hub, s=store: run_schedules(h, s, task_status=task_status))
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()
    return [slot for hub in hubs for slot in hub.slots()]


def assert_each_slot_once(fired: list[int], seconds: float) -> None:
    repeated = [slot for slot, n in Counter(fired).items() if n > 1]
    assert not repeated, f"slots fired more than once: {repeated}"
    assert seconds - 1 <= len(fired) <= seconds + 1, sorted(fired)


async def test_two_bots_on_one_sqlite_store_fire_each_slot_once(tmp_path: Path) -> None:
    config = SqlStoreConfig(url=f"sqlite:///{tmp_path / 'oco.db'}")
    async with open_sql_store(config) as one, open_sql_store(config) as two:
        assert_each_slot_once(await race([one, two], 3), 3)
        # A restart (a new scheduler on the same state) fires none of them again.
        before = await race([one], 1.5)
        after = await race([two], 1.5)
        assert not set(before) & set(after)


async def test_two_bots_on_one_postgresql_store_fire_each_slot_once(postgres_tables: tuple[str, str]) -> None:
    url, prefix = postgres_tables
    config = SqlStoreConfig(url=url, table_prefix=prefix)
    async with open_sql_store(config) as one, open_sql_store(config) as two, open_sql_store(config) as three:
        assert_each_slot_once(await race([one, two, three], 3), 3)
        before = await race([one, two], 1.5)
        after = await race([three], 1.5)
        assert not set(before) & set(after)


# -- end to end: `oco run` ------------------------------------------------------------------

SECRET = "schedules-secret-0123456789"


def bot_config(store: str, extra: str = "") -> str:
    return f"""
store: {store}
grpc: {{listen: "127.0.0.1:0"}}
adapters: [{{type: memory}}]
callbacks:
  - id: ticker
    secret: {SECRET}
    schedules:
      - {{id: tick, every: 1}}
{extra}"""


class Firings:
    """A Listen stream of ``ticker``, read in a thread: the slots it was sent."""

    def __init__(self, address: str, request: robot_pb2.ListenRequest | None = None, schedule_id: str = "tick") -> None:
        self.slots: queue.Queue[int] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.schedule_id = schedule_id
        self._channel = grpc.insecure_channel(address)
        self._call = robot_pb2_grpc.RobotStub(self._channel).Listen(
            request or robot_pb2.ListenRequest(), metadata=(("authorization", f"Bearer {SECRET}"),)
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._call:
                if event.WhichOneof("type") == "schedule_firing":
                    assert event.schedule_firing.schedule_id == self.schedule_id
                    self.slots.put(event.schedule_firing.scheduled_unix_ms)
        except grpc.RpcError as exc:
            self.error = exc

    def drain(self) -> list[int]:
        found = []
        while not self.slots.empty():
            found.append(self.slots.get_nowait())
        return found

    def close(self) -> None:
        self._call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped
        self._thread.join(5)
        self._channel.close()


@asynccontextmanager
async def listening(
    address: str, request: robot_pb2.ListenRequest | None = None, schedule_id: str = "tick"
) -> AsyncIterator[Firings]:
    firings = Firings(address, request, schedule_id)
    try:
        yield firings
    finally:
        await trio.to_thread.run_sync(firings.close)


@pytest.mark.slow
async def test_oco_run_fires_an_every_second_schedule_ten_times_in_ten_seconds(tmp_path: Path) -> None:
    store = f'{{url: "sqlite:///{tmp_path / "oco.db"}"}}'
    async with run_oco(bot_config(store), tmp_path / "bot") as bot, listening(bot.address) as stream:
        await trio.sleep(1)
        early = stream.drain()  # what came before the stream opened waited in the store for it
        await trio.sleep(10)
        fired = stream.drain()
        await trio.sleep(0.5)
        fired_late = stream.drain()
    assert_each_slot_once(fired, 10)
    # Across a restart, on the same store: no slot again.
    async with run_oco(bot_config(store), tmp_path / "bot") as bot, listening(bot.address) as stream:
        await trio.sleep(3)
        again = stream.drain()
    before = early + fired + fired_late
    assert again
    assert not set(again) & set(before), (before, again)


@pytest.mark.slow
async def test_two_oco_run_on_one_postgresql_store_fire_each_slot_once(
    tmp_path: Path, postgres_tables: tuple[str, str]
) -> None:
    url, prefix = postgres_tables
    store = f'{{url: "{url}", table_prefix: {prefix}}}'
    async with (
        run_oco(bot_config(store), tmp_path / "one") as one,
        run_oco(bot_config(store), tmp_path / "two") as two,
        listening(one.address) as first,
        listening(two.address) as second,
    ):
        await trio.sleep(1)
        first.drain()
        second.drain()
        await trio.sleep(10)
        fired = first.drain() + second.drain()
    assert_each_slot_once(fired, 10)


async def test_two_bots_on_one_store_fire_for_the_one_the_callback_is_on(
    tmp_path: Path, postgres_tables: tuple[str, str]
) -> None:
    # Without ha:, both bots run the operator's schedule; only the one the callback is
    # connected to may win a slot, or the firing would wait where the callback never comes.
    url, prefix = postgres_tables
    store = f'{{url: "{url}", table_prefix: {prefix}}}'
    async with (
        run_oco(bot_config(store), tmp_path / "one") as one,
        run_oco(bot_config(store), tmp_path / "two"),
        listening(one.address) as first,
    ):
        await trio.sleep(1)
        first.drain()
        await trio.sleep(10)
        fired = first.drain()
    assert_each_slot_once(fired, 10)


async def test_a_schedule_a_stream_declares_fires_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    config = f"""
store: {{url: "sqlite:///{tmp_path / "oco.db"}"}}
adapters: [{{type: memory}}]
callbacks: [{{id: ticker, secret: {SECRET}}}]
"""
    async with open_bot(config) as running:
        fast = robot_pb2.ListenRequest(schedules=[robot_pb2.Schedule(id="fast", every_seconds=1)])
        async with listening(running.address, fast, "fast") as stream:
            await trio.sleep(2.5)
            assert 2 <= len(stream.drain()) <= 3
        bad = robot_pb2.ListenRequest(schedules=[robot_pb2.Schedule(id="report", cron="0 25 * * *")])
        async with listening(running.address, bad) as refused:
            with trio.fail_after(10):
                while refused.error is None:
                    await trio.sleep(0.05)
        assert refused.error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "schedule 'report': cron expression '0 25 * * *' is not valid: Bad hour" in (
            refused.error.details() or ""
        )
