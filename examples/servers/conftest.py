"""Real PostgreSQL and Redis servers on leased ports, with pytest-postgresql and pytest-redis.

Both plugins choose a server's port with ``port_for.get_port``. With pytest-ephemeral installed,
its ``port-for`` adapter leases each such port for the fixture that asked, until that fixture's
teardown (after the server has stopped), so concurrent xdist workers and concurrent pytest runs on
one machine never start two servers on one port. Nothing below imports pytest-ephemeral except the
per-test recipe, which asks for ``free_port`` by name.

Three lifetimes, from the cheapest to the most isolated:

- one server per session, that is per xdist worker: the plugins' own factories, as documented;
- one server per test module: a module-scoped fixture that asks ``port_for`` for a port while it
  is set up, so the port is leased for the module;
- one server per test: a function-scoped fixture on ``free_port``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import port_for
import psycopg
import pytest
from pytest_postgresql import factories as postgresql_factories
from pytest_postgresql.config import get_config as postgresql_config
from pytest_postgresql.executors import PostgreSQLExecutor
from pytest_redis import factories as redis_factories
from pytest_redis.config import get_config as redis_config
from pytest_redis.executor import RedisExecutor

# One server per session. No port given, none configured (--postgresql-port, --redis-port):
# "any free port" from port_for.get_port, leased by the adapter.
postgresql_proc = postgresql_factories.postgresql_proc()
postgresql = postgresql_factories.postgresql("postgresql_proc")  # a fresh database per test
redis_proc = redis_factories.redis_proc()
redisdb = redis_factories.redisdb("redis_proc")  # a client, the server flushed after each test


@pytest.fixture(scope="module")
def module_postgresql(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PostgreSQLExecutor]:
    """A PostgreSQL server for one test module, stopped when the module is done."""
    config = postgresql_config(request)
    pg_ctl = config.exec if shutil.which(config.exec) else shutil.which("pg_ctl")
    if pg_ctl is None:
        pytest.skip("pg_ctl not found: install PostgreSQL or pass --postgresql-exec")
    workdir = tmp_path_factory.mktemp("module-postgresql")
    executor = PostgreSQLExecutor(
        executable=pg_ctl,
        host=config.host,
        port=port_for.select_random(),  # leased until this fixture's teardown
        datadir=str(workdir / "data"),
        unixsocketdir=config.unixsocketdir,
        logfile=str(workdir / "postgresql.log"),
        startparams=config.startparams,
        dbname=config.dbname,
        user=config.user,
    )
    executor.start()
    try:
        executor.wait_for_postgres()
        _wait_for_logins(executor)
        yield executor
    finally:
        executor.stop()


def _wait_for_logins(executor: PostgreSQLExecutor, seconds: float = 60) -> None:
    """Until PostgreSQL accepts a login: it accepts TCP connections (all the executor waits for)
    a moment before it lets anyone in ("the database system is starting up")."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with psycopg.connect(
                host=executor.host,
                port=executor.port,
                user=executor.user,
                dbname="postgres",
                connect_timeout=5,
            ):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def test_redis(
    request: pytest.FixtureRequest, free_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisExecutor]:
    """A Redis server of this test's own, on the port leased for this test."""
    config = redis_config(request)
    executor = RedisExecutor(
        executable=config.exec,
        databases=1,
        redis_timeout=config.timeout,
        loglevel="warning",
        host=config.host,
        port=free_port,
        datadir=tmp_path_factory.mktemp("test-redis"),
    )
    with executor:
        yield executor
