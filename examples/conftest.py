"""A session-scoped server on a port from ``port_factory``, shared by every test that asks for it.

Under xdist each worker runs its own session, so each worker starts its own server, on its own
leased port: no clash, however many workers or pytest runs share the machine.
"""

from __future__ import annotations

import socketserver
from collections.abc import Iterator

import pytest

from pytest_ephemeral import PortFactory

from ._support import HOST, serving

# examples/servers needs the test extras (pytest-postgresql, pytest-redis) and real servers, and
# has a configuration of its own: run it as `pytest -n 4 examples/servers` (tests/test_servers.py
# does, with real PostgreSQL and Redis).
collect_ignore = ["servers"]


class LineEchoHandler(socketserver.StreamRequestHandler):
    """Send every line back until the client closes the connection."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class EchoTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True  # never wait for a handler thread at shutdown


@pytest.fixture(scope="session")
def session_echo_port(port_factory: PortFactory) -> Iterator[int]:
    """Port of a TCP line-echo server that runs for the whole session."""
    port = port_factory()
    server = EchoTCPServer((HOST, port), LineEchoHandler)
    with serving(server):
        yield port
    port_factory.release(port)  # optional: every port_factory lease ends with the session anyway
