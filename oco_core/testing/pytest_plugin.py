"""pytest plugin shared by every OCO distribution's tests (entry point ``pytest11``).

Tests that need a real server (ngircd, Synapse, PostgreSQL, Redis) call
:func:`server_unavailable` when it cannot be found. On a developer's machine the test is
skipped with the reason; where ``OCO_REQUIRE_SERVERS=1`` is set (``.ci/run`` sets it),
it fails instead, so CI never counts a skipped server test as a pass.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_SERVERS_ENV = "OCO_REQUIRE_SERVERS"


def servers_required() -> bool:
    """True when a missing test server must fail the test rather than skip it."""
    return os.environ.get(REQUIRE_SERVERS_ENV, "") not in ("", "0", "false", "no")


def server_unavailable(name: str, why: str) -> NoReturn:
    """Skip (or, in CI, fail) the calling test because server ``name`` is not available."""
    message = f"{name} is not available: {why}"
    if servers_required():
        pytest.fail(f"{message} ({REQUIRE_SERVERS_ENV} is set, so this cannot be skipped)")
    pytest.skip(message)
