"""Real servers on sockets passed to them already listening: uvicorn (``--fd N``) and gunicorn
(systemd's ``LISTEN_FDS``, or ``--bind fd://N``), each started through ``pytest-ephemeral run
--listen`` and from a fixture with ``pass_fds``, each answering a request on the leased port.

Every server runs in a session of its own and is stopped with its whole process group at the end;
a test checks that nothing of it is left.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .conftest import MakeRange

pytest.importorskip("fcntl", reason="run --listen passes descriptors: POSIX only")

RUN = [sys.executable, "-m", "pytest_ephemeral", "run"]
HOST = "127.0.0.1"
TIMEOUT = 60.0  # seconds: generous for a loaded machine; every wait below is bounded by it

#: An ASGI and a WSGI application, each answering with its kind and the request path.
APPS = """
async def asgi(scope, receive, send):
    body = f"asgi {scope['path']}".encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def wsgi(environ, start_response):
    body = f"wsgi {environ['PATH_INFO']}".encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
"""


def server(module: str) -> list[str]:
    """How to start ``module`` (uvicorn, gunicorn) in this environment; skip if it is missing."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (it is in the dev extra: pip install -e '.[dev]')")
    return [sys.executable, "-m", module]


def uvicorn(apps: Path, fd: str) -> list[str]:
    return [*server("uvicorn"), "--app-dir", str(apps), "--fd", fd, "--lifespan", "off", "app:asgi"]


def gunicorn(apps: Path, *bind: str) -> list[str]:
    return [*server("gunicorn"), "--chdir", str(apps), "--workers", "1", *bind, "app:wsgi"]


@pytest.fixture
def apps(tmp_path: Path) -> Path:
    """A directory holding ``app.py`` (APPS)."""
    (tmp_path / "app.py").write_text(APPS)
    return tmp_path


def gunicorn_env(apps: Path) -> dict[str, str]:
    # gunicorn 25.1+ opens a control socket at $XDG_RUNTIME_DIR/gunicorn.ctl (else under $HOME),
    # one path for every gunicorn of the user: one of this test's own keeps them apart.
    return {**os.environ, "XDG_RUNTIME_DIR": str(apps)}


@contextmanager
def started(
    command: list[str], *, pass_fds: tuple[int, ...] = (), env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` running in a session of its own for the block; then its process group is sent
    SIGTERM (SIGKILL if it outstays TIMEOUT), and it is checked to be gone, group and all."""
    process = subprocess.Popen(
        command,
        pass_fds=pass_fds,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    group = process.pid  # start_new_session: the process leads its own group
    if process.poll() is None:
        os.killpg(group, signal.SIGTERM)
    try:
        process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(group, signal.SIGKILL)
        process.communicate()
    deadline = time.monotonic() + TIMEOUT
    while True:  # its own children (gunicorn's workers) are reaped by it, as it stops
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            os.killpg(group, signal.SIGKILL)
            pytest.fail(f"processes of group {group} were still running {TIMEOUT} s after it")
        time.sleep(0.05)


def get(port: int, path: str, process: subprocess.Popen[bytes]) -> str:
    """GET ``path`` on ``HOST:port``, retried until it is answered or TIMEOUT has passed: fail
    with the server's error output if it exits first."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        connection = http.client.HTTPConnection(HOST, port, timeout=5)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            assert response.status == 200
            return response.read().decode()
        except (OSError, http.client.HTTPException):
            if process.poll() is not None:
                assert process.stderr is not None
                error = process.stderr.read().decode(errors="replace")
                pytest.fail(f"the server exited with code {process.returncode}:\n{error}")
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        finally:
            connection.close()


def listen_run(private: list[int], lock_dir: Path) -> list[str]:
    """``pytest-ephemeral run --listen`` on a one-port range: the test knows the port."""
    spec = f"{private[0]}-{private[0]}"
    return [*RUN, "--listen", "--lock-dir", str(lock_dir), "--port-range", spec, "--"]


# --- Started by pytest-ephemeral run --listen -----------------------------------------------


def test_uvicorn_through_run_listen(private_range: MakeRange, apps: Path) -> None:
    private = private_range(1)
    command = [*listen_run(private.ports, private.lock_dir), *uvicorn(apps, "{fd}")]
    with started(command) as runner:
        assert get(private.ports[0], "/through-run", runner) == "asgi /through-run"


def test_gunicorn_takes_listen_fds_through_run_listen(private_range: MakeRange, apps: Path) -> None:
    private = private_range(1)
    command = [*listen_run(private.ports, private.lock_dir), *gunicorn(apps)]  # no --bind
    with started(command, env=gunicorn_env(apps)) as runner:
        assert get(private.ports[0], "/through-run", runner) == "wsgi /through-run"


# --- Started from a fixture: the socket of free_socket, passed with pass_fds ----------------


@pytest.fixture
def listening(free_socket: socket.socket) -> tuple[int, int]:
    """``free_socket`` listening: (its descriptor, its port). It stays open in this process
    until the test's teardown, so the child has it whenever it is started."""
    free_socket.listen()
    port: int = free_socket.getsockname()[1]
    return free_socket.fileno(), port


def test_uvicorn_from_a_fixture(listening: tuple[int, int], apps: Path) -> None:
    fd, port = listening
    with started(uvicorn(apps, str(fd)), pass_fds=(fd,)) as process:
        assert get(port, "/from-a-fixture", process) == "asgi /from-a-fixture"


def test_gunicorn_from_a_fixture(listening: tuple[int, int], apps: Path) -> None:
    fd, port = listening
    command = gunicorn(apps, "--bind", f"fd://{fd}")
    with started(command, pass_fds=(fd,), env=gunicorn_env(apps)) as process:
        assert get(port, "/from-a-fixture", process) == "wsgi /from-a-fixture"
