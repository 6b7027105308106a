"""The IRC adapter's configuration: the keys beside ``type: irc`` in the bot's config."""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, FilePath, SecretStr, field_validator, model_validator

# RFC 2812: a nick starts with a letter or one of []\`_^{|} and goes on with those,
# digits and "-". Servers accept the same set; checking it here turns a typo into a
# config error naming the key instead of an endless 432 loop.
_NICK_FIRST = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz[]\\`_^{|}")
_NICK_REST = _NICK_FIRST | set("0123456789-")
_CHANNEL_TYPES = "#&+!"


def _check_nick(nick: str) -> str:
    if not nick or nick[0] not in _NICK_FIRST or any(c not in _NICK_REST for c in nick):
        raise ValueError(
            f"{nick!r} is not a valid IRC nick (letters, digits and []\\`_^{{|}}-, not starting with a digit)"
        )
    return nick


def _check_word(value: str, what: str) -> str:
    if not value or any(c in value for c in " \r\n\0"):
        raise ValueError(f"{what} {value!r} must be non-empty, without spaces or line breaks")
    return value


def _check_secret(value: SecretStr | None, what: str, *, word: bool = False) -> SecretStr | None:
    # A line break in a secret would end the IRC line early (and send the rest as a
    # command); a key with a space or comma would shift JOIN's parameters. The value is
    # never part of the message.
    if value is not None:
        secret = value.get_secret_value()
        if not secret or any(c in secret for c in "\r\n\0") or (word and any(c in secret for c in " ,")):
            spaces = ", spaces or commas" if word else ""
            raise ValueError(f"{what} must be non-empty, without line breaks{spaces}")
    return value


class _Model(BaseModel):
    # hide_input_in_errors: a rejected secret must not reappear in the error's text.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class SaslConfig(_Model):
    """SASL PLAIN credentials: the services account and its password."""

    account: str
    password: SecretStr
    #: Give up (rather than connect unauthenticated) when the server refuses SASL.
    required: bool = True

    @field_validator("password")
    @classmethod
    def _password(cls, value: SecretStr) -> SecretStr | None:
        return _check_secret(value, "sasl.password")


class ChannelConfig(_Model):
    """A channel to join, with its key (``+k`` password) when it has one."""

    name: str
    key: SecretStr | None = None

    @field_validator("name")
    @classmethod
    def _channel_name(cls, value: str) -> str:
        _check_word(value, "channel")
        if value[0] not in _CHANNEL_TYPES or "," in value or "\x07" in value:
            raise ValueError(f"{value!r} is not a channel name (it starts with one of {_CHANNEL_TYPES})")
        return value

    @field_validator("key")
    @classmethod
    def _key(cls, value: SecretStr | None) -> SecretStr | None:
        return _check_secret(value, "a channel key", word=True)


class RateLimitConfig(_Model):
    """Token bucket for lines sent to the server: ``burst`` lines at once, then ``per_second``.

    The defaults stay under the flood limits of common networks (Libera.Chat, OFTC, and
    ngircd's penalty of about three lines a second), so the server never disconnects the
    bot for flooding. Lines wait their turn; none is dropped or reordered.
    """

    burst: Annotated[int, Field(ge=1, le=100)] = 5
    per_second: Annotated[float, Field(gt=0, le=1000)] = 1.0


class ReconnectConfig(_Model):
    """Exponential backoff between connection attempts, with jitter."""

    initial_delay: Annotated[float, Field(ge=0)] = 2.0
    max_delay: Annotated[float, Field(gt=0)] = 300.0
    factor: Annotated[float, Field(ge=1)] = 2.0

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.initial_delay > self.max_delay:
            raise ValueError("reconnect.initial_delay must not exceed reconnect.max_delay")
        return self


class IrcConfig(_Model):
    """Options of an ``irc`` adapter.

    Only ``host``, ``nick`` and (usually) ``channels`` are needed; everything else has
    defaults that work on common networks. Secrets (``password``, ``sasl.password``,
    ``nickserv_password``, channel keys) are :class:`~pydantic.SecretStr`: they never
    show in logs or in the ``repr`` of this object.
    """

    host: str
    #: Defaults to 6697 with ``tls`` and 6667 without.
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    tls: bool = True
    #: Check the server's certificate and name (leave on; use ``tls_ca_file`` for a
    #: private CA rather than turning this off).
    tls_verify: bool = True
    #: PEM file of CA certificates to trust instead of the system's.
    tls_ca_file: FilePath | None = None

    nick: str
    #: Tried in order when ``nick`` is taken; after them the bot appends ``_``.
    alt_nicks: list[str] = Field(default_factory=list)
    #: Seconds between attempts to take ``nick`` back while on an alternative (0: never).
    regain_nick_interval: Annotated[float, Field(ge=0)] = 60.0
    #: The user name (ident) part of the bot's mask; defaults to the nick.
    username: str | None = None
    realname: str = "OCO (OpenChatOps) bot"
    #: Server password (``PASS``), where the server wants one.
    password: SecretStr | None = None
    sasl: SaslConfig | None = None
    #: Sent as ``IDENTIFY`` to NickServ after registration, for networks without SASL.
    nickserv_password: SecretStr | None = None

    #: Channels to join after registration, as ``"#name"`` or ``{name: "#name", key: ...}``.
    channels: list[ChannelConfig] = Field(default_factory=list)
    #: Extra prefixes that address the bot in a channel (``!`` makes ``!ping`` a command).
    #: They are handed to the router with the bot's nick, as names it has on IRC.
    command_prefix: list[str] = Field(default_factory=list)

    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig)
    #: Seconds to wait before rejoining a channel after a KICK (0: rejoin at once).
    rejoin_delay: Annotated[float, Field(ge=0)] = 10.0
    #: Rejoin after a KICK at all.
    rejoin_on_kick: bool = True
    #: Seconds without any line from the server before the bot sends a PING...
    ping_interval: Annotated[float, Field(gt=0)] = 60.0
    #: ...and seconds after that without an answer before it drops the connection.
    ping_timeout: Annotated[float, Field(gt=0)] = 60.0
    #: Seconds to open the connection and complete registration before giving up on it.
    connect_timeout: Annotated[float, Field(gt=0)] = 60.0
    #: Seconds the TLS handshake may take: a plaintext port never answers one, and
    #: saying so soon (with the fix) beats waiting for ``connect_timeout``.
    tls_handshake_timeout: Annotated[float, Field(gt=0)] = 10.0
    #: Outgoing lines kept while the connection is down (or the rate limit holds them);
    #: a message that does not fit is refused, never half sent.
    queue_size: Annotated[int, Field(ge=1)] = 1000

    @field_validator("channels", mode="before")
    @classmethod
    def _channel_strings(cls, value: object) -> object:
        # "#ops" is shorthand for {name: "#ops"}.
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("nick")
    @classmethod
    def _nick(cls, value: str) -> str:
        return _check_nick(value)

    @field_validator("alt_nicks")
    @classmethod
    def _alt_nicks(cls, value: list[str]) -> list[str]:
        return [_check_nick(nick) for nick in value]

    @field_validator("password", "nickserv_password")
    @classmethod
    def _secrets(cls, value: SecretStr | None) -> SecretStr | None:
        return _check_secret(value, "the password")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _check_word(value, "host")

    @field_validator("username")
    @classmethod
    def _username(cls, value: str | None) -> str | None:
        return None if value is None else _check_word(value, "username")

    @field_validator("realname")
    @classmethod
    def _realname(cls, value: str) -> str:
        if any(c in value for c in "\r\n\0"):
            raise ValueError("realname must not contain line breaks")
        return value or "OCO"

    @field_validator("command_prefix", mode="before")
    @classmethod
    def _prefix_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("command_prefix")
    @classmethod
    def _prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            if not prefix or prefix != prefix.strip():
                raise ValueError(f"command_prefix {prefix!r} must be non-empty without surrounding spaces")
        return value

    @property
    def effective_port(self) -> int:
        """The port to connect to: ``port``, or the usual one for ``tls``."""
        if self.port is not None:
            return self.port
        return 6697 if self.tls else 6667

    @property
    def effective_username(self) -> str:
        """The user name sent in ``USER``."""
        return self.username or self.nick
