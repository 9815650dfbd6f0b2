"""Adapters: the port helpers suites already use, backed by leases (setting ``adopt``).

Fixture adapters (pytest-asyncio's ``unused_*_port*``, anyio's ``free_*_port*``) are fixtures of
the same names, scopes and return types, defined on plugin objects that ``configure`` registers
from ``pytest_configure``. Why that wins without depending on load order: pytest keeps the
fixtures of non-conftest plugins in registration order and, of several visible definitions of one
name, uses the one registered last; ``pytest_configure`` runs after every plugin named by ``-p``,
an entry point or ``PYTEST_PLUGINS`` has been imported and registered, so ours come after
pytest-asyncio's and anyio's whatever their order. ``conftest.py`` fixtures are placed after every
plugin's (pytest 8: conftest fixtures sort after plugin ones; pytest 9: they are parsed when their
directory is collected), so a user's own fixture of the same name still wins.

Library adapters (``portpicker``, ``port_for``, ``aiohttp.test_utils``) replace a function of the
library for the session, in each process of the run, and put it back at ``pytest_unconfigure``.
None is imported here: a library already imported when the session starts is patched then, and
one imported later is patched right after its module runs, by a ``sys.meta_path`` finder that
only looks at the few module names concerned. Modules that copied the function with
``from port_for import get_port``-style imports before the patch hold the original: every loaded
module attribute that *is* the original is replaced too (and restored).

A port a library adapter hands out is leased for the pytest scope that asked: the fixture being
set up (released at its teardown), else the running test (released after its teardown), else the
session.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import itertools
import operator
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

from ._errors import PortsExhausted
from ._settings import ADAPTERS

if TYPE_CHECKING:
    from ._factory import PortFactory
    from ._leases import SessionLeases
    from ._probe import Protocol

#: Fixtures that hand out one port per test: tests using them must not run in several threads.
ONE_PORT_PER_TEST = (
    "free_port",
    "free_socket",
    "unused_tcp_port",
    "unused_udp_port",
    "free_tcp_port",
    "free_udp_port",
)


def installed(names: Iterable[str]) -> list[str]:
    """Those of ``names`` whose package is installed, in header order, found without importing.

    ``find_spec`` of a top-level name only searches ``sys.path`` (about 0.1 ms each here).
    """
    chosen = set(names)
    return [
        name
        for name, module in ADAPTERS.items()
        if name in chosen
        and (module is None or module in sys.modules or importlib.util.find_spec(module))
    ]


def configure(config: pytest.Config, leases: SessionLeases) -> None:
    """Register the adapters the setting ``adopt`` asks for (called from ``pytest_configure``)."""
    active = installed(leases.settings.adopt)
    config.pluginmanager.register(_Adapters(config, leases, active), "ephemeral-adapters")


class RunParallelSetting:
    """Has pytest-run-parallel run tests that use a one-port fixture in one thread.

    It shares a test's fixture values between its threads: four threads would bind one port. Its
    own ``thread_unsafe_fixtures`` setting says so, at no cost per test. It reads the setting in
    its ``pytest_configure``: this one runs first (``tryfirst``), registered apart so that the
    plugin's own ``pytest_configure`` keeps its place after conftest files'.
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_configure(self, config: pytest.Config) -> None:
        for name in ONE_PORT_PER_TEST:
            try:
                config.addinivalue_line("thread_unsafe_fixtures", name)
            except ValueError:  # not a known setting: pytest-run-parallel is not installed
                return


class _Adapters:
    """The adapter plugin: header line, and the adapters that are active."""

    def __init__(self, config: pytest.Config, leases: SessionLeases, active: list[str]) -> None:
        self.active = active
        self.patches = _Patches()
        self.leases = leases
        if "pytest-asyncio" in active:
            fixtures = _fixture_plugin(
                "asyncio",
                _unused_tcp_port,
                _unused_udp_port,
                _unused_tcp_port_factory,
                _unused_udp_port_factory,
            )
            config.pluginmanager.register(fixtures, "ephemeral-adapter-pytest-asyncio")
        if "anyio" in active:
            fixtures = _fixture_plugin(
                "anyio",
                _free_tcp_port,
                _free_udp_port,
                _free_tcp_port_factory,
                _free_udp_port_factory,
            )
            config.pluginmanager.register(fixtures, "ephemeral-adapter-anyio")
        library = {
            "portpicker": ("portpicker", self._patch_portpicker),
            "port-for": ("port_for.api", self._patch_port_for),
            "aiohttp": ("aiohttp.test_utils", self._patch_aiohttp),
        }
        for name in active:
            if name in library:
                module, patch = library[name]
                self.patches.when_imported(module, patch)

    # --- hooks ----------------------------------------------------------------------------

    def pytest_report_header(self) -> str:
        return f"ephemeral adapters: {', '.join(self.active) or 'none'}"

    def pytest_unconfigure(self) -> None:
        self.patches.restore()

    # --- library adapters -------------------------------------------------------------------

    def _patch_portpicker(self, module: ModuleType) -> None:
        leases, original_return = self.leases, module.return_port
        no_port = module.NoFreePortFoundError

        def pick_unused_port(pid: int | None = None, portserver_address: str | None = None) -> int:
            """Leased by pytest-ephemeral: free for TCP and UDP, held for the pytest scope."""
            return _leased(leases, "both", error=no_port)

        def return_port(port: int) -> None:
            """Ends the port's lease early if pytest-ephemeral leased it."""
            if not leases.end(port):
                original_return(port)

        self.patches.replace(module, "pick_unused_port", pick_unused_port)
        self.patches.replace(module, "return_port", return_port)

    def _patch_port_for(self, module: ModuleType) -> None:
        # get_port() passes every choice it does not take as is (an explicit port, -1) to the
        # module's select_random(): replacing that one covers both.
        leases = self.leases
        error = sys.modules["port_for.exceptions"].PortForException

        def select_random(
            ports: set[int] | None = None, exclude_ports: Iterable[int] | None = None
        ) -> int:
            """Leased by pytest-ephemeral: free for TCP, held for the asking pytest scope."""
            excluded = frozenset(exclude_ports or ())
            if ports is None:
                return _leased(leases, "tcp", exclude=excluded, error=error)
            within = frozenset(ports) - excluded
            if not within:
                raise error("Can't select a port")
            return _leased(leases, "tcp", within=within, error=error)

        self.patches.replace(module, "select_random", select_random)

    def _patch_aiohttp(self, module: ModuleType) -> None:
        leases = self.leases

        def unused_port() -> int:
            """Leased by pytest-ephemeral: free for TCP, held for the asking pytest scope."""
            return _leased(leases, "tcp")

        self.patches.replace(module, "unused_port", unused_port)


def _leased(
    leases: SessionLeases,
    protocol: Protocol,
    *,
    within: frozenset[int] | None = None,
    exclude: frozenset[int] = frozenset(),
    error: Callable[[str], Exception] | None = None,
) -> int:
    """A port of ``within`` (default: the configured range), not in ``exclude``, leased for the
    pytest scope that asks; the library's own ``error`` when none is free in time."""
    from ._ranges import PortRange, normalize

    chosen = None
    if within is not None:  # the caller's own ports, in the session's lock dir
        chosen = PortRange(normalize((p, p) for p in within), "chosen by a port helper")
    try:
        return leases.lease(protocol, ports=chosen, exclude=exclude)
    except PortsExhausted as exhausted:
        if error is None:
            raise
        raise error(str(exhausted)) from exhausted


# --- patching, now or when the module is imported ------------------------------------------------


def _exact_refcount() -> Callable[[object], int] | None:
    """``sys.getrefcount`` where reference counts are exact enough to tell that nothing else holds
    an object: CPython with the GIL; not PyPy, nor the free-threaded build (3.13+), which defers
    some counts."""
    if sys.implementation.name != "cpython":
        return None
    if sys.version_info >= (3, 13):
        import sysconfig  # only where a free-threaded build exists

        if sysconfig.get_config_var("Py_GIL_DISABLED"):
            return None
    return sys.getrefcount


_REFCOUNT = _exact_refcount()


class _Patches(importlib.abc.MetaPathFinder):
    """Replaced module attributes, to restore; patches modules that are imported later."""

    def __init__(self) -> None:
        self._done: list[tuple[ModuleType, str, object, object]] = []
        self._waiting: dict[str, Callable[[ModuleType], None]] = {}
        self._mutex = threading.Lock()

    def when_imported(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        module = sys.modules.get(name)
        if module is not None:
            patch(module)
            return
        with self._mutex:
            self._waiting[name] = patch
            if self not in sys.meta_path:
                sys.meta_path.insert(0, self)

    def replace(self, module: ModuleType, name: str, replacement: object) -> None:
        """Set ``module.name``, and every loaded module's copy of it, to ``replacement``.

        The modules of the library's own package are looked at first: the copies are most
        likely there. Once nothing but this frame refers to the original any more (as far as
        CPython's reference counts tell), no other module can hold a copy, and the rest of the
        modules (hundreds, with tens of thousands of values) need not be searched.
        """
        original = getattr(module, name)
        alone = object()  # held by this frame only: the count ``original`` falls to at the end
        top = module.__name__.partition(".")[0]
        modules = list(sys.modules.items())
        ours = [m for key, m in modules if key == top or key.startswith(top + ".")]
        self._replace_in([module, *ours], original, replacement)
        if _REFCOUNT is not None:
            kept = sum(entry[2] is original for entry in self._done)  # for restore()
            if _REFCOUNT(original) - kept <= _REFCOUNT(alone):
                return
        self._replace_in([m for _, m in modules], original, replacement)

    def _replace_in(
        self, holders: Iterable[ModuleType], original: object, replacement: object
    ) -> None:
        """Set each attribute of ``holders`` (modules) that *is* ``original`` to ``replacement``."""
        same = itertools.repeat(original)
        for holder in holders:
            namespace = getattr(holder, "__dict__", None)
            # Identity, compared in C: some 27,000 values here, and == could run foreign code.
            if not isinstance(namespace, dict) or not any(
                map(operator.is_, list(namespace.values()), same)
            ):
                continue
            for attribute, value in list(namespace.items()):
                if value is original:
                    setattr(holder, attribute, replacement)
                    self._done.append((holder, attribute, original, replacement))

    def restore(self) -> None:
        with self._mutex:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            self._waiting.clear()
        for holder, attribute, original, replacement in reversed(self._done):
            if getattr(holder, attribute, None) is replacement:  # not replaced again since
                setattr(holder, attribute, original)
        self._done.clear()

    # MetaPathFinder: asked about every import while waiting; answers only for awaited names.
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        with self._mutex:
            patch = self._waiting.get(fullname)
        if patch is None:
            return None
        # Only the finders after this one: a session run in-process inside another (pytester's
        # runpytest) has a finder of its own, waiting for the same names; each asking the other
        # would recurse without end. The first asks the second, which finds the module.
        finders = list(sys.meta_path)
        after = finders.index(self) + 1 if self in finders else 0
        for finder in finders[after:]:
            if not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchAfter(spec.loader, self._patched(fullname, patch))
                return spec
        return None

    def _patched(
        self, name: str, patch: Callable[[ModuleType], None]
    ) -> Callable[[ModuleType], None]:
        def run(module: ModuleType) -> None:
            with self._mutex:
                if self._waiting.pop(name, None) is None:
                    return  # restored meanwhile
            patch(module)

        return run


class _PatchAfter(importlib.abc.Loader):
    """A module's own loader, then the patch."""

    def __init__(self, loader: Any, patch: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._patch = patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ...
        return getattr(self._loader, name)


# --- fixture adapters ---------------------------------------------------------------------------


def _for_this_test(protocol: Protocol) -> Iterator[int]:
    # No ``request`` fixture asked for: see _leases.fixture_request.
    from ._factory import one_port  # loaded by the first fixture that leases
    from ._leases import fixture_request

    return one_port(fixture_request(), protocol)


@pytest.fixture(name="unused_tcp_port")
def _unused_tcp_port() -> Iterator[int]:
    """A TCP port leased for this test (pytest-ephemeral's, in place of pytest-asyncio's)."""
    yield from _for_this_test("tcp")


@pytest.fixture(name="unused_udp_port")
def _unused_udp_port() -> Iterator[int]:
    """A UDP port leased for this test (pytest-ephemeral's, in place of pytest-asyncio's)."""
    yield from _for_this_test("udp")


@pytest.fixture(name="unused_tcp_port_factory", scope="session")
def _unused_tcp_port_factory(port_factory: PortFactory) -> Callable[[], int]:
    """Leases TCP ports until the session ends (pytest-ephemeral's, for pytest-asyncio's)."""
    return lambda: port_factory(protocol="tcp")


@pytest.fixture(name="unused_udp_port_factory", scope="session")
def _unused_udp_port_factory(port_factory: PortFactory) -> Callable[[], int]:
    """Leases UDP ports until the session ends (pytest-ephemeral's, for pytest-asyncio's)."""
    return lambda: port_factory(protocol="udp")


@pytest.fixture(name="free_tcp_port")
def _free_tcp_port() -> Iterator[int]:
    """A TCP port leased for this test (pytest-ephemeral's, in place of anyio's)."""
    yield from _for_this_test("tcp")


@pytest.fixture(name="free_udp_port")
def _free_udp_port() -> Iterator[int]:
    """A UDP port leased for this test (pytest-ephemeral's, in place of anyio's)."""
    yield from _for_this_test("udp")


@pytest.fixture(name="free_tcp_port_factory", scope="session")
def _free_tcp_port_factory(port_factory: PortFactory) -> Any:
    """anyio's ``FreePortFactory``, leasing TCP ports until the session ends."""
    return _anyio_factory(port_factory, socket.SOCK_STREAM)


@pytest.fixture(name="free_udp_port_factory", scope="session")
def _free_udp_port_factory(port_factory: PortFactory) -> Any:
    """anyio's ``FreePortFactory``, leasing UDP ports until the session ends."""
    return _anyio_factory(port_factory, socket.SOCK_DGRAM)


def _fixture_plugin(adapter: str, *fixtures: object) -> ModuleType:
    """A module holding ``fixtures``, to register as a plugin (pytest reads fixtures off it)."""
    module = ModuleType(f"{__name__}.{adapter}")
    for fixture in fixtures:
        setattr(module, str(getattr(fixture, "name", None) or fixture), fixture)
    return module


def _anyio_factory(port_factory: PortFactory, kind: socket.SocketKind) -> Any:
    """An instance of anyio's own ``FreePortFactory`` (so ``isinstance`` and ``.kind`` hold)."""
    from anyio.pytest_plugin import FreePortFactory

    protocol: Protocol = "tcp" if kind == socket.SOCK_STREAM else "udp"

    class LeasedFreePortFactory(FreePortFactory):
        def __call__(self, family: socket.AddressFamily | None = None) -> int:
            # The bind check covers IPv4 and IPv6 (a dual-stack socket), whatever the family.
            return port_factory(protocol=protocol)

    return LeasedFreePortFactory(kind)
