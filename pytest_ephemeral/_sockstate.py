"""Is something still using a port when its lease ends? Socket states, not just a bind probe.

What counts as a leak is what a forgotten server leaves: a TCP listener, a TCP socket still
bound, or a bound UDP socket. Connections do not count: a stopped server's handler threads may
still be closing theirs, and a port they keep is simply skipped by the next lease.

A bind probe cannot tell a leak from a harmless TIME_WAIT (both make a bind fail), so it only
answers the common case cheaply (about 15 us): the port binds, nothing uses it. When a TCP bind
fails, Linux's ``/proc/net/tcp`` and ``tcp6`` (a millisecond or two to read) show a listener or
only connections; a socket that is bound but not listening is in neither table, so a failed bind
with nothing listed means a bound socket. Elsewhere the best available check is a TCP connect to
the port on the leased host, which finds a listener still accepting. UDP has no TIME_WAIT: a
failed UDP bind always means a socket is still bound."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from ._probe import Targets, is_free

_LISTEN = "0A"  # the /proc/net/tcp state code of a listening socket
_PROC_NET = Path("/proc/net")


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


def _read(name: str) -> str:
    try:
        return (_PROC_NET / name).read_text()
    except OSError:
        return ""


def _tcp_use_linux(port: int) -> str | None:
    states = local_port_states(_read("tcp"), port) + local_port_states(_read("tcp6"), port)
    if _LISTEN in states:
        return "listening (TCP)"
    return None if states else "bound (TCP)"  # bound sockets that do not listen are not listed


def _tcp_use_by_connecting(port: int, host: str) -> str | None:
    address = "127.0.0.1" if host == "0.0.0.0" else "::1" if host == "::" else host
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return "listening (TCP)"
    except OSError:
        return None


def still_in_use(
    port: int, host: str, targets: Targets, kinds: tuple[socket.SocketKind, ...]
) -> str | None:
    """How ``port`` is still in use for the protocols ``kinds`` its lease was for ("listening
    (TCP)", "bound (UDP)", ...); None if free or only in TIME_WAIT. ``targets`` are where the bind
    probe binds (see ``_probe.bind_targets``)."""
    if socket.SOCK_DGRAM in kinds and not is_free(port, (socket.SOCK_DGRAM,), targets):
        return "bound (UDP)"
    if socket.SOCK_STREAM not in kinds or is_free(port, (socket.SOCK_STREAM,), targets):
        return None
    if sys.platform.startswith("linux") and _PROC_NET.joinpath("tcp").exists():
        return _tcp_use_linux(port)
    return _tcp_use_by_connecting(port, host)
