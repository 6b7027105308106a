"""High availability on real IRC: two ``oco run`` with ``ha:`` and the IRC adapter on a
real ngircd, sharing the local PostgreSQL (then Redis, when oco-store-redis is
installed); a person asks a steady stream of commands in the channel.

- SIGKILL of the active bot: the standby answers in the channel within 5 s of the kill.
- SIGSTOP of the active bot (its IRC connection stays open, holding the nick): the
  standby takes over; after SIGCONT the old one sends nothing and steps down (QUIT).
- No command is ever answered twice.
- The adapter alone: lines queued behind its rate limit are dropped, not written, once
  the host says the bot may no longer send.
"""

from __future__ import annotations

import re
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from oco_adapter_irc import IrcAdapter

from oco_core.plugin import OutgoingMessage
from oco_core.testing import OcoProcess, run_oco
from oco_core.testing.pytest_plugin import server_unavailable, server_url

pytestmark = pytest.mark.server("ngircd")

_ANSWER = re.compile(r"^:(oco\S*)!\S+ PRIVMSG #test :(?:alice: )?(c\d+)$")


@pytest.fixture(params=["postgresql", "redis"])
def shared_store(request: pytest.FixtureRequest) -> Iterator[str]:
    """The ``store:`` section of a store two bots share, emptied afterwards."""
    tag = uuid.uuid4().hex[:12]
    if request.param == "postgresql":
        pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install 'oco-core[postgresql]'")
        import sqlalchemy as sa

        from oco_core._sql_store import SqlStoreConfig

        url = server_url("postgresql")
        engine = sa.create_engine(SqlStoreConfig(url=url).sqlalchemy_url(), connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.OperationalError as e:
            server_unavailable("PostgreSQL", " ".join(str(e.orig).split()))
        yield f"store: {{url: '{url}', table_prefix: 'ha{tag}_'}}"
        with engine.begin() as conn:
            for name in sa.inspect(conn).get_table_names():
                if name.startswith(f"ha{tag}_"):
                    conn.execute(sa.text(f'DROP TABLE "{name}"'))
        engine.dispose()
    else:
        pytest.importorskip("oco_store_redis", reason="oco-store-redis is not installed in this environment")
        import redis

        url = server_url("redis")
        client = redis.Redis.from_url(url, socket_connect_timeout=3)
        try:
            client.ping()
        except redis.exceptions.ConnectionError as e:
            server_unavailable("Redis", str(e))
        yield f"store: {{type: redis, url: '{url}', prefix: 'ha{tag}:'}}"
        keys = list(client.scan_iter(f"ha{tag}:*"))
        if keys:
            client.delete(*keys)
        client.close()


def config(port: int, store: str) -> str:
    return f"""\
bot: {{name: oco}}
adapters:
  - type: irc
    host: 127.0.0.1
    port: {port}
    tls: false
    nick: oco
    alt_nicks: [oco_, oco__]
    channels: ["#test"]
    reconnect: {{initial_delay: 0.1, max_delay: 0.5}}
    rate_limit: {{burst: 20, per_second: 20}}
{store}
grpc: {{listen: 127.0.0.1:0}}
ha: {{}}
callbacks:
  - id: echo
    command: ["{sys.executable}", "-m", "oco_core.examples.ping"]
"""


class Asker:
    """The person's steady stream of ``oco: echo c<n>`` commands, and what answered them."""

    def __init__(self, person: Any) -> None:
        self.person = person
        self.sent: dict[int, float] = {}
        #: Per command: (when the answer was seen, the bot's nick).
        self.answers: dict[int, list[tuple[float, str]]] = {}
        self._read = 0

    async def ask(self, every: float) -> None:
        n = 0
        while True:
            n += 1
            self.sent[n] = trio.current_time()
            await self.person.say("#test", f"oco: echo c{n}")
            await trio.sleep(every)

    async def watch(self) -> None:
        while True:
            lines = self.person.lines
            for line in lines[self._read :]:
                found = _ANSWER.match(line)
                if found:
                    self.answers.setdefault(int(found[2][1:]), []).append((trio.current_time(), found[1]))
            self._read = len(lines)
            await trio.sleep(0.01)

    def first_answer_after(self, t: float) -> float | None:
        """When the first answer to a command asked after ``t`` was seen."""
        times = [when for n, seen in self.answers.items() if self.sent[n] > t for when, _ in seen]
        return min(times) if times else None

    def twice(self) -> list[int]:
        return [n for n, seen in self.answers.items() if len(seen) > 1]


async def until(condition: Callable[[], object], what: str, timeout: float) -> None:
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"{what} not within {timeout} s")


async def two_bots(
    tmp_path: Path, text: str, nursery: trio.Nursery
) -> tuple[OcoProcess, OcoProcess, Callable[[], Awaitable[None]]]:
    """Start the active bot, then the standby; and a way to stop both."""
    scopes: list[trio.CancelScope] = []

    async def start(name: str) -> OcoProcess:
        scope = trio.CancelScope()
        scopes.append(scope)

        async def running(*, task_status: trio.TaskStatus[OcoProcess]) -> None:
            with scope:
                async with run_oco(text, tmp_path / name) as bot:
                    task_status.started(bot)
                    await trio.sleep_forever()

        bot: OcoProcess = await nursery.start(running)
        return bot

    a = await start("a")
    await a.expect(r"ha: this bot is now active", stream="stderr", timeout=30)
    b = await start("b")
    await b.expect(r"up as a standby", stream="stderr", timeout=60)

    async def stop() -> None:
        for scope in scopes:
            scope.cancel()

    return a, b, stop


async def test_sigkill_of_the_active_bot_the_standby_answers_in_the_channel_within_5_s(
    kit: Any, make_ngircd: Callable[..., Awaitable[Any]], tmp_path: Path, shared_store: str
) -> None:
    server = await make_ngircd(penalties=False)  # the person asks faster than ngircd's flood control allows
    async with kit.person("alice", port=server.port) as alice, trio.open_nursery() as nursery:
        a, b, stop = await two_bots(tmp_path, config(server.port, shared_store), nursery)
        await alice.expect(r":oco!\S+ JOIN :?#test", timeout=30)
        asker = Asker(alice)
        nursery.start_soon(asker.watch)
        nursery.start_soon(asker.ask, 0.25)
        await until(lambda: asker.first_answer_after(0) is not None, "a first answer", 30)

        killed = trio.current_time()
        a.process.send_signal(signal.SIGKILL)
        await until(lambda: asker.first_answer_after(killed) is not None, "an answer from the standby", 10)
        took = (asker.first_answer_after(killed) or 0) - killed
        assert took < 5.0, f"the standby answered {took:.2f} s after the kill"
        await b.expect(r"ha: this bot is now active \(fencing token 2\)", stream="stderr")
        await trio.sleep(1)
        assert asker.twice() == [], "commands answered twice"
        await stop()
        nursery.cancel_scope.cancel()


async def test_sigstop_of_the_active_bot_standby_takes_over_and_the_resumed_one_sends_nothing(
    kit: Any, make_ngircd: Callable[..., Awaitable[Any]], tmp_path: Path, shared_store: str
) -> None:
    server = await make_ngircd(penalties=False)
    async with kit.person("alice", port=server.port) as alice, trio.open_nursery() as nursery:
        a, b, stop = await two_bots(tmp_path, config(server.port, shared_store), nursery)
        await alice.expect(r":oco!\S+ JOIN :?#test", timeout=30)
        asker = Asker(alice)
        nursery.start_soon(asker.watch)
        nursery.start_soon(asker.ask, 0.25)
        await until(lambda: asker.first_answer_after(0) is not None, "a first answer", 30)

        paused = trio.current_time()
        a.process.send_signal(signal.SIGSTOP)
        try:
            # The paused bot still holds the nick "oco": the new active bot is oco_.
            await until(lambda: asker.first_answer_after(paused) is not None, "an answer from the standby", 10)
            await b.expect(r"ha: this bot is now active", stream="stderr")
            await trio.sleep(1)
        finally:
            a.process.send_signal(signal.SIGCONT)
        resumed = len(alice.lines)
        # The resumed bot reads what was said while it was paused, answers none of it,
        # and leaves the channel (then the new active bot may take the nick "oco" back).
        await a.expect(r"WARNING .*ha: this bot stopped acting and stands by", stream="stderr", timeout=10)
        await alice.expect(r":oco!\S+ QUIT", timeout=10)
        quit_at = next(i for i in range(resumed, len(alice.lines)) if re.match(r":oco!\S+ QUIT", alice.lines[i]))
        by_old = [line for line in alice.lines[resumed:quit_at] if (m := _ANSWER.match(line)) and m[1] == "oco"]
        assert by_old == [], f"the resumed bot answered: {by_old}"
        await trio.sleep(2)
        assert asker.twice() == [], "commands answered twice"
        assert asker.first_answer_after(trio.current_time() - 1.5) is not None, "the new active bot stopped answering"
        await stop()
        nursery.cancel_scope.cancel()


async def test_queued_lines_are_dropped_once_the_bot_may_no_longer_send(kit: Any, caplog: Any) -> None:
    # The writer holds lines behind its rate limit; the bot is fenced meanwhile (another
    # one may be active now): what is still queued never reaches the channel.
    async with kit.person("alice") as alice:
        adapter = IrcAdapter(kit.config(rate_limit={"burst": 1, "per_second": 1}))
        async with kit.running(adapter, kit.host):
            await alice.expect(r":oco!\S+ JOIN")
            await trio.sleep(1.5)  # the bucket is full again: one line goes out at once
            since = alice.mark()
            for n in range(5):
                await adapter.send(OutgoingMessage(body=f"line {n}", room_id="#test"))
            await alice.expect(r"PRIVMSG #test :line 0$", since=since)
            kit.host.sending = False
            await trio.sleep(3)
            assert [m.group(1) for m in alice.find(r"PRIVMSG #test :line (\d+)$", since)] == ["0"]
            dropped = [r for r in caplog.records if "no longer the active one" in r.getMessage()]
            assert len(dropped) == 1
            assert dropped[0].levelname == "WARNING"
            assert adapter.statistics().queued_lines == 0
            # Active again: what is sent now goes out.
            kit.host.sending = True
            await adapter.send(OutgoingMessage(body="after", room_id="#test"))
            await alice.expect(r"PRIVMSG #test :after$", since=since)
