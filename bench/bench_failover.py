"""Failover benchmark: two ``oco run`` with ``ha:`` on one real ngircd and one shared
store; a person asks a steady stream of commands in the channel while the active bot is
SIGKILLed, again and again.

    python bench/bench_failover.py [--store postgresql|redis] [--failovers 20] [--rate 5]

Each round kills the active bot (SIGKILL: no goodbye, no lease release), measures the
time from the kill to the first answer in the channel to a command asked after it, then
starts the killed bot again as the new standby and waits until it stands by. At the end
(after the answers have had time to arrive) it prints, per store: time to first answer
after a kill (median and max over the rounds), commands answered twice (must be 0), and
commands lost, with how many of them were asked inside a failover window (from the kill
to the first answer after it) — the only place a loss is expected: a message sent to the
channel while no bot is in it is not seen by any.

Needs ngircd (``apt-get install ngircd``), the local PostgreSQL
(``OCO_TEST_POSTGRES_URL``, default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``)
and, for ``--store redis``, Redis with oco-store-redis installed (``OCO_TEST_REDIS_URL``,
default ``redis://127.0.0.1:6379/15``). The bots use the default ``ha:`` settings.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import trio

from oco_core.testing import OcoProcess, free_port, run_oco

CHANNEL = "#test"
_ANSWER = re.compile(r"^:(oco\S*)!\S+ PRIVMSG #test :(?:alice: )?(c\d+)$")
POSTGRES = os.environ.get("OCO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("OCO_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


# -- ngircd and the person ------------------------------------------------------------


async def start_ngircd(workdir: Path) -> tuple[trio.Process, int]:
    binary = shutil.which("ngircd") or "/usr/sbin/ngircd"
    port = free_port()
    (workdir / "motd").write_text("bench\n")
    config = workdir / "ngircd.conf"
    # No flood penalties: the person asks faster than ngircd lets a client talk by default.
    config.write_text(
        "[Global]\nName = irc.bench\nInfo = bench\nListen = 127.0.0.1\n"
        f"Ports = {port}\nMotdFile = {workdir / 'motd'}\n"
        "[Limits]\nMaxConnectionsIP = 0\nMaxNickLength = 30\nMaxPenaltyTime = 0\n"
        "[Options]\nDNS = no\nIdent = no\nPAM = no\n"
    )
    log = (workdir / "ngircd.log").open("ab")
    process = await trio.lowlevel.open_process([binary, "-n", "-f", str(config)], stdout=log, stderr=log)
    with trio.fail_after(10):
        while True:
            try:
                probe = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.02)
                continue
            await probe.aclose()
            return process, port


@dataclass
class Person:
    """alice in #test: asks ``c<n>`` commands and records every answer."""

    stream: trio.SocketStream
    sent: dict[int, float] = field(default_factory=dict)
    answers: dict[int, list[tuple[float, str]]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    async def send(self, line: str) -> None:
        await self.stream.send_all(line.encode() + b"\r\n")

    async def read(self) -> None:
        buffer = b""
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                return
            buffer += data
            *complete, buffer = buffer.split(b"\r\n")
            for raw in complete:
                line = raw.decode("utf-8", "replace")
                if line.startswith("PING"):
                    await self.send("PONG" + line[4:])
                self.lines.append(line)
                found = _ANSWER.match(line)
                if found:
                    self.answers.setdefault(int(found[2][1:]), []).append((trio.current_time(), found[1]))

    async def wait_for(self, pattern: str, timeout: float = 30.0) -> None:
        compiled = re.compile(pattern)
        with trio.fail_after(timeout):
            while not any(compiled.search(line) for line in self.lines):
                await trio.sleep(0.02)

    async def ask(self, rate: float, stop: trio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            self.sent[n] = trio.current_time()
            await self.send(f"PRIVMSG {CHANNEL} :oco: echo c{n}")
            await trio.sleep(1 / rate)


# -- the bots -------------------------------------------------------------------------


def bot_config(irc_port: int, store: str) -> str:
    return f"""\
bot: {{name: oco}}
adapters:
  - type: irc
    host: 127.0.0.1
    port: {irc_port}
    tls: false
    nick: oco
    alt_nicks: [oco_, oco__]
    channels: ["{CHANNEL}"]
    reconnect: {{initial_delay: 0.1, max_delay: 0.5}}
    rate_limit: {{burst: 20, per_second: 20}}
{store}
grpc: {{listen: 127.0.0.1:0}}
ha: {{}}
callbacks:
  - id: echo
    command: ["{sys.executable}", "-m", "oco_core.examples.ping"]
"""


def store_section(kind: str, tag: str) -> str:
    if kind == "postgresql":
        return f"store: {{url: '{POSTGRES}', table_prefix: 'bench_{tag}_'}}"
    return f"store: {{type: redis, url: '{REDIS}', prefix: 'bench:{tag}:'}}"


def clean_up(kind: str, tag: str) -> None:
    """Drop what the run left in the store."""
    if kind == "postgresql":
        import sqlalchemy as sa

        from oco_core._sql_store import SqlStoreConfig

        engine = sa.create_engine(SqlStoreConfig(url=POSTGRES).sqlalchemy_url())
        with engine.begin() as conn:
            for name in sa.inspect(conn).get_table_names():
                if name.startswith(f"bench_{tag}_"):
                    conn.execute(sa.text(f'DROP TABLE "{name}"'))
        engine.dispose()
    else:
        import redis

        client = redis.Redis.from_url(REDIS)
        keys = list(client.scan_iter(f"bench:{tag}:*"))
        if keys:
            client.delete(*keys)
        client.close()


@dataclass
class Figures:
    store: str
    takeovers: list[float]
    asked: int
    duplicated: int
    lost: int
    lost_in_windows: int


async def run(kind: str, failovers: int, rate: float, workdir: Path) -> Figures:
    tag = uuid.uuid4().hex[:8]
    ngircd, port = await start_ngircd(workdir)
    config = bot_config(port, store_section(kind, tag))
    takeovers: list[float] = []
    windows: list[tuple[float, float]] = []
    try:
        async with trio.open_nursery() as nursery:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            person = Person(stream)
            nursery.start_soon(person.read)
            await person.send("NICK alice")
            await person.send("USER alice 0 * :alice")
            await person.wait_for(r" (376|422) ")
            await person.send(f"JOIN {CHANNEL}")
            await person.wait_for(r" 366 alice #test ")

            slots: list[tuple[trio.CancelScope, OcoProcess]] = []
            generation = 0

            async def start_bot() -> tuple[trio.CancelScope, OcoProcess]:
                nonlocal generation
                generation += 1
                scope = trio.CancelScope()
                where = workdir / f"bot{generation}"

                async def running(*, task_status: trio.TaskStatus[OcoProcess]) -> None:
                    with scope:
                        async with run_oco(config, where) as bot:
                            task_status.started(bot)
                            await trio.sleep_forever()

                bot: OcoProcess = await nursery.start(running)
                return scope, bot

            slots.append(await start_bot())
            await person.wait_for(r"JOIN :?#test", timeout=60)
            slots.append(await start_bot())
            await slots[1][1].expect("up as a standby", stream="stderr", timeout=60)

            stop = trio.Event()
            nursery.start_soon(person.ask, rate, stop)
            await trio.sleep(2)
            active = 0
            for round_ in range(failovers):
                scope, bot = slots[active]
                killed = trio.current_time()
                bot.process.kill()
                await bot.process.wait()
                first = None
                with trio.move_on_after(60):
                    while first is None:
                        later = [
                            t
                            for n, answers in person.answers.items()
                            if person.sent[n] > killed
                            for t, _ in answers
                            if t > killed
                        ]
                        first = min(later) if later else None
                        await trio.sleep(0.01)
                if first is None:
                    standby = slots[1 - active][1]
                    raise AssertionError(
                        f"round {round_ + 1}: no answer within 60 s of the kill; the standby's log ends: "
                        + "\n".join(standby.stderr_lines[-40:])
                        + "\nthe channel: "
                        + "\n".join(person.lines[-15:])
                    )
                takeovers.append(first - killed)
                windows.append((killed, first))
                print(f"  {kind} round {round_ + 1}: first answer {first - killed:.2f} s after the kill", flush=True)
                scope.cancel()
                slots[active] = await start_bot()
                await slots[active][1].expect("up as a standby", stream="stderr", timeout=60)
                active = 1 - active
                await trio.sleep(1)
            stop.set()
            await trio.sleep(5)  # the last answers arrive
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            ngircd.kill()
            await ngircd.wait()
        await trio.to_thread.run_sync(clean_up, kind, tag)
    asked = len(person.sent)
    duplicated = sum(1 for answers in person.answers.values() if len(answers) > 1)
    lost = [n for n in person.sent if n not in person.answers]
    in_windows = [n for n in lost if any(start - 1.0 <= person.sent[n] <= end for start, end in windows)]
    return Figures(kind, takeovers, asked, duplicated, len(lost), len(in_windows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=["postgresql", "redis"], action="append")
    parser.add_argument("--failovers", type=int, default=20)
    parser.add_argument("--rate", type=float, default=5.0, help="commands a second")
    parser.add_argument("--quick", action="store_true", help="3 failovers")
    args = parser.parse_args()
    failovers = 3 if args.quick else args.failovers
    results = []
    for kind in args.store or ["postgresql", "redis"]:
        with tempfile.TemporaryDirectory(prefix="oco-bench-failover-") as tmp:
            results.append(trio.run(run, kind, failovers, args.rate, Path(tmp)))
    print()
    print(f"{failovers} SIGKILL failovers, {args.rate:g} commands/s, default ha: settings (lease 3 s, renew 0.5 s)")
    print("| store | first answer after kill: median | max | commands | answered twice | lost (in failover windows) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.store} | {statistics.median(r.takeovers):.2f} s | {max(r.takeovers):.2f} s | {r.asked} | "
            f"{r.duplicated} | {r.lost} ({r.lost_in_windows}) |"
        )


if __name__ == "__main__":
    main()
