"""Leases for code outside pytest fixtures: ``with lease_port() as port: ...``.

The defaults are the plugin's, environment variables included, so a script and a test suite on
one machine share the same lock directory and never hand out the same port; called during a
pytest session (from a ``conftest.py`` hook, say), they are that session's settings.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike

from ._allocator import PortAllocator
from ._settings import Layer, Raw, default_layers, resolve

_allocators: dict[tuple[object, ...], PortAllocator] = {}
_allocators_mutex = threading.Lock()


def _allocator(**arguments: object) -> PortAllocator:
    """The allocator for these arguments and defaults, resolved and checked once per process."""
    defaults = default_layers()
    key = (*arguments.items(), repr(defaults))
    with _allocators_mutex:
        if key not in _allocators:
            given: Layer = {
                name: Raw(value, f"argument {name}=")
                for name, value in arguments.items()
                if value is not None
            }
            _allocators[key] = PortAllocator(resolve(given, *defaults))
        return _allocators[key]


@contextmanager
def lease_block(
    n: int,
    *,
    protocol: str = "tcp",
    host: str | None = None,
    port_range: str | None = None,
    exclude: str | None = None,
    lock_dir: str | PathLike[str] | None = None,
    timeout: float | None = None,
) -> Iterator[list[int]]:
    """Lease ``n`` consecutive ports for the ``with`` block.

    ``port_range`` and ``exclude`` take the same strings as the plugin's options; every argument
    left out comes from its ``PYTEST_EPHEMERAL_*`` environment variable, then the default. Raises
    ``ConfigError`` for a bad value and ``PortsExhausted`` when no ports free up within ``timeout``.
    """
    allocator = _allocator(
        host=host, port_range=port_range, exclude=exclude, lock_dir=lock_dir, timeout=timeout
    )
    ports = allocator.lease_block(n, protocol)
    try:
        yield ports
    finally:
        for port in ports:
            allocator.release(port)


@contextmanager
def lease_port(
    *,
    protocol: str = "tcp",
    host: str | None = None,
    port_range: str | None = None,
    exclude: str | None = None,
    lock_dir: str | PathLike[str] | None = None,
    timeout: float | None = None,
) -> Iterator[int]:
    """Lease one port, bind-checked for ``protocol`` ("tcp", "udp" or "both"), for the block.

    Takes the same keywords as ``lease_block``.
    """
    with lease_block(
        1,
        protocol=protocol,
        host=host,
        port_range=port_range,
        exclude=exclude,
        lock_dir=lock_dir,
        timeout=timeout,
    ) as ports:
        yield ports[0]
