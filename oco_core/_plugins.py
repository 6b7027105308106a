"""Finding plugins: a fresh pluggy manager per bot, fed by the ``oco`` entry points."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pluggy

from . import _hookspecs
from ._adapter import AdapterType
from ._errors import ConfigError, PluginError
from ._store import StoreType

log = logging.getLogger(__name__)

#: Distributions known to provide plugins, for "pip install" hints.
_KNOWN_PACKAGES = {
    "irc": "oco-adapter-irc",
    "matrix": "oco-adapter-matrix",
    "redis": "oco-store-redis",
}


@dataclass(frozen=True, slots=True)
class Plugins:
    """The adapter and store types every installed plugin offers, by name."""

    adapters: dict[str, AdapterType]
    stores: dict[str, StoreType]

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


def _unknown(kind: str, name: str, installed: list[str], prefix: str) -> str:
    package = _KNOWN_PACKAGES.get(name, f"{prefix}-{name}")
    return (
        f"unknown {kind} type {name!r}; installed: {', '.join(installed) or 'none'}. "
        f"If {package!r} provides it: pip install {package}"
    )


def load_plugins(manager: pluggy.PluginManager | None = None) -> Plugins:
    """Load every plugin registered under the ``oco`` entry points and ask what they offer."""
    if manager is None:
        manager = pluggy.PluginManager("oco")
        manager.add_hookspecs(_hookspecs)
        try:
            manager.load_setuptools_entrypoints("oco")
        except Exception as exc:  # a broken third-party plugin must name itself
            raise PluginError(f"could not load an OCO plugin: {type(exc).__name__}: {exc}") from exc
    adapters: dict[str, AdapterType] = {}
    stores: dict[str, StoreType] = {}
    for kind, hook, target in (
        ("adapter", manager.hook.oco_adapter_types, adapters),
        ("store", manager.hook.oco_store_types, stores),
    ):
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
    return Plugins(adapters, stores)
