"""The edges of ``pytest-ephemeral status``'s output: an output that cannot be written or cannot
show a holder's label, and lock paths that are no lease. Each runs the real command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import MakeRange
from .helpers import written_and_held


def command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_EPHEMERAL_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest_ephemeral", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environ, **(env or {})},
    )


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX shell")
@pytest.mark.parametrize("name", ["status", "range"])
def test_a_closed_standard_output_is_one_line_on_stderr(name: str, tmp_path: Path) -> None:
    shell = 'exec "$@" >&-'
    done = subprocess.run(
        ["sh", "-c", shell, "sh", sys.executable, "-m", "pytest_ephemeral", name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr == "pytest-ephemeral: error: standard output is closed\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_an_output_that_fails_is_one_line_on_stderr(private_range: MakeRange) -> None:
    private = private_range(1)
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "pytest_ephemeral", "status", "--lock-dir", private.lock_dir],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr == (
        "pytest-ephemeral: error: cannot write the output: [Errno 28] No space left on device\n"
    )


def test_a_label_the_output_encoding_cannot_show_is_escaped(private_range: MakeRange) -> None:
    private = private_range(1)
    (port,) = private.ports
    record = f'\n{{"port": {port}, "pid": 5, "nodeid": "caf\\u00e9 --name \\u00e9", "since": 1}}\n'
    with written_and_held(private.lock_dir, {port: record.encode()}):
        done = command(
            "status", "--lock-dir", str(private.lock_dir), env={"PYTHONIOENCODING": "ascii"}
        )
        as_json = command("status", "--json", "--lock-dir", str(private.lock_dir))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.splitlines()[1].endswith("caf\\xe9 --name \\xe9")
    assert json.loads(as_json.stdout)[0]["nodeid"] == "café --name é"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_an_unusable_lock_path_is_listed_apart_not_counted_as_a_lease(
    private_range: MakeRange,
) -> None:
    private = private_range(2)
    fifo, held = private.ports
    os.mkfifo(private.lock_dir / f"{fifo}.lock")
    args = ("--lock-dir", str(private.lock_dir))
    record = f'\n{{"port": {held}, "pid": 5, "nodeid": "t.py::t", "since": 1}}\n'
    with written_and_held(private.lock_dir, {held: record.encode()}):
        text = command("status", *args)
        as_json = command("status", "--json", *args)
        figures = command("range", "--json", env={"PYTEST_EPHEMERAL_LOCK_DIR": args[1]})
    unusable = f"port {fifo}: unusable lock file: a FIFO (not a lease; remove it)"
    assert text.returncode == as_json.returncode == 0
    assert text.stderr == ""
    assert as_json.stderr == f"pytest-ephemeral: warning: {unusable}\n"
    lines = text.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:-2]] == [str(held)]
    count = f"1 live lease in {private.lock_dir} (lock dir from option --lock-dir)"
    assert lines[-2:] == [unusable, count]
    assert [lease["port"] for lease in json.loads(as_json.stdout)] == [held]
    assert json.loads(figures.stdout)["leased"] == [held]
