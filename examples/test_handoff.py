"""Hand ``free_socket`` to a server: the port is bound before the test starts, so no other
program can take it between "this port is free" and "the server is listening".

Two ways to do it:

* asyncio: ``asyncio.start_server(handler, sock=free_socket)`` listens on the socket as it is.
* ``http.server`` / ``socketserver``: build the server with ``bind_and_activate=False``, swap in
  the bound socket, then call ``server_activate()`` to listen (see ``HandoffHTTPServer``).

Closing the server closes the socket; ``free_socket``'s own teardown closing it again is harmless.
"""

from __future__ import annotations

import asyncio
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ._support import EchoHTTPHandler, echo_lines, echo_round_trip, http_request, serving


class HandoffHTTPServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` that serves on an already bound socket instead of binding one."""

    # server_close() joins the handler threads: each has closed its connection when it returns
    daemon_threads = False

    def __init__(self, sock: socket.socket, handler: type[BaseHTTPRequestHandler]) -> None:
        host, port = sock.getsockname()[:2]
        super().__init__((host, port), handler, bind_and_activate=False)
        self.socket.close()  # the unbound socket the constructor made: replaced by ours
        self.socket = sock
        self.server_name, self.server_port = host, port  # what server_bind() would have set
        self.server_activate()  # listen()


@pytest.mark.parametrize("path", ["/", "/handoff", "/a/b?c=d", "/" + "deep/" * 20, "/%20", "/last"])
def test_http_server_on_free_socket(free_socket: socket.socket, path: str) -> None:
    port = free_socket.getsockname()[1]
    with serving(HandoffHTTPServer(free_socket, EchoHTTPHandler)):
        assert http_request(port, "GET", path) == (200, path.encode())


async def serve_on_socket_and_echo(sock: socket.socket, payload: bytes) -> bytes:
    port = sock.getsockname()[1]
    server = await asyncio.start_server(echo_lines, sock=sock)  # listens on sock: no bind
    async with server:
        return await echo_round_trip(port, payload)


@pytest.mark.parametrize(
    "payload", [b"", b"handoff", b"no race", "ça marche".encode(), b"\x01\x02\x03", b"z" * 5_000]
)
def test_asyncio_server_on_free_socket(free_socket: socket.socket, payload: bytes) -> None:
    assert asyncio.run(serve_on_socket_and_echo(free_socket, payload)) == payload
