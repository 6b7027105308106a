"""Test helpers for people who build on OCO: an in-memory chat adapter, a bot runner,
and a recording host for adapter tests (the adapter contract suite is in
:mod:`oco_core.testing.adapter_contract`, the store contract in
:mod:`oco_core.testing.store_contract`).

:class:`MemoryAdapter` is also registered as the ``memory`` adapter plugin, so a config
with ``adapters: [{type: memory}]`` runs a bot with no chat service, for tests and
benchmarks::

    async with open_bot("adapters: [{type: memory}]\\ncallbacks: []") as running:
        await running.adapter.inject("oco ping")
        reply = await running.adapter.next_sent()
"""

from __future__ import annotations

import functools
import operator
import typing
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import trio
from pydantic import BaseModel, ConfigDict, Field

from .._adapter import (
    Adapter,
    AdapterHost,
    AdapterType,
    Attachment,
    ChatRoom,
    ChatUser,
    Feature,
    IncomingMessage,
    MembershipEvent,
    MembershipKind,
    OutgoingMessage,
    ReactionEvent,
)
from .._errors import RequestTooLargeError, UnknownTargetError
from .._hookspecs import hookimpl
from ._chat import ControlChat as ControlChat
from ._host import RecordingHost as RecordingHost
from ._memory_store import MemoryStore as MemoryStore
from ._process import Lines as Lines
from ._process import OcoProcess as OcoProcess
from ._process import free_port as free_port
from ._process import oco_cli as oco_cli
from ._process import run_oco as run_oco

if TYPE_CHECKING:
    from .._bot import Bot
    from .._sdk import Callback


def _person(user: str) -> ChatUser:
    """A user of the memory chat service: "alice" is called Alice."""
    return ChatUser(id=user, name=user.title(), mention_name=user)


_FeatureName = Literal["threads", "attachments", "edits", "reactions", "typing"]


class MemoryConfig(BaseModel):
    """Options of the memory adapter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rooms: list[str] = Field(default_factory=lambda: ["general"], description="Rooms the bot is in at start.")
    users: list[str] = Field(default_factory=lambda: ["alice", "bob"], description="Users that exist.")
    control: str | None = Field(
        default=None,
        pattern=r"^\S+:\d+$",
        description="host:port for the test-only control service (oco.MemoryControl, see _control.py); off if unset.",
    )
    control_address_file: Path | None = Field(default=None, description="Where to write the control service's address.")
    features: list[_FeatureName] = Field(
        default_factory=lambda: list(typing.get_args(_FeatureName)),
        description="The rich replies it takes as they are; the bot turns the others into text first.",
    )


class MemoryAdapter(Adapter):
    """A chat service that lives in memory: tests inject messages and read what was sent."""

    def __init__(self, config: MemoryConfig | None = None) -> None:
        self.config = config or MemoryConfig()
        self.rooms = set(self.config.rooms)
        self.users = set(self.config.users)
        self.sent: list[OutgoingMessage] = []
        #: The id :meth:`send` gave each message of ``sent`` ("m1", "m2"...).
        self.sent_ids: list[str] = []
        #: The files people sent (injected with data), by url: what fetch_attachment serves.
        self.files: dict[str, tuple[bytes, str]] = {}
        self.features = functools.reduce(
            operator.or_, (Feature[name.upper()] for name in self.config.features), Feature.NONE
        )
        self._read = 0
        self._more = trio.Event()
        self.host: AdapterHost | None = None
        self._ready = trio.Event()

    async def run(self, host: AdapterHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.host = host
        self._ready.set()
        async with trio.open_nursery() as nursery:
            if self.config.control is not None:
                from ._control import serve_control

                await nursery.start(serve_control, self, self.config.control, self.config.control_address_file)
            task_status.started()
            await trio.sleep_forever()

    async def inject(
        self,
        body: str,
        *,
        user: str = "alice",
        room: str | None = "general",
        direct: bool = False,
        id: str = "",
        edit_of: str = "",
        thread_id: str = "",
        attachments: Sequence[Attachment] = (),
    ) -> None:
        """Deliver a message from ``user`` in ``room`` (None: a private message); with
        ``edit_of``, an edit of that message."""
        await self._ready.wait()
        assert self.host is not None
        self.users.add(user)
        for attachment in attachments:
            if attachment.url and attachment.data:
                self.files[attachment.url] = (attachment.data, attachment.media_type)
        message = IncomingMessage(
            body=body,
            user=_person(user),
            room=ChatRoom(id=room, name=room) if room is not None else None,
            direct=direct or room is None,
            id=id,
            edit_of=edit_of,
            thread_id=thread_id,
            attachments=tuple(attachments),
        )
        await self.host.receive(message)

    async def react(self, key: str, message_id: str, *, user: str = "alice", room: str | None = "general") -> None:
        """Report that ``user`` reacted with ``key`` to the message ``message_id``."""
        await self._ready.wait()
        assert self.host is not None
        self.users.add(user)
        await self.host.reaction(
            ReactionEvent(
                message_id=message_id,
                key=key,
                user=_person(user),
                room=ChatRoom(id=room, name=room) if room is not None else None,
            )
        )

    async def member(
        self, kind: MembershipKind, user: str, room: str = "general", *, previous: str | None = None
    ) -> None:
        """Report that ``user`` entered or left ``room`` (or, ``RENAMED``, was ``previous``)."""
        await self._ready.wait()
        assert self.host is not None
        old = _person(previous) if previous is not None else None
        await self.host.membership(MembershipEvent(kind, _person(user), ChatRoom(room, room), previous=old))

    async def next_sent(self) -> OutgoingMessage:
        """Wait for the next message the bot sends (the first not returned before)."""
        while self._read >= len(self.sent):
            await self._more.wait()
            self._more = trio.Event()
        self._read += 1
        return self.sent[self._read - 1]

    async def send(self, message: OutgoingMessage) -> str:
        if message.room_id is not None and message.room_id not in self.rooms:
            raise UnknownTargetError(f"no room {message.room_id!r} (rooms: {', '.join(sorted(self.rooms))})")
        if message.room_id is None and (message.user is None or message.user.id not in self.users):
            who = message.user.id if message.user else None
            raise UnknownTargetError(f"no user {who!r} to send a private message to")
        if message.edit_of and message.edit_of not in self.sent_ids:
            raise UnknownTargetError(f"no message {message.edit_of!r} of the bot's to edit")
        self.sent.append(message)
        self.sent_ids.append(f"m{len(self.sent)}")
        self._more.set()
        return self.sent_ids[-1]

    async def fetch_attachment(self, url: str, max_bytes: int) -> tuple[bytes, str]:
        if url not in self.files:
            raise UnknownTargetError(f"no file at {url!r}")
        data, media_type = self.files[url]
        if len(data) > max_bytes:
            raise RequestTooLargeError(f"the file is {len(data)} bytes; at most {max_bytes} are fetched")
        return data, media_type

    async def join(self, room: str) -> None:
        self.rooms.add(room)

    async def part(self, room: str) -> None:
        if room not in self.rooms:
            raise UnknownTargetError(f"the bot is not in {room!r}")
        self.rooms.discard(room)


@dataclass
class RunningBot:
    """A bot started by :func:`open_bot`."""

    #: The bot itself.
    bot: Bot
    #: The gRPC address it serves.
    address: str
    #: Its adapters by instance name (``name:`` in the config, by default the type).
    adapters: dict[str, Adapter]
    #: The launched and configured callbacks' secrets, by callback id.
    secrets: dict[str, str]

    @property
    def adapter(self) -> MemoryAdapter:
        """The first memory adapter; :class:`LookupError` when the config has none."""
        for adapter in self.adapters.values():
            if isinstance(adapter, MemoryAdapter):
                return adapter
        names = ", ".join(f"{name} ({type(a).__name__})" for name, a in self.adapters.items()) or "none"
        raise LookupError(f"this bot has no memory adapter (its adapters: {names}); use running.adapters[name] instead")


@asynccontextmanager
async def open_bot(config_text: str, *, plugins: object | None = None) -> AsyncIterator[RunningBot]:
    """Run a bot in this trio process from YAML ``config_text`` (gRPC on a free port
    unless the config says otherwise) and enter once it is up.

    Any adapter works (an IRC adapter against a test server, say): ``.adapters`` holds
    them by instance name, and ``.adapter`` is the first memory adapter, for tests that
    inject messages. The bot stops when the block ends."""
    from .._bot import Bot
    from .._config import parse_config
    from .._plugins import Plugins, load_plugins

    loaded = parse_config(config_text, "<test config>")
    if "listen" not in loaded.config.grpc.model_fields_set:
        config = loaded.config.model_copy(
            update={"grpc": loaded.config.grpc.model_copy(update={"listen": "127.0.0.1:0"})}
        )
        loaded = type(loaded)(config, loaded.source, loaded.lines)
    bot = Bot(loaded, plugins if isinstance(plugins, Plugins) else load_plugins())
    async with trio.open_nursery() as nursery:
        address = await nursery.start(bot.run)
        adapters = {name: link.adapter for name, link in bot.core.links.items()}
        yield RunningBot(bot, address, adapters, {cid: cb.secret for cid, cb in bot.callbacks.items()})
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def serving(*callbacks: Callback) -> AsyncIterator[None]:
    """Serve SDK callbacks in this trio process for the block: entered once each has
    opened its Listen stream (its routes are live), cancelled when the block ends."""
    async with trio.open_nursery() as nursery:
        for callback in callbacks:
            await nursery.start(callback.serve)
        yield
        nursery.cancel_scope.cancel()


@hookimpl
def oco_adapter_types() -> list[AdapterType]:
    """The memory adapter."""
    return [
        AdapterType(
            name="memory",
            create=MemoryAdapter,
            config_model=MemoryConfig,
            description="an in-memory chat service for tests and benchmarks",
        )
    ]


__all__: Sequence[str] = [
    "ControlChat",
    "Lines",
    "MemoryAdapter",
    "MemoryConfig",
    "MemoryStore",
    "OcoProcess",
    "RecordingHost",
    "RunningBot",
    "free_port",
    "oco_cli",
    "open_bot",
    "run_oco",
    "serving",
]
