"""``pytest-ephemeral run``: real runners, real child processes, real locks, real signals."""

from __future__ import annotations

import json
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pytest_ephemeral import PortsExhausted, lease_port
from pytest_ephemeral._run import UsageError, _check_listen, _label, expand

from .conftest import Holder, MakeRange
from .harness import PrivateRange

# POSIX signals, process groups and pseudo-terminals: none of it exists on Windows.
pty = pytest.importorskip("pty", reason="POSIX signals and terminals")

RUN = [sys.executable, "-m", "pytest_ephemeral", "run"]

#: A child that writes what it got (arguments, ports from the environment) as JSON to $REPORT_FILE
#: and exits with the code in its first argument.
REPORT = """
import json, os, sys
ports = {k: v for k, v in os.environ.items() if k.startswith("EPHEMERAL_PORT")}
with open(os.environ["REPORT_FILE"], "w") as out:
    json.dump({"argv": sys.argv[1:], "env": ports}, out)
sys.exit(int(sys.argv[1]))
"""

#: A child that prints its pid (it is ready: its handlers are set), counts SIGINTs (printing
#: "int N" for each), prints "term after N int" and exits 42 on SIGTERM, and otherwise waits for
#: its stdin to close.
WAITER = """
import os, signal, sys
ints = 0
def on_int(signum, frame):
    global ints
    ints += 1
    print(f"int {ints}", flush=True)
def on_term(signum, frame):
    print(f"term after {ints} int", flush=True)
    sys.exit(42)
signal.signal(signal.SIGINT, on_int)
signal.signal(signal.SIGTERM, on_term)
print(os.getpid(), flush=True)
sys.stdin.read()
"""


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RUN, *args], capture_output=True, text=True, timeout=60, env=env)


def report(
    private: PrivateRange,
    tmp_path: Path,
    *options: str,
    code: int = 0,
    arguments: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run REPORT with ``arguments`` under ``run`` with ``options``: what the child saw."""
    out = tmp_path / "report.json"
    env = {**os.environ, "REPORT_FILE": str(out)}
    command = ["--lock-dir", str(private.lock_dir), "--port-range", private.spec, *options]
    done = run(*command, "--", sys.executable, "-c", REPORT, str(code), *arguments, env=env)
    assert done.returncode == code, done.stderr
    seen: dict[str, Any] = json.loads(out.read_text())
    return seen


def read_line(process: subprocess.Popen[bytes], seconds: float = 60) -> str:
    """The next line the process prints, waiting at most ``seconds``."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], seconds)
    assert ready, f"no output within {seconds} s"
    return process.stdout.readline().decode().strip()


@contextmanager
def waiter(private: PrivateRange, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A runner (in a session of its own, so no terminal) running WAITER: (runner, child pid)."""
    command = [*RUN, "--lock-dir", str(private.lock_dir), "--port-range", private.spec, *args]
    command += ["--", sys.executable, "-c", WAITER]
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, start_new_session=True
    ) as runner:
        try:
            yield runner, int(read_line(runner))
        finally:
            runner.kill()


def status(lock_dir: Path) -> list[dict[str, Any]]:
    command = [sys.executable, "-m", "pytest_ephemeral", "status", "--json", "--lock-dir"]
    done = subprocess.run(
        [*command, str(lock_dir)], capture_output=True, text=True, timeout=60, check=True
    )
    leases: list[dict[str, Any]] = json.loads(done.stdout)
    return leases


# --- What the command gets ------------------------------------------------------------------


def test_the_command_gets_its_ports_in_environment_and_arguments(
    private_range: MakeRange, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = private_range(3)
    monkeypatch.setenv("EPHEMERAL_PORT_7", "1")  # left by an enclosing run: not passed on
    arguments = ("{port}", "{ports}", "{port1}", "{port3}", "{{port}}", "{{.Name}}", "${X}", "{}")
    seen = report(private, tmp_path, "--ports", "3", arguments=arguments)
    env = seen["env"]
    ports = [int(port) for port in env["EPHEMERAL_PORTS"].split(",")]
    assert sorted(ports) == private.ports
    assert env == {
        "EPHEMERAL_PORT": str(ports[0]),
        "EPHEMERAL_PORTS": ",".join(map(str, ports)),
        **{f"EPHEMERAL_PORT_{i}": str(port) for i, port in enumerate(ports, 1)},
    }
    first, third, listed = str(ports[0]), str(ports[2]), env["EPHEMERAL_PORTS"]
    assert seen["argv"] == [
        "0",  # the exit code REPORT was given
        first,
        listed,
        first,
        third,
        "{port}",
        "{{.Name}}",
        "${X}",
        "{}",
    ]


def test_block_is_consecutive_and_protocol_checked(
    private_range: MakeRange, tmp_path: Path
) -> None:
    private = private_range(4)
    seen = report(private, tmp_path, "--block", "3", "--protocol", "both")
    ports = [int(port) for port in seen["env"]["EPHEMERAL_PORTS"].split(",")]
    assert ports == list(range(ports[0], ports[0] + 3))
    assert set(ports) <= set(private.ports)


def test_one_port_by_default_and_without_a_double_dash(
    private_range: MakeRange, tmp_path: Path
) -> None:
    private = private_range(2)
    out = tmp_path / "report.json"
    env = {**os.environ, "REPORT_FILE": str(out)}
    options = ["--lock-dir", str(private.lock_dir), "--port-range", private.spec]
    done = run(*options, sys.executable, "-c", REPORT, "0", "--ports", "{port}", env=env)
    assert done.returncode == 0, done.stderr
    seen = json.loads(out.read_text())
    port = seen["env"]["EPHEMERAL_PORT"]
    assert seen["env"] == {
        "EPHEMERAL_PORT": port,
        "EPHEMERAL_PORTS": port,
        "EPHEMERAL_PORT_1": port,
    }
    assert seen["argv"] == ["0", "--ports", port]  # the command's own options stay its own


def test_options_win_over_environment_variables(
    private_range: MakeRange, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    by_env, by_option = private_range(1), private_range(1)
    monkeypatch.setenv("PYTEST_EPHEMERAL_PORT_RANGE", by_env.spec)
    monkeypatch.setenv("PYTEST_EPHEMERAL_LOCK_DIR", str(by_env.lock_dir))
    out = tmp_path / "report.json"
    env = {**os.environ, "REPORT_FILE": str(out)}
    assert run(sys.executable, "-c", REPORT, "0", env=env).returncode == 0
    assert json.loads(out.read_text())["env"]["EPHEMERAL_PORT"] == str(by_env.ports[0])
    child = [sys.executable, "-c", REPORT, "0"]
    assert run("--port-range", by_option.spec, "--", *child, env=env).returncode == 0
    assert json.loads(out.read_text())["env"]["EPHEMERAL_PORT"] == str(by_option.ports[0])


def test_placeholders_expand() -> None:
    assert expand(["a{port}b", "{port2}", "{ports}", "{{ports}}", "{{port2}}"], [7, 9]) == [
        "a7b",
        "9",
        "7,9",
        "{ports}",
        "{port2}",
    ]


def test_the_holder_record_names_the_command_on_one_bounded_line() -> None:
    assert _label(["sh", "-c", "a\n  b\tc", "{port}"]) == "sh -c 'a b c' '{port}'"
    long = _label(["echo", "x" * 1000])
    assert len(long) == 500
    assert long.startswith("echo xxx")
    assert long.endswith("x...")


# --- Exit codes -----------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 3])
def test_exits_with_the_command_s_code(private_range: MakeRange, tmp_path: Path, code: int) -> None:
    report(private_range(1), tmp_path, code=code)  # asserts the runner's exit code


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_a_command_killed_by_a_signal_gives_128_plus_n(
    private_range: MakeRange, signum: int
) -> None:
    private = private_range(1)
    suicide = f"import os; os.kill(os.getpid(), {int(signum)})"
    options = ["--lock-dir", str(private.lock_dir), "--port-range", private.spec]
    done = run(*options, "--", sys.executable, "-c", suicide)
    assert done.returncode == 128 + signum


def test_command_not_found_exits_127_and_not_executable_126(
    private_range: MakeRange, tmp_path: Path
) -> None:
    private = private_range(1)
    options = ["--lock-dir", str(private.lock_dir), "--port-range", private.spec]
    missing = run(*options, "--", "no-such-command-here")
    assert missing.returncode == 127
    assert missing.stderr == "pytest-ephemeral run: no-such-command-here: command not found\n"
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o600)
    assert run(*options, "--", str(script)).returncode == 126
    assert status(private.lock_dir) == []


@pytest.mark.parametrize(
    "args",
    [
        ["--ports", "0", "--", "true"],
        ["--ports", "x", "--", "true"],
        ["--ports", "1", "--block", "1", "--", "true"],
        ["--protocol", "sctp", "--", "true"],
        ["--bogus", "--", "true"],
        ["--port-range", "5-2", "--", "true"],
        ["--timeout", "soon", "--", "true"],
        ["--", "echo", "{port2}"],
        ["--ports"],
        ["--ports", "2"],
        ["--ports", "2", "--"],
        [],
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str]) -> None:
    done = run(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("pytest-ephemeral run: error: ")


def test_errors_name_run_s_options_not_pytest_s(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    done = run("--lock-dir", str(not_a_dir), "--", "true")
    assert done.returncode == 71  # EX_OSERR: the lock dir is checked when the first port is leased
    assert f"lock dir '{not_a_dir}' is not a directory" in done.stderr
    assert "with --lock-dir or $PYTEST_EPHEMERAL_LOCK_DIR" in done.stderr
    assert "--ephemeral-" not in done.stderr


@pytest.mark.parametrize(
    ("count", "error"),
    [
        (["--block", "3"], "cannot lease 3 ports: {spec} has 2 ports"),
        (["--ports", "3"], "cannot lease 3 ports: {spec} has 2 ports"),
    ],
)
def test_more_ports_than_the_range_has_is_a_usage_error(
    private_range: MakeRange, count: list[str], error: str
) -> None:
    private = private_range(2)
    options = ["--lock-dir", str(private.lock_dir), "--port-range", private.spec]
    done = run(*options, *count, "--", "true")
    assert done.returncode == 2  # not 75: waiting cannot help
    assert done.stderr == f"pytest-ephemeral run: error: {error.format(spec=private.spec)}\n"


def test_a_block_longer_than_the_range_s_longest_run_is_a_usage_error(
    private_range: MakeRange,
) -> None:
    private = private_range(5)
    options = ["--lock-dir", str(private.lock_dir), "--port-range", private.spec]
    done = run(*options, "--exclude", str(private.ports[2]), "--block", "3", "--", "true")
    assert done.returncode == 2
    assert "cannot lease 3 consecutive ports: the longest run in " in done.stderr
    assert done.stderr.endswith(" is 2\n")


def test_help_lists_run() -> None:
    command = [sys.executable, "-m", "pytest_ephemeral"]
    top = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
    assert "run       lease ports and run a command with them" in top.stdout
    own = subprocess.run([*RUN, "--help"], capture_output=True, text=True, timeout=60, check=True)
    assert own.stdout.startswith("usage: pytest-ephemeral run [options] -- COMMAND [ARG ...]")


# --- Leases: held while the command runs, gone after ----------------------------------------


def test_exhausted_range_exits_75_naming_run_s_options(holder_process: Holder) -> None:
    _, private = holder_process  # another process holds every port of the range
    options = ["--lock-dir", str(private.lock_dir), "--port-range", private.spec]
    done = run(*options, "--timeout", "0.2", "--", "true")
    assert done.returncode == 75
    assert done.stderr.startswith(f"pytest-ephemeral run: no free port in {private.spec}")
    assert "--port-range or $PYTEST_EPHEMERAL_PORT_RANGE" in done.stderr
    assert "--timeout" in done.stderr
    assert "--ephemeral-" not in done.stderr
    assert "lower -n" not in done.stderr


def test_leases_are_held_while_the_command_runs_and_released_after(
    private_range: MakeRange,
) -> None:
    private = private_range(2)
    spec, lock_dir = private.spec, private.lock_dir
    with waiter(private, "--ports", "2") as (runner, _):
        leases = status(lock_dir)
        assert sorted(lease["port"] for lease in leases) == private.ports
        (label,) = {lease["nodeid"] for lease in leases}
        assert label.startswith(shlex.join([sys.executable, "-c"]) + " ' import os, signal, sys ")
        assert label.endswith(" sys.stdin.read() '")
        assert "\n" not in label  # WAITER's newlines would break status's table
        assert {lease["pid"] for lease in leases} == {runner.pid}
        with (
            pytest.raises(PortsExhausted),
            lease_port(port_range=spec, lock_dir=lock_dir, timeout=0),
        ):
            pass  # another process's lease: never the runner's ports
        assert runner.stdin is not None
        runner.stdin.close()  # the child reads EOF and ends
        assert runner.wait(timeout=60) == 0
    assert status(lock_dir) == []
    with lease_port(port_range=spec, lock_dir=lock_dir, timeout=0) as port:
        assert port in private.ports


def test_kill_9_of_the_runner_leaves_no_lease_while_the_command_runs_on(
    private_range: MakeRange,
) -> None:
    private = private_range(1)
    with waiter(private) as (runner, child):
        assert [lease["port"] for lease in status(private.lock_dir)] == private.ports
        runner.kill()
        runner.wait(timeout=60)
        try:
            os.kill(child, 0)  # the command still runs: it inherited no lock
            assert status(private.lock_dir) == []
            with lease_port(port_range=private.spec, lock_dir=private.lock_dir, timeout=0) as port:
                assert port == private.ports[0]
        finally:
            os.kill(child, signal.SIGKILL)


# --- Signals --------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_sigint_and_sigterm_are_forwarded(private_range: MakeRange, signum: int) -> None:
    private = private_range(1)
    with waiter(private) as (runner, _):
        runner.send_signal(signum)
        if signum == signal.SIGINT:
            assert read_line(runner) == "int 1"
            runner.send_signal(signal.SIGTERM)
        assert read_line(runner) == f"term after {int(signum == signal.SIGINT)} int"
        assert runner.wait(timeout=60) == 42
    assert status(private.lock_dir) == []


def test_ctrl_c_at_a_terminal_reaches_the_command_once(private_range: MakeRange) -> None:
    """Ctrl-C signals the terminal's whole foreground process group, the command included: the
    runner must not send it a second SIGINT (docker compose takes a second one as "kill now")."""
    private = private_range(1)
    master, slave = pty.openpty()
    # A new session whose controlling terminal is the pty, the runner in its foreground group.
    with_terminal = (
        "import os, sys; os.setsid(); fd = os.open(os.ttyname(0), os.O_RDWR); os.dup2(fd, 0);"
        " os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    command = [sys.executable, "-c", with_terminal, "-m", "pytest_ephemeral", "run"]
    command += ["--lock-dir", str(private.lock_dir), "--port-range", private.spec]
    command += ["--", sys.executable, "-c", WAITER]
    try:
        with subprocess.Popen(command, stdin=slave, stdout=subprocess.PIPE, bufsize=0) as runner:
            try:
                read_line(runner)  # the child's pid: it is ready
                assert os.tcgetpgrp(master) == runner.pid, "not the terminal's foreground group"
                # What Ctrl-C at the terminal does: SIGINT to the whole foreground process group.
                # (Writing ^C to the pty did that too, but on a loaded machine it once in a few
                # full-suite runs never reached the command; the signal, not the pty's line
                # discipline, is what this test is about.)
                os.killpg(runner.pid, signal.SIGINT)
                assert read_line(runner) == "int 1"
                runner.send_signal(signal.SIGTERM)  # after a forwarded SIGINT, if there were one
                assert read_line(runner) == "term after 1 int"
                assert runner.wait(timeout=60) == 42
            finally:
                runner.kill()
    finally:
        os.close(master)
        os.close(slave)


# --- N is bounded before anything is built from it ------------------------------------------


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["--ports", "5000000"], "not 5000000"),
        (["--block", "65536"], "not 65536"),
        (["--ports", "999999999999999999999"], "not 99999999999999999999..."),
        (["--block", "9" * 100_000], "not 99999999999999999999..."),  # beyond int()'s limit
    ],
    ids=["5e6", "65536", "21-digits", "1e5-digits"],
)
def test_a_count_beyond_every_port_is_a_usage_error_at_once(args: list[str], shown: str) -> None:
    # Time-bounded by construction: before the bound, --ports 5000000 took seconds and 808 MB,
    # and a 21-digit N was killed by the OOM killer. A start-up takes a fraction of this timeout.
    done = subprocess.run([*RUN, *args, "--", "true"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr == (
        f"pytest-ephemeral run: error: argument {args[0]}: needs at most 65535, {shown}"
        " (see pytest-ephemeral run --help)\n"
    )


def test_the_most_ports_there_are_is_checked_against_the_range(private_range: MakeRange) -> None:
    private = private_range(2)
    options = ["--lock-dir", str(private.lock_dir), "--port-range", private.spec]
    # {port65535} exists for 65535 ports: the range is what refuses them, before any expansion.
    done = subprocess.run(
        [*RUN, *options, "--ports", "65535", "--", "echo", "{port65535}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr == (
        f"pytest-ephemeral run: error: cannot lease 65535 ports: {private.spec} has 2 ports\n"
    )


# --- --listen: the command gets listening sockets -------------------------------------------

#: A child that writes what it got as JSON to $REPORT_FILE: its pid, its LISTEN_* variables and
#: arguments, each passed descriptor's port and whether it listens, and the descriptors open
#: just above the passed ones (none should be).
LISTENER = """
import json, os, socket, sys
n = int(os.environ["LISTEN_FDS"])
fds = {}
for fd in range(3, 3 + n):
    sock = socket.socket(fileno=fd)
    accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    fds[fd] = [sock.getsockname()[0], sock.getsockname()[1], bool(accepting)]
    sock.detach()
extra = []
for fd in range(3 + n, 3 + n + 8):
    try:
        os.fstat(fd)
        extra.append(fd)
    except OSError:
        pass
listen = {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")}
with open(os.environ["REPORT_FILE"], "w") as out:
    json.dump({"pid": os.getpid(), "env": listen, "argv": sys.argv[1:], "fds": fds,
               "extra": extra, "ports": os.environ["EPHEMERAL_PORTS"]}, out)
"""


def listened(private: PrivateRange, tmp_path: Path, *options: str) -> dict[str, Any]:
    """Run LISTENER under ``run --listen`` with ``options``: what the child saw."""
    out = tmp_path / "listen.json"
    env = {**os.environ, "REPORT_FILE": str(out), "LISTEN_PID": "1"}  # an outer one: replaced
    command = ["--lock-dir", str(private.lock_dir), "--port-range", private.spec, "--listen"]
    arguments = ["{fd}", "{fd1}", "{fd2}", "{port2}", "{{fd}}", "${fd2}"]
    done = run(*command, *options, "--", sys.executable, "-c", LISTENER, *arguments, env=env)
    assert done.returncode == 0, done.stderr
    seen: dict[str, Any] = json.loads(out.read_text())
    return seen


@pytest.mark.parametrize("count", [["--ports", "2"], ["--block", "2"]])
def test_listen_passes_listening_sockets_from_descriptor_3(
    private_range: MakeRange, tmp_path: Path, count: list[str]
) -> None:
    private = private_range(3)
    seen = listened(private, tmp_path, *count)
    ports = [int(port) for port in seen["ports"].split(",")]
    assert set(ports) <= set(private.ports)
    assert seen["fds"] == {"3": ["127.0.0.1", ports[0], True], "4": ["127.0.0.1", ports[1], True]}
    assert seen["extra"] == []  # no copy, placeholder or lock descriptor reached the command
    assert seen["env"] == {
        "LISTEN_FDS": "2",
        "LISTEN_PID": str(seen["pid"]),  # the command's own pid, not the runner's
        "LISTEN_FDNAMES": f"{ports[0]}:{ports[1]}",
    }
    assert seen["argv"] == ["3", "3", "4", str(ports[1]), "{fd}", "$4"]


def test_listen_passes_more_than_seven_descriptors(
    private_range: MakeRange, tmp_path: Path
) -> None:
    private = private_range(12)  # descriptors 3-14: two digits, beyond a shell's redirections
    seen = listened(private, tmp_path, "--ports", "12")
    ports = [int(port) for port in seen["ports"].split(",")]
    assert [seen["fds"][str(fd)][1] for fd in range(3, 15)] == ports
    assert all(accepting for _, _, accepting in seen["fds"].values())
    assert seen["extra"] == []
    assert seen["env"]["LISTEN_FDS"] == "12"


#: A child that closes its listening socket, says so and waits for its stdin to close.
CLOSER = """
import os, sys
os.close(3)
print("closed", flush=True)
sys.stdin.read()
"""


def test_the_runner_keeps_no_copy_of_the_sockets(private_range: MakeRange) -> None:
    private = private_range(1)
    port = private.ports[0]
    command = [*RUN, "--lock-dir", str(private.lock_dir), "--port-range", private.spec]
    command += ["--listen", "--", sys.executable, "-c", CLOSER]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as runner:
        try:
            assert read_line(runner) == "closed"
            # The command closed the only copy: nobody listens, though the lease is still held.
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=10).close()
            assert [lease["port"] for lease in status(private.lock_dir)] == [port]
        finally:
            runner.kill()


def test_listen_without_a_command_to_run_reports_it_and_releases(
    private_range: MakeRange,
) -> None:
    private = private_range(1)
    options = ["--lock-dir", str(private.lock_dir), "--port-range", private.spec, "--listen"]
    missing = run(*options, "--", "no-such-command-here")
    assert missing.returncode == 127  # Popen's own report of the failed exec still works
    assert missing.stderr == "pytest-ephemeral run: no-such-command-here: command not found\n"
    assert status(private.lock_dir) == []


def test_listen_with_udp_only_is_a_usage_error() -> None:
    done = run("--listen", "--protocol", "udp", "--", "true")
    assert done.returncode == 2
    assert done.stderr == (
        "pytest-ephemeral run: error: --listen passes TCP sockets: use --protocol tcp or both"
        " with it\n"
    )


def test_listen_is_refused_where_descriptors_cannot_be_passed() -> None:
    with pytest.raises(UsageError, match="--listen needs a POSIX system"):
        _check_listen("tcp", "nt")


def test_fd_placeholders_only_with_listen() -> None:
    command = ["{fd}", "{fd2}", "{{fd}}", "{port2}"]
    assert expand(command, [7, 9]) == ["{fd}", "{fd2}", "{{fd}}", "9"]  # as before --listen
    assert expand(command, [7, 9], listen=True) == ["3", "4", "{fd}", "9"]
    with pytest.raises(UsageError, match=r"\{fd1\} \.\.\. \{fd2\}$"):
        expand(["{fd3}"], [7, 9], listen=True)
    with pytest.raises(UsageError, match=r"placeholders are \{port\}, \{ports\}, \{port1\}$"):
        expand(["{port01}"], [7])


def test_listen_binds_the_configured_host(private_range: MakeRange, tmp_path: Path) -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    private = private_range(2)
    seen = listened(private, tmp_path, "--ports", "2", "--host", "::1")
    assert [address for address, _, _ in seen["fds"].values()] == ["::1", "::1"]


def test_an_empty_lock_dir_is_refused_naming_the_option() -> None:
    done = run("--lock-dir", "", "--", "true")
    assert done.returncode == 2
    assert done.stderr == (
        "pytest-ephemeral run: error: bad value '' from option --lock-dir: empty"
        " (leave it out for the default)\n"
    )


def test_a_bad_value_in_the_project_s_addopts_is_blamed_on_it(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = --ephemeral-timeout=soon\n")
    done = subprocess.run(
        [*RUN, "--", "true"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr == (
        "pytest-ephemeral run: error: bad value 'soon' from command-line option"
        " --ephemeral-timeout in addopts"
        f" in config file {tmp_path / 'pytest.ini'}: not a number of seconds\n"
    )
