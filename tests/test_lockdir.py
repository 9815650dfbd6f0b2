"""The lock dir and its files under attack and accident: bad dirs, odd files, a vanished dir,
missing privileges, no space. Real files, real mounts, a real unprivileged user where root."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest

from pytest_ephemeral import LockDirError, PortsExhausted
from pytest_ephemeral._lockdir import LockDir
from pytest_ephemeral._lockfile import read_live_record
from pytest_ephemeral._settings import default_lock_dir

from .conftest import MakeRange
from .harness import Leaser, PrivateRange
from .helpers import run_inline

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="POSIX lock dir checks: modes, uids, FIFOs, symlinks"
)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NEEDS_ROOT = pytest.mark.skipif(not IS_ROOT, reason="needs root (chown, mount, a second user)")
NOBODY = 65534


def can_mount() -> bool:
    if not IS_ROOT or not shutil.which("unshare"):
        return False
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
        check=False,
        timeout=30,
    )
    return done.returncode == 0


NEEDS_MOUNT = pytest.mark.skipif(not can_mount(), reason="cannot mount a tmpfs in a namespace")

LEASING_TESTS = """
def test_leases_nothing():
    pass

def test_free_port(free_port):
    pass

def test_factory(port_factory):
    port_factory()
"""


@contextmanager
def leasing(private: PrivateRange) -> Iterator[Leaser]:
    """Leases in a private range, all released at the end of the block."""
    leases = private.leaser()
    try:
        yield leases
    finally:
        leases.release_all()


# --- 1. A bad lock dir fails the tests that lease, not the run ------------------------------


def _symlink(tmp_path: Path) -> Path:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    return tmp_path / "link"


def _file(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("")
    return tmp_path / "file"


def _under_a_file(tmp_path: Path) -> Path:
    return _file(tmp_path) / "locks"


def _writable_by_others(tmp_path: Path) -> Path:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    return shared


def _others(tmp_path: Path) -> Path:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    return theirs


BAD_DIRS = {
    "symlink": (_symlink, "is a symbolic link"),
    "file": (_file, "is not a directory"),
    "under-a-file": (_under_a_file, "cannot be created: Not a directory"),
    "writable-by-others": (_writable_by_others, "is writable by other users and has no sticky"),
    "other-owner": (_others, f"is owned by another user (uid {NOBODY})"),
}


@pytest.mark.parametrize("case", BAD_DIRS)
def test_a_bad_lock_dir_fails_only_the_tests_that_lease(
    pytester: pytest.Pytester, tmp_path: Path, case: str
) -> None:
    if case == "other-owner" and not IS_ROOT:
        pytest.skip("needs root to chown")
    make, reason = BAD_DIRS[case]
    lock_dir = make(tmp_path)
    pytester.makepyfile(LEASING_TESTS)
    result = run_inline(pytester, "-p", "no:xdist", f"--ephemeral-lock-dir={lock_dir}")
    result.assert_outcomes(passed=1, errors=1, failed=1)  # the run goes on: exit 1, not 4
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([f"ephemeral ports: *, lock dir: {lock_dir}, timeout: *"])
    message = f"*LockDirError: lock dir '{lock_dir}' {reason}*"
    advice = "*Fix this and try again, or choose another lock dir with --ephemeral-lock-dir."
    result.stdout.fnmatch_lines([message, advice, message, advice])  # both leasing tests


def test_a_bad_lock_dir_in_a_script_names_the_arguments(tmp_path: Path) -> None:
    from pytest_ephemeral import LockDirError, lease_port

    with (
        pytest.raises(LockDirError, match="is not a directory") as caught,
        lease_port(lock_dir=_file(tmp_path)),
    ):
        pass
    assert "lock_dir=" in str(caught.value)
    assert "--ephemeral" not in str(caught.value)


@NEEDS_MOUNT
@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ("ro", "Read-only file system (choose a lock dir on a writable file system)"),
        ("nr_inodes=1", "No space left on device (free space or inodes on its file system)"),
    ],
    ids=["read-only", "no-inodes"],
)
def test_a_lock_dir_on_a_full_or_read_only_file_system(
    pytester: pytest.Pytester, options: str, reason: str
) -> None:
    mount = pytester.path / "mnt"
    mount.mkdir()
    pytester.makepyfile(LEASING_TESTS)
    script = (
        f"mount -t tmpfs -o size=64k,{options} tmpfs {mount} && exec {sys.executable} -m pytest"
        f" -p no:xdist -p no:cacheprovider --ephemeral-lock-dir={mount}"
    )
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed, 1 passed, 1 error" in done.stdout
    assert f"LockDirError: lock dir '{mount}' cannot be written to: {reason}" in done.stdout


# --- 2. One default lock dir per OS user per machine ----------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX default")
def test_the_default_lock_dir_ignores_tmpdir_and_user_names(tmp_path: Path) -> None:
    code = "from pytest_ephemeral._settings import default_lock_dir; print(default_lock_dir())"
    seen = set()
    for env in ({}, {"TMPDIR": str(tmp_path), "USER": "alice", "LOGNAME": "bob"}):
        done = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        seen.add(done.stdout.strip())
    assert seen == {default_lock_dir()}
    assert default_lock_dir().endswith(f"/pytest-ephemeral-{os.geteuid()}")


def in_fresh_shm(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (sh) in a new mount namespace over a fresh, large tmpfs ``/dev/shm``, with
    no lock dir set: the default lock dir there is this test's alone."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_EPHEMERAL_LOCK_DIR"}
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1g tmpfs /dev/shm && {script}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@NEEDS_MOUNT
def test_the_default_lock_dir_is_made_private_on_first_lease(tmp_path: Path) -> None:
    ours = f"/dev/shm/pytest-ephemeral-{os.geteuid()}"
    lease = "from pytest_ephemeral import lease_port\nwith lease_port(): pass"
    done = in_fresh_shm(
        f"mkdir -m 755 {ours} && {sys.executable} -c '{lease}' && stat -c %a {ours}", tmp_path
    )
    assert done.stdout.strip() == "700", done.stderr


@NEEDS_MOUNT
def test_a_squatted_default_lock_dir_fails_only_leases(pytester: pytest.Pytester) -> None:
    """Another user created our default lock dir first: runs that lease nothing still pass."""
    pytester.makepyfile(LEASING_TESTS)
    squatted = f"/dev/shm/pytest-ephemeral-{os.geteuid()}"
    script = (
        f"mkdir -m 777 {squatted} && chown {NOBODY}:{NOBODY} {squatted}"
        f" && exec {sys.executable} -m pytest -p no:xdist -p no:cacheprovider"
    )
    done = in_fresh_shm(script, pytester.path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed, 1 passed, 1 error" in done.stdout
    assert f"lock dir: {squatted}" in done.stdout
    assert f"lock dir '{squatted}' is owned by another user (uid {NOBODY})" in done.stdout


def test_a_blank_lock_dir_on_the_command_line_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = run_inline(pytester, "-p", "no:xdist", "--ephemeral-lock-dir= ")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: bad value ' ' from command-line option --ephemeral-lock-dir: empty*"]
    )


def test_a_blank_lock_dir_in_the_environment_means_the_default(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_EPHEMERAL_LOCK_DIR", "  ")
    pytester.makepyfile("def test_nothing(): pass")
    result = run_inline(pytester, "-p", "no:xdist")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*lock dir: {default_lock_dir()}, timeout: *"])


# --- 3. Odd files at lock paths -------------------------------------------------------------


@pytest.fixture
def odd_files(
    private_range: MakeRange, tmp_path: Path
) -> Iterator[tuple[PrivateRange, dict[int, str]]]:
    """A private range of 5 (6 as root) ports, each lock path holding something odd."""
    private = private_range(6 if IS_ROOT else 5)
    paths = [private.lock_dir / f"{port}.lock" for port in private.ports]
    expected = {}
    os.mkfifo(paths[0])
    expected[private.ports[0]] = "a FIFO"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(paths[1]))
    expected[private.ports[1]] = "a socket or a device"  # open() of a socket file: ENXIO
    paths[2].mkdir()
    expected[private.ports[2]] = "a directory"
    (tmp_path / "target").write_text("precious\n")
    paths[3].symlink_to(tmp_path / "target")
    expected[private.ports[3]] = "a symbolic link"
    os.link(tmp_path / "target", paths[4])
    expected[private.ports[4]] = "a file with 2 hard links"
    if IS_ROOT:
        paths[5].write_text("")
        os.chown(paths[5], NOBODY, NOBODY)
        expected[private.ports[5]] = f"a file of another user (uid {NOBODY})"
    try:
        yield private, expected
    finally:
        unix.close()


ODD_SCRIPT = """
import json, sys
from pytest_ephemeral import PortsExhausted, lease_port
try:
    with lease_port(port_range=sys.argv[1], lock_dir=sys.argv[2], timeout=30) as port:
        print(json.dumps({"port": port}))
except PortsExhausted as error:
    print(json.dumps({"unusable": {str(k): v for k, v in error.unusable.items()},
                      "message": str(error)}))
"""


def test_odd_files_at_lock_paths_are_skipped_and_named(
    odd_files: tuple[PrivateRange, dict[int, str]], tmp_path: Path
) -> None:
    private, expected = odd_files
    # In a child with a bound: 0.1 hung here forever on the FIFO.
    done = subprocess.run(
        [sys.executable, "-c", ODD_SCRIPT, private.spec, str(private.lock_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = json.loads(done.stdout)
    assert {int(k): v for k, v in found["unusable"].items()} == expected
    message = found["message"]
    assert f"{len(expected)} with an unusable lock file" in message
    assert "within" not in message  # waiting cannot clear them: it failed at once
    for port, reason in expected.items():
        assert f"port {port}: {reason}" in message
    assert (tmp_path / "target").read_text() == "precious\n"  # nothing written through a link


def test_status_names_odd_files_instead_of_failing(
    odd_files: tuple[PrivateRange, dict[int, str]],
) -> None:
    private, expected = odd_files
    done = subprocess.run(
        [sys.executable, "-m", "pytest_ephemeral", "status", "--lock-dir", str(private.lock_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for port, reason in expected.items():
        assert f"unusable lock file: {reason}" in done.stdout, (port, done.stdout)


def test_a_lease_skips_odd_files_and_takes_a_good_port(private_range: MakeRange) -> None:
    private = private_range(2)
    os.mkfifo(private.lock_dir / f"{private.ports[0]}.lock")
    with leasing(private) as leases:
        assert leases.lease() == private.ports[1]


def test_a_holder_record_is_never_written_into_a_file_others_can_read(
    private_range: MakeRange,
) -> None:
    private = private_range(1)
    path = private.lock_dir / f"{private.ports[0]}.lock"
    path.write_text("\n")
    path.chmod(0o644)
    with leasing(private) as leases:
        port = leases.lease()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        record = read_live_record(str(private.lock_dir), port)
        assert record is not None
        assert record["pid"] == os.getpid()


# --- 4. A lock dir that vanishes mid-run ----------------------------------------------------


def test_a_vanished_lock_dir_is_recreated_and_held_ports_locked_again(
    private_range: MakeRange,
) -> None:
    private = private_range(3)
    with leasing(private) as leases, warnings.catch_warnings():
        warnings.simplefilter("error")  # nobody took a port meanwhile: no warning
        held = leases.lease_block(2)
        shutil.rmtree(private.lock_dir)
        third = leases.lease()
        assert third not in held
        assert stat.S_IMODE(private.lock_dir.stat().st_mode) == 0o700
        for port in held:  # locked again, on fresh files, records and all
            record = read_live_record(str(private.lock_dir), port)
            assert record is not None
            assert record["pid"] == os.getpid()
        shutil.rmtree(private.lock_dir)
        leases.release(third)  # a release that finds the dir gone recovers too
        for port in held:
            assert read_live_record(str(private.lock_dir), port) is not None


TAKE_ONE = """
import sys
from pytest_ephemeral._allocator import allocator_for, request_for
from pytest_ephemeral._settings import Raw
from pytest_ephemeral._sources import load
settings = load({"port_range": Raw(sys.argv[1], "argv"), "lock_dir": Raw(sys.argv[2], "argv")})
print(allocator_for(settings.lock_dir).lease(request_for(settings))[0], flush=True)
sys.stdin.read()
"""


def test_a_port_taken_while_the_dir_was_gone_is_named_in_one_warning(
    private_range: MakeRange,
) -> None:
    private = private_range(3)
    with leasing(private) as leases:
        held = leases.lease_block(2)
        shutil.rmtree(private.lock_dir)
        command = [sys.executable, "-c", TAKE_ONE, f"{held[1]}-{held[1]}", str(private.lock_dir)]
        with subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        ) as other:
            try:
                assert other.stdout is not None
                assert other.stdout.readline().strip() == str(held[1])  # it recreated the dir
                with pytest.warns(RuntimeWarning, match=rf"port\(s\) {held[1]};") as seen:
                    leases.lease()
                assert len(seen) == 1
                assert f"port(s) {held[1]};" in str(seen[0].message)  # only that one
            finally:
                other.kill()


# --- 5. Missing privileges ------------------------------------------------------------------

UNPRIVILEGED = """
import json, os, sys
import pytest_ephemeral._allocator, pytest_ephemeral._api, pytest_ephemeral._leakcheck
from pytest_ephemeral import ConfigError, PortsExhausted, lease_port
from pytest_ephemeral._allocator import allocator_for, request_for
from pytest_ephemeral._settings import Raw
from pytest_ephemeral._sources import load

os.setgroups([])
os.setgid(65534)
os.setuid(65534)  # from here on: nobody, without CAP_NET_BIND_SERVICE
port_range, lock_dir = sys.argv[1], sys.argv[2]
try:
    settings = load({"port_range": Raw(port_range, "argv"), "lock_dir": Raw(lock_dir, "argv"),
                        "timeout": Raw(30, "argv")})
except ConfigError as error:
    print(json.dumps({"config": str(error)}))
    sys.exit()
allocator = allocator_for(settings.lock_dir)
ports = []
try:
    while True:
        ports += allocator.lease(request_for(settings))
except PortsExhausted as error:
    print(json.dumps({"ports": ports, "message": str(error)}))
"""


def run_unprivileged(port_range: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ephemeral-nobody-") as home:
        os.chown(home, NOBODY, NOBODY)
        done = subprocess.run(
            [sys.executable, "-c", UNPRIVILEGED, port_range, os.path.join(home, "locks")],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    return cast(dict[str, Any], json.loads(done.stdout))


@NEEDS_ROOT
def test_a_range_this_process_may_not_bind_is_refused_at_configure() -> None:
    result = run_unprivileged("1000-1010")
    assert result == {
        "config": "bad value '1000-1010' from argv: this process may not bind ports in it:"
        " Permission denied (ports below 1024 need root)"
    }


@NEEDS_ROOT
def test_forbidden_ports_are_not_waited_for_nor_blamed_on_others() -> None:
    result = run_unprivileged("1020-1026")  # 1020-1023 need root; 1024-1026 do not
    assert sorted(result["ports"]) == [1024, 1025, 1026]
    message = str(result["message"])
    assert "now:" in message  # at once, not "within 30 s"
    assert "0 bound by other programs" in message
    assert "4 not allowed to this process (ports below 1024 need root)" in message


def test_exhaustion_of_a_plain_range_still_says_bound(private_range: MakeRange) -> None:
    private = private_range(1)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", private.ports[0]))
        with pytest.raises(PortsExhausted, match="1 bound by other programs") as caught:
            private.leaser(timeout=0).lease()
    assert caught.value.bound == 1
    assert caught.value.forbidden == 0


NO_INODES = """
import subprocess, sys
lock_dir = sys.argv[2]
options = "size=64k,nr_inodes=4"
subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", lock_dir], check=True)
from pytest_ephemeral import LockDirError, lease_port
from pytest_ephemeral._allocator import allocator_for, request_for
from pytest_ephemeral._settings import Raw
from pytest_ephemeral._sources import load
settings = load({"port_range": Raw(sys.argv[1], "argv"), "lock_dir": Raw(lock_dir, "argv")})
allocator = allocator_for(settings.lock_dir)
ports = []
try:
    while True:
        ports += allocator.lease(request_for(settings))
except LockDirError as error:
    import os
    print(len(ports), len(os.listdir("/proc/self/fd")) - len(ports), error)
"""


@NEEDS_MOUNT
def test_running_out_of_inodes_mid_run_is_a_clear_error(
    private_range: MakeRange, tmp_path: Path
) -> None:
    private = private_range(10)
    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(
        ["unshare", "-m", sys.executable, "-c", NO_INODES, private.spec, str(mount)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    leased, _, message = done.stdout.strip().split(" ", 2)
    assert int(leased) == 3  # four inodes: the mount's root and three lock files
    assert message == (
        f"lock dir '{mount}' cannot take a new lock file: No space left on device"
        " (free space or inodes on its file system)"
    )


# --- Found by review: errors in the middle of recovery and teardown keep no lock --------------


def test_a_release_whose_recovery_fails_still_gives_the_lock_back(
    private_range: MakeRange, tmp_path: Path
) -> None:
    private = private_range(2)
    leases = private.leaser()
    first, second = leases.lease_block(2)
    shutil.rmtree(private.lock_dir)
    (tmp_path / "elsewhere").mkdir()
    private.lock_dir.symlink_to(tmp_path / "elsewhere")  # planted while the dir was gone
    with pytest.raises(LockDirError, match="is a symbolic link"):
        leases.release(first)
    assert first not in leases.allocator.held  # released, though the recovery failed
    private.lock_dir.unlink()
    with pytest.raises(LockDirError, match="is a symbolic link"):  # the failure is kept
        leases.lease()
    with pytest.warns(RuntimeWarning, match=f"port\\(s\\) {second}; .* may be shared now"):
        leases.release(second)  # its lock file went with the dir


def test_a_replaced_lock_dir_is_found_at_the_next_release_and_leased_in_from_then_on(
    private_range: MakeRange, tmp_path: Path
) -> None:
    """Leases do not check the lock dir when they start: the end of a lease finds the directory
    replaced, warns, and prepares the one now at the path for the leases after it."""
    private = private_range(3)
    leases = private.leaser()
    held = leases.lease()
    private.lock_dir.rename(tmp_path / "moved-away")
    private.lock_dir.mkdir(mode=0o700)
    with pytest.warns(RuntimeWarning, match=rf"port\(s\) {held}; .* may be shared now"):
        leases.release(held)
    port = leases.lease()
    assert read_live_record(str(private.lock_dir), port) is not None  # in the new directory
    assert read_live_record(str(tmp_path / "moved-away"), port) is None
    leases.release(port)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_never_takes_over_its_parents_leases(private_range: MakeRange) -> None:
    private = private_range(3)
    leases = private.leaser()
    held = leases.lease()
    shutil.rmtree(private.lock_dir)
    pid = os.fork()
    if pid == 0:  # the child leases for itself after the dir vanished: it recovers the dir
        code = 0
        try:
            leases.lease()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the child locked nothing of ours: no "taken" warning
        leases.lease()  # the parent recovers, and locks its own port again
    record = read_live_record(str(private.lock_dir), held)
    assert record is not None
    assert record["pid"] == os.getpid()
    leases.release_all()


def test_the_write_check_never_opens_a_name_planted_in_a_shared_dir(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # writable by all, sticky: accepted as an explicit lock dir
    code = (
        "import os, sys\n"
        "from pytest_ephemeral._lockdir import prepare\n"
        "for pid in (os.getpid(), os.getppid()):\n"  # the names a pid-named check would use
        "    os.mkfifo(os.path.join(sys.argv[1], f'.write-check-{pid}'))\n"
        "os.close(prepare(sys.argv[1], explicit=True).fd)\n"
    )
    # In a child with a bound: opening a planted FIFO would block forever.
    subprocess.run([sys.executable, "-c", code, str(shared)], check=True, timeout=60)


SESSIONS_IN_ONE_PROCESS = """
import sys
import pytest

seen = []


class Probe:
    def pytest_sessionstart(self, session):
        from pytest_ephemeral import lease_port

        with lease_port() as port:
            seen.append(port)


runs = [sys.argv[1:3], sys.argv[3:5]]  # (range, lock dir) of each session
for spec, lock_dir in runs:
    options = [f"--ephemeral-port-range={spec}", f"--ephemeral-lock-dir={lock_dir}"]
    code = pytest.main(["-q", "-p", "no:xdist", "-p", "no:cacheprovider", "--co", *options],
                       plugins=[Probe()])
    assert code in (0, 5), code
low_a, low_b = (int(spec.split("-")[0]) for spec, _ in runs)
assert seen[0] - low_a < 5 and seen[1] - low_b < 5, seen
print("ok", seen)
"""


def test_lease_port_follows_each_session_in_one_process(
    private_range: MakeRange, tmp_path: Path
) -> None:
    first, second = private_range(5), private_range(5)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            SESSIONS_IN_ONE_PROCESS,
            *(first.spec, str(first.lock_dir), second.spec, str(second.lock_dir)),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- LockDir: prepared on first use, then watched ----------------------------------------------


def test_a_lock_dir_is_prepared_on_first_use_and_noticed_when_it_goes(tmp_path: Path) -> None:
    path = tmp_path / "locks"
    lock_dir = LockDir(str(path), explicit=True)
    assert not path.exists()  # nothing is done before the first use
    lock_dir.ensure()
    assert path.is_dir()
    assert lock_dir.unchanged()  # still the one prepared
    path.rename(tmp_path / "moved")
    path.mkdir(mode=0o700)
    assert not lock_dir.unchanged()  # replaced
    lock_dir.ensure()  # prepared already: nothing checked, nothing done
    assert not lock_dir.unchanged()
    lock_dir.reprepare()
    assert lock_dir.unchanged()
    shutil.rmtree(path)
    assert not lock_dir.unchanged()  # gone
    lock_dir.close()


def test_a_lock_dir_that_cannot_be_prepared_fails_every_later_use(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    lock_dir = LockDir(str(tmp_path / "file"), explicit=True)
    with pytest.raises(LockDirError, match="is not a directory"):
        lock_dir.ensure()
    (tmp_path / "file").unlink()
    with pytest.raises(LockDirError, match="is not a directory"):  # the first reason, kept
        lock_dir.ensure()
