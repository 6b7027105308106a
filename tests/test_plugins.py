"""Plugins: hooks are documented, built-ins come through the same entry points as
third-party plugins, and several adapters run side by side."""

from __future__ import annotations

import inspect
from importlib.metadata import entry_points
from typing import Any

import pytest
import trio

from oco_core import ConfigError, Message
from oco_core import _hookspecs as hookspecs
from oco_core._plugins import load_plugins
from oco_core.testing import MemoryAdapter, open_bot

from .test_api import SECRET_A, callback, sdk


def test_every_hook_is_documented_and_named_for_the_host() -> None:
    hooks = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("oco_")]
    assert {h.__name__ for h in hooks} == {"oco_adapter_types", "oco_store_types"}
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
        left = running.bot.links["left"].adapter  # type: ignore[attr-defined]
        right = running.bot.links["right"].adapter  # type: ignore[attr-defined]
        assert isinstance(left, MemoryAdapter)
        assert isinstance(right, MemoryAdapter)
        cb = sdk(running)

        @cb.respond("^where$")
        async def where(message: Message) -> None:
            assert message.room is not None
            await message.send(f"{message.user.id} in {message.room.id}")

        async with callback(running, cb):
            await right.inject("oco where", user="alice", room="lobby")
            with trio.fail_after(10):
                sent = await right.next_sent()
            assert sent.body == "right/alice in right/lobby"
            await left.inject("oco where", user="alice", room="lobby")
            with trio.fail_after(10):
                sent = await left.next_sent()
            assert sent.body == "left/alice in left/lobby"
            assert [m.body for m in right.sent] == ["right/alice in right/lobby"]
