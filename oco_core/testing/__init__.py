"""Test helpers for people who build on OCO: fakes of the adapter and the store.

Also registered as the ``memory`` adapter plugin, for tests and benchmarks.
"""

from __future__ import annotations
