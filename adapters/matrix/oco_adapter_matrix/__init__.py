"""Matrix for OCO: the ``matrix`` adapter, found through the ``oco`` entry points.

Install it beside oco-core (``pip install oco-core oco-adapter-matrix``) and choose it in
the bot's config with ``type: matrix``; the package README lists the options.
"""

from __future__ import annotations

import typing as _typing

from oco_core.plugin import Adapter as _Adapter
from oco_core.plugin import AdapterType, hookimpl

from ._config import MatrixConfig as MatrixConfig

if _typing.TYPE_CHECKING:
    from ._adapter import MatrixAdapter as MatrixAdapter

__all__ = ["MatrixAdapter", "MatrixConfig", "oco_adapter_types"]


def __getattr__(name: str) -> _typing.Any:
    # matrix-nio and its HTTP stack take a good third of a second to import: every
    # `oco run` finds this plugin through its entry point, so they wait until a bot
    # actually creates a Matrix adapter (or someone asks for the class).
    if name == "MatrixAdapter":
        from ._adapter import MatrixAdapter

        return MatrixAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _create(config: MatrixConfig) -> _Adapter:
    from ._adapter import MatrixAdapter

    return MatrixAdapter(config)


@hookimpl
def oco_adapter_types() -> list[AdapterType]:
    """Offer the ``matrix`` adapter."""
    return [
        AdapterType(
            name="matrix",
            create=_create,
            config_model=MatrixConfig,
            package="oco-adapter-matrix",
            description="Matrix (matrix-nio; end-to-end encryption included)",
            # matrix-nio and the HTTP stack under it (httpx, h2's hpack, nio's peewee
            # key store) log every request and frame at INFO.
            noisy_loggers=("nio", "httpx", "httpcore", "hpack", "peewee"),
        )
    ]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
