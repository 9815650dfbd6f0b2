"""The allocator: searches the range for ports it can lock and bind, and keeps them leased.

Lock first, then check: a candidate's lock is taken without blocking, then the port is bind-checked;
a busy port's lock is released at once. Each process walks the range from a random starting point
and moves on from its last lease, so concurrent processes rarely try the same candidate and a port
this process just released is the last one it comes back to (giving its TIME_WAIT time to pass).
"""

from __future__ import annotations

import itertools
import os
import random
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field

from ._errors import PortsExhausted
from ._holder import Holder, describe, this_process
from ._lease import lock_path, read_live_record, try_lock, unlock, write_record
from ._probe import bind_targets, is_free, socket_kinds
from ._settings import Settings

_MAX_HOLDERS_SHOWN = 10
_POLL_FIRST, _POLL_MAX = 0.005, 0.1

#: Every port this process holds, by lock dir, whichever allocator leased it, with the thread that
#: leased it: allocators of one process (the plugin's, ``lease_port``'s) skip each other's ports
#: without touching the file system, and never mistake them for another run's. Guarded by
#: ``_mutex``.
_held_here: dict[str, dict[int, int]] = {}
_mutex = threading.Lock()


def _after_fork_in_child() -> None:
    global _mutex
    _mutex = threading.Lock()  # a thread of the parent may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass
class Stats:
    """Counters for the run summary; plain numbers so they can cross process boundaries."""

    leased: int = 0
    peak: int = 0
    skipped_bound: int = 0
    skipped_locked: int = 0
    waited: float = 0.0


@dataclass(frozen=True)
class Lease:
    """A leased port: the descriptor whose lock reserves it, who took it, and what for."""

    port: int
    fd: int
    pid: int  # the process that took the lock (a forked child must not unlock it)
    kinds: tuple[socket.SocketKind, ...]  # the protocols it was bind-checked for
    nodeid: str | None


@dataclass
class _Pass:
    """What one walk over the range met, for the exhaustion message."""

    #: Held by another thread of this process, which may release them: worth waiting for.
    other_threads: int = 0
    bound: int = 0
    locked: list[int] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)  # holder records that failed


class PortAllocator:
    """Leases ports of ``settings.ports`` to this process; thread-safe.

    Every lease holds an open, locked descriptor until ``release`` (or ``release_all``).
    """

    def __init__(self, settings: Settings, holder: Holder | None = None) -> None:
        self.settings = settings
        self.holder = holder or this_process()
        self.stats = Stats()
        self._ports = settings.ports.ports
        self._lock_dir = str(settings.lock_dir)
        self.targets = bind_targets(settings.host)  # where the bind probe binds
        self._held: dict[int, Lease] = {}
        with _mutex:
            self._held_here = _held_here.setdefault(self._lock_dir, {})
        # SystemRandom: pytest-randomly reseeds the global generator alike in every xdist worker.
        self._cursor = random.SystemRandom().randrange(len(self._ports))

    @property
    def held(self) -> frozenset[int]:
        """The ports this allocator holds now."""
        with _mutex:
            return frozenset(self._held)

    def lease(self, protocol: str = "tcp", nodeid: str | None = None) -> int:
        """Lease one port, bind-checked for ``protocol`` ("tcp", "udp" or "both")."""
        return self.lease_block(1, protocol, nodeid)[0]

    def lease_block(self, n: int, protocol: str = "tcp", nodeid: str | None = None) -> list[int]:
        """Lease ``n`` consecutive ports; poll up to the timeout while others hold them."""
        kinds = socket_kinds(protocol)
        if n < 1:
            raise ValueError(f"a block needs at least one port, not {n}")
        longest = self.settings.ports.longest_run()
        if n > longest:
            raise ValueError(
                f"cannot lease {n} consecutive ports: the longest run in"
                f" {self.settings.ports} is {longest}"
            )
        deadline: float | None = None
        pause = _POLL_FIRST
        while True:
            with _mutex:
                seen = _Pass()
                ports = self._walk(n, kinds, nodeid, seen)
            if ports is not None:
                if seen.unrecorded:
                    self._warn_unrecorded(ports, seen.unrecorded)
                return ports
            if not seen.locked and not seen.bound and not seen.other_threads:
                raise self._exhausted(n, seen, waited=None)  # all this thread's: waiting is vain
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.settings.timeout
            if now >= deadline:
                raise self._exhausted(n, seen, waited=self.settings.timeout)
            nap = min(pause, deadline - now)
            time.sleep(nap)
            self.stats.waited += nap
            pause = min(pause * 2, _POLL_MAX)

    def release(self, port: int) -> None:
        """End the lease of ``port``; ``ValueError`` if this allocator does not hold it."""
        with _mutex:
            lease = self._held.pop(port, None)
            if lease is None:
                raise ValueError(f"port {port} is not leased by this allocator")
            del self._held_here[port]
            unlock(lease.fd, lease.pid)

    def release_all(self) -> None:
        with _mutex:
            for port, lease in self._held.items():
                del self._held_here[port]
                unlock(lease.fd, lease.pid)
            self._held.clear()

    def lease_of(self, port: int) -> Lease:
        """The lease of ``port``; ``ValueError`` if this allocator does not hold it."""
        with _mutex:
            if port not in self._held:
                raise ValueError(f"port {port} is not leased by this allocator")
            return self._held[port]

    def _warn_unrecorded(self, ports: list[int], problems: list[str]) -> None:
        try:
            warnings.warn(f"{problems[0]} (the lease stands)", RuntimeWarning, stacklevel=4)
        except BaseException:  # -W error: the warning raises, so the leases must not stay held
            for port in ports:
                self.release(port)
            raise

    # --- search ---------------------------------------------------------------------------

    def _walk(
        self, n: int, kinds: tuple[socket.SocketKind, ...], nodeid: str | None, seen: _Pass
    ) -> list[int] | None:
        """One pass over the range from the cursor; lease and return ``n`` consecutive ports."""
        ports, size = self._ports, len(self._ports)
        thread = threading.get_ident()
        step = 0
        while step < size:
            first = (self._cursor + step) % size
            step += 1
            if first + n > size or ports[first + n - 1] - ports[first] != n - 1:
                continue  # not n consecutive candidates from here
            taken: list[Lease] = []
            try:
                for index in range(first, first + n):
                    lease = self._try(ports[index], kinds, nodeid, seen, thread)
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
                    self._held_here[lease.port] = thread
                self._cursor = (first + n) % size
                self.stats.leased += n
                self.stats.peak = max(self.stats.peak, len(self._held))
                return [lease.port for lease in taken]
            for lease in taken:
                unlock(lease.fd, lease.pid)
            step += len(taken)  # every start up to the busy port would meet it again
        return None

    def _try(
        self,
        port: int,
        kinds: tuple[socket.SocketKind, ...],
        nodeid: str | None,
        seen: _Pass,
        thread: int,
    ) -> Lease | None:
        holder = self._held_here.get(port)
        if holder is not None:
            seen.other_threads += holder != thread
            return None
        fd = try_lock(lock_path(self._lock_dir, port))
        if fd is None:
            seen.locked.append(port)
            self.stats.skipped_locked += 1
            return None
        pid = os.getpid()
        try:
            if is_free(port, kinds, self.targets):
                problem = write_record(fd, self.holder, port, nodeid, time.time())
                if problem:
                    seen.unrecorded.append(problem)
                return Lease(port, fd, pid, kinds, nodeid)
        except BaseException:  # out of file descriptors, say: give the lock back first
            unlock(fd, pid)
            raise
        unlock(fd, pid)
        seen.bound += 1
        self.stats.skipped_bound += 1
        return None

    def _exhausted(self, n: int, seen: _Pass, waited: float | None) -> PortsExhausted:
        ports = self.settings.ports
        with _mutex:
            held_here = len(self._held_here.keys() & set(ports.ports))
        what = "free port" if n == 1 else f"block of {n} free consecutive ports"
        when = "now" if waited is None else f"within {waited:g} s"
        lines = [
            f"no {what} in {ports} ({ports.size}) {when}:"
            f" {len(set(seen.locked))} locked by other runs,"
            f" {seen.bound} bound by other programs or in TIME_WAIT,"
            f" {held_here} held by this process."
        ]
        records = (read_live_record(self._lock_dir, p) for p in sorted(set(seen.locked)))
        live = (describe(record) for record in records if record is not None)
        holders = list(itertools.islice(live, _MAX_HOLDERS_SHOWN))
        if holders:
            lines.append("Holders:")
            lines.extend(f"  {line}" for line in holders)
        lines.append(
            "Widen the range (--ephemeral-port-range), lower -n, release ports sooner,"
            " or look for leaked leases with `pytest-ephemeral status`."
        )
        return PortsExhausted("\n".join(lines))
