"""Matrix for OCO: the ``matrix`` adapter, found through the ``oco`` entry points.

Install it beside oco-core (``pip install oco-core oco-adapter-matrix``) and choose it in
the bot's config with ``type: matrix``; the package README lists the options.
"""

from __future__ import annotations

from oco_core.plugin import AdapterType, hookimpl

from ._adapter import MatrixAdapter as MatrixAdapter
from ._config import MatrixConfig as MatrixConfig

__all__ = ["MatrixAdapter", "MatrixConfig", "oco_adapter_types"]


@hookimpl
def oco_adapter_types() -> list[AdapterType]:
    """Offer the ``matrix`` adapter."""
    return [
        AdapterType(
            name="matrix",
            create=MatrixAdapter,
            config_model=MatrixConfig,
            package="oco-adapter-matrix",
            description="Matrix (matrix-nio; end-to-end encryption included)",
            # matrix-nio and the HTTP stack under it (httpx, h2's hpack, nio's peewee
            # key store) log every request and frame at INFO.
            noisy_loggers=("nio", "httpx", "httpcore", "hpack", "peewee"),
        )
    ]
