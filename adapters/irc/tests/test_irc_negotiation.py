"""Registration logic fed line by line, for what ngircd cannot show: SASL (ngircd has
none), NickServ, servers without CAP, long runs of taken nicks, and garbage lines.

These drive the connection's line handler directly; no server is imitated beyond the
lines themselves, and everything that ngircd can do is tested against ngircd."""

from __future__ import annotations

import base64
from typing import Any

import pytest
import trio
from oco_adapter_irc import IrcAdapter, IrcConfig
from oco_adapter_irc._adapter import RegistrationRefusedError, _Connection
from oco_adapter_irc._protocol import parse_line

from oco_core.testing import RecordingHost


def _connection(nursery: trio.Nursery, **options: Any) -> tuple[_Connection, list[int]]:
    config = IrcConfig.model_validate({"host": "h", "nick": "oco", "tls": False, **options})
    registered: list[int] = []
    connection = _Connection(IrcAdapter(config), RecordingHost("irc"), lambda: registered.append(1))
    connection._nursery = nursery
    connection._register()
    return connection, registered


async def _feed(connection: _Connection, *lines: str) -> list[str]:
    connection._control.clear()
    for line in lines:
        await connection._handle(parse_line(line))
    return list(connection._control)


async def test_sasl_plain_then_nickserv_and_keyed_channels(nursery: trio.Nursery) -> None:
    connection, registered = _connection(
        nursery,
        sasl={"account": "acct", "password": "pw"},
        nickserv_password="nspw",
        channels=["#a", {"name": "#b", "key": "bkey"}],
        regain_nick_interval=0,
    )
    assert list(connection._control) == ["CAP LS 302", "NICK oco", "USER oco 0 * :OCO (OpenChatOps) bot"]
    assert await _feed(connection, ":srv CAP * LS * :multi-prefix") == []  # more to come
    assert await _feed(connection, ":srv CAP * LS :sasl=PLAIN,EXTERNAL") == ["CAP REQ :multi-prefix sasl"]
    assert await _feed(connection, ":srv CAP oco ACK :multi-prefix sasl") == ["AUTHENTICATE PLAIN"]
    (payload,) = await _feed(connection, "AUTHENTICATE +")
    assert base64.b64decode(payload.split()[1]) == b"acct\0acct\0pw"
    assert await _feed(connection, ":srv 903 oco :SASL authentication successful") == ["CAP END"]
    assert await _feed(connection, ":srv 001 oco :Welcome oco!u@h", ":srv 376 oco :End") == [
        "PRIVMSG NickServ :IDENTIFY oco nspw",
        "JOIN #a",
        "JOIN #b bkey",
    ]
    assert registered == [1]
    assert connection.userhost == "u@h"


@pytest.mark.parametrize(
    "lines",
    [
        [":srv CAP * LS :multi-prefix", "unused"],  # no SASL offered
        [":srv CAP * LS :sasl", ":srv CAP oco NAK :sasl"],
        [":srv CAP * LS :sasl", ":srv CAP oco ACK :sasl", "AUTHENTICATE +", ":srv 904 oco :SASL failed"],
        [":srv 421 oco CAP :Unknown command"],
    ],
)
async def test_required_sasl_refusals_are_fatal(nursery: trio.Nursery, lines: list[str]) -> None:
    connection, _ = _connection(nursery, sasl={"account": "a", "password": "p"})
    with pytest.raises(RegistrationRefusedError):
        await _feed(connection, *[line for line in lines if line != "unused"])


async def test_optional_sasl_failure_goes_on(nursery: trio.Nursery) -> None:
    connection, _ = _connection(nursery, sasl={"account": "a", "password": "p", "required": False})
    sent = await _feed(connection, ":srv CAP * LS :sasl", ":srv CAP oco ACK :sasl")
    assert sent == ["CAP REQ sasl", "AUTHENTICATE PLAIN"]
    sent = await _feed(connection, "AUTHENTICATE +", ":srv 904 oco :SASL failed")
    assert sent[-1] == "CAP END"


async def test_server_without_cap_registers_anyway(nursery: trio.Nursery) -> None:
    connection, registered = _connection(nursery)
    assert await _feed(connection, ":srv 421 oco CAP :Unknown command") == []
    assert await _feed(connection, ":srv 001 oco :Welcome", ":srv 422 oco :No MOTD") == []
    assert registered == [1]
    assert connection.ready


async def test_taken_nicks_fall_back_within_nicklen(nursery: trio.Nursery) -> None:
    connection, _ = _connection(nursery, alt_nicks=["oco2"])
    tried = []
    for _ in range(6):
        (line,) = await _feed(connection, f":srv 433 * {connection.nick} :Nickname is already in use")
        tried.append(line.split()[1])
    assert tried[:4] == ["oco2", "oco_", "oco__", "oco___"]
    assert all(len(nick) <= 9 and nick.startswith("oco") for nick in tried)


async def test_garbage_lines_are_skipped(nursery: trio.Nursery) -> None:
    connection, _ = _connection(nursery)
    await _feed(connection, ":srv 001 oco :Welcome", ":srv 376 oco :End")
    garbage = [
        "",
        ":only-prefix",
        "PRIVMSG",
        ":a!b@c PRIVMSG #x",
        ":a!b@c PRIVMSG",
        ":x JOIN",
        ":x KICK",
        ":srv 353 oco",
        ":srv 999 oco :an unknown numeric",
        "NICK",
        "CAP",
        ":a!b@c NOTICE",
        "\x00\x01\x02",
        ":a!b@c PRIVMSG oco :\x01\x01",
    ]
    for text in garbage:
        await connection._handle_text(text)
    await connection._handle_text(":a!b@c PRIVMSG oco :still fine")
    host = connection.host
    assert isinstance(host, RecordingHost)
    assert [m.body for m in host.messages] == ["still fine"]
    assert not host.memberships
