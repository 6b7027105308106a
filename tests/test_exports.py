"""The public API is pinned: adding or removing a public name is a decision made here.

Each public module's ``__all__`` must equal the list below, every name in it must
exist and be documented, and every public object the module defines or re-exports
from oco-core must be in ``__all__`` (so a new ``from ._x import Y as Y`` without an
``__all__`` entry fails too). When you change the public API on purpose, change the
list here in the same commit.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

import oco_core

PINNED: dict[str, frozenset[str]] = {
    "oco_core": frozenset(
        {
            "__version__",
            # the exception tree
            "OcoError",
            "AdapterError",
            "ApprovalDeniedError",
            "CallbackError",
            "CapabilityError",
            "ConfigError",
            "DataStore",
            "DataStoreUnavailableError",
            "InvalidPatternError",
            "InvalidRequestError",
            "PluginError",
            "QuestionUnansweredError",
            "QuotaExceededError",
            "RateLimitedError",
            "RequestTooLargeError",
            "SecretRefusedError",
            "StandbyError",
            "StoreError",
            "StoreUnavailableError",
            "UnknownTargetError",
            "ValueTooLargeError",
            "VersionConflictError",
            # the callback SDK
            "Callback",
            "Directory",
            "Item",
            "Membership",
            "Message",
            "PermissionCheck",
            "Room",
            "Storage",
            "User",
            # rich replies
            "Attachment",
            "Reaction",
            "SentMessage",
            # events beyond chat
            "PublishedEvent",
            "Response",
            "ScheduleFiring",
            "WebhookRequest",
        }
    ),
    "oco_core.plugin": frozenset(
        {
            "hookimpl",
            # adapters
            "Adapter",
            "AdapterHost",
            "AdapterType",
            "Attachment",
            "ChatRoom",
            "ChatUser",
            "Feature",
            "IncomingMessage",
            "MembershipEvent",
            "MembershipKind",
            "OutgoingMessage",
            "ReactionEvent",
            # stores
            "MAX_KEY_BYTES",
            "Item",
            "NamespacedStore",
            "Store",
            "StoreType",
            "check_value",
            "encode_key",
            "mask_url",
            "prefix_end",
            # data stores
            "DataStoreAccess",
            "DataStoreProvider",
            "DataStoreType",
            "corner_name",
            # shared helpers
            "Backoff",
            "MarkdownStyles",
            "TokenBucket",
            "render_markdown",
        }
    ),
    "oco_core.testing": frozenset(
        {
            "ControlChat",
            "Lines",
            "MemoryAdapter",
            "MemoryConfig",
            "MemoryStore",
            "OcoProcess",
            "RecordingHost",
            "RunningBot",
            "free_port",
            "oco_cli",
            "open_bot",
            "run_oco",
            "serving",
        }
    ),
}

#: Public objects must come from here to count as the module's own API (anything else,
#: such as ``trio`` imported by oco_core.testing for its own use, is not exported).
SCOPE = {"oco_core": "oco_core.", "oco_core.plugin": "oco_core.", "oco_core.testing": "oco_core.testing"}

MODULES = sorted(PINNED)
PACKAGE = Path(oco_core.__file__).parent


def module_all(name: str) -> list[str]:
    """The module's ``__all__``, failing the test when it has none."""
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__; list its public names there"
    return list(exported)


@pytest.mark.parametrize("name", MODULES)
def test_all_is_the_pinned_list(name: str) -> None:
    exported = module_all(name)
    assert len(exported) == len(set(exported)), f"{name}.__all__ lists a name twice"
    added = sorted(set(exported) - PINNED[name])
    removed = sorted(PINNED[name] - set(exported))
    assert (added, removed) == ([], []), (
        f"{name}'s public API changed: added {added}, removed {removed}. If that is on purpose, "
        "update PINNED in tests/test_exports.py (and the docs that describe the API)."
    )


@pytest.mark.parametrize("name", MODULES)
def test_every_public_object_is_in_all(name: str) -> None:
    """A public re-export or definition that __all__ forgets is an accident either way."""
    module = importlib.import_module(name)
    exported = set(module_all(name))
    public = {
        attr
        for attr, value in vars(module).items()
        if not attr.startswith("_")
        and not isinstance(value, ModuleType)
        and str(getattr(value, "__module__", "")).startswith(SCOPE[name])
        and not hasattr(value, "oco_impl")  # a hook implementation, called by pluggy, not by users
    }
    assert public <= exported, (
        f"{name} has public names missing from __all__: {sorted(public - exported)}; export them (and pin them "
        "here) or import them under a private name"
    )


def _own_doc(value: object) -> str:
    if inspect.isclass(value):
        doc = vars(value).get("__doc__") or ""
        # A dataclass without a docstring gets its signature as one.
        return "" if doc.startswith(f"{value.__name__}(") else doc
    if inspect.isfunction(value) or inspect.ismethod(value) or inspect.isbuiltin(value):
        return value.__doc__ or ""
    return (inspect.getdoc(type(value)) or "") if callable(value) else ""


def _doc_comment(attr: str) -> str:
    """The ``#:`` comment above the assignment of constant ``attr`` in oco-core."""
    assignment = re.compile(rf"^{re.escape(attr)}\s*(:[^=]+)?=")
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if assignment.match(line):
                return lines[i - 1].removeprefix("#:").strip() if i and lines[i - 1].startswith("#:") else ""
    return ""


@pytest.mark.parametrize("name", MODULES)
def test_every_exported_name_exists_and_is_documented(name: str) -> None:
    module = importlib.import_module(name)
    missing = [attr for attr in module_all(name) if not hasattr(module, attr)]
    assert not missing, f"{name}.__all__ names what the module does not have: {missing}"
    undocumented = []
    for attr in module_all(name):
        if attr.startswith("__"):
            continue  # __version__ and friends document themselves
        value = getattr(module, attr)
        doc = _own_doc(value) if callable(value) else _doc_comment(attr)
        if not doc.strip():
            undocumented.append(attr)
    assert not undocumented, (
        f"{name} exports undocumented names: {undocumented} (a docstring, or a '#:' comment above a constant)"
    )
