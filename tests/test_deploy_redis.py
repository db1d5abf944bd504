"""deploy/redis's node configs: a real Valkey starts with them, says what the
files say, and refreshd's server checks accept it (no hazard to name)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from tests.redis_server import RedisServer, free_port
from worker.redisio import connect
from worker.serverchecks import durability_for, find_hazards, inspect_server

pytestmark = pytest.mark.anyio

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "redis"


def _directives(name: str) -> dict[str, str]:
    """The file's active lines (comments and blanks left out)."""
    out = {}
    for line in (DEPLOY / name).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            out[key] = value
    return out


def _server(tmp_path: Path, *names: str, extra: str = "") -> RedisServer:
    """A server whose config includes ``names`` (absolute paths, as the
    files ask) after the test defaults, so the files' values win."""
    conf = tmp_path / "include.conf"
    conf.write_text("".join(f"include {DEPLOY / n}\n" for n in names) + extra)
    return RedisServer(tmp_path / "data", config={"include": str(conf)})


@pytest.mark.parametrize(
    "names", [("refreshd-node.conf",), ("refreshd-node.conf", "cluster-node.conf")]
)
async def test_a_node_with_the_shipped_config_is_accepted(
    tmp_path: Path, names: tuple[str, ...]
) -> None:
    extra = f"cluster-port {free_port()}\n" if "cluster-node.conf" in names else ""
    with _server(tmp_path, *names, extra=extra) as server:
        expected = {k: v for n in names for k, v in _directives(n).items()}
        with server.client(decode_responses=True) as client:
            for key, value in expected.items():
                if key == "cluster-config-file":
                    continue  # not readable at runtime
                assert client.config_get(key) == {key: value}, key
        async with connect(server.url) as client:
            facts = await inspect_server(client)
        assert find_hazards(facts, "auto") == {}
        # no replica yet: the fsync alone, as a lone promoted primary does
        durability = durability_for(facts, "auto")
        assert (durability.fsync, durability.replicas) == (True, 0)


def test_the_optional_replica_guard_refuses_writes_without_a_replica(tmp_path: Path) -> None:
    """What sentinel.md and cluster.md promise for the commented-out lines."""
    text = (DEPLOY / "refreshd-node.conf").read_text()
    assert "# min-replicas-to-write 1\n" in text
    assert "# min-replicas-max-lag 10\n" in text
    guard = "min-replicas-to-write 1\nmin-replicas-max-lag 10\n"
    with (
        _server(tmp_path, "refreshd-node.conf", extra=guard) as server,
        server.client() as client,
        pytest.raises(redis.ResponseError, match="NOREPLICAS"),
    ):
        client.set("k", "v")
