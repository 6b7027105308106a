"""The public API for plugin authors: adapters, stores, and the hook marker.

A plugin distribution declares an entry point in the ``oco`` group, for example::

    [project.entry-points.oco]
    irc = "oco_adapter_irc"

and the module implements hooks from :mod:`oco_core._hookspecs`::

    from oco_core.plugin import AdapterType, hookimpl

    @hookimpl
    def oco_adapter_types():
        return [AdapterType(name="irc", create=IrcAdapter, config_model=IrcConfig,
                            package="oco-adapter-irc")]
"""

from __future__ import annotations

from ._adapter import Adapter as Adapter
from ._adapter import AdapterHost as AdapterHost
from ._adapter import AdapterType as AdapterType
from ._adapter import Attachment as Attachment
from ._adapter import ChatRoom as ChatRoom
from ._adapter import ChatUser as ChatUser
from ._adapter import Feature as Feature
from ._adapter import IncomingMessage as IncomingMessage
from ._adapter import MembershipEvent as MembershipEvent
from ._adapter import MembershipKind as MembershipKind
from ._adapter import OutgoingMessage as OutgoingMessage
from ._adapter import ReactionEvent as ReactionEvent
from ._datastore import DataStoreAccess as DataStoreAccess
from ._datastore import DataStoreProvider as DataStoreProvider
from ._datastore import DataStoreType as DataStoreType
from ._datastore import corner_name as corner_name
from ._hookspecs import hookimpl as hookimpl
from ._markdown import MarkdownStyles as MarkdownStyles
from ._markdown import render_markdown as render_markdown
from ._store import MAX_KEY_BYTES as MAX_KEY_BYTES
from ._store import Item as Item
from ._store import NamespacedStore as NamespacedStore
from ._store import Store as Store
from ._store import StoreType as StoreType
from ._store import check_value as check_value
from ._store import encode_key as encode_key
from ._store import mask_url as mask_url
from ._store import prefix_end as prefix_end
from ._timing import Backoff as Backoff
from ._timing import TokenBucket as TokenBucket

__all__ = [
    "MAX_KEY_BYTES",
    "Adapter",
    "AdapterHost",
    "AdapterType",
    "Attachment",
    "Backoff",
    "ChatRoom",
    "ChatUser",
    "DataStoreAccess",
    "DataStoreProvider",
    "DataStoreType",
    "Feature",
    "IncomingMessage",
    "Item",
    "MarkdownStyles",
    "MembershipEvent",
    "MembershipKind",
    "NamespacedStore",
    "OutgoingMessage",
    "ReactionEvent",
    "Store",
    "StoreType",
    "TokenBucket",
    "check_value",
    "corner_name",
    "encode_key",
    "hookimpl",
    "mask_url",
    "prefix_end",
    "render_markdown",
]
