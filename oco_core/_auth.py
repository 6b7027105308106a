"""People, roles and permissions: who may run what.

A *person* is one or more chat accounts (adapter user ids such as ``irc/alice`` and
``matrix/@alice:example.org``) linked with ``oco link``, confirmed from both sides, so
that roles follow the person and not the handle. A person holds *roles*; a role grants
*permissions* (``auth.roles`` in the config says which; a role it does not name grants
the permission of its own name). A permission is granted by a role that names it
exactly, by ``prefix.*`` for any ``prefix.<more>``, or by ``*``. Admins (``auth.admins``
in the config, by account, or anyone holding the role ``admin``) hold every permission
and may grant and revoke roles from chat.

Everything lives in memory for checks that never wait, and is written through to the
core store's ``auth`` namespace (one JSON record per person) when it changes, so a
restarted bot keeps what admins granted; it is read again every few seconds, so bots
sharing one store see each other's grants. The route rules admins set at runtime
(:mod:`._rules`) are kept and read again the same way, as :attr:`Authorization.rules`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import trio

from ._config import AuthSettings
from ._errors import StoreError
from ._rules import RouteRules
from ._store import Store
from ._timing import TokenBucket

log = logging.getLogger(__name__)

NAMESPACE = "auth"
ADMIN_ROLE = "admin"
#: How often the people are read again from the store (changes by other bots).
RELOAD_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to "may this person do that?", with the reason a person can read."""

    allowed: bool
    reason: str
    person: str
    roles: tuple[str, ...] = ()


@dataclass(slots=True)
class _Person:
    id: str
    accounts: list[str]
    roles: set[str] = field(default_factory=set)

    def to_json(self) -> bytes:
        return json.dumps({"accounts": self.accounts, "roles": sorted(self.roles)}).encode()


def permission_granted(granted: str, wanted: str) -> bool:
    """Whether holding ``granted`` (a permission or a pattern) grants ``wanted``."""
    if granted in ("*", wanted):
        return True
    return granted.endswith(".*") and wanted.startswith(granted[:-1])


class Authorization:
    """The bot's permission model, loaded from and written through to the store."""

    def __init__(self, store: Store, settings: AuthSettings) -> None:
        self._store = store
        self.settings = settings
        #: The route rules in the store (the config's are in each callback's policy).
        self.rules = RouteRules(store)
        self._people: dict[str, _Person] = {}
        self._person_of: dict[str, str] = {}
        self._pending_links: dict[tuple[str, str], float] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._warned_until: dict[str, float] = {}
        #: Writes begun, and writes in flight: a reload that overlaps one keeps what is
        #: in memory (its read may predate the write) and the next reload catches up.
        self._writes = 0
        self._writing = 0
        #: Maps a user id as written in the config to the id messages carry (the bot
        #: sets it once adapters exist: IRC folds case).
        self.canonical: Callable[[str], str] = lambda user_id: user_id

    def reconfigure(self, settings: AuthSettings) -> None:
        """New ``auth:`` settings (a live reload); a new rate limit starts every person afresh."""
        if settings.rate_limit != self.settings.rate_limit:
            self._buckets.clear()  # sized for the old limit
        self.settings = settings

    def _admins(self) -> set[str]:
        return {self.canonical(a) for a in self.settings.admins}

    async def load(self) -> None:
        """Read the people and roles stored (by earlier runs, or by other bots)."""
        writes, quiet = self._writes, self._writing == 0
        people: dict[str, _Person] = {}
        person_of: dict[str, str] = {}
        start = ""
        while True:
            page = await self._store.list(NAMESPACE, "person/", start_after=start, limit=500)
            for item in page:
                try:
                    data = json.loads(item.value)
                    person = _Person(
                        item.key.removeprefix("person/"),
                        [str(a) for a in data["accounts"]],
                        {str(r) for r in data["roles"]},
                    )
                except (ValueError, TypeError, KeyError):
                    log.warning("ignoring a malformed authorization record %r in the store", item.key)
                    continue
                people[person.id] = person
                for account in person.accounts:
                    person_of[account] = person.id
            if len(page) < 500:
                break
            start = page[-1].key
        if quiet and self._writing == 0 and writes == self._writes:
            self._people, self._person_of = people, person_of
        await self.rules.load()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the store again every RELOAD_SECONDS until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(RELOAD_SECONDS)
            try:
                await self.load()
            except StoreError as exc:
                log.warning("could not read roles and rules from the store (keeping those in memory): %s", exc)

    # -- reading ---------------------------------------------------------------------

    def person(self, user_id: str) -> str:
        """The person an account belongs to (its own id when it is linked to nobody)."""
        return self._person_of.get(user_id, user_id)

    def accounts(self, user_id: str) -> list[str]:
        """Every account of the person ``user_id`` belongs to."""
        found = self._people.get(self.person(user_id))
        return list(found.accounts) if found else [user_id]

    def granted_roles(self, user_id: str) -> set[str]:
        """Roles granted to the person (not counting default roles)."""
        found = self._people.get(self.person(user_id))
        return set(found.roles) if found else set()

    def roles(self, user_id: str) -> tuple[str, ...]:
        """Every role the person holds, granted or by default."""
        return tuple(sorted(self.granted_roles(user_id) | set(self.settings.default_roles)))

    def is_admin(self, user_id: str) -> bool:
        """Named in ``auth.admins`` (by any linked account) or holding the admin role."""
        admins = self._admins()
        return any(a in admins for a in self.accounts(user_id)) or ADMIN_ROLE in self.granted_roles(user_id)

    def permissions_of(self, role: str) -> list[str]:
        """What a role grants."""
        if role == ADMIN_ROLE:
            return ["*"]
        return self.settings.roles.get(role, [role])

    def check(self, user_id: str, permission: str) -> Decision:
        """May the person behind ``user_id`` use ``permission``?"""
        person = self.person(user_id)
        roles = self.roles(user_id)
        if not permission:
            return Decision(True, "no permission needed", person, roles)
        if any(a in self._admins() for a in self.accounts(user_id)):
            return Decision(True, "admin (auth.admins)", person, roles)
        for role in roles:
            if any(permission_granted(g, permission) for g in self.permissions_of(role)):
                return Decision(True, f"role {role}", person, roles)
        return Decision(False, f"missing permission {permission!r}", person, roles)

    def who_can(self, permission: str) -> tuple[list[str], list[str]]:
        """Roles that grant ``permission``, and the people (by account) who hold one of
        them or are admins."""
        known_roles = {r for p in self._people.values() for r in p.roles} | set(self.settings.roles)
        known_roles |= set(self.settings.default_roles) | {ADMIN_ROLE}
        roles = sorted(r for r in known_roles if any(permission_granted(g, permission) for g in self.permissions_of(r)))
        people = self._admins()
        for person in self._people.values():
            if person.roles & set(roles):
                people.add(", ".join(person.accounts))
        return roles, sorted(people)

    # -- rate limit ------------------------------------------------------------------

    def take(self, user_id: str) -> float:
        """Count one command against the person's rate limit: 0 when within it, else the
        seconds until the next is allowed."""
        limit = self.settings.rate_limit
        if limit is None:
            return 0.0
        person = self.person(user_id)
        bucket = self._buckets.get(person)
        if bucket is None:
            bucket = self._buckets[person] = TokenBucket(limit, limit / 60)  # limit: a minute's worth
        return bucket.take(1)

    def should_warn(self, user_id: str, wait: float) -> bool:
        """True once per refused stretch, so a flood gets one reply and not one each."""
        person = self.person(user_id)
        now = time.monotonic()
        if self._warned_until.get(person, 0.0) > now:
            return False
        self._warned_until[person] = now + wait
        return True

    # -- changing --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _writing_store(self) -> AsyncIterator[None]:
        self._writes += 1
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1

    async def _save(self, person: _Person) -> None:
        async with self._writing_store():
            self._save_in_memory(person)
            if person.roles or len(person.accounts) > 1:
                await self._store.set(NAMESPACE, f"person/{person.id}", person.to_json())
            else:
                await self._store.delete(NAMESPACE, f"person/{person.id}")

    def _save_in_memory(self, person: _Person) -> None:
        if person.roles or len(person.accounts) > 1:
            self._people[person.id] = person
            for account in person.accounts:
                self._person_of[account] = person.id
        else:
            self._people.pop(person.id, None)
            for account in person.accounts:
                self._person_of.pop(account, None)

    def _record(self, user_id: str) -> _Person:
        found = self._people.get(self.person(user_id))
        if found is not None:
            return _Person(found.id, list(found.accounts), set(found.roles))
        return _Person(user_id, [user_id])

    async def grant(self, user_id: str, role: str) -> bool:
        """Grant ``role`` to the person; False when they held it already."""
        person = self._record(user_id)
        if role in person.roles:
            return False
        person.roles.add(role)
        await self._save(person)
        return True

    async def revoke(self, user_id: str, role: str) -> bool:
        """Take ``role`` from the person; False when they did not hold it."""
        person = self._record(user_id)
        if role not in person.roles:
            return False
        person.roles.discard(role)
        await self._save(person)
        return True

    async def request_link(self, user_id: str, other: str) -> bool:
        """``user_id`` asks to be linked with ``other``. True when ``other`` had asked for
        the same link (so they are now one person), False when it now waits for ``other``."""
        now = time.monotonic()
        self._pending_links = {k: t for k, t in self._pending_links.items() if t > now}
        if self._pending_links.pop((other, user_id), None) is not None:
            await self._link(other, user_id)
            return True
        self._pending_links[(user_id, other)] = now + self.settings.link_timeout
        return False

    async def _link(self, first: str, second: str) -> None:
        keep = self._record(first)
        other = self._record(second)
        if keep.id == other.id:
            return
        keep.accounts += [a for a in other.accounts if a not in keep.accounts]
        keep.roles |= other.roles
        if other.id in self._people:
            self._people.pop(other.id)
            async with self._writing_store():
                await self._store.delete(NAMESPACE, f"person/{other.id}")
        await self._save(keep)

    async def unlink(self, user_id: str) -> bool:
        """Detach the account ``user_id`` from its person (the roles stay with the
        person); False when it was linked to nobody."""
        person = self._record(user_id)
        if len(person.accounts) < 2:
            return False
        person.accounts.remove(user_id)
        if person.id == user_id:  # the record is keyed by this account: re-key it
            self._people.pop(person.id, None)
            async with self._writing_store():
                await self._store.delete(NAMESPACE, f"person/{person.id}")
            person = _Person(person.accounts[0], person.accounts, person.roles)
        self._person_of.pop(user_id, None)
        await self._save(person)
        return True
