"""Finding plugins: a fresh pluggy manager per bot, fed by the ``oco`` entry points."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pluggy

from . import _hookspecs
from ._adapter import AdapterType
from ._datastore import DataStoreType
from ._errors import ConfigError, PluginError
from ._store import StoreType

log = logging.getLogger(__name__)

_T = TypeVar("_T", AdapterType, StoreType)


@dataclass(frozen=True, slots=True)
class Plugins:
    """The adapter and store types every installed plugin offers, by name."""

    adapters: dict[str, AdapterType]
    stores: dict[str, StoreType]
    datastores: dict[str, DataStoreType] = field(default_factory=dict)

    def adapter(self, name: str) -> AdapterType:
        """The adapter type called ``name``, or a ConfigError that says how to get it."""
        found = self.adapters.get(name)
        if found is None:
            raise ConfigError(_unknown("adapter", name, sorted(self.adapters), "oco-adapter"))
        return found

    def store(self, name: str) -> StoreType:
        """The store type called ``name``, or a ConfigError that says how to get it."""
        found = self.stores.get(name)
        if found is None:
            raise ConfigError(_unknown("store", name, sorted(self.stores), "oco-store"))
        return found

    def datastore(self, name: str) -> DataStoreType:
        """The data-store type called ``name``, or a ConfigError that says how to get it."""
        found = self.datastores.get(name)
        if found is None:
            raise ConfigError(_unknown("data store", name, sorted(self.datastores), "oco-datastore"))
        return found

    def default_store(self) -> StoreType:
        """The one installed store type that offers itself as the default (see
        :attr:`StoreType.default`), for a config that names no store type; a ConfigError
        that asks for a ``type`` when no store type, or more than one, does."""
        return _default(self.stores, "no store type given", "store", "store: {type: ...}")

    def default_adapter(self) -> AdapterType:
        """The one installed adapter type that offers itself as the default (see
        :attr:`AdapterType.default`), for a config without ``adapters:``; a ConfigError
        that asks for ``adapters:`` when no adapter type, or more than one, does."""
        return _default(self.adapters, "no adapters: in the config", "adapter", "adapters: [{type: ...}]")

    def noisy_loggers(self) -> set[str]:
        """Loggers that installed plugins ask to keep at WARNING."""
        offers: list[AdapterType | StoreType | DataStoreType] = [
            *self.adapters.values(),
            *self.stores.values(),
            *self.datastores.values(),
        ]
        return {name for offer in offers for name in offer.noisy_loggers}


def _default(types: Mapping[str, _T], missing: str, kind: str, setting: str) -> _T:
    offered = sorted(name for name, offer in types.items() if offer.default)
    if len(offered) == 1:
        return types[offered[0]]
    installed = ", ".join(sorted(types)) or "none"
    if not offered:
        reason = f"no installed {kind} plugin offers a default"
    else:
        reason = f"several installed {kind} plugins offer a default ({', '.join(offered)})"
    raise ConfigError(f"{missing} and {reason}; set {setting} (installed: {installed})")


def _unknown(kind: str, name: str, installed: list[str], prefix: str) -> str:
    # Only the naming convention, never a list of known plugins: a third party's
    # adapter gets the same hint as ours.
    close = difflib.get_close_matches(name, installed, n=1, cutoff=0.6)
    if close:
        return f"unknown {kind} type {name!r}; did you mean {close[0]!r}? (installed: {', '.join(installed)})"
    package = f"{prefix}-{name}"
    return (
        f"unknown {kind} type {name!r}; installed: {', '.join(installed) or 'none'}. "
        f"If {package!r} provides it: pip install {package}"
    )


def _check_hook_names(manager: pluggy.PluginManager) -> None:
    """PluginError naming each plugin that implements a hook OCO does not have.

    pluggy's ``check_pending`` finds them but names the plugin by its ``repr`` and not
    the hooks that do exist; a misspelt hook (``oco_adapter_type``) would otherwise be
    silently never called.
    """
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        callers = {name: caller for name, caller in vars(manager.hook).items() if not name.startswith("_")}
        known = sorted(name for name, caller in callers.items() if caller.has_spec())
        distributions = {id(plugin): dist.project_name for plugin, dist in manager.list_plugin_distinfo()}
        problems = []
        for name, caller in sorted(callers.items()):
            if caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if impl.optionalhook:
                    continue
                plugin = manager.get_name(impl.plugin) or repr(impl.plugin)
                dist = distributions.get(id(impl.plugin))
                where = f"plugin {plugin!r}" + (f" (from {dist})" if dist else "")
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{where} implements {name!r}, which is not an OCO hook{hint}")
        raise PluginError(
            "; ".join(problems or [str(exc)])
            + f". OCO's hooks are {', '.join(known)}: rename the @hookimpl function to one of them, or mark it"
            " @hookimpl(optionalhook=True) if it is meant for another version of oco-core"
        ) from exc


def load_plugins(manager: pluggy.PluginManager | None = None) -> Plugins:
    """Load every plugin registered under the ``oco`` entry points and ask what they offer.

    With ``manager`` (one with the hookspecs added and plugins registered, as tests
    build), ask its plugins instead. A plugin that implements a hook OCO does not have
    is a PluginError, as is a hook that raises.
    """
    if manager is None:
        manager = pluggy.PluginManager("oco")
        manager.add_hookspecs(_hookspecs)
        try:
            manager.load_setuptools_entrypoints("oco")
        except Exception as exc:  # a broken third-party plugin must name itself
            raise PluginError(f"could not load an OCO plugin: {type(exc).__name__}: {exc}") from exc
    _check_hook_names(manager)
    adapters: dict[str, AdapterType] = {}
    stores: dict[str, StoreType] = {}
    datastores: dict[str, DataStoreType] = {}
    offers: list[tuple[str, Any, dict[str, Any]]] = [
        ("adapter", manager.hook.oco_adapter_types, adapters),
        ("store", manager.hook.oco_store_types, stores),
        ("data store", manager.hook.oco_datastore_types, datastores),
    ]
    for kind, hook, target in offers:
        try:
            results = hook()
        except Exception as exc:
            raise PluginError(f"a plugin failed to describe its {kind} types: {type(exc).__name__}: {exc}") from exc
        for offered in results:
            for item in offered:
                if item.name in target and target[item.name] is not item:
                    log.warning(
                        "two plugins offer the %s type %r (%s and %s); using %s",
                        kind,
                        item.name,
                        target[item.name].package,
                        item.package,
                        target[item.name].package,
                    )
                    continue
                target[item.name] = item
    return Plugins(adapters, stores, datastores)
