"""Lock files: one per port number, locked through ``filelock`` on a descriptor we open ourselves.

``<lock dir>/<port>.lock`` is locked with filelock's ``lock_descriptor`` (a whole-file ``flock`` on
Unix, ``LockFileEx`` on byte 0 on Windows) and stays locked, its descriptor open, for the whole
lease. The kernel drops the lock when the process dies, so a crashed run leaves no lease behind.

While locked, the file holds a holder record: a newline (byte 0, the byte Windows locks) and one
line of JSON. Liveness never comes from the record, only from the lock.

This module imports ``filelock`` (about 30 ms), so it is imported on the first lease, not at start.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from filelock import lock_descriptor, unlock_descriptor

from ._holder import Holder

_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK: a FIFO planted at a lock path must not hang a reader.
_READ_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NONBLOCK", 0)
)
#: Errors that mean "something else is in the way": treat the port as held by another run.
_FOREIGN = (errno.EACCES, errno.EPERM, errno.ELOOP, errno.EISDIR)
#: What a fresh lock writes at offset 0: an empty first line, which voids any older record.
_VOID = b"\n\n"
#: The keys of every record ``read_live_record`` returns (``None`` where unknown).
RECORD_KEYS = ("port", "pid", "host", "worker", "testrun", "nodeid", "since")


def lock_path(lock_dir: str, port: int) -> str:
    return os.path.join(lock_dir, f"{port}.lock")


def try_lock(path: str) -> int | None:
    """Open and lock ``path`` without blocking: the locked descriptor, or None if it is held.

    A record left in the file by an earlier holder is voided at once (its first line emptied,
    in place: truncating would free and reallocate the file's block on every lease), so nobody
    reading it while this lock is held takes a dead process for the holder.
    """
    try:
        fd = os.open(path, _FLAGS | getattr(os, "O_BINARY", 0), 0o600)
    except OSError as error:
        if error.errno in _FOREIGN:
            return None
        raise
    try:
        if lock_descriptor(fd, blocking=False):
            os.write(fd, _VOID)
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def unlock(fd: int, owner_pid: int) -> None:
    """End a lock: unlock (only in the process that took it, not in a forked child) and close."""
    try:
        if os.getpid() == owner_pid:
            unlock_descriptor(fd)
    finally:
        os.close(fd)


def write_record(
    fd: int, holder: Holder, port: int, nodeid: str | None, since: float
) -> str | None:
    """Write who holds the lease over the start of its lock file, through the descriptor holding
    the lock (readers take the first line after byte 0, so an older, longer record's tail is
    ignored). Returns what went wrong, or None: a missing record costs details, never the lease.
    """
    record = {
        "port": port,
        "pid": holder.pid,
        "host": holder.host,
        "worker": holder.worker,
        "testrun": holder.testrun,
        "nodeid": nodeid,
        "since": since,
    }
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"\n" + json.dumps(record).encode() + b"\n")
    except OSError as error:
        return f"could not record the holder of port {port}: {error}"
    return None


def read_live_record(lock_dir: str, port: int) -> dict[str, Any] | None:
    """The record of a port whose lock is held right now; None when nobody holds it.

    Taking the lock for a moment is how liveness is tested: a record left by a killed process
    sits in a file nobody has locked. The result has every key of ``RECORD_KEYS`` (``None`` where
    unknown); a holder that wrote no record (another program following the lock protocol, or a
    lease a moment old) or an unreadable one also gets a ``problem`` saying so.
    """
    try:
        fd = os.open(lock_path(lock_dir, port), _READ_FLAGS | getattr(os, "O_BINARY", 0))
    except OSError:
        return None
    try:
        if lock_descriptor(fd, blocking=False):
            unlock_descriptor(fd)
            return None
        os.lseek(fd, 1, os.SEEK_SET)  # skip byte 0, which Windows keeps locked
        data = os.read(fd, 65536).partition(b"\n")[0]
    finally:
        os.close(fd)
    record: dict[str, Any] = dict.fromkeys(RECORD_KEYS)
    if not data:
        record["problem"] = "no holder record"
    else:
        try:
            found = json.loads(data)
            if not isinstance(found, dict):
                raise ValueError("not a JSON object")
            record.update((key, found.get(key)) for key in RECORD_KEYS)
        except ValueError as error:
            record["problem"] = f"unreadable holder record: {error}"
    record["port"] = port
    return record
