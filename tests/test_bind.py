"""The bind0 adapter and the audit: binds of real sockets in real pytest sessions, in every process
of the run; the fallbacks that keep every bind working; fixed ports found."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import INNER_RANGE, Holder, MakeRange
from .helpers import HOLD, assert_no_shared_overlap, read_holds

LOW, HIGH = map(int, INNER_RANGE.split("-"))
XDIST_MODES = [["-n", "2"], ["-n", "4"], ["-p", "no:xdist"]]

#: A conftest with the home-made recipe most suites carry: bind port 0, read it, close, return it.
RECIPE_CONFTEST = """
import socket

import pytest


def recipe_port(kind=socket.SOCK_STREAM, host="127.0.0.1"):
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@pytest.fixture
def port():
    return recipe_port()
"""


def summary(output: str) -> tuple[int, int, int]:
    """Binds leased, binds left to the OS, sockets still open: from the run's summary line."""
    found = re.search(
        r"ephemeral bind\(0\): (\d+) binds leased, (\d+) left to the OS; (\d+) sockets? still open",
        output,
    )
    assert found, output
    leased, left, still_open = map(int, found.groups())
    return leased, left, still_open


def in_range(port: int, low: int = LOW, high: int = HIGH) -> bool:
    return low <= port <= high


@pytest.fixture
def holds_file(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = pytester.path / "holds.txt"
    monkeypatch.setenv("HOLDS_FILE", str(path))
    return path


@pytest.fixture
def recipe_suite(pytester: pytest.Pytester, holds_file: Path) -> Path:
    """40 tests, each holding the recipe's port with a real listener (no SO_REUSEADDR)."""
    pytester.makeconftest(RECIPE_CONFTEST)
    pytester.makepyfile(
        HOLD
        + textwrap.dedent(
            """
            import pytest


            @pytest.mark.parametrize("i", range(40))
            def test_hold(port, i):
                hold(port)
            """
        )
    )
    return holds_file


# --- recipes get leased ports -------------------------------------------------------------------


@pytest.mark.parametrize("mode", XDIST_MODES, ids=" ".join)
def test_recipe_ports_are_leased_in_every_process(
    pytester: pytest.Pytester, recipe_suite: Path, mode: list[str]
) -> None:
    result = pytester.runpytest_subprocess(*mode, "-v", timeout=300)
    result.assert_outcomes(passed=40)
    holds = read_holds(recipe_suite)
    assert len(holds) == 40
    assert all(in_range(port) for port, _, _ in holds)  # the plugin's range, not the kernel's
    assert_no_shared_overlap(holds)
    assert summary(result.stdout.str())[:2] == (40, 0)


def test_concurrent_runs_never_share_a_recipe_port(
    pytester: pytest.Pytester, recipe_suite: Path
) -> None:
    """Two -n 2 runs at once, on a range of 24 ports: 3 per worker at most (an eighth of the
    range), and without the locks the recipe's ports would come from the kernel, unchecked."""
    ports = "61000-61023"  # inside the inner runs' band; a lock dir of the runs' own
    lock_dir = pytester.path / "locks"
    lock_dir.mkdir(mode=0o700)
    command = [sys.executable, "-m", "pytest", "-n", "2", "-v", "-p", "no:cacheprovider"]
    command += [f"--ephemeral-port-range={ports}", f"--ephemeral-lock-dir={lock_dir}"]
    runs = [
        subprocess.Popen(command, cwd=pytester.path, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    holds = read_holds(recipe_suite)
    assert len(holds) == 80
    assert_no_shared_overlap(holds)
    leased = sum(summary(output)[0] for output in outputs)
    assert leased > 0
    assert sum(in_range(port, 61000, 61023) for port, _, _ in holds) == leased


def test_servers_on_port_0_listen_on_leased_ports(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio
        import http.server
        import socket
        import ssl
        import threading
        import urllib.request

        LOW, HIGH = map(int, "RANGE".split("-"))


        def test_http_server():
            server = http.server.ThreadingHTTPServer(
                ("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler
            )
            with server:
                port = server.server_address[1]
                assert LOW <= port <= HIGH
                thread = threading.Thread(target=server.serve_forever)
                thread.start()
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/") as reply:
                        assert reply.status == 200
                finally:
                    server.shutdown()
                    thread.join()


        def test_asyncio_create_server():
            async def main():
                server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
                async with server:
                    return [s.getsockname()[1] for s in server.sockets]

            ports = asyncio.run(main())
            assert ports and all(LOW <= port <= HIGH for port in ports)


        def test_udp_and_ipv6_tuple_kept():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.bind(("127.0.0.1", 0))
                assert LOW <= udp.getsockname()[1] <= HIGH
            if socket.has_ipv6:
                try:
                    six = socket.socket(socket.AF_INET6)
                    six.bind(("::1", 0, 0, 0))
                except OSError:
                    return  # no IPv6 loopback here
                with six:
                    host, port, flowinfo, scope = six.getsockname()
                    assert (host, flowinfo, scope) == ("::1", 0, 0)
                    assert LOW <= port <= HIGH


        def test_ssl_socket():
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            with context.wrap_socket(socket.socket(), server_side=True,
                                     do_handshake_on_connect=False) as sock:
                sock.bind(("127.0.0.1", 0))
                assert LOW <= sock.getsockname()[1] <= HIGH
        """.replace("RANGE", INNER_RANGE)
    )
    result = pytester.runpytest_subprocess("-v", "-p", "no:xdist")
    result.assert_outcomes(passed=4)
    assert summary(result.stdout.str())[0] >= 4


def test_untouched_binds(pytester: pytest.Pytester, private_range: MakeRange) -> None:
    """AF_UNIX, socketpair(), a nonzero port and a raw _socket bind are as they were."""
    fixed = private_range(1).ports[0]
    pytester.makepyfile(
        f"""
        import _socket
        import socket


        def test_unix(tmp_path):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind(str(tmp_path / "s"))
                assert sock.getsockname() == str(tmp_path / "s")
            first, second = socket.socketpair()
            with first, second:
                first.sendall(b"x")
                assert second.recv(1) == b"x"


        def test_nonzero():
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", {fixed}))
                assert sock.getsockname()[1] == {fixed}


        def test_c_base():
            sock = _socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("127.0.0.1", 0))
            finally:
                sock.close()
        """
    )
    result = pytester.runpytest_subprocess("-v", "-p", "no:xdist")
    result.assert_outcomes(passed=3)
    assert summary(result.stdout.str())[:2] == (0, 0)


def test_adopt_without_bind0_leaves_bind_alone(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(RECIPE_CONFTEST)
    pytester.makepyfile(
        """
        import socket


        def test_recipe(port):
            assert "bind" not in vars(socket.socket)  # the class's own, from the C base
        """
    )
    result = pytester.runpytest_subprocess("--ephemeral-adopt=anyio", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["ephemeral adapters: anyio"])
    assert "ephemeral bind(0)" not in result.stdout.str()


def test_header_names_bind0(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest_subprocess("--ephemeral-adopt=bind0,aiohttp")
    result.stdout.fnmatch_lines(["ephemeral adapters: aiohttp, bind0"])


def test_sessions_nest(pytester: pytest.Pytester, private_range: MakeRange) -> None:
    """An in-process inner session leases from its own range; ending it brings the outer
    session's bind back."""
    private = private_range(16)
    before = socket.socket.bind
    pytester.makeconftest(RECIPE_CONFTEST)
    pytester.makepyfile(
        f"""
        def test_inner(port):
            assert {private.ports[0]} <= port <= {private.ports[-1]}
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:xdist", *private.args)
    result.assert_outcomes(passed=1)
    assert socket.socket.bind is before
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert sock.getsockname()[1] not in private.ports


# --- fallbacks: every bind still works ------------------------------------------------------------


def test_range_held_elsewhere_leaves_the_bind_to_the_os(
    pytester: pytest.Pytester, holder_process: Holder
) -> None:
    """No waiting: the timeout is 30 s, and each bind(0) returns at once."""
    _, private = holder_process
    pytester.makeconftest(RECIPE_CONFTEST)
    pytester.makepyfile(
        f"""
        import time

        from conftest import recipe_port


        def test_binds():
            start = time.monotonic()
            ports = [recipe_port() for _ in range(5)]
            assert time.monotonic() - start < 5
            assert not set(ports) & set({private.ports})
        """
    )
    result = pytester.runpytest_subprocess(
        "-v", "-p", "no:xdist", "--ephemeral-timeout=30", *private.args
    )
    result.assert_outcomes(passed=1)
    assert summary(result.stdout.str())[:2] == (0, 5)


def test_a_forked_child_binds_as_the_os_says(pytester: pytest.Pytester) -> None:
    if not hasattr(__import__("os"), "fork"):
        pytest.skip("no os.fork here")
    pytester.makeconftest(RECIPE_CONFTEST)
    pytester.makepyfile(
        f"""
        import os

        from conftest import recipe_port


        def test_fork():
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    os.write(write, str(recipe_port()).encode())
                finally:
                    os._exit(0)
            os.close(write)
            with os.fdopen(read) as pipe:
                port = int(pipe.read())
            assert os.waitpid(pid, 0)[1] == 0
            assert not {LOW} <= port <= {HIGH}  # the kernel's choice, not a lease
            assert {LOW} <= recipe_port() <= {HIGH}  # the parent still leases
        """
    )
    result = pytester.runpytest_subprocess(
        "-v", "-p", "no:xdist", "-W", "ignore::DeprecationWarning"
    )
    result.assert_outcomes(passed=1)
    assert summary(result.stdout.str())[0] == 1


@pytest.mark.skipif(sys.platform == "win32", reason="no RLIMIT_NOFILE")
def test_a_low_descriptor_limit_caps_the_leases(pytester: pytest.Pytester) -> None:
    """With a soft limit of 256, a process holds at most 4 bind0 leases (one descriptor each, a
    64th of the limit): a test keeping 230 recipe sockets open (nearly all its limit allows, once
    pytest has its own) still runs."""
    pytester.makeconftest(
        "import resource\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n" + RECIPE_CONFTEST
    )
    pytester.makepyfile(
        """
        import socket


        def test_many_open():
            sockets = []
            try:
                for _ in range(230):
                    sock = socket.socket()
                    sockets.append(sock)
                    sock.bind(("127.0.0.1", 0))
            finally:
                for sock in sockets:
                    sock.close()
        """
    )
    result = pytester.runpytest_subprocess("-v", "-p", "no:xdist")
    result.assert_outcomes(passed=1)
    assert summary(result.stdout.str())[:2] == (4, 226)


def test_binds_that_fail_without_the_plugin_fail_alike(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port of 0.0 or False is not port 0 to a plain bind: it fails the same way with bind0;
    and a stray EPHEMERAL_PORTS value is ignored, never a crash at start-up."""
    pytester.makepyfile(
        """
        import socket
        import pytest


        @pytest.mark.parametrize("port", [0.0, "0", None])
        def test_refused(port):
            with socket.socket() as plain, socket.socket() as ours:
                with pytest.raises(TypeError) as expected:
                    socket.socket.__mro__[1].bind(plain, ("127.0.0.1", port))
                with pytest.raises(TypeError) as caught:
                    ours.bind(("127.0.0.1", port))
                assert str(caught.value) == str(expected.value)
        """
    )
    monkeypatch.setenv("EPHEMERAL_PORTS", "\u00b2,x,99999,0")
    result = pytester.runpytest_subprocess("-p", "no:xdist", "--ephemeral-audit=yes")
    result.assert_outcomes(passed=3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reuse_addr works on Linux")
def test_a_failed_leased_bind_ends_its_lease_and_binds_port_0(
    pytester: pytest.Pytester, private_range: MakeRange
) -> None:
    """The one port of the range is in TIME_WAIT, left by a server that set SO_REUSEADDR: with
    reuse_addr it is leased, and a bind without SO_REUSEADDR fails on it. That bind gets a port
    from the OS; its lease ended, so the next bind, with SO_REUSEADDR, gets the port."""
    port = private_range(1).ports[0]
    _leave_time_wait(port)
    pytester.makepyfile(
        f"""
        import socket


        def test_binds():
            with socket.socket() as plain:
                plain.bind(("127.0.0.1", 0))
                assert plain.getsockname()[1] != {port}
            with socket.socket() as reusing:
                reusing.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                reusing.bind(("127.0.0.1", 0))
                assert reusing.getsockname()[1] == {port}
        """
    )
    lock_dir = pytester.path / "locks"
    lock_dir.mkdir(mode=0o700)
    result = pytester.runpytest_subprocess(
        "-v",
        "-p",
        "no:xdist",
        f"--ephemeral-port-range={port}-{port}",
        f"--ephemeral-lock-dir={lock_dir}",
        "--ephemeral-reuse-addr=yes",
    )
    result.assert_outcomes(passed=1)
    assert summary(result.stdout.str())[:2] == (1, 1)


def _leave_time_wait(port: int) -> None:
    """Leave ``port`` in TIME_WAIT on the server's side, the server having set SO_REUSEADDR."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        with socket.create_connection(("127.0.0.1", port)) as client:
            connection, _ = server.accept()
            connection.close()  # the server closes first: TIME_WAIT is on its port
            client.recv(1)
    with socket.socket() as probe, pytest.raises(OSError, match="in use"):
        probe.bind(("127.0.0.1", port))  # in TIME_WAIT


# --- sockets left open; the audit ---------------------------------------------------------------

LEFT_OPEN = """
import socket

SERVERS = []


def test_leaves_a_server_open():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    SERVERS.append(server)  # for the next test, or the garbage collector


def test_next():
    assert SERVERS
"""


def test_a_socket_left_open_is_counted_not_warned(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makepyfile(LEFT_OPEN)
    result = pytester.runpytest_subprocess("-v", "-p", "no:xdist")
    result.assert_outcomes(passed=2)
    assert summary(result.stdout.str()) == (1, 0, 1)


def test_with_audit_a_socket_left_open_warns(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_EPHEMERAL_AUDIT", "yes")
    pytester.makepyfile(LEFT_OPEN)
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(passed=2, warnings=1)
    result.stdout.fnmatch_lines(["*EphemeralPortWarning: port *still listening*"])


AUDITED = """
import os
import socket

from pytest_ephemeral import lease_port


def bind(port, kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", port))  # the line warned at


def test_fixed_twice():
    bind(FIXED)
    bind(FIXED)
    bind(FIXED, socket.SOCK_DGRAM)


def test_fixed_again():
    bind(FIXED)


def test_leased(free_port, port_factory):
    bind(free_port)
    bind(port_factory(protocol="udp"), socket.SOCK_DGRAM)
    with socket.socket() as recipe:  # bind0 leases it: binding its number again is no warning
        recipe.bind(("127.0.0.1", 0))
        port = recipe.getsockname()[1]
    bind(port)


def test_enclosing_run():
    bind(int(os.environ["EPHEMERAL_PORTS"].split(",")[1]))


def test_lease_port():
    lock_dir = os.environ["PRIVATE_LOCK_DIR"]
    with lease_port(port_range="OWN-OWN", lock_dir=lock_dir, host="127.0.0.1") as port:
        bind(port)  # leased by this process, in another lock dir
"""


@pytest.fixture
def audited(
    pytester: pytest.Pytester, private_range: MakeRange, monkeypatch: pytest.MonkeyPatch
) -> int:
    """A suite binding a fixed port twice in one test and once in another, leased ports, and a
    port of an enclosing run; returns the fixed port."""
    private = private_range(4)
    fixed, own, *outer = private.ports
    monkeypatch.setenv("EPHEMERAL_PORTS", ",".join(map(str, outer)))
    monkeypatch.setenv("PRIVATE_LOCK_DIR", str(private.lock_dir))
    monkeypatch.setenv("PYTEST_EPHEMERAL_AUDIT", "yes")
    pytester.makepyfile(AUDITED.replace("FIXED", str(fixed)).replace("OWN", str(own)))
    return fixed


def test_audit_warns_once_per_test_and_port_at_the_callers_bind(
    pytester: pytest.Pytester, audited: int
) -> None:
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(passed=5, warnings=2)
    result.stdout.fnmatch_lines(
        [
            "test_audit_warns_once*.py::test_fixed_twice",
            "*test_audit_warns_once*.py:9: UnleasedPortWarning: test_audit_warns_once*.py"
            f"::test_fixed_twice bound TCP port {audited}, which pytest-ephemeral did not lease*"
            "free_port, free_socket or port_factory",
            '*sock.bind(("127.0.0.1", port))*',
            "test_audit_warns_once*.py::test_fixed_again",
        ]
    )


def test_audit_off_says_nothing(
    pytester: pytest.Pytester, audited: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_EPHEMERAL_AUDIT", "no")
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(passed=5)


@pytest.mark.parametrize("mode", [["-n", "2"], ["-p", "no:xdist"]], ids=" ".join)
def test_audit_as_a_gate(pytester: pytest.Pytester, audited: int, mode: list[str]) -> None:
    result = pytester.runpytest_subprocess(
        *mode, "-W", "error::pytest_ephemeral.UnleasedPortWarning"
    )
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(["FAILED *::test_fixed_again - pytest_ephemeral.Unleased*"])
