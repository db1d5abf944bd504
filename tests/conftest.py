"""Shared fixtures. Fixture modules are plugged in here so that each lives
in a module named for what it provides."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures_redis",
    "tests.fixtures_cluster",
]


@pytest.fixture
def anyio_backend() -> str:
    """redis-py's asyncio client runs only on asyncio."""
    return "asyncio"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``slow`` tests (minutes each) run only when asked for (``-m slow``):
    the default suite must stay within minutes on two cores."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]
