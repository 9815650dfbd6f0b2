"""``free_ports``: a UDP echo server and a block of TCP servers, all on ports leased for one test.

Every lease ends at the test's teardown, after the fixtures that use it; a socket left open would
be reported as a leak of this test.
"""

from __future__ import annotations

import socket
import socketserver
from contextlib import ExitStack

from pytest_ephemeral import PortFactory

from ._support import HOST, TIMEOUT, EchoHTTPHandler, http_request, serving
from .test_threaded_http import QuietHTTPServer


class UDPEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data[::-1], self.client_address)


def test_udp_echo_on_a_leased_port(free_ports: PortFactory) -> None:
    port = free_ports(protocol="udp")
    server = socketserver.UDPServer((HOST, port), UDPEcho)
    with serving(server), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(TIMEOUT)
        client.sendto(b"ping", (HOST, port))
        assert client.recv(16) == b"gnip"


def test_a_block_of_servers(free_ports: PortFactory) -> None:
    ports = free_ports.block(3)
    assert ports == [ports[0], ports[0] + 1, ports[0] + 2]
    with ExitStack() as stack:
        for port in ports:
            stack.enter_context(serving(QuietHTTPServer((HOST, port), EchoHTTPHandler)))
        for port in ports:
            assert http_request(port, "GET", f"/node/{port}") == (200, f"/node/{port}".encode())
