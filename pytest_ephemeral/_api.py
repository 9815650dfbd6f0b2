"""Leases for code outside pytest fixtures: ``with lease_port() as port: ...``.

The defaults are the plugin's, environment variables included, so a script and a test suite on
one machine share the same lock directory and never hand out the same port; called during a
pytest session (from a ``conftest.py`` hook, say), they are that session's settings. Settings are
resolved once per distinct set of arguments and environment, not on every call.
"""

from __future__ import annotations

import os
import threading
from os import PathLike
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._errors import Advice
from ._probe import Protocol
from ._settings import NAMES, Raw, Settings, env_layer, env_var, resolve, session_layers

if TYPE_CHECKING:
    from ._allocator import PortAllocator

_ENV_NAMES = tuple(env_var(name) for name in NAMES)
# Reading six variables through os.environ costs 4-5 us a lease (each missing one raises and
# catches a KeyError); its own mapping answers in a tenth of that. CPython keeps it in _data,
# keyed by encodekey(name); anything else reads os.environ.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEYS = tuple(map(os.environ.encodekey, _ENV_NAMES)) if hasattr(os.environ, "encodekey") else ()


def _env_key() -> tuple[object, ...]:
    """What the ``PYTEST_EPHEMERAL_*`` variables hold now, to key the settings cache."""
    if isinstance(_ENV_DATA, dict) and _ENV_KEYS:
        return tuple(map(_ENV_DATA.get, _ENV_KEYS))
    return tuple(map(os.environ.get, _ENV_NAMES))


_ADVICE = Advice(
    lock_dir="Fix this and try again, or choose another lock dir with lock_dir= or"
    " PYTEST_EPHEMERAL_LOCK_DIR.",
    exhausted="Widen the range (port_range= or PYTEST_EPHEMERAL_PORT_RANGE), wait longer"
    " (timeout= or PYTEST_EPHEMERAL_TIMEOUT), release ports sooner, or see who holds them with"
    " `pytest-ephemeral status`.",
)
_resolved: dict[tuple[object, ...], tuple[Settings, PortAllocator]] = {}
_allocator_module: Any = (
    None  # the module, once _resolve has imported it (a call-time import costs)
)
_resolved_mutex = threading.Lock()
_MAX_RESOLVED = 32


def _resolve(arguments: tuple[tuple[str, object], ...]) -> tuple[Settings, PortAllocator]:
    """The settings for these arguments over the defaults, and the allocator of their lock dir:
    resolved once per distinct input."""
    session, generation = session_layers()
    key = (arguments, generation if session else _env_key())
    found = _resolved.get(key)  # a dict read is atomic; writes take the mutex
    if found is None:
        global _allocator_module
        from . import _allocator  # imports filelock: on the first lease

        _allocator_module, allocator_for = _allocator, _allocator.allocator_for

        given = {name: Raw(value, f"argument {name}=") for name, value in arguments}
        settings = resolve(given, *(session or (env_layer(os.environ),)))
        found = settings, allocator_for(settings.lock_dir, settings.lock_dir_given)
        with _resolved_mutex:
            if len(_resolved) >= _MAX_RESOLVED:
                _resolved.clear()
            _resolved[key] = found
    return found


class _Leased:
    """The context manager ``lease_block`` returns: leases on enter, releases on exit."""

    __slots__ = ("_allocator", "_arguments", "_n", "_ports", "_protocol")

    def __init__(self, n: int, protocol: Protocol, arguments: tuple[tuple[str, object], ...]):
        self._n = n
        self._protocol = protocol
        self._arguments = arguments
        self._ports: list[int] = []
        self._allocator: PortAllocator | None = None

    def __enter__(self) -> list[int]:
        with _ADVICE:
            settings, self._allocator = _resolve(self._arguments)
            request = _allocator_module.request_for(settings, self._protocol)
            self._ports = self._allocator.lease(request, self._n)
        return self._ports

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._allocator is not None
        failure: BaseException | None = None
        for port in self._ports:  # every one, whatever goes wrong with another
            try:
                self._allocator.release(port)
            except BaseException as problem:
                failure = failure or problem
        if failure is not None:
            raise failure


class _LeasedPort(_Leased):
    __slots__ = ()

    def __enter__(self) -> int:  # type: ignore[override]
        return super().__enter__()[0]


_ARGUMENT_NAMES = ("host", "port_range", "exclude", "lock_dir", "timeout")


def _arguments(*values: object) -> tuple[tuple[str, object], ...]:
    """The keywords given to ``lease_port``/``lease_block`` after ``protocol``, with their names
    (``values`` in the order of ``_ARGUMENT_NAMES``)."""
    return tuple(item for item in zip(_ARGUMENT_NAMES, values, strict=True) if item[1] is not None)


def lease_block(
    n: int,
    *,
    protocol: Protocol = "tcp",
    host: str | None = None,
    port_range: str | None = None,
    exclude: str | None = None,
    lock_dir: str | PathLike[str] | None = None,
    timeout: float | None = None,
) -> _Leased:
    """Lease ``n`` consecutive ports for the ``with`` block: ``with lease_block(3) as ports:``.

    ``port_range`` and ``exclude`` take the same strings as the plugin's options; every argument
    left out comes from its ``PYTEST_EPHEMERAL_*`` environment variable, then the default. Raises
    ``ConfigError`` for a bad value and ``PortsExhausted`` when no ports free up within ``timeout``.
    """
    return _Leased(n, protocol, _arguments(host, port_range, exclude, lock_dir, timeout))


def lease_port(
    *,
    protocol: Protocol = "tcp",
    host: str | None = None,
    port_range: str | None = None,
    exclude: str | None = None,
    lock_dir: str | PathLike[str] | None = None,
    timeout: float | None = None,
) -> _LeasedPort:
    """Lease one port, bind-checked for ``protocol`` ("tcp", "udp" or "both"), for the ``with``
    block: ``with lease_port() as port:``. Takes the same keywords as ``lease_block``."""
    return _LeasedPort(1, protocol, _arguments(host, port_range, exclude, lock_dir, timeout))


lease_block.__module__ = lease_port.__module__ = "pytest_ephemeral"
