"""The Matrix adapter's configuration: the keys beside ``type: matrix`` in the bot's config."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

_USER_ID = re.compile(r"^@[^:\s]+:\S+$")
_ROOM = re.compile(r"^[!#][^:\s]+:\S+$")


def _default_store_path() -> Path:
    # The XDG data directory, like other chat clients keep their keys; nio names the
    # database in it after the user and device, so several bots may share it.
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "oco" / "matrix"


class ReconnectConfig(BaseModel):
    """Exponential backoff while the homeserver cannot be reached (or answers 5xx), with
    jitter: at start-up before the first sync, and for every request after it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Seconds before the first retry.
    initial_delay: float = Field(default=0.5, gt=0)
    #: The longest wait between retries, in seconds.
    max_delay: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> ReconnectConfig:
        if self.initial_delay > self.max_delay:
            raise ValueError("reconnect.initial_delay must not exceed reconnect.max_delay")
        return self


class MatrixConfig(BaseModel):
    """Options of one Matrix connection.

    Either ``password`` (the adapter logs in once and keeps the access token and device
    id in the core store, so that restarts reuse the device and its encryption keys) or
    ``access_token`` (used as given) must be set.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Base URL of the homeserver's client API, e.g. ``https://matrix.example.org``.
    homeserver: str
    #: The bot's full user id, e.g. ``@oco:example.org``.
    user_id: str
    password: SecretStr | None = None
    access_token: SecretStr | None = None
    #: Name of the device the adapter creates when it logs in with ``password``.
    device_name: str = "OCO bot"
    #: Display name to set on start (people address the bot by it); unset keeps the
    #: account's own.
    display_name: str | None = None
    #: Rooms to join on start, by id (``!abc:example.org``) or alias (``#ops:example.org``).
    rooms: list[str] = Field(default_factory=list)
    #: Invitations to accept: off (``false`` or empty), or the user ids allowed to invite
    #: the bot; shell-style wildcards match, e.g. ``"@*:example.org"``.
    autojoin_invites: list[str] = Field(default_factory=list)
    #: End-to-end encryption. When off, encrypted rooms are reported in the log.
    encryption: bool = True
    #: Where the encryption keys (olm account, megolm sessions) are kept.
    store_path: Path = Field(default_factory=_default_store_path)
    #: Message type of the bot's messages: ``notice`` (``m.notice``, which other bots
    #: do not answer) or ``text``.
    message_type: Literal["notice", "text"] = "notice"
    #: Seconds the homeserver may hold a sync request open.
    sync_timeout: float = Field(default=30.0, gt=0)
    #: Waiting out a homeserver that is down.
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig)
    #: Outgoing events kept while the homeserver cannot be reached (or a rate limit holds
    #: them): a message, each further piece of a long one, each file and each reaction is
    #: one. A message that does not fit is refused whole, never half sent.
    queue_size: int = Field(default=1000, ge=1)
    #: Bytes those events may hold (text, and the data of files to upload); past it a
    #: message is refused whole. Bounds the bot's memory through an outage.
    queue_bytes: int = Field(default=64 * 1024 * 1024, ge=1)

    @field_validator("homeserver")
    @classmethod
    def _homeserver_is_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://, e.g. https://matrix.example.org")
        return value.rstrip("/")

    @field_validator("user_id")
    @classmethod
    def _full_user_id(cls, value: str) -> str:
        if not _USER_ID.match(value):
            raise ValueError("must be a full Matrix user id such as @oco:example.org")
        return value

    @field_validator("rooms")
    @classmethod
    def _room_ids_or_aliases(cls, value: list[str]) -> list[str]:
        for room in value:
            if not _ROOM.match(room):
                raise ValueError(f"{room!r} is neither a room id (!abc:example.org) nor an alias (#ops:example.org)")
        return value

    @field_validator("autojoin_invites", mode="before")
    @classmethod
    def _false_means_off(cls, value: Any) -> Any:
        # "autojoin_invites: false" reads better in YAML than an empty list.
        return [] if value is False or value is None else value

    @model_validator(mode="after")
    def _credentials(self) -> MatrixConfig:
        if (self.password is None) == (self.access_token is None):
            raise ValueError("set exactly one of password or access_token")
        return self

    @property
    def localpart(self) -> str:
        """The user id's local part: ``oco`` for ``@oco:example.org``."""
        return self.user_id[1:].split(":", 1)[0]
