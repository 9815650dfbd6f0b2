"""Leases for code outside pytest fixtures: ``with lease_port() as port: ...``.

The defaults are those a pytest run started here would use (the project's config file and its
``addopts``, ``PYTEST_ADDOPTS``, the environment variables), so a script and a test suite on one
machine share the same lock directory and never hand out the same port; called during a pytest
session (from a ``conftest.py`` hook, say), they are that session's settings. The keywords given
override either. Settings are resolved once per distinct set of arguments, environment and current
directory (or session), not on every call: finding the config file takes a walk up the tree.
"""

from __future__ import annotations

import contextlib
import os
import threading
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from ._current import SESSION
from ._errors import Advice
from ._probe import Protocol
from ._settings import LEASE_NAMES, ROWS, Layer, Raw

if TYPE_CHECKING:
    from ._allocator import PortAllocator, Request

_ENV_NAMES = (*(ROWS[name].env for name in LEASE_NAMES), "PYTEST_ADDOPTS")
# Reading the variables through os.environ costs microseconds a lease (each missing one raises and
# catches a KeyError); its own mapping answers in a tenth of that. CPython keeps it in _data,
# keyed by encodekey(name); anything else reads os.environ.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEYS = tuple(map(os.environ.encodekey, _ENV_NAMES)) if hasattr(os.environ, "encodekey") else ()


def _env_key() -> tuple[object, ...]:
    """What the variables that decide the settings hold now, to key the settings cache."""
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
_resolved: dict[tuple[object, ...], tuple[PortAllocator, Request]] = {}
_resolved_mutex = threading.Lock()
_MAX_RESOLVED = 32


def _lease_settings(layer: Layer) -> Layer:
    """Only the settings a lease takes: a bad ``adopt`` is the session's business, not ours."""
    return {name: raw for name, raw in layer.items() if name in LEASE_NAMES}


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # the current directory was removed
        return None


def _resolve(values: tuple[object, ...], protocol: Protocol) -> tuple[PortAllocator, Request]:
    """The allocator of the lock dir these keyword ``values`` (in the order of
    ``_ARGUMENT_NAMES``, None where left out; over the session's or the project's settings) name,
    and the request for ``protocol``: resolved once per distinct input and process (the request
    names this process as the holder).

    The key is one flat tuple of the values as given: pairing them with their names, or nesting
    tuples, costs more per call than the rest of the key (the "lease_port() + release" row of
    benchmarks/bench.py)."""
    session = SESSION.session
    cwd = None if session is not None else _cwd()
    if session is not None:
        key: tuple[object, ...] = (*values, protocol, os.getpid(), SESSION.generation)
    else:
        key = (*values, protocol, os.getpid(), cwd, *_env_key())
    try:
        found = _resolved.get(key)  # a dict read is atomic; writes take the mutex
    except TypeError:  # an unhashable argument: a list for a port range, say
        found = None
    if found is None:
        from ._allocator import allocator_for, request_for  # imports filelock: first lease
        from ._project import project_layers
        from ._sources import env_layer, load

        given = {
            name: Raw(value, f"argument {name}=")
            for name, value in zip(_ARGUMENT_NAMES, values, strict=True)
            if value is not None
        }
        if session is not None:
            layers = (given, *session.layers)
        elif cwd is None:  # no directory to find a project's config file from
            layers = (given, env_layer(os.environ))
        else:
            _, layers = project_layers(given, Path(cwd), None, os.environ)
        settings = load(*map(_lease_settings, layers))
        allocator = allocator_for(settings.lock_dir, settings.lock_dir_given)
        found = allocator, request_for(settings, protocol)
        with _resolved_mutex, contextlib.suppress(TypeError):
            if len(_resolved) >= _MAX_RESOLVED:
                _resolved.clear()
            _resolved[key] = found
    return found


class _Leased:
    """The context manager ``lease_block`` returns: leases on enter, releases on exit."""

    __slots__ = ("_allocator", "_n", "_ports", "_protocol", "_values")

    def __init__(self, n: int, protocol: Protocol, values: tuple[object, ...]) -> None:
        self._n = n
        self._protocol = protocol
        self._values = values  # the keywords after protocol, in the order of _ARGUMENT_NAMES
        self._ports: list[int] = []
        self._allocator: PortAllocator | None = None

    def __enter__(self) -> list[int]:
        # try/except rather than ``with _ADVICE``: the context manager's two calls were a
        # measurable share of the "lease_port() + release" row of benchmarks/bench.py.
        try:
            self._allocator, request = _resolve(self._values, self._protocol)
            self._ports = self._allocator.lease(request, self._n)
        except BaseException as error:
            _ADVICE.add_to(error)
            raise
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


#: ``lease_port``'s and ``lease_block``'s keywords after ``protocol``, in their order (a test
#: checks they are the table's ``LEASE_NAMES``).
_ARGUMENT_NAMES = ("host", "port_range", "exclude", "lock_dir", "timeout", "reuse_addr")


def lease_block(
    n: int,
    *,
    protocol: Protocol = "tcp",
    host: str | None = None,
    port_range: str | None = None,
    exclude: str | None = None,
    lock_dir: str | PathLike[str] | None = None,
    timeout: float | None = None,
    reuse_addr: bool | None = None,
) -> _Leased:
    """Lease ``n`` consecutive ports for the ``with`` block: ``with lease_block(3) as ports:``.

    ``port_range`` and ``exclude`` take the same strings as the plugin's options; every argument
    left out is what a pytest run here would use: during a session, the session's setting;
    outside one, the project's ``addopts`` and ``PYTEST_ADDOPTS``, the ``PYTEST_EPHEMERAL_*``
    environment variable, the project's config file, then the default. Raises
    ``ConfigError`` for a bad value and ``PortsExhausted`` when no ports free up within ``timeout``.
    """
    return _Leased(n, protocol, (host, port_range, exclude, lock_dir, timeout, reuse_addr))


def lease_port(
    *,
    protocol: Protocol = "tcp",
    host: str | None = None,
    port_range: str | None = None,
    exclude: str | None = None,
    lock_dir: str | PathLike[str] | None = None,
    timeout: float | None = None,
    reuse_addr: bool | None = None,
) -> _LeasedPort:
    """Lease one port, bind-checked for ``protocol`` ("tcp", "udp" or "both"), for the ``with``
    block: ``with lease_port() as port:``. Takes the same keywords as ``lease_block``."""
    return _LeasedPort(1, protocol, (host, port_range, exclude, lock_dir, timeout, reuse_addr))


lease_block.__module__ = lease_port.__module__ = "pytest_ephemeral"
