"""Version of oco-core."""

__version__ = "0.1.0"
