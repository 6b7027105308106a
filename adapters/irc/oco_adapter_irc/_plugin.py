"""The ``oco`` entry point's hook: how the bot finds the ``irc`` adapter type."""

from __future__ import annotations

from oco_core.plugin import AdapterType, hookimpl

from ._adapter import IrcAdapter
from ._config import IrcConfig


@hookimpl
def oco_adapter_types() -> list[AdapterType]:
    """Offer the ``irc`` adapter type."""
    return [
        AdapterType(
            name="irc",
            create=IrcAdapter,
            config_model=IrcConfig,
            package="oco-adapter-irc",
            description="IRC (plain TCP or TLS; SASL PLAIN, NickServ, flood limiting, reconnect)",
        )
    ]
