"""Holder records as anyone may write them: whatever a held lock file holds, ``status`` (text and
JSON) and an exhausted ``lease_port()`` show "unreadable holder record", and never read more than
one short line of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_ephemeral import PortsExhausted, lease_port
from pytest_ephemeral._holder import RECORD_MAX, describe, parse_record

from .conftest import MakeRange
from .helpers import written_and_held

#: Lines after byte 0 of a lock file that no holder record is.
HOSTILE: dict[str, bytes] = {
    "nested beyond the bound": b"[" * 100_000,
    "nested within the bound": b"[" * 2040 + b"]" * 2040,
    "a list": b"[1, 2]",
    "a string": b'"text"',
    "null": b"null",
    "pid a string": b'{"pid": "12", "nodeid": "t.py::t"}',
    "pid a boolean": b'{"pid": true}',
    "pid negative": b'{"pid": -1}',
    "since a string": b'{"pid": 5, "since": "yesterday"}',
    "since NaN": b'{"pid": 5, "since": NaN}',
    "nodeid a list": b'{"pid": 5, "nodeid": ["t.py::t"]}',
    "host an object": b'{"pid": 5, "host": {}}',
    "binary junk": bytes(range(11, 256)),
    "UTF-16": '{"pid": 5}'.encode("utf-16"),
    "extra data": b'{"pid": 5} {"pid": 6}',
    "a long line": b'{"pid": 5, "nodeid": "' + b"x" * RECORD_MAX + b'"}',
}


def status(lock_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pytest_ephemeral", "status", "--lock-dir", str(lock_dir)]
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done


def exhaustion(ports: list[int], lock_dir: Path) -> PortsExhausted:
    lease = lease_port(port_range=f"{ports[0]}-{ports[-1]}", lock_dir=lock_dir, timeout=0)
    with pytest.raises(PortsExhausted) as caught, lease:
        pass
    return caught.value


def test_hostile_records_are_unreadable_in_status_and_in_the_exhaustion_error(
    private_range: MakeRange,
) -> None:
    private = private_range(len(HOSTILE))
    lines = HOSTILE.values()
    contents = {port: b"\n" + line + b"\n" for port, line in zip(private.ports, lines, strict=True)}
    with written_and_held(private.lock_dir, contents):
        leases = json.loads(status(private.lock_dir, "--json").stdout)
        text = status(private.lock_dir)
        first, rest = private.ports[:10], private.ports[10:]  # the error lists up to ten holders
        errors = [exhaustion(first, private.lock_dir), exhaustion(rest, private.lock_dir)]
    assert [lease["port"] for lease in leases] == private.ports
    for lease, name in zip(leases, HOSTILE, strict=True):
        assert lease["problem"].startswith("unreadable holder record: "), name
        assert {key for key, value in lease.items() if value is not None} == {"port", "problem"}
    rows = text.stdout.splitlines()[1:-1]
    assert [row.split()[0] for row in rows] == [str(port) for port in private.ports]
    assert all(row.split()[5:8] == ["unreadable", "holder", "record:"] for row in rows)
    assert text.stdout.splitlines()[-1].startswith(f"{len(HOSTILE)} live leases in ")
    assert len(text.stderr.splitlines()) == len(HOSTILE)  # one warning each
    holders = [holder for error in errors for holder in error.holders]
    assert [holder["port"] for holder in holders] == private.ports
    assert all(holder["problem"].startswith("unreadable holder record") for holder in holders)
    for error in errors:
        for holder in error.holders:
            assert f"\n  port {holder['port']}: unreadable holder record: " in str(error)


def test_a_huge_lock_file_is_read_no_further_than_a_record(private_range: MakeRange) -> None:
    """A sparse 1 GiB file: reading it whole would take a gigabyte of memory."""
    private = private_range(1)
    with written_and_held(private.lock_dir, {private.ports[0]: b"\n"}, size=2**30):
        (lease,) = json.loads(status(private.lock_dir, "--json").stdout)
        (holder,) = exhaustion(private.ports, private.lock_dir).holders
    expected = f"unreadable holder record: longer than {RECORD_MAX} bytes"
    assert lease["problem"] == holder["problem"] == expected


#: A record in the writer's own format whose strings a terminal would act on or cannot show.
UNSHOWABLE = (
    b'{"port": 1, "pid": 5, "host": "h\\u00e9", "worker": null, "testrun": null,'
    b' "nodeid": "t.py::t[\\u001b[2J\\ud800]", "since": 1.5}'
)


def test_controls_and_lone_surrogates_in_a_record_are_shown_escaped(
    private_range: MakeRange,
) -> None:
    private = private_range(1)
    (port,) = private.ports
    with written_and_held(private.lock_dir, {port: b"\n" + UNSHOWABLE + b"\n"}):
        (lease,) = json.loads(status(private.lock_dir, "--json").stdout)
        text = status(private.lock_dir).stdout
        error = exhaustion(private.ports, private.lock_dir)
    assert lease["nodeid"] == "t.py::t[\x1b[2J\ud800]"
    assert "\x1b" not in text
    assert "t.py::t[\\x1b[2J\\ud800]" in text.splitlines()[1]
    assert "\x1b" not in str(error)
    assert f"port {port}: pid 5 on hé, worker -, t.py::t[\\x1b[2J\\ud800], for " in str(error)


@pytest.mark.parametrize("line", [*HOSTILE.values(), b"\xff" * 5000])
def test_parse_record_never_raises(line: bytes) -> None:
    record = parse_record(line)
    assert list(record) == ["problem"]
    assert record["problem"].startswith("unreadable holder record: ")


def test_parse_record_takes_the_writers_format() -> None:
    line = b'{"port": 7, "pid": 5, "host": "h", "worker": "gw0", "testrun": "r", "nodeid": null,'
    assert parse_record(line + b' "since": 2, "extra": [1]}') == {
        "pid": 5,
        "host": "h",
        "worker": "gw0",
        "testrun": "r",
        "nodeid": None,
        "since": 2,
    }
    assert parse_record(b"") == {"problem": "no holder record"}


RECORDS: list[dict[str, Any]] = [
    {},
    {"port": "x", "pid": [1]},
    {"port": 7, "pid": 5, "since": float("nan"), "host": 3, "nodeid": b"t"},
    {"port": 7, "problem": "\x1b[2J"},
]


@pytest.mark.parametrize("record", RECORDS)
def test_describe_takes_any_mapping(record: dict[str, Any]) -> None:
    line = describe(record, now=10.0)
    assert line.startswith(("port ?: ", "port 7: "))
    assert line.isprintable()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_parse_record_reads_no_fifo(private_range: MakeRange) -> None:
    """An endless stream (a FIFO someone keeps writing into) is never read: it is unusable."""
    private = private_range(1)
    os.mkfifo(private.lock_dir / f"{private.ports[0]}.lock")
    error = exhaustion(private.ports, private.lock_dir)
    assert error.unusable == {private.ports[0]: "a FIFO"}
    assert error.holders == []
