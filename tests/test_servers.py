"""The server example (examples/servers): real PostgreSQL and Redis servers placed by
pytest-postgresql and pytest-redis, two runs at once under ``-n 4``, never on one port."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import MakeRange

# Real servers run as another POSIX user here (PostgreSQL refuses root): not on Windows.
pwd = pytest.importorskip("pwd", reason="POSIX users")

EXAMPLE = Path(__file__).parent.parent / "examples" / "servers"
PG_CTL = shutil.which("pg_ctl") or max(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), default=None)
REDIS_SERVER = shutil.which("redis-server")
INSTALL = (
    "install them with `apt-get install postgresql redis-server` (Debian, Ubuntu; .ci/run does"
    " this when run as root) or your system's PostgreSQL and Redis server packages"
)
RUN_TIMEOUT = 600


def _not_root() -> list[str]:
    """A command prefix that runs the example as a user other than root.

    initdb refuses to run as root and pytest-postgresql has no way around it. As root, the run
    goes into a user namespace as the ``postgres`` user's uid (``nobody``'s without it): initdb
    sees that uid, while outside the namespace the files are still root's, so this suite's
    temporary directories (mode 0700) and the virtual environment stay reachable.
    """
    if os.geteuid() != 0:
        return []
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        user = pwd.getpwnam("nobody")
    prefix = ["unshare", "--user", f"--map-user={user.pw_uid}", f"--map-group={user.pw_gid}"]
    try:
        subprocess.run([*prefix, "true"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(
            f"running as root, where initdb refuses to run, and `unshare --user` to run it as"
            f" another uid fails here ({error}): run this test as a user other than root"
        )
    return prefix


@pytest.mark.skipif(
    PG_CTL is None or REDIS_SERVER is None,
    reason=f"needs the PostgreSQL (pg_ctl) and Redis (redis-server) server binaries: {INSTALL}",
)
def test_two_runs_at_once_under_xdist_never_clash(tmp_path: Path, private_range: MakeRange) -> None:
    """Both runs start their servers (one per worker, per module and per test) on ports leased
    from one range and lock dir; a clash would fail a server's start, so both must pass."""
    assert PG_CTL is not None
    assert REDIS_SERVER is not None
    prefix = _not_root()
    private = private_range(64)
    # Redis's unix socket lives under the basetemp, and its path must stay under 108 bytes.
    short = Path(tempfile.mkdtemp(prefix="eph-"))
    try:
        outputs = _run_twice_at_once(prefix, private.args, short)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    for returncode, output in outputs:
        assert returncode == 0, output
        assert "14 passed" in output, output
    leased = {int(path.name.split(".")[0]) for path in private.lock_dir.glob("*.lock")}
    # Per run: 4 workers x (a PostgreSQL and a Redis server per session) at least.
    assert len(leased) >= 8
    assert leased <= set(private.ports)


def _run_twice_at_once(prefix: list[str], args: list[str], root: Path) -> list[tuple[int, str]]:
    assert PG_CTL is not None
    assert REDIS_SERVER is not None
    runs = []
    for name in ("1", "2"):
        copy = root / name / "servers"
        shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("__pycache__"))
        command = [
            *prefix,
            sys.executable,
            "-m",
            "pytest",
            str(copy),
            "-n",
            "4",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            f"--basetemp={root / name / 't'}",
            f"--postgresql-exec={PG_CTL}",
            f"--redis-exec={REDIS_SERVER}",
            *args,
        ]
        runs.append(
            subprocess.Popen(
                command,
                cwd=copy,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "HOME": str(root)},
            )
        )
    outputs = []
    try:
        for run in runs:
            output = run.communicate(timeout=RUN_TIMEOUT)[0]
            outputs.append((run.returncode, output))
    finally:
        for run in runs:
            run.kill()
            run.wait()
    return outputs


@pytest.mark.skipif(
    REDIS_SERVER is None, reason=f"needs the Redis server binary (redis-server): {INSTALL}"
)
def test_a_leftover_redis_claim_file_makes_pytest_redis_take_another_leased_port(
    pytester: pytest.Pytester, private_range: MakeRange
) -> None:
    """pytest-redis never deletes its ``redis-<port>.port`` claim files: when the adapter leases a
    port that was claimed earlier in the run, pytest-redis retries ``get_port`` excluding it, and
    the retry must lease the other port of the range."""
    private = private_range(2)
    pytester.makepyfile(
        f"""
        import port_for

        PORTS = {private.ports!r}
        CLAIMED = []

        def test_claim_the_next_port(tmp_path_factory):
            mine = port_for.get_port(None)  # leased for this test only
            (other,) = set(PORTS) - {{mine}}
            (tmp_path_factory.getbasetemp() / f"redis-{{other}}.port").write_text("claimed")
            CLAIMED.append(other)

        def test_server(redisdb, redis_proc):
            assert redis_proc.port in PORTS
            assert redis_proc.port not in CLAIMED
            redisdb.set("k", "v")
        """
    )
    # Redis's unix socket lives under the basetemp, and its path must stay under 108 bytes.
    short = Path(tempfile.mkdtemp(prefix="eph-"))
    try:
        result = pytester.runpytest_subprocess(
            "-p",
            "no:xdist",
            "-p",
            "no:randomly",
            f"--basetemp={short / 't'}",
            f"--redis-exec={REDIS_SERVER}",
            *private.args,
        )
    finally:
        shutil.rmtree(short, ignore_errors=True)
    result.assert_outcomes(passed=2)
