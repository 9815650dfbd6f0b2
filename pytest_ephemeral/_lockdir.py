"""The lock directory: making it safe to use, on the first lease.

Rule: a lock dir is used only once it is proven ours and private enough that nobody else can
swap, plant or delete lock files in it. Preparing it is I/O, so it happens on the first lease of
each process, never when settings are read: a run that leases no port cannot be failed by it.

Where it is by default is a setting's default: ``_settings.default_lock_dir`` (read by every run,
so kept out of this module, which only a run that leases loads).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import NamedTuple

from ._errors import LockDirError

_DIR_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_DIRECTORY", 0)
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
)
#: Whether lock files can be opened relative to a descriptor of the directory (not on Windows).
DIR_FD_SUPPORTED = os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY")


class Prepared(NamedTuple):
    """A lock dir proven safe: a descriptor of it (-1 where the OS has none) and its identity."""

    fd: int
    device: int
    inode: int


def identity(path: str) -> tuple[int, int] | None:
    """``(device, inode)`` of ``path`` itself (not a symlink's target); None if it is gone."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def prepare(path: str, explicit: bool) -> Prepared:
    """Create ``path`` if needed (mode 0o700) and prove it safe; ``LockDirError`` says why not.

    Refused: a symlink (whoever planted it chooses where our files go), anything but a directory,
    a directory of another user (who could swap our lock files), an explicit directory that others
    may write into without the sticky bit (any of them could delete a held lock file, and the next
    opener would lock a fresh one: a port given twice), and one we cannot create files in.
    The default directory is made private (group and other bits stripped); an explicit one that
    we own keeps its permissions, so it can be shared on purpose.
    """
    if "\0" in path:  # every system call would refuse it with a ValueError, not an OSError
        raise LockDirError(path, "is not a path: it holds a NUL character")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except FileExistsError:
        pass  # maybe not a directory: said below
    except OSError as error:
        raise LockDirError(path, f"cannot be created: {explain(error)}") from None
    try:
        info = os.lstat(path)  # lstat, not stat: following a planted symlink is the attack refused
    except OSError as error:  # removed again at once, say
        raise LockDirError(path, f"cannot be examined: {explain(error)}") from None
    if stat.S_ISLNK(info.st_mode):
        raise LockDirError(path, "is a symbolic link")
    if not stat.S_ISDIR(info.st_mode):
        raise LockDirError(path, "is not a directory")
    fd = -1
    if DIR_FD_SUPPORTED:
        try:
            fd = os.open(path, _DIR_FLAGS)
        except OSError as error:  # swapped for a symlink or a file since the lstat
            raise LockDirError(path, f"cannot be opened: {explain(error)}") from None
        info = os.fstat(fd)  # from here on, checks concern the directory we hold open
    try:
        _vet(path, info, fd, explicit)
        _check_writable(path, fd)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    return Prepared(fd, info.st_dev, info.st_ino)


def _vet(path: str, info: os.stat_result, fd: int, explicit: bool) -> None:
    if not stat.S_ISDIR(info.st_mode):
        raise LockDirError(path, "is not a directory")
    if not hasattr(os, "geteuid"):
        return  # Windows: the directory lives in the user's own profile
    if info.st_uid != os.geteuid():
        raise LockDirError(path, f"is owned by another user (uid {info.st_uid}), not by us")
    if explicit:
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise LockDirError(
                path,
                "is writable by other users and has no sticky bit: any of them could delete a"
                " held lock file and have its port given twice (chmod go-w or chmod +t it)",
            )
    elif info.st_mode & 0o077:
        try:
            if fd >= 0:
                os.fchmod(fd, 0o700)
            else:
                os.chmod(path, 0o700)
        except OSError as error:  # a read-only file system, say
            raise LockDirError(path, f"cannot be made private: {explain(error)}") from None


def _check_writable(path: str, fd: int) -> None:
    """Create, write and remove a file: finds a read-only file system, no space and no inodes.

    A new file of a random name (``O_EXCL``, never following or blocking on what another user of
    a shared directory may have planted at a name they could guess).
    """
    name = f".write-check-{os.urandom(8).hex()}"
    flags = (
        os.O_WRONLY
        | os.O_CREAT
        | os.O_EXCL
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_NONBLOCK", 0)
        | getattr(os, "O_CLOEXEC", 0)
    )
    where = {"dir_fd": fd} if fd >= 0 else {}
    target = name if fd >= 0 else os.path.join(path, name)
    try:
        probe = os.open(target, flags, 0o600, **where)
        try:
            os.write(probe, b"\n")
        finally:
            os.close(probe)
        os.unlink(target, **where)
    except OSError as error:
        raise LockDirError(path, f"cannot be written to: {explain(error)}") from None


def explain(error: OSError) -> str:
    """The reason in words, with what to do for the causes a user can fix."""
    text = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return f"{text} (free space or inodes on its file system)"
    if error.errno == errno.EROFS:
        return f"{text} (choose a lock dir on a writable file system)"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"{text} (no permission)"
    return text


class LockDir:
    """One lock dir as this process uses it: prepared on first use, then watched.

    If it vanishes or is replaced mid-run (``unchanged`` says, for the caller to ask when a lock
    file is found gone), ``reprepare`` makes it again (the caller then locks its held ports
    again). A failure to prepare it is kept: every later use fails at once with
    the same reason. Not thread-safe: the allocator's mutex guards it.
    """

    def __init__(self, path: str, explicit: bool) -> None:
        self.path = path
        self._explicit = explicit
        self._prepared: Prepared | None = None
        self._failure: LockDirError | None = None

    @property
    def fd(self) -> int:
        """A descriptor of the prepared directory (-1 where the OS has none, or before use)."""
        return -1 if self._prepared is None else self._prepared.fd

    @property
    def prepared(self) -> bool:
        return self._prepared is not None

    def ensure(self) -> None:
        """Prepare the directory on first use (or raise the failure of the first attempt)."""
        if self._prepared is None:
            if self._failure is not None:
                raise self._failure
            self._prepare()

    def unchanged(self) -> bool:
        """Whether the directory prepared is still the one at its path (not gone, not replaced)."""
        return self._prepared is not None and identity(self.path) == self._prepared[1:]

    def reprepare(self) -> None:
        """Prepare the directory again, at its path, after it vanished or was replaced."""
        self.close()
        self._prepare()

    def close(self) -> None:
        prepared, self._prepared = self._prepared, None  # forgotten first, even if close fails
        if prepared is not None and prepared.fd >= 0:
            os.close(prepared.fd)

    def _prepare(self) -> None:
        try:
            self._prepared = prepare(self.path, self._explicit)
        except LockDirError as error:
            self._failure = error
            raise
