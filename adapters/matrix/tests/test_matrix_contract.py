"""The adapter contract (oco_core.testing.adapter_contract) against a real Synapse; the
``live_chat`` fixture and the ``MatrixPerson`` driver are in conftest.py."""

from __future__ import annotations

import pytest

from oco_core.testing.adapter_contract import AdapterContract

pytestmark = [pytest.mark.server("synapse"), pytest.mark.slow]


class TestMatrixAdapterContract(AdapterContract):
    """Every check of the contract; Matrix supports them all."""
