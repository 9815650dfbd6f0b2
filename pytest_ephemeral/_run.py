"""``pytest-ephemeral run``: lease ports, run any command with them, hold them until it exits.

The rule: the runner takes the leases, starts the command with the ports in its environment
(``EPHEMERAL_PORT``, ``EPHEMERAL_PORTS``, ``EPHEMERAL_PORT_1`` ...) and its arguments (``{port}``,
``{ports}``, ``{port1}`` ...), waits for it, gives the leases back and exits with its exit code. The
lock descriptors are close-on-exec, so only the runner holds the locks: when the runner dies (even
by ``kill -9``) the kernel drops them, and a command left running keeps its ports only by binding
them (the bind check then skips them).

Exit codes: the command's own; 128+N when it died of signal N; 2 for a usage error (before
anything runs); 75 (``EX_TEMPFAIL``) when no ports could be leased in time, so scripts can retry;
126 when the command cannot be executed and 127 when it is not found, as shells do; 71
(``EX_OSERR``) when the lock dir fails under us.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import NoReturn

from ._errors import EphemeralError, PortsExhausted
from ._settings import NAMES, Layer, Raw, env_layer, env_var

EX_USAGE = 2
EX_OSERR = 71
EX_TEMPFAIL = 75
EX_NOEXEC = 126
EX_NOTFOUND = 127

PROG = "pytest-ephemeral run"
#: ``{port}``, ``{ports}`` and ``{portN}``; ``{{port}}`` (doubled braces) is the literal text.
_PLACEHOLDER = re.compile(r"\{\{(ports|port\d*)\}\}|\{(ports|port\d*)\}")
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
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"needs at least 1, not {number}")
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
            "Each setting left out comes from its PYTEST_EPHEMERAL_* environment variable, then"
            " the default. Exit status: COMMAND's own (128+N if it died of signal N); 2 for a"
            " usage error; 75 when no ports could be leased in time (retry later); 126 or 127"
            " when COMMAND cannot be run or is not found."
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
    meanings = {
        "port_range": ("LOW-HIGH", "ports to lease from, or auto"),
        "exclude": ("PORTS", "ports and LOW-HIGH ranges never to lease, comma separated"),
        "lock_dir": ("DIR", "lock dir shared with the test runs"),
        "host": ("ADDRESS", "local address ports are also bind-checked on"),
        "timeout": ("SECONDS", "how long to wait while others hold every port"),
        "reuse_addr": ("yes|no", "the command's servers set SO_REUSEADDR: TIME_WAIT ports may do"),
    }
    for name in NAMES:
        metavar, meaning = meanings[name]
        parser.add_argument(
            _option(name), dest=name, metavar=metavar, help=f"{meaning} (${env_var(name)})"
        )
    parser.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


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


def layers(
    args: argparse.Namespace, environ: Mapping[str, str], config: Sequence[Layer] = ()
) -> tuple[Layer, ...]:
    """The settings' layers in precedence order: options, environment, then ``config`` (the
    place for a config file's layer once the CLI reads one), then the defaults."""
    given: Layer = {
        name: Raw(value, f"option {_option(name)}")
        for name in NAMES
        if (value := getattr(args, name)) is not None
    }
    return (given, env_layer(environ), *config)


def expand(command: Sequence[str], ports: Sequence[int]) -> list[str]:
    """``command`` with ``{port}``, ``{ports}`` and ``{portN}`` replaced; ``{{port}}`` gives the
    literal ``{port}``. Other braces (``{}``, ``{{.Name}}``, ``${HOME}``) are left alone."""
    values = {"port": str(ports[0]), "ports": ",".join(map(str, ports))}
    values.update((f"port{index}", str(port)) for index, port in enumerate(ports, 1))

    def replace(argument: str, match: re.Match[str]) -> str:
        if match[1]:
            return "{" + match[1] + "}"
        if match[2] not in values:
            known = "{port}, {ports}, " + (
                "{port1}" if len(ports) == 1 else f"{{port1}} ... {{port{len(ports)}}}"
            )
            raise UsageError(
                f"no port for {match[0]} in {shlex.quote(argument)}: with"
                f" {len(ports)} port{'s' * (len(ports) != 1)} the placeholders are {known}"
            )
        return values[match[2]]

    return [
        _PLACEHOLDER.sub(functools.partial(replace, argument), argument) for argument in command
    ]


def environment(environ: Mapping[str, str], ports: Sequence[int]) -> dict[str, str]:
    """The command's environment: ours, with the ports added."""
    env = {key: value for key, value in environ.items() if not _NUMBERED.fullmatch(key)}
    env["EPHEMERAL_PORT"] = str(ports[0])
    env["EPHEMERAL_PORTS"] = ",".join(map(str, ports))
    env.update((f"EPHEMERAL_PORT_{index}", str(port)) for index, port in enumerate(ports, 1))
    return env


def _exhausted(error: PortsExhausted) -> str:
    """What the core found, with advice in run's own terms."""
    error.advice = (
        f"Widen the range (--port-range or ${env_var('port_range')}), lease fewer ports,"
        f" wait longer (--timeout or ${env_var('timeout')}), or see who holds them with"
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
) -> int:
    """Run ``command`` (already expanded) to its end, forwarding SIGINT and SIGTERM to it."""
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
            child = subprocess.Popen(command, env=environment(environ, ports))
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


def main(argv: Sequence[str], *, config: Sequence[Layer] = ()) -> int:
    """``pytest-ephemeral run ARGV``; ``config`` holds the config file's layer(s), if any."""
    from ._allocator import allocator_for  # imports filelock: only once it is needed
    from ._settings import resolve

    args, command = parse(argv)
    n = args.block or args.ports or 1
    try:
        expand(command, range(1, n + 1))  # check the placeholders before anything is leased
        settings = resolve(*layers(args, os.environ, config))
        if n > len(settings.ports):
            raise UsageError(f"cannot lease {n} ports: {settings.ports} has {settings.ports.size}")
        allocator = allocator_for(settings.lock_dir, settings.lock_dir_given)
    except (UsageError, ValueError) as error:  # ConfigError is a ValueError
        return _usage_error(error)
    label = _label(command)
    ports: list[int] = []
    try:
        try:
            if args.block:
                ports = allocator.lease_block(n, settings, args.protocol, label)
            else:
                for _ in range(n):
                    ports.append(allocator.lease(settings, args.protocol, label))
        except PortsExhausted as error:
            print(_exhausted(error), file=sys.stderr)
            return EX_TEMPFAIL
        except ValueError as error:  # a block longer than the range's longest run, say
            return _usage_error(error)
        except EphemeralError as error:  # the lock dir, or out of descriptors
            error.advice = f"Choose another lock dir with --lock-dir or ${env_var('lock_dir')}."
            print(f"{PROG}: {error}", file=sys.stderr)
            return EX_OSERR
        except OSError as error:
            print(f"{PROG}: cannot lease in {settings.lock_dir}: {error}", file=sys.stderr)
            return EX_OSERR
        except KeyboardInterrupt:
            return 128 + signal.SIGINT
        return run(expand(command, ports), ports=ports, environ=os.environ)
    finally:
        for port in ports:
            allocator.release(port)


def _usage_error(error: Exception) -> int:
    # The core's messages name pytest's options; run's have the same names, unprefixed.
    message = str(error).replace("--ephemeral-", "--")
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EX_USAGE
