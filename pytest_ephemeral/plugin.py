"""The pytest plugin: options, fixtures, hooks; a thin layer over the leasing core.

Shaped like pytest's ``tmp_path``: ``pytest_configure`` only reads the settings (no I/O) into the
session's ``PortFactory``, which ``port_factory`` returns; ``free_ports``, ``free_port`` and
``free_socket`` ask it for leases that end with their test. The lock dir is prepared, and
``filelock`` imported, on the first lease, so a suite that leases no port pays for neither, and a
broken lock dir fails the tests that lease, not the run.
"""

from __future__ import annotations

import os
import socket
import threading
import warnings
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Literal, TypeVar, final
from uuid import uuid4

import pytest

from . import _adopt
from ._errors import Advice, ConfigError
from ._holder import Holder, this_process
from ._probe import Protocol, Targets, bind_targets
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
    from ._allocator import PortAllocator, Stats

SocketProtocol = Literal["tcp", "udp"]
_T = TypeVar("_T")
_LeakCheck = Callable[[int, str, Targets, "tuple[socket.SocketKind, ...]"], "str | None"]

_HELP = {
    "port_range": "Ports to lease from: LOW-HIGH, or auto (the part of 49152-65535 the OS never"
    " auto-assigns). Default: auto",
    "exclude": "Ports never to lease: a comma list of ports and LOW-HIGH ranges",
    "lock_dir": "Directory of the per-port lock files shared by all runs that must not clash."
    " Default: /dev/shm/pytest-ephemeral-<uid> (or /tmp/...)",
    "host": "Local address leased ports are bind-checked on, and free_socket binds to."
    " Default: 127.0.0.1",
    "timeout": "Seconds to wait for a port while other runs hold them all. Default: 10",
    "reuse_addr": "yes if the servers under test set SO_REUSEADDR: a port left only in TIME_WAIT"
    " by such a server may then be leased (Linux). Default: no",
}
_METAVAR = {
    "port_range": "LOW-HIGH|auto",
    "exclude": "SPEC",
    "lock_dir": "PATH",
    "host": "ADDRESS",
    "timeout": "SECONDS",
    "reuse_addr": "yes|no",
}
_ADVICE = Advice(
    lock_dir="Fix this and try again, or choose another lock dir with --ephemeral-lock-dir.",
    exhausted="Widen the range (--ephemeral-port-range), lower -n, release ports sooner, or look"
    " for leaked leases with `pytest-ephemeral status`.",
)


def _option(name: str) -> str:
    return "--ephemeral-" + name.replace("_", "-")


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    group = parser.getgroup("ephemeral", "leased network ports (pytest-ephemeral)")
    for name in NAMES:
        help_text = f"{_HELP[name]}. Environment variable: {env_var(name)}"
        group.addoption(
            _option(name), dest=f"ephemeral_{name}", metavar=_METAVAR[name], help=help_text
        )
        # Registered so that --strict-config knows them; their values are read by _ini_layer.
        parser.addini(f"ephemeral_{name}", _HELP[name], type="string", default=None)
    group.addoption(_adopt.OPTION, dest="ephemeral_adopt", metavar="NAMES", help=_adopt.HELP)
    parser.addini(_adopt.INI, _adopt.HELP, type="string", default=None)
    pluginmanager.register(_adopt.RunParallelSetting(), "ephemeral-run-parallel")


class EphemeralPortWarning(pytest.PytestWarning):
    """A leased port was still in use when its lease ended: a server or socket left open."""

    __module__ = "pytest_ephemeral"


class _Origin:
    """Who asked for a lease: the test running then, and the fixture being set up, if any."""

    __slots__ = ("fixture", "item")

    def __init__(self, item: pytest.Item | None, fixture: pytest.FixtureDef[Any] | None) -> None:
        self.item = item
        self.fixture = fixture

    @property
    def nodeid(self) -> str | None:
        return self.item.nodeid if self.item is not None else None

    def describe(self) -> str:
        if self.fixture is not None:
            return f"fixture {self.fixture.argname!r} (set up for {self.nodeid or 'the session'})"
        return self.nodeid or "the session"

    def location(self) -> tuple[str, int]:
        """File and line the warning points at: the fixture's function, else the test's."""
        if self.fixture is not None:
            code = getattr(self.fixture.func, "__code__", None)
            if code is not None:
                return code.co_filename, code.co_firstlineno
        if self.item is not None:
            path, line, _ = self.item.location
            return str(self.item.config.rootpath / path), (line or 0) + 1
        return __file__, 1


@final
class PortFactory:
    """Leases ports, consecutive blocks and bound sockets, over TCP, UDP or both.

    ``port_factory`` returns the session's: its leases last until ``release(port)`` or the end of
    the session. ``free_ports`` returns one per test: its leases end at the test's teardown. Either
    way a lease that ends while its port is still in use emits ``EphemeralPortWarning``.
    """

    __module__ = "pytest_ephemeral"

    def __init__(self, session: _Session, owner: pytest.Item | None = None) -> None:
        self._session = session
        self._owner = owner  # the test whose teardown ends these leases; None: the session
        self._mine: dict[int, _Origin] = {}
        self._sockets: dict[int, socket.socket] = {}
        self._own_teardown: set[int] = set()  # leases a fixture of their own ends (free_port)
        self._set_up = False  # a test's factory: whether ``free_ports`` is set up now
        self._mutex = threading.Lock()

    def __call__(self, *, protocol: Protocol = "tcp") -> int:
        """Lease one port, bind-checked for ``protocol``: "tcp", "udp" or "both"."""
        return self.block(1, protocol=protocol)[0]

    def block(self, n: int, *, protocol: Protocol = "tcp") -> list[int]:
        """Lease ``n`` consecutive ports, bind-checked for ``protocol``."""
        origin = self._session.origin(self._owner)
        ports = self._session.lease(n, protocol, origin.nodeid)
        with self._mutex:
            self._mine.update(dict.fromkeys(ports, origin))
        return ports

    def socket(self, *, protocol: SocketProtocol = "tcp", host: str | None = None) -> socket.socket:
        """A socket already bound to a newly leased port on ``host`` (default: the configured host).

        ``protocol`` is "tcp" (not yet listening) or "udp". The socket is closed, and the lease
        ended, by ``release(port)`` or when the factory's leases end.
        """
        if protocol not in ("tcp", "udp"):
            raise ConfigError(f"a socket's protocol must be 'tcp' or 'udp', not {protocol!r}")
        origin = self._session.origin(self._owner)
        sock = self._session.leased_socket(protocol, host or self._session.settings.host, origin)
        port = sock.getsockname()[1]
        with self._mutex:
            self._mine[port] = origin
            self._sockets[port] = sock
        return sock

    def release(self, port: int) -> None:
        """End the lease of one port early; ``ValueError`` if this factory does not hold it."""
        warning = self._end(port)
        if warning is not None:
            warnings.warn(warning, stacklevel=2)

    def _end(self, port: int) -> EphemeralPortWarning | None:
        with self._mutex:
            origin = self._mine.pop(port, None)
            sock = self._sockets.pop(port, None)
            self._own_teardown.discard(port)
        if origin is None:
            if port in self._session.ended:
                raise ValueError(f"port {port} was already released")
            raise ValueError(f"port {port} is not leased by this factory")
        if sock is not None:
            sock.close()
        return self._session.end_lease(port, origin)

    def _end_all(self) -> list[tuple[_Origin, EphemeralPortWarning]]:
        """End every lease still held, but those a fixture of their own ends; the leaks found,
        with who leased each.

        Every lease is ended, whatever goes wrong with one of them (no descriptor left for the
        leak check, say); the first such error is raised once they all are.
        """
        leaks = []
        failure: BaseException | None = None
        with self._mutex:
            mine = {port: o for port, o in self._mine.items() if port not in self._own_teardown}
        for port, origin in sorted(mine.items()):
            try:
                warning = self._end(port)
            except ValueError:
                continue  # released meanwhile by another thread
            except BaseException as error:
                failure = failure or error
                continue
            if warning is not None:
                leaks.append((origin, warning))
        if failure is not None:
            raise failure
        return leaks


class _Session:
    """What the session's factories share: settings, who holds leases, figures, the allocator."""

    def __init__(self, config: pytest.Config, settings: Settings, holder: Holder) -> None:
        self.config = config
        self.settings = settings
        self.holder = holder
        self.item: pytest.Item | None = None  # the test running now
        #: The fixtures being set up now, innermost last, with the request each is set up for.
        self.fixtures: list[tuple[pytest.FixtureDef[Any], pytest.FixtureRequest]] = []
        self.leaks = 0
        self.ended: set[int] = set()  # released ports, to say "already released"
        self.totals: dict[str, float] = {}  # figures from xdist workers, for the summary
        self._stats: Stats | None = None
        self._allocator: PortAllocator | None = None
        self._still_in_use: _LeakCheck | None = None  # loaded with the allocator
        self._creating = threading.Lock()

    @property
    def allocator(self) -> PortAllocator:
        if self._allocator is None:
            with self._creating:
                if self._allocator is None:
                    from ._allocator import Stats, allocator_for  # imports filelock: first lease
                    from ._leakcheck import still_in_use

                    self._still_in_use = still_in_use
                    self._stats = Stats()
                    self._allocator = allocator_for(
                        self.settings.lock_dir, self.settings.lock_dir_given
                    )
        return self._allocator

    def origin(self, owner: pytest.Item | None) -> _Origin:
        if owner is not None:
            return _Origin(owner, None)
        return _Origin(self.item, self.fixtures[-1][0] if self.fixtures else None)

    def lease(
        self, n: int, protocol: Protocol, nodeid: str | None, settings: Settings | None = None
    ) -> list[int]:
        """Lease ``n`` consecutive ports of ``settings.ports`` (default: the session's)."""
        allocator = self.allocator
        with _ADVICE:
            ports = allocator.lease_block(
                n, settings or self.settings, protocol, nodeid, self.holder, self._stats
            )
        self.ended.difference_update(ports)
        return ports

    def leased_socket(self, protocol: SocketProtocol, host: str, origin: _Origin) -> socket.socket:
        """A socket bound to a newly leased port. A program that ignores the locks could bind the
        port between the probe and this bind: then the lease goes back and the next port is tried.
        """
        from ._probe import bound_socket, family_of

        kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
        for attempt in range(1, 4):
            port = self.lease(1, protocol, origin.nodeid)[0]
            try:
                return bound_socket(family_of(host), kind, host, port)
            except BaseException as error:
                self.allocator.release(port)
                if not isinstance(error, OSError) or attempt == 3:
                    raise
        raise AssertionError("unreachable")

    def end_lease(self, port: int, origin: _Origin) -> EphemeralPortWarning | None:
        """Release ``port``; if the test left something using it, return the warning to emit.

        Checked while the lease is still held, so whatever uses the port is the test's own, and
        released whatever happens, so a warning made an error (-W error) cannot keep the lease.
        """
        allocator, host = self.allocator, self.settings.host
        try:
            assert self._still_in_use is not None  # set with the allocator
            kinds = allocator.lease_of(port).kinds
            use = self._still_in_use(port, host, bind_targets(host), kinds)
        finally:
            allocator.release(port)
            self.ended.add(port)
        if use is None:
            return None
        self.leaks += 1
        return EphemeralPortWarning(
            f"port {port}, leased by {origin.describe()}, is still {use} after its lease ended:"
            " stop the server and close its sockets before the test ends"
        )

    def report_late(self, leaks: list[tuple[_Origin, EphemeralPortWarning]]) -> None:
        """Leaks found at the end of the session, reported under the test or fixture that leased
        the port (not the last test to run, which did nothing wrong, and which they cannot fail)."""
        for origin, warning in leaks:
            filename, line = origin.location()
            # The warning filters in force (-W, filterwarnings) decide whether it is shown; made
            # an error, it is still only reported: the test that leased the port is over.
            with warnings.catch_warnings(record=True) as shown:
                try:
                    warnings.warn_explicit(warning, type(warning), filename, line)
                except EphemeralPortWarning:
                    shown.append(warnings.WarningMessage(warning, type(warning), filename, line))
            if not shown:
                self.leaks -= 1  # filtered out: not counted either
                continue
            message = shown[0]
            self.config.hook.pytest_warning_recorded.call_historic(
                kwargs={
                    "warning_message": message,
                    "when": "runtest",
                    "nodeid": origin.nodeid or "",
                    "location": (filename, line, origin.describe()),
                }
            )

    def figures(self) -> dict[str, float]:
        """This process's figures for the run summary (all zero if it leased nothing)."""
        stats = asdict(self._stats) if self._stats else {}
        return {**stats, "leaks": self.leaks}

    def add_figures(self, figures: dict[str, float]) -> None:
        for key, value in figures.items():
            old = self.totals.get(key, 0)
            self.totals[key] = max(old, value) if key == "peak" else old + value


_FACTORY = pytest.StashKey[PortFactory]()
_OUTER_LAYERS = pytest.StashKey["tuple[Layer, ...] | None"]()


def _cli_layer(config: pytest.Config) -> Layer:
    """``--ephemeral-*`` options, then ``-o ephemeral_*`` ones: what the user typed wins."""
    from ._configfile import override_layer

    layer = dict(override_layer(config.option.override_ini))
    for name in NAMES:
        value = getattr(config.option, f"ephemeral_{name}", None)
        if value is not None:
            layer[name] = Raw(value, f"command-line option {_option(name)}")
    return layer


def _ini_layer(config: pytest.Config) -> Layer:
    """The config file's ``ephemeral_*`` values, read as the CLI reads them: pytest's typed ini
    values are strict both ways, and ``ephemeral_timeout = "3"`` or a list of exclusions in a
    native ``[tool.pytest]`` table must work as well as in an ini file."""
    from ._configfile import config_file_layer, override_layer, read_pytest_section

    if config.inipath is None:
        return {}
    # Given with -o: in _cli_layer, or cleared by an empty -o ephemeral_X=, as pytest clears it
    overridden = override_layer(config.option.override_ini, keep_empty=True)
    layer = config_file_layer(config.inipath, read_pytest_section(config.inipath))
    return {name: raw for name, raw in layer.items() if name not in overridden}


def pytest_configure(config: pytest.Config) -> None:
    if config.option.help or config.option.version:
        return  # the help that explains a bad setting must show despite it
    try:
        layers = (_cli_layer(config), env_layer(os.environ), _ini_layer(config))
        settings = resolve(*layers)
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from None
    workerinput = getattr(config, "workerinput", None) or {}
    holder = this_process(workerinput.get("workerid"), workerinput.get("testrunuid") or uuid4().hex)
    session = _Session(config, settings, holder)
    config.stash[_FACTORY] = PortFactory(session)
    config.stash[_OUTER_LAYERS] = push_session_layers(layers)  # lease_port() here uses them
    _adopt.configure(config, session)  # adapters for other port helpers (setting adopt)


def _session_of(config: pytest.Config) -> _Session:
    return config.stash[_FACTORY]._session


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the figures to the controller
        workeroutput["ephemeral"] = _session_of(session.config).figures()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    figures = getattr(node, "workeroutput", {}).get("ephemeral")
    if figures:  # a crashed worker has no workeroutput: its figures are lost, not the summary
        _session_of(node.config).add_figures(figures)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    state = _session_of(config)
    state.add_figures(state.figures())
    totals = state.totals
    if config.get_verbosity() < 1 and not totals.get("waited") and not totals.get("leaks"):
        return
    workers = config.pluginmanager.hasplugin("xdist") and config.getoption("numprocesses", None)
    others = "other processes" if workers else "other runs"
    leaks = totals.get("leaks", 0)
    terminalreporter.write_line(
        f"ephemeral ports: {totals.get('leased', 0):.0f} leased,"
        f" at most {totals.get('peak', 0):.0f} held at once by one process;"
        f" skipped {totals.get('skipped_bound', 0):.0f} bound by other programs or in TIME_WAIT and"
        f" {totals.get('skipped_locked', 0):.0f} locked by {others};"
        f" waited {totals.get('waited', 0):.2f} s; {leaks:.0f} leak warning{'s' * (leaks != 1)}"
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    if _FACTORY in config.stash:
        pop_session_layers(config.stash[_OUTER_LAYERS])
        config.stash[_FACTORY]._end_all()  # leases of a session cut short before its teardown


def pytest_report_header(config: pytest.Config) -> str:
    settings = _session_of(config).settings
    ports = settings.ports
    how = ports.origin + (f"; {ports.caveat}" if ports.caveat else "")
    return (
        f"ephemeral ports: {ports} ({ports.size}; {how}), lock dir: {settings.lock_dir},"
        f" timeout: {settings.timeout:g} s"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    state = _session_of(item.config)
    state.item = item
    try:
        return (yield)
    finally:
        state.item = None
        if _TEST_FACTORY in item.stash:  # its leases have ended with the test's fixtures
            del item.stash[_TEST_FACTORY]


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, object, object]:
    fixtures = _session_of(request.config).fixtures
    fixtures.append((fixturedef, request))
    try:
        return (yield)
    finally:
        fixtures.pop()


@pytest.fixture(scope="session")
def port_factory(request: pytest.FixtureRequest) -> Iterator[PortFactory]:
    """Session-scoped factory of leased ports, safe across xdist workers and concurrent runs:
    ``port_factory(protocol="tcp")`` leases one port ("tcp", "udp" or "both"), ``.block(n)`` n
    consecutive ports, ``.socket(protocol="tcp")`` a socket bound to a leased port, and
    ``.release(port)`` ends a lease early.

    Every other lease ends when the session ends; a port still in use then is reported under the
    test or fixture that leased it.
    """
    factory = request.config.stash[_FACTORY]
    yield factory
    factory._session.report_late(factory._end_all())


def _test_factory(request: pytest.FixtureRequest) -> PortFactory:
    """The factory of the running test's leases, kept on the test until it ends: ``free_ports``
    is it, and ``free_port`` and ``free_socket`` lease through it, so ``free_ports.release()``
    ends theirs too.

    Not a fixture of its own: ``free_port`` asks pytest for no other fixture, which would cost
    every test that uses it a fixture set-up and teardown more than its own recipe did.
    """
    item: pytest.Item = request.node
    factory = item.stash.get(_TEST_FACTORY, None)
    if factory is None:
        factory = item.stash[_TEST_FACTORY] = PortFactory(_session_of(request.config), item)
    return factory


def _one_port(request: pytest.FixtureRequest, protocol: Protocol = "tcp") -> Iterator[int]:
    """The body of a fixture giving a test one port, leased through the test's factory."""
    factory = _test_factory(request)
    port = factory(protocol=protocol)
    yield from _until_teardown(request, factory, port, port)


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
    except ValueError:  # released already, through free_ports.release()
        return
    if warning is not None:
        request.node.warn(warning)  # located at the test, shown under its node id


_TEST_FACTORY = pytest.StashKey[PortFactory]()


@pytest.fixture
def free_ports(request: pytest.FixtureRequest) -> Iterator[PortFactory]:
    """Factory of ports leased for this test alone: ``free_ports(protocol="tcp")`` leases one port
    ("tcp", "udp" or "both"), ``.block(n)`` n consecutive ports, ``.socket(protocol="tcp")`` a
    socket bound to a leased port, and ``.release(port)`` ends a lease early.

    Every other lease ends at the test's teardown, after the fixtures that use it, with the same
    leak check as ``free_port``.
    """
    factory = _test_factory(request)
    factory._set_up = True
    yield factory
    try:
        leaks = factory._end_all()
    finally:
        factory._set_up = False
    for _, warning in leaks:
        request.node.warn(warning)


@pytest.fixture
def free_port(request: pytest.FixtureRequest) -> Iterator[int]:
    """A TCP port leased for this test alone: free now, and held from other tests and pytest runs
    until this test's teardown, after the fixtures that use it."""
    yield from _one_port(request)


@pytest.fixture
def free_socket(request: pytest.FixtureRequest) -> Iterator[socket.socket]:
    """A TCP socket already bound to a port leased for this test, on the configured host, not yet
    listening: hand it to a server (asyncio ``start_server(sock=...)``, ``socketserver``, uvicorn
    ``fd=``) and no other program can take the port in between. Closed, and the lease ended, at
    teardown; closing it earlier does not end the lease."""
    factory = _test_factory(request)
    sock = factory.socket()
    yield from _until_teardown(request, factory, sock.getsockname()[1], sock)
