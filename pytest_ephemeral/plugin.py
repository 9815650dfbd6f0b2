"""The pytest plugin: options, hooks and fixtures, over ``_leases`` (who holds what, until when).

Shaped like pytest's ``tmp_path``: ``pytest_configure`` only reads the settings (no I/O) and starts
the session's leases, whose ``PortFactory`` ``port_factory`` returns; ``free_ports``, ``free_port``
and ``free_socket`` lease through a factory of the test's, whose leases end with the test. The lock
dir is prepared, and ``filelock`` imported, on the first lease, so a suite that leases no port pays
for neither, and a broken lock dir fails the tests that lease, not the run.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any
from uuid import uuid4

import pytest

from . import _adopt, _bind, _leases
from ._current import Session, close_session, open_session
from ._errors import ConfigError
from ._settings import TABLE

if TYPE_CHECKING:
    from ._factory import PortFactory
    from ._settings import Layer


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    group = parser.getgroup("ephemeral", "leased network ports (pytest-ephemeral)")
    for row in TABLE:
        group.addoption(
            row.option, dest=f"ephemeral_{row.name}", metavar=row.metavar, help=row.option_help()
        )
        # Registered so that --strict-config knows them; their values are read by _layers.
        parser.addini(row.ini, f"{row.help} (default: {row.default})", type="string", default=None)
    pluginmanager.register(_adopt.RunParallelSetting(), "ephemeral-run-parallel")


_CURRENT = pytest.StashKey[Session]()


def _layers(config: pytest.Config) -> tuple[Layer, ...]:
    """The session's layers: command line (addopts and PYTEST_ADDOPTS merged in by pytest), -o,
    environment, config file."""
    from ._sources import plugin_layers

    options = {row.name: getattr(config.option, f"ephemeral_{row.name}", None) for row in TABLE}
    return plugin_layers(options, config.option.override_ini, os.environ, config.inipath)


def pytest_configure(config: pytest.Config) -> None:
    if config.option.help or config.option.version:
        return  # the help that explains a bad setting must show despite it
    from ._sources import load

    try:
        layers = _layers(config)
        settings = load(*layers)
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from None
    workerinput = getattr(config, "workerinput", None) or {}
    # The run's id now, not with the holder on the first lease: a process forked from this one
    # (a test's multiprocessing) records the same test run.
    testrun = workerinput.get("testrunuid") or uuid4().hex
    leases = _leases.start(config, settings, workerinput.get("workerid"), testrun)
    config.stash[_CURRENT] = open_session(Session(layers, settings))  # lease_port() here uses them
    _adopt.configure(config, leases)  # adapters for other port helpers (setting adopt)
    _bind.configure(config, leases)  # bind(0) leased (adapter bind0), fixed ports found (audit)


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the figures to the controller
        workeroutput["ephemeral"] = _leases.leases_of(session.config).figures()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    figures = getattr(node, "workeroutput", {}).get("ephemeral")
    if figures:  # a crashed worker has no workeroutput: its figures are lost, not the summary
        _leases.leases_of(node.config).add_figures(figures)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    leases = _leases.leases_of(config)
    leases.add_figures(leases.figures())
    totals = leases.totals()
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
    if _leases.started(config):
        close_session(config.stash[_CURRENT])
        _leases.finish(config)  # leases of a session cut short before its teardown


#: Settings the header always shows in their own way (adopt: the adapters' own line).
_IN_HEADER = ("port_range", "exclude", "lock_dir", "timeout", "adopt")


def pytest_report_header(config: pytest.Config) -> str:
    settings = _leases.leases_of(config).settings
    ports = settings.ports
    how = ports.origin + (f"; {ports.caveat}" if ports.caveat else "")
    # The range (with its exclusions), lock dir and timeout always; the others when given.
    others = "".join(
        f", {row.name}: {settings.show(row.name)}"
        for row in TABLE
        if row.name in settings.given and row.name not in _IN_HEADER
    )
    return (
        f"ephemeral ports: {ports} ({ports.size}; {how}), lock dir: {settings.lock_dir},"
        f" timeout: {settings.timeout:g} s{others}"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    leases = _leases.leases_of(item.config)
    leases.test_started(item)
    try:
        return (yield)
    finally:
        leases.test_started(None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    try:
        yield
    finally:
        _leases.test_finished(item)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, object, object]:
    leases = _leases.leases_of(request.config)
    leases.fixture_started(fixturedef, request)
    try:
        return (yield)
    finally:
        leases.fixture_done()


@pytest.fixture(scope="session")
def port_factory(request: pytest.FixtureRequest) -> Iterator[PortFactory]:
    """Session-scoped factory of leased ports, safe across xdist workers and concurrent runs:
    ``port_factory(protocol="tcp")`` leases one port ("tcp", "udp" or "both"), ``.block(n)`` n
    consecutive ports, ``.socket(protocol="tcp")`` a socket bound to a leased port, and
    ``.release(port)`` ends a lease early.

    Every other lease ends when the session ends; a port still in use then is reported under the
    test or fixture that leased it.
    """
    from ._factory import session_factory  # the factories load when a test first asks for ports

    yield from session_factory(request)


# The per-test fixtures ask for no ``request``: _leases.fixture_request() finds it for less.


@pytest.fixture
def free_ports() -> Iterator[PortFactory]:
    """Factory of ports leased for this test alone: ``free_ports(protocol="tcp")`` leases one port
    ("tcp", "udp" or "both"), ``.block(n)`` n consecutive ports, ``.socket(protocol="tcp")`` a
    socket bound to a leased port, and ``.release(port)`` ends a lease early.

    Every other lease ends at the test's teardown, after the fixtures that use it, with the same
    leak check as ``free_port``.
    """
    from ._factory import test_ports  # the factories load when a test first asks for ports

    yield from test_ports(_leases.fixture_request())


@pytest.fixture
def free_port() -> Iterator[int]:
    """A TCP port leased for this test alone: free now, and held from other tests and pytest runs
    until this test's teardown, after the fixtures that use it."""
    from ._factory import one_port  # the factories load when a test first asks for ports

    yield from one_port(_leases.fixture_request())


@pytest.fixture
def free_socket() -> Iterator[socket.socket]:
    """A TCP socket already bound to a port leased for this test, on the configured host, not yet
    listening: hand it to a server (asyncio ``start_server(sock=...)``, ``socketserver``, uvicorn
    ``fd=``) and no other program can take the port in between. Closed, and the lease ended, at
    teardown; closing it earlier does not end the lease."""
    from ._factory import one_socket  # the factories load when a test first asks for ports

    yield from one_socket(_leases.fixture_request())
