"""The wire format without a server: parsing, formatting, splitting, CTCP, case folding."""

from __future__ import annotations

import base64
import random

import pytest
from oco_adapter_irc import _protocol as p


def test_parse_line_with_tags_source_and_trailing() -> None:
    line = p.parse_line(r"@msgid=abc;time=2026-01-01T00:00:00Z;x=a\sb :alice!al@host.example PRIVMSG #ops :oco: ping  ")
    assert line.command == "PRIVMSG"
    assert line.params == ("#ops", "oco: ping  ")
    assert line.source == "alice!al@host.example"
    assert line.nick == "alice"
    assert line.userhost == "al@host.example"
    assert line.tags["msgid"] == "abc"
    assert line.tags["x"] == "a b"


def test_parse_line_numerics_and_commands() -> None:
    line = p.parse_line(":irc.test 005 oco CASEMAPPING=ascii NICKLEN=30 :are supported")
    assert line.command == "005"
    assert line.params == ("oco", "CASEMAPPING=ascii", "NICKLEN=30", "are supported")
    assert line.nick == "irc.test"
    assert line.userhost is None
    assert p.parse_line("ping :token").command == "PING"
    assert p.parse_line("PING :token").params == ("token",)
    assert p.parse_line("PRIVMSG #x :").params == ("#x", "")
    assert p.parse_line("PRIVMSG #x ::)").params == ("#x", ":)")
    assert p.parse_line("QUIT").params == ()
    assert p.parse_line("QUIT").param(0) == ""


@pytest.mark.parametrize("text", ["", "   ", ":only-a-prefix", "@tags-only", ":src 12345 x", ":src 1 x"])
def test_malformed_lines_raise_protocol_error(text: str) -> None:
    with pytest.raises(p.ProtocolError):
        p.parse_line(text)


def test_format_line() -> None:
    assert p.format_line("PRIVMSG", "#ops", "hello world") == "PRIVMSG #ops :hello world"
    assert p.format_line("PRIVMSG", "#ops", ":)") == "PRIVMSG #ops ::)"
    assert p.format_line("PRIVMSG", "#ops", "") == "PRIVMSG #ops :"
    assert p.format_line("JOIN", "#ops") == "JOIN #ops"
    assert p.format_line("NICK", "oco") == "NICK oco"
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        p.format_line("PRIVMSG", "#ops", "a\r\nQUIT :injected")
    with pytest.raises(ValueError, match="only the last"):
        p.format_line("PRIVMSG", "#o ps", "x")


def test_line_reader_decodes_bounds_and_skips() -> None:
    reader = p.LineReader(max_line_bytes=100)
    assert list(reader.feed(b"PING :a\r\nPRIVMSG #x :caf\xc3\xa9\nPRIVMSG #x :caf\xe9\r\n")) == [
        "PING :a",
        "PRIVMSG #x :café",
        "PRIVMSG #x :café",  # not UTF-8: read as Latin-1
    ]
    # An oversized line, arriving in pieces, is dropped whole; the next line is kept.
    assert list(reader.feed(b"PRIVMSG #x :" + b"y" * 150)) == []
    assert list(reader.feed(b"y" * 150)) == []
    assert list(reader.feed(b"yyy\r\nPING :b\r\n")) == ["PING :b"]
    assert reader.dropped == 1
    assert list(reader.feed(b"x" * 120 + b"\r\nPING :c\r\n")) == ["PING :c"]
    assert reader.dropped == 2
    assert list(reader.feed(b"PING :partial")) == []
    assert list(reader.feed(b" line\n")) == ["PING :partial line"]


def test_casefold_follows_casemapping() -> None:
    assert p.casefold("Bob[1]^", "rfc1459") == "bob{1}~"
    assert p.casefold("Bob[1]^", "strict-rfc1459") == "bob{1}^"
    assert p.casefold("Bob[1]^", "ascii") == "bob[1]^"
    assert p.casefold("ÉTÉ", "ascii") == "ÉtÉ"  # ascii folds ASCII letters only


def test_features_from_isupport() -> None:
    features = p.Features()
    assert features.casemapping == "rfc1459"
    assert features.fold("[A]") == "{a}"
    features.load(("oco", "CASEMAPPING=ascii", "PREFIX=(qaohv)~&@%+", "CHANTYPES=#&+", "NICKLEN=30", "are supported"))
    assert features.casemapping == "ascii"
    assert features.fold("[A]") == "[a]"
    assert features.prefixes == "~&@%+"
    assert features.nicklen == 30
    assert features.is_channel("+chan")
    assert not features.is_channel("alice")
    assert p.strip_names_prefixes("@+alice", features.prefixes) == "alice"
    assert p.strip_names_prefixes("~bob!u@h", features.prefixes) == "bob"


def test_ctcp() -> None:
    assert p.parse_ctcp("\x01ACTION waves\x01") == ("ACTION", "waves")
    assert p.parse_ctcp("\x01ACTION waves") == ("ACTION", "waves")  # no closing \x01
    assert p.parse_ctcp("\x01VERSION\x01") == ("VERSION", "")
    assert p.parse_ctcp("plain text") is None
    assert p.parse_ctcp("\x01") is None
    assert p.ctcp("ACTION", "waves") == "\x01ACTION waves\x01"
    assert p.ctcp("VERSION") == "\x01VERSION\x01"


def test_utf8_chunks_never_split_a_character() -> None:
    rng = random.Random(1)
    alphabet = ["a", " ", "é", "漢", "🙂", "\u0301"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 300)))
        budget = rng.randrange(4, 120)
        chunks = p.utf8_chunks(text, budget)
        assert all(len(c.encode()) <= budget for c in chunks)
        # Only the spaces chosen as break points are dropped.
        assert "".join(chunks).replace(" ", "") == text.replace(" ", "")


def test_utf8_chunks_prefers_spaces() -> None:
    assert p.utf8_chunks("hello brave new world", 11) == ["hello brave", "new world"]
    assert p.utf8_chunks("abcdefghij", 4) == ["abcd", "efgh", "ij"]
    assert p.utf8_chunks("ééé", 5) == ["éé", "é"]
    assert p.utf8_chunks("", 10) == [""]


def test_privmsg_lines_fit_in_512_bytes_with_the_source_mask() -> None:
    mask = len("oco!~oco@" + "h" * 63)
    lines = p.privmsg_lines("#ops", "ü" * 1000, source_mask_bytes=mask)
    assert len(lines) > 1
    for line in lines:
        relayed = f":{'x' * mask} {line}\r\n".encode()
        assert len(relayed) <= 512
    assert "".join(line.split(" :", 1)[1] for line in lines) == "ü" * 1000


def test_privmsg_lines_multiline_mention_and_action() -> None:
    lines = p.privmsg_lines("#ops", "first\r\nsecond\n\n\x1ditalic\x1d", source_mask_bytes=30, prefix="alice: ")
    assert lines == ["PRIVMSG #ops :alice: first", "PRIVMSG #ops :second", "PRIVMSG #ops :\x1ditalic\x1d"]
    action = p.privmsg_lines("alice", "waves" + " x" * 400, source_mask_bytes=30, action=True)
    assert all(line.startswith("PRIVMSG alice :\x01ACTION ") and line.endswith("\x01") for line in action)
    assert all(len(f":{'x' * 30} {line}\r\n".encode()) <= 512 for line in action)
    assert p.privmsg_lines("#ops", "\n \n", source_mask_bytes=30) == []


@pytest.mark.parametrize("target", ["", "#a b", "a,b", "#x\r\n"])
def test_privmsg_lines_refuse_bad_targets(target: str) -> None:
    with pytest.raises(ValueError, match="target"):
        p.privmsg_lines(target, "hi", source_mask_bytes=30)


def test_sasl_plain_payload() -> None:
    (line,) = p.sasl_plain("oco", "secret")
    assert line.startswith("AUTHENTICATE ")
    assert base64.b64decode(line.split(" ", 1)[1]) == b"oco\0oco\0secret"
    long = p.sasl_plain("a", "p" * 600)
    assert [len(x.split(" ", 1)[1]) for x in long[:-1]] == [400] * (len(long) - 1)
    exact = p.sasl_plain("a", "p" * (300 - 4))  # 300 bytes of payload: 400 in base64
    assert exact[-1] == "AUTHENTICATE +"
