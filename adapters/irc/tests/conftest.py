"""Fixtures for the IRC adapter's tests: a real ngircd, a person on it, a host for the adapter.

- ``ngircd``: a real ngircd on a free loopback port, started per test (it starts in a
  few milliseconds) and killed after; it can be killed and restarted on the same port.
- ``open_person``: a second, raw IRC connection that plays the person in the channel.
- ``Host``: a small :class:`~oco_core.plugin.AdapterHost` that records what the adapter
  hands to the bot.
- ``Gate``: a TCP relay between the adapter and ngircd that a test can shut (new
  connections refused) or freeze (bytes stop flowing, like a dead network), so a test
  decides when the bot may reconnect.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
from oco_adapter_irc import IrcAdapter, IrcConfig

from oco_core.plugin import (
    ChatRoom,
    ChatUser,
    IncomingMessage,
    MembershipEvent,
    NamespacedStore,
)
from oco_core.testing import MemoryStore
from oco_core.testing.pytest_plugin import server_unavailable

CHANNEL = "#test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


@asynccontextmanager
async def open_person(port: int, nick: str, channels: Sequence[str] = (CHANNEL,)) -> AsyncIterator[Person]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    person = Person(stream, nick)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(person._read)
        await person.send(f"NICK {nick}")
        await person.send(f"USER person 0 * :{nick}")
        await person.expect(r" (376|422) ")
        for channel in channels:
            await person.send(f"JOIN {channel}")
            await person.expect(rf" 366 {re.escape(nick)} {re.escape(channel)} ")
        try:
            yield person
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.aclose()


class Host:
    """An AdapterHost that records what the adapter reports."""

    def __init__(self, name: str = "irc", bot_name: str = "oco") -> None:
        self.name = name
        self.bot_name = bot_name
        self.aliases: Sequence[str] = ()
        self.store = NamespacedStore(MemoryStore(), f"adapter:{name}")
        self.messages: list[IncomingMessage] = []
        self.events: list[MembershipEvent] = []
        self.topics: list[tuple[ChatRoom, ChatUser | None]] = []
        self.own_names: list[list[str]] = []

    async def receive(self, message: IncomingMessage) -> None:
        self.messages.append(message)

    async def membership(self, event: MembershipEvent) -> None:
        self.events.append(event)

    async def topic(self, room: ChatRoom, user: ChatUser | None = None) -> None:
        self.topics.append((room, user))

    def set_own_names(self, names: Sequence[str]) -> None:
        self.own_names.append(list(names))

    async def wait_idle(self, *, quiet: float = 0.5, max_wait: float = 10.0) -> None:
        await trio.lowlevel.checkpoint()

    async def next_message(self, predicate: Callable[[IncomingMessage], bool] = lambda m: True) -> IncomingMessage:
        found: list[IncomingMessage] = []

        def match() -> bool:
            found[:] = [m for m in self.messages if predicate(m)]
            return bool(found)

        await wait_for(match, "a message reaching the host")
        return found[0]


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
async def running(adapter: IrcAdapter, host: Host) -> AsyncIterator[IrcAdapter]:
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
        self._streams: list[trio.SocketStream] = []

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
                nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)

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

    def __init__(self, server: Ngircd, host: Host) -> None:
        self.server = server
        self.host = host
        self.wait_for = wait_for
        self.running = running
        self.Host = Host

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
def host() -> Host:
    return Host()


@pytest.fixture
def kit(ngircd: Ngircd, host: Host) -> Kit:
    return Kit(ngircd, host)
