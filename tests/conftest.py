"""Shared fixtures: keep every inner pytest run of this suite out of every other one's way.

Inner runs (through ``pytester``) lease from 61000-64999 and share the machine's default lock dir,
so they coordinate with each other, with other suites on this machine, and across outer xdist
workers. A test that needs a narrow range of its own takes one with ``private_range``: a block of
65000-65535 leased by this process (so no other test gets it) and an empty lock dir of its own for
the inner run (so this process's locks do not look like other runs' to it).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_ephemeral._settings import default_lock_dir

from .harness import Leaser, PrivateRange

INNER_RANGE = "61000-64999"
PRIVATE_BAND = "65000-65535"

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True, scope="session")
def _inner_runs_share_a_band() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTEST_EPHEMERAL_PORT_RANGE", INNER_RANGE)
        patch.setenv("PYTEST_EPHEMERAL_LOCK_DIR", str(default_lock_dir()))
        for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
            patch.delenv(name, raising=False)
        patch.delenv("PYTEST_ADDOPTS", raising=False)
        yield


@pytest.fixture(autouse=True)
def _inner_runs_set_the_asyncio_loop_scope(request: pytest.FixtureRequest) -> None:
    """pytest-asyncio (a test dependency, for the adapters) warns at start-up while its loop scope
    is unset, which fails an inner run given -W error: every inner run gets a value."""
    if "pytester" in request.fixturenames:
        request.getfixturevalue("pytester")  # it clears PYTEST_ADDOPTS: set it afterwards
        monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setenv("PYTEST_ADDOPTS", "-o asyncio_default_fixture_loop_scope=function")


@pytest.fixture(scope="session")
def band_allocator() -> Iterator[Leaser]:
    """Leases of this suite's private band, which every ``private_range`` is leased from."""
    band = PrivateRange.of(PRIVATE_BAND, default_lock_dir())
    allocator = band.leaser(timeout=60, origin="tests/conftest.py")
    yield allocator
    allocator.release_all()


#: The type of the ``private_range`` fixture: ``private_range(n)`` gives n ports of one's own.
MakeRange = Callable[[int], PrivateRange]


@pytest.fixture
def private_range(band_allocator: Leaser, tmp_path: Path) -> Iterator[MakeRange]:
    taken: list[int] = []

    def make(n: int) -> PrivateRange:
        ports = band_allocator.lease_block(n)
        taken.extend(ports)
        lock_dir = tmp_path / f"locks-{ports[0]}"
        lock_dir.mkdir(mode=0o700)
        return PrivateRange(ports, lock_dir)

    yield make
    for port in taken:
        band_allocator.release(port)


HOLDER_SCRIPT = """
import sys
from pytest_ephemeral._allocator import allocator_for, request_for
from pytest_ephemeral._settings import Raw
from pytest_ephemeral._sources import load

settings = load({"port_range": Raw(sys.argv[1], "argv"), "lock_dir": Raw(sys.argv[2], "argv")})
ports = allocator_for(settings.lock_dir).lease(request_for(settings), len(settings.ports))
print(" ".join(map(str, ports)), flush=True)
sys.stdin.read()  # hold the leases until killed
"""


#: A process holding leases, and the private range it holds.
Holder = tuple["subprocess.Popen[str]", PrivateRange]


@pytest.fixture
def holder_process(private_range: MakeRange) -> Iterator[Holder]:
    """A separate process holding every port of a private range through real locks."""
    private = private_range(3)
    command = [sys.executable, "-c", HOLDER_SCRIPT, private.spec, str(private.lock_dir)]
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline().split() == [str(p) for p in private.ports]
            yield process, private
        finally:
            process.kill()
