"""IRC wire format, without I/O: parsing, formatting, splitting, CTCP, case folding.

The parsing itself is the ``irc`` package's (its message regular expression, argument
and tag parsers, NickMask, ISUPPORT feature set, CTCP dequoting and RFC 1459 case
folding); only those pure parts of it are imported, never its reactors, which would
bring threads or asyncio into a trio program.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import irc.client  # type: ignore[import-untyped]
import irc.ctcp  # type: ignore[import-untyped]
import irc.features  # type: ignore[import-untyped]
import irc.message  # type: ignore[import-untyped]
import irc.strings  # type: ignore[import-untyped]
from jaraco.stream import buffer  # type: ignore[import-untyped]

#: The protocol's line limit, in bytes, CR LF included (RFC 1459 section 2.3).
MAX_LINE_BYTES = 512
#: The longest line accepted from the server: IRCv3 allows 8191 bytes of tags before the
#: 512 of the message; anything longer is logged and discarded.
MAX_INCOMING_LINE_BYTES = 8191 + MAX_LINE_BYTES
#: What the server may put before a relayed message when it cannot be known: hosts are
#: at most 63 bytes (RFC 1123 labels; servers cap it there too).
MAX_HOST_BYTES = 63

# irc.client's own line pattern (private there, but it is exactly the parser its
# ServerConnection uses; a unit test pins its behaviour).
_LINE_RE: re.Pattern[str] = irc.client._rfc_1459_command_regexp
_FORBIDDEN = re.compile(r"[\r\n\0]")
_COMMAND = re.compile(r"[A-Za-z]+|[0-9]{3}")
# Only CR, LF and CR LF break IRC lines; str.splitlines would also split on \x1d and
# \x1e, which are IRC's italics and strikethrough codes.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class ProtocolError(ValueError):
    """A line from the server could not be parsed (it is logged and skipped)."""


@dataclass(frozen=True, slots=True)
class Line:
    """One parsed IRC line: ``command`` upper-cased (or a three-digit numeric),
    ``params`` with the trailing parameter last, ``source`` the prefix (a nick mask or a
    server name) and IRCv3 ``tags``."""

    command: str
    params: tuple[str, ...] = ()
    source: str | None = None
    tags: Mapping[str, str | None] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def nick(self) -> str:
        """The nick of the source (the whole source for a server)."""
        return str(irc.client.NickMask(self.source or "").nick)

    @property
    def userhost(self) -> str | None:
        """``user@host`` of the source, when it has one."""
        value = irc.client.NickMask(self.source or "").userhost
        return None if value is None else str(value)

    def param(self, index: int, default: str = "") -> str:
        """The parameter at ``index``, or ``default`` when the line has fewer."""
        return self.params[index] if -len(self.params) <= index < len(self.params) else default


def parse_line(text: str) -> Line:
    """Parse one line (without its line break) with the ``irc`` package's parsers."""
    if not text or text.isspace():
        raise ProtocolError("empty line")
    match = _LINE_RE.match(text)
    if match is None:
        raise ProtocolError(f"not an IRC line: {text[:80]!r}")
    command = match.group("command")
    if not _COMMAND.fullmatch(command):
        raise ProtocolError(f"bad command {command[:20]!r}")
    command = command.upper()
    params = tuple(str(p) for p in irc.message.Arguments.from_group(match.group("argument")))
    tags: dict[str, str | None] = {}
    for tag in irc.message.Tag.from_group(match.group("tags")) or ():
        tags[str(tag["key"])] = tag["value"]
    return Line(command, params, match.group("prefix"), MappingProxyType(tags))


def format_line(command: str, *params: str, trailing: bool = False) -> str:
    """Build a line (without CR LF); the last parameter becomes the trailing one when it
    needs to be, or always with ``trailing`` (for text). Raises ValueError for
    parameters that would break the protocol."""
    parts = [command]
    for i, param in enumerate(params):
        if _FORBIDDEN.search(param):
            raise ValueError(f"IRC parameter contains CR, LF or NUL: {param[:40]!r}")
        last = i == len(params) - 1
        if (last and trailing) or not param or " " in param or param.startswith(":"):
            if not last:
                raise ValueError(f"only the last IRC parameter may be empty or contain spaces: {param[:40]!r}")
            param = ":" + param
        parts.append(param)
    return " ".join(parts)


class LineReader:
    """Bytes in, decoded lines out: ``irc``'s line buffer (UTF-8, falling back to
    Latin-1 per line, as IRC clients must), with a bound on a line's length so a
    server or peer cannot grow memory without end."""

    def __init__(self, max_line_bytes: int = MAX_INCOMING_LINE_BYTES) -> None:
        self._buffer = buffer.LineBuffer()
        self._max = max_line_bytes
        self._discarding = False
        #: Lines dropped because they were too long or undecodable.
        self.dropped = 0

    def feed(self, data: bytes) -> Iterator[str]:
        """Add received bytes; yield each complete line, decoded."""
        if self._discarding:
            # The rest of an oversized line: skip it up to its end.
            end = data.find(b"\n")
            if end < 0:
                return
            data = data[end + 1 :]
            self._discarding = False
        self._buffer.feed(data)
        for raw in self._buffer.lines():
            if len(raw) > self._max:
                self.dropped += 1
                continue
            yield decode(raw)
        if len(self._buffer) > self._max:
            self.dropped += 1
            self._buffer.buffer = b""
            self._discarding = True


def decode(raw: bytes) -> str:
    """Decode one line: UTF-8, or Latin-1 (which decodes anything) for old clients."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# ---- case folding and ISUPPORT ----


class Features:
    """What the server announced in ``RPL_ISUPPORT`` (005), through ``irc``'s FeatureSet."""

    def __init__(self) -> None:
        self._set: Any = irc.features.FeatureSet()

    def load(self, params: tuple[str, ...]) -> None:
        """Load one 005 line's parameters (the target first, the text last)."""
        self._set.load(list(params))

    @property
    def casemapping(self) -> str:
        """``rfc1459`` (the default), ``strict-rfc1459`` or ``ascii``."""
        return str(getattr(self._set, "casemapping", "rfc1459")).lower()

    @property
    def chantypes(self) -> str:
        """Characters a channel name may start with."""
        value = getattr(self._set, "chantypes", "#&")
        return value if isinstance(value, str) and value else "#&"

    @property
    def prefixes(self) -> str:
        """Membership prefixes in NAMES replies (``@+`` and the like)."""
        return "".join(self._set.prefix)

    @property
    def nicklen(self) -> int | None:
        """The longest nick the server accepts, when it said."""
        value = getattr(self._set, "nicklen", None)
        return value if isinstance(value, int) else None

    def fold(self, name: str) -> str:
        """Case-fold a nick or channel name the way the server compares them."""
        return casefold(name, self.casemapping)

    def is_channel(self, name: str) -> bool:
        """True when ``name`` is a channel on this server."""
        return bool(name) and name[0] in self.chantypes


_ASCII_UPPER = {ord(c): ord(c.lower()) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}
_STRICT_RFC1459 = {**_ASCII_UPPER, **{ord(a): ord(b) for a, b in zip("[]\\", "{}|", strict=True)}}


def casefold(name: str, casemapping: str = "rfc1459") -> str:
    """Fold ``name`` for comparison under the server's ``CASEMAPPING``."""
    if casemapping == "ascii":
        return name.translate(_ASCII_UPPER)
    if casemapping == "strict-rfc1459":
        return name.translate(_STRICT_RFC1459)
    return str(irc.strings.lower(name))


# ---- CTCP ----


def parse_ctcp(text: str) -> tuple[str, str] | None:
    """Return ``(tag, data)`` when ``text`` is a CTCP request (``\\x01TAG data\\x01``),
    using ``irc``'s dequoting; None for ordinary text."""
    if not text.startswith(irc.ctcp.DELIMITER):
        return None
    for part in irc.ctcp.dequote(text):
        if isinstance(part, tuple):
            tag = str(part[0]).upper()
            return tag, str(part[1]) if len(part) > 1 else ""
    # A lone \x01 with no closing one: many clients omit it for ACTION.
    tag, _, data = text[1:].partition(" ")
    return (tag.upper(), data) if tag else None


def ctcp(tag: str, data: str = "") -> str:
    """A CTCP message body."""
    return f"\x01{tag} {data}\x01" if data else f"\x01{tag}\x01"


# ---- outgoing text ----


def utf8_chunks(text: str, max_bytes: int) -> list[str]:
    """Split ``text`` into pieces of at most ``max_bytes`` UTF-8 bytes, never inside a
    character, preferring to break at a space (which is then dropped)."""
    if max_bytes < 4:
        raise ValueError("max_bytes must leave room for one UTF-8 character")
    chunks: list[str] = []
    data = text.encode("utf-8")
    while len(data) > max_bytes:
        cut = max_bytes
        # Back off to the start of a character: UTF-8 continuation bytes are 10xxxxxx.
        while cut > 0 and data[cut] & 0xC0 == 0x80:
            cut -= 1
        space = data.rfind(b" ", 0, cut + 1)
        # Break at a space unless that would leave a tiny first piece.
        if space > max_bytes // 2:
            chunks.append(data[:space].decode("utf-8"))
            data = data[space + 1 :]
        else:
            chunks.append(data[:cut].decode("utf-8"))
            data = data[cut:]
    if data or not chunks:
        chunks.append(data.decode("utf-8"))
    return chunks


def text_lines(body: str) -> list[str]:
    """The lines of a multi-line body, without empty ones (IRC cannot send an empty
    message) and with NUL removed (it would end the line on some servers)."""
    return [line for line in _LINE_BREAK.split(body.replace("\0", "")) if line.strip()]


def privmsg_lines(
    target: str,
    body: str,
    *,
    source_mask_bytes: int,
    action: bool = False,
    prefix: str = "",
    command: str = "PRIVMSG",
) -> list[str]:
    """The lines that send ``body`` to ``target``: one or more per line of the body, each
    small enough that the server can relay it with our ``nick!user@host`` in front
    (``source_mask_bytes`` long) within the 512-byte limit. ``prefix`` (``"nick: "``)
    goes before the first line only."""
    if _FORBIDDEN.search(target) or " " in target or "," in target or not target:
        raise ValueError(f"not a valid IRC target: {target[:40]!r}")
    overhead = len(f":{'x' * source_mask_bytes} {command} {target} :\r\n".encode())
    if action:
        overhead += len(ctcp("ACTION", "x")) - 1
    budget = MAX_LINE_BYTES - overhead
    if budget < 16:
        raise ValueError(f"IRC target {target[:40]!r} is too long to send anything to")
    lines: list[str] = []
    for n, text in enumerate(text_lines(body)):
        if n == 0 and prefix:
            text = prefix + text
        for chunk in utf8_chunks(text, budget):
            lines.append(format_line(command, target, ctcp("ACTION", chunk) if action else chunk, trailing=True))
    return lines


def sasl_plain(account: str, password: str) -> list[str]:
    """The ``AUTHENTICATE`` payload lines for SASL PLAIN (base64 in 400-byte pieces; a
    lone ``+`` ends a payload whose length is a multiple of 400)."""
    payload = base64.b64encode(f"{account}\0{account}\0{password}".encode()).decode("ascii")
    pieces = [payload[i : i + 400] for i in range(0, len(payload), 400)]
    if not pieces or len(pieces[-1]) == 400:
        pieces.append("+")
    return [format_line("AUTHENTICATE", piece) for piece in pieces]


def strip_names_prefixes(entry: str, prefixes: str) -> str:
    """A NAMES entry without its membership prefixes (``@+nick`` with multi-prefix),
    and without the ``!user@host`` that userhost-in-names adds."""
    nick = entry.lstrip(prefixes)
    return nick.partition("!")[0]
