"""The harness the tests and the benchmark share: a private range and a leaser.

A ``PrivateRange`` is ports no one else leases and a lock dir no one else uses; its ``leaser()``
takes leases of it through this process's allocator for that lock dir, with the settings going
with every lease, as the plugin and ``lease_port()`` take them. It imports nothing from pytest:
``benchmarks/bench.py`` (run as a script, with the repository root put on ``sys.path``) uses it
as the suite does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pytest_ephemeral._allocator import PortAllocator, Stats, allocator_for, request_for
from pytest_ephemeral._probe import Protocol
from pytest_ephemeral._settings import Raw, Settings
from pytest_ephemeral._sources import load


def settings_of(origin: str, **given: object) -> Settings:
    """Resolved settings from the values ``given`` (None: not given), all from ``origin``."""
    return load({name: Raw(value, origin) for name, value in given.items() if value is not None})


class Leaser:
    """One caller's view of the core in this process: leases of one ``Settings``, its own figures.

    The process has one allocator per lock dir; a test that wants "an allocator for this range"
    gets this, which passes its settings with every lease, as the plugin and ``lease_port`` do.
    """

    def __init__(self, settings: Settings, allocator: PortAllocator | None = None) -> None:
        self.settings = settings
        self.allocator = allocator or allocator_for(settings.lock_dir, settings.lock_dir_given)
        self.stats = Stats()
        self._mine: set[int] = set()

    @property
    def held(self) -> frozenset[int]:
        return frozenset(self._mine)

    def lease(self, protocol: Protocol = "tcp") -> int:
        return self.lease_block(1, protocol)[0]

    def lease_block(self, n: int, protocol: Protocol = "tcp") -> list[int]:
        ports = self.allocator.lease(request_for(self.settings, protocol), n, self.stats)
        self._mine.update(ports)
        return ports

    def release(self, port: int) -> None:
        self._mine.remove(port)
        self.allocator.release(port)

    def release_all(self) -> None:
        for port in sorted(self._mine):
            self.release(port)


@dataclass(frozen=True)
class PrivateRange:
    """Ports no one else leases, and a lock dir no other run uses."""

    ports: list[int]
    lock_dir: Path

    @classmethod
    def of(cls, spec: str, lock_dir: str | Path) -> PrivateRange:
        """The range ``spec`` ("LOW-HIGH"), which the caller knows no one else leases."""
        low, high = (int(n) for n in spec.split("-"))
        return cls(list(range(low, high + 1)), Path(lock_dir))

    @property
    def spec(self) -> str:
        return f"{self.ports[0]}-{self.ports[-1]}"

    @property
    def args(self) -> list[str]:
        """Command-line options that point an inner run at this range and lock dir."""
        return [f"--ephemeral-port-range={self.spec}", f"--ephemeral-lock-dir={self.lock_dir}"]

    def leaser(self, timeout: float = 0, origin: str = "test", **more: object) -> Leaser:
        """Leases of this range (waiting at most ``timeout`` seconds), with ``more`` settings."""
        given = {"port_range": self.spec, "lock_dir": str(self.lock_dir), "timeout": timeout}
        return Leaser(settings_of(origin, **given, **more))
