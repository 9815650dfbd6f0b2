"""PostgreSQL: a database per test on the session's server, and a server of the module's own."""

from __future__ import annotations

import psycopg
import pytest
from pytest_postgresql.executors import PostgreSQLExecutor


@pytest.mark.parametrize("n", range(4))
def test_session_server(postgresql: psycopg.Connection, n: int) -> None:
    with postgresql.cursor() as cursor:
        cursor.execute("CREATE TABLE item (n integer)")  # a fresh database: no clash between tests
        cursor.execute("INSERT INTO item VALUES (%s)", (n,))
        cursor.execute("SELECT n FROM item")
        assert cursor.fetchall() == [(n,)]


@pytest.mark.parametrize("n", range(2))
def test_module_server(module_postgresql: PostgreSQLExecutor, n: int) -> None:
    with psycopg.connect(
        host=module_postgresql.host,
        port=module_postgresql.port,
        user=module_postgresql.user,
        dbname="postgres",
    ) as connection:
        row = connection.execute("SELECT current_setting('port')::int").fetchone()
    assert row == (module_postgresql.port,)
