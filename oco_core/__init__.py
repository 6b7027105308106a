"""OCO: an OpenChatOps bot, and the Python SDK for its callback programs."""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

from ._version import __version__ as __version__

if _typing.TYPE_CHECKING:
    from ._errors import AdapterError as AdapterError
    from ._errors import ApprovalDeniedError as ApprovalDeniedError
    from ._errors import CallbackError as CallbackError
    from ._errors import CapabilityError as CapabilityError
    from ._errors import ConfigError as ConfigError
    from ._errors import DataStoreUnavailableError as DataStoreUnavailableError
    from ._errors import InvalidPatternError as InvalidPatternError
    from ._errors import InvalidRequestError as InvalidRequestError
    from ._errors import OcoError as OcoError
    from ._errors import PluginError as PluginError
    from ._errors import QuestionUnansweredError as QuestionUnansweredError
    from ._errors import QuotaExceededError as QuotaExceededError
    from ._errors import RateLimitedError as RateLimitedError
    from ._errors import RequestTooLargeError as RequestTooLargeError
    from ._errors import SecretRefusedError as SecretRefusedError
    from ._errors import StandbyError as StandbyError
    from ._errors import StoreError as StoreError
    from ._errors import StoreUnavailableError as StoreUnavailableError
    from ._errors import UnknownTargetError as UnknownTargetError
    from ._errors import ValueTooLargeError as ValueTooLargeError
    from ._errors import VersionConflictError as VersionConflictError
    from ._sdk import Attachment as Attachment
    from ._sdk import Callback as Callback
    from ._sdk import DataStore as DataStore
    from ._sdk import Directory as Directory
    from ._sdk import Membership as Membership
    from ._sdk import Message as Message
    from ._sdk import PermissionCheck as PermissionCheck
    from ._sdk import Reaction as Reaction
    from ._sdk import Room as Room
    from ._sdk import SentMessage as SentMessage
    from ._sdk import Storage as Storage
    from ._sdk import User as User
    from ._sdk_events import PublishedEvent as PublishedEvent
    from ._sdk_events import Response as Response
    from ._sdk_events import ScheduleFiring as ScheduleFiring
    from ._sdk_events import WebhookRequest as WebhookRequest
    from ._store import Item as Item

__all__ = [
    "AdapterError",
    "ApprovalDeniedError",
    "Attachment",
    "Callback",
    "CallbackError",
    "CapabilityError",
    "ConfigError",
    "DataStore",
    "DataStoreUnavailableError",
    "Directory",
    "InvalidPatternError",
    "InvalidRequestError",
    "Item",
    "Membership",
    "Message",
    "OcoError",
    "PermissionCheck",
    "PluginError",
    "PublishedEvent",
    "QuestionUnansweredError",
    "QuotaExceededError",
    "RateLimitedError",
    "Reaction",
    "RequestTooLargeError",
    "Response",
    "Room",
    "ScheduleFiring",
    "SecretRefusedError",
    "SentMessage",
    "StandbyError",
    "Storage",
    "StoreError",
    "StoreUnavailableError",
    "UnknownTargetError",
    "User",
    "ValueTooLargeError",
    "VersionConflictError",
    "WebhookRequest",
    "__version__",
]

# Imported on first use: the SDK pulls in grpc, trio and protobuf (a quarter of a second
# or more), which `oco --version`, `oco --help` and every `import oco_core._x` would
# otherwise pay before doing anything.
_LAZY = {
    **{name: "._errors" for name in __all__ if name.endswith("Error")},
    **dict.fromkeys(
        (
            "Attachment",
            "Callback",
            "DataStore",
            "Directory",
            "Membership",
            "Message",
            "PermissionCheck",
            "Reaction",
            "Room",
            "SentMessage",
            "Storage",
            "User",
        ),
        "._sdk",
    ),
    **dict.fromkeys(("PublishedEvent", "Response", "ScheduleFiring", "WebhookRequest"), "._sdk_events"),
    "Item": "._store",
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value  # the next lookup is an ordinary one
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
