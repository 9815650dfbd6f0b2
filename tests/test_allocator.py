"""The allocator alone: blocks, the walk over the range, threads, running out of descriptors."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_ephemeral import ConfigError, PortNotLeased, PortsExhausted
from pytest_ephemeral._allocator import PortAllocator, request_for
from pytest_ephemeral._lockfile import read_live_record

from .conftest import MakeRange
from .harness import Leaser, PrivateRange


def allocator(private: PrivateRange, exclude: str = "", timeout: float = 0) -> Leaser:
    """Leases in a private range, through this process's allocator for its lock dir."""
    return private.leaser(timeout, exclude=exclude or None)


class StartAt:
    """A random source whose first draw is ``index`` (where a first walk starts), then seeded."""

    def __init__(self, index: int) -> None:
        self._first: int | None = index
        self._rest = random.Random(index)

    def randrange(self, stop: int, /) -> int:
        if self._first is None:
            return self._rest.randrange(stop)
        first, self._first = self._first, None
        return first


@contextlib.contextmanager
def starting_at(private: PrivateRange, index: int) -> Iterator[Leaser]:
    """Leases through an allocator of its own, whose first walk starts at ``index``."""
    own = PortAllocator(str(private.lock_dir), True, StartAt(index))
    leaser = Leaser(allocator(private).settings, own)
    try:
        yield leaser
    finally:
        leaser.release_all()
        own.close()


@pytest.mark.parametrize("start", range(7))
def test_blocks_skip_a_held_port_wherever_the_walk_starts(
    private_range: MakeRange, start: int
) -> None:
    private = private_range(7)
    ports = private.ports
    with starting_at(private, 3) as other, starting_at(private, start) as walker:
        assert other.lease() == ports[3]
        block = walker.lease_block(3)
        assert block in (ports[:3], ports[4:])
        assert walker.lease_block(3) in (ports[:3], ports[4:])
        with pytest.raises(PortsExhausted, match=r": 1 locked .* 6 held by this process"):
            walker.lease()


def test_a_block_never_spans_a_hole_in_the_range(private_range: MakeRange) -> None:
    private = private_range(6)
    low = private.ports[0]
    spaced = allocator(private, exclude=str(low + 2))  # the range is low..low+1, low+3..low+5
    assert spaced.lease_block(3) == [low + 3, low + 4, low + 5]
    with pytest.raises(PortsExhausted, match="no block of 3 free consecutive ports"):
        spaced.lease_block(3)
    with pytest.raises(ConfigError, match=r"the longest run in .* is 3"):
        spaced.lease_block(4)
    assert spaced.lease_block(2) == [low, low + 1]
    spaced.release_all()


def test_the_walk_moves_on_from_the_last_lease(private_range: MakeRange) -> None:
    """A port just released is the last one this process comes back to (TIME_WAIT can pass)."""
    private = private_range(4)
    walker = allocator(private)
    first = walker.lease()
    walker.release(first)
    seen = []
    for _ in range(4):
        port = walker.lease()
        seen.append(port)
        walker.release(port)
    assert seen[-1] == first
    assert sorted(seen) == private.ports


def test_a_walk_that_lands_among_bound_ports_starts_again_elsewhere(
    private_range: MakeRange,
) -> None:
    """An earlier run leaves the ports it leased in a row in TIME_WAIT: a walk that starts in
    such a stretch must not try it port by port."""
    private = private_range(64)
    stretch = private.ports[:32]
    bound = [socket.socket() for _ in stretch]
    try:
        for sock, port in zip(bound, stretch, strict=True):
            sock.bind(("127.0.0.1", port))
        skipped = 0
        for _ in range(20):
            with starting_at(private, 0) as walker:
                port = walker.lease()
                assert port not in stretch
                skipped += walker.stats.skipped_bound
    finally:
        for sock in bound:
            sock.close()
    # Port by port, each lease would skip the 32 bound ports (640 in all); starting again at
    # random (half the range is free), a lease skips about 3.
    assert skipped < 320


@pytest.mark.parametrize("free", [0, 7, 15])
def test_a_lone_free_port_behind_bound_ones_is_found_from_every_start(
    private_range: MakeRange, free: int
) -> None:
    """Starting again at random must not stop a walk from seeing every port."""
    private = private_range(16)
    bound = [socket.socket() for _ in range(15)]
    try:
        for sock, port in zip(bound, private.ports[:free] + private.ports[free + 1 :], strict=True):
            sock.bind(("127.0.0.1", port))
        for start in range(16):
            with starting_at(private, start) as walker:
                assert walker.lease() == private.ports[free]
        with pytest.raises(PortsExhausted, match="no block of 2 free consecutive ports"):
            allocator(private).lease_block(2)
    finally:
        for sock in bound:
            sock.close()


def test_threads_never_share_a_port(private_range: MakeRange) -> None:
    private = private_range(6)
    shared = allocator(private, timeout=30)
    holding: set[int] = set()
    guard = threading.Lock()
    clashes: list[int] = []

    def work() -> None:
        for _ in range(200):
            port = shared.lease()
            with guard:
                if port in holding:
                    clashes.append(port)
                holding.add(port)
            try:  # the kernel is the judge: a port given twice fails one of the binds
                with socket.socket() as server:
                    server.bind(("127.0.0.1", port))
                    server.listen()
            except OSError:
                clashes.append(port)
            with guard:
                holding.discard(port)
            shared.release(port)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not clashes
    assert shared.stats.leased == 8 * 200
    assert not shared.held


def test_releasing_what_is_not_held(private_range: MakeRange) -> None:
    private = private_range(2)
    one = allocator(private)
    port = one.lease()
    one.release(port)
    with pytest.raises(PortNotLeased, match=f"port {port} is not leased in"):
        one.allocator.release(port)
    with pytest.raises(PortNotLeased, match=f"port {port} is not leased in"):
        one.allocator.lease_of(port)
    assert issubclass(PortNotLeased, ValueError)


OUT_OF_DESCRIPTORS = """
import errno, os, resource, sys
from pytest_ephemeral import EphemeralError
from pytest_ephemeral._allocator import allocator_for, request_for
from pytest_ephemeral._settings import Raw
from pytest_ephemeral._sources import load

resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[4]), int(sys.argv[4])))
settings = load({"port_range": Raw(sys.argv[1], "argv"), "lock_dir": Raw(sys.argv[2], "argv")})
allocator = allocator_for(settings.lock_dir)
allocator.release(allocator.lease(request_for(settings))[0])  # the lock dir is prepared: open
before = len(os.listdir("/proc/self/fd"))
try:
    while True:
        allocator.lease(request_for(settings), int(sys.argv[3]))
except EphemeralError as error:
    assert "out of file descriptors" in str(error) and "ulimit -n" in str(error), error
    assert isinstance(error.__cause__, OSError) and error.__cause__.errno == errno.EMFILE
held = allocator.held
for port in held:
    allocator.release(port)
held = len(held)
print(held, before, len(os.listdir("/proc/self/fd")))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
# Three limits in a row: the limit strikes at each position within a block of three.
@pytest.mark.parametrize(("block", "limit"), [(1, 40), (3, 40), (3, 41), (3, 42)])
def test_running_out_of_descriptors_is_not_reported_as_busy_ports(
    private_range: MakeRange, block: int, limit: int
) -> None:
    private = private_range(60)
    command = [
        sys.executable,
        "-c",
        OUT_OF_DESCRIPTORS,
        private.spec,
        str(private.lock_dir),
        str(block),
        str(limit),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    held, open_before, open_after = map(int, done.stdout.split())
    assert (
        20 < held < limit
    )  # it stopped at the descriptor limit, with its own error, not exhaustion
    assert open_after == open_before  # and every lock it had taken was given back


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need a privilege on Windows")
def test_one_lock_dir_spelled_two_ways_is_one(private_range: MakeRange, tmp_path: Path) -> None:
    """Ports held through one spelling are this process's through the other too: no waiting."""
    private = private_range(2)
    (tmp_path / "alias").symlink_to(private.lock_dir.parent)
    alias = PrivateRange(private.ports, tmp_path / "alias" / private.lock_dir.name)
    holder = allocator(alias, timeout=60)
    holder.lease_block(2)
    started = time.monotonic()
    with pytest.raises(PortsExhausted, match=r"now: .* 2 held by this process"):
        allocator(private, timeout=60).lease()
    assert time.monotonic() - started < 30
    holder.release_all()


def test_a_stale_record_is_replaced_by_the_new_holders(private_range: MakeRange) -> None:
    private = private_range(1)
    path = private.lock_dir / f"{private.ports[0]}.lock"
    path.write_text('\n{"pid": 1, "nodeid": "dead.py::test_gone", "worker": "gw9"}' + " " * 500)
    path.chmod(0o600)
    leaser = allocator(private)
    port = leaser.lease()
    try:
        record = read_live_record(str(private.lock_dir), port)
        assert record is not None
        assert (record["pid"], record["worker"], record["nodeid"]) == (os.getpid(), None, None)
    finally:
        leaser.release(port)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
# Python 3.12+ warns about fork() in a process with threads (an xdist worker has one); the child
# here only releases and exits.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_never_unlocks_its_parents_lease(private_range: MakeRange) -> None:
    private = private_range(1)
    parent = allocator(private)
    port = parent.lease()
    pid = os.fork()
    if pid == 0:  # the child: release what it inherited, then leave without cleanup
        code = 0
        try:
            parent.release(port)
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    record = read_live_record(str(private.lock_dir), port)
    assert record is not None
    assert record["pid"] == os.getpid()  # still held here, by this process
    parent.release(port)
    assert read_live_record(str(private.lock_dir), port) is None


def time_wait_on(port: int) -> None:
    """Leave ``port`` in TIME_WAIT as a server that sets SO_REUSEADDR and closes first does."""
    with socket.create_server(("127.0.0.1", port)) as server:
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()
        client.close()


def reusing(private: PrivateRange) -> Leaser:
    return private.leaser(reuse_addr="yes")


LINUX_ONLY = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="SO_REUSEADDR semantics of Linux"
)


@LINUX_ONLY
def test_reuse_addr_lets_servers_that_set_it_have_a_port_in_time_wait(
    private_range: MakeRange,
) -> None:
    private = private_range(1)
    port = private.ports[0]
    time_wait_on(port)
    with pytest.raises(PortsExhausted, match="1 bound by other programs or in TIME_WAIT"):
        allocator(private).lease()
    leases = reusing(private)
    assert leases.lease() == port
    with socket.create_server(("127.0.0.1", port)) as server:  # SO_REUSEADDR: it binds
        assert server.getsockname()[1] == port
    leases.release(port)


@LINUX_ONLY
@pytest.mark.parametrize("holder", ["listener", "bound", "bound-with-reuse", "bound-udp"])
def test_reuse_addr_still_refuses_listeners_and_bound_sockets(
    private_range: MakeRange, holder: str
) -> None:
    private = private_range(1)
    port = private.ports[0]
    kind = socket.SOCK_DGRAM if holder == "bound-udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as sock:
        reuse = holder in ("listener", "bound-with-reuse")  # a server between bind and listen
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse)
        sock.bind(("127.0.0.1", port))
        if holder == "listener":
            sock.listen()
        with pytest.raises(PortsExhausted, match="1 bound by other programs"):
            reusing(private).lease("udp" if holder == "bound-udp" else "tcp")


# --- the end of every lease checks that its lock file is still in place ---------------------

HOLD_ONE = """
import sys, warnings
from pytest_ephemeral._allocator import allocator_for, request_for
from pytest_ephemeral._settings import Raw
from pytest_ephemeral._sources import load

settings = load({"port_range": Raw(sys.argv[1], "argv"), "lock_dir": Raw(sys.argv[2], "argv")})
allocator = allocator_for(settings.lock_dir)
port = allocator.lease(request_for(settings))[0]
print(port, flush=True)
sys.stdin.readline()  # hold it until told to release it
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    allocator.release(port)
print(" | ".join(f"{w.category.__name__}: {w.message}" for w in seen), flush=True)
"""


def _start(script: str, private: PrivateRange) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", script, private.spec, str(private.lock_dir)]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _release_in(process: subprocess.Popen[str]) -> str:
    """Tell a HOLD_ONE process to release its lease; what it warned."""
    out, _ = process.communicate("\n", timeout=60)
    assert process.returncode == 0
    return out


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_single_lease_whose_lock_dir_went_warns_when_it_ends(
    private_range: MakeRange, tmp_path: Path, how: str
) -> None:
    """Process A holds the one port; its lock dir goes; process B leases the same port (as it
    can, on a fresh lock file); A's release must say the port may have been shared."""
    private = private_range(1)
    with _start(HOLD_ONE, private) as first:
        assert first.stdout is not None
        port = int(first.stdout.readline())
        if how == "removed":
            shutil.rmtree(private.lock_dir)
        else:
            private.lock_dir.rename(tmp_path / "moved-away")
            private.lock_dir.mkdir(mode=0o700)
        with _start(HOLD_ONE, private) as second:
            assert second.stdout is not None
            assert int(second.stdout.readline()) == port  # given twice: what the warning is for
            said = _release_in(first)
            assert said.startswith("RuntimeWarning: ")
            assert f"port(s) {port};" in said
            assert "may be shared now" in said
            assert _release_in(second).strip() == ""  # its lock file is still in place


def test_a_lease_ends_without_a_warning_when_its_lock_file_stayed(
    private_range: MakeRange,
) -> None:
    private = private_range(1)
    with _start(HOLD_ONE, private) as process:
        assert process.stdout is not None
        process.stdout.readline()
        assert _release_in(process).strip() == ""


# --- the bounded attempt and the process-wide query, for the bind0 adapter and the audit ------


def test_try_lease_tries_at_most_its_share_and_never_waits(private_range: MakeRange) -> None:
    private = private_range(8)
    with starting_at(private, 0) as holder:
        for _ in range(6):
            holder.lease()  # ports 0-5: each a candidate a bounded attempt meets first
        with starting_at(private, 0) as bounded:
            request = request_for(bounded.settings)
            started = time.monotonic()
            assert bounded.allocator.try_lease(request, 4) is None  # 0-3 locked by another
            port = bounded.allocator.try_lease(request, 4)  # goes on where it stopped: 4, 5, 6
            assert time.monotonic() - started < 5  # no waiting (timeout would allow 0 anyway)
            assert port == private.ports[6]
            bounded.allocator.release(port)


HELD_HERE = """
import sys
from pytest_ephemeral._allocator import allocator_for, held_here, request_for
from pytest_ephemeral._settings import Raw
from pytest_ephemeral._sources import load

said = []
leases = []
for lock_dir in sys.argv[2:]:  # one port, leased in two lock dirs
    settings = load({"port_range": Raw(sys.argv[1], "argv"), "lock_dir": Raw(lock_dir, "argv")})
    allocator = allocator_for(settings.lock_dir)
    leases.append((allocator, allocator.lease(request_for(settings))[0]))
port = leases[0][1]
said.append(held_here(port))
for allocator, _ in leases:
    allocator.release(port)
    said.append(held_here(port))
print(*said)
"""


def test_held_here_knows_every_lock_dir_of_this_process(
    private_range: MakeRange, tmp_path: Path
) -> None:
    """In a process of its own: the ports of this suite's private ranges are all held here."""
    private = private_range(1)
    (tmp_path / "second").mkdir(mode=0o700)
    command = [sys.executable, "-c", HELD_HERE, private.spec]
    command += [str(private.lock_dir), str(tmp_path / "second")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["True", "True", "False"]
