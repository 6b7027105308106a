"""Plugins: hooks are documented, built-ins come through the same entry points as
third-party plugins, a misspelt hook fails loudly, and several adapters run side by side.

Every hook in oco_core/_hookspecs.py has a test here named ``test_hook_<hook>`` that
runs a bot with a third party's plugin implementing it (tests/test_docs.py checks).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import entry_points
from typing import Any

import pluggy
import pytest
import trio
from pydantic import BaseModel, ConfigDict

import oco_core.testing
from oco_core import Callback, ConfigError, Message, PluginError, StoreError, ValueTooLargeError
from oco_core import _hookspecs as hookspecs
from oco_core._admin import configured_store
from oco_core._bot import Bot
from oco_core._cli import _load_plugins
from oco_core._config import parse_config
from oco_core._plugins import Plugins, load_plugins
from oco_core._quota import measure_usage
from oco_core.plugin import (
    DataStoreAccess,
    DataStoreProvider,
    DataStoreType,
    OutgoingMessage,
    Store,
    StoreType,
    check_value,
    corner_name,
    hookimpl,
    mask_url,
)
from oco_core.testing import MemoryAdapter, MemoryStore, RunningBot, open_bot, serving

SECRET_A = "secret-plugins-0123456789abcdef"


def sdk(running: RunningBot) -> Callback:
    """The callback ``alpha`` that the configs below declare, dialling ``running``."""
    return Callback(id="alpha", secret=SECRET_A, address=running.address)


def manager_with(*plugins: object) -> pluggy.PluginManager:
    """A fresh plugin manager holding only ``plugins`` (as a bot whose only installed
    distributions were these would have)."""
    manager = pluggy.PluginManager("oco")
    manager.add_hookspecs(hookspecs)
    for plugin in plugins:
        manager.register(plugin, name=type(plugin).__name__)
    return manager


class NotebookConfig(BaseModel):
    """Options of the test's third-party store."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_value_bytes: int = 1024


class NotebookPlugin:
    """A third party's store plugin: a memory store the test can look into."""

    def __init__(self, *, default: bool = False) -> None:
        self.default = default
        self.opened: list[NotebookConfig] = []
        self.store = MemoryStore()

    @asynccontextmanager
    async def open(self, config: NotebookConfig) -> AsyncIterator[Store]:
        self.opened.append(config)
        self.store.max_value_bytes = config.max_value_bytes
        yield self.store

    @hookimpl
    def oco_store_types(self) -> list[StoreType]:
        return [StoreType(name="notebook", open=self.open, config_model=NotebookConfig, default=self.default)]


class MemoryPlugin:
    """The memory adapter on its own (the oco_core.testing module also offers nothing else)."""

    @hookimpl
    def oco_adapter_types(self) -> list[Any]:
        return oco_core.testing.oco_adapter_types()


def test_every_hook_is_documented_and_named_for_the_host() -> None:
    hooks = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("oco_")]
    assert {h.__name__ for h in hooks} == {"oco_adapter_types", "oco_datastore_types", "oco_store_types"}
    for hook in hooks:
        assert hook.__doc__, f"{hook.__name__} needs a docstring"
        assert "Called" in hook.__doc__, f"{hook.__name__} must say when it is called"


def test_built_ins_register_through_the_oco_entry_points() -> None:
    names = {ep.name: ep.value for ep in entry_points(group="oco")}
    assert names["shell"] == "oco_core._shell"
    assert names["memory"] == "oco_core.testing"
    assert names["sql"] == "oco_core._sql_store"
    plugins = load_plugins()
    assert {"shell", "memory"} <= set(plugins.adapters)
    assert "sql" in plugins.stores


def test_an_unknown_type_lists_what_is_installed_and_how_to_get_more() -> None:
    plugins = load_plugins()
    with pytest.raises(ConfigError) as caught:
        plugins.adapter("slack")
    message = str(caught.value)
    assert "unknown adapter type 'slack'" in message
    assert "shell" in message
    assert "memory" in message
    assert "pip install oco-adapter-slack" in message


async def test_replies_go_back_through_the_adapter_the_message_came_from(tmp_path: Any) -> None:
    config = f"""
adapters:
  - {{type: memory, name: left, rooms: [lobby]}}
  - {{type: memory, name: right, rooms: [lobby]}}
store: {{url: "sqlite:///{tmp_path}/oco.db"}}
callbacks: [{{id: alpha, secret: {SECRET_A}}}]
"""
    async with open_bot(config) as running:
        left = running.adapters["left"]
        right = running.adapters["right"]
        assert isinstance(left, MemoryAdapter)
        assert isinstance(right, MemoryAdapter)
        cb = sdk(running)

        @cb.respond("^where$")
        async def where(message: Message) -> None:
            assert message.room is not None
            await message.send(f"{message.user.id} in {message.room.id}")

        async with serving(cb):
            await right.inject("oco where", user="alice", room="lobby")
            with trio.fail_after(10):
                sent = await right.next_sent()
            assert sent.body == "right/alice in right/lobby"
            await left.inject("oco where", user="alice", room="lobby")
            with trio.fail_after(10):
                sent = await left.next_sent()
            assert sent.body == "left/alice in left/lobby"
            assert [m.body for m in right.sent] == ["right/alice in right/lobby"]


# ---- each hook, implemented by a third party ----


class ParrotAdapter(MemoryAdapter):
    """A third party's adapter: the memory adapter under another name."""


class ParrotPlugin:
    def __init__(self, default: bool = False) -> None:
        self.default = default

    @hookimpl
    def oco_adapter_types(self) -> list[Any]:
        [memory] = oco_core.testing.oco_adapter_types()
        return [
            type(memory)(
                name="parrot",
                create=ParrotAdapter,
                config_model=memory.config_model,
                package="oco-adapter-parrot",
                default=self.default,
            )
        ]


async def hello_through_parrot(running: RunningBot, room: str = "general") -> OutgoingMessage:
    """Say ``oco hello`` on the bot's parrot adapter, answered by a callback; what the bot sent back."""
    parrot = running.adapters["parrot"]
    assert isinstance(parrot, ParrotAdapter)
    cb = sdk(running)

    @cb.respond("^hello$")
    async def hello(message: Message) -> None:
        await message.reply("hello yourself")

    async with serving(cb):
        await parrot.inject("oco hello", room=room)
        with trio.fail_after(10):
            return await parrot.next_sent()


async def test_hook_oco_adapter_types(tmp_path: Any) -> None:
    """An adapter type offered by a plugin is chosen by ``type:`` and carries chat."""
    plugins = load_plugins(manager_with(ParrotPlugin(), NotebookPlugin(default=True)))
    assert set(plugins.adapters) == {"parrot"}
    config = f"adapters: [{{type: parrot, rooms: [perch]}}]\ncallbacks: [{{id: alpha, secret: {SECRET_A}}}]\n"
    async with open_bot(config, plugins=plugins) as running:
        sent = await hello_through_parrot(running, room="perch")
    assert sent.body.endswith("hello yourself")
    assert sent.room_id == "perch"


class CouchConfig(BaseModel):
    admin_url: str = "http://couch.invalid"


class CouchProvider(DataStoreProvider):
    """A third party's data store that provisions in memory."""

    def __init__(self) -> None:
        self.granted: dict[str, str] = {}

    async def provision(self, callback_id: str, password: str, *, rotated: bool = False) -> DataStoreAccess:
        self.granted[callback_id] = password
        name = corner_name(callback_id)
        return DataStoreAccess(url=f"couch://{name}:{password}@couch/{name}", namespace=name)

    async def revoke(self, callback_id: str, *, drop_data: bool = False) -> None:
        self.granted.pop(callback_id, None)


class CouchPlugin:
    def __init__(self) -> None:
        self.provider = CouchProvider()

    @hookimpl
    def oco_datastore_types(self) -> list[DataStoreType]:
        @asynccontextmanager
        async def open_couch(config: CouchConfig) -> AsyncIterator[DataStoreProvider]:
            yield self.provider

        return [DataStoreType(name="couchdb", open=open_couch, config_model=CouchConfig, package="oco-datastore-couch")]


async def test_hook_oco_datastore_types() -> None:
    """A data-store type offered by a plugin is found by name and opens a provider."""
    couch = CouchPlugin()
    plugins = load_plugins(manager_with(MemoryPlugin(), couch))
    offered = plugins.datastore("couchdb")
    assert offered.package == "oco-datastore-couch"
    async with offered.open(offered.config_model()) as provider:
        access = await provider.provision("Deploy.bot", "pw")
    assert access.namespace.startswith("oco_cb_deploy_bot_")
    # An id that spells out another's corner name still gets a corner of its own.
    assert corner_name(access.namespace.removeprefix("oco_cb_")) != access.namespace
    assert len(corner_name("x" * 64)) <= 63
    assert couch.provider.granted == {"Deploy.bot": "pw"}
    with pytest.raises(ConfigError, match=r"unknown data store type 'mongo'.*pip install oco-datastore-mongo"):
        plugins.datastore("mongo")


async def test_hook_oco_store_types() -> None:
    """A store type offered by a plugin is opened with its validated options, and a
    callback's writes land in it."""
    notebook = NotebookPlugin()
    plugins = load_plugins(manager_with(MemoryPlugin(), notebook))
    config = f"""
adapters: [{{type: memory}}]
store: {{type: notebook, max_value_bytes: 16}}
callbacks: [{{id: alpha, secret: {SECRET_A}}}]
"""
    async with open_bot(config, plugins=plugins) as running:
        cb = sdk(running)
        async with serving(cb):
            await cb.storage.set("diary", b"dear diary")
            with pytest.raises(ValueTooLargeError):
                await cb.storage.set("essay", b"x" * 17)
    assert notebook.opened == [NotebookConfig(max_value_bytes=16)]
    found = await notebook.store.get("cb:alpha", "diary")
    assert found is not None
    assert found.value == b"dear diary"


# ---- no built-in is privileged ----


async def test_a_third_party_default_store_is_used_when_the_config_names_none() -> None:
    notebook = NotebookPlugin(default=True)
    plugins = load_plugins(manager_with(MemoryPlugin(), notebook))
    config = f"adapters: [{{type: memory}}]\ncallbacks: [{{id: alpha, secret: {SECRET_A}}}]\n"
    store_type, _ = configured_store(parse_config(config), plugins)
    assert store_type.name == "notebook"
    async with open_bot(config, plugins=plugins) as running:
        cb = sdk(running)
        async with serving(cb):
            await cb.storage.set("k", b"v")
    assert await notebook.store.get("cb:alpha", "k") is not None


def test_without_a_default_store_the_config_must_name_one() -> None:
    plugins = load_plugins(manager_with(MemoryPlugin(), NotebookPlugin(default=False)))
    with pytest.raises(ConfigError) as caught:
        configured_store(parse_config("bot: {name: oco}\n", "oco.yaml"), plugins)
    message = str(caught.value)
    assert "oco.yaml" in message
    assert "store.type" in message
    assert "no installed store plugin offers a default" in message
    assert "set store: {type: ...} (installed: notebook)" in message
    # Naming it is enough.
    store_type, options = configured_store(parse_config("store: {type: notebook}\n"), plugins)
    assert store_type.name == "notebook"
    assert options == NotebookConfig()


def test_two_default_stores_are_an_error_that_asks_for_a_type() -> None:
    plugins = load_plugins(manager_with(NotebookPlugin(default=True)))
    sql_default = load_plugins().stores["sql"]
    both = Plugins(plugins.adapters, {**plugins.stores, "sql": sql_default})
    with pytest.raises(ConfigError, match=r"several installed store plugins offer a default \(notebook, sql\)"):
        configured_store(parse_config("bot: {name: oco}\n"), both)


async def test_a_third_party_default_adapter_runs_when_the_config_has_no_adapters() -> None:
    plugins = load_plugins(manager_with(ParrotPlugin(default=True), MemoryPlugin(), NotebookPlugin(default=True)))
    async with open_bot(f"callbacks: [{{id: alpha, secret: {SECRET_A}}}]\n", plugins=plugins) as running:
        assert (await hello_through_parrot(running)).body.endswith("hello yourself")


def test_without_a_default_adapter_the_config_must_list_adapters() -> None:
    plugins = load_plugins(manager_with(ParrotPlugin(), MemoryPlugin(), NotebookPlugin(default=True)))
    with pytest.raises(ConfigError) as caught:
        Bot(parse_config("bot: {name: oco}\n", "oco.yaml"), plugins)
    message = str(caught.value)
    assert "oco.yaml" in message
    assert "no installed adapter plugin offers a default" in message
    assert "set adapters: [{type: ...}] (installed: memory, parrot)" in message
    two = load_plugins(manager_with(ParrotPlugin(default=True), NotebookPlugin(default=True)))
    both = Plugins({**two.adapters, "shell": load_plugins().adapters["shell"]}, two.stores)
    with pytest.raises(ConfigError, match=r"several installed adapter plugins offer a default \(parrot, shell\)"):
        Bot(parse_config("bot: {name: oco}\n"), both)


def test_the_built_in_shell_adapter_is_the_default_by_declaring_it() -> None:
    plugins = load_plugins()
    assert [name for name, kind in plugins.adapters.items() if kind.default] == ["shell"]
    bot = Bot(parse_config("callbacks: []\n"), plugins)
    assert [(a.instance_name, a.type) for a in bot.adapter_entries] == [("shell", "shell")]


def test_the_built_in_sql_store_is_the_default_by_declaring_it(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    store_type, options = configured_store(parse_config("bot: {name: oco}\n"), load_plugins())
    assert store_type.name == "sql"
    assert store_type.default
    assert options.model_dump()["url"] == f"sqlite:///{tmp_path}/xdg/oco/oco.db"
    # The config's own keys win over the plugin's default options.
    _, options = configured_store(parse_config("store: {url: 'sqlite://'}\n"), load_plugins())
    assert options.model_dump()["url"] == "sqlite://"


def test_missing_plugin_hints_come_from_the_naming_convention_alone() -> None:
    nothing = Plugins({}, {})
    with pytest.raises(ConfigError, match="pip install oco-adapter-irc"):
        nothing.adapter("irc")
    with pytest.raises(ConfigError, match="pip install oco-adapter-zulip"):
        nothing.adapter("zulip")
    with pytest.raises(ConfigError, match="pip install oco-store-mongo"):
        nothing.store("mongo")


class ChattyPlugin:
    """An adapter whose library logs every frame at INFO, as nio and httpx do."""

    @hookimpl
    def oco_adapter_types(self) -> list[Any]:
        [memory] = oco_core.testing.oco_adapter_types()
        return [dataclasses.replace(memory, name="chatty", noisy_loggers=("oco-test.chatty-library",))]


def test_plugins_name_their_own_noisy_loggers() -> None:
    """The CLI quiets the loggers installed plugins name, and only without --debug."""
    chatty = logging.getLogger("oco-test.chatty-library")
    try:
        plugins = _load_plugins(debug=True, manager=manager_with(ChattyPlugin()))
        assert plugins.noisy_loggers() == {"oco-test.chatty-library"}
        assert chatty.level == logging.NOTSET
        _load_plugins(debug=False, manager=manager_with(ChattyPlugin()))
        assert chatty.level == logging.WARNING
    finally:
        chatty.setLevel(logging.NOTSET)
    assert load_plugins(manager_with(MemoryPlugin(), NotebookPlugin())).noisy_loggers() == set()


# ---- plugin contracts enforced ----


class MisspeltPlugin:
    @hookimpl
    def oco_adapter_type(self) -> list[Any]:  # the real hook is oco_adapter_types
        return []


def test_a_misspelt_hook_fails_loudly() -> None:
    with pytest.raises(PluginError) as caught:
        load_plugins(manager_with(MemoryPlugin(), MisspeltPlugin()))
    message = str(caught.value)
    assert "plugin 'MisspeltPlugin' implements 'oco_adapter_type', which is not an OCO hook" in message
    assert "(did you mean 'oco_adapter_types'?)" in message
    assert (
        "OCO's hooks are oco_adapter_types, oco_datastore_types, oco_store_types: rename the @hookimpl function"
        in message
    )


def test_an_optional_hook_of_another_version_is_allowed() -> None:
    """A plugin may implement a hook from a newer oco-core if it marks it optional."""

    class Forward:
        @hookimpl(optionalhook=True)
        def oco_future_hook(self) -> None:
            pass

    plugins = load_plugins(manager_with(MemoryPlugin(), Forward()))
    assert set(plugins.adapters) == {"memory"}


# ---- what a store author gets from oco_core.plugin ----


def test_check_value_accepts_bytes_up_to_the_limit() -> None:
    assert check_value(bytearray(b"abcd"), 4) == b"abcd"
    assert type(check_value(memoryview(b"ab"), 4)) is bytes
    with pytest.raises(ValueTooLargeError, match="value is 5 bytes; the store's limit \\(max_value_bytes\\) is 4"):
        check_value(b"abcde", 4)
    with pytest.raises(StoreError, match="a value must be bytes, not str"):
        check_value("text", 4)  # type: ignore[arg-type]


def test_mask_url_hides_only_the_password() -> None:
    assert mask_url("redis://bot:s3cret@redis.example:6380/2") == "redis://bot:***@redis.example:6380/2"
    assert mask_url("postgresql+psycopg://oco:pa@ss@db/oco?sslmode=require") == (
        "postgresql+psycopg://oco:***@db/oco?sslmode=require"
    )
    assert mask_url("redis://:s3cret@[::1]:6379/0") == "redis://:***@[::1]:6379/0"
    assert mask_url("sqlite:////var/lib/oco/oco.db") == "sqlite:////var/lib/oco/oco.db"
    assert mask_url("redis://u:s3cret@h:notaport/0") == "<unparseable URL>"


class ListOnlyStore(MemoryStore):
    """A store that cannot count: the Store ABC's own usage()."""

    async def usage(self, namespace: str) -> tuple[int, int] | None:
        return await Store.usage(self, namespace)


async def test_usage_is_optional_and_quotas_count_by_listing_without_it() -> None:
    store = ListOnlyStore()
    assert await store.usage("cb:q") is None
    await store.set("cb:q", "ab", b"12345")
    await store.set("cb:q", "é", b"xyz")
    usage = await measure_usage(store, "cb:q")
    assert (usage.keys, usage.bytes) == (2, 2 + 5 + 2 + 3)
