"""The adapter's parts that need no server: config, the outbox, the plugin (its backoff and
token bucket are oco-core's, tested in its tests/test_timing.py)."""

from __future__ import annotations

import importlib.metadata

import oco_adapter_irc
import pluggy
import pytest
from oco_adapter_irc import IrcAdapter, IrcConfig
from pydantic import ValidationError

from oco_core import AdapterError, UnknownTargetError
from oco_core.plugin import ChatUser, OutgoingMessage


def test_config_defaults_and_shorthands() -> None:
    config = IrcConfig.model_validate(
        {"host": "irc.example.org", "nick": "oco", "channels": ["#a", {"name": "#b", "key": "k"}]}
    )
    assert config.effective_port == 6697
    assert config.tls
    assert config.tls_verify
    assert config.effective_username == "oco"
    assert [c.name for c in config.channels] == ["#a", "#b"]
    plain = IrcConfig.model_validate({"host": "h", "nick": "oco", "tls": False, "command_prefix": "!"})
    assert plain.effective_port == 6667
    assert plain.command_prefix == ["!"]


def test_config_hides_secrets() -> None:
    config = IrcConfig.model_validate(
        {
            "host": "h",
            "nick": "oco",
            "password": "server-secret",
            "sasl": {"account": "oco", "password": "sasl-secret"},
            "nickserv_password": "ns-secret",
            "channels": [{"name": "#k", "key": "key-secret"}],
        }
    )
    shown = repr(config) + str(config)
    for secret in ("server-secret", "sasl-secret", "ns-secret", "key-secret"):
        assert secret not in shown
    with pytest.raises(ValidationError) as caught:
        IrcConfig.model_validate({"host": "h", "nick": "oco", "password": "hunter2\nQUIT"})
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"nick": "1oco"}, "not a valid IRC nick"),
        ({"nick": "oco bot"}, "not a valid IRC nick"),
        ({"alt_nicks": ["ok", "not ok"]}, "not a valid IRC nick"),
        ({"channels": ["ops"]}, "not a channel name"),
        ({"channels": ["#a,#b"]}, "not a channel name"),
        ({"colour": "blue"}, "Extra inputs are not permitted"),
        ({"rate_limit": {"burst": 0}}, "greater than or equal to 1"),
        ({"reconnect": {"initial_delay": 10, "max_delay": 1}}, "must not exceed"),
        ({"host": "a b"}, "without spaces"),
        ({"port": 70000}, "less than or equal to 65535"),
        ({"password": "a\r\nQUIT"}, "without line breaks"),
        ({"nickserv_password": ""}, "must be non-empty"),
        ({"sasl": {"account": "a", "password": "p\n"}}, "without line breaks"),
        ({"channels": [{"name": "#k", "key": "two words"}]}, "spaces or commas"),
    ],
)
def test_config_errors_name_the_problem(options: dict[str, object], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        IrcConfig.model_validate({"host": "h", "nick": "oco", **options})


def _adapter(**options: object) -> IrcAdapter:
    return IrcAdapter(IrcConfig.model_validate({"host": "h", "nick": "oco", **options}))


async def test_send_while_disconnected_queues_whole_messages_in_order() -> None:
    adapter = _adapter(queue_size=5)
    await adapter.send(OutgoingMessage(body="one\ntwo", room_id="#ops"))
    await adapter.send(OutgoingMessage(body="three", user=ChatUser(id="alice", mention_name="Alice"), private=True))
    assert list(adapter._outbox) == ["PRIVMSG #ops :one", "PRIVMSG #ops :two", "PRIVMSG Alice :three"]
    with pytest.raises(AdapterError, match="queue is full"):
        await adapter.send(OutgoingMessage(body="a\nb\nc", room_id="#ops"))  # 3 lines: none are queued
    assert adapter.statistics().queued_lines == 3
    await adapter.send(OutgoingMessage(body="four\nfive", room_id="#ops"))
    assert adapter.statistics().queued_lines == 5
    assert not adapter.statistics().connected


async def test_send_mention_and_targets() -> None:
    adapter = _adapter()
    alice = ChatUser(id="alice", name="Alice A.", mention_name="alice")
    await adapter.send(OutgoingMessage(body="done\nreally", room_id="#ops", user=alice, mention=True))
    await adapter.send(OutgoingMessage(body="psst", room_id="#ops", user=alice, private=True))
    await adapter.send(OutgoingMessage(body="waves", room_id="#ops", action=True))
    assert list(adapter._outbox) == [
        "PRIVMSG #ops :alice: done",
        "PRIVMSG #ops :really",
        "PRIVMSG alice :psst",
        "PRIVMSG #ops :\x01ACTION waves\x01",
    ]
    with pytest.raises(UnknownTargetError):
        await adapter.send(OutgoingMessage(body="nowhere"))
    with pytest.raises(UnknownTargetError):
        await adapter.send(OutgoingMessage(body="bad", room_id="#a b"))


async def test_join_and_part_need_channel_names() -> None:
    adapter = _adapter(channels=["#ops"])
    await adapter.join("#new")
    await adapter.part("#OPS")
    assert [name for name, _ in adapter._wanted.values()] == ["#new"]
    with pytest.raises(UnknownTargetError, match="not an IRC channel"):
        await adapter.join("alice")
    assert adapter.statistics().queued_lines == 0  # not connected: joined after registration


def test_public_names_are_exported_and_documented() -> None:
    for name in oco_adapter_irc.__all__:
        obj = getattr(oco_adapter_irc, name)
        assert obj.__doc__, name
    public = {n for n in dir(oco_adapter_irc) if not n.startswith("_")}
    assert public - {"annotations"} == set(oco_adapter_irc.__all__)


def test_entry_point_offers_the_irc_adapter_type() -> None:
    (entry,) = [e for e in importlib.metadata.entry_points(group="oco") if e.name == "irc"]
    assert entry.value == "oco_adapter_irc"
    manager = pluggy.PluginManager("oco")
    from oco_core import _hookspecs

    manager.add_hookspecs(_hookspecs)
    manager.register(entry.load())
    (types,) = manager.hook.oco_adapter_types()
    (irc,) = types
    assert irc.name == "irc"
    assert irc.config_model is IrcConfig
    assert irc.package == "oco-adapter-irc"
    assert isinstance(irc.create(IrcConfig(host="h", nick="oco")), IrcAdapter)
