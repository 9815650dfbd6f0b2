"""Helpers shared by the test modules: inner test code that records holds, and their checks."""

from __future__ import annotations

import contextlib
import itertools
import socket
import subprocess
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest


def run_inline(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """``pytester.runpytest(*args)`` in this process, under the warning filters a fresh
    interpreter starts with, as an inner run in a subprocess has them: not under this suite's
    ``error`` filter, which the inner session would otherwise inherit (a leak warning the inner
    run should count would fail its test instead).

    Inner code run this way shares this process: it must close every socket it opens by the end
    of its session (after the leak check it is there to trigger), or later tests find the port
    bound and the garbage collector warns in one of them.
    """
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for category in (ResourceWarning, ImportWarning, PendingDeprecationWarning):
            warnings.simplefilter("ignore", category)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        return pytester.runpytest(*args)


#: Inner code (a test module or a script) starts with this: ``hold(port)`` binds a real listener
#: (no SO_REUSEADDR) on the port, keeps it a few milliseconds, and appends "port start end" to
#: $HOLDS_FILE.
HOLD = """
from __future__ import annotations

import os
import socket
import time


def hold(port: int) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        start = time.monotonic()
        time.sleep(0.003)  # the workload: keep the port bound for a moment
        end = time.monotonic()
    with open(os.environ["HOLDS_FILE"], "a") as out:
        out.write(f"{port} {start} {end}\\n")
"""

#: An inner test module body: COUNT tests that each hold their ``free_port``.
HOLD_TESTS = (
    HOLD
    + """
import pytest


@pytest.mark.parametrize("i", range(COUNT))
def test_hold(free_port: int, i: int) -> None:
    hold(free_port)
"""
)


def hold_tests(count: int) -> str:
    return HOLD_TESTS.replace("COUNT", str(count))


def read_holds(path: Path) -> list[tuple[int, float, float]]:
    holds = []
    for line in path.read_text().splitlines():
        port, start, end = line.split()
        holds.append((int(port), float(start), float(end)))
    return holds


def assert_no_shared_overlap(holds: list[tuple[int, float, float]]) -> None:
    """No two holds of one port overlap in time."""
    by_port: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for port, start, end in holds:
        by_port[port].append((start, end))
    for port, spans in by_port.items():
        spans.sort()
        for (_, first_end), (second_start, _) in itertools.pairwise(spans):
            assert second_start >= first_end, f"port {port} was held twice at the same time"


def bind_fails(port: int, kind: socket.SocketKind = socket.SOCK_STREAM) -> bool:
    """Whether a plain bind of 127.0.0.1:port (no SO_REUSEADDR) fails right now."""
    try:
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.bind(("127.0.0.1", port))
    except OSError:
        return True
    return False


#: A process that locks lock files and writes what it is told into them, as any program following
#: the lock protocol may: ``argv`` is ``PATH CONTENT_FILE SIZE`` triples (SIZE extends the file,
#: sparse, after CONTENT_FILE's bytes). It prints "locked" and holds the locks until stdin closes.
WRITE_AND_HOLD = """
import os
import sys

from filelock import lock_descriptor

for path, content, size in zip(*[iter(sys.argv[1:])] * 3):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    assert lock_descriptor(fd, blocking=False)
    with open(content, "rb") as source:
        os.write(fd, source.read())
    if int(size):
        os.ftruncate(fd, int(size))
print("locked", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def written_and_held(lock_dir: Path, contents: dict[int, bytes], size: int = 0) -> Iterator[None]:
    """Another process holds the lock file of each port of ``contents`` with those bytes in it
    (each file extended to ``size`` bytes if that is more), until the block ends."""
    args = []
    for port, data in contents.items():
        source = lock_dir.parent / f"content-{lock_dir.name}-{port}"
        source.write_bytes(data)
        args += [str(lock_dir / f"{port}.lock"), str(source), str(size)]
    command = [sys.executable, "-c", WRITE_AND_HOLD, *args]
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as process:
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            assert process.stdout.readline() == "locked\n"
            yield
        finally:
            process.stdin.close()
            process.wait(timeout=60)
