"""Who holds a lease: the process-wide part of every holder record, reading one, showing one.

Rule: a record is read from a file anyone following the lock protocol may write, so any content
(not JSON, not an object, fields of the wrong type, nesting deep enough to exhaust the stack) is
"unreadable holder record", never an error, and at most ``RECORD_MAX`` bytes of it are read.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import time
from typing import Any, NamedTuple

#: How much of a lock file is read for its record: a record is one short line.
RECORD_MAX = 4096
#: The fields of a record and the types each may have (``None``: not recorded).
_FIELDS: dict[str, tuple[type, ...]] = {
    "pid": (int,),
    "host": (str,),
    "worker": (str,),
    "testrun": (str,),
    "nodeid": (str,),
    "since": (int, float),
}


class Holder(NamedTuple):
    """Who takes leases: the same for every lease of one process."""

    pid: int
    host: str
    worker: str | None = None
    testrun: str | None = None


def this_process(worker: str | None = None, testrun: str | None = None) -> Holder:
    return Holder(current_pid(), socket.gethostname(), worker, testrun)


_pid = os.getpid()


def current_pid() -> int:
    """This process's id, kept since the last fork: ``os.getpid()`` is a system call, and a
    lease with its release asked for it five times."""
    return _pid


def _forked() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def record_details(holder: Holder, nodeid: str | None) -> bytes:
    """The members of a record that every lease of one request shares (holder and test), as
    JSON, made once per request: the record adds the port, the writing process's pid (right
    after a fork too) and the time."""
    return f'{_holder_members(holder)}, "nodeid": {json.dumps(nodeid)}'.encode()


@functools.lru_cache(maxsize=8)
def _holder_members(holder: Holder) -> str:
    """The holder's members, made once per holder (every test of a session asks)."""
    fields = holder._asdict()
    del fields["pid"]
    return json.dumps(fields)[1:-1]


def parse_record(line: bytes) -> dict[str, Any]:
    """The fields of a record's line (the line after byte 0, without its newline): each field of
    ``_FIELDS`` with a value of its type or ``None``; or only a ``problem`` saying it is
    unreadable. Never raises."""
    if not line:
        return {"problem": "no holder record"}
    if len(line) >= RECORD_MAX:
        return _unreadable(f"longer than {RECORD_MAX} bytes")
    try:
        found = json.loads(line.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        return _unreadable("nested too deeply")
    except ValueError as error:  # not UTF-8, not JSON, NaN or Infinity
        return _unreadable(str(error))
    if not isinstance(found, dict):
        return _unreadable(f"not a JSON object but {type(found).__name__}")
    fields: dict[str, Any] = {}
    for name, types in _FIELDS.items():
        value = found.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            return _unreadable(f"{name} is {type(value).__name__}")
        fields[name] = value
    if fields["pid"] is not None and fields["pid"] < 1:
        return _unreadable("pid is not positive")
    return fields


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def _unreadable(why: str) -> dict[str, Any]:
    return {"problem": f"unreadable holder record: {why}"}


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on or cannot show (controls, escape
    sequences, lone surrogates) written as a Python escape: for records, which anyone may write."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def describe(record: dict[str, Any], now: float | None = None) -> str:
    """One line for a person: port, pid, worker, test, age. Takes any mapping: what is missing
    or of the wrong type shows as unknown."""
    port = record.get("port")
    where = f"port {port if isinstance(port, int) else '?'}"
    pid = record.get("pid")
    if not isinstance(pid, int):
        problem = record.get("problem")
        return f"{where}: {_shown(problem) if problem else 'no holder record'}"
    now = time.time() if now is None else now
    since = record.get("since")
    age = "since unknown"
    if isinstance(since, (int, float)) and math.isfinite(since):
        age = f"for {now - since:.1f} s"
    return (
        f"{where}: pid {pid} on {_shown(record.get('host')) or '?'},"
        f" worker {_shown(record.get('worker')) or '-'},"
        f" {_shown(record.get('nodeid')) or 'no test'}, {age}"
    )


def _shown(value: object) -> str:
    """A record's value as text for a person ("" for none)."""
    return "" if value is None or value == "" else printable(str(value))
