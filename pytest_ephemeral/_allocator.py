"""The allocator: one per lock dir per process; searches a range for ports it can lock and bind.

Lock first, then check: a candidate's lock is taken without blocking, then the port is bind-checked;
a busy port's lock is released at once. Each process walks a range from a random starting point and
moves on from its last lease, so concurrent processes rarely try the same candidate and a port this
process just released is the last one it comes back to (giving its TIME_WAIT time to pass).

What a lease is for (range, protocol, host, timeout, holder) comes with each request, as a resolved
``Settings`` and arguments; what belongs to the lock dir (the held ports, whichever code leased
them, and the prepared directory) lives here, once per process. The directory is prepared on the
first lease; if it vanishes or is replaced mid-run, the next lease (or the release of one of several
held ports) recreates it and locks this process's held ports again before leasing anything new.
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
from dataclasses import dataclass, field

from ._errors import ConfigError, EphemeralError, LockDirError, PortsExhausted
from ._holder import Holder, this_process
from ._lockdir import Prepared, identity, prepare
from ._lockfile import Unusable, read_live_record, try_lock, unlock, write_record
from ._probe import BUSY, FORBIDDEN, FREE, Targets, bind_targets, probe, socket_kinds
from ._ranges import PortRange
from ._settings import Settings

_MAX_HOLDERS_SHOWN = 10
_POLL_FIRST, _POLL_MAX = 0.005, 0.1
#: A walk whose first candidates are bound starts again at random, this often at most: see _walk.
_JUMPS, _JUMP_WITHIN = 4, 4
_NO_SPACE = {errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NO_DESCRIPTORS = {errno.EMFILE, errno.ENFILE}


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


@dataclass
class Lease:
    """A leased port: the descriptor whose lock reserves it, who took it, and what for."""

    port: int
    fd: int
    pid: int  # the process that took the lock (a forked child must not unlock it)
    kinds: tuple[socket.SocketKind, ...]  # the protocols it was bind-checked for
    nodeid: str | None
    holder: Holder
    thread: int  # the thread that leased it: only it makes waiting for the port pointless


@dataclass
class _Pass:
    """What the walks of one request met, for the exhaustion error and the figures."""

    #: Held by another thread of this process, which may release them: worth waiting for.
    other_threads: int = 0
    locked: set[int] = field(default_factory=set)
    bound: set[int] = field(default_factory=set)
    forbidden: set[int] = field(default_factory=set)
    forbidden_reason: str | None = None
    unusable: dict[int, str] = field(default_factory=dict)
    unrecorded: list[str] = field(default_factory=list)  # holder records that could not be written
    bound_tries: int = 0  # tries that found their port bound (this request, every walk)


_UNCOUNTED = Stats()  # the figures of callers that keep none (lease_port): never read


class _DirGone(Exception):
    """The lock dir vanished under a walk: recover, then walk again."""


_allocators: dict[str, PortAllocator] = {}  # by the lock dir's one resolved spelling
_by_spelling: dict[str, PortAllocator] = {}  # by each spelling asked for (a cache of the above)
_registry_mutex = threading.Lock()
_default_holder: Holder | None = None
_RANDOM = random.SystemRandom()  # not random's: pytest-randomly reseeds that alike in every worker


def allocator_for(lock_dir: str, given: bool = True) -> PortAllocator:
    """This process's allocator for ``lock_dir`` (one lock dir spelled two ways is one)."""
    allocator = _by_spelling.get(lock_dir)  # the common case, without resolving the path again
    if allocator is not None:
        return allocator
    parent, name = os.path.split(os.path.abspath(lock_dir))
    key = os.path.join(os.path.realpath(parent), name)
    with _registry_mutex:
        allocator = _allocators.get(key)
        if allocator is None:
            allocator = _allocators[key] = PortAllocator(key, given)
        _by_spelling[lock_dir] = allocator
        return allocator


def default_holder() -> Holder:
    """The holder of leases made outside pytest: this process (made again after a fork)."""
    global _default_holder
    if _default_holder is None or _default_holder.pid != os.getpid():
        _default_holder = this_process()
    return _default_holder


def _after_fork_in_child() -> None:
    global _registry_mutex
    _registry_mutex = threading.Lock()  # a thread of the parent may have held one at the fork
    for allocator in _allocators.values():
        allocator._mutex = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class PortAllocator:
    """Leases ports whose lock files live in one lock dir; thread-safe. Use ``allocator_for``.

    Every lease holds an open, locked descriptor until ``release``.
    """

    def __init__(self, lock_dir: str, given: bool) -> None:
        self.lock_dir = lock_dir
        self._given = given
        self._dir: Prepared | None = None
        self._failure: LockDirError | None = None
        self._held: dict[int, Lease] = {}
        self._cursors: dict[tuple[tuple[int, int], ...], int] = {}
        self._lost: list[int] = []  # ports re-locked by others while the dir was gone: to warn
        self._mutex = threading.Lock()

    @property
    def held(self) -> frozenset[int]:
        """The ports this process holds in this lock dir now."""
        with self._mutex:
            return frozenset(self._held)

    def lease(
        self,
        settings: Settings,
        protocol: str = "tcp",
        nodeid: str | None = None,
        holder: Holder | None = None,
        stats: Stats | None = None,
    ) -> int:
        """Lease one port of ``settings.ports``, bind-checked for ``protocol``."""
        return self.lease_block(1, settings, protocol, nodeid, holder, stats)[0]

    def lease_block(
        self,
        n: int,
        settings: Settings,
        protocol: str = "tcp",
        nodeid: str | None = None,
        holder: Holder | None = None,
        stats: Stats | None = None,
    ) -> list[int]:
        """Lease ``n`` consecutive ports; poll up to ``settings.timeout`` while others hold them."""
        kinds = socket_kinds(protocol)
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"the number of ports must be an int, not {type(n).__name__}")
        if n < 1:
            raise ConfigError(f"a block needs at least one port, not {n}")
        ports = settings.ports
        longest = ports.longest_run()
        if n > longest:
            raise ConfigError(
                f"cannot lease {n} consecutive ports: the longest run in {ports} is {longest}"
            )
        targets = bind_targets(settings.host)
        holder = holder or default_holder()
        stats = stats if stats is not None else _UNCOUNTED
        seen = _Pass()
        deadline: float | None = None
        pause = _POLL_FIRST
        while True:
            with self._mutex:
                self._ensure_dir()
                try:
                    leased = self._walk(
                        n, ports, kinds, targets, nodeid, holder, seen, settings.reuse_addr
                    )
                except _DirGone:
                    self._recover()
                    continue
                if leased is not None:
                    stats.leased += n
                    stats.peak = max(stats.peak, len(self._held))
            if leased is not None:
                stats.skipped_locked += len(seen.locked)
                stats.skipped_bound += len(seen.bound)
                self._warn_after(leased, seen)
                return leased
            if not seen.locked and not seen.bound and not seen.other_threads:
                raise self._exhausted(n, ports, seen, waited=None)  # waiting cannot help
            now = time.monotonic()
            if deadline is None:
                deadline = now + settings.timeout
            if now >= deadline:
                stats.skipped_locked += len(seen.locked)
                stats.skipped_bound += len(seen.bound)
                raise self._exhausted(n, ports, seen, waited=settings.timeout)
            nap = min(pause, deadline - now)
            time.sleep(nap)
            stats.waited += nap
            pause = min(pause * 2, _POLL_MAX)
            seen.other_threads = 0  # counted afresh by the next walk

    def release(self, port: int) -> None:
        """End the lease of ``port``; ``ValueError`` if this process does not hold it here."""
        with self._mutex:
            lease = self._held.get(port)
            if lease is None:
                raise ValueError(f"port {port} is not leased in {self.lock_dir}")
            # If the dir vanished, the other ports held here need new locks; when this port is
            # the only one, there is nothing to lock again, and the next lease checks the dir.
            try:
                if len(self._held) > 1 and self._dir is not None and not self._dir_unchanged():
                    self._recover()
            finally:  # a recovery that fails (a symlink planted meanwhile) keeps no lock here
                del self._held[port]
                unlock(lease.fd, lease.pid)
        self._warn_lost()

    def lease_of(self, port: int) -> Lease:
        """The lease of ``port``; ``ValueError`` if this process does not hold it here."""
        with self._mutex:
            lease = self._held.get(port)
        if lease is None:
            raise ValueError(f"port {port} is not leased in {self.lock_dir}")
        return lease

    # --- the lock dir ---------------------------------------------------------------------

    def _ensure_dir(self) -> None:
        """Prepare the lock dir on first use; notice if it vanished or was replaced since."""
        if self._failure is not None:
            raise self._failure
        if self._dir is None:
            self._prepare()
        elif not self._dir_unchanged():
            self._recover()

    def _dir_unchanged(self) -> bool:
        """Whether the lock dir prepared is still the one at its path (not gone, not replaced)."""
        assert self._dir is not None
        return identity(self.lock_dir) == self._dir[1:]

    def _prepare(self) -> Prepared:
        try:
            self._dir = prepare(self.lock_dir, self._given)
        except LockDirError as error:
            self._failure = error  # every later lease fails at once, with the same reason
            raise
        return self._dir

    def _recover(self) -> None:
        """Recreate the lock dir and lock every port held here again, on fresh lock files."""
        if self._dir is not None and self._dir.fd >= 0:
            os.close(self._dir.fd)
        self._dir = None
        dir_fd = self._prepare().fd
        pid = os.getpid()
        for lease in self._held.values():
            if lease.pid != pid:
                continue  # inherited over a fork: the parent's to lock again, not this child's
            try:
                fd = try_lock(self.lock_dir, dir_fd, lease.port)
            except (Unusable, OSError):
                fd = None
            if fd is None:
                self._lost.append(lease.port)
                continue
            unlock(lease.fd, lease.pid)
            lease.fd, lease.pid = fd, pid
            with contextlib.suppress(OSError):  # the record is a detail; the lock is the lease
                write_record(fd, lease.holder, lease.port, lease.nodeid, time.time(), pid)

    def _warn_lost(self) -> None:
        if self._lost:
            lost, self._lost = self._lost, []
            warnings.warn(
                f"the lock dir {self.lock_dir} vanished while this process held ports; another"
                f" process locked port(s) {', '.join(map(str, sorted(lost)))} before they could be"
                " locked again: they may be shared now",
                RuntimeWarning,
                stacklevel=3,
            )

    def _warn_after(self, leased: list[int], seen: _Pass) -> None:
        """Warnings about a successful lease; under ``-W error`` the lease must not stay held."""
        try:
            self._warn_lost()
            if seen.unrecorded:
                warnings.warn(f"{seen.unrecorded[0]} (the lease stands)", RuntimeWarning, 4)
        except BaseException:
            for port in leased:
                self.release(port)
            raise

    # --- search ---------------------------------------------------------------------------

    def _walk(
        self,
        n: int,
        ports: PortRange,
        kinds: tuple[socket.SocketKind, ...],
        targets: Targets,
        nodeid: str | None,
        holder: Holder,
        seen: _Pass,
        reuse: bool,
    ) -> list[int] | None:
        """One pass over the range from the cursor; lease and return ``n`` consecutive ports.

        Each process leases its way up the range from a random start, so an earlier run leaves a
        stretch of ports in TIME_WAIT behind it (for 60 s, where its servers closed first). A walk
        that lands in such a stretch would try every port of it in turn: one that finds a bound
        port among its first few candidates starts again at random instead, a few times, before
        it walks on port by port (so the pass still sees every port before giving up).
        """
        numbers, size = ports.ports, len(ports)
        cursor = self._cursors.get(ports.spans)
        if cursor is None:
            cursor = _RANDOM.randrange(size)
        thread = threading.get_ident()
        step = jumps = 0
        while step < size:
            first = (cursor + step) % size
            step += 1
            if first + n > size or numbers[first + n - 1] - numbers[first] != n - 1:
                continue  # not n consecutive candidates from here
            taken: list[Lease] = []
            bound_tries = seen.bound_tries
            try:
                for index in range(first, first + n):
                    lease = self._try(
                        numbers[index], kinds, targets, nodeid, holder, seen, thread, reuse
                    )
                    if lease is None:
                        break
                    taken.append(lease)
            except BaseException:  # out of descriptors, say: give back the block's locks so far
                for lease in taken:
                    unlock(lease.fd, lease.pid)
                raise
            if len(taken) == n:
                for lease in taken:
                    self._held[lease.port] = lease
                self._cursors[ports.spans] = (first + n) % size
                return [lease.port for lease in taken]
            for lease in taken:
                unlock(lease.fd, lease.pid)
            if seen.bound_tries != bound_tries and step <= _JUMP_WITHIN and jumps < _JUMPS:
                cursor, step, jumps = _RANDOM.randrange(size), 0, jumps + 1
                continue
            step += len(taken)  # every start up to the busy port would meet it again
        self._cursors[ports.spans] = cursor
        return None

    def _try(
        self,
        port: int,
        kinds: tuple[socket.SocketKind, ...],
        targets: Targets,
        nodeid: str | None,
        holder: Holder,
        seen: _Pass,
        thread: int,
        reuse: bool,
    ) -> Lease | None:
        mine = self._held.get(port)
        if mine is not None:
            seen.other_threads += mine.thread != thread
            return None
        assert self._dir is not None
        try:
            fd = try_lock(self.lock_dir, self._dir.fd, port)
        except Unusable as unusable:
            seen.unusable[port] = str(unusable)
            return None
        except FileNotFoundError:
            raise _DirGone from None
        except OSError as error:
            raise self._os_error(error) from error
        if fd is None:
            seen.locked.add(port)
            return None
        pid = os.getpid()
        try:
            verdict = probe(port, kinds, targets)
            if verdict == BUSY and reuse and _reusable(port, kinds, targets):
                verdict = FREE
            if verdict == FREE:
                try:
                    write_record(fd, holder, port, nodeid, time.time(), pid)
                except OSError as error:
                    seen.unrecorded.append(f"could not record the holder of port {port}: {error}")
                    _void_record(fd)
                return Lease(port, fd, pid, kinds, nodeid, holder, thread)
        except OSError as error:  # a socket could not even be created: give the lock back first
            unlock(fd, pid)
            raise self._os_error(error) from error
        except BaseException:
            unlock(fd, pid)
            raise
        unlock(fd, pid)
        if verdict == FORBIDDEN:
            seen.forbidden.add(port)
            seen.forbidden_reason = seen.forbidden_reason or _forbidden_reason(port)
        else:
            seen.bound.add(port)
            seen.bound_tries += 1
        return None

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
            dir_fd = self._dir.fd if self._dir is not None else -1
            held_here = len(self._held.keys() & set(ports.ports))
        holders = []
        for port in sorted(seen.locked):
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
            locked=len(seen.locked),
            bound=len(seen.bound),
            forbidden=len(seen.forbidden),
            forbidden_reason=seen.forbidden_reason,
            unusable=seen.unusable,
            held_here=held_here,
            holders=holders,
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
