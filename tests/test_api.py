"""Race-free handoff (``free_socket``, ``port_factory.socket``), ``lease_port`` outside fixtures,
and the lock protocol as another program follows it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import unittest
from contextlib import ExitStack
from pathlib import Path

import pytest

import pytest_ephemeral
from pytest_ephemeral import ConfigError, PortsExhausted, lease_block, lease_port
from pytest_ephemeral._probe import ipv6_available

from .conftest import MakeRange
from .helpers import HOLD, assert_no_shared_overlap, hold_tests, read_holds, run_inline

SOCKET_TESTS = """
import os
import socket
import time

import pytest


@pytest.mark.parametrize("i", range(120))
def test_bound_socket(free_socket, i):
    host, port = free_socket.getsockname()[:2]
    assert host == "127.0.0.1"
    assert free_socket.type == socket.SOCK_STREAM
    free_socket.listen()
    start = time.monotonic()
    client = socket.create_connection((host, port))
    accepted, _ = free_socket.accept()
    client.sendall(b"ping")
    assert accepted.recv(4) == b"ping"
    client.close()  # the client closes first, so TIME_WAIT lands on its port, not ours
    assert accepted.recv(1) == b""
    accepted.close()
    time.sleep(0.002)  # the workload: hold the port a moment
    end = time.monotonic()
    with open(os.environ["HOLDS_FILE"], "a") as out:
        out.write(f"{port} {start} {end}\\n")
"""


def test_free_socket_under_xdist(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, private_range: MakeRange
) -> None:
    holds_file = pytester.path / "holds.txt"
    monkeypatch.setenv("HOLDS_FILE", str(holds_file))
    private = private_range(8)  # 120 tests on 8 ports: each port is handed out many times
    pytester.makepyfile(SOCKET_TESTS)
    result = run_inline(pytester, "-n", "4", *private.args)
    result.assert_outcomes(passed=120)
    holds = read_holds(holds_file)
    assert {port for port, _, _ in holds} <= set(private.ports)
    assert_no_shared_overlap(holds)


def test_closing_free_socket_early_keeps_the_lease_until_teardown(
    pytester: pytest.Pytester, private_range: MakeRange, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = private_range(1)
    monkeypatch.setenv("LOCK_DIR", str(private.lock_dir))
    pytester.makepyfile(
        """
        import os
        from pytest_ephemeral._lockfile import read_live_record

        def live(port):
            return read_live_record(os.environ["LOCK_DIR"], port)

        import pytest

        PORTS = []

        @pytest.fixture
        def released_after():  # set up before free_socket, so torn down after it
            yield
            assert live(PORTS[0]) is None

        def test_close_early(released_after, free_socket, request):
            port = free_socket.getsockname()[1]
            PORTS.append(port)
            free_socket.close()
            assert live(port)["nodeid"] == request.node.nodeid
        """
    )
    result = run_inline(pytester, "-p", "no:xdist", *private.args)
    result.assert_outcomes(passed=1)


def test_port_factory_socket(pytester: pytest.Pytester, private_range: MakeRange) -> None:
    private = private_range(4)
    udp_host = "::1" if ipv6_available() else "127.0.0.1"
    pytester.makepyfile(
        f"""
        import socket
        import pytest

        def test_sockets(port_factory):
            tcp = port_factory.socket()
            udp = port_factory.socket(protocol="udp", host="{udp_host}")
            assert tcp.getsockname()[0] == "127.0.0.1"
            assert udp.getsockname()[0] == "{udp_host}"
            assert udp.type == socket.SOCK_DGRAM
            tcp.listen()  # bound, not listening yet: listen() works
            port = tcp.getsockname()[1]
            port_factory.release(port)
            assert tcp.fileno() == -1  # release closes the socket
            with pytest.raises(ValueError, match="'tcp' or 'udp'"):
                port_factory.socket(protocol="both")
            with pytest.raises(OSError):
                port_factory.socket(host="192.0.2.7")  # not local: the lease is given back
            assert len([port_factory() for _ in range(2)]) == 2

        def test_session_end_closes_the_rest(port_factory):
            port_factory.block(1)
        """
    )
    result = run_inline(pytester, "-p", "no:xdist", *private.args)
    result.assert_outcomes(passed=2)


def test_public_names() -> None:
    assert sorted(pytest_ephemeral.__all__) == sorted(
        [
            "ConfigError",
            "ConfigTypeError",
            "EphemeralError",
            "EphemeralPortWarning",
            "LockDirError",
            "PortFactory",
            "PortNotLeased",
            "PortsExhausted",
            "UnleasedPortWarning",
            "lease_block",
            "lease_port",
        ]
    )
    for name in pytest_ephemeral.__all__:
        assert getattr(pytest_ephemeral, name).__module__ == "pytest_ephemeral", name
    assert issubclass(pytest_ephemeral.EphemeralPortWarning, pytest.PytestWarning)
    assert issubclass(pytest_ephemeral.UnleasedPortWarning, pytest.PytestWarning)
    assert issubclass(pytest_ephemeral.PortNotLeased, (pytest_ephemeral.EphemeralError, ValueError))
    misspelt = "lease_prot"
    with pytest.raises(AttributeError, match="has no attribute 'lease_prot'"):
        getattr(pytest_ephemeral, misspelt)
    assert dir(pytest_ephemeral) == sorted([*pytest_ephemeral.__all__, "__version__"])


def test_type_checkers_see_the_public_names_and_refuse_typos(tmp_path: Path) -> None:
    from mypy import api

    (tmp_path / "user.py").write_text(
        "import pytest_ephemeral\n"
        "from pytest_ephemeral import lease_port\n"
        "reveal_type(pytest_ephemeral.PortFactory.block)\n"
        "pytest_ephemeral.lease_prot\n"
        "with lease_port(protocol='sctp') as port:\n"
        "    pass\n"
    )
    out, _, status = api.run(
        ["--strict", "--cache-dir", str(tmp_path / "cache"), str(tmp_path / "user.py")]
    )
    assert status == 1
    assert 'Module has no attribute "lease_prot"' in out
    assert "Literal['tcp', 'udp', 'both']" in out  # protocol is typed in the public signatures
    assert "incompatible type \"Literal['sctp']\"" in out


def test_importing_the_package_loads_neither_pytest_nor_filelock() -> None:
    code = (
        "import sys, pytest_ephemeral;"
        "print(sorted(m for m in ('pytest', 'filelock') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


def test_lease_port_and_block(private_range: MakeRange) -> None:
    private = private_range(4)
    spec, lock_dir = private.spec, private.lock_dir
    with (
        lease_block(3, port_range=spec, lock_dir=lock_dir) as block,
        lease_port(protocol="both", port_range=spec, lock_dir=lock_dir) as port,
    ):
        assert sorted([*block, port]) == private.ports
        with (
            pytest.raises(PortsExhausted, match=r"now: .* 4 held by this process"),
            lease_port(port_range=spec, lock_dir=lock_dir, timeout=60),
        ):
            pass
    with lease_block(4, port_range=spec, lock_dir=lock_dir) as everything:
        assert everything == private.ports


def test_lease_port_bad_values_name_the_argument(tmp_path: Path) -> None:
    with (
        pytest.raises(ConfigError, match="'1-2-3' from argument port_range="),
        lease_port(port_range="1-2-3"),
    ):
        pass
    with pytest.raises(ConfigError, match="from argument timeout="), lease_port(timeout=-1):
        pass


class ReadmeUnittestExample(unittest.TestCase):
    """The README's unittest example, as written there."""

    def setUp(self) -> None:
        stack = ExitStack()
        self.addCleanup(stack.close)
        self.port = stack.enter_context(lease_port())

    def test_port_is_bindable(self) -> None:
        with socket.socket() as server:
            server.bind(("127.0.0.1", self.port))
            server.listen()


SCRIPT = (
    HOLD
    + """
from pytest_ephemeral import lease_port

for _ in range(40):
    with lease_port() as port:  # range and lock dir come from PYTEST_EPHEMERAL_* variables
        hold(port)
"""
)


def test_scripts_and_a_pytest_run_at_once_never_overlap(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, private_range: MakeRange
) -> None:
    private = private_range(5)
    holds_file = pytester.path / "holds.txt"
    monkeypatch.setenv("HOLDS_FILE", str(holds_file))
    monkeypatch.setenv("PYTEST_EPHEMERAL_PORT_RANGE", private.spec)
    monkeypatch.setenv("PYTEST_EPHEMERAL_LOCK_DIR", str(private.lock_dir))
    pytester.makepyfile(hold_tests(60))
    commands = [
        [sys.executable, "-c", SCRIPT],
        [sys.executable, "-c", SCRIPT],
        [sys.executable, "-m", "pytest", "-n", "2", "-q"],
    ]
    processes = [subprocess.Popen(command, cwd=pytester.path) for command in commands]
    try:
        assert [process.wait(timeout=300) for process in processes] == [0, 0, 0]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    holds = read_holds(holds_file)
    assert len(holds) == 2 * 40 + 60
    assert {port for port, _, _ in holds} <= set(private.ports)
    assert_no_shared_overlap(holds)


@pytest.mark.skipif(shutil.which("flock") is None, reason="needs util-linux flock")
def test_a_port_locked_by_an_external_flock_is_never_leased(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, private_range: MakeRange
) -> None:
    private = private_range(2)
    kept, other = private.ports
    holds_file = pytester.path / "holds.txt"
    monkeypatch.setenv("HOLDS_FILE", str(holds_file))
    pytester.makepyfile(
        """
        import os
        import pytest

        @pytest.mark.parametrize("i", range(6))
        def test_lease(free_port, i):
            with open(os.environ["HOLDS_FILE"], "a") as out:
                out.write(f"{free_port}\\n")
        """
    )
    lock_file = private.lock_dir / f"{kept}.lock"
    command = ["flock", "--nonblock", str(lock_file), "sh", "-c", "echo held; read line"]
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as holder:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        while_held = run_inline(pytester, "-p", "no:xdist", *private.args)
        holder.communicate("done\n", timeout=60)
    while_held.assert_outcomes(passed=6)
    assert set(holds_file.read_text().split()) == {str(other)}
    holds_file.unlink()
    after = run_inline(pytester, "-p", "no:xdist", *private.args)
    after.assert_outcomes(passed=6)
    assert set(holds_file.read_text().split()) == {str(kept), str(other)}


def test_exhaustion_in_a_script_names_arguments_not_options(private_range: MakeRange) -> None:
    private = private_range(1)
    with lease_port(port_range=private.spec, lock_dir=private.lock_dir, timeout=0) as port:
        assert port == private.ports[0]
        with (
            pytest.raises(PortsExhausted) as caught,
            lease_port(port_range=private.spec, lock_dir=private.lock_dir, timeout=0),
        ):
            pass
    message = str(caught.value)
    assert "port_range= or PYTEST_EPHEMERAL_PORT_RANGE" in message
    assert "--ephemeral" not in message
    assert "lower -n" not in message
    assert caught.value.held_here == 1


def test_lease_port_in_a_removed_directory_uses_the_environment(
    tmp_path: Path, private_range: MakeRange
) -> None:
    """No current directory, no project to read: the environment and the arguments still work
    (0.3's first cut raised FileNotFoundError from os.getcwd())."""
    private = private_range(2)
    gone = tmp_path / "gone"
    gone.mkdir()
    script = (
        "import os\n"
        "from pytest_ephemeral import lease_port\n"
        f"os.chdir({str(gone)!r}); os.rmdir({str(gone)!r})\n"
        f"with lease_port(port_range={private.spec!r}) as port:\n"
        "    print(port)\n"
    )
    environ = {**os.environ, "PYTEST_EPHEMERAL_LOCK_DIR": str(private.lock_dir)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) in private.ports
