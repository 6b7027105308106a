"""The console's status pages (overview, callbacks, a callback's page, the live view),
read as a browser would: httpx against a bot in this process with its real HTTP server
(memory adapter, SQLite), logged in with a console token; callbacks are a real SDK
callback dialling in over gRPC and a real launched process.

- The overview names the bot, its version and role, each adapter's state (a failing one
  reconnecting, with its error), the store, the totals and the chart of the last hour; a
  standby (``ha:``, PostgreSQL) says so and where the active bot is.
- The callbacks page lists a launched and a dialled-in callback with their replicas; its
  counters and latency move after chat messages; a callback's page shows its replicas'
  peers, routes with help and permission, schedules and webhooks; an unknown one is 404.
- The live stream sends a ``message`` event, then a ``reply`` event with the duration;
  the page renders the same rows without JavaScript; bodies are hidden by default and
  shown with ``show_bodies: true``; a stream ends when its client goes away and when the
  bot stops.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pluggy
import trio
from pydantic import BaseModel

import oco_core.testing
from oco_core import AdapterError, Callback, Message, ScheduleFiring, WebhookRequest
from oco_core import _hookspecs as hookspecs
from oco_core._console._auth import create_token
from oco_core._plugins import load_plugins
from oco_core._version import __version__
from oco_core.plugin import Adapter, AdapterHost, AdapterType, OutgoingMessage, hookimpl
from oco_core.testing import RunningBot, open_bot, serving

SECRET = "secret-deployer-0123456789abcdef"
#: How long the dialled-in callback takes to answer: the latency the pages must show at least.
DELAY = 0.05

# -- reading pages ------------------------------------------------------------------------

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join("".join(c if isinstance(c, str) else f" {c.text} " for c in self.children).split())

    def walk(self) -> list[Node]:
        found: list[Node] = []
        for child in self.children:
            if isinstance(child, Node):
                found.append(child)
                found.extend(child.walk())
        return found

    def find(self, tag: str = "", **attrs: str) -> list[Node]:
        """Descendants with this tag (any if "") whose attributes hold these values
        (``class_`` matches one class among several)."""
        wanted = {k.rstrip("_"): v for k, v in attrs.items()}
        return [
            node
            for node in self.walk()
            if (not tag or node.tag == tag)
            and all(
                v in node.attrs.get(k, "").split() if k == "class" else node.attrs.get(k) == v
                for k, v in wanted.items()
            )
        ]

    def one(self, tag: str = "", **attrs: str) -> Node:
        found = self.find(tag, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag or '*'} {attrs}> in <{self.tag} {self.attrs}>"
        return found[0]

    def cell(self, name: str) -> str:
        """The text of the cell with class ``name`` in this row."""
        return self.one(class_=name).text


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(page: str) -> Node:
    parser = _Parser()
    parser.feed(page)
    parser.close()
    assert len(parser.stack) == 1, f"unclosed <{parser.stack[-1].tag}>"
    return parser.root


def by_id(page: Node, element_id: str) -> Node:
    return page.one(id=element_id)


# -- a bot with the console on ------------------------------------------------------------


class BrokenChat(Adapter):
    """A chat service that cannot be reached: its run fails each time."""

    async def run(self, host: AdapterHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise AdapterError("cannot connect to chat.example:6697: connection refused")

    async def send(self, message: OutgoingMessage) -> None:
        raise AdapterError("not connected")


class _Options(BaseModel):
    pass


class BrokenPlugin:
    @hookimpl
    def oco_adapter_types(self) -> list[AdapterType]:
        return [AdapterType(name="broken", create=lambda _: BrokenChat(), config_model=_Options)]


def plugins_with_broken_chat() -> object:
    manager = pluggy.PluginManager("oco")
    manager.add_hookspecs(hookspecs)
    manager.load_setuptools_entrypoints("oco")
    if not manager.is_registered(oco_core.testing):
        manager.register(oco_core.testing)
    manager.register(BrokenPlugin())
    return load_plugins(manager)


def config(tmp_path: Path, console: str = "{}", *, launched: bool = False, adapters: str = "[{type: memory}]") -> str:
    example = json.dumps([sys.executable, "-m", "oco_core.examples.ping"])
    launch = f"  - {{id: example, command: {example}}}\n" if launched else ""
    return f"""
adapters: {adapters}
store: {{url: "sqlite:///{tmp_path}/oco.db"}}
http: {{listen: "127.0.0.1:0"}}
console: {console}
callbacks:
  - id: deployer
    secret: {SECRET}
    capabilities: {{webhooks: true, schedules: true}}
    webhook_auth: {{none: true}}
    routes:
      - {{id: status, pattern: "^status$", respond: true, help: "status - what is deployed", permission: viewer}}
{launch}"""


@asynccontextmanager
async def console_bot(text: str, plugins: object | None = None) -> AsyncIterator[tuple[RunningBot, httpx.AsyncClient]]:
    """A bot, and an httpx client logged in to its console with a viewer token."""
    async with open_bot(text, plugins=plugins) as running:
        token = await create_token(running.bot.core.store, "watcher", "viewer")
        async with httpx.AsyncClient(base_url=f"http://{running.bot.http_address}", timeout=10) as http:
            answer = await http.post("/console/login", data={"token": token})
            assert answer.status_code == 303, answer.text
            yield running, http


async def page(http: httpx.AsyncClient, path: str) -> Node:
    answer = await http.get(path)
    assert answer.status_code == 200, f"{path}: {answer.status_code} {answer.text[:500]}"
    assert answer.headers["content-type"].startswith("text/html")
    return parse(answer.text)


def deployer(running: RunningBot) -> Callback:
    callback = Callback(id="deployer", secret=SECRET, address=running.address)

    @callback.respond(r"^deploy (?P<what>\w+)$", id="deploy", help="deploy <what> - ships it", permission="")
    async def deploy(message: Message) -> None:
        await trio.sleep(DELAY)
        await message.reply(f"deployed {message.match('what')}")

    @callback.webhook("POST", "/ci", asynchronous=True, help="CI finished a build")
    async def ci(request: WebhookRequest) -> None:
        pass

    @callback.every(3600, id="hourly")
    async def hourly(firing: ScheduleFiring) -> None:
        pass

    return callback


async def deploy(running: RunningBot, what: str) -> None:
    with trio.fail_after(10):
        await running.adapter.inject(f"oco deploy {what}", user="alice", room="general")
        reply = await running.adapter.next_sent()
    assert reply.body.endswith(f"deployed {what}")


# -- overview -----------------------------------------------------------------------------


async def test_the_overview_shows_the_bot_its_adapters_store_and_messages(tmp_path: Path) -> None:
    adapters = "[{type: memory}, {type: broken, name: irc}]"
    text = config(tmp_path, adapters=adapters).replace("http:", "bot: {adapter_startup_wait: 0.5}\nhttp:")
    async with console_bot(text, plugins_with_broken_chat()) as (running, http):
        overview = await page(http, "/console/")
        assert by_id(overview, "bot-name").text == "oco"
        assert by_id(overview, "bot-version").text == __version__
        assert by_id(overview, "bot-uptime").text.endswith(" s")
        assert by_id(overview, "bot-role").text == "active"
        assert by_id(overview, "store-state").text == "reachable (sql)"
        rows = by_id(overview, "adapters").find("tr", **{"data-adapter": "memory"})
        assert [row.cell("state") for row in rows] == ["connected"]
        broken = by_id(overview, "adapters").one("tr", **{"data-adapter": "irc"})
        assert broken.cell("state") == (
            "reconnecting: AdapterError: cannot connect to chat.example:6697: connection refused"
        )
        assert by_id(overview, "events-dropped").text == "0"
        chart = by_id(overview, "chart-messages")
        assert chart.tag == "svg"
        assert chart.attrs["role"] == "img"
        assert len(chart.find("g", class_="minute")) == 60

        async with serving(deployer(running)):
            await running.adapter.inject("just chatting", room="general")
            await deploy(running, "api")
        overview = await page(http, "/console/")
        assert by_id(overview, "messages-in").text == "2"
        assert by_id(overview, "messages-out").text == "1"
        minutes = by_id(overview, "chart-messages").find("g", class_="minute")
        assert minutes[-1].one("title").text == "this minute: 2 in, 1 out"
        assert float(minutes[-1].one("rect", class_="bar-in").attrs["height"]) > 0
        assert all(float(m.one("rect", class_="bar-in").attrs["height"]) == 0 for m in minutes[:-1])


async def test_a_standby_says_so_and_names_the_active_bot(tmp_path: Path, postgres_tables: tuple[str, str]) -> None:
    url, prefix = postgres_tables
    text = config(tmp_path).replace(
        f'store: {{url: "sqlite:///{tmp_path}/oco.db"}}', f'store: {{url: "{url}", table_prefix: {prefix}}}\nha: {{}}'
    )
    async with open_bot(text) as first:
        with trio.fail_after(20):
            while not first.bot.core.leader.acting():
                await trio.sleep(0.05)
        async with console_bot(text) as (_, http):
            overview = await page(http, "/console/")
            assert by_id(overview, "bot-role").text == "standby"
            assert by_id(overview, "active-bot").text == f"(the active bot is at {first.address})"
            memory = by_id(overview, "adapters").one("tr", **{"data-adapter": "memory"})
            assert memory.cell("state").startswith("stopped (this bot is a standby")
            assert "this bot is a standby (ha:)" in by_id(overview, "not-ready").text


# -- callbacks ----------------------------------------------------------------------------


async def test_the_callbacks_pages_list_launched_and_dialled_in_callbacks_and_count_them(tmp_path: Path) -> None:
    async with console_bot(config(tmp_path, launched=True)) as (running, http):
        listing = by_id(await page(http, "/console/callbacks"), "callbacks")
        example = listing.one("tr", **{"data-callback": "example"})
        assert (example.cell("kind"), example.cell("replicas"), example.cell("restarts")) == ("launched", "1", "0")
        absent = listing.one("tr", **{"data-callback": "deployer"})
        assert (absent.cell("kind"), absent.cell("replicas"), absent.cell("matched")) == ("dialled in", "0", "0")
        assert (absent.cell("p50"), absent.cell("p99")) == ("—", "—")

        first, second = deployer(running), deployer(running)
        async with serving(first, second):
            listing = by_id(await page(http, "/console/callbacks"), "callbacks")
            row = listing.one("tr", **{"data-callback": "deployer"})
            assert (row.cell("kind"), row.cell("replicas"), row.cell("restarts")) == ("dialled in", "2", "—")
            for what in ("api", "web", "db"):
                await deploy(running, what)

            listing = by_id(await page(http, "/console/callbacks"), "callbacks")
            row = listing.one("tr", **{"data-callback": "deployer"})
            counts = [row.cell(name) for name in ("matched", "replies", "matched-per-minute", "replies-per-minute")]
            assert counts == ["3", "3", "3", "3"]
            p50, p99 = (int(row.cell(name).removesuffix(" ms")) for name in ("p50", "p99"))
            assert DELAY * 1000 <= p50 <= p99
            assert row.one("a", class_="detail").attrs["href"] == "/console/callbacks/deployer"

            detail = await page(http, "/console/callbacks/deployer")
            assert by_id(detail, "callback-id").text == "deployer"
            assert by_id(detail, "kind").text == "dialled in"
            assert (by_id(detail, "matched").text, by_id(detail, "replies").text) == ("3", "3")
            assert by_id(detail, "latency-p50").text == f"{p50} ms"
            assert by_id(detail, "latency-p99").text == f"{p99} ms"
            peers = [r.cell("peer") for r in by_id(detail, "replicas").find("tr", class_="replica")]
            assert len(peers) == 2
            assert all("127.0.0.1:" in peer for peer in peers), peers
            routes = by_id(detail, "routes")
            declared = routes.one("tr", **{"data-route": "deploy"})
            assert declared.cell("pattern") == r"^deploy (?P<what>\w+)$"
            assert declared.cell("help") == "deploy <what> - ships it"
            configured = routes.one("tr", **{"data-route": "status"})  # the operator's, from the config
            assert (configured.cell("help"), configured.cell("permission")) == ("status - what is deployed", "viewer")
            hourly = by_id(detail, "schedules").one("tr", **{"data-schedule": "hourly"})
            assert hourly.cell("when") == "every 3600 s"
            webhook = by_id(detail, "webhooks").one("tr", class_="webhook")
            assert (webhook.cell("method"), webhook.cell("path")) == ("POST", "/hooks/deployer/ci")
            assert webhook.cell("help") == "CI finished a build"
            assert SECRET not in (await http.get("/console/callbacks/deployer")).text

        launched = await page(http, "/console/callbacks/example")
        assert by_id(launched, "kind").text == "launched"
        assert by_id(launched, "restarts").text == "0"
        assert by_id(launched, "last-error").text == "none"
        assert {r.attrs["data-route"] for r in by_id(launched, "routes").find("tr", **{"data-route": "ping"})}
        missing = await http.get("/console/callbacks/nobody")
        assert missing.status_code == 404
        assert "no callback 'nobody'" in by_id(parse(missing.text), "error").text


# -- live ---------------------------------------------------------------------------------


class EventReader:
    """A server-sent event stream read over a plain socket, as a browser's EventSource
    would (HTTP/1.0, so the body is the rest of the connection): closing it is the
    client going away."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = b""
        self.status = 0
        self.headers: dict[str, str] = {}

    async def line(self) -> str | None:
        """The next line, or None at the end of the stream."""
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode().removesuffix("\r")

    async def head(self) -> None:
        status = await self.line()
        assert status is not None
        self.status = int(status.split()[1])
        while header := await self.line():
            name, _, value = header.partition(":")
            self.headers[name.lower()] = value.strip()

    async def event(self) -> tuple[str, dict[str, object]] | None:
        """The next named event as (name, JSON data), or None at the end."""
        name, data = "", []
        while (line := await self.line()) is not None:
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data.append(line.removeprefix("data: "))
            elif not line and name:
                return name, json.loads("\n".join(data))
        return None

    async def rest(self) -> bytes:
        """Everything until the server ends the stream."""
        while chunk := await self._stream.receive_some():
            self._buffer += chunk
        return self._buffer


@asynccontextmanager
async def live_stream(running: RunningBot, http: httpx.AsyncClient, query: str) -> AsyncIterator[EventReader]:
    host, _, port = running.bot.http_address.rpartition(":")
    cookie = http.cookies["oco_console"]
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        request = (
            f"GET /console/live/stream?{query} HTTP/1.0\r\nHost: {running.bot.http_address}\r\n"
            f"Cookie: oco_console={cookie}\r\nAccept: text/event-stream\r\n\r\n"
        )
        await stream.send_all(request.encode())
        reader = EventReader(stream)
        await reader.head()
        assert reader.status == 200
        assert reader.headers["content-type"].startswith("text/event-stream")
        yield reader


async def test_the_live_stream_sends_each_message_then_its_reply(tmp_path: Path) -> None:
    async with console_bot(config(tmp_path)) as (running, http), serving(deployer(running)):
        await deploy(running, "api")
        live = await page(http, "/console/live")
        table = by_id(live, "live")
        assert table.attrs["data-last"] == "1"
        (row,) = by_id(live, "live-rows").find("tr", class_="live-message")
        assert [row.cell(c) for c in ("adapter", "room", "user", "route", "callback", "body")] == [
            "memory",
            "memory/general",
            "memory/alice",
            "deploy",
            "deployer",
            "hidden",
        ]
        assert int(row.cell("duration").removesuffix(" ms")) >= DELAY * 1000
        assert live.find("script", src="/console/static/live.js")
        assert (await http.get("/console/static/live.js")).status_code == 200

        feed = running.bot.core.activity.live
        assert feed is not None
        with trio.fail_after(10):
            async with live_stream(running, http, "after=1") as stream:
                while not feed.watchers:
                    await trio.sleep(0.01)
                await running.adapter.inject("oco deploy web", user="bob", room="general")
                kind, message = await stream.event() or ("", {})
                assert kind == "message"
                assert (message["id"], message["user"], message["route"]) == (2, "memory/bob", "deploy")
                assert (message["duration_ms"], message["body"]) == (None, "hidden")
                kind, reply = await stream.event() or ("", {})
                assert (kind, reply["id"]) == ("reply", 2)
                assert isinstance(reply["duration_ms"], int)
                assert reply["duration_ms"] >= DELAY * 1000
            # The client went away: the bot stops watching for it.
            while feed.watchers:
                await trio.sleep(0.02)


async def test_bodies_show_only_when_configured_and_streams_end_with_the_bot(tmp_path: Path) -> None:
    async with console_bot(config(tmp_path, "{show_bodies: true}")) as (running, http):
        async with serving(deployer(running)):
            await deploy(running, "api")
            (row,) = by_id(await page(http, "/console/live"), "live-rows").find("tr", class_="live-message")
            assert row.cell("body") == "oco deploy api"
            feed = running.bot.core.activity.live
            assert feed is not None
            with trio.fail_after(15):
                # A stream from before the message gets it first, then follows until the bot stops.
                async with live_stream(running, http, "after=0") as stream:
                    kind, data = await stream.event() or ("", {})
                    assert (kind, data["body"]) == ("message", "oco deploy api")
                    running.bot.shutdown()
                    await stream.rest()
            assert feed.watchers == 0
