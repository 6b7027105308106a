"""Callback secrets: who is calling.

A callback's secret comes from one of two places:

- the configuration: ``callbacks[].secret``, or a fresh one the bot makes for a
  callback it launches (``command:``);
- the core store: ``oco callbacks add <id>`` generates a secret, prints it once and
  keeps only its SHA-256 digest, in the namespace ``secrets``::

      digest/<hex digest>  → {"callback_id": ..., "created": <unix time>}
      callback/<id>        → {"digest": <hex digest>, "created": <unix time>}

  ``callback/<id>`` is the authority (one secret per callback, replaced by a
  compare-and-set); ``digest/<hex>`` is the index a call's secret is looked up by. A
  secret is accepted only when both agree, so a rotation that stopped half-way (a
  crash between its writes) never leaves the old secret working.

A secret is looked up by its SHA-256 digest and then compared with
``hmac.compare_digest``, so neither the lookup nor the comparison takes a time that
depends on how much of a guess was right. Secrets never reach a log line or the store.

When the configuration gives a callback a secret (or launches it), the configuration
wins: a secret in the store for the same id is refused, so what the operator wrote in
the file is the only way in, and a forgotten store entry cannot keep a door open.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc
import trio

from ._bridge import CallInfo, RpcAbort
from ._config import CallbackSettings
from ._errors import SecretRefusedError as SecretRefusedError  # its old home; still imported from here
from ._errors import StoreError, VersionConflictError
from ._store import Store

log = logging.getLogger(__name__)

#: The core store's namespace for store-registered secrets (digests only).
NAMESPACE = "secrets"
#: Seconds the edge trusts a store lookup that found a secret. A rotation or removal
#: takes effect for new calls within this time; Listen streams already open stay open.
CACHE_SECONDS = 5.0
_CACHE_MAX = 4096
_PAGE = 500
#: What :func:`generate_secret` makes (``secrets.token_urlsafe(32)``: 43 characters). Only
#: such strings are looked up in the store, so junk secrets cost no store read.
_GENERATED = re.compile(r"[A-Za-z0-9_-]{43}")


def generate_secret() -> str:
    """A new callback secret: 256 random bits, URL-safe text."""
    return secrets.token_urlsafe(32)


def secret_digest(secret: str) -> bytes:
    """The SHA-256 digest the store keeps instead of ``secret``.

    A plain hash suffices: generated secrets carry 256 random bits, so there is nothing
    for a slow password hash (bcrypt, scrypt, argon2) to protect against — guessing a
    preimage is as hopeless as guessing the secret itself.
    """
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True, slots=True)
class Registration:
    """A callback whose secret's digest is in the store."""

    callback_id: str
    created: float


def _digest_key(digest: bytes) -> str:
    return f"digest/{digest.hex()}"


def _callback_key(callback_id: str) -> str:
    return f"callback/{callback_id}"


def _encode(record: dict[str, object]) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def _created(record: dict[str, object]) -> float:
    created = record.get("created")
    return float(created) if isinstance(created, int | float) else 0.0


def _decode(data: bytes, *fields: str) -> dict[str, object] | None:
    """A stored record with ``fields``, or None (logged) when it is malformed."""
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    if not isinstance(record, dict) or any(f not in record for f in fields):
        log.warning("secrets: ignoring a malformed record in the store (fields %s expected)", ", ".join(fields))
        return None
    return record


async def find_callback(store: Store, digest: bytes) -> str | None:
    """The callback whose store-registered secret has ``digest``, or None."""
    item = await store.get(NAMESPACE, _digest_key(digest))
    if item is None:
        return None
    record = _decode(item.value, "callback_id")
    if record is None:
        return None
    callback_id = str(record["callback_id"])
    current = await store.get(NAMESPACE, _callback_key(callback_id))
    if current is None:
        return None
    latest = _decode(current.value, "digest")
    if latest is None:
        return None
    try:
        latest_digest = bytes.fromhex(str(latest["digest"]))
    except ValueError:
        return None
    # The index said yes; the authority must agree (a rotation replaces it first).
    return callback_id if hmac.compare_digest(latest_digest, digest) else None


async def registration(store: Store, callback_id: str) -> Registration | None:
    """The store's record of ``callback_id``'s secret, or None."""
    item = await store.get(NAMESPACE, _callback_key(callback_id))
    record = _decode(item.value, "digest") if item is not None else None
    return None if record is None else Registration(callback_id, _created(record))


async def registrations(store: Store) -> list[Registration]:
    """Every callback with a secret in the store, by id."""
    found: list[Registration] = []
    start = ""
    while True:
        page = await store.list(NAMESPACE, "callback/", start_after=start, limit=_PAGE)
        for item in page:
            record = _decode(item.value, "digest")
            if record is not None:
                found.append(Registration(item.key.removeprefix("callback/"), _created(record)))
        if len(page) < _PAGE:
            return found
        start = page[-1].key


async def add_secret(store: Store, callback_id: str) -> str:
    """Generate a secret for ``callback_id``, keep its digest, and return the secret.

    Raises SecretRefusedError when the callback already has one (rotate it instead).
    """
    if await store.get(NAMESPACE, _callback_key(callback_id)) is not None:
        raise SecretRefusedError(
            f"callback {callback_id!r} already has a secret in the store; "
            f"`oco callbacks rotate {callback_id}` replaces it"
        )
    return await _install(store, callback_id, expected_version=0)


async def rotate_secret(store: Store, callback_id: str) -> str:
    """Replace ``callback_id``'s secret with a new one and return it; the old one stops
    working (within CACHE_SECONDS for a running bot)."""
    current = await store.get(NAMESPACE, _callback_key(callback_id))
    if current is None:
        raise SecretRefusedError(
            f"callback {callback_id!r} has no secret in the store; `oco callbacks add {callback_id}` makes one"
        )
    secret = await _install(store, callback_id, expected_version=current.version)
    await _forget_digest(store, current.value)
    return secret


async def remove_secret(store: Store, callback_id: str) -> None:
    """Delete ``callback_id``'s secret; the callback can no longer connect with it."""
    current = await store.get(NAMESPACE, _callback_key(callback_id))
    if current is None:
        raise SecretRefusedError(f"callback {callback_id!r} has no secret in the store; nothing to remove")
    try:
        await store.delete(NAMESPACE, _callback_key(callback_id), expected_version=current.version)
    except VersionConflictError:
        raise SecretRefusedError(
            f"callback {callback_id!r}'s secret changed while removing it (another `oco callbacks` at work?); "
            "run the command again"
        ) from None
    await _forget_digest(store, current.value)


async def _install(store: Store, callback_id: str, *, expected_version: int) -> str:
    secret = generate_secret()
    digest = secret_digest(secret)
    created = time.time()
    # Index first, authority second: until the authority names the new digest, the
    # new secret is refused, and from then on the old one is.
    await store.set(
        NAMESPACE, _digest_key(digest), _encode({"callback_id": callback_id, "created": created}), expected_version=0
    )
    try:
        await store.set(
            NAMESPACE,
            _callback_key(callback_id),
            _encode({"digest": digest.hex(), "created": created}),
            expected_version=expected_version,
        )
    except VersionConflictError:
        await store.delete(NAMESPACE, _digest_key(digest))
        raise SecretRefusedError(
            f"callback {callback_id!r}'s secret changed meanwhile (another `oco callbacks` at work?); "
            "run `oco callbacks list` and try again"
        ) from None
    return secret


async def _forget_digest(store: Store, authority: bytes) -> None:
    # Best effort: a leftover index entry is refused anyway (the authority disagrees).
    record = _decode(authority, "digest")
    if record is None:
        return
    try:
        await store.delete(NAMESPACE, f"digest/{record['digest']}")
    except StoreError as exc:
        log.warning("secrets: could not delete the old secret's index entry (harmless, it is refused): %s", exc)


def expects_store_secret(cb: CallbackSettings) -> bool:
    """Whether the config leaves ``cb``'s secret to the store (neither command nor secret)."""
    return cb.command is None and cb.secret is None


async def check_store_secrets(store: Store, callbacks: Iterable[CallbackSettings]) -> list[str]:
    """Warn (log, and return the warnings) about configured callbacks whose secret
    should be in the store but is not, and store secrets the config overrides.

    Meant for the bot right after its store opens; a store error is a warning too,
    never a reason not to start.
    """
    warnings: list[str] = []
    try:
        stored = {r.callback_id for r in await registrations(store)}
    except StoreError as exc:
        warnings.append(f"could not check the callback secrets in the store: {exc}")
        stored = set()
        callbacks = ()
    for cb in callbacks:
        if expects_store_secret(cb) and cb.id not in stored:
            warnings.append(
                f"callback {cb.id!r} has neither command: nor secret: in the config and no secret in the store, "
                f"so it cannot connect: run `oco callbacks add {cb.id}` and give it the secret that prints"
            )
        elif not expects_store_secret(cb) and cb.id in stored:
            warnings.append(
                f"callback {cb.id!r} has a secret in the store, but the config sets its secret (or launches it), "
                f"which wins; `oco callbacks remove {cb.id}` deletes the unused one"
            )
    for warning in warnings:
        log.warning("%s", warning)
    return warnings


class Authenticator:
    """Maps the secret in a call's metadata to the callback it belongs to.

    ``secrets`` maps callback ids to their configured secrets ("" for a callback whose
    secret is in the store). With a ``store``, secrets registered by ``oco callbacks``
    are accepted too, for ids the configuration gives no secret of its own; what the
    store answers is trusted for ``cache_seconds``.
    """

    def __init__(
        self, secrets: Mapping[str, str], store: Store | None = None, *, cache_seconds: float = CACHE_SECONDS
    ) -> None:
        self._by_digest = {secret_digest(s): (cid, s) for cid, s in secrets.items() if s}
        self._configured = frozenset(cid for cid, s in secrets.items() if s)
        self._store = store
        self._ttl = cache_seconds
        self._cache: dict[bytes, tuple[str, float]] = {}

    async def identify(self, info: CallInfo) -> str:
        """The callback id of the caller; UNAUTHENTICATED, or UNAVAILABLE when the
        store that should know the secret cannot be asked."""
        header = info.metadata.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret:
            raise RpcAbort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing secret: send gRPC metadata `authorization: Bearer <secret>` with every call",
            )
        digest = secret_digest(secret)
        found = self._by_digest.get(digest)
        if found is not None and hmac.compare_digest(found[1].encode(), secret.encode()):
            return found[0]
        if found is None and self._store is not None and _GENERATED.fullmatch(secret):
            callback_id = await self._from_store(self._store, digest)
            if callback_id is not None:
                return callback_id
        raise RpcAbort(
            grpc.StatusCode.UNAUTHENTICATED,
            "unknown secret: check the callback's secret against the bot's configuration and `oco callbacks list`",
        )

    async def _from_store(self, store: Store, digest: bytes) -> str | None:
        now = trio.current_time()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            callback_id = await find_callback(store, digest)
        except StoreError as exc:
            # No log line here: the edge logs each refusal, at most once a minute per reason.
            raise RpcAbort(
                grpc.StatusCode.UNAVAILABLE, f"the bot cannot check secrets now (its store failed: {exc}); retry later"
            ) from None
        except Exception as exc:  # a store plugin's own error must not become INTERNAL
            log.exception("could not check a callback's secret: the store raised %s", type(exc).__name__)
            raise RpcAbort(
                grpc.StatusCode.UNAVAILABLE,
                f"the bot cannot check secrets now (its store failed: {type(exc).__name__}); retry later",
            ) from None
        if callback_id is None:
            self._cache.pop(digest, None)
            return None
        if callback_id in self._configured:
            # The edge logs the refusal (rate-limited), with these details.
            raise RpcAbort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"this secret is registered for {callback_id!r} in the bot's store, but the bot's configuration "
                f"sets that callback's secret, and the configuration wins: use the configured secret "
                f"(`oco callbacks remove {callback_id}` deletes the unused one)",
            )
        if len(self._cache) >= _CACHE_MAX:
            self._cache = {d: entry for d, entry in self._cache.items() if entry[1] > now}
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
        self._cache[digest] = (callback_id, now + self._ttl)
        return callback_id
