"""Many tests, one server: ``session_echo_port`` (see conftest.py) is started once per session.

Each test opens its own connection with a plain ``socket`` and closes it before the server does.
"""

from __future__ import annotations

import socket

import pytest

from ._support import HOST, TIMEOUT


def ask(port: int, *lines: bytes) -> list[bytes]:
    """Send ``lines`` over one connection to the echo server; return the lines that come back."""
    with (
        socket.create_connection((HOST, port), timeout=TIMEOUT) as sock,
        sock.makefile("rb") as replies,
    ):
        sock.sendall(b"".join(line + b"\n" for line in lines))
        return [replies.readline().rstrip(b"\n") for _ in lines]


@pytest.mark.parametrize(
    "line", [b"", b"ping", b"PING", b"hello world", "grüß dich".encode(), b"x" * 10_000]
)
def test_echo(session_echo_port: int, line: bytes) -> None:
    assert ask(session_echo_port, line) == [line]


@pytest.mark.parametrize("count", [2, 3, 10, 100])
def test_several_lines_on_one_connection(session_echo_port: int, count: int) -> None:
    lines = [f"line {n}".encode() for n in range(count)]
    assert ask(session_echo_port, *lines) == lines


@pytest.mark.parametrize("connections", [5, 20])
def test_connections_in_a_row(session_echo_port: int, connections: int) -> None:
    for n in range(connections):
        assert ask(session_echo_port, str(n).encode()) == [str(n).encode()]
