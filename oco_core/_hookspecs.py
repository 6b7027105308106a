"""Every hook an OCO plugin can implement, in one place.

Plugins are found through the ``oco`` entry-point group: each entry point names a
module (or object) with functions marked ``@oco_core.plugin.hookimpl``. Hooks are
synchronous and only *describe* what the plugin offers; the bot does the I/O.
"""

from __future__ import annotations

import pluggy

from ._adapter import AdapterType
from ._datastore import DataStoreType
from ._store import StoreType

hookspec = pluggy.HookspecMarker("oco")
hookimpl = pluggy.HookimplMarker("oco")


@hookspec
def oco_adapter_types() -> list[AdapterType]:  # type: ignore[empty-body]
    """Return the chat adapters this plugin provides.

    Called once when the bot starts (and by ``oco check-config``), before any adapter
    is created. Each :class:`AdapterType` is chosen by its ``name`` in the ``type:`` key
    of an entry under ``adapters:``.
    """


@hookspec
def oco_store_types() -> list[StoreType]:  # type: ignore[empty-body]
    """Return the core stores this plugin provides.

    Called once when the bot starts (and by ``oco check-config``). A
    :class:`StoreType` is chosen by its ``name`` in ``store: {type: ...}``.
    """


@hookspec
def oco_datastore_types() -> list[DataStoreType]:  # type: ignore[empty-body]
    """Return the specific data stores this plugin can provision for callbacks.

    Called once when the bot starts (and by ``oco check-config`` and ``oco
    datastores``). A :class:`DataStoreType` is chosen by its ``name`` in
    ``datastores: [{type: ...}]``, and callbacks name it in ``requires``.
    """
