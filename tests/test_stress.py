"""Stress tests: many processes lease, bind and release at once, and never share a port.

Not timed: they assert correctness (zero EADDRINUSE, no two holds of one port at the same time).
The full benchmark, with timings, is ``benchmarks/bench.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence

import pytest

from .conftest import MakeRange
from .helpers import assert_no_shared_overlap, hold_tests, read_holds

TIMEOUT = 240.0

#: One process of the collisions run: argv is the range, the lock dir and the number of rounds.
#: It prints "ready", waits for a line on stdin (the start barrier), then runs its rounds: lease,
#: listen on the port without SO_REUSEADDR for a moment, close, release. Last it prints one line
#: of JSON: how many binds failed with EADDRINUSE, and each lease as (port, start, end).
ROUNDS_SCRIPT = """
import errno, json, socket, sys, time
from pytest_ephemeral._allocator import allocator_for, request_for
from pytest_ephemeral._settings import Raw
from pytest_ephemeral._sources import load

spec, lock_dir, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
layer = {"port_range": spec, "lock_dir": lock_dir, "timeout": 60}
settings = load({k: Raw(v, "argv") for k, v in layer.items()})
allocator = allocator_for(settings.lock_dir)
print("ready", flush=True)
sys.stdin.readline()
in_use, leases = 0, []
for _ in range(rounds):
    port = allocator.lease(request_for(settings))[0]
    start = time.monotonic()
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        time.sleep(0.001)
    except OSError as error:
        if error.errno != errno.EADDRINUSE:
            raise
        in_use += 1
    finally:
        listener.close()
        leases.append((port, start, time.monotonic()))
        allocator.release(port)
print(json.dumps({"eaddrinuse": in_use, "leases": leases}), flush=True)
"""


def run_together(commands: Sequence[Sequence[str]]) -> list[str]:
    """Start every command; once each has printed "ready", send every one a line to start at the
    same moment, and return their remaining output. All are killed after ``TIMEOUT`` seconds."""
    procs = [
        subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]

    def kill_all() -> None:
        for proc in procs:
            proc.kill()

    watchdog = threading.Timer(TIMEOUT, kill_all)
    watchdog.start()
    try:
        for proc in procs:
            assert proc.stdout is not None
            ready = proc.stdout.readline()
            assert ready == "ready\n", f"not ready: {ready!r} {proc.communicate()[1]}"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = []
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == 0, f"exit code {proc.returncode}:\n{out}\n{err}"
            outputs.append(out)
        return outputs
    finally:
        watchdog.cancel()
        for proc in procs:
            proc.kill()
            proc.wait()


def test_collisions_run_has_no_eaddrinuse(private_range: MakeRange) -> None:
    """4 processes x 150 rounds on 8 ports: real listeners, and never one EADDRINUSE."""
    private = private_range(8)
    command = [sys.executable, "-c", ROUNDS_SCRIPT, private.spec, str(private.lock_dir), "150"]
    replies = [json.loads(out) for out in run_together([command] * 4)]
    leases = [(port, start, end) for reply in replies for port, start, end in reply["leases"]]
    assert [reply["eaddrinuse"] for reply in replies] == [0, 0, 0, 0]
    assert len(leases) == 600
    assert {port for port, _, _ in leases} == set(private.ports)  # every port was shared
    assert_no_shared_overlap(leases)


#: The inner runs' conftest: every xdist worker checks in on the outer test's loopback listener
#: and waits for its word, so the tests of both runs start at the same moment.
START_TOGETHER = """
import os
import socket

import pytest


@pytest.fixture(scope="session", autouse=True)
def _start_together():
    address = ("127.0.0.1", int(os.environ["START_PORT"]))
    with socket.create_connection(address, timeout=120) as barrier:
        assert barrier.recv(2) == b"go"
"""


def test_two_concurrent_runs_never_share_a_port(
    pytester: pytest.Pytester, private_range: MakeRange
) -> None:
    """Two pytest runs of two xdist workers each, at once, on one narrow range of ports."""
    private = private_range(6)
    pytester.makepyfile(hold_tests(60))
    pytester.makeconftest(START_TOGETHER)
    command = [sys.executable, "-m", "pytest", "-p", "xdist", "-n", "2", *private.args]
    command += ["-p", "no:cacheprovider", "-q"]
    files = [pytester.path / f"holds-{run}.txt" for run in ("a", "b")]
    procs: list[subprocess.Popen[str]] = []
    try:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(TIMEOUT / 4)
            env = {**os.environ, "START_PORT": str(listener.getsockname()[1])}
            for path in files:
                procs.append(
                    subprocess.Popen(
                        command,
                        cwd=pytester.path,
                        env={**env, "HOLDS_FILE": str(path)},
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                    )
                )
            try:
                workers = [listener.accept()[0] for _ in range(4)]  # two per run
            except TimeoutError:
                for proc in procs:
                    proc.kill()
                outputs = [proc.communicate()[0] for proc in procs]
                pytest.fail("not every worker started:\n" + "\n".join(outputs))
            for worker in workers:
                worker.sendall(b"go")
                worker.close()
        outputs = [proc.communicate(timeout=TIMEOUT)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output
        assert "60 passed" in output, output
    runs = [read_holds(path) for path in files]
    assert [len(holds) for holds in runs] == [60, 60]
    holds = runs[0] + runs[1]
    assert {port for port, _, _ in holds} <= set(private.ports)
    assert_no_shared_overlap(holds)
    # The runs really ran at once: their spans of holds overlap.
    first, second = ((min(h[1] for h in r), max(h[2] for h in r)) for r in runs)
    assert max(first[0], second[0]) < min(first[1], second[1])
