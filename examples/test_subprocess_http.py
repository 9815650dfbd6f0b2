"""A server in another process: ``python -m http.server PORT --bind 127.0.0.1`` on ``free_port``.

The lease keeps other tests and pytest runs off the port from the moment it is handed out until
the test ends, so the child process can bind it later without a race. The fixture then polls
until the child accepts connections (bounded: it fails, never hangs) and stops it at teardown.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from ._support import HOST, TIMEOUT, http_request, stop

# Python 3.11+ can serve HTTP/1.1 keep-alive, so the client, not the server, closes first.
KEEP_ALIVE = ["--protocol", "HTTP/1.1"] if sys.version_info >= (3, 11) else []


def wait_until_accepting(port: int, process: subprocess.Popen[bytes]) -> None:
    """Poll ``127.0.0.1:port`` until it accepts a connection; fail if the process exits first."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"server exited with code {process.returncode} before accepting")
            if time.monotonic() > deadline:
                pytest.fail(f"nothing accepted connections on port {port} within {TIMEOUT} s")
            time.sleep(0.02)


@pytest.fixture
def served_dir(free_port: int, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A child ``http.server`` serving ``tmp_path`` on ``free_port``: yields (port, directory)."""
    command = [sys.executable, "-m", "http.server", str(free_port), "--bind", HOST]
    command += ["--directory", str(tmp_path), *KEEP_ALIVE]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_accepting(free_port, process)
        yield free_port, tmp_path
    finally:
        stop(process)


FILES = {
    "hello.txt": b"hello",
    "empty.txt": b"",
    "data.json": b'{"port": "leased"}',
    "page.html": b"<h1>it works</h1>",
    "binary.bin": bytes(range(256)) * 4,
    "large.txt": b"0123456789" * 20_000,
    "with space.txt": b"spaces are quoted in the URL",
    "unicode-é.txt": "ünïcödé".encode(),
    "sub/dir/nested.txt": b"nested",
}


@pytest.mark.parametrize(("name", "content"), FILES.items(), ids=list(FILES))
def test_get_file(served_dir: tuple[int, Path], name: str, content: bytes) -> None:
    port, directory = served_dir
    (directory / name).parent.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(content)
    assert http_request(port, "GET", "/" + quote(name)) == (200, content)


@pytest.mark.parametrize("names", [["a.txt"], ["a.txt", "b.txt"], ["one", "two", "three"]])
def test_directory_listing(served_dir: tuple[int, Path], names: list[str]) -> None:
    port, directory = served_dir
    for name in names:
        (directory / name).write_text(name)
    status, body = http_request(port, "GET", "/")
    assert status == 200
    assert all(f'href="{name}"'.encode() in body for name in names)
