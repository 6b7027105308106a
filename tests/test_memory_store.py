"""The in-memory store that tests of adapters and callbacks use passes the one store
contract, so what a test proves with it holds on the real stores."""

from __future__ import annotations

import pytest

from oco_core.plugin import Store
from oco_core.testing import MemoryStore
from oco_core.testing.store_contract import StoreContract


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def store(self, max_value_bytes: int) -> Store:
        return MemoryStore(max_value_bytes=max_value_bytes)
