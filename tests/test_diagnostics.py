"""Diagnostics: holder records, the status and range commands, leak warnings, the run summary."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from socket import AF_INET, AF_INET6
from typing import Any

import pytest

from pytest_ephemeral._leakcheck import _tcp_use_by_connecting, local_port_states, still_in_use
from pytest_ephemeral._probe import Targets, bind_targets, ipv6_available

from .conftest import Holder, MakeRange
from .harness import Leaser, PrivateRange
from .helpers import run_inline

#: An inner test that leases ports, announces them in $READY_FILE, and holds them until
#: $GO_FILE exists (a real condition, polled with a bound).
GATED_TEST = """
import os
import time
from pathlib import Path


def test_holding(port_factory):
    ports = port_factory.block(int(os.environ["HOLD_COUNT"]))
    Path(os.environ["READY_FILE"] + ".tmp").write_text(" ".join(map(str, ports)))
    os.replace(os.environ["READY_FILE"] + ".tmp", os.environ["READY_FILE"])
    deadline = time.monotonic() + 120
    while not Path(os.environ["GO_FILE"]).exists():
        assert time.monotonic() < deadline, "the outer test never said go"
        time.sleep(0.01)
"""


def wait_for(path: Path, process: subprocess.Popen[str], seconds: float = 120) -> str:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, "the inner run ended early"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)
    return path.read_text()


@contextmanager
def gated_run(
    pytester: pytest.Pytester, private: PrivateRange, count: int, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[subprocess.Popen[str], list[int], Path]]:
    """A pytest run in another process holding ``count`` ports until the block ends."""
    ready, go = pytester.path / "ready", pytester.path / "go"
    monkeypatch.setenv("READY_FILE", str(ready))
    monkeypatch.setenv("GO_FILE", str(go))
    monkeypatch.setenv("HOLD_COUNT", str(count))
    pytester.makepyfile(test_gated=GATED_TEST)
    command = [sys.executable, "-m", "pytest", "-p", "no:xdist", *private.args, "test_gated.py"]
    with subprocess.Popen(
        command, cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        try:
            ports = [int(p) for p in wait_for(ready, process).split()]
            yield process, ports, go
        finally:
            go.touch()
            output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output


def status(*args: str) -> list[dict[str, Any]]:
    command = [sys.executable, "-m", "pytest_ephemeral", "status", "--json", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    leases: list[dict[str, Any]] = json.loads(done.stdout)
    return leases


def test_status_lists_a_live_lease_and_forgets_it_after_the_run(
    pytester: pytest.Pytester, private_range: MakeRange, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = private_range(2)
    with gated_run(pytester, private, 1, monkeypatch) as (process, ports, _):
        before = time.time()
        leases = status("--lock-dir", str(private.lock_dir))
        assert [lease["port"] for lease in leases] == ports
        lease = leases[0]
        assert lease["pid"] == process.pid
        assert lease["nodeid"] == "test_gated.py::test_holding"
        assert lease["worker"] is None
        assert lease["host"]
        assert lease["testrun"]
        assert before - 120 < lease["since"] <= before
    assert status("--lock-dir", str(private.lock_dir)) == []


def test_status_reads_the_lock_dir_from_the_environment(
    holder_process: Holder, monkeypatch: pytest.MonkeyPatch
) -> None:
    process, private = holder_process
    monkeypatch.setenv("PYTEST_EPHEMERAL_LOCK_DIR", str(private.lock_dir))
    command = [sys.executable, "-m", "pytest_ephemeral", "status"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["PORT", "PID", "HOST", "WORKER", "AGE", "TEST"]
    assert [line.split()[:2] for line in lines[1:4]] == [
        [str(port), str(process.pid)] for port in private.ports
    ]
    assert lines[-1] == (
        f"3 live leases in {private.lock_dir}"
        " (lock dir from environment variable PYTEST_EPHEMERAL_LOCK_DIR)"
    )


def test_a_killed_holders_records_are_not_live(holder_process: Holder) -> None:
    process, private = holder_process
    assert [lease["port"] for lease in status("--lock-dir", str(private.lock_dir))] == private.ports
    process.kill()  # SIGKILL on POSIX, TerminateProcess on Windows: no cleanup either way
    process.wait(timeout=30)
    assert all((private.lock_dir / f"{port}.lock").stat().st_size > 0 for port in private.ports)
    assert status("--lock-dir", str(private.lock_dir)) == []


def test_exhaustion_lists_the_holders_in_another_run(
    pytester: pytest.Pytester, private_range: MakeRange, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = private_range(3)
    with gated_run(pytester, private, 3, monkeypatch) as (process, ports, _):
        pytester.makepyfile(test_wants_one="def test_wants_one(free_port): pass")
        args = [*private.args, "--ephemeral-timeout=0.3", "test_wants_one.py"]
        result = run_inline(pytester, "-p", "no:xdist", *args)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*no free port in * within 0.3 s: 3 locked by other processes,"
            " 0 bound by other programs or in TIME_WAIT*",
            "*Holders:",
            *(
                f"*  port {port}: pid {process.pid} on *, worker -,"
                " test_gated.py::test_holding, for * s"
                for port in ports
            ),
            "*Widen the range (--ephemeral-port-range), lower -n*pytest-ephemeral status*",
        ]
    )


LEAK_TESTS = """
import socket
import pytest

LEFT_OPEN = []


def teardown_module():
    for sock in LEFT_OPEN:
        sock.close()


def test_leaves_a_listener(free_port):
    server = socket.socket()
    server.bind(("127.0.0.1", free_port))
    server.listen()
    LEFT_OPEN.append(server)


def test_leaves_a_udp_socket(port_factory):
    port = port_factory(protocol="udp")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    LEFT_OPEN.append(sock)
    port_factory.release(port)


def test_closes_properly_leaving_time_wait(free_port):
    with socket.socket() as server:
        server.bind(("127.0.0.1", free_port))
        server.listen()
        client = socket.create_connection(("127.0.0.1", free_port))
        accepted, _ = server.accept()
        accepted.close()  # the server closes first: its port is left in TIME_WAIT
        assert client.recv(1) == b""
        client.close()
    with pytest.raises(OSError), socket.socket() as probe:
        probe.bind(("127.0.0.1", free_port))  # TIME_WAIT really is there
"""


def test_leaked_servers_warn_and_time_wait_does_not(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_leaks=LEAK_TESTS)
    result = run_inline(pytester, "-p", "no:xdist")
    result.assert_outcomes(passed=3, warnings=2)
    result.stdout.fnmatch_lines(
        [
            "*= warnings summary =*",
            "test_leaks.py::test_leaves_a_listener",
            "  test_leaks.py:12: EphemeralPortWarning: port *, leased by"
            " test_leaks.py::test_leaves_a_listener,"
            " is still listening (TCP) after its lease ended*",
            "test_leaks.py::test_leaves_a_udp_socket",
            "*EphemeralPortWarning: port *, leased by test_leaks.py::test_leaves_a_udp_socket,"
            " is still bound (UDP)*",
        ]
    )
    assert "test_closes_properly_leaving_time_wait" not in result.stdout.str().split("warnings")[1]
    result.stdout.fnmatch_lines(["ephemeral ports: 3 leased, *; 2 leak warnings"])


def test_leak_warning_can_be_made_an_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_leaks=LEAK_TESTS)
    result = run_inline(
        pytester, "-p", "no:xdist", "-W", "error::pytest_ephemeral.EphemeralPortWarning"
    )
    # The listener's lease ends at teardown: an error there. The UDP one is released in the test.
    result.assert_outcomes(passed=2, failed=1, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaves_a_listener*"])
    result.stdout.fnmatch_lines(["FAILED test_leaks.py::test_leaves_a_udp_socket - *"])


def test_summary_adds_up_both_workers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("i", range(20))
        def test_port(free_port, port_factory, i):
            port_factory()
        """
    )
    quiet = run_inline(pytester, "-n", "2")
    quiet.assert_outcomes(passed=20)
    assert not [line for line in quiet.outlines if " leased, " in line]
    result = run_inline(pytester, "-n", "2", "-v")
    result.assert_outcomes(passed=20)
    assert "[gw0]" in result.stdout.str()
    assert "[gw1]" in result.stdout.str()
    result.stdout.fnmatch_lines(["ephemeral ports: 40 leased, at most * held at once by one*"])


def test_summary_survives_a_crashed_worker(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os
        import pytest

        @pytest.mark.parametrize("i", range(6))
        def test_port(free_port, i):
            pass

        def test_crash(free_port):
            os._exit(1)
        """
    )
    result = run_inline(pytester, "-n", "2", "-v")
    result.assert_outcomes(passed=6, failed=1)
    # The surviving worker's leases are counted (at least one); the crashed one's are lost.
    result.stdout.re_match_lines([r"ephemeral ports: [1-7] leased, "])


# --- How a port still in use is recognised --------------------------------------------------

PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:EE48 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:9C41 0100007F:EE48 06 00000000:00000000 03:00000F3B 00000000     0        0 0 3
   2: 0100007F:EE49 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1
"""


def test_local_port_states_match_the_local_port_only() -> None:
    assert local_port_states(PROC_NET_TCP, 0xEE48) == ["0A"]  # not row 1, whose *remote* it is
    assert local_port_states(PROC_NET_TCP, 0x9C41) == ["06"]
    assert local_port_states(PROC_NET_TCP, 0xEE49) == ["01"]
    assert local_port_states(PROC_NET_TCP, 0xD431) == []


BOTH = (socket.SOCK_STREAM, socket.SOCK_DGRAM)
TCP, UDP = BOTH[:1], BOTH[1:]


@pytest.fixture
def port_and_targets(band_allocator: Leaser) -> Iterator[tuple[int, Targets]]:
    port = band_allocator.lease()
    yield port, bind_targets("127.0.0.1")
    band_allocator.release(port)


def test_still_in_use_tells_each_case_apart(port_and_targets: tuple[int, Targets]) -> None:
    port, targets = port_and_targets
    assert still_in_use(port, "127.0.0.1", targets, BOTH) is None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        assert still_in_use(port, "127.0.0.1", targets, BOTH) == "bound (TCP)"
        sock.listen()
        assert still_in_use(port, "127.0.0.1", targets, BOTH) == "listening (TCP)"
    family, loopback = (AF_INET6, "::1") if ipv6_available() else (AF_INET, "127.0.0.1")
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((loopback, port))
        assert still_in_use(port, "127.0.0.1", targets, BOTH) == "bound (UDP)"
    assert still_in_use(port, "127.0.0.1", targets, BOTH) is None


def test_only_the_protocols_of_the_lease_are_checked(port_and_targets: tuple[int, Targets]) -> None:
    port, targets = port_and_targets
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", port))
        assert still_in_use(port, "127.0.0.1", targets, TCP) is None
        assert still_in_use(port, "127.0.0.1", targets, UDP) == "bound (UDP)"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert still_in_use(port, "127.0.0.1", targets, UDP) is None
        assert still_in_use(port, "127.0.0.1", targets, TCP) == "listening (TCP)"


@pytest.mark.parametrize(
    ("address", "reuse_port"),
    [("127.0.0.1", False), ("127.0.0.2", False), ("0.0.0.0", False), ("::1", False), ("::", False),
     ("127.0.0.1", True), ("::1", True)],
)  # fmt: skip
def test_a_listener_that_set_so_reuseaddr_is_a_leak_beside_its_time_wait(
    port_and_targets: tuple[int, Targets], address: str, reuse_port: bool
) -> None:
    """Servers set SO_REUSEADDR (some SO_REUSEPORT too); the quick check for TIME_WAIT binds with
    SO_REUSEADDR, so only the kernel refusing that bind to a listener, on any address, may tell a
    leaked server from the TIME_WAIT it left."""
    port, targets = port_and_targets
    family = AF_INET6 if ":" in address else AF_INET
    if family == AF_INET6 and not ipv6_available():
        pytest.skip("IPv6 is off on this machine")
    loopback = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address)
    # create_server sets SO_REUSEADDR, and IPV6_V6ONLY on an IPv6 socket
    with socket.create_server((address, port), family=family, reuse_port=reuse_port) as server:
        client = socket.create_connection((loopback, port))
        accepted, _ = server.accept()
        accepted.close()  # the server closes first: TIME_WAIT on its port, beside the listener
        client.close()
        assert still_in_use(port, "127.0.0.1", targets, TCP) == "listening (TCP)"
    assert still_in_use(port, "127.0.0.1", targets, TCP) is None  # TIME_WAIT alone


def test_connections_a_stopped_server_is_closing_are_not_leaks(
    port_and_targets: tuple[int, Targets],
) -> None:
    port, targets = port_and_targets
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
    with accepted:  # the listener is closed; its accepted connection is still open
        assert still_in_use(port, "127.0.0.1", targets, BOTH) is None
        client.close()  # and now in CLOSE_WAIT, its peer gone
        assert accepted.recv(1) == b""
        assert still_in_use(port, "127.0.0.1", targets, BOTH) is None


def test_the_connect_check_used_off_linux_finds_a_listener(
    port_and_targets: tuple[int, Targets],
) -> None:
    port, _ = port_and_targets
    assert _tcp_use_by_connecting(port, "127.0.0.1") is None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert _tcp_use_by_connecting(port, "0.0.0.0") == "listening (TCP)"


@pytest.mark.skipif(shutil.which("flock") is None, reason="needs util-linux flock")
def test_a_holder_without_a_record_is_listed_without_details(
    pytester: pytest.Pytester, private_range: MakeRange
) -> None:
    """Another program following the lock protocol writes no record: no error, no warning."""
    private = private_range(1)
    (port,) = private.ports
    lock_file = private.lock_dir / f"{port}.lock"
    command = ["flock", "--nonblock", str(lock_file), "sh", "-c", "echo held; read line"]
    pytester.makepyfile(test_wants_one="def test_wants_one(free_port): pass")
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as holder:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        leases = status("--lock-dir", str(private.lock_dir))
        table = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest_ephemeral",
                "status",
                "--lock-dir",
                str(private.lock_dir),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.splitlines()
        result = run_inline(
            pytester, "-p", "no:xdist", *private.args, "--ephemeral-timeout=0.2", "-W", "error"
        )
        holder.communicate("done\n", timeout=60)
    assert leases == [
        {
            "port": port,
            "pid": None,
            "host": None,
            "worker": None,
            "testrun": None,
            "nodeid": None,
            "since": None,
            "problem": "no holder record",
        }
    ]
    assert table[1].split() == [str(port), "?", "?", "-", "?", "no", "holder", "record"]
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*Holders:", f"*  port {port}: no holder record"])
    assert "RuntimeWarning" not in result.stdout.str()
