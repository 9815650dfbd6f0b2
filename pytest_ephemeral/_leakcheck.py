"""Is something still using a port when its lease ends? Socket states, not just a bind probe.

What counts as a leak is what a forgotten server leaves: a TCP listener, a TCP socket still
bound, or a bound UDP socket. Connections do not count: a stopped server's handler threads may
still be closing theirs, and a port they keep is simply skipped by the next lease.

A plain bind probe cannot tell a leak from a harmless TIME_WAIT (both make it fail), so on Linux a
TCP port is checked in up to three steps, each only when the one before is not conclusive:

1. A bind WITH ``SO_REUSEADDR`` succeeds when nothing is on the port, or when every socket left on
   it set that option and does not listen: the TIME_WAIT and connections of a server that set it,
   as servers do. Not a leak, and the common case, answered in microseconds without asking the
   kernel anything. (A socket bound with ``SO_REUSEADDR`` and not listening passes too: the one
   case not reported.)
2. Otherwise the kernel is asked over netlink ``sock_diag`` for listeners on that one port (it
   walks only its small table of listeners): one found is a leak.
3. Otherwise the kernel lists every socket on the port (this walks its whole table of
   connections, a quarter of a millisecond on a large machine): connections and TIME_WAIT only are
   not a leak; a socket bound but not listening is (Linux 6.x lists those; a failed bind with
   nothing listed counts as one on older kernels).

Where netlink is not allowed, ``/proc/net/tcp`` and ``tcp6`` are read instead. Elsewhere a plain
bind answers the common case (it binds: nothing uses the port), and the best available check after
a failed one is a TCP connect to the port on the leased host, which finds a listener still
accepting, not a socket bound but not listening nor a listener on another address. UDP has no
TIME_WAIT: a failed UDP bind always means a socket is still bound.

A server whose ``stop()`` returns before its thread has closed the listening socket closes it a few
milliseconds later: what is found is looked at again for a short, bounded grace before it is
called a leak.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
import time
from pathlib import Path

from ._probe import Targets, binds_with_reuse, is_free

_LISTEN, _CLOSE = 10, 7  # kernel TCP states: a listener; a socket bound but not connected
_PROC_NET = Path("/proc/net")
_LINUX = sys.platform.startswith("linux")
#: How long something found may take to go away before it is a leak: a few polls, ~60 ms in all.
GRACE = (0.002, 0.004, 0.008, 0.016, 0.03)

# netlink sock_diag (linux/sock_diag.h, linux/inet_diag.h)
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
_ALL_STATES, _LISTENERS = 0xFFFFFFFF, 1 << _LISTEN
_netlink_works = hasattr(socket, "AF_NETLINK")
#: Errors that mean netlink sock_diag is not available here at all (not a passing failure).
_NOT_ALLOWED = {
    errno.EPERM,
    errno.EACCES,
    errno.EAFNOSUPPORT,
    errno.EPROTONOSUPPORT,
    errno.ENOENT,
    errno.EOPNOTSUPP,
}


def _diag_request(family: int, port: int, states: int) -> bytes:
    """An ``inet_diag_req_v2`` for the TCP sockets of ``family`` in ``states`` on ``port``."""
    body = (
        struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 0, states)
        + struct.pack(">HH", port, 0)  # sport, dport (network order)
        + bytes(36)  # src, dst, interface
        + struct.pack("=II", 0xFFFFFFFF, 0xFFFFFFFF)  # no cookie
    )
    return _HEADER.pack(
        _HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, 1, 0
    ) + (body)


def _states_by_netlink(port: int, wanted: int) -> list[int]:
    """Kernel states of the TCP sockets (IPv4 and IPv6) in ``wanted`` whose local port is
    ``port``."""
    states = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as link:
        for family in (socket.AF_INET, socket.AF_INET6):
            link.sendto(_diag_request(family, port, wanted), (0, 0))
            done = False
            while not done:
                data = link.recv(65536)
                offset = 0
                while offset + _HEADER.size <= len(data):
                    length, kind = _HEADER.unpack_from(data, offset)[:2]
                    if length < _HEADER.size or offset + length > len(data):
                        raise OSError(errno.EPROTO, "malformed netlink message")
                    if kind == _NLMSG_DONE:
                        done = True
                        break
                    if kind == _NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, offset + _HEADER.size)[0]
                        raise OSError(code, "sock_diag refused the request")
                    if length < _HEADER.size + 6:  # too short for a state and a port
                        raise OSError(errno.EPROTO, "malformed netlink message")
                    state = data[offset + _HEADER.size + 1]
                    (local,) = struct.unpack_from(">H", data, offset + _HEADER.size + 4)
                    if local == port:  # bound-only sockets are dumped without the port filter
                        states.append(state)
                    offset += (length + 3) & ~3
    return states


def local_port_states(table: str, port: int) -> list[str]:
    """The state codes of the sockets bound to local ``port`` in one ``/proc/net`` table."""
    needle = f":{port:04X}"
    if needle + " " not in table:
        return []  # answered without splitting the table into lines
    states = []
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[1].endswith(needle):
            states.append(fields[3])
    return states


def _states_by_proc(port: int) -> list[int]:
    states: list[int] = []
    for name in ("tcp", "tcp6"):
        try:
            table = (_PROC_NET / name).read_text()
        except OSError:
            continue
        states.extend(int(code, 16) for code in local_port_states(table, port))
    return states


def tcp_states(port: int, wanted: int = _ALL_STATES) -> list[int] | None:
    """Kernel states of the TCP sockets on local ``port`` among the ``wanted`` states (a bit mask
    of kernel state numbers); None where the kernel cannot be asked (not Linux)."""
    global _netlink_works
    if not _LINUX:
        return None
    if _netlink_works:
        try:
            return _states_by_netlink(port, wanted)
        except OSError as error:
            if error.errno in _NOT_ALLOWED:  # a sandbox, say: the slow way from now on
                _netlink_works = False
    if not _PROC_NET.joinpath("tcp").exists():
        return None
    return [state for state in _states_by_proc(port) if wanted & (1 << state)]


def reusable(port: int, targets: Targets) -> bool:
    """Whether a server that sets ``SO_REUSEADDR`` can bind and listen on ``port`` though a plain
    bind fails: nothing listens there and every other socket on it set ``SO_REUSEADDR`` (the
    TIME_WAIT and connections such a server leaves). Linux only: elsewhere ``SO_REUSEADDR`` means
    other things (on Windows it would even steal a bound port), so never."""
    if not _LINUX:
        return False
    if not binds_with_reuse(port, targets):  # a listener, or a socket without SO_REUSEADDR
        return False
    # A bind with SO_REUSEADDR also passes a socket bound with it and about to listen (another
    # program's server between bind and listen): only connections and TIME_WAIT may be left.
    states = tcp_states(port)
    if not states:  # nothing listed though a plain bind fails: an older kernel's bound socket
        return False
    return _LISTEN not in states and _CLOSE not in states


def _tcp_use_on_linux(port: int, host: str, targets: Targets) -> str | None:
    if binds_with_reuse(port, targets):
        return None  # only what a server that set SO_REUSEADDR leaves: TIME_WAIT, connections
    listeners = tcp_states(port, _LISTENERS)
    if listeners is None:
        return _tcp_use_by_connecting(port, host)
    if listeners:
        return "listening (TCP)"
    states = tcp_states(port) or []
    if _CLOSE in states or not states:  # not listed at all: an older kernel's bound socket
        return "bound (TCP)"
    return None  # connections only (TIME_WAIT, a stopped server's handlers closing theirs)


def _tcp_use_by_connecting(port: int, host: str) -> str | None:
    address = "127.0.0.1" if host == "0.0.0.0" else "::1" if host == "::" else host
    try:
        # A listener on loopback answers in microseconds; Windows retries a refused SYN for about
        # a second, so the wait is cut short: no answer by then means no listener.
        with socket.create_connection((address, port), timeout=0.2):
            return "listening (TCP)"
    except OSError:
        return None


def _use_now(
    port: int, host: str, targets: Targets, kinds: tuple[socket.SocketKind, ...]
) -> str | None:
    if socket.SOCK_DGRAM in kinds and not is_free(port, (socket.SOCK_DGRAM,), targets):
        return "bound (UDP)"
    if socket.SOCK_STREAM not in kinds:
        return None
    if _LINUX:  # the bind with SO_REUSEADDR passes wherever a plain one would: no need for both
        return _tcp_use_on_linux(port, host, targets)
    if is_free(port, (socket.SOCK_STREAM,), targets):
        return None
    return _tcp_use_by_connecting(port, host)


def still_in_use(
    port: int,
    host: str,
    targets: Targets,
    kinds: tuple[socket.SocketKind, ...],
    grace: bool = True,
) -> str | None:
    """How ``port`` is still in use for the protocols ``kinds`` its lease was for ("listening
    (TCP)", "bound (UDP)", ...); None if free, only in TIME_WAIT or only in connections.
    ``targets`` are where the bind probe binds (see ``_probe.bind_targets``). With ``grace``, a
    port in use is looked at again for a moment (a server may be stopping); without it (a leak
    that is only counted), the first answer stands."""
    use = _use_now(port, host, targets, kinds)
    for pause in GRACE if use and grace else ():
        time.sleep(pause)  # a server already stopping closes its socket within milliseconds
        use = _use_now(port, host, targets, kinds)
        if use is None:
            break
    return use
