"""Shared fixtures. Fixture modules are plugged in here so that each lives
in a module named for what it provides."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures_redis",
]


@pytest.fixture
def anyio_backend() -> str:
    """redis-py's asyncio client runs only on asyncio."""
    return "asyncio"
