"""OCO's IRC adapter (distribution ``oco-adapter-irc``).

Installed beside oco-core, it is found through the ``oco`` entry points; a bot uses it
with ``type: irc`` under ``adapters:`` (see :class:`IrcConfig` for the keys).
"""

from __future__ import annotations

import typing as _typing

from ._config import ChannelConfig as ChannelConfig
from ._config import IrcConfig as IrcConfig
from ._config import RateLimitConfig as RateLimitConfig
from ._config import ReconnectConfig as ReconnectConfig
from ._config import SaslConfig as SaslConfig
from ._plugin import oco_adapter_types as oco_adapter_types

if _typing.TYPE_CHECKING:
    from ._adapter import IrcAdapter as IrcAdapter
    from ._adapter import IrcStatistics as IrcStatistics

__version__ = "0.1.0"

__all__ = [
    "ChannelConfig",
    "IrcAdapter",
    "IrcConfig",
    "IrcStatistics",
    "RateLimitConfig",
    "ReconnectConfig",
    "SaslConfig",
    "oco_adapter_types",
]


def __getattr__(name: str) -> _typing.Any:
    # The irc library (and jaraco's, under it) takes a tenth of a second to import: every
    # `oco run` finds this plugin through its entry point, so it waits until a bot
    # actually creates an IRC adapter (or someone asks for these classes).
    if name in ("IrcAdapter", "IrcStatistics"):
        from . import _adapter

        return getattr(_adapter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
