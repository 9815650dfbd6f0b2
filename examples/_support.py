"""Helpers the examples share: a tiny HTTP handler, a line-echo handler, their clients, and a
way to stop a child server.

Every client here closes its connection before the server does. The side that closes first keeps
the connection in TIME_WAIT for a minute; when that is the client, it sits on the client's own
random port, and the server's leased port is free for the next test as soon as it is released.
"""

from __future__ import annotations

import asyncio
import http.client
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler

HOST = "127.0.0.1"
TIMEOUT = 10.0  # seconds: generous, so a slow CI machine fails loudly instead of hanging


class EchoHTTPHandler(BaseHTTPRequestHandler):
    """GET answers with the request path; POST answers with the request body reversed."""

    # Keep-alive (HTTP/1.1): the server waits for the client to close, so the client closes first.
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._reply(self.path.encode())

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._reply(body[::-1])

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet."""


@contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[None]:
    """Run ``server.serve_forever`` in a thread for the ``with`` block, then shut it down cleanly.

    The server is already listening (its constructor bound and activated it), so clients can
    connect at once: there is nothing to wait for.
    """
    # A short poll interval makes shutdown() return quickly (the default is 0.5 s).
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a child server: SIGTERM, then SIGKILL if it has not exited within TIMEOUT."""
    process.terminate()
    try:
        process.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def http_request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """Send one request to ``127.0.0.1:port``; return the status and body. Closes the connection."""
    connection = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


async def echo_lines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """asyncio connection handler: send every line back until the client closes the connection."""
    try:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    finally:
        writer.close()
        await writer.wait_closed()


async def echo_round_trip(port: int, payload: bytes) -> bytes:
    """Send ``payload`` as one line to the echo server on ``port``; return the line echoed back."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(payload + b"\n")
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), TIMEOUT)).rstrip(b"\n")
    finally:
        writer.close()
        await writer.wait_closed()
