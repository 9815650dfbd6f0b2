"""A server in a child process, on a socket that is leased, bound and listening before it starts.

``free_socket`` is bound to the test's leased port; the fixture makes it listen and passes it to
the child with ``pass_fds``, and the child serves on the inherited descriptor (its number is the
parent's, given on the command line). The port is never unbound between the lease and the server,
so no other program can take it in between, and there is nothing to poll for: a client may connect
at once, and its request waits in the socket's backlog until the server accepts it.

The parent closes its own copy once ``Popen`` has returned (by then the child has its copy): if the
child then dies, no listener is left and clients are refused instead of left waiting. The lease
itself lasts until the test's teardown, whatever is closed. The same works with a socket from
``port_factory.socket()`` (a session-long server) and with servers that take a descriptor, such as
``uvicorn --fd N`` and ``gunicorn --bind fd://N``; for servers that read systemd's ``LISTEN_FDS``,
use ``pytest-ephemeral run --listen`` instead.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._support import http_request, stop

SERVER = Path(__file__).with_name("inherited_socket_server.py")


@pytest.fixture
def child_server(free_socket: socket.socket) -> Iterator[int]:
    """A child HTTP server on this test's leased port: yields the port."""
    free_socket.listen()
    fd = free_socket.fileno()
    process = subprocess.Popen([sys.executable, str(SERVER), str(fd)], pass_fds=[fd])
    port: int = free_socket.getsockname()[1]
    free_socket.close()  # the child has its copy now; the lease lasts until teardown all the same
    try:
        yield port
    finally:
        stop(process)


@pytest.mark.parametrize("path", ["/", "/hello", "/a/b?c=d"])
def test_child_server_answers_on_the_leased_port(child_server: int, path: str) -> None:
    assert http_request(child_server, "GET", path) == (200, path.encode())


def test_child_server_answers_many_requests(child_server: int) -> None:
    for number in range(20):
        assert http_request(child_server, "GET", f"/{number}") == (200, f"/{number}".encode())
