"""The directory: users and rooms the bot has seen, kept in the core store.

Routing must never wait for the database, so what the bot learns goes into an in-memory
view at once and is written to the store by one background task; the store is what a
restarted bot starts from. Records live in the store's ``bot`` namespace as JSON under
``user/<id>`` and ``room/<id>`` (ids already carry the adapter prefix).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace

import trio

from ._errors import StoreError, UnknownTargetError
from ._store import Item, Store

log = logging.getLogger(__name__)

NAMESPACE = "bot"


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A user as callbacks see them (ids prefixed with the adapter name)."""

    id: str
    name: str = ""
    mention_name: str = ""


@dataclass(frozen=True, slots=True)
class RoomRecord:
    """A room as callbacks see it, with the ids of the users known to be in it."""

    id: str
    name: str = ""
    topic: str = ""
    members: tuple[str, ...] = field(default=())


class Directory:
    """Users and rooms, in memory, persisted to the store in the background."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.users: dict[str, UserRecord] = {}
        self.rooms: dict[str, RoomRecord] = {}
        self._dirty: set[str] = set()
        self._wake = trio.Event()

    async def load(self) -> None:
        """Read what earlier runs learnt."""
        for item in await self._load_all("user/"):
            try:
                user = _user(json.loads(item.value))
            except (ValueError, TypeError, KeyError):
                log.warning("ignoring a malformed directory record %r in the store", item.key)
                continue
            self.users[user.id] = user
        for item in await self._load_all("room/"):
            try:
                room = _room(json.loads(item.value))
            except (ValueError, TypeError, KeyError):
                log.warning("ignoring a malformed directory record %r in the store", item.key)
                continue
            self.rooms[room.id] = room

    async def _load_all(self, prefix: str) -> list[Item]:
        items: list[Item] = []
        while True:
            page = await self._store.list(NAMESPACE, prefix, start_after=items[-1].key if items else "", limit=500)
            items += page
            if len(page) < 500:
                return items

    def see_user(self, user: UserRecord) -> None:
        """Note a user; written to the store only when something changed."""
        if self.users.get(user.id) != user:
            self.users[user.id] = user
            self._mark(f"user/{user.id}")

    def see_speaker(self, user_id: str, name: str, mention_name: str) -> None:
        """:meth:`see_user` for the sender of a chat message: no record is made when
        the one known is the same, as it is for nearly every message."""
        old = self.users.get(user_id)
        if old is None or old.name != name or old.mention_name != mention_name:
            self.see_user(UserRecord(user_id, name, mention_name))

    def see_room(self, room_id: str, name: str = "", topic: str | None = None, member: str | None = None) -> None:
        """Note a room (and, optionally, a member of it or its topic)."""
        old = self.rooms.get(room_id)
        if (
            old is not None
            and (not name or name == old.name)
            and (topic is None or topic == old.topic)
            and (member is None or member in old.members)
        ):
            return  # nothing new: every chat message says the room again (no copy made)
        old = old or RoomRecord(room_id, name or room_id)
        new = replace(old, name=name or old.name, topic=old.topic if topic is None else topic)
        if member is not None and member not in new.members:
            new = replace(new, members=(*new.members, member))
        if new != self.rooms.get(room_id):
            self.rooms[room_id] = new
            self._mark(f"room/{room_id}")

    def leave_room(self, room_id: str, member: str) -> None:
        """Note that a user left a room."""
        old = self.rooms.get(room_id)
        if old is not None and member in old.members:
            self.rooms[room_id] = replace(old, members=tuple(m for m in old.members if m != member))
            self._mark(f"room/{room_id}")

    def user(self, user_id: str) -> UserRecord:
        """One known user, or UnknownTargetError."""
        found = self.users.get(user_id)
        if found is None:
            raise UnknownTargetError(f"unknown user {user_id!r}: the bot has not seen them")
        return found

    def room(self, room_id: str) -> RoomRecord:
        """One known room, or UnknownTargetError."""
        found = self.rooms.get(room_id)
        if found is None:
            raise UnknownTargetError(f"unknown room {room_id!r}: the bot has not seen it")
        return found

    def list_users(self, room_id: str = "") -> list[UserRecord]:
        """Known users in id order, or only the members of a known room."""
        if room_id:
            return [self.users.get(m) or UserRecord(m) for m in self.room(room_id).members]
        return sorted(self.users.values(), key=lambda u: u.id)

    def list_rooms(self) -> list[RoomRecord]:
        """Known rooms in id order."""
        return sorted(self.rooms.values(), key=lambda r: r.id)

    def _mark(self, key: str) -> None:
        self._dirty.add(key)
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write changed records to the store until cancelled; flush on the way out."""
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                await self._flush()
        finally:
            with trio.move_on_after(5) as scope:
                scope.shield = True
                await self._flush()

    async def _flush(self) -> None:
        while self._dirty:
            key = self._dirty.pop()
            kind, _, ident = key.partition("/")
            record = self.users.get(ident) if kind == "user" else self.rooms.get(ident)
            if record is None:
                continue
            try:
                await self._store.set(NAMESPACE, key, json.dumps(asdict(record)).encode())
            except StoreError as exc:
                log.warning("could not save %s to the store (will retry on its next change): %s", key, exc)


def _user(data: dict[str, object]) -> UserRecord:
    return UserRecord(
        id=str(data["id"]), name=str(data.get("name", "")), mention_name=str(data.get("mention_name", ""))
    )


def _room(data: dict[str, object]) -> RoomRecord:
    members = data.get("members") or []
    return RoomRecord(
        id=str(data["id"]),
        name=str(data.get("name", "")),
        topic=str(data.get("topic", "")),
        members=tuple(str(m) for m in members) if isinstance(members, list) else (),
    )
