"""A small HTTP server that serves on a listening socket it inherits, as a child process.

``python inherited_socket_server.py FD`` serves on descriptor ``FD``, which must be a TCP socket
that is already bound and listening; it never binds anything itself. GET answers with the request
path. uvicorn's ``--fd FD`` and gunicorn's ``--bind fd://FD`` take a socket the same way.
"""

from __future__ import annotations

import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class PathHandler(BaseHTTPRequestHandler):
    """GET answers with the request path."""

    protocol_version = "HTTP/1.1"  # keep-alive: the client closes first

    def do_GET(self) -> None:
        body = self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet."""


def main(fd: int) -> None:
    server = ThreadingHTTPServer(("", 0), PathHandler, bind_and_activate=False)
    server.socket.close()  # the one the server made for itself, never bound
    server.socket = socket.socket(fileno=fd)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]))
