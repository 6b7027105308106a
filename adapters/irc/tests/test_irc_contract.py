"""The adapter contract (oco_core.testing.adapter_contract) against a real ngircd; the
``live_chat`` fixture and the ``IrcPerson`` driver are in conftest.py."""

from __future__ import annotations

import pytest

from oco_core.testing.adapter_contract import AdapterContract

pytestmark = pytest.mark.server("ngircd")


class TestIrcAdapterContract(AdapterContract):
    """Every check of the contract; IRC supports them all."""
