"""The allocator: one per lock dir per process; leases ports it can lock and bind.

Lock first, then check: a candidate's lock is taken without blocking, then the port is bind-checked;
a busy port's lock is released at once. Which candidates are tried, in what order, is the search
order's (``_search``); preparing and watching the lock dir is ``_lockdir``'s.

What a lease is for (range, protocol, host, timeout, holder) comes with each call as one
``Request``; what belongs to the lock dir (the held ports, whichever code leased them, and the
prepared directory) lives here, once per process. If the directory is removed mid-run, the next
lease finds it gone (a lock file cannot be opened in it), recreates it and locks this process's
held ports again before leasing anything new. At the end of every lease its lock file is checked
to be still the one at its path: if not, another process may have been given the port, and a
``RuntimeWarning`` says so; if the directory was replaced (renamed away, another made in its
place), the one now at the path is prepared, and the other ports held here locked in it again.
Leases check nothing at their start: the end-of-lease check is the one that cannot miss a change,
and it costs one ``lstat`` a lease.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import socket
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ._errors import (
    ConfigError,
    ConfigTypeError,
    EphemeralError,
    LockDirError,
    PortNotLeased,
    PortsExhausted,
)
from ._holder import Holder, current_pid, record_details, this_process
from ._lockdir import LockDir
from ._lockfile import (
    Locked,
    Unusable,
    name_of,
    read_live_record,
    still_in_place,
    try_lock,
    unlock,
    write_record,
)
from ._probe import BUSY, FORBIDDEN, FREE, Targets, bind_targets, probe, socket_kinds
from ._ranges import PortRange
from ._search import RandomSource, Walk
from ._settings import Settings

_MAX_HOLDERS_SHOWN = 10
_POLL_FIRST, _POLL_MAX = 0.005, 0.1
_NO_SPACE = {errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NO_DESCRIPTORS = {errno.EMFILE, errno.ENFILE}
_ESTALE = getattr(errno, "ESTALE", -1)
_RANDOM = random.SystemRandom()  # not random's: pytest-randomly reseeds that alike in every worker


class Request(NamedTuple):
    """What a lease is for: the range, the protocols and addresses to bind-check, how long to
    wait, whether SO_REUSEADDR servers will bind it, and who holds it and for what (a test's
    nodeid), as the members of its holder record (``_holder.record_details``)."""

    ports: PortRange
    kinds: tuple[socket.SocketKind, ...]
    targets: Targets
    timeout: float
    reuse_addr: bool
    details: bytes


def request_for(
    settings: Settings,
    protocol: str = "tcp",
    holder: Holder | None = None,
    label: str | None = None,
) -> Request:
    """The request for leasing from resolved ``settings``, bind-checked for ``protocol``."""
    return Request(
        settings.ports,
        socket_kinds(protocol),
        bind_targets(settings.host),
        settings.timeout,
        settings.reuse_addr,
        record_details(holder or default_holder(), label),
    )


@dataclass
class Stats:
    """Counters for a run summary, kept by the caller; plain numbers, to cross process boundaries.

    Skipped ports are counted once per lease request, however often a wait retried them.
    """

    leased: int = 0
    peak: int = 0
    skipped_bound: int = 0
    skipped_locked: int = 0
    waited: float = 0.0


class Lease:
    """A leased port: the descriptor whose lock reserves it, and the request it was taken for."""

    __slots__ = ("fd", "file", "lost", "pid", "port", "request", "thread")

    def __init__(
        self, port: int, fd: int, pid: int, request: Request, thread: int, file: tuple[int, int]
    ) -> None:
        self.port = port
        self.fd = fd
        self.pid = pid  # the process that took the lock (a forked child must not unlock it)
        self.request = request  # its protocols (for the leak check) and record details
        self.thread = thread  # the thread that leased it: only it makes waiting pointless
        self.file = file  # the identity of its lock file (st_dev, st_ino), to find it replaced
        self.lost = False  # another process locked it while the lock dir was gone (warned)


#: What a candidate met, in ``_Pass.met``; any other value there says why it is unusable.
_LOCKED, _BOUND, _FORBIDDEN = "locked", "bound", "forbidden"


class _Pass:
    """What the walks of one request met, for the exhaustion error and the figures: one dict and
    a few numbers (one is made on every lease, and a lease that succeeds at once fills none)."""

    __slots__ = ("bound_tries", "forbidden_reason", "met", "other_threads", "tries", "unrecorded")

    def __init__(self) -> None:
        #: By port, what it met last: _LOCKED, _BOUND, _FORBIDDEN, or why it is unusable.
        self.met: dict[int, str] = {}
        #: Held by another thread of this process, which may release them: worth waiting for.
        self.other_threads = 0
        self.tries = 0  # candidates tried (this request, every walk)
        self.bound_tries = 0  # tries that found their port bound (this request, every walk)
        self.forbidden_reason: str | None = None
        self.unrecorded: str | None = None  # why a holder record could not be written

    def ports(self, outcome: str) -> list[int]:
        return [port for port, met in self.met.items() if met == outcome]

    def unusable(self) -> dict[int, str]:
        return {port: met for port, met in self.met.items() if met not in _OUTCOMES}

    def worth_waiting(self) -> bool:
        return bool(self.other_threads) or any(
            met in (_LOCKED, _BOUND) for met in self.met.values()
        )

    def count_skipped(self, stats: Stats) -> None:
        if self.met:
            stats.skipped_locked += len(self.ports(_LOCKED))
            stats.skipped_bound += len(self.ports(_BOUND))


_OUTCOMES = (_LOCKED, _BOUND, _FORBIDDEN)
_UNCOUNTED = Stats()  # the figures of callers that keep none (lease_port): never read
_UNPREPARED = -2  # PortAllocator._dir_fd before the lock dir is prepared


class _DirGone(Exception):
    """The lock dir vanished under a walk: recover, then walk again."""


class PortAllocator:
    """Leases ports whose lock files live in one lock dir; thread-safe. Use ``allocator_for``.

    Every lease holds an open, locked descriptor until ``release``. ``random`` chooses where
    walks start (tests give a seeded one).
    """

    def __init__(self, lock_dir: str, given: bool, random: RandomSource = _RANDOM) -> None:
        self.lock_dir = lock_dir
        self._dir = LockDir(lock_dir, given)
        self._dir_fd = _UNPREPARED  # its descriptor once prepared (-1 where the OS has none)
        self._prefix = os.path.join(lock_dir, "")  # of lock file paths
        self._random = random
        self._held: dict[int, Lease] = {}
        self._cursors: dict[tuple[tuple[int, int], ...], int] = {}
        self._lost: list[int] = []  # held ports others may have been given too: to warn
        self._mutex = threading.Lock()

    @property
    def held(self) -> frozenset[int]:
        """The ports this process holds in this lock dir now."""
        with self._mutex:
            return frozenset(self._held)

    def lease(self, request: Request, n: int = 1, stats: Stats | None = None) -> list[int]:
        """Lease ``n`` consecutive ports; poll up to ``request.timeout`` while others hold them."""
        if n != 1 or type(n) is not int:  # one port always fits: the common case checks nothing
            _check_block(n, request.ports)
        stats = stats if stats is not None else _UNCOUNTED
        seen = _Pass()
        deadline: float | None = None
        pause = _POLL_FIRST
        while True:
            leased = self._attempt(request, n, seen, None, stats)
            if leased is not None:
                seen.count_skipped(stats)
                if self._lost or seen.unrecorded:
                    self._warn_after(leased, seen)
                return leased
            if not seen.worth_waiting():
                raise self._exhausted(n, request.ports, seen, waited=None)
            now = time.monotonic()
            deadline = now + request.timeout if deadline is None else deadline
            if now >= deadline:
                seen.count_skipped(stats)
                raise self._exhausted(n, request.ports, seen, waited=request.timeout)
            nap = min(pause, deadline - now)
            time.sleep(nap)
            stats.waited += nap
            pause = min(pause * 2, _POLL_MAX)
            seen.other_threads = 0  # counted afresh by the next walk

    def try_lease(self, request: Request, max_tries: int, stats: Stats | None = None) -> int | None:
        """Lease one port at once, trying at most ``max_tries`` candidates; None if none could be.

        Never waits for other holders and builds no ``PortsExhausted``; a lock dir that cannot be
        used, or running out of descriptors, raises as ``lease`` does. The next call goes on
        where this one stopped, so calls in a row see the whole range.
        """
        if max_tries < 1:
            raise ConfigError(f"a bounded attempt tries at least one port, not {max_tries}")
        seen = _Pass()
        leased = self._attempt(request, 1, seen, max_tries, stats or _UNCOUNTED)
        if leased is None:
            return None
        if self._lost or seen.unrecorded:
            self._warn_after(leased, seen)
        return leased[0]

    def release(self, port: int) -> None:
        """End the lease of ``port``; ``PortNotLeased`` if this process does not hold it here.

        Warns (``RuntimeWarning``) if its lock file is no longer the one at its path: another
        process may have been given the port meanwhile.
        """
        with self._mutex:
            lease = self._held.get(port)
            if lease is None:
                raise PortNotLeased(f"port {port} is not leased in {self.lock_dir}")
            try:
                if not lease.lost and not self._in_place(lease):
                    self._lost_at_release(lease)
            finally:  # a recovery that fails (a symlink planted meanwhile) keeps no lock here
                del self._held[port]
                unlock(lease.fd, lease.pid)
        if self._lost:
            self._warn_lost()

    def lease_of(self, port: int) -> Lease:
        """The lease of ``port``; ``PortNotLeased`` if this process does not hold it here."""
        with self._mutex:
            lease = self._held.get(port)
        if lease is None:
            raise PortNotLeased(f"port {port} is not leased in {self.lock_dir}")
        return lease

    def close(self) -> None:
        """Close the lock dir's descriptor (for an allocator made outside ``allocator_for``)."""
        with self._mutex:
            if self._held:
                held = ", ".join(map(str, sorted(self._held)))
                raise EphemeralError(f"port(s) {held} still leased in {self.lock_dir}")
            self._dir_fd = _UNPREPARED
            self._dir.close()

    # --- one attempt, under the mutex -------------------------------------------------------

    def _attempt(
        self, request: Request, n: int, seen: _Pass, max_tries: int | None, stats: Stats
    ) -> list[int] | None:
        with self._mutex:
            if self._dir_fd == _UNPREPARED:  # on the first lease; a removed dir makes _walk raise
                self._dir.ensure()
                self._dir_fd = self._dir.fd
            while True:
                try:
                    leased = self._walk(request, n, seen, max_tries)
                except _DirGone:
                    self._recover()
                    continue
                if leased is not None:
                    stats.leased += n
                    stats.peak = max(stats.peak, len(self._held))
                return leased

    def _walk(
        self, request: Request, n: int, seen: _Pass, max_tries: int | None
    ) -> list[int] | None:
        """One pass over the range in the search order; lease and return ``n`` consecutive ports
        (or give up after ``max_tries`` candidates)."""
        numbers, spans = request.ports.ports, request.ports.spans
        thread = threading.get_ident()
        stop = None if max_tries is None else seen.tries + max_tries
        cursor = self._cursors.get(spans)
        if n == 1 and cursor is not None:
            # The usual lease, without a Walk: a pass begins at the cursor (see _search), whose
            # candidate is most often free. If it is not, the walk begins after it (and comes
            # back to it last).
            seen.tries += 1
            lease = self._try(numbers[cursor], request, seen, thread)
            cursor = (cursor + 1) % len(numbers)
            self._cursors[spans] = cursor
            if lease is not None:
                self._held[lease.port] = lease
                return [lease.port]
            if stop is not None and seen.tries >= stop:
                return None
        fits = None if n == 1 else (lambda i: numbers[i + n - 1] - numbers[i] == n - 1)
        walk = Walk(len(numbers), cursor, self._random, n, fits)
        for first in walk:
            bound_before = seen.bound_tries
            taken = self._try_block(numbers[first : first + n], request, seen, thread)
            if len(taken) == n:
                for lease in taken:
                    self._held[lease.port] = lease
                walk.leased(first)
                self._cursors[spans] = walk.cursor
                return [lease.port for lease in taken]
            walk.stopped(len(taken), bound=seen.bound_tries != bound_before)
            if stop is not None and seen.tries >= stop:
                walk.give_up()
                break
        self._cursors[spans] = walk.cursor
        return None

    def _try_block(
        self, ports: Sequence[int], request: Request, seen: _Pass, thread: int
    ) -> list[Lease]:
        """Lease ``ports`` in turn, up to the first that cannot be; on a short block, give back
        what was taken (the caller sees fewer leases than ports)."""
        taken: list[Lease] = []
        try:
            for port in ports:
                seen.tries += 1
                lease = self._try(port, request, seen, thread)
                if lease is None:
                    break
                taken.append(lease)
        finally:  # out of descriptors, say, or a short block: give back the block's locks so far
            if len(taken) < len(ports):
                for lease in taken:
                    unlock(lease.fd, lease.pid)
        return taken

    def _try(self, port: int, request: Request, seen: _Pass, thread: int) -> Lease | None:
        mine = self._held.get(port)
        if mine is not None:
            seen.other_threads += mine.thread != thread
            return None
        locked = self._lock(port, seen)
        if locked is None:
            return None
        fd, pid = locked[0], current_pid()
        try:
            verdict = probe(port, request.kinds, request.targets)
            if verdict == BUSY and request.reuse_addr:
                verdict = FREE if _reusable(port, request.kinds, request.targets) else BUSY
            if verdict == FREE:
                return self._lease(locked, port, pid, request, seen, thread)
        except OSError as error:  # a socket could not even be created: give the lock back first
            unlock(fd, pid)
            raise self._os_error(error) from error
        except BaseException:
            unlock(fd, pid)
            raise
        unlock(fd, pid)
        if verdict == FORBIDDEN:
            seen.met[port] = _FORBIDDEN
            seen.forbidden_reason = seen.forbidden_reason or _forbidden_reason(port)
        else:
            seen.met[port] = _BOUND
            seen.bound_tries += 1
        return None

    def _lock(self, port: int, seen: _Pass) -> Locked | None:
        """``port``'s lock file, locked; None if another holder has it."""
        try:
            locked = try_lock(self.lock_dir, self._dir_fd, port)
        except Unusable as unusable:
            seen.met[port] = str(unusable)
            return None
        except FileNotFoundError:
            raise _DirGone from None
        except OSError as error:
            if error.errno == _ESTALE:  # NFS's word for a directory removed by another client
                raise _DirGone from None
            raise self._os_error(error) from error
        if locked is None:
            seen.met[port] = _LOCKED
        return locked

    def _lease(
        self, locked: Locked, port: int, pid: int, request: Request, seen: _Pass, thread: int
    ) -> Lease:
        fd, file = locked
        try:
            write_record(fd, port, pid, request.details, time.time())
        except OSError as error:
            first = seen.unrecorded  # the first failure is the one the warning names
            seen.unrecorded = first or f"could not record the holder of port {port}: {error}"
            _void_record(fd)
        return Lease(port, fd, pid, request, thread, file)

    # --- the lock dir gone or replaced ------------------------------------------------------

    def _recover(self) -> None:
        """Recreate the lock dir and lock every port held here again, on fresh lock files."""
        self._prepare_again()
        pid = current_pid()
        for lease in self._held.values():
            # Inherited over a fork: the parent's to lock again, not this child's.
            if lease.pid == pid and not lease.lost and not self._relock(lease):
                lease.lost = True
                self._lost.append(lease.port)

    def _prepare_again(self) -> None:
        self._dir_fd = _UNPREPARED  # closed first: never used again, whether or not this succeeds
        self._dir.reprepare()
        self._dir_fd = self._dir.fd

    def _relock(self, lease: Lease) -> bool:
        try:
            locked = try_lock(self.lock_dir, self._dir_fd, lease.port)
        except (Unusable, OSError):
            locked = None
        if locked is None:
            return False
        unlock(lease.fd, lease.pid)
        (lease.fd, lease.file), lease.pid = locked, current_pid()
        with contextlib.suppress(OSError):  # the record is a detail; the lock is the lease
            write_record(lease.fd, lease.port, lease.pid, lease.request.details, time.time())
        return True

    def _lost_at_release(self, lease: Lease) -> None:
        """The lock file of a lease being released is gone or replaced. If the dir is, the next
        leases go to the one at its path, and the other ports held here need new locks; this one
        is lost unless it could be locked again too."""
        if self._dir.prepared and not self._dir.unchanged():
            if len(self._held) > 1:
                self._recover()  # a failure to recover is raised: those ports' locks are gone
            else:
                # Nothing else to lock again, only the next leases' directory to prepare: if it
                # cannot be (a symlink planted there, say), the next lease raises the reason kept,
                # and this release still warns.
                with contextlib.suppress(LockDirError):
                    self._prepare_again()
        if not lease.lost and not self._in_place(lease):
            lease.lost = True
            self._lost.append(lease.port)

    def _in_place(self, lease: Lease) -> bool:
        """Whether the lease's lock file is still the one at its path (a forked child's
        inherited lease is its parent's to check)."""
        path = self._prefix + name_of(lease.port)
        return lease.pid != current_pid() or still_in_place(path, lease.file)

    def _warn_lost(self) -> None:
        if self._lost:
            lost, self._lost = self._lost, []
            warnings.warn(
                f"the lock dir {self.lock_dir} or lock files in it vanished or were replaced while"
                f" this process held port(s) {', '.join(map(str, sorted(lost)))}; another process"
                " may have leased them meanwhile: they may be shared now",
                RuntimeWarning,
                stacklevel=3,
            )

    def _warn_after(self, leased: list[int], seen: _Pass) -> None:
        """Warnings about a successful lease; under ``-W error`` the lease must not stay held."""
        try:
            self._warn_lost()
            if seen.unrecorded:
                warnings.warn(f"{seen.unrecorded} (the lease stands)", RuntimeWarning, 4)
        except BaseException:
            for port in leased:
                self.release(port)
            raise

    # --- errors -----------------------------------------------------------------------------

    def _os_error(self, error: OSError) -> EphemeralError:
        """A clear error for running out of something while leasing."""
        if error.errno in _NO_DESCRIPTORS:
            try:
                import resource

                limit = f", now {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}"
            except (ImportError, OSError, ValueError):
                limit = ""
            return EphemeralError(
                f"out of file descriptors ({error.strerror}) while leasing a port: this process"
                f" holds {len(self._held)} leases in {self.lock_dir}, one descriptor each; raise"
                f" the limit (ulimit -n{limit}) or release ports sooner"
            )
        if error.errno in _NO_SPACE:
            from ._lockdir import explain

            return LockDirError(self.lock_dir, f"cannot take a new lock file: {explain(error)}")
        return EphemeralError(f"cannot lease a port in {self.lock_dir}: {error}")

    def _exhausted(
        self, n: int, ports: PortRange, seen: _Pass, waited: float | None
    ) -> PortsExhausted:
        with self._mutex:
            dir_fd = self._dir.fd
            held_here = len(self._held.keys() & set(ports.ports))
        holders = []
        for port in sorted(seen.ports(_LOCKED)):
            try:
                record = read_live_record(self.lock_dir, port, dir_fd)
            except (Unusable, OSError):
                continue
            if record is not None:
                holders.append(record)
                if len(holders) == _MAX_HOLDERS_SHOWN:
                    break
        return PortsExhausted(
            range_text=str(ports),
            size=len(ports),
            n=n,
            waited=waited,
            locked=len(seen.ports(_LOCKED)),
            bound=len(seen.ports(_BOUND)),
            forbidden=len(seen.ports(_FORBIDDEN)),
            forbidden_reason=seen.forbidden_reason,
            unusable=seen.unusable(),
            held_here=held_here,
            holders=holders,
        )


def _check_block(n: int, ports: PortRange) -> None:
    if isinstance(n, bool) or not isinstance(n, int):
        raise ConfigTypeError(f"the number of ports must be an int, not {type(n).__name__}")
    if n < 1:
        raise ConfigError(f"a block needs at least one port, not {n}")
    longest = ports.longest_run()
    if n > longest:
        raise ConfigError(
            f"cannot lease {n} consecutive ports: the longest run in {ports} is {longest}"
        )


def _void_record(fd: int) -> None:
    """Empty the first line, so an older holder's record is not shown for this lease."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"\n\n")
    except OSError:
        pass


def _reusable(port: int, kinds: tuple[socket.SocketKind, ...], targets: Targets) -> bool:
    """Busy to a plain bind, but free for servers that set SO_REUSEADDR (the setting reuse_addr):
    only TIME_WAIT or connections on TCP, and a free port for UDP if asked for too."""
    from ._leakcheck import reusable

    if socket.SOCK_DGRAM in kinds and probe(port, (socket.SOCK_DGRAM,), targets) != FREE:
        return False
    return reusable(port, targets)


def _forbidden_reason(port: int) -> str:
    if port < 1024:
        return "ports below 1024 need root"
    return "permission denied by the OS"


# --- the registry: one allocator per lock dir per process ------------------------------------
# Kept here rather than in a module of its own: it is the allocators' constructor and their
# fork handling (it resets their mutexes), and every caller imports ``allocator_for`` from here.

_allocators: dict[str, PortAllocator] = {}  # by the lock dir's one resolved spelling
_by_spelling: dict[str, PortAllocator] = {}  # by each spelling asked for (a cache of the above)
_every: tuple[PortAllocator, ...] = ()  # the values of _allocators, replaced whole: for held_here
_registry_mutex = threading.Lock()
_default_holder: Holder | None = None


def allocator_for(lock_dir: str, given: bool = True) -> PortAllocator:
    """This process's allocator for ``lock_dir`` (one lock dir spelled two ways is one)."""
    global _every
    allocator = _by_spelling.get(lock_dir)  # the common case, without resolving the path again
    if allocator is not None:
        return allocator
    parent, name = os.path.split(os.path.abspath(lock_dir))
    key = os.path.join(os.path.realpath(parent), name)
    with _registry_mutex:
        allocator = _allocators.get(key)
        if allocator is None:
            allocator = _allocators[key] = PortAllocator(key, given)
            _every = (*_every, allocator)
        _by_spelling[lock_dir] = allocator
        return allocator


def held_here(port: int) -> bool:
    """Whether this process holds a lease of ``port`` in any lock dir (through ``allocator_for``).

    Reads each allocator's held ports without its mutex: a dict lookup is atomic, and a lease
    taken or ended by another thread at this moment may be seen either way.
    """
    return any(port in allocator._held for allocator in _every)


def default_holder() -> Holder:
    """The holder of leases made outside pytest: this process (made again after a fork)."""
    global _default_holder
    if _default_holder is None or _default_holder.pid != current_pid():
        _default_holder = this_process()
    return _default_holder


def _after_fork_in_child() -> None:
    global _registry_mutex
    _registry_mutex = threading.Lock()  # a thread of the parent may have held one at the fork
    for allocator in _every:
        allocator._mutex = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
