"""Console tokens, login sessions and the login throttle.

Tokens are made by ``oco console token create`` and kept in the core store's
``console`` namespace as SHA-256 digests, with their name, role and creation time
(``token/<name>``). A plain hash is enough: a token carries 256 random bits
(``secrets.token_urlsafe(32)``), so a slow password hash would protect nothing a
preimage search does not already make hopeless. Tokens start with ``occ_`` so that one
pasted into the wrong place (a chat, a ticket) is recognisable and greppable.

Sessions are kept in the store too (``session/<digest of the session id>``), not in the
bot's memory: a restart does not log everyone out, a standby's console (``ha:``) knows
the sessions made on the active bot behind the same address, and ``oco console token
revoke`` (another process) can end them. The store holds only the digest of a session
id, so whoever reads the store cannot take a session over. Every request reads its
session and its token again (two small reads: console traffic is a few requests a
minute), so a revoked token's sessions end at their next request, whichever process
revoked it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .._errors import StoreError, VersionConflictError
from .._store import Store
from .._timing import TokenBucket

log = logging.getLogger(__name__)

NAMESPACE = "console"
#: What every console token starts with.
TOKEN_PREFIX = "occ_"  # noqa: S105 (a prefix, not a secret)
#: What a console token may do: ``admin`` changes roles, ``viewer`` only reads.
ROLES = ("admin", "viewer")
ADMIN = "admin"
VIEWER = "viewer"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_PAGE = 500
#: Client addresses whose failed logins are remembered at once; beyond, those with none
#: recently are forgotten (an attacker with many addresses gets no more than that).
_MAX_THROTTLED = 10_000


class TokenNameError(ValueError):
    """A token name that is malformed or already taken; the message says what to do."""


def token_digest(token: str) -> str:
    """The hex SHA-256 digest the store keeps instead of ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str) -> str:
    """``name`` if it is a valid token name, else TokenNameError saying what one is."""
    if not _NAME.fullmatch(name):
        raise TokenNameError(
            f"invalid token name {name!r}: use 1 to 64 letters, digits and . _ @ - (starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True, slots=True)
class ConsoleToken:
    """A console token as the store keeps it (never the token itself)."""

    name: str
    role: str
    created: float
    digest: str


def _token_key(name: str) -> str:
    return f"token/{name}"


def _session_key(session_id: str) -> str:
    return f"session/{token_digest(session_id)}"


def _decode(data: bytes) -> dict[str, object] | None:
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _token_from(name: str, data: bytes) -> ConsoleToken | None:
    record = _decode(data)
    if record is None:
        log.warning("console: ignoring a malformed token record %r in the store", name)
        return None
    role, digest, created = record.get("role"), record.get("digest"), record.get("created")
    if role not in ROLES or not isinstance(digest, str) or not isinstance(created, int | float):
        log.warning("console: ignoring a malformed token record %r in the store", name)
        return None
    return ConsoleToken(name, str(role), float(created), digest)


async def create_token(store: Store, name: str, role: str) -> str:
    """Make a token named ``name`` with ``role`` and return it (the store keeps only its
    digest); TokenNameError when the name is malformed or taken."""
    check_name(name)
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    record = {"role": role, "digest": token_digest(token), "created": time.time()}
    try:
        await store.set(NAMESPACE, _token_key(name), json.dumps(record).encode(), expected_version=0)
    except VersionConflictError:
        raise TokenNameError(
            f"a console token named {name!r} exists already: choose another --name, or revoke it first "
            f"(oco console token revoke {name})"
        ) from None
    return token


async def list_tokens(store: Store) -> list[ConsoleToken]:
    """Every console token in the store, by name."""
    found: list[ConsoleToken] = []
    start = ""
    while True:
        page = await store.list(NAMESPACE, "token/", start_after=start, limit=_PAGE)
        for item in page:
            token = _token_from(item.key.removeprefix("token/"), item.value)
            if token is not None:
                found.append(token)
        if len(page) < _PAGE:
            return found
        start = page[-1].key


async def get_token(store: Store, name: str) -> ConsoleToken | None:
    """The token named ``name``, or None."""
    item = await store.get(NAMESPACE, _token_key(name))
    return None if item is None else _token_from(name, item.value)


async def find_token(store: Store, token: str) -> ConsoleToken | None:
    """The stored token ``token`` is, or None. Every stored digest is compared, in
    constant time each, so the answer's timing says nothing about near misses."""
    digest = token_digest(token)
    match: ConsoleToken | None = None
    for stored in await list_tokens(store):
        if hmac.compare_digest(stored.digest, digest):
            match = stored
    return match


async def revoke_token(store: Store, name: str) -> bool:
    """Delete the token ``name`` and its sessions; False when there was no such token.
    The sessions would end anyway (each request checks its token), this frees them."""
    existed = await store.delete(NAMESPACE, _token_key(name))
    await _delete_sessions(store, lambda session: session.name == name)
    return existed


@dataclass(frozen=True, slots=True)
class Session:
    """A login: who (the token's name and role), until when, and the CSRF token its
    forms carry."""

    name: str
    role: str
    expires: float
    csrf: str
    #: The digest of the token it was opened with: a token revoked and made again under
    #: the same name does not revive the old one's sessions.
    token: str

    @property
    def admin(self) -> bool:
        """Whether it may change things (grant and revoke roles)."""
        return self.role == ADMIN

    def to_json(self) -> bytes:
        """The session as stored."""
        record = {"name": self.name, "role": self.role, "expires": self.expires, "csrf": self.csrf, "token": self.token}
        return json.dumps(record).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Session | None:
        """A stored session, or None when the record is malformed."""
        record = _decode(data)
        if record is None:
            return None
        try:
            return cls(
                str(record["name"]),
                str(record["role"]),
                float(record["expires"]),  # type: ignore[arg-type]
                str(record["csrf"]),
                str(record["token"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


async def _delete_sessions(store: Store, which: Callable[[Session], bool]) -> int:
    """Delete the stored sessions ``which(session)`` picks (malformed ones too)."""
    removed = 0
    start = ""
    while True:
        page = await store.list(NAMESPACE, "session/", start_after=start, limit=_PAGE)
        for item in page:
            session = Session.from_json(item.value)
            if session is None or which(session):
                removed += bool(await store.delete(NAMESPACE, item.key))
        if len(page) < _PAGE:
            return removed
        start = page[-1].key


async def live_sessions(store: Store) -> dict[str, int]:
    """How many unexpired sessions each token name has (for ``oco console token list``)."""
    counts: dict[str, int] = {}
    now = time.time()
    start = ""
    while True:
        page = await store.list(NAMESPACE, "session/", start_after=start, limit=_PAGE)
        for item in page:
            session = Session.from_json(item.value)
            if session is not None and session.expires > now:
                counts[session.name] = counts.get(session.name, 0) + 1
        if len(page) < _PAGE:
            return counts
        start = page[-1].key


class Sessions:
    """Logins kept in the store, each ``ttl`` seconds long."""

    def __init__(self, store: Store, ttl: float) -> None:
        self._store = store
        self.ttl = ttl

    async def open(self, token: ConsoleToken) -> tuple[str, Session]:
        """A new session for ``token``: its id (the cookie's value) and the session."""
        now = time.time()
        # Expired sessions are removed here, at the rare login, not by a task of its own.
        await _delete_sessions(self._store, lambda session: session.expires <= now)
        session_id = secrets.token_urlsafe(32)
        session = Session(token.name, token.role, now + self.ttl, secrets.token_urlsafe(32), token.digest)
        await self._store.set(NAMESPACE, _session_key(session_id), session.to_json())
        return session_id, session

    async def get(self, session_id: str) -> Session | None:
        """The live session ``session_id`` names: None when there is none, it has
        expired, or its token was revoked. The role is the token's current one."""
        if not session_id or len(session_id) > 100:
            return None
        item = await self._store.get(NAMESPACE, _session_key(session_id))
        if item is None:
            return None
        session = Session.from_json(item.value)
        if session is None or session.expires <= time.time():
            return None
        token = await get_token(self._store, session.name)
        if token is None or not hmac.compare_digest(token.digest, session.token):
            return None
        return Session(session.name, token.role, session.expires, session.csrf, session.token)

    async def close(self, session_id: str) -> None:
        """End the session ``session_id`` (logging out)."""
        try:
            await self._store.delete(NAMESPACE, _session_key(session_id))
        except StoreError as exc:
            log.warning("console: could not delete a session from the store: %s", exc)


class LoginThrottle:
    """Failed logins per client address: ``per_minute``, in bursts of as many; past that
    an address is refused without its token being looked at, until the bucket refills."""

    def __init__(self, per_minute: int) -> None:
        self._per_minute = per_minute
        self._buckets: dict[str, TokenBucket] = {}

    def wait(self, client: str) -> float:
        """Seconds until ``client`` may try again (0: now)."""
        bucket = self._buckets.get(client)
        return 0.0 if bucket is None else bucket.delay(1)

    def failed(self, client: str) -> None:
        """Count one failed login from ``client``."""
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= _MAX_THROTTLED:
                self._forget_idle()
            bucket = self._buckets[client] = TokenBucket(self._per_minute, self._per_minute / 60)
        bucket.take(1)

    def _forget_idle(self) -> None:
        # An address whose bucket has refilled has no failures left to remember.
        full = [client for client, bucket in self._buckets.items() if bucket.delay(bucket.capacity) == 0]
        for client in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[client]


__all__: Sequence[str] = [
    "ADMIN",
    "ROLES",
    "TOKEN_PREFIX",
    "VIEWER",
    "ConsoleToken",
    "LoginThrottle",
    "Session",
    "Sessions",
    "TokenNameError",
    "create_token",
    "find_token",
    "list_tokens",
    "live_sessions",
    "revoke_token",
]
