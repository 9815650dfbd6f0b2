"""Redis: a client of the session's server per test, and a server of the test's own."""

from __future__ import annotations

import pytest
import redis
from pytest_redis.executor import RedisExecutor


@pytest.mark.parametrize("n", range(4))
def test_session_server(redisdb: redis.Redis, n: int) -> None:
    redisdb.set("n", n)
    assert redisdb.get("n") == str(n).encode()


@pytest.mark.parametrize("n", range(4))
def test_own_server(test_redis: RedisExecutor, n: int) -> None:
    client = redis.Redis(host=test_redis.host, port=test_redis.port)
    try:
        client.set("n", n)
        assert int(client.info("server")["tcp_port"]) == test_redis.port
    finally:
        client.close()  # the client closes first: no TIME_WAIT left on the server's port
