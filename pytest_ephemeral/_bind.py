"""``socket.socket.bind`` replaced for a pytest session: the ``bind0`` adapter and the audit.

Rule: a bind that succeeds without this module succeeds with it, and a bind that fails still
fails the same way.

``bind0``: a ``bind()`` of a Python ``socket.socket`` (or a subclass: ``ssl.SSLSocket`` and every
server built on them) to port 0, on ``AF_INET`` or ``AF_INET6``, ``SOCK_STREAM`` or
``SOCK_DGRAM``, binds instead to a port leased for the scope that asked (fixture being set up,
else running test, else session), on the caller's address (the rest of an IPv6 tuple kept). So
the home-made recipe "bind port 0, read ``getsockname()``, close, return the number" hands out a
port no other test, worker or run gets until that scope ends. Whenever a lease cannot be had at
once (a bounded, non-waiting try), the process already holds many of these leases, the process
was forked from a test, or the bind to the leased port fails, the lease (if any) ends and port 0
is bound as asked: the operating system picks, as before.

``audit``: every successful bind to a nonzero port that no lease of this process holds (and no
enclosing ``pytest-ephemeral run`` leased: ``EPHEMERAL_PORTS``) emits ``UnleasedPortWarning`` at the
caller's bind, once per test and port.

Untouched: binds to nonzero ports (with the audit off), other families (``AF_UNIX``), other
socket types, ``socket.socketpair()`` (which binds nothing in Python), and the plugin's own probes,
which bind ``_socket.socket``, the C base class, and never pass through here. Re-entry (a bind of
port 0 made by the plugin while it leases, in the same thread) goes straight to the original.

The replacement is a function set on ``socket.socket`` at ``pytest_configure`` and removed at
``pytest_unconfigure``; sessions nest (pytester runs sessions in-process): the innermost session's
replacement is in place, and ending it puts back the one of the session around it. Each
combination of settings gets its own replacement, so a bind to a nonzero port pays for one
Python call and a type test, not for settings read on every call.
"""

from __future__ import annotations

import _socket
import os
import socket
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import pytest

if TYPE_CHECKING:
    from ._leases import SessionLeases


#: The families and types caught, and the protocol each type is leased (and bind-checked) for.
_FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6})
_PROTOCOLS: dict[int, Literal["tcp", "udp"]] = {
    socket.SOCK_STREAM: "tcp",
    socket.SOCK_DGRAM: "udp",
}
#: Candidates one bind(0) tries before leaving the choice to the OS (each costs a lock + probe).
MAX_TRIES = 8
#: At most one bind0 lease held per this many soft RLIMIT_NOFILE descriptors (each lease keeps a
#: descriptor: a test opening nearly as many sockets as its limit allows must still be able to),
#: and per this many ports of the range (one process's clients must not drain it for others).
NOFILE_SHARE = 64
RANGE_SHARE = 8

#: Counter names in ``SessionLeases.counters`` (summed over xdist workers).
LEASED, LEFT_TO_OS, STILL_OPEN = "bind0_leased", "bind0_os", "still_open"

_Bind = Callable[[socket.socket, Any], None]
#: A socket's family and type as plain ints, from the C base: ``socket.socket``'s properties
#: build enum members on every read, several times the cost of the rest of the check.
_family = _socket.socket.family.__get__
_type = _socket.socket.type.__get__


#: Forks of this process so far, as children count them: a binder made before a fork is in a
#: forked child when this differs from the count it was made with (a global read: no system
#: call on every bind, as os.getpid() would be).
_forks = 0


def _after_fork_in_child() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def lease_limit(range_size: int) -> int:
    """How many bind0 leases one process may hold at once."""
    limit = max(1, range_size // RANGE_SHARE)
    try:
        import resource  # not on Windows
    except ImportError:
        return limit
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        return limit
    if soft == resource.RLIM_INFINITY:
        return limit
    return max(1, min(limit, soft // NOFILE_SHARE))


def enclosing_run_ports(environ: Mapping[str, str]) -> frozenset[int]:
    """Ports an enclosing ``pytest-ephemeral run`` leased for this run (``EPHEMERAL_PORTS``)."""
    ports = set()
    for part in environ.get("EPHEMERAL_PORTS", "").split(","):
        text = part.strip()
        if text.isascii() and text.isdigit() and 0 < int(text) < 65536:  # a stray value: ignored
            ports.add(int(text))
    return frozenset(ports)


class Binder:
    """One session's handling of binds: what ``socket.socket.bind`` does while it is installed."""

    def __init__(
        self,
        leases: SessionLeases,
        *,
        bind0: bool,
        audit: bool,
        held_here: Callable[[int], bool],
    ) -> None:
        self.leases = leases
        self.bind0 = bind0
        self.audit = audit
        self.held_here = held_here
        self.forks = _forks  # a process forked from a test leaves its binds to the OS
        self.limit = lease_limit(len(leases.settings.ports))
        self.on_leak: Literal["warn", "count"] = "warn" if audit else "count"
        self.outer_ports = enclosing_run_ports(os.environ)
        self.base: _Bind = _base_bind()
        self._mine: set[int] = set()  # ports of bind0 leases, some maybe ended (pruned at limit)
        self.broken = False  # a lease failed with an error: binds of port 0 go to the OS
        self._warned: set[tuple[str | None, int]] = set()
        self._local = threading.local()  # .busy: this thread is leasing for a bind(0)
        self._mutex = threading.Lock()
        self.replacement = _replacement(self)

    # --- bind0 ---------------------------------------------------------------------------------

    def bind_zero(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        """A bind to port 0: to a leased port if one can be had at once, else as asked."""
        # _caught(sock) written out, and the room checked before any call: every bind(0) comes here.
        protocol = _PROTOCOLS.get(_type(sock)) if _family(sock) in _FAMILIES else None
        local = self._local
        if protocol is None or self.broken or getattr(local, "busy", False) or _forks != self.forks:
            return self.base(sock, address)
        room = len(self._mine) < self.limit or self._room_after_pruning()
        port = self._lease(protocol) if room else None
        if port is not None:
            try:
                self.base(sock, (address[0], port, *address[2:]))
            except Exception:  # taken meanwhile by a program that ignores the locks, say
                local.busy = True
                try:  # never used by this socket: given back without a leak check
                    self.leases.give_back(port)
                except Exception:
                    self.broken = True  # the lock dir failed: leave every bind to the OS now
                finally:
                    local.busy = False
            else:
                with self._mutex:
                    self._mine.add(port)
                    self.leases.counters[LEASED] += 1
                return None
        self.base(sock, address)  # fails as it would have, or succeeds: then it is counted
        with self._mutex:
            self.leases.counters[LEFT_TO_OS] += 1
        return None

    def _lease(self, protocol: Literal["tcp", "udp"]) -> int | None:
        local = self._local
        local.busy = True  # the lease's own binds of port 0 (IPv6 and host checks) go through
        try:
            return self.leases.try_lease(protocol, max_tries=MAX_TRIES, on_leak=self.on_leak)
        except Exception:  # a broken lock dir, no descriptor left, a warning made an error
            # The fixtures that lease report it; this bind, and every later one, works as before
            # (a lock dir that cannot be prepared would cost every bind(0) another attempt).
            self.broken = True
            return None
        finally:
            local.busy = False

    def _room_after_pruning(self) -> bool:
        """Whether this process may take one more bind0 lease, once the ports taken are pruned
        of ended leases: done only when they reach the limit (no bookkeeping per lease end; the
        size is read without the mutex: threads binding at once may pass the bound by one each)."""
        with self._mutex:
            self._mine = {port for port in self._mine if self.leases.holds(port)}
            return len(self._mine) < self.limit

    # --- audit ---------------------------------------------------------------------------------

    def bind_audited(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        """A bind to a nonzero port: as asked, then a warning if no lease of ours covers it."""
        self.base(sock, address)
        protocol = _caught(sock)
        if protocol is None or getattr(self._local, "busy", False) or _forks != self.forks:
            return  # not a TCP or UDP socket, the plugin's own bind, a forked child's
        port = address[1]
        if port in self.outer_ports or self.held_here(port):
            return
        scope = self.leases.current_scope()
        key = (scope.nodeid, port)
        with self._mutex:
            if key in self._warned:
                return
            self._warned.add(key)
        from ._warnings import UnleasedPortWarning  # the first unleased bind: most runs have none

        warnings.warn(
            UnleasedPortWarning(
                f"{scope.describe()} bound {protocol.upper()} port {port}, which pytest-ephemeral"
                " did not lease: another test, xdist worker or pytest run may bind it at the same"
                " time. Bind port 0 instead (leased by the bind0 adapter), or use free_port,"
                " free_socket or port_factory"
            ),
            stacklevel=3,  # this method, the replacement, then the caller's bind
        )


def _caught(sock: socket.socket) -> Literal["tcp", "udp"] | None:
    """The protocol of an IPv4 or IPv6 TCP or UDP socket; None for any other socket."""
    return _PROTOCOLS.get(_type(sock)) if _family(sock) in _FAMILIES else None


def _replacement(binder: Binder) -> _Bind:
    """The ``bind`` to set on ``socket.socket`` for ``binder``'s settings. The test before the
    call is the whole cost for a bind that is not to port 0 (when the audit is off)."""
    base, zero, audited = binder.base, binder.bind_zero, binder.bind_audited
    if binder.bind0 and binder.audit:

        def bind(self: socket.socket, address: Any, /) -> None:
            if address.__class__ is tuple and len(address) > 1 and address[1].__class__ is int:
                return zero(self, address) if address[1] == 0 else audited(self, address)
            return base(self, address)

    elif binder.bind0:

        def bind(self: socket.socket, address: Any, /) -> None:
            # 0 only, not 0.0 or False, which a plain bind refuses or reads otherwise
            if address.__class__ is tuple and address[1:2] == (0,) and address[1].__class__ is int:
                return zero(self, address)
            return base(self, address)

    else:

        def bind(self: socket.socket, address: Any, /) -> None:
            if address.__class__ is tuple and len(address) > 1 and address[1].__class__ is int:
                return audited(self, address) if address[1] != 0 else base(self, address)
            return base(self, address)

    bind.__doc__ = base.__doc__
    bind.__qualname__ = "socket.bind"
    return bind


# --- installing, for nested sessions ---------------------------------------------------------

#: Installed binders, innermost last, each with the ``bind`` it replaced.
_stack: list[Binder] = []
_stack_mutex = threading.Lock()
#: What ``socket.socket.__dict__`` held under "bind" before the outermost install (None: nothing,
#: the C base's ``bind`` showed through).
_before: object = None


def _base_bind() -> _Bind:
    """The ``bind`` the replacements call: what was there before any session's replacement."""
    if _stack:
        return _stack[0].base
    found: _Bind = socket.socket.bind
    return found


def install(binder: Binder) -> None:
    global _before
    with _stack_mutex:
        if not _stack:
            _before = socket.socket.__dict__.get("bind")
        _stack.append(binder)
        setattr(socket.socket, "bind", binder.replacement)  # noqa: B010 (mypy: method assign)


def uninstall(binder: Binder) -> None:
    """Put back what ``binder``'s install replaced, unless something replaced it since."""
    with _stack_mutex:
        if binder not in _stack:
            return
        innermost = _stack[-1] is binder
        _stack.remove(binder)
        if not innermost or socket.socket.__dict__.get("bind") is not binder.replacement:
            return  # an inner session still runs, or someone else's bind is in place now
        if _stack:
            setattr(socket.socket, "bind", _stack[-1].replacement)  # noqa: B010
        elif _before is None:
            delattr(socket.socket, "bind")
        else:
            setattr(socket.socket, "bind", _before)  # noqa: B010


class BindPlugin:
    """The session's binder, put back at ``pytest_unconfigure``, and its summary line."""

    def __init__(self, binder: Binder) -> None:
        self.binder = binder

    @pytest.hookimpl(tryfirst=True)  # before the plugin's ends the session's leases
    def pytest_unconfigure(self) -> None:
        uninstall(self.binder)

    @pytest.hookimpl(trylast=True)  # after the plugin's, which adds this process's figures
    def pytest_terminal_summary(
        self, terminalreporter: pytest.TerminalReporter, config: pytest.Config
    ) -> None:
        totals = self.binder.leases.totals()  # of every xdist worker
        leased, left, still_open = (
            int(totals.get(key, 0)) for key in (LEASED, LEFT_TO_OS, STILL_OPEN)
        )
        if config.get_verbosity() < 1:
            return
        terminalreporter.write_line(
            f"ephemeral bind(0): {leased} binds leased, {left} left to the OS;"
            f" {still_open} socket{'s' * (still_open != 1)} still open at the end of their scope"
        )


def configure(config: pytest.Config, leases: SessionLeases) -> None:
    """Install the session's binder if ``bind0`` is adopted or the audit is on (called from
    ``pytest_configure``, after the adapters)."""
    settings = leases.settings
    bind0, audit = "bind0" in settings.adopt, settings.audit
    if not (bind0 or audit):
        return

    def held_here(port: int) -> bool:  # loaded on the first audited bind: it imports filelock
        from ._allocator import held_here

        binder.held_here = held_here
        return held_here(port)

    binder = Binder(leases, bind0=bind0, audit=audit, held_here=held_here)
    config.pluginmanager.register(BindPlugin(binder), "ephemeral-bind0")
    install(binder)
