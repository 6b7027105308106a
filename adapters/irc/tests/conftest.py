"""Fixtures for the IRC adapter's tests: a real ngircd, a person on it, a host for the adapter.

- ``ngircd``: a real ngircd on a free loopback port, started per test (it starts in a
  few milliseconds) and killed after; it can be killed and restarted on the same port.
- ``open_person``: a second, raw IRC connection that plays the person in the channel.
- ``host``: a :class:`~oco_core.testing.RecordingHost` that records what the adapter
  hands to the bot.
- ``live_chat``: what the adapter contract suite (test_irc_contract.py) needs: the
  adapter running behind a ``Gate``, and ``IrcPerson``, the person it talks to.
- ``Gate``: a TCP relay between the adapter and ngircd that a test can shut (new
  connections refused) or freeze (bytes stop flowing, like a dead network), so a test
  decides when the bot may reconnect.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
from oco_adapter_irc import IrcAdapter, IrcConfig

from oco_core.testing import RecordingHost, free_port
from oco_core.testing.adapter_contract import ChatPerson, LiveChat, SeenByPerson, SeenMessage
from oco_core.testing.pytest_plugin import server_unavailable, server_used

CHANNEL = "#test"


def find_ngircd() -> str | None:
    return shutil.which("ngircd") or next(
        (p for p in ("/usr/sbin/ngircd", "/usr/local/sbin/ngircd") if os.access(p, os.X_OK)), None
    )


async def wait_for(condition: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` after ``timeout``."""
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for {what}")


class Ngircd:
    """A real ngircd on 127.0.0.1:``port``."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        *,
        penalties: bool = True,
        password: str | None = None,
        tls_cert: tuple[Path, Path] | None = None,
        ping_timeout: int = 120,
        pong_timeout: int = 20,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.binary = binary
        self.port = free_port()
        self.tls_port = free_port() if tls_cert else None
        self.config = workdir / "ngircd.conf"
        self.log = workdir / "ngircd.log"
        self.penalties = penalties
        self.process: trio.Process | None = None
        (workdir / "motd").write_text("test server\n")
        self.config.write_text(
            "[Global]\n"
            "Name = irc.test\n"
            "Info = OCO test server\n"
            "Listen = 127.0.0.1\n"
            f"Ports = {self.port}\n"
            f"MotdFile = {workdir / 'motd'}\n" + (f"Password = {password}\n" if password else "") + "[Limits]\n"
            "MaxConnectionsIP = 0\n"
            "MaxNickLength = 30\n"
            f"PingTimeout = {ping_timeout}\n"
            f"PongTimeout = {pong_timeout}\n"
            # ngircd's own flood control (about three lines a second per client) stays
            # on by default: the flood test must pass against a realistic server.
            f"MaxPenaltyTime = {-1 if penalties else 0}\n"
            "[Options]\n"
            "DNS = no\n"
            "Ident = no\n"
            "PAM = no\n"
            + (
                f"[SSL]\nCertFile = {tls_cert[0]}\nKeyFile = {tls_cert[1]}\nPorts = {self.tls_port}\n"
                if tls_cert
                else ""
            )
        )

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = await trio.lowlevel.open_process(
                [self.binary, "-n", "-f", str(self.config)], stdout=log, stderr=log
            )
        with trio.move_on_after(10):
            while True:
                if self.process.poll() is not None:
                    break
                try:
                    probe = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.02)
                    continue
                await probe.aclose()
                return
        await self.kill()
        raise AssertionError(f"ngircd did not start: {self.log.read_text()[-2000:]}")

    async def kill(self) -> None:
        """SIGKILL: no QUIT, no goodbye, the way a crash looks to clients."""
        if self.process is not None:
            with trio.CancelScope(shield=True):
                if self.process.poll() is None:
                    self.process.send_signal(signal.SIGKILL)
                await self.process.wait()
        self.process = None


@pytest.fixture
def ngircd_binary() -> str:
    binary = find_ngircd()
    if binary is None:
        server_unavailable("ngircd", "install it with `apt-get install ngircd`")
    server_used("ngircd", binary)
    return binary


@pytest.fixture
async def make_ngircd(ngircd_binary: str, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Ngircd]]]:
    """Start more ngircd servers, with options (password, TLS); killed after the test."""
    servers: list[Ngircd] = []

    async def make(**options: Any) -> Ngircd:
        server = Ngircd(ngircd_binary, tmp_path / f"server{len(servers)}", **options)
        servers.append(server)
        await server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            await server.kill()


@pytest.fixture
async def ngircd(ngircd_binary: str, tmp_path: Path) -> AsyncIterator[Ngircd]:
    server = Ngircd(ngircd_binary, tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


class Person:
    """A raw IRC client playing a person: it logs what it receives and can talk."""

    def __init__(self, stream: trio.SocketStream, nick: str) -> None:
        self.stream = stream
        self.nick = nick
        self.lines: list[str] = []
        self.raw: list[bytes] = []
        self._seen = 0

    async def send(self, line: str | bytes) -> None:
        data = line if isinstance(line, bytes) else line.encode()
        await self.stream.send_all(data + b"\r\n")

    async def say(self, target: str, text: str) -> None:
        await self.send(f"PRIVMSG {target} :{text}")

    async def _read(self) -> None:
        buffer = b""
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the server dropped us; a test may expect that
            if not data:
                return
            buffer += data
            *complete, buffer = buffer.split(b"\r\n")
            for raw in complete:
                if raw.startswith(b"PING"):
                    await self.send(b"PONG" + raw[4:])
                self.raw.append(raw)
                self.lines.append(raw.decode("utf-8", "replace"))

    def find(self, pattern: str, since: int = 0) -> list[re.Match[str]]:
        compiled = re.compile(pattern)
        return [m for line in self.lines[since:] if (m := compiled.search(line))]

    async def expect(self, pattern: str, *, timeout: float = 15.0, since: int | None = None) -> re.Match[str]:
        """Wait for a line matching ``pattern`` after the last one an expect consumed."""
        compiled = re.compile(pattern)
        start = self._seen if since is None else since
        with trio.move_on_after(timeout):
            while True:
                for index in range(start, len(self.lines)):
                    found = compiled.search(self.lines[index])
                    if found:
                        self._seen = index + 1
                        return found
                start = len(self.lines)
                await trio.sleep(0.02)
        raise AssertionError(f"{self.nick} saw no line matching {pattern!r}; last lines: {self.lines[-15:]!r}")

    def mark(self) -> int:
        """Index of the next line to arrive, for ``expect(since=...)``."""
        self._seen = len(self.lines)
        return self._seen

    async def ask_until(
        self, target: str, text: str, answer: str, *, timeout: float = 60.0
    ) -> tuple[int, re.Match[str]]:
        """Say ``text`` to ``target`` every 3 s until a line matching ``answer`` comes
        back: a launched callback connects a little after the bot joined, and the bot's
        own answers before then (no callback connected yet) are not it. Returns where
        the answered question's lines start (for ``find``/``expect``) and the answer."""
        with trio.move_on_after(timeout):
            while True:
                since = self.mark()
                await self.say(target, text)
                with trio.move_on_after(3):
                    return since, await self.expect(answer, since=since, timeout=3)
        raise AssertionError(f"no answer to {text!r}; {self.nick} saw {self.lines[-20:]!r}")


async def start_person(nursery: trio.Nursery, port: int, nick: str, channels: Sequence[str] = (CHANNEL,)) -> Person:
    """Connect a person whose reader runs in ``nursery``; return once it is registered
    and in ``channels``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    person = Person(stream, nick)
    nursery.start_soon(person._read)
    await person.send(f"NICK {nick}")
    await person.send(f"USER person 0 * :{nick}")
    await person.expect(r" (376|422) ")
    for channel in channels:
        await person.send(f"JOIN {channel}")
        await person.expect(rf" 366 {re.escape(nick)} {re.escape(channel)} ")
    return person


@asynccontextmanager
async def open_person(port: int, nick: str, channels: Sequence[str] = (CHANNEL,)) -> AsyncIterator[Person]:
    async with trio.open_nursery() as nursery:
        person = await start_person(nursery, port, nick, channels)
        try:
            yield person
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await person.stream.aclose()


def irc_config(port: int, **options: Any) -> IrcConfig:
    """An adapter config for the test server: fast backoff, a generous rate limit."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "tls": False,
        "nick": "oco",
        "channels": [CHANNEL],
        "reconnect": {"initial_delay": 0.1, "max_delay": 0.5},
        "rate_limit": {"burst": 10, "per_second": 20},
        "rejoin_delay": 0.2,
        "connect_timeout": 10,
    }
    values.update(options)
    return IrcConfig.model_validate(values)


@asynccontextmanager
async def running(adapter: IrcAdapter, host: RecordingHost) -> AsyncIterator[IrcAdapter]:
    """Run ``adapter`` until the block ends; enter once it is registered."""
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.run, host)
        yield adapter
        nursery.cancel_scope.cancel()


class Gate:
    """A TCP relay from a local port to ngircd that a test can shut or freeze."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.open = True
        self.frozen = False
        self.connections = 0
        self._links: set[trio.CancelScope] = set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listeners[0].socket.getsockname()[1])
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if not self.open:
                return
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
            except OSError:
                return
            self.connections += 1
            async with upstream, trio.open_nursery() as nursery:
                self._links.add(nursery.cancel_scope)
                nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)
            self._links.discard(nursery.cancel_scope)

    def drop(self) -> None:
        """Close every relayed connection now; what a frozen relay held is lost, as when
        a server dies with data in its buffers. New connections are still relayed."""
        for link in list(self._links):
            link.cancel()

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            while True:
                data = await source.receive_some(65536)
                if not data:
                    break
                while self.frozen:
                    await trio.sleep(0.02)
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


@pytest.fixture
async def gate(ngircd: Ngircd, nursery: trio.Nursery) -> Gate:
    relay = Gate(ngircd.port)
    await nursery.start(relay.serve)
    return relay


class Kit:
    """What a test needs, handed over as one fixture (test modules cannot import this
    conftest under ``--import-mode=importlib``)."""

    CHANNEL = CHANNEL

    def __init__(self, server: Ngircd, host: RecordingHost) -> None:
        self.server = server
        self.host = host
        self.wait_for = wait_for
        self.running = running

    def config(self, port: int | None = None, **options: Any) -> IrcConfig:
        return irc_config(self.server.port if port is None else port, **options)

    def person(
        self, nick: str, channels: Sequence[str] = (CHANNEL,), port: int | None = None
    ) -> AbstractAsyncContextManager[Person]:
        return open_person(self.server.port if port is None else port, nick, channels)

    def oco_config(self, tmp_path: Path, rest: str) -> str:
        """An `oco run` config: the IRC adapter as `oco` in #test on this server, SQLite in
        ``tmp_path``, gRPC on a free port, then ``rest`` (callbacks:, auth:, ...)."""
        return f"""\
bot:
  name: oco
adapters:
  - type: irc
    host: 127.0.0.1
    port: {self.server.port}
    tls: false
    nick: oco
    channels: ["{CHANNEL}"]
    rate_limit: {{burst: 10, per_second: 10}}
store:
  url: sqlite:///{tmp_path / "oco.db"}
grpc:
  listen: 127.0.0.1:0
{rest}"""


@pytest.fixture
def host() -> RecordingHost:
    return RecordingHost("irc", timeout=15)


@pytest.fixture
def kit(ngircd: Ngircd, host: RecordingHost) -> Kit:
    return Kit(ngircd, host)


# --------------------------------------------------------------------------- the contract

_BOT_LINE = re.compile(rb"^:(?P<nick>[^!\s]+)!\S+ PRIVMSG (?P<target>\S+) :(?P<text>.*)$")
_MENTION = re.compile(r"^(?P<nick>[^\s:]+): ")


class IrcPerson(ChatPerson):
    """The contract's person on ngircd: raw IRC connections (a new one after an outage),
    whose lines are read as one log."""

    max_message_bytes = 512  # RFC 1459: a line, CR LF included

    def __init__(self, nursery: trio.Nursery, server: Ngircd, gate: Gate, nick: str, bot_nick: str) -> None:
        self.nursery = nursery
        self.server = server
        self.gate = gate
        self.name = nick
        self.user_id = nick.lower()  # ngircd folds ASCII case; these nicks have nothing else
        self.room = CHANNEL
        self.bot_nick = bot_nick
        self.adapter: IrcAdapter | None = None
        self.connections: list[Person] = []
        self._from_bot = SeenByPerson(self.name, self._seen, poll=0.02)

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            for connection in self.connections:
                await connection.stream.aclose()

    @property
    def current(self) -> Person:
        return self.connections[-1]

    async def connect(self) -> None:
        self.connections.append(await start_person(self.nursery, self.server.port, self.name))

    async def say(self, room: str, text: str) -> None:
        await self.current.say(room, text)

    async def say_privately(self, text: str) -> None:
        await self.current.say(self.bot_nick, text)

    async def join(self, room: str) -> None:
        await self.current.send(f"JOIN {room}")
        await self.current.expect(rf" 366 {re.escape(self.name)} {re.escape(room)} ")

    async def leave(self, room: str) -> None:
        await self.current.send(f"PART {room}")
        await self.current.expect(rf"^:{re.escape(self.name)}!\S+ PART {re.escape(room)}")

    def _seen(self) -> list[SeenMessage]:
        seen = []
        for raw in (raw for person in self.connections for raw in person.raw):
            found = _BOT_LINE.match(raw)
            if found is None or found["nick"].decode().lower() != self.bot_nick.lower():
                continue
            target, text = found["target"].decode(), found["text"].decode("utf-8", "replace")
            mention = _MENTION.match(text)
            seen.append(
                SeenMessage(
                    body=text,
                    room=target if target.startswith("#") else None,
                    mentions=frozenset({mention["nick"].lower()}) if mention else frozenset(),
                    size=len(raw) + 2,
                )
            )
        return seen

    async def next_from_bot(self, predicate: Callable[[SeenMessage], bool], *, timeout: float) -> SeenMessage:
        return await self._from_bot.next(predicate, timeout=timeout)

    async def interrupt(self) -> None:
        # SIGKILL, then wait until the adapter saw the connection end: IRC has no
        # acknowledgements, so a line written into a socket the server has not yet
        # reset would be lost, and no IRC client can help that.
        assert self.adapter is not None
        adapter = self.adapter
        await self.server.kill()
        await wait_for(lambda: not adapter.statistics().connected, "the adapter to notice the server is gone")

    async def restore(self) -> None:
        # Hold the bot back until the person is in the channel again, or it could
        # deliver before anyone is there to read.
        self.gate.open = False
        await self.server.start()
        await self.connect()
        self.gate.open = True
        await self.current.expect(rf"^:{re.escape(self.bot_nick)}!\S+ JOIN :?{re.escape(self.room)}")


@pytest.fixture
async def live_chat(ngircd: Ngircd, gate: Gate, nursery: trio.Nursery) -> AsyncIterator[LiveChat]:
    """The IRC adapter as ``oco`` in #test through a gate, and alice there with it."""
    person = IrcPerson(nursery, ngircd, gate, "alice", "oco")
    await person.connect()
    host = RecordingHost("irc", timeout=30)
    adapter = IrcAdapter(irc_config(gate.port))
    person.adapter = adapter
    await nursery.start(adapter.run, host)
    try:
        await person.current.expect(r"^:oco!\S+ JOIN :?#test")
        yield LiveChat(adapter, host, person)
    finally:
        await person.close()
