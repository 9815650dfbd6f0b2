"""The pytest plugin: options, fixtures (``free_port``, ``free_socket``, ``port_factory``), header.

A thin layer over the leasing core: settings are resolved once in ``pytest_configure`` and kept in
``config.stash``; the allocator (and ``filelock`` with it) is created on the first lease, so a
suite that leases no port does not pay for it.
"""

from __future__ import annotations

import os
import socket
import threading
import warnings
from collections.abc import Generator, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, final
from uuid import uuid4

import pytest

from . import _adopt
from ._errors import ConfigError
from ._holder import Holder, this_process
from ._settings import (
    NAMES,
    Layer,
    Raw,
    Settings,
    env_layer,
    env_var,
    pop_session_layers,
    push_session_layers,
    resolve,
)

if TYPE_CHECKING:
    from ._allocator import PortAllocator

_HELP = {
    "port_range": "Ports to lease from: LOW-HIGH, or auto (the part of 49152-65535 the OS never"
    " auto-assigns). Default: auto",
    "exclude": "Ports never to lease: a comma list of ports and LOW-HIGH ranges",
    "lock_dir": "Directory of the per-port lock files shared by all runs that must not clash."
    " Default: <temp dir>/pytest-ephemeral-of-<user>",
    "host": "Local address leased ports are bind-checked on. Default: 127.0.0.1",
    "timeout": "Seconds to wait for a port while other runs hold them all. Default: 10",
}
_METAVAR = {
    "port_range": "LOW-HIGH|auto",
    "exclude": "SPEC",
    "lock_dir": "PATH",
    "host": "ADDRESS",
    "timeout": "SECONDS",
}


def _option(name: str) -> str:
    return "--ephemeral-" + name.replace("_", "-")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ephemeral", "leased network ports (pytest-ephemeral)")
    for name in NAMES:
        help_text = f"{_HELP[name]}. Environment variable: {env_var(name)}"
        group.addoption(
            _option(name), dest=f"ephemeral_{name}", metavar=_METAVAR[name], help=help_text
        )
        if name == "timeout":  # a number in pytest 9's native TOML table: ephemeral_timeout = 3
            parser.addini(f"ephemeral_{name}", _HELP[name], type="float", default=None)
        else:
            parser.addini(f"ephemeral_{name}", _HELP[name], type="string", default=None)
    group.addoption(_adopt.OPTION, dest="ephemeral_adopt", metavar="NAMES", help=_adopt.HELP)
    parser.addini(_adopt.INI, _adopt.HELP, type="string", default=None)


class EphemeralPortWarning(pytest.PytestWarning):
    """A leased port was still in use when its lease ended: a server or socket left open."""

    __module__ = "pytest_ephemeral"


class _State:
    """What the plugin keeps per process: the settings, and the allocator once a port is leased."""

    def __init__(self, settings: Settings, holder: Holder) -> None:
        self.settings = settings
        self.holder = holder
        self.nodeid: str | None = None  # the test running now, for holder records
        self.leaks = 0
        self.outer_layers: tuple[Layer, ...] | None = None  # an enclosing session's, to restore
        self.totals: dict[str, float] = {}  # figures from xdist workers, for the summary
        self._allocator: PortAllocator | None = None
        self._creating = threading.Lock()

    @property
    def allocator(self) -> PortAllocator:
        if self._allocator is None:
            with self._creating:
                if self._allocator is None:
                    from ._allocator import PortAllocator  # imports filelock: on the first lease

                    self._allocator = PortAllocator(self.settings, self.holder)
        return self._allocator

    def leased_socket(self, protocol: str, host: str, nodeid: str | None) -> socket.socket:
        """A socket bound to a newly leased port. A program that ignores the locks could bind the
        port between the probe and this bind: then the lease goes back and the next port is tried.
        """
        from ._probe import bound_socket, family_of

        kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
        for attempt in range(1, 4):
            port = self.allocator.lease(protocol, nodeid)
            try:
                return bound_socket(family_of(host), kind, host, port)
            except BaseException as error:
                self.allocator.release(port)
                if not isinstance(error, OSError) or attempt == 3:
                    raise
        raise AssertionError("unreachable")

    def end_lease(self, port: int) -> EphemeralPortWarning | None:
        """Release ``port``; if the test left something using it, return the warning to emit.

        Checked while the lease is still held, so whatever uses the port is the test's own, and
        released whatever happens, so a warning made an error (-W error) cannot keep the lease.
        """
        from ._sockstate import still_in_use  # loaded with the first lease, like the allocator

        lease = self.allocator.lease_of(port)
        try:
            use = still_in_use(port, self.settings.host, self.allocator.targets, lease.kinds)
        finally:
            self.allocator.release(port)
        if use is None:
            return None
        self.leaks += 1
        return EphemeralPortWarning(
            f"port {port}, leased by {lease.nodeid or 'the session'}, is still {use} after its"
            " lease ended: stop the server and close its sockets before the test ends"
        )

    def figures(self) -> dict[str, float]:
        """This process's figures for the run summary (all zero if it leased nothing)."""
        stats = asdict(self._allocator.stats) if self._allocator else {}
        return {**stats, "leaks": self.leaks}

    def add_figures(self, figures: dict[str, float]) -> None:
        for key, value in figures.items():
            old = self.totals.get(key, 0)
            self.totals[key] = max(old, value) if key == "peak" else old + value

    def close(self) -> None:
        if self._allocator is not None:
            self._allocator.release_all()


_STATE = pytest.StashKey[_State]()


def _cli_layer(config: pytest.Config) -> Layer:
    layer = {}
    for name in NAMES:
        value = getattr(config.option, f"ephemeral_{name}", None)
        if value is not None:
            layer[name] = Raw(value, f"command-line option {_option(name)}")
    return layer


def _ini_layer(config: pytest.Config) -> Layer:
    layer = {}
    for name in NAMES:
        key = f"ephemeral_{name}"
        try:
            value = config.getini(key)
        except (TypeError, ValueError, pytest.UsageError) as error:  # pytest >= 9.2 wraps them
            problem = str(error).removeprefix(f"{config.inipath}: ")
            raise pytest.UsageError(f"bad value for {key} in {config.inipath}: {problem}") from None
        if value is None or value == "":
            continue
        if name == "lock_dir" and config.inipath is not None:
            value = str(config.inipath.parent / value)  # relative to the file, as paths there are
        layer[name] = Raw(value, f"{key} in config file {config.inipath}")
    return layer


def pytest_configure(config: pytest.Config) -> None:
    if config.option.help or config.option.version:
        return  # the help that explains a bad setting must show despite it
    layers = (_cli_layer(config), env_layer(os.environ), _ini_layer(config))
    try:
        settings = resolve(*layers)
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from None
    workerinput = getattr(config, "workerinput", None) or {}
    holder = this_process(workerinput.get("workerid"), workerinput.get("testrunuid") or uuid4().hex)
    state = _State(settings, holder)
    state.outer_layers = push_session_layers(layers)  # lease_port() in this session uses them
    config.stash[_STATE] = state
    _adopt.configure(config, state)  # adapters for other port helpers (setting adopt)


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the figures to the controller
        workeroutput["ephemeral"] = session.config.stash[_STATE].figures()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    figures = getattr(node, "workeroutput", {}).get("ephemeral")
    if figures:  # a crashed worker has no workeroutput: its figures are lost, not the summary
        node.config.stash[_STATE].add_figures(figures)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    state = config.stash[_STATE]
    state.add_figures(state.figures())
    totals = state.totals
    if config.get_verbosity() < 1 and not totals.get("waited") and not totals.get("leaks"):
        return
    terminalreporter.write_line(
        f"ephemeral ports: {totals.get('leased', 0):.0f} leased,"
        f" at most {totals.get('peak', 0):.0f} held at once by one process;"
        f" skipped {totals.get('skipped_bound', 0):.0f} bound by other programs or in TIME_WAIT and"
        f" {totals.get('skipped_locked', 0):.0f} locked by other runs;"
        f" waited {totals.get('waited', 0):.2f} s; {totals.get('leaks', 0):.0f} leak warnings"
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None:
        pop_session_layers(state.outer_layers)
        state.close()


def pytest_report_header(config: pytest.Config) -> str:
    settings = config.stash[_STATE].settings
    ports = settings.ports
    how = ports.origin + (f"; {ports.caveat}" if ports.caveat else "")
    return f"ephemeral ports: {ports} ({ports.size}; {how}), lock dir: {settings.lock_dir}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    state = item.config.stash[_STATE]
    state.nodeid = item.nodeid
    try:
        return (yield)
    finally:
        state.nodeid = None


@final
class PortFactory:
    """Leases ports until released or the session ends; the ``port_factory`` fixture returns one."""

    def __init__(self, state: _State) -> None:
        self._state = state
        self._mine: set[int] = set()
        self._sockets: dict[int, socket.socket] = {}

    def __call__(self, *, protocol: str = "tcp") -> int:
        """Lease one port, bind-checked for ``protocol``: "tcp", "udp" or "both"."""
        return self.block(1, protocol=protocol)[0]

    def block(self, n: int, *, protocol: str = "tcp") -> list[int]:
        """Lease ``n`` consecutive ports."""
        ports = self._state.allocator.lease_block(n, protocol, self._state.nodeid)
        self._mine.update(ports)
        return ports

    def socket(self, *, protocol: str = "tcp", host: str | None = None) -> socket.socket:
        """A socket already bound to a newly leased port on ``host`` (default: the configured host).

        ``protocol`` is "tcp" (not yet listening) or "udp". The socket is closed, and the lease
        ended, by ``release(port)`` or at the end of the session.
        """
        if protocol not in ("tcp", "udp"):
            raise ValueError(f"protocol must be 'tcp' or 'udp', not {protocol!r}")
        host = host or self._state.settings.host
        sock = self._state.leased_socket(protocol, host, self._state.nodeid)
        port = sock.getsockname()[1]
        self._mine.add(port)
        self._sockets[port] = sock
        return sock

    def release(self, port: int) -> None:
        """End the lease of one port early; ``ValueError`` if this factory does not hold it."""
        if port not in self._mine:
            raise ValueError(f"port {port} is not leased by this port_factory")
        self._mine.remove(port)
        sock = self._sockets.pop(port, None)
        if sock is not None:
            sock.close()
        warning = self._state.end_lease(port)
        if warning is not None:
            warnings.warn(warning, stacklevel=2)

    def _release_all(self) -> None:
        for port in sorted(self._mine):
            self.release(port)


@pytest.fixture(scope="session")
def port_factory(request: pytest.FixtureRequest) -> Iterator[PortFactory]:
    """Session-scoped factory of leased ports, safe across xdist workers and concurrent runs.

    ``port_factory(protocol="tcp")`` leases one port ("tcp", "udp" or "both"),
    ``port_factory.block(n)`` leases n consecutive ports, ``port_factory.release(port)`` ends a
    lease early. Every other lease ends when the session ends.
    """
    factory = PortFactory(request.config.stash[_STATE])
    yield factory
    factory._release_all()


@pytest.fixture
def free_port(request: pytest.FixtureRequest) -> Iterator[int]:
    """A TCP port leased for this test alone: free now, and held from other tests and pytest runs
    until this test's teardown, after the fixtures that use it."""
    state = request.config.stash[_STATE]
    port = state.allocator.lease("tcp", request.node.nodeid)
    yield port
    _warn(request, state.end_lease(port))


@pytest.fixture
def free_socket(request: pytest.FixtureRequest) -> Iterator[socket.socket]:
    """A TCP socket already bound to a port leased for this test, on the configured host, not yet
    listening: hand it to a server (asyncio ``start_server(sock=...)``, ``socketserver``, uvicorn
    ``fd=``) and no other program can take the port in between. Closed, and the lease ended, at
    teardown; closing it earlier does not end the lease."""
    state = request.config.stash[_STATE]
    with state.leased_socket("tcp", state.settings.host, request.node.nodeid) as sock:
        port = sock.getsockname()[1]
        yield sock
    _warn(request, state.end_lease(port))


def _warn(request: pytest.FixtureRequest, warning: EphemeralPortWarning | None) -> None:
    if warning is not None:
        request.node.warn(warning)  # located at the test, shown under its node id
