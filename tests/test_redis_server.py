"""The test server itself: the fault tests rely on these behaviours."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import redis

from tests.redis_server import RedisServer


def test_start_answers_ping(fresh_redis: RedisServer) -> None:
    assert fresh_redis.running
    assert fresh_redis.url == f"redis://127.0.0.1:{fresh_redis.port}/0"
    with redis.Redis.from_url(fresh_redis.url) as client:
        assert client.ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}


def test_kill_then_restart_keeps_data(fresh_redis: RedisServer) -> None:
    port, old_pid = fresh_redis.port, fresh_redis.pid
    with fresh_redis.client() as client:
        client.set("k", "v")
    fresh_redis.kill()
    assert not fresh_redis.running
    fresh_redis.restart()
    assert fresh_redis.port == port
    assert fresh_redis.pid != old_pid
    with fresh_redis.client() as client:
        assert client.get("k") == b"v"


def test_pause_times_out_and_resume_answers(fresh_redis: RedisServer) -> None:
    with fresh_redis.client(socket_timeout=0.2) as client:
        assert client.ping()
        fresh_redis.pause()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        fresh_redis.resume()
        assert client.ping()


def test_stop_and_kill_end_a_paused_server(tmp_path: Path) -> None:
    for end in (RedisServer.stop, RedisServer.kill):
        server = RedisServer(tmp_path / end.__name__)
        server.start()
        pid = server.pid
        server.pause()
        end(server)
        assert not server.running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_two_servers_get_different_ports(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "a") as a, RedisServer(tmp_path / "b") as b:
        assert a.port != b.port
        with a.client() as ca, b.client() as cb:
            assert ca.ping()
            assert cb.ping()


def test_shared_server_is_flushed_per_test(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0
        client.set("left-behind", "1")


def test_shared_server_is_flushed_per_test_again(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0
        client.set("left-behind", "1")


def test_failed_start_reports_the_log(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, config={"no-such-directive": "x"})
    with pytest.raises(RuntimeError, match="no-such-directive"):
        server.start()
    assert not server.running


def test_a_port_taken_before_the_first_start_is_chosen_again(tmp_path: Path) -> None:
    """``free_port`` hands out ephemeral ports, which any outgoing connection
    may take before the server binds: a server whose ports the fixture chose
    picks new ones on its first start; a port the test gave stays an error."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        chosen = RedisServer(tmp_path / "chosen")
        chosen._config["port"], chosen._port = str(port), port  # as if taken meanwhile
        with chosen:
            assert chosen.port != port
            with chosen.client() as client:
                assert client.ping()
        given = RedisServer(tmp_path / "given", port=port)
        with pytest.raises(RuntimeError, match="did not come up"):
            given.start()
