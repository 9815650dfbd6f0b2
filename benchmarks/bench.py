"""Benchmark pytest-ephemeral against the "bind port 0, read it, close" recipe.

    python benchmarks/bench.py [--quick] [--json PATH] [--markdown PATH]

Sections: 1 lease latency, and the CPU time of a suite of real servers, 2 scale, 3 collisions
between processes, 4 kernel theft (the same rounds while a background process churns outgoing
loopback connections), 5 start-up cost. Needs only the standard library and pytest_ephemeral, on
a POSIX system (the suite's CPU time comes from ``os.wait4``); all traffic stays on 127.0.0.1, and
every loop is bounded in count and time. Sections with an explicit range use a private range (the
test suite's harness, ``tests/harness.py``): a fresh temporary lock dir and ports outside both the
OS auto-assign range and the plugin's auto range; sections on the auto range use the default lock
dir, so they never take a port that a concurrent pytest run holds.

The targets are one table, ``TARGETS``: the report marks each met or MISSED, ``--json`` records
them, and the exit status is 1 when one is missed. Each section is a function that returns its
figures; the report (``ROWS``, ``table()``) only formats them.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import errno
import json
import multiprocessing
import operator
import os
import platform
import random
import shutil
import socket
import statistics
import string
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pytest_ephemeral import PortsExhausted, lease_port
from pytest_ephemeral._leakcheck import still_in_use
from pytest_ephemeral._probe import bind_targets
from pytest_ephemeral._ranges import format_spans, read_system_ports
from pytest_ephemeral._settings import default_lock_dir
from pytest_ephemeral._sources import load

# Run as a script: the repository root on the path, for the harness the test suite uses too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.harness import Leaser, PrivateRange, settings_of

if TYPE_CHECKING:
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Barrier, Event

LATENCY_RANGE = "24000-24999"  # explicit ranges: outside the OS's and the plugin's auto ranges
SCALE_RANGE = "20000-23999"
SCALE_SIZE, SCALE_HELD = 4000, 3960
HOST = "127.0.0.1"
HOLD = 0.001  # how long each round listens
WAIT = 120.0  # upper bound on any wait for a child process
IN_USE = {errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", errno.EADDRINUSE)}
CTX = multiprocessing.get_context("spawn")
Results = dict[str, dict[str, Any]]


# --- the targets: one table, for the check (exit status, --json) and the report ------------------

RELATIONS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
}


class Target(NamedTuple):
    """Figure ``figure`` of section ``section`` must be ``relation`` ``limit`` (in ``unit``)."""

    section: str
    figure: str
    relation: str
    limit: float
    unit: str = ""

    def met(self, results: Results) -> bool:
        return RELATIONS[self.relation](results[self.section][self.figure], self.limit)

    def __str__(self) -> str:
        return f"{self.relation} {self.limit:g}{self.unit}"


TARGETS = {
    "lease_port() + release, lock file in place": Target("latency", "api_ratio", "<=", 3, "x"),
    "lease_port() + release, creating the lock file": Target(
        "latency", "create_ratio", "<=", 5, "x"
    ),
    "end of a lease in TIME_WAIT": Target("latency", "end_ratio", "<=", 10, "x"),
    "server suite, more per test than its recipe fixture": Target(
        "suite", "suite_per_test_us", "<=", 100, " us"
    ),
    "bind0: the recipe with the adapter": Target("bind0", "recipe_ratio", "<=", 3.5, "x"),
    "bind0: bind() of a nonzero port, more than without": Target(
        "bind0", "fixed_bind_extra_us", "<=", 1, " us"
    ),
    f"lease all {SCALE_SIZE} ports, 1 process": Target("scale", "one_process_s", "<", 1, " s"),
    "collisions": Target("collisions", "ephemeral_failed", "==", 0),
    "kernel theft, auto range": Target("theft", "ephemeral_auto_failed", "==", 0),
    "start-up of a suite that leases no port": Target("startup", "ratio", "<=", 1.02),
}


def check(results: Results) -> dict[str, bool]:
    """Whether each target is met."""
    return {name: target.met(results) for name, target in TARGETS.items()}


def leaser(port_range: str | None, lock_dir: str | None, timeout: float) -> Leaser:
    """Leases of an explicit range and lock dir (a private range: the benchmark's own), or with
    neither, of the auto range in the default lock dir."""
    if port_range is None or lock_dir is None:
        return Leaser(settings_of("bench", timeout=timeout))
    return PrivateRange.of(port_range, lock_dir).leaser(timeout, origin="bench")


def recipe_port() -> int:
    """The common recipe: bind port 0, read the port the kernel chose, close."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def micros(samples: Sequence[int]) -> tuple[float, float]:
    """Median and p99 of nanosecond samples, in microseconds."""
    return statistics.median(samples) / 1e3, statistics.quantiles(samples, n=100)[98] / 1e3


# --- child processes ---------------------------------------------------------------------------


def child(
    job: Callable[..., object], args: tuple[Any, ...], barrier: Barrier, out: Queue[Any]
) -> None:
    """Run ``job`` after set-up; send back its result, then wait until every child has finished
    (so leases held until exit stay held while the others still lease)."""
    try:
        reply = ("ok", job(barrier, *args))
    except Exception as error:
        reply = ("error", f"{type(error).__name__}: {error}")
        barrier.abort()
    out.put(reply)
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(WAIT)


def run_children(job: Callable[..., object], args: Sequence[tuple[Any, ...]]) -> list[Any]:
    barrier, out = CTX.Barrier(len(args)), CTX.Queue()
    procs = [CTX.Process(target=child, args=(job, a, barrier, out)) for a in args]
    for proc in procs:
        proc.start()
    try:
        replies = [out.get(timeout=WAIT) for _ in procs]
    finally:
        for proc in procs:
            proc.join(WAIT)
            if proc.is_alive():
                proc.kill()
    errors = [payload for kind, payload in replies if kind == "error"]
    if errors:
        raise RuntimeError(f"a child process failed: {errors[0]}")
    return [payload for _, payload in replies]


def fill_job(barrier: Barrier, port_range: str, lock_dir: str) -> tuple[list[int], float, float]:
    """Lease until the range is exhausted (timeout 0: no waiting); keep every lease."""
    alloc = leaser(port_range, lock_dir, timeout=0)
    barrier.wait(WAIT)
    ports: list[int] = []
    start = last = time.monotonic()
    try:
        while len(ports) <= SCALE_SIZE:
            ports.append(alloc.lease())
            last = time.monotonic()
    except PortsExhausted:
        pass
    return ports, start, last


def hold_job(port_range: str, lock_dir: str, free: int, out: Queue[Any], done: Event) -> None:
    """Hold every port of the range but ``free`` random ones, until ``done`` is set."""
    alloc = leaser(port_range, lock_dir, timeout=0)
    for _ in range(SCALE_SIZE):
        alloc.lease()
    for port in random.sample(sorted(alloc.held), free):
        alloc.release(port)
    out.put(len(alloc.held))
    done.wait(WAIT)


def rounds_job(
    barrier: Barrier, method: str, port_range: str | None, lock_dir: str | None, n: int, gap: float
) -> int:
    """``n`` rounds of: get a port, wait ``gap`` (a server starting), listen on it without
    SO_REUSEADDR for ``HOLD``, close (and end the lease); the number of EADDRINUSE."""
    alloc = None if method == "recipe" else leaser(port_range, lock_dir, timeout=10)
    barrier.wait(WAIT)
    failures = 0
    for _ in range(n):
        port = recipe_port() if alloc is None else alloc.lease()
        time.sleep(gap)
        listener = socket.socket()
        try:
            listener.bind((HOST, port))
            listener.listen()
            time.sleep(HOLD)
        except OSError as error:
            if error.errno not in IN_USE:
                raise
            failures += 1
        finally:
            listener.close()
            if alloc is not None:
                alloc.release(port)
    return failures


def churn(stop: Event, ready: Event, out: Queue[Any], seconds: float, limit: int) -> None:
    """Open outgoing loopback connections (64 open at a time, reset on close so no TIME_WAIT
    piles up) until told to stop, for at most ``seconds`` and ``limit`` connections."""
    server = socket.create_server((HOST, 0), backlog=1024)
    server.settimeout(0.2)

    def accept() -> None:
        while not stop.is_set():
            try:
                server.accept()[0].close()
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    linger = struct.pack("HH" if sys.platform == "win32" else "ii", 1, 0)
    pool: collections.deque[socket.socket] = collections.deque()
    start = time.monotonic()
    count = 0
    ready.set()
    while count < limit and time.monotonic() - start < seconds:
        if count % 256 == 0 and stop.is_set():
            break
        count += 1
        client = socket.socket()
        client.settimeout(5)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        try:
            client.connect(server.getsockname())
        except OSError:
            client.close()
            continue
        pool.append(client)
        if len(pool) > 64:
            pool.popleft().close()
    elapsed = time.monotonic() - start
    for client in pool:
        client.close()
    stop.set()
    thread.join(1)
    server.close()
    out.put((count, elapsed))


# --- sections ------------------------------------------------------------------------------------


def interleaved(action: Callable[[], object], iterations: int) -> tuple[list[int], list[int]]:
    """Time ``action`` and the recipe alternately: (action's samples, the recipe's), in ns."""
    ours, theirs = [], []
    for _ in range(iterations):
        t0 = time.perf_counter_ns()
        action()
        t1 = time.perf_counter_ns()
        recipe_port()
        t2 = time.perf_counter_ns()
        ours.append(t1 - t0)
        theirs.append(t2 - t1)
    return ours, theirs


def ratio(samples: tuple[list[int], list[int]]) -> tuple[float, float, float]:
    """Median of ours (us), median of the recipe's (us), and their ratio."""
    ours, theirs = statistics.median(samples[0]) / 1e3, statistics.median(samples[1]) / 1e3
    return ours, theirs, ours / theirs


def time_wait_here(port: int) -> None:
    """Leave ``port`` in TIME_WAIT the way a server that closes first does."""
    with socket.create_server((HOST, port)) as server:  # SO_REUSEADDR, as servers set it
        client = socket.create_connection((HOST, port))
        accepted, _ = server.accept()
        accepted.close()  # the server closes first: TIME_WAIT lands on its port
        client.close()


def allocator_lease(iterations: int) -> dict[str, float]:
    """A lease with its release through the allocator, lock files in place, against the recipe."""
    with tempfile.TemporaryDirectory() as lock_dir:
        alloc = leaser(LATENCY_RANGE, lock_dir, timeout=5)
        for _ in range(1000):  # warm up: create every lock file once
            alloc.release(alloc.lease())
        samples = interleaved(lambda: alloc.release(alloc.lease()), iterations)
    ours, theirs, median_ratio = ratio(samples)
    return {
        "ephemeral_median_us": ours,
        "recipe_median_us": theirs,
        "ratio_median": median_ratio,
        "ephemeral_p99_us": micros(samples[0])[1],
        "recipe_p99_us": micros(samples[1])[1],
    }


def api_lease(lock_dir: str, iterations: int) -> tuple[float, float, float]:
    """``lease_port()`` with its release against the recipe: medians (us) and their ratio."""

    def api() -> None:
        with lease_port(port_range=LATENCY_RANGE, lock_dir=lock_dir, timeout=5):
            pass

    return ratio(interleaved(api, iterations))


def api_in_place(iterations: int) -> dict[str, float]:
    """``lease_port()`` + release, every lock file of the range in place."""
    with tempfile.TemporaryDirectory() as lock_dir:
        api_lease(lock_dir, 1000)  # warm up: create every lock file once
        ours, theirs, api_ratio = api_lease(lock_dir, iterations)
    return {"api_us": ours, "api_recipe_us": theirs, "api_ratio": api_ratio}


def api_creating(iterations: int) -> dict[str, Any]:
    """``lease_port()`` + release in a fresh lock dir beside the default one (on its file system):
    every lease creates its lock file."""
    parent = os.path.dirname(default_lock_dir())
    with tempfile.TemporaryDirectory(dir=parent, prefix="bench-") as lock_dir:
        ours, theirs, create_ratio = api_lease(lock_dir, iterations)
        if len(os.listdir(lock_dir)) < iterations:
            raise RuntimeError("the creating leases did not create a file each")
    return {
        "create_us": ours,
        "create_recipe_us": theirs,
        "create_ratio": create_ratio,
        "create_fs": parent,
    }


def latency(iterations: int) -> dict[str, Any]:
    """Section 1: the cost of one lease, each figure against the recipe in the same loop."""
    return {
        "iterations": iterations,
        **allocator_lease(iterations),
        **api_in_place(iterations),
        **api_creating(min(iterations, 1000)),
        **lease_end(min(iterations // 10, 300)),
    }


def lease_end(iterations: int) -> dict[str, Any]:
    """The end of a lease (leak check + release) whose port is in TIME_WAIT, with 1,000+ other
    TIME_WAIT sockets on the machine, against the recipe in the same loop."""
    background = []
    with socket.create_server((HOST, 0)) as server:
        for _ in range(1100):
            client = socket.create_connection(server.getsockname())
            accepted, _ = server.accept()
            accepted.close()
            background.append(client)
        for client in background:
            client.close()
    with tempfile.TemporaryDirectory() as lock_dir:
        alloc = leaser(LATENCY_RANGE, lock_dir, timeout=5)
        targets = bind_targets(HOST)
        ours, theirs = [], []
        for _ in range(iterations):
            port = alloc.lease()
            time_wait_here(port)
            t0 = time.perf_counter_ns()
            leaked = still_in_use(port, HOST, targets, (socket.SOCK_STREAM,))
            alloc.release(port)
            t1 = time.perf_counter_ns()
            recipe_port()
            t2 = time.perf_counter_ns()
            if leaked is not None:
                raise RuntimeError(f"a port in TIME_WAIT was called {leaked}")
            ours.append(t1 - t0)
            theirs.append(t2 - t1)
    end_us, recipe_us, end_ratio = ratio((ours, theirs))
    time_wait = sum(
        line.split()[3] == "06"
        for name in ("tcp", "tcp6")
        for line in Path("/proc/net", name).read_text().splitlines()[1:]
    ) if sys.platform.startswith("linux") else -1  # fmt: skip
    return {
        "end_iterations": iterations,
        "end_us": end_us,
        "end_recipe_us": recipe_us,
        "end_ratio": end_ratio,
        "end_time_wait_sockets": time_wait,
    }


SERVER_TESTS = """
import http.server, socket, threading
import pytest


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the server closes each connection first

    def do_GET(self):
        body = b"x" * 512
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("i", range(COUNT))
def test_server(free_port, i):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    try:
        for _ in range(REQUESTS):
            with socket.create_connection(("127.0.0.1", free_port)) as client:
                client.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
                while client.recv(4096):
                    pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
"""
# The same suite as its authors would have it before adopting the plugin: their own fixture.
RECIPE_CONFTEST = """
import socket
import pytest


@pytest.fixture
def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
"""


# Loaded into both suites (-p): the CPU time the main thread spends in the tests' set-up and
# teardown, where a port is leased and released (the recipe's bind(0) too), printed at the end:
# the first test's (the first lease imports filelock), then the others' in all.
PHASES_PLUGIN = """
import time
import pytest

spent = [0.0, 0.0]
first_done = [False]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    start = time.thread_time()
    try:
        return (yield)
    finally:
        spent[1] += time.thread_time() - start


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    start = time.thread_time()
    try:
        return (yield)
    finally:
        spent[1] += time.thread_time() - start
        if not first_done[0]:
            first_done[0] = True
            spent[0], spent[1] = spent[1], 0.0


def pytest_unconfigure():
    print(f"bench-phases {spent[0]:.6f} {spent[1]:.6f}")
"""


# The recipe, timed in one test with the bind0 adapter and on a ``Plain`` socket, whose bind is the
# C base's as ``socket.socket``'s is without the adapter (otherwise the same Python socket),
# alternating which goes first; each leased port's lease is ended after its recipe (not timed),
# as a test's teardown would, so the leases do not pile up. Then a bind of a nonzero port both
# ways. The first WARM rounds create the range's lock files and are not recorded.
BIND0_TESTS = """
import _socket, json, os, socket, time
from pytest_ephemeral._leases import leases_of


class Plain(socket.socket):
    bind = _socket.socket.bind


def recipe(kind):
    start = time.perf_counter_ns()
    with kind() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return time.perf_counter_ns() - start, port


def fixed(kind):
    with kind() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        start = time.perf_counter_ns()
        sock.bind(("127.0.0.1", FIXED))
        return time.perf_counter_ns() - start


def test_bind0(request):
    leases = leases_of(request.config)
    samples = {"recipe": [], "plain": [], "fixed": [], "fixed_plain": []}
    order = [("recipe", socket.socket), ("plain", Plain)]
    for i in range(WARM + COUNT):
        for name, kind in order if i % 2 else order[::-1]:
            took, port = recipe(kind)
            if kind is socket.socket:
                assert leases.end(port), "the recipe's port was not leased"
            if i >= WARM:
                samples[name].append(took)
    for _ in range(COUNT):
        samples["fixed"].append(fixed(socket.socket))
        samples["fixed_plain"].append(fixed(Plain))
    with open(os.environ["BENCH_OUT"], "w") as out:
        json.dump(samples, out)
"""


def bind0(count: int) -> dict[str, Any]:
    """The recipe (socket(), bind(0), getsockname(), close()) leased by the bind0 adapter against
    the same without it, and a bind of a nonzero port with and without the adapter's wrapper,
    interleaved in one test of a pytest run on an explicit range (lock files in place)."""
    with tempfile.TemporaryDirectory() as temp:
        suite = suite_dir(temp, "bind0")
        low, high = map(int, LATENCY_RANGE.split("-"))
        warm, fixed = high - low + 1, low - 1  # a pass over the range; a port outside it
        body = BIND0_TESTS.replace("WARM", str(warm)).replace("COUNT", str(count))
        (suite / "test_bind0.py").write_text(body.replace("FIXED", str(fixed)))
        # The lock dir on the default lock dir's file system (tmpfs where there is one)
        lock_dir = tempfile.mkdtemp(dir=os.path.dirname(default_lock_dir()), prefix="bench-")
        out = Path(temp, "samples.json")
        env = {**child_env(temp), "BENCH_OUT": str(out)}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:randomly"]
        command += [f"--ephemeral-port-range={LATENCY_RANGE}", f"--ephemeral-lock-dir={lock_dir}"]
        done = subprocess.run(
            command, cwd=suite, env=env, capture_output=True, text=True, timeout=WAIT * 5
        )
        if done.returncode != 0:
            raise RuntimeError(f"the bind0 suite failed:\n{done.stdout}{done.stderr}")
        samples = json.loads(out.read_text())
        shutil.rmtree(lock_dir)
    leased_us, plain_us = (statistics.median(samples[k]) / 1e3 for k in ("recipe", "plain"))
    fixed_us, fixed_plain_us = (
        statistics.median(samples[k]) / 1e3 for k in ("fixed", "fixed_plain")
    )
    return {
        "rounds": count,
        "recipe_leased_us": leased_us,
        "recipe_plain_us": plain_us,
        "recipe_ratio": leased_us / plain_us,
        "fixed_bind_us": fixed_us,
        "fixed_bind_plain_us": fixed_plain_us,
        "fixed_bind_extra_us": fixed_us - fixed_plain_us,
    }


def suite_dir(temp: str, name: str) -> Path:
    """A directory for a generated pytest suite under ``temp``."""
    suite = Path(temp, name)
    suite.mkdir()
    (suite / "pytest.ini").write_text("[pytest]\n")
    return suite


Run = tuple[Path, list[str], str]  # a pytest run: directory, arguments, what it must print


def child_env(temp: str) -> dict[str, str]:
    """The environment of the pytest runs: no PYTEST_* settings of ours, bytecode cached (in
    ``temp``) as in any installed package, and ``temp`` on the path (the suite's phase plugin)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHONDONT"))}
    env["PYTHONPYCACHEPREFIX"] = str(Path(temp, "pycache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (temp, os.environ.get("PYTHONPATH"))))
    return env


class Paired(NamedTuple):
    """CPU times of paired pytest runs (seconds, per run), their ratios, and what each printed."""

    ours: list[float]
    theirs: list[float]
    ratios: list[float]
    our_output: list[str]
    their_output: list[str]


def start_pytest(run: Run, env: dict[str, str]) -> subprocess.Popen[str]:
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist"]
    return subprocess.Popen(
        [*base, *run[1]],
        cwd=run[0],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish_pytest(process: subprocess.Popen[str], run: Run) -> tuple[float, str]:
    """The CPU time (user + system, from the kernel's account of the process) of a pytest run
    and what it printed; an error if it failed or did not print what it must."""
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0 or run[2] not in output:
        raise RuntimeError(f"pytest {' '.join(run[1])} in {run[0]} failed:\n{output}")
    return usage.ru_utime + usage.ru_stime, output


def timed_pytest(runs: Sequence[Run], env: dict[str, str]) -> list[tuple[float, str]]:
    """Start the pytest ``runs`` at once; the CPU time and output of each. A run still going
    after ``WAIT`` seconds is killed, and so is every other one when a run fails."""
    started = [(run, start_pytest(run, env)) for run in runs]
    watchdogs = [threading.Timer(WAIT, process.kill) for _, process in started]
    for watchdog in watchdogs:
        watchdog.start()
    try:
        return [finish_pytest(process, run) for run, process in started]
    finally:
        for watchdog in watchdogs:
            watchdog.cancel()
        for _, process in started:
            if process.returncode is None:  # another run failed: do not leave it running
                process.kill()
                process.wait()


def paired_cpu(ours: Run, theirs: Run, runs: int) -> Paired:
    """CPU time of two pytest runs in directories under one temporary dir, started at once
    ``runs`` times (after one warm-up pair: bytecode caches, lock files): ours, theirs, the
    ratios, and what each run printed.

    Starting both at once (which one first alternates) makes a change in the machine's load hit
    both alike: on this shared 2-core machine that cut the spread of the suite's ratios from about
    0.95-1.24 (one run after the other) to about 1.01-1.14.
    """
    env = child_env(str(ours[0].parent))
    paired = Paired([], [], [], [], [])
    for i in range(runs + 1):
        first_ours = i % 2 == 1
        done = timed_pytest((ours, theirs) if first_ours else (theirs, ours), env)
        (mine, my_output), (other, other_output) = done if first_ours else done[::-1]
        if i:
            paired.ours.append(mine)
            paired.our_output.append(my_output)
            paired.theirs.append(other)
            paired.their_output.append(other_output)
            paired.ratios.append(mine / other)
    return paired


def fastest_cpu(ours: Run, theirs: Run, runs: int) -> tuple[float, float]:
    """The fastest CPU time of each of two pytest runs, made one after the other in turn
    ``runs`` times each (after one warm-up pair that writes the bytecode caches)."""
    env = child_env(str(ours[0].parent))
    mine: list[float] = []
    other: list[float] = []
    for i in range(runs + 1):
        pair = (ours, theirs) if i % 2 else (theirs, ours)
        for run in pair:
            cpu = timed_pytest([run], env)[0][0]
            if i:
                (mine if run is ours else other).append(cpu)
    return min(mine), min(other)


def suite_cpu(runs: int, count: int) -> dict[str, Any]:
    """CPU time of a suite whose servers close first: the plugin's ``free_port`` against the
    suite's own recipe fixture of the same name (run without the plugin)."""
    with tempfile.TemporaryDirectory() as temp:
        code = SERVER_TESTS.replace("COUNT", str(count)).replace("REQUESTS", "10")
        ours, recipe = suite_dir(temp, "ours"), suite_dir(temp, "recipe")
        for suite in (ours, recipe):
            (suite / "test_servers.py").write_text(code)
        (recipe / "conftest.py").write_text(RECIPE_CONFTEST)
        Path(temp, "bench_phases.py").write_text(PHASES_PLUGIN)
        passed, phases = f"{count} passed", ["-p", "bench_phases"]
        paired = paired_cpu(
            (ours, ["-q", *phases], passed),
            (recipe, ["-q", *phases, "-p", "no:ephemeral"], passed),
            runs,
        )
    ratio_cpu = statistics.median(paired.ratios)
    # Per pair: the difference in set-up and teardown, in the first test and per later test,
    # and outside them.
    first, inside, outside = [], [], []
    for mine, theirs, our_output, their_output in zip(
        paired.ours, paired.theirs, paired.our_output, paired.their_output, strict=True
    ):
        (ours_first, ours_rest), (theirs_first, theirs_rest) = map(
            _phases, (our_output, their_output)
        )
        first.append((ours_first - theirs_first) * 1e3)
        inside.append((ours_rest - theirs_rest) / (count - 1) * 1e6)
        outside.append(
            ((mine - ours_first - ours_rest) - (theirs - theirs_first - theirs_rest)) * 1e3
        )
    return {
        "suite_tests": count,
        "suite_runs": runs,
        "suite_cpu_s": statistics.median(paired.ours),
        "suite_recipe_cpu_s": statistics.median(paired.theirs),
        "suite_ratio": ratio_cpu,
        "suite_ratio_range": (min(paired.ratios), max(paired.ratios)),
        "suite_first_test_ms": statistics.median(first),
        "suite_per_test_us": statistics.median(inside),
        "suite_outside_ms": statistics.median(outside),
    }


def _phases(output: str) -> tuple[float, float]:
    """The set-up and teardown CPU times ``PHASES_PLUGIN`` printed: first test, the others."""
    line = next(x for x in output.splitlines() if x.startswith("bench-phases "))
    first, rest = line.split()[1:]
    return float(first), float(rest)


def scale(trials: int) -> dict[str, Any]:
    # Lock dirs on the default lock dir's file system (tmpfs on Linux), as users get them.
    on = os.path.dirname(default_lock_dir())
    with tempfile.TemporaryDirectory(dir=on) as lock_dir:
        alloc = leaser(SCALE_RANGE, lock_dir, timeout=0)
        fills = []
        for _ in range(2):  # first creating every lock file, then with the files in place
            t0 = time.perf_counter()
            for _ in range(SCALE_SIZE):
                alloc.lease()
            fills.append(time.perf_counter() - t0)
            alloc.release_all()
        # Another process holds 99%, the free 1% scattered: time a fresh allocator's next lease.
        out, done = CTX.Queue(), CTX.Event()
        free = SCALE_SIZE - SCALE_HELD
        holder = CTX.Process(target=hold_job, args=(SCALE_RANGE, lock_dir, free, out, done))
        holder.start()
        try:
            if out.get(timeout=WAIT) != SCALE_HELD:
                raise RuntimeError(f"the holder process did not hold {SCALE_HELD} ports")
            at_99 = []
            for _ in range(trials):
                probe = leaser(SCALE_RANGE, lock_dir, timeout=0)
                t0 = time.perf_counter()
                probe.release(probe.lease())
                at_99.append(time.perf_counter() - t0)
            for _ in range(free):  # now 100% held: how soon does a lease give up?
                alloc.lease()
            probe = leaser(SCALE_RANGE, lock_dir, timeout=0)
            t0 = time.perf_counter()
            try:
                probe.lease()
                raise RuntimeError("leased a port of a range that is fully held")
            except PortsExhausted:
                exhausted = time.perf_counter() - t0
            alloc.release_all()
        finally:
            done.set()
            holder.join(WAIT)
    with tempfile.TemporaryDirectory(dir=on) as lock_dir:
        replies = run_children(fill_job, [(SCALE_RANGE, lock_dir)] * 4)
    leased = [port for ports, _, _ in replies for port in ports]
    duplicates = len(leased) - len(set(leased))
    low, high = (int(n) for n in SCALE_RANGE.split("-"))
    missing = set(range(low, high + 1)) - set(leased)
    if duplicates or any(bindable(port) for port in missing):
        raise RuntimeError(f"4 processes: {duplicates} duplicate leases, {len(missing)} missing")
    return {
        "range": SCALE_RANGE,
        "one_process_s": fills[0],
        "one_process_files_exist_s": fills[1],
        "four_processes_s": max(r[2] for r in replies) - min(r[1] for r in replies),
        "four_processes_leased": len(leased),
        "duplicates": duplicates,
        "bound_by_others": len(missing),
        "held_99_median_us": statistics.median(at_99) * 1e6,
        "held_99_max_us": max(at_99) * 1e6,
        "held_100_exhausted_ms": exhausted * 1e3,
    }


def rounds(method: str, port_range: str | None, procs: int, n: int, gap: float) -> int:
    with tempfile.TemporaryDirectory() as temp:
        lock_dir = None if port_range is None else temp  # auto range: the default lock dir
        args = [(method, port_range, lock_dir, n, gap)] * procs
        return sum(run_children(rounds_job, args))


def collisions(procs: int, n: int, gap: float) -> dict[str, Any]:
    recipe, ours = (rounds(method, None, procs, n, gap) for method in ("recipe", "ephemeral"))
    return {
        "processes": procs,
        "rounds": n,
        "gap_s": gap,
        "recipe_failed": recipe,
        "ephemeral_failed": ours,
    }


def theft(procs: int, n: int, gap: float, os_range: tuple[int, int]) -> dict[str, Any]:
    middle = (os_range[0] + os_range[1]) // 2
    inside = f"{middle - 1000}-{middle + 999}"
    stop, ready, out = CTX.Event(), CTX.Event(), CTX.Queue()
    churner = CTX.Process(target=churn, args=(stop, ready, out, 90.0, 3_000_000))
    churner.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the background connection process did not start")
        figures = {
            "ephemeral_auto_failed": rounds("ephemeral", None, procs, n, gap),
            "ephemeral_inside_failed": rounds("ephemeral", inside, procs, n, gap),
            "recipe_failed": rounds("recipe", None, procs, n, gap),
        }
        stopped_early = stop.is_set()
    finally:
        stop.set()
        count, elapsed = out.get(timeout=WAIT)
        churner.join(WAIT)
    if stopped_early:
        raise RuntimeError("the background connections stopped (time or count limit) too soon")
    return {
        "processes": procs,
        "rounds": n,
        "inside_os_range": inside,
        **figures,
        "background_connections": count,
        "background_per_s": count / elapsed,
    }


def startup(runs: int) -> dict[str, Any]:
    """Section 5: collecting 500 tests that lease nothing, with the plugin and without it: the
    fastest of ``runs`` interleaved collections each, bytecode caching on; and the plugin's
    import time."""
    with tempfile.TemporaryDirectory() as temp:
        ours, without_plugin = suite_dir(temp, "ours"), suite_dir(temp, "without")
        tests = "".join(f"def test_{i}():\n    pass\n\n\n" for i in range(500))
        for suite in (ours, without_plugin):
            (suite / "conftest.py").write_text("")
            (suite / "test_generated.py").write_text(tests)
        # Without -q: our run must show the header (proof that the plugin loaded).
        with_plugin, without = fastest_cpu(
            (ours, ["--collect-only"], "ephemeral ports:"),
            (without_plugin, ["--collect-only", "-p", "no:ephemeral"], "500 tests collected"),
            runs,
        )
        imports = [import_ms(temp) for _ in range(5)]
    return {
        "runs": runs,
        "with_plugin_s": with_plugin,
        "without_plugin_s": without,
        "ratio": with_plugin / without,
        "import_ms": statistics.median(imports),
    }


def import_ms(temp: str) -> float:
    """``import pytest_ephemeral`` in a fresh interpreter, as ``-X importtime`` counts it (ms)."""
    command = [sys.executable, "-X", "importtime", "-c", "import pytest_ephemeral"]
    done = subprocess.run(command, env=child_env(temp), capture_output=True, text=True, timeout=60)
    line = next(x for x in done.stderr.splitlines() if x.endswith("| pytest_ephemeral"))
    return int(line.split("|")[1]) / 1e3


# --- report -------------------------------------------------------------------------------------


class Row(NamedTuple):
    """A line of the report: figures ``ours`` and ``theirs`` (None: "-") of ``section``, and a
    note, both the label and the note formatted with the section's figures; a row showing a
    figure that has a target ends with the target and whether it is met."""

    label: str
    section: str
    ours: str
    theirs: str | None = None
    note: str = ""


ROWS = (
    Row("1 allocator lease + release, median (us)", "latency", "ephemeral_median_us",
        "recipe_median_us", "{ratio_median:.1f}x"),
    Row("  lease + release, p99 (us)", "latency", "ephemeral_p99_us", "recipe_p99_us"),
    Row("  lease_port() + release, lock file in place (us)", "latency", "api_us",
        "api_recipe_us", "{api_ratio:.1f}x"),
    Row("  the same, creating the lock file (us)", "latency", "create_us", "create_recipe_us",
        "{create_ratio:.1f}x"),
    Row("  end of a lease in TIME_WAIT (us)", "latency", "end_us", "end_recipe_us",
        "{end_ratio:.1f}x"),
    Row("  server suite: more per test, set-up + teardown (us)", "suite",
        "suite_per_test_us"),
    Row("    more in the first test's set-up + teardown (ms)", "suite", "suite_first_test_ms"),
    Row("    more in the rest of the run (ms)", "suite", "suite_outside_ms"),
    Row("    suite CPU (s)", "suite", "suite_cpu_s", "suite_recipe_cpu_s",
        "{suite_ratio:.3f} (no target)"),
    Row("  bind0: the recipe, leased (us)", "bind0", "recipe_leased_us", "recipe_plain_us",
        "{recipe_ratio:.1f}x"),
    Row("  bind0: bind() of a nonzero port (us)", "bind0", "fixed_bind_us",
        "fixed_bind_plain_us", "+{fixed_bind_extra_us:.2f} us"),
    Row(f"2 lease all {SCALE_SIZE} ports, 1 process, new dir (s)", "scale", "one_process_s"),
    Row("  the same, lock files in place (s)", "scale", "one_process_files_exist_s"),
    Row(f"  lease all {SCALE_SIZE}, 4 processes, new dir (s)", "scale", "four_processes_s", None,
        "{four_processes_leased} ports leased, {duplicates} twice"),
    Row("  next lease, 99% held by others, median (us)", "scale", "held_99_median_us"),
    Row("  next lease, 99% held by others, max (us)", "scale", "held_99_max_us"),
    Row("  PortsExhausted, 100% held (ms)", "scale", "held_100_exhausted_ms"),
    Row("3 EADDRINUSE, {processes} x {rounds} rounds", "collisions", "ephemeral_failed",
        "recipe_failed"),
    Row("4 failed binds under churn: auto range", "theft", "ephemeral_auto_failed",
        "recipe_failed"),
    Row("  explicit range {inside_os_range}", "theft", "ephemeral_inside_failed", None,
        "inside the OS auto-assign range (no target)"),
    Row("5 collect 500 tests, fastest CPU (s)", "startup", "with_plugin_s", "without_plugin_s",
        "{ratio:.3f}"),
    Row("  import pytest_ephemeral (ms)", "startup", "import_ms"),
)  # fmt: skip


def cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def row_text(row: Row, results: Results, met: dict[str, bool]) -> tuple[str, str, str, str]:
    """The four cells of a row: label, ours, theirs, the note with its target (if any)."""
    figures = results[row.section]
    note = row.note.format(**figures)
    shown = {row.ours, *(field for _, field, _, _ in string.Formatter().parse(row.note) if field)}
    for name, target in TARGETS.items():
        if target.section == row.section and target.figure in shown:
            note = f"{note}; {target} {'met' if met[name] else 'MISSED'}".lstrip("; ")
    theirs = "-" if row.theirs is None else cell(figures[row.theirs])
    return row.label.format(**figures), cell(figures[row.ours]), theirs, note


def table(machine: dict[str, Any], r: Results) -> str:
    """The report: every row with its target, then what the sections did."""
    met = check(r)
    header = ("Section: figure", "ephemeral", "recipe", "ratio; target")
    text = [header, *(row_text(row, r, met) for row in ROWS)]
    widths = [max(len(row[i]) for row in text) for i in range(3)]
    lines = [
        f"pytest-ephemeral benchmark, {machine['date']}",
        f"{machine['os']}, {machine['cores']} cores, {machine['python']}",
        f"OS auto-assign range {machine['os_auto_assign']}, plugin auto range"
        f" {machine['auto_range']}",
        "",
    ]
    for label, ours, theirs, note in text:
        line = f"{label:<{widths[0]}}  {ours:>{widths[1]}}  {theirs:>{widths[2]}}  {note}"
        lines.append(line.rstrip())
        if len(lines) == 5:
            lines.append("-" * (len(lines[-1]) + 10))
    missed = [name for name, ok in met.items() if not ok]
    summary = f"Targets met: {len(met) - len(missed)} of {len(met)}."
    if missed:
        summary += f" MISSED: {'; '.join(missed)}."
    lines += ["", *textwrap.wrap(summary, 100, subsequent_indent="     ")]
    lines += notes(machine, r)
    return "\n".join(lines)


def notes(machine: dict[str, Any], r: Results) -> list[str]:
    """What the sections did, under the table."""
    lat, co, th, st, cpu, b0 = (
        r[k] for k in ("latency", "collisions", "theft", "startup", "suite", "bind0")
    )
    return [
        "",
        f"1:   lock files created on {lat['create_fs']} (the default lock dir's file system). Lease"
        " end: the port in",
        "     TIME_WAIT left by a server that set SO_REUSEADDR, with"
        f" {lat['end_time_wait_sockets']} sockets in TIME_WAIT on the machine.",
        f"     The suite: {cpu['suite_tests']} tests, each a threaded HTTP/1.0 server and 10"
        " requests, on free_port",
        "     against the suite's own recipe fixture (no plugin); both suites started at once in"
        f" each of {cpu['suite_runs']} pairs",
        f"     (pair ratios from {cpu['suite_ratio_range'][0]:.3f} to"
        f" {cpu['suite_ratio_range'][1]:.3f}). Set-up + teardown: the main thread's CPU time"
        " there",
        "     (lease and release; the recipe's bind(0)); the first lease imports filelock and the",
        "     allocator. The rest: the process's CPU time less those (start-up, the plugin's",
        "     hooks, the tests' own work, alike in both, the end of the run). Medians of the",
        "     pairs' differences; the suite CPU ratio is the median of the pairs' ratios.",
        f"1:   bind0: {b0['rounds']} rounds in one test, the recipe with the adapter (each lease"
        " ended after it,",
        "     untimed) and the same on a socket whose bind is the C base's (the recipe column).",
        f"3-4: {co['processes']} processes at once; each round gets a port, waits"
        f" {co['gap_s'] * 1e3:g} ms (a server starting),",
        f"     listens on it without SO_REUSEADDR for {HOLD * 1e3:g} ms, closes.",
        f"4:   {th['background_connections']} outgoing loopback connections"
        f" ({th['background_per_s']:.0f}/s) in the background meanwhile.",
        "5:   the recipe column is the same suite collected with -p no:ephemeral; the fastest of"
        f" {st['runs']} collections",
        "     each, made in turn, bytecode caching on; the ratio is the quotient of the two.",
        f"Auto-range sections use the shared lock dir {machine['default_lock_dir']}.",
    ]


def markdown(machine: dict[str, Any], report: str, quick: bool) -> str:
    """The report as a Markdown fragment for the docs, saying when, where and how it was made."""
    how = "python benchmarks/bench.py" + (" --quick" if quick else "")
    kind = "a quick run (fewer rounds: a smoke test, noisier)" if quick else "a full run"
    return (
        f"Printed by `{how}`, {kind}, on {machine['date']}: {machine['os']},"
        f" {machine['cores']} cores, {machine['python']}; wall time {machine['wall_s']} s.\n"
        f"\n```text\n{report}\n```\n"
    )


def raise_fd_limit(needed: int) -> None:
    if sys.platform != "win32":
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke test")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="PATH",
        help="also write the table as Markdown here (docs/performance-table.md for the docs)",
    )
    options = parser.parse_args(argv)
    quick = options.quick
    raise_fd_limit(SCALE_SIZE + 256)
    system = read_system_ports()
    auto = load({})
    os_range = system.auto_assign[0] if system.auto_assign else (32768, 60999)
    machine: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "os": platform.platform(),
        "cores": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os_auto_assign": format_spans(system.auto_assign) if system.auto_assign else "unknown",
        "auto_range": str(auto.ports),
        "default_lock_dir": str(auto.lock_dir),
    }
    procs, n, gap = 8, 100 if quick else 1000, 0.001
    started = time.monotonic()
    results: Results = {}
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("latency", lambda: latency(1000 if quick else 5000)),
        ("suite", lambda: suite_cpu(1 if quick else 9, 50 if quick else 200)),
        ("bind0", lambda: bind0(500 if quick else 3000)),
        ("scale", lambda: scale(10 if quick else 50)),
        ("collisions", lambda: collisions(procs, n, gap)),
        ("theft", lambda: theft(procs, n, gap, os_range)),
        ("startup", lambda: startup(5 if quick else 21)),
    ]
    for name, step in steps:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = step()
    machine["wall_s"] = round(time.monotonic() - started, 1)
    report = table(machine, results)
    print(report)
    print(f"Wall time {machine['wall_s']} s.")
    if options.markdown:
        options.markdown.write_text(markdown(machine, report, quick))
    met = check(results)
    if options.json:
        targets = {
            name: {**target._asdict(), "target": str(target), "met": met[name]}
            for name, target in TARGETS.items()
        }
        figures = {"machine": machine, **results, "targets": targets}
        options.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
