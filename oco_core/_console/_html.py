"""Templates and static files of the console, both served from the package (no CDN,
no build step).

Every template is autoescaped (Jinja2's ``autoescape=True`` for all of them, whatever
their name), so text from chat, the store or the config is escaped wherever it lands;
nothing here builds HTML from strings. Undefined names are errors
(``StrictUndefined``): a misspelt variable fails a test instead of rendering empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import jinja2

from .._admin import local_time

#: Content types of the static files, by suffix (anything else is not served).
_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}


def _iso(when: float) -> str:
    """Unix time → ISO 8601 in UTC, for ``<time datetime>``."""
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")


def environment() -> jinja2.Environment:
    """The console's template environment: the package's ``templates/``, autoescaped."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("oco_core._console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["local_time"] = local_time
    env.filters["iso"] = _iso
    return env


def static_files() -> Mapping[str, tuple[bytes, str]]:
    """The package's ``static/`` files, read once: name → (content, content type)."""
    found: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("oco_core._console").joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            found[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return found


def render(env: jinja2.Environment, template: str, context: Mapping[str, Any]) -> bytes:
    """``template`` rendered with ``context``, as UTF-8."""
    return env.get_template(template).render(context).encode()


__all__: Sequence[str] = ["environment", "render", "static_files"]
