"""The fixtures in real pytest sessions: with and without xdist, on real sockets and locks."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_ephemeral import PortsExhausted
from pytest_ephemeral._probe import ipv6_available

from .conftest import Holder, MakeRange
from .helpers import assert_no_shared_overlap, bind_fails, hold_tests, read_holds, run_inline

NEEDS_IPV6 = pytest.mark.skipif(not ipv6_available(), reason="IPv6 is off on this machine")
XDIST_MODES = [["-n", "4"], ["-n", "2"], ["-p", "no:xdist"]]


@pytest.fixture
def holds_file(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = pytester.path / "holds.txt"
    monkeypatch.setenv("HOLDS_FILE", str(path))
    return path


@pytest.mark.parametrize("mode", XDIST_MODES, ids=" ".join)
def test_concurrent_holds_never_share_a_port(
    pytester: pytest.Pytester, holds_file: Path, private_range: MakeRange, mode: list[str]
) -> None:
    """Eight ports for up to four workers: without the locks, holds would overlap."""
    private = private_range(8)
    pytester.makepyfile(hold_tests(120))
    result = run_inline(pytester, *mode, *private.args)
    result.assert_outcomes(passed=120)
    holds = read_holds(holds_file)
    assert len(holds) == 120
    assert_no_shared_overlap(holds)


def test_a_narrow_range_is_shared_in_turn_under_xdist(
    pytester: pytest.Pytester, holds_file: Path, private_range: MakeRange
) -> None:
    """Six ports for 120 tests on 4 workers: ports are reused, never at the same time."""
    private = private_range(6)
    pytester.makepyfile(hold_tests(120))
    result = run_inline(pytester, "-n", "4", *private.args)
    result.assert_outcomes(passed=120)
    holds = read_holds(holds_file)
    assert {port for port, _, _ in holds} <= set(private.ports)
    assert len({port for port, _, _ in holds}) > 1
    assert_no_shared_overlap(holds)


def _lease_all_tests(n: int, protocol: str = "tcp") -> str:
    return textwrap.dedent(
        f"""
        from __future__ import annotations
        import os


        def test_lease_all(port_factory) -> None:
            ports = [port_factory(protocol={protocol!r}) for _ in range({n})]
            with open(os.environ["HOLDS_FILE"], "w") as out:
                out.write(" ".join(map(str, ports)))
        """
    )


def _bound(
    family: socket.AddressFamily, kind: socket.SocketKind, host: str, port: int
) -> socket.socket:
    sock = socket.socket(family, kind)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


@pytest.mark.parametrize(
    ("family", "kind", "host", "protocol"),
    [
        (socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", "tcp"),
        pytest.param(socket.AF_INET6, socket.SOCK_STREAM, "::1", "tcp", marks=NEEDS_IPV6),
        (socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", "udp"),
        (socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", "both"),
        (socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", "both"),
    ],
    ids=["ipv4-tcp", "ipv6-tcp", "udp", "udp-both", "tcp-both"],
)
def test_a_port_bound_by_another_program_is_never_leased(
    pytester: pytest.Pytester,
    holds_file: Path,
    private_range: MakeRange,
    family: socket.AddressFamily,
    kind: socket.SocketKind,
    host: str,
    protocol: str,
) -> None:
    private = private_range(3)
    taken = private.ports[1]
    pytester.makepyfile(_lease_all_tests(2, protocol))
    with _bound(family, kind, host, taken):
        result = run_inline(pytester, "-p", "no:xdist", *private.args)
    result.assert_outcomes(passed=1)
    assert sorted(map(int, holds_file.read_text().split())) == [private.ports[0], private.ports[2]]


def test_tcp_and_udp_are_separate_port_spaces(
    pytester: pytest.Pytester, holds_file: Path, private_range: MakeRange
) -> None:
    """A UDP holder does not keep a port from a TCP lease (the probe checks what was asked)."""
    private = private_range(1)
    pytester.makepyfile(_lease_all_tests(1, "tcp"))
    with _bound(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", private.ports[0]):
        result = run_inline(pytester, "-p", "no:xdist", *private.args)
    result.assert_outcomes(passed=1)
    assert holds_file.read_text() == str(private.ports[0])


def _time_wait_on(port: int) -> None:
    """Leave ``port`` in TIME_WAIT: the server side closes its connection first."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # active close on the server's side: its port goes to TIME_WAIT
        assert client.recv(1) == b""
        client.close()


def test_a_port_in_time_wait_is_never_leased(
    pytester: pytest.Pytester, holds_file: Path, private_range: MakeRange
) -> None:
    private = private_range(3)
    waiting = private.ports[0]
    _time_wait_on(waiting)
    assert bind_fails(waiting), "precondition: the port is in TIME_WAIT"
    pytester.makepyfile(_lease_all_tests(2))
    result = run_inline(pytester, "-p", "no:xdist", *private.args)
    result.assert_outcomes(passed=1)
    assert sorted(map(int, holds_file.read_text().split())) == private.ports[1:]


def test_leases_of_a_killed_process_vanish_with_it(
    pytester: pytest.Pytester,
    holds_file: Path,
    holder_process: Holder,
) -> None:
    process, private = holder_process
    with pytest.raises(PortsExhausted, match="3 locked by other processes"):
        private.leaser().lease()
    process.kill()  # SIGKILL on POSIX, TerminateProcess on Windows: no cleanup either way
    assert process.wait(timeout=30) != 0
    pytester.makepyfile(_lease_all_tests(3))
    result = run_inline(pytester, "-p", "no:xdist", *private.args)
    result.assert_outcomes(passed=1)
    assert sorted(map(int, holds_file.read_text().split())) == private.ports


def test_exhaustion_waits_for_the_timeout_then_names_the_range(
    pytester: pytest.Pytester, holder_process: Holder
) -> None:
    _, private = holder_process
    pytester.makepyfile(
        """
        import time
        import pytest

        @pytest.fixture
        def timed(request):
            started = time.monotonic()
            try:
                yield request.getfixturevalue("free_port")
            finally:
                waited = time.monotonic() - started
                assert 0.5 <= waited < 30, waited  # it waited the timeout, and then it stopped
                print(f"waited {waited:.2f} s")

        def test_one(timed): pass
        """
    )
    result = run_inline(pytester, "-p", "no:xdist", "-s", *private.args, "--ephemeral-timeout=0.5")
    result.assert_outcomes(errors=1)
    # The bound itself is the fixture's assertion: 0.5 s at least, and it stops (a loaded machine
    # may take over a second to notice, so the printed figure is not matched further).
    result.stdout.fnmatch_lines(["*waited * s"])
    result.stdout.fnmatch_lines(
        [
            f"*PortsExhausted: no free port in {private.spec} (3 ports) within 0.5 s:"
            " 3 locked by other processes, 0 bound by other programs or in TIME_WAIT,"
            " 0 held by this process.",
            "*Widen the range (--ephemeral-port-range)*",
        ]
    )


def test_exhaustion_by_this_process_fails_at_once(
    pytester: pytest.Pytester, private_range: MakeRange
) -> None:
    private = private_range(2)
    pytester.makepyfile(
        """
        import time
        import pytest
        from pytest_ephemeral import PortsExhausted

        def test_third(port_factory):
            port_factory.block(2)
            started = time.monotonic()
            with pytest.raises(PortsExhausted, match="no free port .* now: .* 2 held by this"):
                port_factory()
            assert time.monotonic() - started < 5  # the timeout is 60 s: no waiting happened
        """
    )
    result = run_inline(pytester, "-p", "no:xdist", *private.args, "--ephemeral-timeout=60")
    result.assert_outcomes(passed=1)


def test_port_factory_api(pytester: pytest.Pytester, private_range: MakeRange) -> None:
    private = private_range(6)
    low = private.ports[0]
    pytester.makepyfile(
        f"""
        import pytest
        from pytest_ephemeral import PortNotLeased

        def test_factory(port_factory):
            block = port_factory.block(3, protocol="both")
            assert block == list(range(block[0], block[0] + 3))
            single = port_factory(protocol="udp")
            assert single not in block
            port_factory.release(block[1])
            with pytest.raises(PortNotLeased, match=f"^port {{block[1]}} was already released$"):
                port_factory.release(block[1])
            with pytest.raises(ValueError, match="longest run in {private.spec} is 6"):
                port_factory.block(7)
            with pytest.raises(ValueError, match="at least one port"):
                port_factory.block(0)
            with pytest.raises(ValueError, match="protocol must be"):
                port_factory(protocol="sctp")

        def test_free_port_is_not_the_factorys(free_port, port_factory):
            assert {low} <= free_port <= {low + 5}
            with pytest.raises(PortNotLeased, match="not leased by this factory") as caught:
                port_factory.release(free_port)
            assert isinstance(caught.value, ValueError)
        """
    )
    result = run_inline(pytester, "-p", "no:xdist", *private.args)
    result.assert_outcomes(passed=2)


def test_free_port_is_released_after_the_fixtures_using_it(
    pytester: pytest.Pytester, private_range: MakeRange
) -> None:
    private = private_range(1)
    pytester.makepyfile(
        """
        import socket
        import pytest

        @pytest.fixture
        def server(free_port):
            sock = socket.socket()
            sock.bind(("127.0.0.1", free_port))
            yield sock
            sock.close()

        @pytest.mark.parametrize("i", range(3))
        def test_each_gets_the_only_port(server, i):
            assert server.getsockname()[1] > 0
        """
    )
    result = run_inline(pytester, "-p", "no:xdist", *private.args)
    result.assert_outcomes(passed=3, warnings=0)  # the socket was closed before the leak check


def test_the_per_test_fixtures_ask_pytest_for_no_request_and_work_from_other_fixtures(
    pytester: pytest.Pytester, private_range: MakeRange
) -> None:
    """Asking for ``request`` costs pytest an ``inspect.signature`` each time, more than the rest
    of a lease: the fixtures find their request from the plugin's hook instead, wherever pytest
    sets them up (for a test, for another fixture, through ``getfixturevalue``)."""
    private = private_range(8)
    pytester.makeconftest(
        """
        def pytest_collection_modifyitems(items):
            for item in items:
                if item.name != "test_dynamic":  # which asks for it itself
                    assert "request" not in item.fixturenames, item.fixturenames
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def pair(free_port, free_socket):
            return free_port, free_socket.getsockname()[1]

        def test_direct(free_port, free_ports, free_socket):
            assert free_port != free_socket.getsockname()[1]
            assert free_ports() not in (free_port, free_socket.getsockname()[1])

        def test_through_a_fixture(pair):
            assert pair[0] != pair[1]
        """
    )
    pytester.makepyfile(
        test_dynamic="""
        def test_dynamic(request):
            assert request.getfixturevalue("free_port") > 0
        """
    )
    result = run_inline(pytester, "-p", "no:xdist", *private.args)
    result.assert_outcomes(passed=3, warnings=0)


def test_report_header_and_fixture_docs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = run_inline(pytester, "-p", "no:xdist", "--fixtures")
    result.stdout.fnmatch_lines(
        [
            "ephemeral ports: 61000-64999 (4000 ports; set by environment variable"
            " PYTEST_EPHEMERAL_PORT_RANGE), lock dir: *",
            "port_factory [[]session scope[]]*",
            "*Session-scoped factory of leased ports*",
            '*``.socket(protocol="tcp")`` a socket bound to a leased port*',
            "free_ports*",
            "*Factory of ports leased for this test alone*",
            '*``.block(n)`` n consecutive ports, ``.socket(protocol="tcp")``*',
            "free_port*",
            "*A TCP port leased for this test alone*",
            "free_socket*",
            "*A TCP socket already bound to a port leased for this test*",
        ]
    )


#: The package's modules a run that leases no port never needs: they load on the first lease, bind
#: check or warning (benchmarks/bench.py's start-up figure pays for every module loaded).
LEASING_MODULES = (
    "_allocator",
    "_factory",
    "_holder",
    "_leakcheck",
    "_lockdir",
    "_lockfile",
    "_probe",
    "_search",
    "_warnings",
)


def test_a_run_that_leases_nothing_loads_none_of_the_leasing_code(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTEST_EPHEMERAL_PORT_RANGE")  # a given range is bind-checked (_probe)
    pytester.makepyfile(
        f"""
        import sys

        def test_nothing():
            names = {LEASING_MODULES!r}
            assert [name for name in names if "pytest_ephemeral." + name in sys.modules] == []
            assert "filelock" not in sys.modules
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["ephemeral ports: *", "ephemeral adapters: *bind0*"])


def test_auto_avoids_the_range_the_kernel_auto_assigns(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    monkeypatch.delenv("PYTEST_EPHEMERAL_PORT_RANGE")
    pytester.makepyfile("def test_nothing(): pass")
    result = run_inline(pytester, "-p", "no:xdist")
    header = next(line for line in result.outlines if line.startswith("ephemeral ports: "))
    spans = header.split()[2].split(",")
    for span in spans:
        first, _, last = span.partition("-")
        ports = range(int(first), int(last or first) + 1)
        assert ports[0] >= 49152
        assert ports[-1] <= 65535
        assert not set(ports) & set(range(low, high + 1))
    assert f"OS auto-assign {low}-{high} (/proc/sys/net/ipv4/ip_local_port_range)" in header


def test_plugin_can_be_disabled(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_port(free_port): pass")
    result = run_inline(pytester, "-p", "no:ephemeral", "-p", "no:xdist")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'free_port' not found*"])
    assert "ephemeral ports:" not in result.stdout.str()


# --- Where leak warnings land, and the per-test factory -------------------------------------

LEAKY_SESSION = """
import socket
import pytest

KEEP = []


@pytest.fixture(scope="session", autouse=True)
def close_at_the_very_end():  # set up first, so torn down after port_factory's leak check
    yield
    for sock in KEEP:
        sock.close()


def leak_udp(port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    KEEP.append(sock)  # left bound until the session ends


@pytest.fixture(scope="session")
def cluster(port_factory):
    leak_udp(port_factory(protocol="udp"))


def test_leaky(port_factory):
    leak_udp(port_factory(protocol="udp"))


def test_uses_the_cluster(cluster):
    pass


def test_innocent():
    pass
"""


@pytest.mark.parametrize("mode", [["-p", "no:xdist"], ["-n", "2"]], ids=" ".join)
def test_session_end_leaks_land_on_who_leased_never_on_an_innocent_test(
    pytester: pytest.Pytester, mode: list[str]
) -> None:
    pytester.makepyfile(test_leaks=LEAKY_SESSION)
    result = run_inline(pytester, *mode, "-v", "-W", "error::pytest_ephemeral.EphemeralPortWarning")
    result.assert_outcomes(passed=3, warnings=2)  # no test failed, though warnings are errors
    out = result.stdout.str()
    summary = out[out.index("warnings summary") :]
    assert "test_innocent" not in summary
    result.stdout.fnmatch_lines(
        [
            "test_leaks.py::test_leaky",
            "*EphemeralPortWarning: port *, leased by test_leaks.py::test_leaky, is still bound"
            " (UDP) after its lease ended*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "test_leaks.py::test_uses_the_cluster",
            "*EphemeralPortWarning: port *, leased by fixture 'cluster' (set up for"
            " test_leaks.py::test_uses_the_cluster), is still bound (UDP)*",
        ]
    )
    result.stdout.fnmatch_lines(["ephemeral ports: * 2 leak warnings"])


SLOW_TO_STOP = """
import socket
import threading
import time
import pytest


@pytest.fixture
def server(free_port):
    listener = socket.create_server(("127.0.0.1", free_port))

    def stop_a_moment_later():  # what pytest-localserver's stop() leaves behind
        time.sleep(0.005)
        listener.close()

    yield free_port
    threading.Thread(target=stop_a_moment_later).start()


LEFT_OPEN = []


def teardown_module():
    for sock in LEFT_OPEN:
        sock.close()


@pytest.fixture
def leaked(free_port):
    listener = socket.create_server(("127.0.0.1", free_port))
    LEFT_OPEN.append(listener)
    yield listener
    # not closed before the lease ends (only at the end of the module): a real leak


@pytest.mark.parametrize("i", range(20))
def test_stopping(server, i):
    pass


def test_really_leaks(leaked):
    pass
"""


def test_a_listener_already_closing_is_not_called_a_leak(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(SLOW_TO_STOP)
    result = run_inline(pytester, "-p", "no:xdist")
    result.assert_outcomes(passed=21, warnings=1)
    result.stdout.fnmatch_lines(["*port *, leased by *test_really_leaks, is still listening*"])


def test_free_ports_leases_for_one_test(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                        private_range: MakeRange) -> None:  # fmt: skip
    private = private_range(6)
    monkeypatch.setenv("LOCK_DIR", str(private.lock_dir))
    pytester.makepyfile(
        """
        import os
        import socket
        import pytest
        from pytest_ephemeral import PortFactory
        from pytest_ephemeral._lockfile import read_live_record

        HELD = []
        LEFT_OPEN = []

        def teardown_module():
            for sock in LEFT_OPEN:
                sock.close()

        @pytest.fixture
        def released_after():  # set up first, so torn down after free_ports
            yield
            for port in HELD:
                assert read_live_record(os.environ["LOCK_DIR"], port) is None, port

        def test_ports(released_after, free_ports: PortFactory, request):
            block = free_ports.block(2)
            assert block[1] == block[0] + 1
            udp = free_ports(protocol="udp")
            sock = free_ports.socket(protocol="udp")
            HELD.extend([*block, udp, sock.getsockname()[1]])
            for port in HELD:
                record = read_live_record(os.environ["LOCK_DIR"], port)
                assert record["nodeid"] == request.node.nodeid
            free_ports.release(block[0])
            assert read_live_record(os.environ["LOCK_DIR"], block[0]) is None
            with pytest.raises(ValueError, match=f"port {block[0]} was already released"):
                free_ports.release(block[0])

        def test_free_port_and_free_socket_share_the_tests_free_ports(
            free_port, free_socket, free_ports
        ):
            port = free_socket.getsockname()[1]
            free_ports.release(free_port)  # one factory: each lease can be ended through it
            free_ports.release(port)
            assert free_socket.fileno() == -1  # closed with its lease
            for ended in (free_port, port):
                assert read_live_record(os.environ["LOCK_DIR"], ended) is None

        def test_leaks_are_this_tests(free_ports):
            leftover = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            leftover.bind(("127.0.0.1", free_ports(protocol="udp")))
            LEFT_OPEN.append(leftover)

        @pytest.fixture
        def listening(free_port):
            with socket.socket() as server:
                server.bind(("127.0.0.1", free_port))
                server.listen()
                yield free_port

        def test_free_port_outlives_free_ports_for_the_fixtures_using_it(listening, free_ports):
            # free_ports is set up after `listening`, so torn down before it: free_port's lease,
            # its server still listening, must be left to free_port's own teardown (no warning)
            assert free_ports() != listening

        @pytest.fixture
        def make_server(free_ports):
            servers = []

            def make(port):
                server = socket.socket()
                server.bind(("127.0.0.1", port))
                server.listen()
                servers.append(server)

            yield make
            for server in servers:
                server.close()

        def test_free_port_outlives_the_fixtures_using_free_ports(make_server, free_port):
            # make_server is torn down after free_port, and stops the server it made on it: the
            # lease must outlive it (no warning), as it outlives every fixture using free_ports
            make_server(free_port)
        """
    )
    result = run_inline(pytester, "-p", "no:xdist", *private.args)
    result.assert_outcomes(passed=5, warnings=1)
    result.stdout.fnmatch_lines(
        ["*::test_leaks_are_this_tests", "*leased by *::test_leaks_are_this_tests, is still bound*"]
    )


def test_a_conftest_may_choose_the_settings_in_its_pytest_configure(
    pytester: pytest.Pytester, private_range: MakeRange, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = private_range(2)
    for name in ("PYTEST_EPHEMERAL_PORT_RANGE", "PYTEST_EPHEMERAL_LOCK_DIR"):
        monkeypatch.setenv(name, os.environ[name])  # restored after the inner run's conftest
    pytester.makeconftest(
        f"""
        import os

        def pytest_configure(config):
            os.environ["PYTEST_EPHEMERAL_PORT_RANGE"] = "{private.spec}"
            os.environ["PYTEST_EPHEMERAL_LOCK_DIR"] = "{private.lock_dir}"
        """
    )
    pytester.makepyfile(
        f"""
        def test_port(free_port):
            assert free_port in {private.ports}
        """
    )
    result = run_inline(pytester, "-p", "no:xdist")
    result.assert_outcomes(passed=1)


def test_bad_arguments_get_one_clear_sentence(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from pytest_ephemeral import ConfigError, ConfigTypeError, EphemeralError

        @pytest.mark.parametrize(
            ("call", "error", "message"),
            [
                (lambda f: f(protocol="sctp"), ConfigError, "protocol must be 'tcp', 'udp' or"),
                (lambda f: f(protocol="TCP"), ConfigError, "not 'TCP'"),
                (lambda f: f.block(2.0), ConfigTypeError, "must be an int, not float"),
                (lambda f: f.block("3"), ConfigTypeError, "must be an int, not str"),
                (lambda f: f.block(0), ConfigError, "at least one port, not 0"),
                (lambda f: f.socket(protocol="both"), ConfigError, "'tcp' or 'udp', not 'both'"),
            ],
        )
        def test_bad(free_ports, call, error, message):
            with pytest.raises(error, match=message) as caught:
                call(free_ports)
            assert "\\n" not in str(caught.value)
            assert isinstance(caught.value, EphemeralError)
            assert isinstance(caught.value, ValueError) == (error is ConfigError)
            assert isinstance(caught.value, TypeError) == (error is ConfigTypeError)
        """
    )
    result = run_inline(pytester, "-p", "no:xdist")
    result.assert_outcomes(passed=6)


def test_session_end_leaks_follow_the_warning_filters(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_leaks=LEAKY_SESSION)
    result = run_inline(
        pytester, "-p", "no:xdist", "-v", "-W", "ignore::pytest_ephemeral.EphemeralPortWarning"
    )
    result.assert_outcomes(passed=3, warnings=0)
    result.stdout.fnmatch_lines(["ephemeral ports: * 0 leak warnings"])
