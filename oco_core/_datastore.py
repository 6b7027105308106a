"""Specific data stores: the interface a data-store provider plugin implements.

The specification's fourth part. A callback that needs a particular database
(PostgreSQL's relational features, Redis's sorted sets) declares it; the bot, through a
*provider* configured under ``datastores:``, gives it a corner of that database of its
own: its own role and schema, its own ACL user and key prefix, its own file. The bot
generates the credentials, keeps them in the core store so that replicas of one callback
get the same ones, and rotates and revokes them on the operator's command.

A provider is a plugin, found through the ``oco_datastore_types`` hook like adapters and
stores. It only provisions and revokes; the bot decides who gets what, keeps the
credentials, audits, and answers the callbacks.
"""

from __future__ import annotations

import abc
import hashlib
import re
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True, slots=True)
class DataStoreAccess:
    """What a callback receives: how to reach its own corner of one data store.

    ``url`` is a connection URL the ordinary client library accepts as it is (psycopg,
    redis-py, sqlite3 via its path), with the callback's own credentials in it.
    ``namespace`` is where its data must live: the PostgreSQL schema (also its
    ``search_path``), the Redis key prefix, "" where the whole database is its own (a
    SQLite file). ``details`` holds the parts a client may want separately (``host``,
    ``port``, ``user``, ``password``, ``database``, ``schema``, ``key_prefix``, ``path``, and
    anything the provider documents); every value is a string.
    """

    url: str
    namespace: str = ""
    details: Mapping[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"DataStoreAccess(namespace={self.namespace!r}, details={sorted(self.details)})"  # no password


class DataStoreProvider(abc.ABC):
    """One configured data store, open. Methods may be called concurrently, also for
    one callback: a bot serializes its own calls per callback, but ``oco datastores``
    runs in another process (and several bots may share a database), so a provider
    must stay correct when two of them provision or revoke the same callback at once.

    ``callback_id`` is the callback's id as configured (``[A-Za-z0-9][A-Za-z0-9_.-]*``,
    at most 64 characters); :func:`corner_name` turns it into a safe identifier. A
    provider raises :class:`~oco_core.StoreUnavailableError` when its database cannot be
    reached, and :class:`~oco_core.StoreError` for anything else it cannot do, with a
    message naming what failed (never the password).
    """

    @abc.abstractmethod
    async def provision(self, callback_id: str, password: str, *, rotated: bool = False) -> DataStoreAccess:
        """Make sure the callback has its own corner and that ``password`` is its
        credential (and the only one: a password given before stops working for new
        connections), then say how to reach it.

        Idempotent: called when the bot first hands out access, when it restarts (with
        the same password: sessions the callback has open must survive it), and when
        the operator rotates the credentials, with a new password and ``rotated=True``:
        then also end the sessions opened with the old one, where the database allows
        it. Data already in the corner is kept.
        """

    @abc.abstractmethod
    async def revoke(self, callback_id: str, *, drop_data: bool = False) -> None:
        """Take the callback's access away (its credentials stop working, open sessions
        end where the database allows it); with ``drop_data`` also delete its corner and
        everything in it. Revoking what does not exist is not an error."""

    def describe(self) -> str:
        """One line for ``oco check-config`` and logs: what this provider serves (a URL
        with its password masked, a folder). Never a password."""
        return type(self).__name__


@dataclass(frozen=True, slots=True)
class DataStoreType:
    """What a data-store plugin offers, returned by the ``oco_datastore_types`` hook.

    ``name`` is what ``datastores: [{type: ...}]`` in the bot's config and
    ``requires`` in a callback name (``postgresql``, ``redis``, ``sqlite``).
    ``open(config)`` is an async context manager yielding an open
    :class:`DataStoreProvider` for a validated ``config`` (an instance of
    ``config_model``: the keys beside ``type:``); leaving it closes the provider's
    connections. ``package`` is the distribution that provides it, for error messages;
    ``noisy_loggers`` as for adapters and stores.
    """

    name: str
    open: Callable[[Any], AbstractAsyncContextManager[DataStoreProvider]]
    config_model: type[BaseModel]
    package: str = "oco-core"
    description: str = ""
    noisy_loggers: tuple[str, ...] = ()


_UNSAFE = re.compile(r"[^a-z0-9_]")


def corner_name(callback_id: str, prefix: str = "oco_cb_") -> str:
    """A database identifier of the callback's own: ``prefix`` + the id lowercased with
    every character outside ``[a-z0-9_]`` written ``_`` (cut to fit), + ``_`` and a short
    hash of the exact id. The hash is always there, so no two ids share a name, not even
    ``Deploy.bot`` and an id that spells out the first one's name. At most 63 bytes,
    PostgreSQL's identifier limit."""
    folded = _UNSAFE.sub("_", callback_id.lower())
    digest = hashlib.sha256(callback_id.encode()).hexdigest()[:12]
    return f"{(prefix + folded)[: 63 - 13]}_{digest}"
