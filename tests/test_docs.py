"""The plugin documentation keeps up with the code: every hook has its own section in
docs/plugins.md and its own test, and every part of the store interface is described in
docs/writing-a-store.md."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from oco_core import _hookspecs as hookspecs
from oco_core.plugin import AdapterType, Store, StoreType

ROOT = Path(__file__).parent.parent
PLUGINS_DOC = ROOT / "docs" / "plugins.md"
STORE_DOC = ROOT / "docs" / "writing-a-store.md"
PLUGIN_TESTS = Path(__file__).parent / "test_plugins.py"

HOOKS = sorted(name for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("oco_"))


def sections(path: Path, level: str) -> dict[str, str]:
    """The text under each heading of ``level`` ("##", "###") in a Markdown file, by
    the heading's text without backticks."""
    found: dict[str, str] = {}
    current: str | None = None
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code  # a "# comment" in a code block is not a heading
        heading = None if in_code else re.match(r"^(#+)\s+(.*)$", line)
        if heading:
            current = heading[2].replace("`", "").strip() if heading[1] == level else None
            if current is not None:
                found[current] = ""
            continue
        if current is not None:
            found[current] += line + "\n"
    return found


def test_the_hooks_are_found() -> None:
    assert HOOKS, "no hookspecs found in oco_core/_hookspecs.py"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_its_own_section(hook: str) -> None:
    documented = sections(PLUGINS_DOC, "##")
    assert hook in documented, f"docs/plugins.md needs a '## {hook}' section"
    text = documented[hook]
    for part in ("When it is called", "What it returns", "Example"):
        assert part in text, f"docs/plugins.md's {hook} section should say '{part}'"
    assert "```python" in text, f"docs/plugins.md's {hook} section needs a Python example"


def test_no_section_documents_a_hook_that_does_not_exist() -> None:
    stale = sorted(h for h in sections(PLUGINS_DOC, "##") if h.startswith("oco_") and h not in HOOKS)
    assert not stale, f"docs/plugins.md documents hooks that oco_core/_hookspecs.py no longer has: {stale}"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_its_own_test(hook: str) -> None:
    tree = ast.parse(PLUGIN_TESTS.read_text(encoding="utf-8"))
    tests = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
    assert f"test_hook_{hook}" in tests, (
        f"tests/test_plugins.py needs test_hook_{hook}: a test that runs a bot with a plugin implementing it"
    )


@pytest.mark.parametrize("described", [AdapterType, StoreType])
def test_every_field_of_a_description_is_in_the_hook_reference(described: type) -> None:
    text = PLUGINS_DOC.read_text(encoding="utf-8")
    missing = [f.name for f in dataclasses.fields(described) if f"| `{f.name}` |" not in text]
    assert not missing, f"docs/plugins.md's table of {described.__name__} lacks {missing}"


def test_every_store_method_has_its_contract_in_the_store_guide() -> None:
    methods = sorted(name for name, _ in inspect.getmembers(Store, inspect.iscoroutinefunction))
    assert {"get", "set", "delete", "list", "usage"} <= set(methods)
    documented = sections(STORE_DOC, "###")
    missing = [m for m in methods if m not in documented]
    assert not missing, f"docs/writing-a-store.md needs a '### {missing[0]}' section for each of {missing}"


def test_the_readme_links_the_plugin_guides() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/plugins.md)" in readme
    assert "(docs/writing-a-store.md)" in readme


def _numeric_settings(model: type, prefix: str = "") -> list[str]:
    """The config paths of every number in the config model (``grpc.max_routes``,
    ``callbacks[].give_up_after``): each is a limit or a timing."""
    import typing

    from pydantic import BaseModel

    found: list[str] = []
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        annotation = field.annotation
        args = typing.get_args(annotation) or (annotation,)
        if typing.get_origin(annotation) is list:
            args = typing.get_args(annotation)
            prefix_here = f"{prefix}{name}[]."
        else:
            prefix_here = f"{prefix}{name}."
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if models:
            found += _numeric_settings(models[0], prefix_here)
        elif any(a in (int, float) for a in args):
            found.append(prefix + name)
    return found


def test_every_numeric_setting_is_in_the_readme_limits_table() -> None:
    from oco_core._config import Config

    limits = sections(ROOT / "README.md", "###")["Limits"]
    missing = [
        path
        for path in _numeric_settings(Config)
        # A quota's fields are one row, under the quota's own key.
        if f"`{path}`" not in limits and f"`{path.rpartition('.')[0]}`" not in limits
    ]
    assert not missing, f"README's Limits table lacks {missing}"
