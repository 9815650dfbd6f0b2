"""A threaded ``http.server`` on ``free_port``, one per test, queried with ``http.client``.

The pattern: a function-scoped fixture asks for ``free_port``, starts the server on it, yields
the port, and shuts the server down. ``free_port`` is torn down after the fixtures that use it,
so the lease ends only once the server is gone.
"""

from __future__ import annotations

from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import pytest

from ._support import HOST, EchoHTTPHandler, http_request, serving


class QuietHTTPServer(ThreadingHTTPServer):
    # server_close() joins the handler threads: each has closed its connection when it returns
    daemon_threads = False


@pytest.fixture
def http_port(free_port: int) -> Iterator[int]:
    """Port of an HTTP server, private to this test, running for the test's duration."""
    server = QuietHTTPServer((HOST, free_port), EchoHTTPHandler)
    with serving(server):
        yield free_port


@pytest.mark.parametrize(
    "path",
    ["/", "/index.html", "/a/b/c", "/search?q=port", "/%7Euser", "/x" * 100, "/trailing/"],
)
def test_get_returns_path(http_port: int, path: str) -> None:
    assert http_request(http_port, "GET", path) == (200, path.encode())


@pytest.mark.parametrize(
    "body",
    [b"", b"x", b"hello", b"caf\xc3\xa9", bytes(range(256)), b"ab" * 5_000, b"\x00" * 65_536],
    ids=["empty", "one-byte", "ascii", "utf8", "all-bytes", "10kB", "64KiB-zeros"],
)
def test_post_returns_reversed_body(http_port: int, body: bytes) -> None:
    assert http_request(http_port, "POST", "/reverse", body) == (200, body[::-1])
