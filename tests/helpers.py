"""Helpers shared by the test modules: inner test code that records holds, and their checks."""

from __future__ import annotations

import itertools
import socket
from collections import defaultdict
from pathlib import Path

from pytest_ephemeral._allocator import Stats, allocator_for
from pytest_ephemeral._probe import Protocol
from pytest_ephemeral._settings import Settings

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


class Leaser:
    """One caller's view of the core in this process: leases of one ``Settings``, its own figures.

    The process has one allocator per lock dir; a test that wants "an allocator for this range"
    gets this, which passes its settings with every lease, as the plugin and ``lease_port`` do.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.allocator = allocator_for(settings.lock_dir, settings.lock_dir_given)
        self.stats = Stats()
        self._mine: set[int] = set()

    @property
    def held(self) -> frozenset[int]:
        return frozenset(self._mine)

    def lease(self, protocol: Protocol = "tcp") -> int:
        return self.lease_block(1, protocol)[0]

    def lease_block(self, n: int, protocol: Protocol = "tcp") -> list[int]:
        ports = self.allocator.lease_block(n, self.settings, protocol, stats=self.stats)
        self._mine.update(ports)
        return ports

    def release(self, port: int) -> None:
        self._mine.remove(port)
        self.allocator.release(port)

    def release_all(self) -> None:
        for port in sorted(self._mine):
            self.release(port)
