"""Bind checks: is a port free, for every protocol a lease asks for?

A probe binds WITHOUT ``SO_REUSEADDR`` (``SO_EXCLUSIVEADDRUSE`` on Windows, where ``SO_REUSEADDR``
would steal a bound port), so a port in TIME_WAIT counts as busy. It binds a dual-stack ``[::]``
socket, which collides with any IPv4 or IPv6 holder, falling back to ``0.0.0.0`` where IPv6 is off,
and then, except on Linux, the configured host when it is not a wildcard (on BSD, macOS and
Windows a specific and a wildcard bind can coexist, so the wildcard alone would miss a holder of the
specific address; on Linux a wildcard bind without address reuse collides with every holder).

A bind refused for lack of privilege (``EACCES``, ``EPERM``: a port below 1024 for a non-root user,
a port the OS forbids) is told apart from a busy port: waiting will not make it free.
"""

from __future__ import annotations

import _socket
import errno
import functools
import socket
import sys
from typing import Literal

from ._errors import ConfigError

#: What a lease is bind-checked for, as every public signature spells it.
Protocol = Literal["tcp", "udp", "both"]
PROTOCOLS: dict[str, tuple[socket.SocketKind, ...]] = {
    "tcp": (socket.SOCK_STREAM,),
    "udp": (socket.SOCK_DGRAM,),
    "both": (socket.SOCK_STREAM, socket.SOCK_DGRAM),
}
WILDCARDS = ("0.0.0.0", "::")
_EXCLUSIVE = getattr(socket, "SO_EXCLUSIVEADDRUSE", None)
#: Bind errors that mean "not allowed", not "in use" (WinError 10013 is EACCES on Windows).
FORBIDDEN_ERRNOS = frozenset({errno.EACCES, errno.EPERM, 10013})
FREE, BUSY, FORBIDDEN = 0, 1, 2

#: Where a probe binds: ``(family, address)`` pairs, tried in order.
Targets = tuple[tuple[socket.AddressFamily, str], ...]


def socket_kinds(protocol: str) -> tuple[socket.SocketKind, ...]:
    try:
        return PROTOCOLS[protocol]
    except (KeyError, TypeError):  # TypeError: not even hashable (a list, say)
        raise ConfigError(f"protocol must be 'tcp', 'udp' or 'both', not {protocol!r}") from None


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


@functools.cache
def ipv6_available() -> bool:
    """Whether a dual-stack ``[::]`` socket can be bound (some machines boot with IPv6 off)."""
    try:
        sock = _socket.socket(socket.AF_INET6, socket.SOCK_STREAM)  # not caught by bind0
    except OSError:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
    except (OSError, AttributeError):
        return False
    finally:
        sock.close()
    return True


def try_bind(family: int, address: tuple[str, int]) -> OSError | None:
    """Bind a throwaway TCP socket to ``address`` (no address reuse): the error, or None if it
    bound. The C base's socket, as for probes: the bind0 adapter and the audit never see it."""
    sock = _socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind(address)
    except OSError as error:
        return error
    finally:
        sock.close()
    return None


@functools.cache
def bind_targets(host: str, platform: str = sys.platform) -> Targets:
    """The wildcard a probe binds (dual-stack if possible), then ``host`` unless a wildcard or on
    Linux."""
    wildcard = (socket.AF_INET6, "::") if ipv6_available() else (socket.AF_INET, "0.0.0.0")
    if host in WILDCARDS or platform.startswith("linux"):
        return (wildcard,)
    return (wildcard, (family_of(host), host))


def _configure(sock: _socket.socket, family: int, address: str, reuse: bool) -> None:
    """Set a new socket's options for binding ``address``; close it if that fails."""
    try:
        if family == socket.AF_INET6 and address == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        elif _EXCLUSIVE is not None:  # Windows: refuse to share the port with anyone
            sock.setsockopt(socket.SOL_SOCKET, _EXCLUSIVE, 1)
    except BaseException:
        sock.close()
        raise


def bound_socket(
    family: socket.AddressFamily, kind: socket.SocketKind, address: str, port: int
) -> socket.socket:
    """A socket bound to ``(address, port)`` without address reuse; ``OSError`` if it is taken."""
    sock = socket.socket(family, kind)
    _configure(sock, family, address, reuse=False)
    try:
        sock.bind((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _binds(family: int, kind: int, address: str, port: int, reuse: bool) -> int:
    """``FREE``, ``BUSY`` or ``FORBIDDEN``: one bind of a throwaway socket. A socket that cannot
    be created or configured (no descriptors left, say) raises ``OSError``: not a busy port.

    The socket is the C type under ``socket.socket``: a probe never hands it out, and skipping
    the Python wrapper's set-up and close saves about a tenth of a probe. (So a replaced
    ``socket.socket``, pytest-socket's or gevent's, does not see probes: they are the plugin's
    own business, like the lock files.)
    """
    sock = _socket.socket(family, kind)
    _configure(sock, family, address, reuse)
    try:
        sock.bind((address, port))
    except OSError as error:
        return FORBIDDEN if error.errno in FORBIDDEN_ERRNOS else BUSY
    finally:
        sock.close()
    return FREE


def probe(port: int, kinds: tuple[socket.SocketKind, ...], targets: Targets) -> int:
    """``FREE`` when every target binds for every kind; ``FORBIDDEN`` when a bind is refused for
    lack of privilege; ``BUSY`` for any other bind failure (TIME_WAIT too).

    Failing to create a socket at all (no file descriptors left, say) is not a busy port: that
    ``OSError`` propagates.
    """
    for kind in kinds:
        for family, address in targets:
            verdict = _binds(family, kind, address, port, reuse=False)
            if verdict != FREE:
                return verdict
    return FREE


def is_free(port: int, kinds: tuple[socket.SocketKind, ...], targets: Targets) -> bool:
    return probe(port, kinds, targets) == FREE


def binds_with_reuse(port: int, targets: Targets) -> bool:
    """Whether a TCP socket with ``SO_REUSEADDR`` binds ``port`` on every target: it does, on
    Linux, when every socket on the port is one that set ``SO_REUSEADDR`` and is not listening
    (the connections and TIME_WAIT left by a server that set it, as servers do)."""
    for family, address in targets:  # a loop, not all() over a generator: once per lease end
        if _binds(family, socket.SOCK_STREAM, address, port, reuse=True) != FREE:
            return False
    return True
