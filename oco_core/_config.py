"""Configuration: one pipeline from a YAML file to validated models.

read the file → parse YAML (keeping line numbers) → substitute ``${VAR}`` and
``${VAR:-default}`` in string values → validate with strict models → let each plugin
validate its own section with the model it declared. Every error names the file, the
line and the key, and what to do. Secrets are ``SecretStr``: never shown in errors,
logs or ``repr``.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
import re
import shutil
import sys
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from ._errors import ConfigError
from ._quota import QuotaConfig

#: What a launched callback inherits from the bot's environment by default.
DEFAULT_INHERITED_ENV = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TMPDIR",
    "TERM",
    "XDG_*",
    "VIRTUAL_ENV",
    "PYTHONPATH",
    "NODE_PATH",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "GRPC_*",
)
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_CALLBACK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LOG_LEVELS = ("debug", "info", "warning", "error")


class _LocatedError(ValueError):
    """A validator's complaint about a key below the model it validates (the second
    ``id:`` of two, say), so the error points at that key's line, not the model's."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def default_data_dir() -> Path:
    """Where OCO keeps its files when the config does not say: $XDG_DATA_HOME/oco."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "oco"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BotSettings(_Strict):
    """``bot:`` — who the bot is."""

    name: str = Field(default="oco", min_length=1, description="How people address the bot.")
    aliases: list[str] = Field(default_factory=list, description='Extra prefixes, such as "!".', examples=[["!"]])
    max_message_bytes: int = Field(
        default=16384, gt=0, description="Largest message body a callback may send (RESOURCE_EXHAUSTED past it)."
    )
    max_attachment_bytes: int = Field(
        default=3 << 20,
        gt=0,
        description="The files a callback sends as data in one request, together (RESOURCE_EXHAUSTED past it); "
        "the request must also fit grpc.max_receive_bytes.",
    )
    max_attachments: int = Field(
        default=10, gt=0, description="Files one message may carry (RESOURCE_EXHAUSTED past it)."
    )
    editable_messages: int = Field(
        default=10_000,
        gt=0,
        description="Messages the bot remembers who sent, latest first: a callback may edit only those of its own.",
    )
    fetchable_files: int = Field(
        default=10_000,
        gt=0,
        description="Files people sent lately whose urls callbacks may fetch through the bot (Robot.GetAttachment).",
    )
    unknown_command_reply: bool = Field(
        default=True,
        description="Answer a command addressed to the bot that no route matches (with the closest known one).",
    )
    callback_startup_wait: float = Field(
        default=20.0, ge=0, description="Seconds start-up waits for launched callbacks to open their Listen streams."
    )
    adapter_startup_wait: float = Field(
        default=30.0, ge=0, description="Seconds start-up waits for every adapter's first connection attempt."
    )


class AdapterEntry(BaseModel):
    """One entry of ``adapters:``: ``type`` and ``name``; every other key goes to the
    adapter's own config model."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str = Field(min_length=1, examples=["shell"])
    name: str | None = Field(default=None, examples=["ops"])

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", value):
            raise ValueError("an adapter name is letters, digits, '_' or '-' (it prefixes room and user ids)")
        return value

    @property
    def instance_name(self) -> str:
        """The adapter's name in this bot; it prefixes its room and user ids."""
        return self.name or self.type

    def options(self) -> dict[str, Any]:
        """The keys beside ``type`` and ``name``."""
        return dict(self.model_extra or {})


class DataStoreEntry(BaseModel):
    """One entry of ``datastores:``: a specific data store the bot offers callbacks,
    chosen by ``type``; every other key goes to that provider's own config model."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str = Field(min_length=1, examples=["postgresql"])

    def options(self) -> dict[str, Any]:
        """The keys beside ``type``."""
        return dict(self.model_extra or {})


class StoreSettings(BaseModel):
    """``store:`` — ``type``; every other key goes to the store's model. Without a
    ``type`` the bot uses the installed store plugin that offers itself as the default
    (``StoreType.default``; the built-in ``sql`` store does)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str | None = Field(default=None, min_length=1, examples=["sql"])
    #: Default storage quota of every callback (``callbacks[].quota`` overrides it).
    quota: QuotaConfig = Field(default_factory=QuotaConfig)

    def options(self) -> dict[str, Any]:
        """The keys beside ``type``."""
        return dict(self.model_extra or {})


class TlsSettings(_Strict):
    """``grpc.tls:`` — serve the API over TLS, and optionally require client certificates."""

    cert: Path = Field(description="The server's certificate chain (PEM).", examples=["bot.crt"])
    key: Path = Field(description="The server's private key (PEM).", examples=["bot.key"])
    #: With a client CA, every caller must present a certificate it signed, whose
    #: common name or a subject alternative name is the callback's id (mutual TLS).
    client_ca: Path | None = None
    #: The CA launched callbacks trust for the server's certificate (OCO_TLS_CA);
    #: default: the system's roots.
    server_ca: Path | None = None
    #: The name launched callbacks expect in the server's certificate
    #: (OCO_TLS_SERVER_NAME); default: the host of ``grpc.listen``.
    server_name: str | None = None


def _host_port(value: str) -> str:
    """``value`` if it is a host:port a server can listen on, else ValueError saying why."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, such as 127.0.0.1:50051, not {value!r}")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port} is out of range: use 1-65535, or 0 to pick a free one")
    bare = host.removeprefix("[").removesuffix("]")
    if not bare or (":" in bare and bare == host):
        # grpc would split "::1:50051" somewhere else than we do.
        raise ValueError(f"write an IPv6 host in brackets, such as [::1]:{port}, not {value!r}")
    if any(c.isspace() or c in "/@" for c in bare):
        raise ValueError(f"{host!r} is not a host name or address; for example 127.0.0.1:{port}")
    return value


class GrpcSettings(_Strict):
    """``grpc:`` — the API callback programs connect to."""

    listen: str = Field(default="127.0.0.1:50051", description="host:port; port 0 picks a free one.")
    max_receive_bytes: int = Field(default=4 << 20, gt=0, description="Largest request accepted.")
    stream_queue: int = Field(default=1000, gt=0, description="Events queued per Listen stream before dropping.")
    stream_queue_bytes: int = Field(
        default=16 << 20, gt=0, description="Bytes of events queued per Listen stream before dropping."
    )
    max_routes: int = Field(default=1000, gt=0, description="Routes one Listen stream may declare.")
    batch_max_events: int = Field(
        default=64, gt=0, description="Events in one ListenBatches message (a client behind gets larger batches)."
    )
    batch_max_bytes: int = Field(
        default=1 << 20,
        gt=0,
        description="Bytes of events in one ListenBatches message past its first (keep it under clients' 4 MiB).",
    )
    max_connections: int = Field(default=512, gt=0, description="Connections to the API at once; more are refused.")
    max_connection_idle: float = Field(
        default=300.0, gt=0, description="Seconds a connection holding no call stays open (idle clients, attackers)."
    )
    max_streams_per_callback: int = Field(
        default=64, gt=0, description="Listen streams one callback may hold open at once (its replicas)."
    )
    max_pattern_length: int = Field(default=4096, gt=0, description="Characters in one route pattern.")
    max_pattern_program: int = Field(
        default=20_000, gt=0, description="Instructions of one route pattern's compiled RE2 program (its cost)."
    )
    max_total_pattern_program: int = Field(
        default=1_000_000, gt=0, description="Instructions of all live route patterns together (one RE2 set)."
    )
    shutdown_grace: float = Field(default=5.0, ge=0, description="Seconds running calls get at shutdown.")
    refusal_log_interval: float = Field(
        default=60.0,
        ge=0,
        description="Seconds between log lines about refused callback connections of one callback and reason.",
    )
    #: Where to write the actual address once listening (useful with port 0).
    address_file: Path | None = None
    #: TLS for the API; without it the API is plaintext (keep it on 127.0.0.1 then).
    tls: TlsSettings | None = None

    _listen = field_validator("listen")(lambda value: _host_port(value))


class RouteSettings(_Strict):
    """A route the operator declares for a callback that cannot declare its own."""

    pattern: str = Field(min_length=1, examples=["deploy (\\w+)"])
    respond: bool = False
    help: str = ""
    id: str | None = None
    permission: str = ""
    ignore_case: bool = False
    #: Keep its matches for the callback while it is not connected (see ``events:``).
    durable: bool = False
    #: Seconds a durable match may wait; null: ``events.chat_ttl``.
    durable_ttl: float | None = Field(default=None, gt=0)


class HttpSettings(_Strict):
    """``http:`` — the bot's HTTP server: webhooks (``/hooks/<callback id>/...``); off
    unless configured."""

    listen: str = Field(description="host:port; port 0 picks a free one.", examples=["127.0.0.1:8080"])
    #: TLS for the HTTP server (``cert`` and ``key``; ``client_ca`` requires client certificates).
    tls: TlsSettings | None = None
    max_body_bytes: int = Field(default=1 << 20, gt=0, description="Largest request body accepted (413 beyond).")
    webhook_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a synchronous webhook waits for the callback's answer (504 after)."
    )
    webhook_rate_limit: int = Field(
        default=600,
        gt=0,
        description="Requests per minute one webhook route accepts (bursts up to that many; 429 beyond).",
    )
    max_concurrent_requests: int = Field(
        default=256, gt=0, description="Webhook requests whose bodies are read at once (503 beyond)."
    )
    body_timeout: float = Field(default=30.0, gt=0, description="Seconds a request's whole body may take (408 after).")
    max_pending_webhooks: int = Field(
        default=1000, gt=0, description="Synchronous webhook requests waiting for callbacks at once (503 beyond)."
    )
    #: Where to write the actual address once listening (useful with port 0).
    address_file: Path | None = None

    _listen = field_validator("listen")(lambda value: _host_port(value))


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(value: object) -> object:
    """``8h``, ``30m``, ``90s``, ``1d`` or a number of seconds → seconds; anything else
    is left for the field's own type check (which names what it expected)."""
    if isinstance(value, str):
        found = _DURATION.fullmatch(value)
        if found is None:
            raise ValueError(f"expected a duration such as 8h, 30m, 90s or 1d (or seconds), not {value!r}")
        return float(found.group(1)) * _DURATION_UNITS[found.group(2)]
    return value


class ConsoleSettings(_Strict):
    """``console:`` — the operator console, web pages at ``/console`` on the HTTP server
    (``http:``); off unless configured. Log in with a token from ``oco console token create``."""

    show_bodies: bool = Field(
        default=False, description="Show message bodies in the live view (hidden unless true: they may be private)."
    )
    session_ttl: float = Field(
        default=8 * 3600.0,
        gt=0,
        le=30 * 86400,
        description="How long a login lasts: a duration (8h, 30m, 1d) or seconds.",
    )
    live_buffer: int = Field(
        default=200, gt=0, le=10_000, description="Recent messages the live view keeps in memory (its first page)."
    )
    login_failures: int = Field(
        default=10,
        gt=0,
        description="Failed logins one client address may make a minute (bursts up to that many; 429 beyond).",
    )
    max_streams: int = Field(
        default=32,
        gt=0,
        description="Live views (event streams) open at once, all operators together (503 beyond).",
    )
    public_origin: str | None = Field(
        default=None,
        pattern=r"^https?://[^/\s]+$",
        examples=["https://ops.example.org"],
        description="The console's address as browsers see it behind a proxy that terminates TLS "
        "(scheme://host[:port]): forms must come from it, and an https one makes the cookie Secure.",
    )

    _session_ttl = field_validator("session_ttl", mode="before")(lambda value: _duration(value))


class EventSettings(_Strict):
    """``events:`` — durable events (asynchronous webhooks, schedule firings, published
    events, matches of durable routes), kept in the core store until acknowledged."""

    ttl: float = Field(default=3600.0, gt=0, description="Seconds a durable event waits for its callback.")
    chat_ttl: float = Field(default=30.0, gt=0, description="Seconds a match of a durable route waits, by default.")
    max_pending: int = Field(
        default=10_000, gt=0, description="Durable events kept per callback (oldest dropped beyond)."
    )
    max_pending_bytes: int = Field(
        default=64 << 20, gt=0, description="Bytes of durable events kept per callback (oldest dropped beyond)."
    )
    max_event_bytes: int = Field(
        default=256 << 10, gt=0, description="Largest payload Publish accepts (SNS and SQS allow as much)."
    )
    redeliver_after: float = Field(
        default=300.0,
        gt=0,
        description="Seconds an unacknowledged event waits on a live stream before going to another.",
    )
    max_unacknowledged: int = Field(
        default=100, gt=0, description="Durable events one stream may hold unacknowledged before it gets more."
    )


class HaSettings(_Strict):
    """``ha:`` — high availability: several ``oco run`` with this config and one shared
    core store (PostgreSQL or Redis) elect one active bot through a lease in that store;
    the others stand by (see README, "Running two bots")."""

    lease: float = Field(
        default=3.0,
        gt=0,
        description="Seconds a lease record may stay unrenewed before a standby takes over (its own clock).",
    )
    renew_interval: float = Field(
        default=0.5, gt=0, description="Seconds between the active bot's renewals and the standbys' looks."
    )
    fence_margin: float = Field(
        default=0.5,
        ge=0,
        description="The active bot stops acting this many seconds before a standby may take over.",
    )
    #: The gRPC address callbacks reach this bot at, put in its lease record (default:
    #: the address it listens on, with this host's name for a wildcard host).
    advertise_grpc: str | None = Field(default=None, examples=["oco-1.internal:50051"])
    #: The same for its HTTP server (named in a standby's 503 to webhook callers).
    advertise_http: str | None = Field(default=None, examples=["oco-1.internal:8080"])

    @model_validator(mode="after")
    def _renewals_fit(self) -> HaSettings:
        # Two renewals must fit before the bot fences itself, or one slow write stops it.
        if self.fence_margin >= self.lease or 2 * self.renew_interval > self.lease - self.fence_margin:
            raise ValueError(
                f"ha.lease ({self.lease:g} s) must exceed ha.fence_margin ({self.fence_margin:g} s) by at least two "
                f"ha.renew_interval ({self.renew_interval:g} s); lengthen the lease or renew more often"
            )
        return self


class HmacSettings(_Strict):
    """``webhook_auth.hmac:`` — the body signed with a shared secret (GitHub's form by default)."""

    secret: SecretStr = Field(examples=["${GITHUB_WEBHOOK_SECRET}"])
    header: str = Field(default="X-Hub-Signature-256", min_length=1)
    algorithm: Literal["sha1", "sha256", "sha512"] = "sha256"
    #: Text before the hex digest in the header ("sha256=" for GitHub); "" for none.
    prefix: str = "sha256="


class WebhookAuth(_Strict):
    """``callbacks[].webhook_auth:`` — how the bot verifies requests to this callback's
    webhooks before delivering them (401 and an audit record otherwise)."""

    #: Requests must carry ``Authorization: Bearer <token>``.
    bearer: SecretStr | None = Field(default=None, examples=["${ALERTMANAGER_TOKEN}"])
    hmac: HmacSettings | None = None
    #: Deliberately accept requests nobody signed (the bot logs a warning otherwise).
    none: bool = False

    @model_validator(mode="after")
    def _one_way(self) -> WebhookAuth:
        chosen = [name for name, on in (("bearer", self.bearer), ("hmac", self.hmac), ("none", self.none)) if on]
        if len(chosen) != 1:
            raise ValueError(f"choose one of bearer, hmac or none, not {' and '.join(chosen) or 'none of them'}")
        if self.bearer is not None and len(self.bearer.get_secret_value()) < 16:
            raise ValueError("a bearer token must be at least 16 characters")
        return self


class ScheduleSettings(_Strict):
    """``callbacks[].schedules[]:`` — a schedule the operator declares for a callback."""

    id: str | None = None
    cron: str | None = Field(default=None, examples=["0 9 * * mon-fri"])
    #: IANA time zone the cron expression is read in.
    time_zone: str = Field(default="UTC", examples=["Europe/Paris"])
    #: Seconds between firings, instead of cron.
    every: float | None = Field(default=None, gt=0, examples=[300])
    #: A slot missed while no bot ran fires once, late, when at most this many seconds old.
    catch_up: float = Field(default=0.0, ge=0)

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        from ._schedules import cron_problem  # cronsim loads only for a config with schedules

        problem = None if value is None else cron_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("time_zone")
    @classmethod
    def _known_time_zone(cls, value: str) -> str:
        from ._schedules import time_zone_problem

        problem = time_zone_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _cron_or_every(self) -> ScheduleSettings:
        if (self.cron is None) == (self.every is None):
            raise ValueError("give either cron (such as '*/5 * * * *') or every (seconds), not both or neither")
        return self


_EVENT_NAMES = ("membership", "topic", "reaction", "edit")


class Capabilities(_Strict):
    """``callbacks[].capabilities:`` — what a callback may do through the API. The
    defaults allow everything, as a quick start needs; narrow them in production."""

    #: Room and user ids it may send to, as shell-style patterns ("irc/#ops", "matrix/*").
    send: list[str] = Field(default_factory=lambda: ["*"])
    #: Join and Part rooms.
    join: bool = True
    #: The Storage service (its own namespace).
    storage: bool = True
    #: The Directory service (users and rooms the bot knows).
    directory: bool = True
    #: The Authorization service (CheckPermission).
    check_permission: bool = True
    #: Event kinds beyond chat messages it may ask for.
    events: list[str] = Field(default_factory=lambda: list(_EVENT_NAMES))
    #: Specific data stores (types, shell-style patterns) it may get access to.
    datastores: list[str] = Field(default_factory=lambda: ["*"])
    #: Topics it may publish to (dot-separated; `*` matches one segment, a final `#` any).
    publish: list[str] = Field(default_factory=lambda: ["#"])
    #: Topics it may subscribe to (same syntax); the bot's own are under ``oco.``.
    subscribe: list[str] = Field(default_factory=lambda: ["#"])
    #: Declare webhook routes (served at /hooks/<callback id>/...).
    webhooks: bool = True
    #: Declare schedules.
    schedules: bool = True

    @field_validator("events")
    @classmethod
    def _known_events(cls, value: list[str]) -> list[str]:
        unknown = [e for e in value if e not in _EVENT_NAMES]
        if unknown:
            raise ValueError(f"unknown event kind(s) {', '.join(map(repr, unknown))}; known: {', '.join(_EVENT_NAMES)}")
        return value


class ApprovalSettings(_Strict):
    """``callbacks[].route_rules.<route id>.approval:`` — a match of the route waits until
    ``count`` people holding ``role`` (not the person who asked) approve it in chat."""

    role: str = Field(min_length=1, examples=["approvers"])
    #: Approvals needed, each by a different person.
    count: int = Field(default=1, ge=1, le=10)
    #: How long the match waits for them (``10m``, ``1h`` or seconds); then it is dropped.
    timeout: float = Field(default=600.0, gt=0, le=86400)

    _timeout = field_validator("timeout", mode="before")(lambda value: _duration(value))


class RouteRule(_Strict):
    """``callbacks[].route_rules.<route id>:`` — the operator's rule for one route,
    which wins over what the callback declared."""

    #: The permission a person needs; "" means none, even if the callback asked for one.
    permission: str | None = None
    #: When set, the route matches only in these rooms (shell-style patterns of room ids).
    allow_rooms: list[str] | None = None
    #: The route never matches in these rooms.
    deny_rooms: list[str] = Field(default_factory=list)
    #: Matches wait for people holding a role to approve them (``_approvals``).
    approval: ApprovalSettings | None = None


class CallbackSettings(_Strict):
    """One entry of ``callbacks:``."""

    id: str = Field(examples=["weather"])
    command: list[str] | None = Field(default=None, min_length=1, examples=[["python", "weather.py"]])
    secret: SecretStr | None = Field(default=None, examples=["${WEATHER_SECRET}"])
    routes: list[RouteSettings] = Field(
        default_factory=list, examples=[[{"pattern": "weather (\\w+)", "respond": True}]]
    )
    env: dict[str, str] = Field(default_factory=dict, examples=[{"UNITS": "metric"}])
    #: Variables of the bot's own environment a launched callback gets (shell-style
    #: patterns; ["*"] for all). The default passes what programs need to run, and not
    #: the passwords the bot's config reads from its environment.
    inherit_env: list[str] = Field(default_factory=lambda: list(DEFAULT_INHERITED_ENV))
    cwd: Path | None = None
    restart_backoff_max: float = Field(default=60.0, gt=0)
    #: Starts in a row that fail the same way (same exit status and last line of output,
    #: each within a minute) after which the bot stops restarting it; 0: never stop.
    give_up_after: int = Field(default=5, ge=0)
    #: Lines of its output the bot logs a second, after a burst of ten seconds' worth;
    #: the rest are dropped and counted in one WARNING when logging resumes.
    output_lines_per_second: float = Field(default=100.0, gt=0)
    #: This callback's storage quota, instead of ``store.quota``.
    quota: QuotaConfig | None = None
    #: Specific data stores (types) it needs; `oco check-config` says whether the bot
    #: offers them. A callback also declares them itself when it connects.
    requires: list[str] = Field(default_factory=list, examples=[["postgresql"]])
    capabilities: Capabilities = Field(default_factory=Capabilities)
    route_rules: dict[str, RouteRule] = Field(default_factory=dict)
    #: Messages it may send per minute (bursts up to that many); null: unlimited.
    rate_limit: int | None = Field(default=None, gt=0)
    #: Client certificate and key a launched callback presents under mutual TLS
    #: (passed as OCO_TLS_CERT and OCO_TLS_KEY).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: How requests to its webhooks are verified.
    webhook_auth: WebhookAuth | None = None
    #: Schedules the operator declares for it, beside those it declares itself.
    schedules: list[ScheduleSettings] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if not _CALLBACK_ID.fullmatch(value):
            raise ValueError("callback ids are 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        return value

    @model_validator(mode="after")
    def _valid_secret(self) -> CallbackSettings:
        # Neither command nor secret: the secret's hash is in the store (`oco callbacks add`).
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"callback {self.id!r}: give both tls_cert and tls_key, or neither")
        if self.secret is not None and len(self.secret.get_secret_value()) < 16:
            raise ValueError(f"callback {self.id!r}: a secret must be at least 16 characters")
        first: dict[str, int] = {}
        for index, route in enumerate(self.routes):
            # The router and route_rules know a route by its id, which defaults to its
            # pattern: a second one would silently replace the first.
            route_id = route.id or route.pattern
            if route_id in first:
                key = "id" if route.id else "pattern"
                raise _LocatedError(
                    ("routes", index, key),
                    f"callback {self.id!r} declares route {route_id!r} twice (routes[{first[route_id]}] and "
                    f"routes[{index}]); give one a distinct id:",
                )
            first[route_id] = index
        return self


def _bundled_example() -> CallbackSettings:
    import sys

    return CallbackSettings(id="example", command=[sys.executable, "-m", "oco_core.examples.ping"])


class AuditSettings(_Strict):
    """``auth.audit:`` — the audit log in the core store."""

    #: Records older than this are deleted (checked hourly); null keeps them forever.
    retention_days: float | None = Field(default=90, gt=0)
    #: Records held in memory while the store is behind or away; more are dropped and counted.
    max_pending: int = Field(default=100_000, gt=0)


class AuthSettings(_Strict):
    """``auth:`` — who may run what. People hold roles; roles grant permissions; a
    route may require a permission. Roles granted from chat live in the core store."""

    #: Adapter user ids ("irc/alice", "matrix/@alice:example.org") that hold every
    #: permission and may manage roles from chat.
    admins: list[str] = Field(default_factory=list, examples=[["irc/alice"]])
    #: Role name → permissions it grants ("deploy", "deploy.*", "*"). A role not named
    #: here grants the permission of its own name.
    roles: dict[str, list[str]] = Field(default_factory=dict, examples=[{"deployers": ["deploy", "deploy.staging.*"]}])
    #: Roles every person holds.
    default_roles: list[str] = Field(default_factory=list, examples=[["deployers"]])
    #: Commands (messages that match a route) one person may trigger per minute; null: unlimited.
    rate_limit: int | None = Field(default=None, gt=0)
    #: Seconds an `oco link` request waits for confirmation from the other account.
    link_timeout: float = Field(default=600, gt=0)
    audit: AuditSettings = Field(default_factory=AuditSettings)

    @field_validator("admins")
    @classmethod
    def _qualified(cls, value: list[str]) -> list[str]:
        bare = [a for a in value if "/" not in a]
        if bare:
            raise ValueError(
                f"admin ids name their adapter, as in 'irc/alice' or 'matrix/@alice:example.org', not {bare[0]!r}"
            )
        return value


class Config(_Strict):
    """The whole configuration file."""

    bot: BotSettings = Field(default_factory=BotSettings)
    #: None (no ``adapters:`` key): the installed adapter type that offers itself as the
    #: default (``AdapterType.default``; the built-in ``shell`` does), with its defaults.
    adapters: list[AdapterEntry] | None = Field(default=None, examples=[[{"type": "shell"}]])
    store: StoreSettings = Field(default_factory=StoreSettings)
    #: Specific data stores offered to callbacks (one entry per type).
    datastores: list[DataStoreEntry] = Field(default_factory=list, examples=[[{"type": "postgresql"}]])
    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
    callbacks: list[CallbackSettings] = Field(
        default_factory=lambda: [_bundled_example()],
        examples=[[{"id": "weather", "command": ["python", "weather.py"]}]],
    )
    auth: AuthSettings = Field(default_factory=AuthSettings)
    #: The bot's HTTP server; none unless configured.
    http: HttpSettings | None = None
    #: The operator console on the HTTP server (needs ``http:``); off unless configured.
    console: ConsoleSettings | None = None
    events: EventSettings = Field(default_factory=EventSettings)
    #: High availability (one active bot, any number of standbys); off unless configured.
    ha: HaSettings | None = None
    log_level: str = Field(default="INFO", examples=["info"])
    #: How `oco run` writes its log: ``text`` lines, or ``json``, one object a line
    #: (time, level, logger, message, exception), for a log shipper.
    log_format: Literal["text", "json"] = "text"
    #: A file `oco run` logs to instead of standard error, rotated by size.
    log_file: Path | None = Field(default=None, examples=["/var/log/oco/oco.log"])
    #: Size at which the log file is rotated (renamed to ``.1``, and so on).
    log_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    #: Rotated log files kept beside the current one; the oldest goes.
    log_backups: int = Field(default=5, ge=1)
    #: Where `oco run` writes its process id (and, beside it, how the last reload went)
    #: for `oco reload`; default: beside ``grpc.address_file`` when that is set.
    pid_file: Path | None = Field(default=None, examples=["/run/oco/oco.pid"])

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.lower() not in _LOG_LEVELS:
            raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)} (in any case), not {value!r}")
        return value

    @model_validator(mode="after")
    def _console_needs_http(self) -> Config:
        if self.console is not None and self.http is None:
            raise _LocatedError(
                ("console",),
                "the console is served by the bot's HTTP server, and http: is not set: add "
                "http: {listen: 127.0.0.1:8080} (or remove console:)",
            )
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        # Each complaint points at the second occurrence: the first is fine on its own.
        seen: dict[str, int] = {}
        for index, entry in enumerate(self.adapters or []):
            if entry.instance_name in seen:
                raise _LocatedError(
                    ("adapters", index, "name" if entry.name else "type"),
                    f"adapters[{seen[entry.instance_name]}] is named {entry.instance_name!r} too; give one a "
                    "distinct `name:` (it prefixes that adapter's room and user ids)",
                )
            seen[entry.instance_name] = index
        kinds: dict[str, int] = {}
        for index, datastore in enumerate(self.datastores):
            if datastore.type in kinds:
                raise _LocatedError(
                    ("datastores", index, "type"),
                    f"{datastore.type!r} is offered by datastores[{kinds[datastore.type]}] already; "
                    "offer each data-store type once",
                )
            kinds[datastore.type] = index
        ids: dict[str, int] = {}
        secrets: dict[str, int] = {}
        for index, cb in enumerate(self.callbacks):
            if cb.id in ids:
                raise _LocatedError(
                    ("callbacks", index, "id"),
                    f"callback id {cb.id!r} appears twice (callbacks[{ids[cb.id]}] has it too); give each its own id",
                )
            ids[cb.id] = index
            if cb.secret is not None:
                # The bot tells callers apart by their secret alone: a shared one would
                # make every caller holding it the same callback.
                secret = cb.secret.get_secret_value()
                if secret in secrets:
                    other = self.callbacks[secrets[secret]].id
                    raise _LocatedError(
                        ("callbacks", index, "secret"),
                        f"callback {cb.id!r} has the same secret as callback {other!r}; give each callback its own "
                        "(a caller is known by its secret alone)",
                    )
                secrets[secret] = index
        return self


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated config and where each key came from, for later plugin errors."""

    config: Config
    source: str
    lines: Mapping[tuple[str | int, ...], int]

    def error(self, loc: Sequence[str | int], message: str) -> ConfigError:
        """A ConfigError pointing at ``loc`` in the file."""
        return ConfigError(_describe(self.source, self.lines, tuple(loc), message))


def _describe(source: str, lines: Mapping[tuple[str | int, ...], int], loc: tuple[str | int, ...], msg: str) -> str:
    where = source
    probe = loc
    while probe and probe not in lines:
        probe = probe[:-1]
    if probe in lines:
        where += f", line {lines[probe]}"
    return f"{where}: {_dotted(loc) or 'top level'}: {msg}"


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


#: Deepest nesting of mappings and lists a config file may have (a real one has fewer
#: than ten levels). Fixed, not a config key: a file cannot configure its own parser.
MAX_YAML_DEPTH = 50
#: Most values a config file may repeat through aliases (``*name`` of an ``&name``), all
#: repetitions counted: nine nested aliases of nine items each ("billion laughs") would
#: otherwise build 387 million values from 500 bytes. Fixed, as MAX_YAML_DEPTH.
MAX_YAML_ALIAS_NODES = 10_000


class _TooDeepError(Exception):
    def __init__(self, line: int, column: int) -> None:
        self.line, self.column = line, column


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing nesting past MAX_YAML_DEPTH while it composes (PyYAML
    composes recursively: a few thousand ``[`` were a RecursionError traceback)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH + 1:  # the document's own node is not nesting
                mark: yaml.Mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise _TooDeepError(mark.line + 1, mark.column + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


@dataclass
class _Expansion:
    """Nodes met so far while converting, to count what aliases repeat."""

    seen: set[int]
    repeated: int = 0


def _convert(
    node: yaml.Node,
    loader: yaml.SafeLoader,
    path: tuple[str | int, ...],
    lines: dict[Any, int],
    expansion: _Expansion | None = None,
) -> Any:
    """Build plain data from a YAML node tree, substituting ${VAR} and noting lines."""
    expansion = expansion or _Expansion(set())
    line = node.start_mark.line + 1
    if len(path) > MAX_YAML_DEPTH:
        # Only aliases nest this deep here: the loader refused deeper text.
        raise ConfigError(
            f"line {line}: {_dotted(path[:2])}: nested deeper than {MAX_YAML_DEPTH} levels through aliases "
            "(is an alias inside its own anchor?)"
        )
    if id(node) in expansion.seen:
        # Met before: an alias repeats this node (and all below it, counted as met).
        expansion.repeated += 1
        if expansion.repeated > MAX_YAML_ALIAS_NODES:
            raise ConfigError(
                f"line {line}: {_dotted(path) or 'top level'}: aliases repeat more than {MAX_YAML_ALIAS_NODES:,} "
                "values; refusing what may be an alias bomb (write the values out, or alias fewer)"
            )
    else:
        expansion.seen.add(id(node))
    lines[path] = line
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                # `<<: *defaults` (or a list of them): their keys, which the mapping's own
                # keys override, and the first of several sources wins, as YAML says.
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for source in sources:
                    if not isinstance(source, yaml.MappingNode):
                        raise ConfigError(f"line {key_node.start_mark.line + 1}: `<<` merges mappings only")
                    for merged_key, merged_value in _convert(source, loader, path, lines, expansion).items():
                        result.setdefault(merged_key, merged_value)
                lines[path] = line
        merged_keys = set(result)
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise ConfigError(f"line {key_node.start_mark.line + 1}: keys must be text, not {key!r}")
            if key in result and key not in merged_keys:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice")
            merged_keys.discard(key)
            result[key] = _convert(value_node, loader, (*path, key), lines, expansion)
            # A key's errors point at the key: a block value (the list under
            # `callbacks:`) starts on a later line than the key it belongs to.
            lines[(*path, key)] = key_node.start_mark.line + 1
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, loader, (*path, i), lines, expansion) for i, item in enumerate(node.value)]
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str" and "${" in node.value:
        return _substitute(node.value, node.start_mark.line + 1, path)
    return loader.construct_object(node, deep=True)


def _substitute(value: str, line: int, path: tuple[str | int, ...]) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if found is None or (found == "" and default is not None):
            if default is None:
                raise ConfigError(
                    f"line {line}: {_dotted(path)}: environment variable {name} is not set "
                    f"(set it, or write ${{{name}:-default}})"
                )
            return default
        return found

    return _VAR.sub(replace, value)


def _yaml_error(source: str, exc: yaml.YAMLError) -> ConfigError:
    """What the YAML parser or constructor refused, in one line with its place."""
    mark = getattr(exc, "problem_mark", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return ConfigError(f"{source}{where}: not valid YAML: {problem}")


def parse_config(text: str, source: str = "<config>") -> LoadedConfig:
    """Validate config ``text``; raise ConfigError naming file, line and key."""
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
        except _TooDeepError as exc:
            raise ConfigError(
                f"{source}, line {exc.line}, column {exc.column}: "
                f"nested deeper than {MAX_YAML_DEPTH} levels; refusing it"
            ) from None
        except yaml.YAMLError as exc:
            raise _yaml_error(source, exc) from None
        lines: dict[Any, int] = {}
        try:
            data = {} if node is None else _convert(node, loader, (), lines)
        except ConfigError as exc:
            raise ConfigError(f"{source}, {exc}") from None
        except yaml.YAMLError as exc:  # what the constructor refuses (a tag it does not know)
            raise _yaml_error(source, exc) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping of keys (bot:, adapters:, ...), not {_kind(data)}")
    # Top-level keys starting with x- are the file's own (anchors for `<<: *defaults`,
    # as in docker compose files): not the bot's.
    data = {key: value for key, value in data.items() if not key.startswith("x-")}
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc, source, lines, Config)) from None
    return LoadedConfig(config, source, lines)


def load_config(path: str | os.PathLike[str] | None) -> LoadedConfig:
    """Load the config file at ``path``; with None, the defaults (no file)."""
    if path is None:
        return LoadedConfig(Config(), "<defaults>", {})
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (omit --config to run with the defaults)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from None
    return parse_config(text, str(path))


def validate_section(
    loaded: LoadedConfig, loc: Sequence[str | int], model: type[BaseModel], data: Mapping[str, Any]
) -> BaseModel:
    """Validate a plugin's own section with the model it declared."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc, loaded.source, loaded.lines, model, tuple(loc))) from None


def _validation_message(
    exc: ValidationError,
    source: str,
    lines: Mapping[tuple[str | int, ...], int],
    model: type[BaseModel],
    prefix: tuple[str | int, ...] = (),
) -> str:
    """One line per problem, in the file's order, each naming file, line and key and
    saying what is expected; pydantic's own wording never reaches the user."""
    problems = []
    # The model holding a plugin's section (AdapterEntry, StoreSettings) owns the keys
    # beside the plugin's own (type, name, quota): a misspelling may be near either.
    beside = _model_at(Config, prefix) if prefix else None
    for error in exc.errors(include_url=False):
        inner = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, _LocatedError):
            inner = (*inner, *cause.loc)
        loc = (*prefix, *inner)
        if error["type"] == "extra_forbidden":
            known = _keys_of(_model_at(model, inner[:-1]))
            if beside is not None and len(inner) == 1:
                known = sorted({*known, *_keys_of(beside)})
            message = _unknown_key(str(loc[-1]), known)
        else:
            message = _explain(error, model, inner)
        problems.append((_line_of(lines, loc), _describe(source, lines, loc, message)))
    return "\n".join(text for _, text in sorted(problems, key=lambda p: p[0]))


def _unknown_key(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listing = f" (known keys: {', '.join(known)})" if known else ""
    return f"unknown key {key!r}{hint}{listing}"


def _line_of(lines: Mapping[tuple[str | int, ...], int], loc: tuple[str | int, ...]) -> int:
    while loc and loc not in lines:
        loc = loc[:-1]
    return lines.get(loc, 0)


#: What each kind of value is called in messages, by pydantic's error type.
_EXPECTED = {
    "string_type": "text",
    "list_type": "a list",
    "tuple_type": "a list",
    "set_type": "a list",
    "dict_type": "a mapping of keys",
    "model_type": "a mapping of keys",
    "model_attributes_type": "a mapping of keys",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "path_type": "a file path",
    "none_required": "null",
}


def _explain(error: Any, model: type[BaseModel], loc: tuple[str | int, ...]) -> str:
    """What a pydantic error means, in OCO's words: what is expected, what was given
    (its kind, never its value: it may be a secret) and an example."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    name, field = _field_at(model, loc)
    example = _example(name, field) if field is not None else ""
    if kind == "value_error" or kind == "assertion_error":
        return str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "missing":
        return "required" + (f", for example {example}" if example else "")
    if kind in _EXPECTED:
        got = f", not {_kind(error['input'])}" if "input" in error and kind != "int_from_float" else ""
        what = f"expected {_EXPECTED[kind]}{got}"
        if kind in ("model_type", "model_attributes_type", "dict_type") and field is not None:
            keys = _keys_of(_model_at(model, loc))
            if keys:
                what += f" (keys: {', '.join(keys)})"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        words = {
            "greater_than": "more than",
            "greater_than_equal": "at least",
            "less_than": "less than",
            "less_than_equal": "at most",
        }[kind]
        limit = next(iter(ctx.values()), "")
        what = f"must be {words} {limit}"
    elif kind in ("too_short", "string_too_short"):
        least = ctx.get("min_length", 1)
        things = "character" if kind == "string_too_short" else "item"
        what = "must not be empty" if least == 1 else f"needs at least {least} {things}s"
    elif kind in ("too_long", "string_too_long"):
        things = "characters" if kind == "string_too_long" else "items"
        what = f"may have at most {ctx.get('max_length')} {things}"
    elif kind in ("literal_error", "enum"):
        what = f"expected {ctx.get('expected', 'one of the documented values')}"
    elif kind == "string_pattern_mismatch":
        what = "is not in the expected form"
    elif kind in ("path_not_file", "path_not_directory", "path_not_exists"):
        thing = {"path_not_file": "file", "path_not_directory": "directory"}.get(kind, "file or directory")
        what = f"no such {thing}: expected the path of an existing {thing}"
    else:
        what = "is not a valid value here"
    return what + (f"; for example {example}" if example else "")


def _example(key: str, field: FieldInfo) -> str:
    """``key: value`` from the field's first example, else its default when that says
    something; "" when neither does."""
    if field.examples:
        value = field.examples[0]
    elif isinstance(field.default, bool | int | float) or (isinstance(field.default, str | list) and field.default):
        value = field.default  # an empty default (or None) shows nothing worth copying
    else:
        return ""
    return f"`{key}: {_yaml_flow(value)}`"


def _yaml_flow(value: Any) -> str:
    """``value`` as YAML on one line (JSON is YAML; plain words need no quotes)."""
    plain = isinstance(value, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*|\$\{[A-Z_]+\}", value)
    if plain and value.lower() not in ("true", "false", "yes", "no", "on", "off", "null"):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _unwrap(annotation: Any) -> list[Any]:
    """The types ``annotation`` allows (``X | None`` is X and None)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _step(annotation: Any, part: str | int) -> tuple[Any, FieldInfo | None] | None:
    for option in _unwrap(annotation):
        origin = typing.get_origin(option)
        if isinstance(part, int) and origin in (list, tuple, set, frozenset):
            return typing.get_args(option)[0], None
        if isinstance(part, str) and origin is dict:
            return typing.get_args(option)[1], None
        if isinstance(part, str) and isinstance(option, type) and issubclass(option, BaseModel):
            found = option.model_fields.get(part)
            if found is not None:
                return found.annotation, found
    return None


def _field_at(model: type[BaseModel], loc: Iterable[str | int]) -> tuple[str, FieldInfo | None]:
    """The innermost field a model declares along ``loc``, and its key (for
    ``auth.roles.ops``: ``roles``); ("", None) when none does."""
    annotation: Any = model
    named: tuple[str, FieldInfo | None] = ("", None)
    for part in loc:
        found = _step(annotation, part)
        if found is None:
            break
        annotation, latest = found
        if latest is not None:
            named = (str(part), latest)
    return named


def _model_at(model: type[BaseModel], loc: Iterable[str | int]) -> type[BaseModel] | None:
    """The model that validates the mapping at ``loc``, if one does."""
    annotation: Any = model
    for part in loc:
        found = _step(annotation, part)
        if found is None:
            return None
        annotation = found[0]
    return next((a for a in _unwrap(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _keys_of(model: type[BaseModel] | None) -> list[str]:
    return sorted(model.model_fields) if model is not None else []


def _kind(value: object) -> str:
    if value is None:
        return "an empty value"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    return "text" if isinstance(value, str) else type(value).__name__


# -- checks that need the machine, not just the file ------------------------------------


def callback_search_path(cb: CallbackSettings, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The PATH a launched callback gets, and where it comes from (for messages).

    When the bot runs in a virtual environment, its bin directory comes first, as ``npm
    run`` puts node_modules/.bin first: ``command: ["python", "weather.py"]`` then runs the
    Python that has oco_core installed, even when the bot was started as
    ``.venv/bin/oco run`` from a shell whose venv is not activated. The rest is the bot's PATH (when
    ``inherit_env`` passes it) or the system default. A PATH in the callback's ``env:``
    is used exactly as written.
    """
    environ = os.environ if environ is None else environ
    if "PATH" in cb.env:
        return cb.env["PATH"], "the callback's env: PATH"
    if any(fnmatch.fnmatchcase("PATH", p) for p in cb.inherit_env) and "PATH" in environ:
        rest, origin = environ["PATH"], "the bot's PATH"
    else:
        rest, origin = os.defpath, f"the system default PATH {os.defpath} (inherit_env: does not pass PATH)"
    # Only a virtual environment's (venv, pipx): a system Python's directory (/usr/bin)
    # first would change which node or go a callback runs. Not resolved: a venv's python
    # is a symlink to the base interpreter, whose directory has neither oco_core nor the
    # venv's scripts.
    in_venv = sys.prefix != sys.base_prefix
    interpreter_dir = os.path.dirname(sys.executable) if sys.executable and in_venv else ""
    if not interpreter_dir:
        return rest, origin
    return os.pathsep.join([interpreter_dir, rest]), f"{origin} after the bot's interpreter directory {interpreter_dir}"


def launch_problem(cb: CallbackSettings, environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """Why the bot could not start launched callback ``cb`` on this machine: its
    ``command``'s program is not found (on the PATH the callback gets, or at the path
    given) or its ``cwd`` is not a directory. None when it could start, or when it is
    not launched; else the config key at fault and the message.

    A check of this machine as it is now, with ``environ`` (default: this process's
    environment) as the bot's: `oco check-config` refuses on it; `oco run` logs it and
    tries anyway, since the bot's own PATH may differ from the shell's (a start that
    fails counts towards ``give_up_after`` like any failure).
    """
    if cb.command is None:
        return None
    environ = os.environ if environ is None else environ
    if cb.cwd is not None and not cb.cwd.is_dir():
        return "cwd", f"{str(cb.cwd)!r} is not a directory; create it or change cwd:"
    program = cb.command[0]
    if "/" in program:
        # As the process starts: relative to its cwd, without a PATH search.
        path = Path(program) if cb.cwd is None else cb.cwd / program
        if not path.is_file():
            where = f" (relative to cwd {str(cb.cwd)!r})" if cb.cwd is not None and not path.is_absolute() else ""
            return "command", f"program {program!r} does not exist{where}; fix the path in command:"
        if not os.access(path, os.X_OK):
            return (
                "command",
                f"program {program!r} is not executable; chmod +x {program}, or name its interpreter first",
            )
        return None
    search, origin = callback_search_path(cb, environ)
    if shutil.which(program, path=search) is None:
        elsewhere = shutil.which(program)
        fix = f"give its full path ({elsewhere} here)" if elsewhere else "give its full path"
        return "command", (
            f"program {program!r} is not found on {origin}; install it, {fix}, or set PATH in the callback's env:"
        )
    return None
