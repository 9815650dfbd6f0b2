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
from typing import Any
from uuid import uuid4

import pytest

from . import _adopt, _bind, _leases
from ._errors import ConfigError
from ._holder import this_process
from ._leases import PortFactory
from ._settings import (
    NAMES,
    Layer,
    Raw,
    env_layer,
    env_var,
    pop_session_layers,
    push_session_layers,
    resolve,
)

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
    leases = _leases.start(config, settings, holder)
    config.stash[_OUTER_LAYERS] = push_session_layers(layers)  # lease_port() here uses them
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
        pop_session_layers(config.stash[_OUTER_LAYERS])
        _leases.finish(config)  # leases of a session cut short before its teardown


def pytest_report_header(config: pytest.Config) -> str:
    settings = _leases.leases_of(config).settings
    ports = settings.ports
    how = ports.origin + (f"; {ports.caveat}" if ports.caveat else "")
    return (
        f"ephemeral ports: {ports} ({ports.size}; {how}), lock dir: {settings.lock_dir},"
        f" timeout: {settings.timeout:g} s"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    with _leases.leases_of(item.config).running(item):
        return (yield)


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
    with _leases.leases_of(request.config).setting_up(fixturedef, request):
        return (yield)


@pytest.fixture(scope="session")
def port_factory(request: pytest.FixtureRequest) -> Iterator[PortFactory]:
    """Session-scoped factory of leased ports, safe across xdist workers and concurrent runs:
    ``port_factory(protocol="tcp")`` leases one port ("tcp", "udp" or "both"), ``.block(n)`` n
    consecutive ports, ``.socket(protocol="tcp")`` a socket bound to a leased port, and
    ``.release(port)`` ends a lease early.

    Every other lease ends when the session ends; a port still in use then is reported under the
    test or fixture that leased it.
    """
    yield from _leases.session_factory(request)


@pytest.fixture
def free_ports(request: pytest.FixtureRequest) -> Iterator[PortFactory]:
    """Factory of ports leased for this test alone: ``free_ports(protocol="tcp")`` leases one port
    ("tcp", "udp" or "both"), ``.block(n)`` n consecutive ports, ``.socket(protocol="tcp")`` a
    socket bound to a leased port, and ``.release(port)`` ends a lease early.

    Every other lease ends at the test's teardown, after the fixtures that use it, with the same
    leak check as ``free_port``.
    """
    yield from _leases.test_ports(request)


@pytest.fixture
def free_port(request: pytest.FixtureRequest) -> Iterator[int]:
    """A TCP port leased for this test alone: free now, and held from other tests and pytest runs
    until this test's teardown, after the fixtures that use it."""
    yield from _leases.one_port(request)


@pytest.fixture
def free_socket(request: pytest.FixtureRequest) -> Iterator[socket.socket]:
    """A TCP socket already bound to a port leased for this test, on the configured host, not yet
    listening: hand it to a server (asyncio ``start_server(sock=...)``, ``socketserver``, uvicorn
    ``fd=``) and no other program can take the port in between. Closed, and the lease ended, at
    teardown; closing it earlier does not end the lease."""
    yield from _leases.one_socket(request)
