"""The bot's side of specific data stores: who gets which corner, and the credentials.

Providers (:mod:`._datastore`) provision; this module decides. A callback's credentials
for one data store are generated here on first use and kept in the core store (namespace
``datastores``, one JSON record per data store and callback), so that replicas of a
callback, a restarted bot and several bots sharing a store hand out the same ones; a
compare-and-set on the record settles a race between two of them. ``oco datastores``
rotates and revokes through the same class. Every hand-out, provisioning, rotation,
revocation and refusal goes to the audit log.

The record holds the password: the database needs it, and a replica must get the same
one. Whoever can read the core store's ``datastores`` namespace can read them; the
README's Security section says so.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import trio
from pydantic import BaseModel

from ._audit import ALLOWED, DENIED
from ._config import LoadedConfig, validate_section
from ._datastore import DataStoreAccess, DataStoreProvider, DataStoreType
from ._errors import (
    CapabilityError,
    ConfigError,
    DataStoreUnavailableError,
    StoreError,
    StoreUnavailableError,
    VersionConflictError,
)
from ._plugins import Plugins
from ._policy import Record
from ._store import Store

log = logging.getLogger(__name__)

NAMESPACE = "datastores"
#: How often one callback's refresh=true really provisions again (a loop of them must
#: not keep the database's admin account busy for everyone else).
REFRESH_SECONDS = 10.0
#: Callbacks whose refusals are remembered (logged once each) before the memory is reset.
_REFUSALS_REMEMBERED = 1000


@dataclass(frozen=True, slots=True)
class Grant:
    """One callback's credentials for one data store, as kept in the core store."""

    datastore: str
    callback_id: str
    password: str = field(repr=False)
    generation: int
    granted: float
    #: The operator revoked it: no access until `oco datastores grant` (the record stays,
    #: so the generation only grows and a callback that asks again is refused).
    revoked: bool = False

    def to_json(self) -> bytes:
        data = {
            "password": self.password,
            "generation": self.generation,
            "granted": self.granted,
            "revoked": self.revoked,
        }
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, datastore: str, callback_id: str, raw: bytes) -> Grant:
        data = json.loads(raw)
        return cls(
            datastore,
            callback_id,
            str(data["password"]),
            int(data["generation"]),
            float(data["granted"]),
            bool(data.get("revoked", False)),
        )

    def renewed(self) -> Grant:
        """New credentials, one generation on, not revoked."""
        return Grant(self.datastore, self.callback_id, _password(), self.generation + 1, time.time())


def _password() -> str:
    return secrets.token_urlsafe(24)


def _key(datastore: str, callback_id: str) -> str:
    return f"{datastore}/{callback_id}"


def configured_datastores(loaded: LoadedConfig, plugins: Plugins) -> list[tuple[DataStoreType, BaseModel]]:
    """Each ``datastores:`` entry's type and validated options; ConfigError naming the
    file, line and key for an unknown type or bad options."""
    found = []
    for index, entry in enumerate(loaded.config.datastores):
        try:
            kind = plugins.datastore(entry.type)
        except ConfigError as exc:
            raise loaded.error(("datastores", index, "type"), str(exc)) from None
        found.append((kind, validate_section(loaded, ("datastores", index), kind.config_model, entry.options())))
    return found


def missing_hint(datastore: str, offered: Sequence[str]) -> str:
    """Why a data store is not there, and the config key that would provide it."""
    have = ", ".join(offered) or "none"
    return (
        f"this bot offers no data store {datastore!r} (it offers: {have}); "
        f"the operator adds it under datastores: [{{type: {datastore}, ...}}] in the bot's config"
    )


class DataStores:
    """The open providers of one bot, and the credentials each callback holds."""

    def __init__(self, store: Store, offered: Sequence[str], record: Record) -> None:
        self._store = store
        self._offered = sorted(offered)
        #: The providers open now, by type (one whose database is down at start-up
        #: joins when it comes up).
        self._providers: dict[str, DataStoreProvider] = {}
        self._record = record
        #: What this process last provisioned, by (data store, callback): its generation
        #: and the access it returned, so a hand-out of unchanged credentials costs one
        #: read of the core store and no round trip to the database.
        self._provisioned: dict[tuple[str, str], tuple[int, DataStoreAccess]] = {}
        self._locks: dict[tuple[str, str], trio.Lock] = {}
        self._refreshed: dict[tuple[str, str], float] = {}
        self._refused: set[tuple[str, str]] = set()

    def offered(self) -> list[str]:
        """The data-store types this bot offers, in name order (open or not yet)."""
        return list(self._offered)

    def describe(self) -> dict[str, str]:
        """Each provider's own one-line description (no passwords)."""
        return {name: provider.describe() for name, provider in sorted(self._providers.items())}

    def attach(self, name: str, provider: DataStoreProvider | None) -> None:
        """The provider of ``name`` is open (None: no longer)."""
        if provider is None:
            self._providers.pop(name, None)
        else:
            self._providers[name] = provider

    def require(self, callback_id: str, datastores: Sequence[str]) -> None:
        """DataStoreUnavailableError for the first of ``datastores`` this bot does not
        offer (logged and audited once per callback and type)."""
        for datastore in datastores:
            if datastore not in self._offered:
                raise self._unavailable(callback_id, datastore)

    def _unavailable(self, callback_id: str, datastore: str) -> DataStoreUnavailableError:
        error = DataStoreUnavailableError(missing_hint(datastore, self.offered()), datastore=datastore)
        if (datastore, callback_id) not in self._refused:
            if len(self._refused) >= _REFUSALS_REMEMBERED:
                self._refused.clear()
            self._refused.add((datastore, callback_id))
            log.warning("callback %r requires the data store %r: %s", callback_id, datastore, error)
            self._record("datastore", DENIED, callback=callback_id, permission=datastore, detail=str(error))
        return error

    def _provider(self, callback_id: str, datastore: str) -> DataStoreProvider:
        if datastore not in self._offered:
            raise self._unavailable(callback_id, datastore)
        provider = self._providers.get(datastore)
        if provider is None:
            raise StoreUnavailableError(f"the data store {datastore!r} cannot be reached yet; try again later")
        return provider

    async def _read(self, datastore: str, callback_id: str) -> tuple[Grant | None, int]:
        item = await self._store.get(NAMESPACE, _key(datastore, callback_id))
        if item is None:
            return None, 0
        return Grant.from_json(datastore, callback_id, item.value), item.version

    async def access(self, callback_id: str, datastore: str, *, refresh: bool = False) -> tuple[DataStoreAccess, int]:
        """The callback's access to its corner of ``datastore`` and the credentials'
        generation, provisioning it on first use (and, with ``refresh``, again: the
        database refused the credentials, so make sure it holds them). CapabilityError
        when the operator revoked it."""
        provider = self._provider(callback_id, datastore)
        slot = (datastore, callback_id)
        async with self._locks.setdefault(slot, trio.Lock()):
            now = trio.current_time()
            if refresh and now - self._refreshed.get(slot, -REFRESH_SECONDS) >= REFRESH_SECONDS:
                self._refreshed[slot] = now
                self._provisioned.pop(slot, None)
            for _ in range(5):  # settles a race with another bot or `oco datastores`
                grant, _ = await self._read(datastore, callback_id)
                if grant is not None and grant.revoked:
                    raise self._revoked(callback_id, datastore)
                if grant is not None:
                    break
                grant = Grant(datastore, callback_id, _password(), 1, time.time())
                try:
                    await self._store.set(NAMESPACE, _key(datastore, callback_id), grant.to_json(), expected_version=0)
                except VersionConflictError:
                    continue  # another bot granted it meanwhile: theirs stands
                log.info("provisioning the data store %r for callback %r", datastore, callback_id)
                self._record("datastore", ALLOWED, callback=callback_id, permission=datastore, detail="provisioned")
                break
            else:
                raise StoreError(f"the grant of {datastore!r} to callback {callback_id!r} keeps changing; try again")
            known = self._provisioned.get(slot)
            if known is not None and known[0] == grant.generation:
                access = known[1]
            else:
                # First hand-out since this bot started, new, or rotated elsewhere: the
                # database is made to hold exactly the kept password.
                access = await self._provision(provider, callback_id, datastore, grant.password)
                self._provisioned[slot] = (grant.generation, access)
        self._record(
            "datastore", ALLOWED, callback=callback_id, permission=datastore, detail=f"access {grant.generation}"
        )
        return access, grant.generation

    async def _provision(
        self, provider: DataStoreProvider, callback_id: str, datastore: str, password: str
    ) -> DataStoreAccess:
        """Provision for a callback's request. What went wrong is logged in full for the
        operator; the callback learns only that it did, since the provider's words name
        the admin account, its host and the database's own messages."""
        try:
            return await provider.provision(callback_id, password)
        except StoreUnavailableError as exc:
            log.error("data store %r unavailable while provisioning callback %r: %s", datastore, callback_id, exc)
            raise StoreUnavailableError(
                f"the data store {datastore!r} cannot be reached now; try again later"
            ) from None
        except StoreError as exc:
            log.error("data store %r could not provision callback %r: %s", datastore, callback_id, exc)
            raise StoreError(
                f"the bot could not provision the data store {datastore!r}; its operator's log says why"
            ) from None

    def _revoked(self, callback_id: str, datastore: str) -> CapabilityError:
        error = CapabilityError(
            f"the operator revoked callback {callback_id!r}'s access to the data store {datastore!r}; "
            f"`oco datastores grant {callback_id} {datastore}` gives it back",
            capability="datastores",
        )
        self._record("datastore", DENIED, callback=callback_id, permission=datastore, detail=str(error))
        return error

    async def grant(self, callback_id: str, datastore: str) -> int:
        """Give the callback access now (again, after a revocation: new credentials, one
        generation on); returns the generation. Its existing grant is left as it is."""
        provider = self._provider(callback_id, datastore)
        grant, version = await self._read(datastore, callback_id)
        if grant is not None and not grant.revoked:
            return grant.generation
        new = grant.renewed() if grant is not None else Grant(datastore, callback_id, _password(), 1, time.time())
        await self._store.set(NAMESPACE, _key(datastore, callback_id), new.to_json(), expected_version=version)
        await provider.provision(callback_id, new.password, rotated=True)
        self._record(
            "datastore", ALLOWED, callback=callback_id, permission=datastore, detail=f"granted {new.generation}"
        )
        return new.generation

    async def rotate(self, callback_id: str, datastore: str) -> int:
        """New credentials for the callback (the old stop working and their sessions
        end); returns the new generation. StoreError when it holds none."""
        provider = self._provider(callback_id, datastore)
        grant, version = await self._read(datastore, callback_id)
        if grant is None or grant.revoked:
            raise StoreError(f"callback {callback_id!r} holds no access to the data store {datastore!r}")
        new = grant.renewed()
        # The record first: a crash between the two leaves credentials that the next
        # hand-out provisions again, never a database password that nobody knows.
        await self._store.set(NAMESPACE, _key(datastore, callback_id), new.to_json(), expected_version=version)
        await provider.provision(callback_id, new.password, rotated=True)
        self._record(
            "datastore", ALLOWED, callback=callback_id, permission=datastore, detail=f"rotated {new.generation}"
        )
        return new.generation

    async def revoke(self, callback_id: str, datastore: str, *, drop_data: bool = False) -> bool:
        """Take the callback's access away (and, with ``drop_data``, its data) until
        :meth:`grant`; False when it held none. The revocation is recorded before the
        database is told, so no hand-out in between can switch the access back on."""
        provider = self._provider(callback_id, datastore)
        grant, version = await self._read(datastore, callback_id)
        held = grant is not None and not grant.revoked
        base = grant or Grant(datastore, callback_id, "", 0, time.time())
        tombstone = Grant(datastore, callback_id, "", base.generation, time.time(), revoked=True)
        await self._store.set(NAMESPACE, _key(datastore, callback_id), tombstone.to_json(), expected_version=version)
        await provider.revoke(callback_id, drop_data=drop_data)
        what = "revoked and dropped its data" if drop_data else "revoked"
        self._record("datastore", ALLOWED, callback=callback_id, permission=datastore, detail=what)
        return held

    async def grants(self) -> list[Grant]:
        """Every grant kept in the core store, by data store and callback."""
        found: list[Grant] = []
        after = ""
        while True:
            items = await self._store.list(NAMESPACE, start_after=after, limit=500)
            for item in items:
                datastore, _, callback_id = item.key.partition("/")
                found.append(Grant.from_json(datastore, callback_id, item.value))
            if len(items) < 500:
                return found
            after = items[-1].key


@asynccontextmanager
async def open_datastores(
    loaded: LoadedConfig, plugins: Plugins, store: Store, record: Record
) -> AsyncIterator[DataStores]:
    """Open every configured data-store provider (in the config's order), yield them as
    :class:`DataStores`, and close them on exit. A data store that cannot be reached
    fails the opening (StoreUnavailableError naming it)."""
    kinds = configured_datastores(loaded, plugins)
    datastores = DataStores(store, [kind.name for kind, _ in kinds], record)
    async with AsyncExitStack() as stack:
        for kind, options in kinds:
            datastores.attach(kind.name, await stack.enter_async_context(kind.open(options)))
        yield datastores
