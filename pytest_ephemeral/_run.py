"""``pytest-ephemeral run``: lease ports, run any command with them, hold them until it exits.

The rule: the runner takes the leases, starts the command with the ports in its environment
(``EPHEMERAL_PORT``, ``EPHEMERAL_PORTS``, ``EPHEMERAL_PORT_1`` ...) and its arguments (``{port}``,
``{ports}``, ``{port1}`` ...), waits for it, gives the leases back and exits with its exit code. The
lock descriptors are close-on-exec, so only the runner holds the locks: when the runner dies (even
by ``kill -9``) the kernel drops them, and a command left running keeps its ports only by binding
them (the bind check then skips them).

With ``--listen`` (POSIX only) the runner also binds each leased port on the configured host,
listens, and passes the sockets to the command at descriptors 3, 4, ... with systemd's
socket-activation variables (``LISTEN_FDS``, ``LISTEN_PID``, ``LISTEN_FDNAMES``) and ``{fd}``,
``{fd1}`` ... in its arguments: the port is never unbound between the lease and the server.

Exit codes: the command's own; 128+N when it died of signal N; 2 for a usage error (before
anything runs); 75 (``EX_TEMPFAIL``) when no ports could be leased in time, so scripts can retry;
126 when the command cannot be executed and 127 when it is not found, as shells do; 71
(``EX_OSERR``) when the lock dir fails under us.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

from ._errors import EphemeralError, PortsExhausted
from ._project import add_options, options_layer, project_layers
from ._settings import LEASE_NAMES, ROWS, Layer
from ._sources import load

EX_USAGE = 2
EX_OSERR = 71
EX_TEMPFAIL = 75
EX_NOEXEC = 126
EX_NOTFOUND = 127

PROG = "pytest-ephemeral run"
#: ``{port}``, ``{ports}`` and ``{portN}``; ``{{port}}`` (doubled braces) is the literal text.
_PLACEHOLDER = re.compile(r"\{\{(ports|port\d*)\}\}|\{(ports|port\d*)\}")
#: With ``--listen``, ``{fd}`` and ``{fdN}`` too (without it they are plain text, as before).
_LISTEN_PLACEHOLDER = re.compile(r"\{\{(ports|port\d*|fd\d*)\}\}|\{(ports|port\d*|fd\d*)\}")
#: The most ports one ``run`` can ask for: every port there is. Checked as N is parsed, before
#: anything is built from it.
_MAX_COUNT = 65535
#: Socket activation: the first descriptor passed (systemd's ``SD_LISTEN_FDS_START``).
LISTEN_FDS_START = 3
#: Leases tried for ``--listen`` when the port is taken between the bind check and its bind.
_LISTEN_ATTEMPTS = 3
#: Inherited ``EPHEMERAL_PORT_N`` variables (from an enclosing ``run``) are dropped, not passed on.
_NUMBERED = re.compile(r"EPHEMERAL_PORT_\d+")
_FORWARDED = (signal.SIGINT, signal.SIGTERM)
_LABEL_MAX = 500


class UsageError(Exception):
    """Bad arguments for ``run``: one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line (argparse would print the usage first), so scripts can show it as is."""
        self.exit(EX_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(text: str) -> int:
    """N of ``--ports N`` / ``--block N``, at most 65535 (so nothing is ever built N long before
    N is checked against the range)."""
    digits = text.strip()
    if digits.isdecimal() and len(digits.lstrip("0")) > len(str(_MAX_COUNT)):
        # Before int(): a long enough text of digits is refused by int() (Python 3.11+) as if
        # it were not a number at all, and quoting it would make the one-line error huge.
        shown = digits if len(digits) <= 20 else digits[:20] + "..."
        raise argparse.ArgumentTypeError(f"needs at most {_MAX_COUNT}, not {shown}")
    try:
        number = int(text)
    except ValueError:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise argparse.ArgumentTypeError(f"{shown!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"needs at least 1, not {number}")
    if number > _MAX_COUNT:
        raise argparse.ArgumentTypeError(f"needs at most {_MAX_COUNT}, not {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        usage=f"{PROG} [options] -- COMMAND [ARG ...]",
        description=(
            "Lease ports from the pool pytest-ephemeral's tests share, run COMMAND with them and"
            " hold them until it exits. COMMAND gets EPHEMERAL_PORT (the first port),"
            " EPHEMERAL_PORTS (all, comma separated) and EPHEMERAL_PORT_1 ... EPHEMERAL_PORT_N in"
            " its environment; {port}, {ports} and {port1} ... {portN} in its arguments are"
            " replaced by them ({{port}} stands for the literal text {port})."
        ),
        epilog=(
            "Each setting left out is what a pytest run started here would use: the"
            " --ephemeral-* and -o ephemeral_* options in the project's addopts and in"
            " PYTEST_ADDOPTS, then its PYTEST_EPHEMERAL_* environment variable, then the config"
            " file pytest would find from the current directory, then the default. Exit status:"
            " COMMAND's own (128+N if it died of signal N); 2 for a usage error (nothing is leased"
            " or run); 71 when the lock dir cannot be used, or with --listen a socket cannot be"
            " made; 75 when no ports could be leased in time, or with --listen a leased port"
            " could not be bound (retry later); 126 when COMMAND cannot be run; 127 when it is"
            " not found."
        ),
    )
    count = parser.add_mutually_exclusive_group()
    count.add_argument(
        "--ports", type=_count, metavar="N", help="lease N ports, anywhere in the range (default 1)"
    )
    count.add_argument("--block", type=_count, metavar="N", help="lease N consecutive ports")
    parser.add_argument(
        "--protocol",
        choices=("tcp", "udp", "both"),
        default="tcp",
        help="protocol(s) each port is bind-checked for (default tcp)",
    )
    parser.add_argument(
        "--listen",
        action="store_true",
        help=(
            "pass each port to COMMAND as a TCP socket bound to the host and listening, at"
            " descriptors 3, 4, ... ({fd}, {fd1} ... in its arguments), with LISTEN_FDS,"
            " LISTEN_PID and LISTEN_FDNAMES set as systemd's socket activation does (POSIX only)"
        ),
    )
    add_options(parser, LEASE_NAMES)
    parser.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The options and the command. Everything after the first ``--`` is the command; without
    ``--``, the command starts at the first argument that is not an option."""
    argv = list(argv)
    parser = build_parser()
    if "--" in argv:
        split = argv.index("--")
        args = parser.parse_args(argv[:split])
        if args.command:
            parser.error(f"unexpected {shlex.join(args.command)!r} before --")
        command = argv[split + 1 :]
    else:
        args = parser.parse_args(argv)
        command = list(args.command)
    if not command:
        parser.error("no command given: pytest-ephemeral run [options] -- COMMAND [ARG ...]")
    return args, command


def layers(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[Layer, ...]:
    """The settings' layers in precedence order: options, the project's ``addopts`` and
    ``PYTEST_ADDOPTS``, the environment, the project's config file (found from the current
    directory as pytest finds it), as for every caller (``_project.project_layers``)."""
    _, found = project_layers(options_layer(args, LEASE_NAMES), Path.cwd(), None, environ)
    # Only what a lease takes: adopt and audit are settings of a pytest session.
    return tuple({k: v for k, v in layer.items() if k in LEASE_NAMES} for layer in found)


def expand(command: Sequence[str], ports: Sequence[int], *, listen: bool = False) -> list[str]:
    """``command`` with ``{port}``, ``{ports}`` and ``{portN}`` replaced, and with ``listen``
    ``{fd}`` and ``{fdN}`` too (the descriptor each port's socket is passed at); ``{{port}}``
    gives the literal ``{port}``. Other braces (``{}``, ``{{.Name}}``, ``${HOME}``) are left alone.

    Nothing is built ``len(ports)`` long: each placeholder is looked up by its number.
    """
    pattern = _LISTEN_PLACEHOLDER if listen else _PLACEHOLDER

    def value(name: str) -> str | None:
        if name == "ports":
            return ",".join(map(str, ports))
        kind, number = ("fd", name[2:]) if name.startswith("fd") else ("port", name[4:])
        index = int(number or 1)  # \d* of a placeholder: a number or nothing
        if number.startswith("0") or index > len(ports):
            return None
        return str(LISTEN_FDS_START + index - 1 if kind == "fd" else ports[index - 1])

    def replace(argument: str, match: re.Match[str]) -> str:
        if match[1]:
            return "{" + match[1] + "}"
        found = value(match[2])
        if found is None:
            raise UsageError(
                f"no port for {match[0]} in {shlex.quote(argument)}: with"
                f" {len(ports)} port{'s' * (len(ports) != 1)} the placeholders are"
                f" {_known(len(ports), listen)}"
            )
        return found

    return [pattern.sub(functools.partial(replace, argument), argument) for argument in command]


def _known(n: int, listen: bool) -> str:
    """The placeholders there are for ``n`` ports, for an error message."""
    known = ["{port}", "{ports}"]
    for name in ("port", "fd") if listen else ("port",):
        if name == "fd":
            known.append("{fd}")
        known.append(f"{{{name}1}}" if n == 1 else f"{{{name}1}} ... {{{name}{n}}}")
    return ", ".join(known)


def environment(
    environ: Mapping[str, str], ports: Sequence[int], *, listen: bool = False
) -> dict[str, str]:
    """The command's environment: ours, with the ports added; with ``listen``, the socket
    activation variables as well, but for ``LISTEN_PID``, which only the child can know."""
    env = {key: value for key, value in environ.items() if not _NUMBERED.fullmatch(key)}
    env["EPHEMERAL_PORT"] = str(ports[0])
    env["EPHEMERAL_PORTS"] = ",".join(map(str, ports))
    env.update((f"EPHEMERAL_PORT_{index}", str(port)) for index, port in enumerate(ports, 1))
    if listen:
        env.pop("LISTEN_PID", None)  # an enclosing activation's: set again in the child
        env["LISTEN_FDS"] = str(len(ports))
        env["LISTEN_FDNAMES"] = ":".join(map(str, ports))
    return env


def _exhausted(error: PortsExhausted) -> str:
    """What the core found, with advice in run's own terms."""
    error.advice = (
        f"Widen the range (--port-range or ${ROWS['port_range'].env}), lease fewer ports,"
        f" wait longer (--timeout or ${ROWS['timeout'].env}), or see who holds them with"
        " `pytest-ephemeral status`. Exit status 75: try again later."
    )
    return f"{PROG}: {error}"


def _label(command: Sequence[str]) -> str:
    """The holder record's "test": the command line, on one line (a ``sh -c`` script would break
    ``status``'s table), cut to a length a table and a record can hold."""
    text = " ".join(shlex.join(command).split())
    return text if len(text) <= _LABEL_MAX else text[: _LABEL_MAX - 3] + "..."


def _terminal_sent_it_too(child: subprocess.Popen[bytes]) -> bool:
    """Whether a SIGINT we got reached ``child`` without us: Ctrl-C at a terminal signals the whole
    foreground process group, and the child is in ours. Forwarding it would make it a second
    Ctrl-C, which many programs (docker compose among them) take as "stop now, no cleanup"."""
    if os.name == "nt":
        return True  # a console's Ctrl-C reaches every process attached to it
    try:
        if os.getpgid(child.pid) != os.getpgrp():
            return False
        tty = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False  # no controlling terminal: the signal came from kill(), so pass it on
    try:
        return os.tcgetpgrp(tty) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(tty)


def run(
    command: Sequence[str],
    *,
    ports: Sequence[int],
    environ: Mapping[str, str],
    sockets: Sequence[socket.socket] = (),
) -> int:
    """Run ``command`` (already expanded) to its end, forwarding SIGINT and SIGTERM to it; with
    ``sockets`` (one listening socket per port), pass them to it for socket activation."""
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if child is None:
            pending.append(signum)
        elif not (signum == signal.SIGINT and _terminal_sent_it_too(child)):
            child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in _FORWARDED}
    try:
        if pending:  # a signal came while the leases were taken: do not start the command
            return 128 + pending[0]
        try:
            env = environment(environ, ports, listen=bool(sockets))
            child = _start(command, env, sockets) if sockets else subprocess.Popen(command, env=env)
        except FileNotFoundError:
            print(f"{PROG}: {command[0]}: command not found", file=sys.stderr)
            return EX_NOTFOUND
        except OSError as error:
            print(f"{PROG}: {command[0]}: cannot run it: {error.strerror}", file=sys.stderr)
            return EX_NOEXEC
        for signum in pending:  # came during the start: the command gets them now
            forward(signum, None)
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - code if code < 0 else code


def _listening(host: str, ports: Sequence[int]) -> list[socket.socket]:
    """A TCP socket per port, bound to ``(host, port)`` and listening; ``OSError`` (the ones made
    so far closed) when one cannot be, e.g. a program that ignores the locks took the port.

    ``SO_REUSEADDR`` is set, as servers that bind for themselves set it: on POSIX it lets the
    bind succeed while an earlier server's connections linger in TIME_WAIT (a port that
    ``--reuse-addr yes`` may lease), never beside another listener.
    """
    from ._probe import family_of

    sockets: list[socket.socket] = []
    try:
        for port in ports:
            sock = socket.socket(family_of(host), socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if host == "::":  # the wildcard: IPv4 clients too, as for a probe
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
            sock.listen()
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _start(
    command: Sequence[str], env: Mapping[str, str], sockets: Sequence[socket.socket]
) -> subprocess.Popen[bytes]:
    """Start ``command`` with ``sockets`` at descriptors 3, 4, ... and ``LISTEN_PID`` its own pid.

    Both need the child: the pid exists only after the fork, and a descriptor number is the
    child's own. So a step in the child, between the fork and the exec, moves the sockets into
    place and sets ``LISTEN_PID``. Popen builds an ``env`` it is given before the fork, so the
    child's environment is set in that step too (Popen is given none and the child's is used).

    Two things must not be overwritten there. The sockets themselves: copies of them are made
    above 3+N-1 first, so moving one into place never lands on another. Popen's error pipe,
    through which the child reports a failed exec ("command not found"): Popen opens it at the
    lowest free descriptors, so every free one of 3 .. 3+N-1 is held (on /dev/null) until Popen
    has returned, and the pipe lands elsewhere.
    """
    import fcntl

    n = len(sockets)
    above = LISTEN_FDS_START + n
    copies = [fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, above) for sock in sockets]
    held: list[int] = []
    try:
        while (fd := os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)) < above:
            held.append(fd)
        os.close(fd)

        def in_the_child() -> None:
            for target, copy in enumerate(copies, LISTEN_FDS_START):
                os.dup2(copy, target)  # inheritable: the command gets it
            os.environ.clear()
            os.environ.update(env)
            os.environ["LISTEN_PID"] = str(os.getpid())

        keep = range(LISTEN_FDS_START, above)
        return subprocess.Popen(command, env=None, pass_fds=keep, preexec_fn=in_the_child)
    finally:  # the child has its own copies now (Popen returns once the command is executed)
        for fd in held + copies:
            os.close(fd)
        for sock in sockets:
            sock.close()


def main(argv: Sequence[str]) -> int:
    """``pytest-ephemeral run ARGV``."""
    from ._allocator import allocator_for, request_for  # imports filelock: only once needed

    args, command = parse(argv)
    n = args.block or args.ports or 1
    try:
        if args.listen:
            _check_listen(args.protocol)
        settings = load(*layers(args, os.environ))
        if n > len(settings.ports):
            raise UsageError(f"cannot lease {n} ports: {settings.ports} has {settings.ports.size}")
        # The placeholders are checked before anything is leased.
        expand(command, range(1, n + 1), listen=args.listen)
        allocator = allocator_for(settings.lock_dir, settings.lock_dir_given)
    except (UsageError, ValueError) as error:  # ConfigError is a ValueError
        return _usage_error(error)
    request = request_for(settings, args.protocol, label=_label(command))
    ports: list[int] = []
    sockets: list[socket.socket] = []
    try:
        try:
            for attempt in range(1, _LISTEN_ATTEMPTS + 1):
                if args.block:
                    ports = allocator.lease(request, n)
                else:
                    for _ in range(n):
                        ports += allocator.lease(request)
                if not args.listen:
                    break
                try:
                    sockets = _listening(settings.host, ports)
                    break
                except OSError as error:
                    # Taken since the bind check, by a program that ignores the locks: lease
                    # others (the check now sees this one busy).
                    if error.errno != errno.EADDRINUSE or attempt == _LISTEN_ATTEMPTS:
                        print(f"{PROG}: cannot listen on {settings.host}: {error}", file=sys.stderr)
                        return EX_TEMPFAIL if error.errno == errno.EADDRINUSE else EX_OSERR
                    for port in ports:
                        allocator.release(port)
                    ports = []
        except PortsExhausted as error:
            print(_exhausted(error), file=sys.stderr)
            return EX_TEMPFAIL
        except ValueError as error:  # a block longer than the range's longest run, say
            return _usage_error(error)
        except EphemeralError as error:  # the lock dir, or out of descriptors
            error.advice = f"Choose another lock dir with --lock-dir or ${ROWS['lock_dir'].env}."
            print(f"{PROG}: {error}", file=sys.stderr)
            return EX_OSERR
        except OSError as error:
            print(f"{PROG}: cannot lease in {settings.lock_dir}: {error}", file=sys.stderr)
            return EX_OSERR
        except KeyboardInterrupt:
            return 128 + signal.SIGINT
        expanded = expand(command, ports, listen=args.listen)
        return run(expanded, ports=ports, environ=os.environ, sockets=sockets)
    finally:
        for sock in sockets:  # closed already once the command started; not if it did not
            sock.close()
        for port in ports:
            allocator.release(port)


def _check_listen(protocol: str, os_name: str = os.name) -> None:
    """``--listen`` passes TCP sockets by POSIX descriptor numbers."""
    if os_name != "posix":
        raise UsageError("--listen needs a POSIX system: it passes sockets by descriptor number")
    if protocol == "udp":
        raise UsageError("--listen passes TCP sockets: use --protocol tcp or both with it")


def _usage_error(error: Exception) -> int:
    # The message names run's own option, or the --ephemeral-* one in addopts it came from.
    print(f"{PROG}: error: {error}", file=sys.stderr)
    return EX_USAGE
