"""Port factories: what ``port_factory``, ``free_ports``, ``free_port`` and ``free_socket`` hand
to tests, and the fixtures' bodies, over the session's leases (``_leases``).

Loaded when a test first asks for one of those fixtures (or an adapter fixture that leases through
them): a run that leases nothing never imports it.
"""

from __future__ import annotations

import socket
import threading
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal, TypeVar, final

import pytest

from ._errors import ConfigError, PortNotLeased
from ._leases import TEST_FACTORY, Scope, SessionLeases, leases_of

if TYPE_CHECKING:
    from ._probe import Protocol
    from ._warnings import EphemeralPortWarning

SocketProtocol = Literal["tcp", "udp"]
_T = TypeVar("_T")


@final
class PortFactory:
    """Leases ports, consecutive blocks and bound sockets, over TCP, UDP or both.

    ``port_factory`` returns the session's: its leases last until ``release(port)`` or the end of
    the session. ``free_ports`` returns one per test: its leases end at the test's teardown. Either
    way a lease that ends while its port is still in use emits ``EphemeralPortWarning``.
    """

    __module__ = "pytest_ephemeral"

    def __init__(self, leases: SessionLeases, owner: pytest.Item | None = None) -> None:
        self._leases = leases
        self._owner = owner  # the test whose teardown ends these leases; None: the session
        self._mine: dict[int, Scope] = {}
        self._sockets: dict[int, socket.socket] = {}
        self._own_teardown: set[int] = set()  # leases a fixture of their own ends (free_port)
        self._set_up = False  # a test's factory: whether ``free_ports`` is set up now
        self._mutex = threading.Lock()

    def __call__(self, *, protocol: Protocol = "tcp") -> int:
        """Lease one port, bind-checked for ``protocol``: "tcp", "udp" or "both"."""
        return self.block(1, protocol=protocol)[0]

    def block(self, n: int, *, protocol: Protocol = "tcp") -> list[int]:
        """Lease ``n`` consecutive ports, bind-checked for ``protocol``."""
        scope = self._scope()
        ports = self._leases.take(n, protocol, scope.item)
        with self._mutex:
            self._mine.update(dict.fromkeys(ports, scope))
        return ports

    def socket(self, *, protocol: SocketProtocol = "tcp", host: str | None = None) -> socket.socket:
        """A socket already bound to a newly leased port on ``host`` (default: the configured host).

        ``protocol`` is "tcp" (not yet listening) or "udp". The socket is closed, and the lease
        ended, by ``release(port)`` or when the factory's leases end.
        """
        if protocol not in ("tcp", "udp"):
            raise ConfigError(f"a socket's protocol must be 'tcp' or 'udp', not {protocol!r}")
        scope = self._scope()
        sock = _bound_socket(self._leases, protocol, host or self._leases.settings.host, scope)
        port = sock.getsockname()[1]
        with self._mutex:
            self._mine[port] = scope
            self._sockets[port] = sock
        return sock

    def release(self, port: int) -> None:
        """End the lease of one port early; ``PortNotLeased`` (a ``ValueError``) if this factory
        does not hold it, or released it already."""
        warning = self._end(port)
        if warning is not None:
            warnings.warn(warning, stacklevel=2)

    def _scope(self) -> Scope:
        return Scope(self._owner) if self._owner is not None else self._leases.current_scope()

    def _end(self, port: int) -> EphemeralPortWarning | None:
        with self._mutex:
            scope = self._mine.pop(port, None)
            sock = self._sockets.pop(port, None)
            self._own_teardown.discard(port)
        if scope is None:
            if self._leases.was_released(port):
                raise PortNotLeased(f"port {port} was already released")
            raise PortNotLeased(f"port {port} is not leased by this factory")
        if sock is not None:
            sock.close()
        return self._leases.end_lease(port, scope)

    def _end_all(self) -> list[tuple[Scope, EphemeralPortWarning]]:
        """End every lease still held, but those a fixture of their own ends; the leaks found,
        with who leased each.

        Every lease is ended, whatever goes wrong with one of them (no descriptor left for the
        leak check, say); the first such error is raised once they all are.
        """
        leaks = []
        failure: BaseException | None = None
        with self._mutex:
            mine = {port: s for port, s in self._mine.items() if port not in self._own_teardown}
        for port, scope in sorted(mine.items()):
            try:
                warning = self._end(port)
            except PortNotLeased:
                continue  # released meanwhile by another thread
            except BaseException as error:
                failure = failure or error
                continue
            if warning is not None:
                leaks.append((scope, warning))
        if failure is not None:
            raise failure
        return leaks


def _bound_socket(
    leases: SessionLeases, protocol: SocketProtocol, host: str, scope: Scope
) -> socket.socket:
    """A socket bound to a newly leased port. A program that ignores the locks could bind the
    port between the probe and this bind: then the lease goes back and the next port is tried.
    """
    from ._probe import bound_socket, family_of

    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    for attempt in range(1, 4):
        port = leases.take(1, protocol, scope.item)[0]
        try:
            return bound_socket(family_of(host), kind, host, port)
        except BaseException as error:
            leases.allocator.release(port)
            if not isinstance(error, OSError) or attempt == 3:
                raise
    raise AssertionError("unreachable")


# --- the fixtures' leases ---------------------------------------------------------------------


def session_factory(request: pytest.FixtureRequest) -> Iterator[PortFactory]:
    """The body of ``port_factory``: the session's factory, whose leases end with the session;
    a port still in use then is reported under the test or fixture that leased it. (Ended at
    ``pytest_unconfigure`` too, for a session cut short before this fixture's teardown.)"""
    leases = leases_of(request.config)
    factory = PortFactory(leases)
    leases.at_finish.append(factory._end_all)
    yield factory
    leases.report_late(factory._end_all())


def test_factory(request: pytest.FixtureRequest) -> PortFactory:
    """The factory of the running test's leases, kept on the test until it ends: ``free_ports``
    is it, and ``free_port`` and ``free_socket`` lease through it, so ``free_ports.release()``
    ends theirs too.

    Not a fixture of its own: ``free_port`` asks pytest for no other fixture (not even
    ``request``: see ``_leases.fixture_request``), which would cost every test that uses it a
    fixture set-up and teardown more than its own recipe did.
    """
    item: pytest.Item = request.node
    factory = item.stash.get(TEST_FACTORY, None)
    if factory is None:
        factory = item.stash[TEST_FACTORY] = PortFactory(leases_of(request.config), item)
    return factory


def test_ports(request: pytest.FixtureRequest) -> Iterator[PortFactory]:
    """The body of ``free_ports``: the test's factory, whose leases end at its teardown."""
    factory = test_factory(request)
    factory._set_up = True
    yield factory
    try:
        leaks = factory._end_all()
    finally:
        factory._set_up = False
    for _, warning in leaks:
        request.node.warn(warning)


def one_port(request: pytest.FixtureRequest, protocol: Protocol = "tcp") -> Iterator[int]:
    """The body of a fixture giving a test one port, leased through the test's factory."""
    factory = test_factory(request)
    port = factory(protocol=protocol)
    yield from _until_teardown(request, factory, port, port)


def one_socket(request: pytest.FixtureRequest) -> Iterator[socket.socket]:
    """The body of ``free_socket``: a TCP socket bound to a port leased for the test."""
    factory = test_factory(request)
    sock = factory.socket()
    yield from _until_teardown(request, factory, sock.getsockname()[1], sock)


def _until_teardown(
    request: pytest.FixtureRequest, factory: PortFactory, port: int, value: _T
) -> Iterator[_T]:
    """Yield a one-port fixture's ``value``, then end the lease of ``port`` at the fixture's
    teardown, after the fixtures that use it. Unless ``free_ports`` is still set up: a fixture
    using that may hold the port too (a server factory the test handed ``free_port``), so its
    teardown, which comes later, ends the lease.
    """
    with factory._mutex:
        factory._own_teardown.add(port)
    yield value
    with factory._mutex:
        factory._own_teardown.discard(port)
        if factory._set_up:
            return
    try:
        warning = factory._end(port)
    except PortNotLeased:  # released already, through free_ports.release()
        return
    if warning is not None:
        request.node.warn(warning)  # located at the test, shown under its node id
