"""QuotaStore keeps every promise of the store contract while it counts usage."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from oco_core._quota import QuotaConfig, QuotaStore
from oco_core._sql_store import SqlStoreConfig, open_sql_store
from oco_core.testing.store_contract import StoreContract


class TestQuotaStoreOverSqlite(StoreContract):
    """The whole contract through QuotaStore, every namespace under a roomy quota."""

    @pytest.fixture
    async def store(self, tmp_path: Path, max_value_bytes: int) -> AsyncIterator[QuotaStore]:
        config = SqlStoreConfig(url=f"sqlite:///{tmp_path / 'oco.db'}", max_value_bytes=max_value_bytes)
        roomy = QuotaConfig(max_keys=10_000, max_bytes=1 << 30)
        async with open_sql_store(config) as inner:
            yield QuotaStore(inner, lambda namespace: roomy)


def test_quota_config_defaults_and_strictness() -> None:
    assert QuotaConfig() == QuotaConfig(max_keys=100_000, max_bytes=100 * 1024 * 1024)
    assert QuotaConfig.model_validate({"max_keys": None}).max_keys is None
    with pytest.raises(ValueError, match="extra"):
        QuotaConfig.model_validate({"max_values": 1})
    with pytest.raises(ValueError):
        QuotaConfig(max_bytes=0)


def test_for_callbacks_applies_only_to_callback_namespaces() -> None:
    default = QuotaConfig(max_keys=5)
    special = QuotaConfig(max_keys=50)
    quotas = QuotaStore.for_callbacks(None, default, {"big": special, "free": None})  # type: ignore[arg-type]
    assert quotas._quota_for("cb:x") is default
    assert quotas._quota_for("cb:big") is special
    assert quotas._quota_for("cb:free") is None
    assert quotas._quota_for("bot") is None
    assert quotas._quota_for("adapter:shell") is None
