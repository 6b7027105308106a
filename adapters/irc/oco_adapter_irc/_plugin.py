"""The ``oco`` entry point's hook: how the bot finds the ``irc`` adapter type."""

from __future__ import annotations

from oco_core.plugin import Adapter, AdapterType, hookimpl

from ._config import IrcConfig


def _create(config: IrcConfig) -> Adapter:
    from ._adapter import IrcAdapter  # the irc library, only for a bot that uses IRC

    return IrcAdapter(config)


@hookimpl
def oco_adapter_types() -> list[AdapterType]:
    """Offer the ``irc`` adapter type."""
    return [
        AdapterType(
            name="irc",
            create=_create,
            config_model=IrcConfig,
            package="oco-adapter-irc",
            description="IRC (plain TCP or TLS; SASL PLAIN, NickServ, flood limiting, reconnect)",
        )
    ]
