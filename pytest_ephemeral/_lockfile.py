"""Lock files: one per port number, locked through ``filelock`` on a descriptor we open ourselves.

Rule: only a regular file of our own, with one link, is ever locked, written or read as a record.
Every open is non-blocking and checked on the descriptor (``fstat``), so a FIFO, a socket, a device,
a directory, a symlink or another user's file at a lock path is reported as unusable, never waited
on, written into or believed.

``<port>.lock`` is locked with filelock's ``lock_descriptor`` (a whole-file ``flock`` on Unix,
``LockFileEx`` on byte 0 on Windows) and stays locked, its descriptor open, for the whole lease. The
kernel drops the lock when the process dies, so a crashed run leaves no lease behind. While locked,
the file holds a holder record: a newline (byte 0, the byte Windows locks) and one line of JSON.
Liveness never comes from the record, only from the lock.

This module imports ``filelock`` (about 30 ms), so it is imported on the first lease, not at start.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any

from filelock import lock_descriptor, unlock_descriptor

from ._holder import RECORD_MAX, parse_record
from ._lockdir import identity

_COMMON = (
    getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NONBLOCK", 0)  # a FIFO planted at a lock path must not hang the open
    | getattr(os, "O_NOCTTY", 0)  # nor a terminal device become this process's terminal
    | getattr(os, "O_BINARY", 0)
)
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | _COMMON
_READ_FLAGS = os.O_RDONLY | _COMMON
#: Errors of ``open`` that mean "something we must not use is at this path".
_UNUSABLE_ERRNOS = {
    errno.ELOOP: "a symbolic link",
    errno.EISDIR: "a directory",
    errno.ENXIO: "a socket or a device",
    errno.EACCES: "not accessible to us (permission denied)",
    errno.EPERM: "not accessible to us (operation not permitted)",
    errno.ETXTBSY: "a running program",
    errno.EOPNOTSUPP: "a special file",
}
_HAS_UID = hasattr(os, "geteuid")
_PWRITE = hasattr(os, "pwrite")
#: The keys of every record ``read_live_record`` returns (``None`` where unknown).
RECORD_KEYS = ("port", "pid", "host", "worker", "testrun", "nodeid", "since")


class Unusable(Exception):
    """Something other than our own regular lock file is at a lock path; ``str()`` says what."""


#: The name of ``port``'s lock file: ``name_of(port)``. A bound ``str.format``: no Python call.
name_of: Callable[[int], str] = "{}.lock".format


def _open(dir_path: str, dir_fd: int, port: int, flags: int) -> tuple[int, os.stat_result]:
    """Open the lock file of ``port``: its descriptor and ``fstat``, once proven our own regular
    file with one link. ``Unusable`` (nothing left open) for anything else; other ``OSError``
    as is."""
    try:
        if dir_fd >= 0:
            fd = os.open(name_of(port), flags, 0o600, dir_fd=dir_fd)
        else:
            fd = os.open(os.path.join(dir_path, name_of(port)), flags, 0o600)
    except OSError as error:
        reason = _UNUSABLE_ERRNOS.get(error.errno or 0)
        if reason is None:
            raise
        raise Unusable(reason) from None
    try:
        info = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if (
        stat.S_ISREG(info.st_mode)
        and info.st_nlink == 1  # a hard link to a file elsewhere: we would write into that file
        and (not _HAS_UID or info.st_uid == os.geteuid())
    ):
        return fd, info
    os.close(fd)
    raise Unusable(_not_ours(info))


def _not_ours(info: os.stat_result) -> str:
    """Why a file that ``_open`` refuses is not one of our lock files."""
    if not stat.S_ISREG(info.st_mode):
        return _kind(info.st_mode)
    if _HAS_UID and info.st_uid != os.geteuid():
        return f"a file of another user (uid {info.st_uid})"
    return f"a file with {info.st_nlink} hard links"


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a Unix socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


#: A locked lock file: its descriptor, and the file's identity ``(st_dev, st_ino)``, to find it
#: replaced later. A plain tuple, not a NamedTuple: one is made on every lease.
Locked = tuple[int, tuple[int, int]]


def try_lock(dir_path: str, dir_fd: int, port: int) -> Locked | None:
    """Open (creating it if needed) and lock the lock file of ``port`` without blocking.

    Returns the locked descriptor, or None when another holder has the lock. Raises ``Unusable``
    for something that is not our own regular file; ``FileNotFoundError`` when the directory is
    gone; any other ``OSError`` (no descriptors, no space, ...) as is. Never keeps a lock on error.
    """
    fd, info = _open(dir_path, dir_fd, port, _LOCK_FLAGS)
    try:
        if _HAS_UID and info.st_mode & 0o077:  # ours, but readable by others: keep records private
            os.fchmod(fd, 0o600)
        if lock_descriptor(fd, blocking=False):
            return fd, (info.st_dev, info.st_ino)
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def unlock(fd: int, owner_pid: int) -> None:
    """End a lock: unlock (only in the process that took it, not in a forked child) and close.

    ``os.getpid()``, not the cached ``current_pid()``: a child forked in C without Python's
    at-fork hooks would find the cached pid its parent's, and a flock is the open file's, shared
    with the parent: unlocking it there would end the parent's lease."""
    try:
        if os.getpid() == owner_pid:
            unlock_descriptor(fd)
    finally:
        os.close(fd)


def write_record(fd: int, port: int, pid: int, details: bytes, since: float) -> None:
    """Write who holds the lease (``pid``, this process, and ``details``: the holder's and the
    test's members, from ``_holder.record_details``) over the start of its lock file, through
    the locked descriptor.

    Readers take the first line after byte 0, so an older, longer record's tail is ignored, and a
    record written by a lease that then failed its bind check sits in a file nobody has locked:
    never shown. Raises ``OSError`` (no space, say): a missing record costs details, not the lease.
    """
    # "since" to the millisecond: a float's repr costs more than the rest of the record.
    data = b'\n{"port": %d, "pid": %d, %b, "since": %.3f}\n' % (port, pid, details, since)
    if _PWRITE:
        os.pwrite(fd, data, 0)
    else:  # Windows
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)


def read_live_record(dir_path: str, port: int, dir_fd: int = -1) -> dict[str, Any] | None:
    """The record of a port whose lock is held right now; None when nobody holds it.

    Taking the lock for a moment is how liveness is tested: a record left by a killed process
    sits in a file nobody has locked. The result has every key of ``RECORD_KEYS`` (``None`` where
    unknown); a holder that wrote no record (another program following the lock protocol, or a
    lease a moment old) or an unreadable one (anything that is not one short line of a JSON object
    with fields of the right types: see ``_holder.parse_record``) also gets a ``problem`` saying
    so. At most ``RECORD_MAX`` bytes are read. Raises ``Unusable`` for something that is not our
    own regular file.
    """
    try:
        fd, _ = _open(dir_path, dir_fd, port, _READ_FLAGS)
    except FileNotFoundError:
        return None
    try:
        if lock_descriptor(fd, blocking=False):
            unlock_descriptor(fd)
            return None
        os.lseek(fd, 1, os.SEEK_SET)  # skip byte 0, which Windows keeps locked
        data = os.read(fd, RECORD_MAX)  # a record is one short line: never read a whole file
    finally:
        os.close(fd)
    record: dict[str, Any] = dict.fromkeys(RECORD_KEYS)
    record.update(parse_record(data.partition(b"\n")[0]))
    record["port"] = port
    return record


def still_in_place(path: str, file: tuple[int, int]) -> bool:
    """Whether the lock file at ``path`` is still ``file`` (``Locked.file``, the one locked).

    False when it was removed, or replaced (by a new file, or with its whole directory): then
    another process may lock the file now at that path and be given the same port. The full path
    is looked up, not a name relative to the directory's descriptor, so a directory renamed away
    and replaced is noticed too. One ``lstat``: cheap enough for the end of every lease.
    """
    return identity(path) == file
