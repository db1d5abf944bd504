"""Redis fixtures: one shared server for ordinary tests, a private one for
tests that kill, pause or restart it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer

__all__ = ["fresh_redis", "redis_server", "redis_url"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Shared by the whole session: starting a server per test would cost
    more than most tests. Tests must not break it; use ``fresh_redis``."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """Each test starts from an empty keyspace and script cache. A server
    left paused or dead by a failed test is revived so that one failure
    does not cascade into every later test."""
    redis_server.resume()
    if not redis_server.running:
        redis_server.start()
    with redis_server.client() as client:
        client.flushall()
        client.script_flush()
    return redis_server.url


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private server, already started, that the test may kill, pause or
    restart; always stopped at teardown."""
    with RedisServer(tmp_path / "redis") as server:
        yield server
