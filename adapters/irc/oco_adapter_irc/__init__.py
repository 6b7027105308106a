"""OCO's IRC adapter (distribution ``oco-adapter-irc``).

Installed beside oco-core, it is found through the ``oco`` entry points; a bot uses it
with ``type: irc`` under ``adapters:`` (see :class:`IrcConfig` for the keys).
"""

from __future__ import annotations

from ._adapter import IrcAdapter as IrcAdapter
from ._adapter import IrcStatistics as IrcStatistics
from ._config import ChannelConfig as ChannelConfig
from ._config import IrcConfig as IrcConfig
from ._config import RateLimitConfig as RateLimitConfig
from ._config import ReconnectConfig as ReconnectConfig
from ._config import SaslConfig as SaslConfig
from ._plugin import oco_adapter_types as oco_adapter_types

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
