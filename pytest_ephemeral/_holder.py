"""Who holds a lease: the process-wide part of every holder record, and how to show a record."""

from __future__ import annotations

import functools
import json
import os
import socket
import time
from typing import Any, NamedTuple


class Holder(NamedTuple):
    """Who takes leases: the same for every lease of one process."""

    pid: int
    host: str
    worker: str | None = None
    testrun: str | None = None


def this_process(worker: str | None = None, testrun: str | None = None) -> Holder:
    return Holder(os.getpid(), socket.gethostname(), worker, testrun)


@functools.lru_cache(maxsize=8)
def holder_json(holder: Holder) -> str:
    """The holder's part of a record as JSON members, made once per holder (every lease has one).

    The pid is left out: the record takes the writing process's own, right after a fork too.
    """
    fields = holder._asdict()
    del fields["pid"]
    return json.dumps(fields)[1:-1]


def describe(record: dict[str, Any], now: float | None = None) -> str:
    """One line for a person: port, pid, worker, test, age."""
    if record.get("pid") is None:
        return f"port {record['port']}: {record.get('problem') or 'no holder record'}"
    now = time.time() if now is None else now
    since = record.get("since")
    age = f"for {now - since:.1f} s" if isinstance(since, (int, float)) else "since unknown"
    return (
        f"port {record['port']}: pid {record.get('pid', '?')}"
        f" on {record.get('host') or '?'}, worker {record.get('worker') or '-'},"
        f" {record.get('nodeid') or 'no test'}, {age}"
    )
