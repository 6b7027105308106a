"""Configuration: one pipeline from a YAML file to validated models.

read the file → parse YAML (keeping line numbers) → substitute ``${VAR}`` and
``${VAR:-default}`` in string values → validate with strict models → let each plugin
validate its own section with the model it declared. Every error names the file, the
line and the key, and what to do. Secrets are ``SecretStr``: never shown in errors,
logs or ``repr``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

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
_CALLBACK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def default_data_dir() -> Path:
    """Where OCO keeps its files when the config does not say: $XDG_DATA_HOME/oco."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "oco"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BotSettings(_Strict):
    """``bot:`` — who the bot is."""

    name: str = Field(default="oco", min_length=1, description="How people address the bot.")
    aliases: list[str] = Field(default_factory=list, description='Extra prefixes, such as "!".')
    max_message_bytes: int = Field(
        default=16384, gt=0, description="Largest message body a callback may send (RESOURCE_EXHAUSTED past it)."
    )


class AdapterEntry(BaseModel):
    """One entry of ``adapters:``: ``type`` and ``name``; every other key goes to the
    adapter's own config model."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str = Field(min_length=1)
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$")

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

    type: str = Field(min_length=1)

    def options(self) -> dict[str, Any]:
        """The keys beside ``type``."""
        return dict(self.model_extra or {})


class StoreSettings(BaseModel):
    """``store:`` — ``type``; every other key goes to the store's model. Without a
    ``type`` the bot uses the installed store plugin that offers itself as the default
    (``StoreType.default``; the built-in ``sql`` store does)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str | None = Field(default=None, min_length=1)
    #: Default storage quota of every callback (``callbacks[].quota`` overrides it).
    quota: QuotaConfig = Field(default_factory=QuotaConfig)

    def options(self) -> dict[str, Any]:
        """The keys beside ``type``."""
        return dict(self.model_extra or {})


class TlsSettings(_Strict):
    """``grpc.tls:`` — serve the API over TLS, and optionally require client certificates."""

    cert: Path = Field(description="The server's certificate chain (PEM).")
    key: Path = Field(description="The server's private key (PEM).")
    #: With a client CA, every caller must present a certificate it signed, whose
    #: common name or a subject alternative name is the callback's id (mutual TLS).
    client_ca: Path | None = None
    #: The CA launched callbacks trust for the server's certificate (OCO_TLS_CA);
    #: default: the system's roots.
    server_ca: Path | None = None
    #: The name launched callbacks expect in the server's certificate
    #: (OCO_TLS_SERVER_NAME); default: the host of ``grpc.listen``.
    server_name: str | None = None


class GrpcSettings(_Strict):
    """``grpc:`` — the API callback programs connect to."""

    listen: str = Field(default="127.0.0.1:50051", description="host:port; port 0 picks a free one.")
    max_receive_bytes: int = Field(default=4 << 20, gt=0, description="Largest request accepted.")
    stream_queue: int = Field(default=1000, gt=0, description="Events queued per Listen stream before dropping.")
    shutdown_grace: float = Field(default=5.0, ge=0, description="Seconds running calls get at shutdown.")
    #: Where to write the actual address once listening (useful with port 0).
    address_file: Path | None = None
    #: TLS for the API; without it the API is plaintext (keep it on 127.0.0.1 then).
    tls: TlsSettings | None = None

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected host:port, such as 127.0.0.1:50051, not {value!r}")
        return value


class RouteSettings(_Strict):
    """A route the operator declares for a callback that cannot declare its own."""

    pattern: str = Field(min_length=1)
    respond: bool = False
    help: str = ""
    id: str | None = None
    permission: str = ""
    ignore_case: bool = False


_EVENT_NAMES = ("membership", "topic")


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

    @field_validator("events")
    @classmethod
    def _known_events(cls, value: list[str]) -> list[str]:
        unknown = [e for e in value if e not in _EVENT_NAMES]
        if unknown:
            raise ValueError(f"unknown event kind(s) {', '.join(map(repr, unknown))}; known: {', '.join(_EVENT_NAMES)}")
        return value


class RouteRule(_Strict):
    """``callbacks[].route_rules.<route id>:`` — the operator's rule for one route,
    which wins over what the callback declared."""

    #: The permission a person needs; "" means none, even if the callback asked for one.
    permission: str | None = None
    #: When set, the route matches only in these rooms (shell-style patterns of room ids).
    allow_rooms: list[str] | None = None
    #: The route never matches in these rooms.
    deny_rooms: list[str] = Field(default_factory=list)


class CallbackSettings(_Strict):
    """One entry of ``callbacks:``."""

    id: str
    command: list[str] | None = Field(default=None, min_length=1)
    secret: SecretStr | None = None
    routes: list[RouteSettings] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    #: Variables of the bot's own environment a launched callback gets (shell-style
    #: patterns; ["*"] for all). The default passes what programs need to run, and not
    #: the passwords the bot's config reads from its environment.
    inherit_env: list[str] = Field(default_factory=lambda: list(DEFAULT_INHERITED_ENV))
    cwd: Path | None = None
    restart_backoff_max: float = Field(default=60.0, gt=0)
    #: This callback's storage quota, instead of ``store.quota``.
    quota: QuotaConfig | None = None
    #: Specific data stores (types) it needs; `oco check-config` says whether the bot
    #: offers them. A callback also declares them itself when it connects.
    requires: list[str] = Field(default_factory=list)
    capabilities: Capabilities = Field(default_factory=Capabilities)
    route_rules: dict[str, RouteRule] = Field(default_factory=dict)
    #: Messages it may send per minute (bursts up to that many); null: unlimited.
    rate_limit: int | None = Field(default=None, gt=0)
    #: Client certificate and key a launched callback presents under mutual TLS
    #: (passed as OCO_TLS_CERT and OCO_TLS_KEY).
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if not _CALLBACK_ID.match(value):
            raise ValueError("callback ids are 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        return value

    @model_validator(mode="after")
    def _valid_secret(self) -> CallbackSettings:
        # Neither command nor secret: the secret's hash is in the store (`oco callbacks add`).
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"callback {self.id!r}: give both tls_cert and tls_key, or neither")
        if self.secret is not None and len(self.secret.get_secret_value()) < 16:
            raise ValueError(f"callback {self.id!r}: a secret must be at least 16 characters")
        return self


def _bundled_example() -> CallbackSettings:
    import sys

    return CallbackSettings(id="example", command=[sys.executable, "-m", "oco_core.examples.ping"])


class AuditSettings(_Strict):
    """``auth.audit:`` — the audit log in the core store."""

    #: Records older than this are deleted (checked hourly); null keeps them forever.
    retention_days: float | None = Field(default=90, gt=0)


class AuthSettings(_Strict):
    """``auth:`` — who may run what. People hold roles; roles grant permissions; a
    route may require a permission. Roles granted from chat live in the core store."""

    #: Adapter user ids ("irc/alice", "matrix/@alice:example.org") that hold every
    #: permission and may manage roles from chat.
    admins: list[str] = Field(default_factory=list)
    #: Role name → permissions it grants ("deploy", "deploy.*", "*"). A role not named
    #: here grants the permission of its own name.
    roles: dict[str, list[str]] = Field(default_factory=dict)
    #: Roles every person holds.
    default_roles: list[str] = Field(default_factory=list)
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
    adapters: list[AdapterEntry] | None = None
    store: StoreSettings = Field(default_factory=StoreSettings)
    #: Specific data stores offered to callbacks (one entry per type).
    datastores: list[DataStoreEntry] = Field(default_factory=list)
    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
    callbacks: list[CallbackSettings] = Field(default_factory=lambda: [_bundled_example()])
    auth: AuthSettings = Field(default_factory=AuthSettings)
    log_level: str = Field(default="INFO", pattern=r"^(?i:debug|info|warning|error)$")

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        seen: set[str] = set()
        for entry in self.adapters or []:
            if entry.instance_name in seen:
                raise ValueError(
                    f"two adapters are named {entry.instance_name!r}; give one a distinct `name:` "
                    "(it prefixes that adapter's room and user ids)"
                )
            seen.add(entry.instance_name)
        types = [d.type for d in self.datastores]
        for kind in types:
            if types.count(kind) > 1:
                raise ValueError(f"datastores: {kind!r} appears twice; offer each data-store type once")
        ids = [c.id for c in self.callbacks]
        for cid in ids:
            if ids.count(cid) > 1:
                raise ValueError(f"callback id {cid!r} appears twice")
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


def _convert(node: yaml.Node, loader: yaml.SafeLoader, path: tuple[str | int, ...], lines: dict[Any, int]) -> Any:
    """Build plain data from a YAML node tree, substituting ${VAR} and noting lines."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise ConfigError(f"line {key_node.start_mark.line + 1}: keys must be text, not {key!r}")
            if key in result:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice")
            result[key] = _convert(value_node, loader, (*path, key), lines)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, loader, (*path, i), lines) for i, item in enumerate(node.value)]
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


def parse_config(text: str, source: str = "<config>") -> LoadedConfig:
    """Validate config ``text``; raise ConfigError naming file, line and key."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"{source}{where}: not valid YAML: {problem}") from None
        lines: dict[Any, int] = {}
        try:
            data = {} if node is None else _convert(node, loader, (), lines)
        except ConfigError as exc:
            raise ConfigError(f"{source}, {exc}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping of keys (bot:, adapters:, ...), not a {_kind(data)}")
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
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = (*prefix, *(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            known = _known_keys(model, tuple(error["loc"][:-1]))
            message = f"unknown key {str(loc[-1])!r}" + (f" (known keys: {', '.join(known)})" if known else "")
        problems.append(_describe(source, lines, loc, message))
    return "\n".join(problems)


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field_info = getattr(current, "model_fields", {}).get(part)
        if field_info is None:
            return []
        annotation = field_info.annotation
        args = getattr(annotation, "__args__", ())
        current = next((a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def _kind(value: object) -> str:
    if isinstance(value, list):
        return "list"
    return "string" if isinstance(value, str) else type(value).__name__
