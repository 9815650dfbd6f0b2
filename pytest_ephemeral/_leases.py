"""Lease lifetimes in a pytest session: who asked for each lease, and when each one ends.

Rule: every lease a pytest session takes is held here, under the scope that asked for it, and ends
in one of three ways:

- a factory's leases (``PortFactory``, in ``_factory``): at ``release(port)``, else when the
  factory's leases end: the test's teardown for ``free_ports`` (and ``free_port``, ``free_socket``,
  which lease through it), the session's end for ``port_factory``;
- scoped leases (the library adapters, ``bind0``): with the scope running when they were asked
  for: the fixture being set up (at its teardown), else the test (after its teardown), else the
  session;
- whatever is left when the session is unconfigured (a run cut short).

A lease that ends while its port is still in use is a leak: an ``EphemeralPortWarning`` for the
test or fixture that leased it (or, for leases that ask so, a count in the run summary). The
plugin's hooks tell ``SessionLeases`` which test runs and which fixture is being set up; the
plugin's fixtures and the adapters lease through it and import nothing else of each other.

Only this bookkeeping loads at start-up; the factories (``_factory``) and the allocator load when a
test first leases.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Literal

import pytest

from ._errors import Advice, PortNotLeased

if TYPE_CHECKING:  # the modules of leasing load on the first lease (a run may lease nothing)
    from ._allocator import PortAllocator, Request, Stats
    from ._factory import PortFactory
    from ._holder import Holder
    from ._probe import Protocol, Targets
    from ._ranges import PortRange
    from ._settings import Settings
    from ._warnings import EphemeralPortWarning

#: What the end of a lease does when its port is still in use: warn, or only count it.
OnLeak = Literal["warn", "count"]
_MAX_REQUESTS = 64
_LeakCheck = Callable[[int, str, "Targets", "tuple[socket.SocketKind, ...]", bool], "str | None"]

ADVICE = Advice(
    lock_dir="Fix this and try again, or choose another lock dir with --ephemeral-lock-dir.",
    exhausted="Widen the range (--ephemeral-port-range), lower -n, release ports sooner, or look"
    " for leaked leases with `pytest-ephemeral status`.",
)


class Scope:
    """Who asked for a lease: the test running then, and the fixture being set up, if any."""

    __slots__ = ("fixture", "item", "request")

    def __init__(
        self,
        item: pytest.Item | None,
        fixture: pytest.FixtureDef[Any] | None = None,
        request: pytest.FixtureRequest | None = None,
    ) -> None:
        self.item = item
        self.fixture = fixture
        self.request = request  # the fixture's request, whose finalizers end its leases

    @property
    def nodeid(self) -> str | None:
        return self.item.nodeid if self.item is not None else None

    def describe(self) -> str:
        if self.fixture is not None:
            return f"fixture {self.fixture.argname!r} (set up for {self.nodeid or 'the session'})"
        return self.nodeid or "the session"

    def location(self) -> tuple[str, int]:
        """File and line a warning points at: the fixture's function, else the test's."""
        if self.fixture is not None:
            code = getattr(self.fixture.func, "__code__", None)
            if code is not None:
                return code.co_filename, code.co_firstlineno
        if self.item is not None:
            path, line, _ = self.item.location
            return str(self.item.config.rootpath / path), (line or 0) + 1
        return __file__, 1


class _Scoped:
    """A scoped lease: who asked, and what its end does with a port still in use."""

    __slots__ = ("on_leak", "scope")

    def __init__(self, scope: Scope, on_leak: OnLeak) -> None:
        self.scope = scope
        self.on_leak = on_leak


#: The requests of the fixtures being set up now, per thread (``.requests``, innermost last, of
#: every session: pytester runs sessions in-process, inside a test of another), so a fixture set
#: up in one thread never sees another thread's: see ``fixture_request``.
_setting_up = threading.local()


def fixture_request() -> pytest.FixtureRequest:
    """The request of the fixture being set up now: how the plugin's per-test fixtures find it
    without asking for the ``request`` fixture, which costs pytest (9.x) an ``inspect.signature``
    each time a test's fixture asks for it (about 76,000 instructions, three times per test:
    more than the rest of a ``free_port``'s set-up and teardown)."""
    requests: list[pytest.FixtureRequest] = getattr(_setting_up, "requests", [])
    if not requests:
        raise RuntimeError("pytest-ephemeral's fixtures are for pytest to set up")
    return requests[-1]


class SessionLeases:
    """The leases of one pytest session in one process: settings, who asked for each lease, the
    allocator, and the figures of the run summary. ``leases_of(config)`` returns it."""

    def __init__(
        self, config: pytest.Config, settings: Settings, worker: str | None, testrun: str
    ) -> None:
        self.config = config
        self.settings = settings
        #: The xdist worker (None: not under xdist) and the test run of the holder, made on the
        #: first lease: a run that leases nothing records no holder.
        self._worker = worker
        self._testrun = testrun
        self._holder: Holder | None = None
        #: Figures of the adapters (``bind0``'s binds, say), summed over xdist workers.
        self.counters: Counter[str] = Counter()
        self.leaks = 0
        self._item: pytest.Item | None = None  # the test running now
        #: The fixtures being set up now, innermost last, with the request each is set up for.
        self._fixtures: list[tuple[pytest.FixtureDef[Any], pytest.FixtureRequest]] = []
        self._scoped: dict[int, _Scoped] = {}  # live scoped leases
        self._of_test: list[int] = []  # scoped leases that end after the running test
        self._finished = False  # the session's scoped leases have ended: no more are taken
        self._ended: set[int] = set()  # released ports, to say "already released"
        self._totals: dict[str, float] = {}  # figures of xdist workers, for the summary
        self._peak = 0.0
        self._stats: Stats | None = None
        self._allocator: PortAllocator | None = None
        self._still_in_use: _LeakCheck | None = None  # loaded with the allocator
        self._request_for: Callable[..., Request] | None = None  # the same
        #: Requests for the session's range by (protocol, item): made once per test, not per
        #: lease (a bind0 lease pays for each call here: the "bind0: the recipe, leased" row of
        #: benchmarks/bench.py). Cleared when it grows to _MAX_REQUESTS.
        self._requests: dict[tuple[Protocol, pytest.Item | None], Request] = {}
        #: What ``finish`` runs at the end of the session, before the scoped leases end: the
        #: session factory's end, once ``port_factory`` has made one.
        self.at_finish: list[Callable[[], object]] = []
        self._mutex = threading.Lock()

    # --- what runs now (the plugin's hooks say) ---------------------------------------------

    def test_started(self, item: pytest.Item | None) -> None:
        """From here until ``test_started(None)``, leases asked outside fixtures are ``item``'s.

        A pair of calls from the plugin's hooks, not a context manager: these run around every
        test and fixture of the session, and a ``contextmanager`` costs several calls each."""
        self._item = item

    def fixture_started(
        self, fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
    ) -> None:
        """Until the matching ``fixture_done()``, leases asked are this fixture's, and
        ``fixture_request()`` is its request."""
        self._fixtures.append((fixturedef, request))
        try:
            _setting_up.requests.append(request)
        except AttributeError:  # this thread's first fixture
            _setting_up.requests = [request]

    def fixture_done(self) -> None:
        _setting_up.requests.pop()
        self._fixtures.pop()

    def current_scope(self) -> Scope:
        """Who asks now: the fixture being set up, else the running test, else the session."""
        # Read from other threads too (a server's) while the main thread sets up fixtures: a
        # slice of the stack, which never raises, not a test then an index, which could. (Not
        # an IndexError caught either: raising one costs more than the rest of this call, and a
        # test's own bind(0) comes here with no fixture being set up.)
        top = self._fixtures[-1:]
        if top:
            return Scope(self._item, *top[0])
        return Scope(self._item)

    # --- leasing ------------------------------------------------------------------------------

    @property
    def allocator(self) -> PortAllocator:
        if self._allocator is None:
            with self._mutex:
                if self._allocator is None:
                    from ._allocator import Stats, allocator_for, request_for  # filelock: 1st lease
                    from ._holder import this_process
                    from ._leakcheck import still_in_use

                    self._holder = this_process(self._worker, self._testrun)
                    self._request_for = request_for
                    self._still_in_use = still_in_use
                    self._stats = Stats()
                    self._allocator = allocator_for(
                        self.settings.lock_dir, self.settings.lock_dir_given
                    )
        return self._allocator

    def take(
        self, n: int, protocol: Protocol, item: pytest.Item | None, ports: PortRange | None = None
    ) -> list[int]:
        """Lease ``n`` consecutive ports of ``ports`` (default: the session's range) for ``item``
        (its holder records name it; None: the session), waiting up to the timeout; whoever calls
        this ends the leases."""
        allocator = self.allocator
        try:  # rather than ``with ADVICE``: two calls fewer on every lease
            taken = allocator.lease(self._request(protocol, item, ports), n, self._stats)
        except BaseException as error:
            ADVICE.add_to(error)
            raise
        self._ended.difference_update(taken)
        return taken

    def lease(
        self,
        protocol: Protocol,
        *,
        ports: PortRange | None = None,
        exclude: frozenset[int] = frozenset(),
        scope: Scope | None = None,
        on_leak: OnLeak = "warn",
    ) -> int:
        """Lease one port of ``ports`` (default: the range), not in ``exclude``, for ``scope``
        (default: whoever asks now); it ends with that scope, or at ``end(port)``."""
        scope = scope or self.current_scope()
        rejected: list[int] = []  # kept until a good one comes, so the search moves past them
        try:
            while True:
                port = self.take(1, protocol, scope.item, ports)[0]
                if port not in exclude:
                    break
                rejected.append(port)
        finally:
            for unwanted in rejected:
                self.allocator.release(unwanted)
        self._hold_for(port, scope, on_leak)
        return port

    def try_lease(
        self,
        protocol: Protocol,
        *,
        max_tries: int,
        on_leak: OnLeak = "count",
        scope: Scope | None = None,
    ) -> int | None:
        """Lease one port now, for ``scope`` (default: whoever asks now), or None: it never
        waits and tries at most ``max_tries`` candidates. It ends as a ``lease()`` does; once the
        session's leases have ended, there is none (nothing would end it)."""
        if self._finished:
            return None
        scope = scope or self.current_scope()
        allocator = self._allocator or self.allocator
        # The request cache read here, not through _request: this runs on every bind(0).
        request = self._requests.get((protocol, scope.item)) or self._request(protocol, scope.item)
        port = allocator.try_lease(request, max_tries, self._stats)
        if port is None:
            return None
        self._ended.discard(port)
        self._hold_for(port, scope, on_leak)
        return port

    def _request(
        self, protocol: Protocol, item: pytest.Item | None, ports: PortRange | None = None
    ) -> Request:
        """The request for a lease of ``ports`` (default: the range) for ``item``. Cached by the
        item itself, not its nodeid: pytest 9 builds a nodeid's string on every read."""
        assert self._request_for is not None  # set with the allocator
        assert self._holder is not None  # the same
        if ports is not None:  # an adapter's own range: rare, not cached
            label = None if item is None else item.nodeid
            settings = self.settings._replace(ports=ports)
            return self._request_for(settings, protocol, self._holder, label)
        key = (protocol, item)
        request = self._requests.get(key)
        if request is None:
            label = None if item is None else item.nodeid
            if len(self._requests) >= _MAX_REQUESTS:
                self._requests.clear()
            request = self._requests[key] = self._request_for(
                self.settings, protocol, self._holder, label
            )
        return request

    def _hold_for(self, port: int, scope: Scope, on_leak: OnLeak) -> None:
        with self._mutex:
            self._scoped[port] = _Scoped(scope, on_leak)
            if scope.request is not None:
                # Registered while the fixture runs, before pytest registers the teardown of a
                # yield fixture: finalizers run last-in first-out, so the port outlives the server.
                scope.request.addfinalizer(lambda: self._end_scoped(port, stacklevel=2))
            elif scope.item is not None:
                self._of_test.append(port)

    def give_back(self, port: int) -> None:
        """End a scoped lease now, with no leak check: the port was never used (the bind to it
        failed), so whatever is on it is somebody else's."""
        with self._mutex:
            scoped = self._scoped.pop(port, None)
            if port in self._of_test:
                self._of_test.remove(port)
        if scoped is not None:
            self.allocator.release(port)
            self._ended.add(port)

    def holds(self, port: int) -> bool:
        """Whether ``port`` is a scoped lease of this session that has not ended."""
        return port in self._scoped

    def end(self, port: int) -> bool:
        """End a scoped lease now (``portpicker.return_port``, a failed bind); False if ``port``
        is not one."""
        if port not in self._scoped:
            return False
        self._end_scoped(port, stacklevel=3)
        return True

    def end_test(self, item: pytest.Item) -> None:
        """End the scoped leases of the test that has just been torn down."""
        with self._mutex:
            ports, self._of_test = self._of_test, []
        for port in ports:
            warning = self._end_one_scoped(port)
            if warning is not None:
                item.warn(warning)

    def end_scoped_leases(self) -> None:
        """Release the scoped leases left (asked outside tests and fixtures), without a leak
        check: a server started at collection may rightly still be stopping."""
        with self._mutex:
            self._finished = True
            left, self._scoped = self._scoped, {}
        for port in left:
            with contextlib.suppress(PortNotLeased):  # released already
                self.allocator.release(port)

    def _end_scoped(self, port: int, stacklevel: int) -> None:
        warning = self._end_one_scoped(port)
        if warning is not None:
            warnings.warn(warning, stacklevel=stacklevel + 1)

    def _end_one_scoped(self, port: int) -> EphemeralPortWarning | None:
        with self._mutex:
            scoped = self._scoped.pop(port, None)
            if port in self._of_test:
                self._of_test.remove(port)
        if scoped is None:
            return None  # ended already (return_port, say)
        return self.end_lease(port, scoped.scope, scoped.on_leak)

    def end_lease(
        self, port: int, scope: Scope, on_leak: OnLeak = "warn"
    ) -> EphemeralPortWarning | None:
        """Release ``port``; if the test left something using it, return the warning to emit
        (or count it, when ``on_leak`` says so).

        Checked while the lease is still held, so whatever uses the port is the test's own, and
        released whatever happens, so a warning made an error (-W error) cannot keep the lease.
        """
        from ._probe import bind_targets  # loaded with the allocator, the first lease
        from ._warnings import EphemeralPortWarning

        allocator, host = self.allocator, self.settings.host
        try:
            assert self._still_in_use is not None  # set with the allocator
            kinds = allocator.lease_of(port).request.kinds
            # A leak only counted is not worth the grace wait: it would cost a test that leaves
            # its sockets open (as suites may) that wait for each of them.
            use = self._still_in_use(port, host, bind_targets(host), kinds, on_leak == "warn")
        finally:
            allocator.release(port)
            self._ended.add(port)
        if use is None:
            return None
        if on_leak == "count":
            self.counters["still_open"] += 1
            return None
        self.leaks += 1
        return EphemeralPortWarning(
            f"port {port}, leased by {scope.describe()}, is still {use} after its lease ended:"
            " stop the server and close its sockets before the test ends"
        )

    def was_released(self, port: int) -> bool:
        return port in self._ended

    # --- the end of the session ----------------------------------------------------------------

    def report_late(self, leaks: list[tuple[Scope, EphemeralPortWarning]]) -> None:
        """Leaks found at the end of the session, reported under the test or fixture that leased
        the port (not the last test to run, which did nothing wrong, and which they cannot fail)."""
        from ._warnings import EphemeralPortWarning  # only after leases: loaded by end_lease

        for scope, warning in leaks:
            filename, line = scope.location()
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
            self.config.hook.pytest_warning_recorded.call_historic(
                kwargs={
                    "warning_message": shown[0],
                    "when": "runtest",
                    "nodeid": scope.nodeid or "",
                    "location": (filename, line, scope.describe()),
                }
            )

    # --- figures ---------------------------------------------------------------------------------

    def figures(self) -> dict[str, float]:
        """This process's figures for the run summary (all zero if it leased nothing)."""
        stats = asdict(self._stats) if self._stats else {}
        return {**stats, "leaks": self.leaks, **self.counters}

    def add_figures(self, figures: dict[str, float]) -> None:
        """Add a process's figures (an xdist worker's, or this one's) to the run's totals."""
        for key, value in figures.items():
            if key == "peak":
                self._peak = max(self._peak, value)
            else:
                self._totals[key] = self._totals.get(key, 0) + value

    def totals(self) -> dict[str, float]:
        return {**self._totals, "peak": self._peak}


# --- the session, kept on the config ------------------------------------------------------------

_LEASES = pytest.StashKey[SessionLeases]()
#: The running test's factory (``free_ports``), kept on the test until it ends; ``_factory`` makes
#: it, on the test's first lease.
TEST_FACTORY: pytest.StashKey[PortFactory] = pytest.StashKey()


def start(
    config: pytest.Config, settings: Settings, worker: str | None, testrun: str
) -> SessionLeases:
    """Begin the session's leases (from ``pytest_configure``); ``worker`` is xdist's id of this
    process (None: not a worker), ``testrun`` the run's (xdist's, or one of the run's own)."""
    leases = config.stash[_LEASES] = SessionLeases(config, settings, worker, testrun)
    return leases


def leases_of(config: pytest.Config) -> SessionLeases:
    """The session's leases; ``KeyError`` before ``pytest_configure`` has run."""
    return config.stash[_LEASES]


def started(config: pytest.Config) -> bool:
    return _LEASES in config.stash


def finish(config: pytest.Config) -> None:
    """End every lease left when the session is unconfigured (a session cut short)."""
    if _LEASES in config.stash:
        leases = config.stash[_LEASES]
        try:
            for end in leases.at_finish:  # the session's factory, if a test asked for it
                end()
        finally:
            leases.end_scoped_leases()


def test_finished(item: pytest.Item) -> None:
    """The test and its fixtures are torn down: end its scoped leases, forget its factory."""
    leases_of(item.config).end_test(item)
    if TEST_FACTORY in item.stash:  # its leases have ended with the test's fixtures
        del item.stash[TEST_FACTORY]
