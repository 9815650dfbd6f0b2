"""``pytest-ephemeral status``, ``range`` and ``run``: who holds ports, which ports, and leases for
any program (``run`` lives in ``_run.py``).

Both use what a pytest run started here would: the same config file (found the way pytest finds
it, or named by ``-c``), the same environment variables and the same precedence, resolved and
checked by the same code. A bad value is a usage error (exit 2) naming it and where it came from.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ._errors import ConfigError, EphemeralError, LockDirError
from ._holder import printable
from ._lockdir import explain
from ._portmap import Row, axis_low, draw
from ._project import add_options, options_layer, project_layers
from ._ranges import IANA_DYNAMIC, format_spans, normalize
from ._settings import LEASE_NAMES, NAMES, Settings
from ._sources import load

_LOCK_FILE = re.compile(r"(\d+)\.lock")


class LockDirScan(NamedTuple):
    """What a lock dir holds right now."""

    #: The holder record of every live lease, by port (a record may say it is unreadable).
    leases: list[dict[str, Any]]
    #: Each lock path that holds something other than our own regular file (a FIFO, a symlink,
    #: ...), and what: never a lease, whoever put it there.
    unusable: dict[int, str]


def scan_lock_dir(lock_dir: Path) -> LockDirScan:
    """The live leases and the unusable lock paths of ``lock_dir`` (none if it does not exist).
    Raises ``LockDirError`` when it cannot be read."""
    from ._lockfile import Unusable, read_live_record  # imports filelock

    leases, unusable = [], {}
    try:
        names = os.listdir(lock_dir)
        for port in sorted(int(m[1]) for name in names if (m := _LOCK_FILE.fullmatch(name))):
            try:
                record = read_live_record(str(lock_dir), port)
            except Unusable as what:
                unusable[port] = str(what)
                continue
            if record is not None:
                leases.append(record)
    except FileNotFoundError:
        pass
    except OSError as error:  # not a directory, no permission, out of descriptors, ...
        raise LockDirError(str(lock_dir), f"cannot be read: {explain(error)}") from None
    return LockDirScan(leases, unusable)


def live_leases(lock_dir: Path) -> list[dict[str, Any]]:
    """The holder records of every lease held right now in ``lock_dir``, by port."""
    return scan_lock_dir(lock_dir).leases


class _Project:
    """The settings a pytest run here would use, and the config file they were read from."""

    def __init__(self, args: argparse.Namespace) -> None:
        start = Path(os.path.abspath(os.path.expandvars(args.rootdir or os.curdir)))
        if not start.is_dir():
            raise ConfigError(f"directory {start} not found (--rootdir)")
        first = options_layer(args, NAMES)
        self.config_file, layers = project_layers(first, start, args.config_file, os.environ)
        self.settings: Settings = load(*layers)


def _status(project: _Project, as_json: bool) -> int:
    lock_dir = Path(project.settings.lock_dir)
    origin = project.settings.origin("lock_dir")
    if not os.path.lexists(lock_dir):
        print(
            f"pytest-ephemeral: lock dir {lock_dir} (from {origin}) does not exist:"
            " no pytest run has leased a port with it",
            file=sys.stderr,
        )
        return 1
    leases, unusable = scan_lock_dir(lock_dir)
    for lease in leases:
        if "unreadable" in (lease.get("problem") or ""):
            _warn(f"port {lease['port']}: {lease['problem']}")
    odd = [
        f"port {port}: unusable lock file: {what} (not a lease; remove it)"
        for port, what in unusable.items()
    ]
    if as_json:  # the list is of leases: what is no lease is said apart
        for line in odd:
            _warn(line)
        print(json.dumps(leases, indent=2))
        return 0
    now = time.time()
    rows: list[tuple[str, ...]] = [("PORT", "PID", "HOST", "WORKER", "AGE", "TEST")]
    for lease in leases:
        since = lease["since"]
        age = f"{now - since:.1f} s" if isinstance(since, (int, float)) else "?"
        cells = (
            lease["port"],
            lease["pid"] or "?",
            lease["host"] or "?",
            lease["worker"] or "-",
            age,
            lease["nodeid"] or lease.get("problem") or "-",
        )
        rows.append(tuple(printable(str(cell)) for cell in cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print(
            "  ".join(
                [*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]
            )
        )
    for line in odd:
        print(line)
    count = f"{len(leases)} live lease{'s' * (len(leases) != 1)}"
    print(f"{count} in {lock_dir} (lock dir from {origin})")
    return 0


def _warn(text: str) -> None:
    print(f"pytest-ephemeral: warning: {text}", file=sys.stderr)


def _listing(settings: Settings) -> dict[str, dict[str, Any]]:
    """Each setting as a run here would use it, and where that came from."""
    return {name: {"value": settings.show(name), "origin": settings.origin(name)} for name in NAMES}


def _range(project: _Project, as_json: bool) -> int:
    settings = project.settings
    system = settings.system
    exclude = settings.exclude
    auto = settings.auto()
    leases = live_leases(Path(settings.lock_dir))
    leased = [lease["port"] for lease in leases]
    sources = _listing(settings)
    figures = {
        "range": format_spans(auto.spans),
        "size": len(auto),
        "dynamic": format_spans(IANA_DYNAMIC),
        "auto_assign": None if system.auto_assign is None else format_spans(system.auto_assign),
        "source": system.source,
        "reserved": format_spans(system.reserved),
        "os_excluded": format_spans(system.excluded),
        "excluded": format_spans(exclude),
        "caveat": auto.caveat,
        "origin": auto.origin,
        "config_file": None if project.config_file is None else str(project.config_file),
        "sources": sources,
        "leased": leased,
    }
    if as_json:
        print(json.dumps(figures, indent=2))
        return 0
    ports = settings.ports
    print(f"ports a pytest run here leases: {ports} ({ports.size}; {ports.origin})")
    print(f"config file: {project.config_file or 'none'}")
    print()
    red, yellow, cyan, magenta = "\033[31m", "\033[33m", "\033[36m", "\033[35m"
    rows = [
        Row("IANA dynamic", IANA_DYNAMIC, format_spans(IANA_DYNAMIC), cyan),
        Row(
            "OS auto-assign",
            system.auto_assign or (),
            f"{figures['auto_assign'] or 'unknown'} ({system.source})",
            yellow,
        ),
        Row("reserved", system.reserved, f"{figures['reserved']} (never auto-assigned)", cyan),
        Row("excluded by OS", system.excluded, str(figures["os_excluded"]), red),
        Row("excluded", exclude, f"{figures['excluded']} ({settings.origin('exclude')})", red),
        Row("auto range", auto.spans, f"{auto} ({auto.size})"),
    ]
    if settings.origin("port_range") != "default" and ports.spans != auto.spans:
        rows.append(Row("port range", ports.spans, f"{ports} ({settings.origin('port_range')})"))
    leased_spans = normalize((port, port) for port in leased)
    leased_text = f"{len(leased)} port{'s' * (len(leased) != 1)}"
    if leased:
        leased_text += f": {format_spans(leased_spans)}"
    rows.append(Row("leased now", leased_spans, f"{leased_text} (in {settings.lock_dir})", magenta))
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR") and _can_encode_blocks()
    low = axis_low(*(row.spans for row in rows))
    for line in draw(rows, low, colour):
        print(line)
    print()
    print("settings a pytest run here would use:")
    width = max(len(str(source["value"])) for source in sources.values())
    for name, source in sources.items():
        print(f"  {name:<10}  {source['value']!s:<{width}}  {source['origin']}")
    if auto.caveat:
        print(f"note: the auto range falls back to the whole dynamic range: {auto.caveat}")
    return 0


def _can_encode_blocks() -> bool:
    try:
        "\N{FULL BLOCK}\N{MIDDLE DOT}".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


class _Version(argparse.Action):
    """``--version``: the version is read (from the installed metadata, about 50 ms) only when
    asked for, not on every run of the command."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        from . import __version__

        print(f"{parser.prog} {__version__}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pytest-ephemeral",
        description="Leased network ports for tests: who holds which port (status), which ports"
        " a pytest run here would lease (range), and leases for any other program (run).",
    )
    parser.add_argument("--version", action=_Version, help="print the installed version and exit")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "-c",
        "--config-file",
        metavar="FILE",
        type=Path,
        help="read settings from FILE, as pytest -c does (default: the file pytest would find)",
    )
    where.add_argument(
        "--rootdir",
        metavar="DIR",
        help="look for the config file from DIR up, as a pytest run started in DIR would"
        " (default: the current directory)",
    )
    where.add_argument("--json", action="store_true", help="print JSON")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = commands.add_parser(
        "status",
        parents=[where],
        help="list the live leases",
        description="List the leases held right now in the lock dir a pytest run here would"
        " use: port, pid, host, worker, age, test. --json prints a list, one object each.",
    )
    add_options(status, ["lock_dir"])
    range_ = commands.add_parser(
        "range",
        parents=[where],
        help="show the ports a pytest run here would lease, and why",
        description="Show the port space, the ports a pytest run here would lease, the ports"
        " leased right now, and where each setting came from.",
    )
    add_options(range_, LEASE_NAMES)
    # `run` parses its own arguments (pytest_ephemeral/_run.py): listed here for --help only.
    commands.add_parser(
        "run",
        help="lease ports and run a command with them",
        add_help=False,
        usage="pytest-ephemeral run [options] -- COMMAND [ARG ...]",
        description="Lease ports, run COMMAND with them and hold them until it exits. Its"
        " options (--ports, --block, --protocol, --listen and one per lease setting) and exit"
        " codes: pytest-ephemeral run --help.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        from ._run import main as run

        return run(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if sys.stdout is None:  # started with it closed (``>&-``): a listing nobody can read
        print("pytest-ephemeral: error: standard output is closed", file=sys.stderr)
        return 1
    if isinstance(sys.stdout, io.TextIOWrapper):  # a holder's label the encoding cannot show
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        try:
            project = _Project(args)
            command = _status if args.command == "status" else _range
            code = command(project, args.json)
        except ConfigError as error:
            parser.exit(2, f"pytest-ephemeral: error: {error}\n")
        except EphemeralError as error:  # the lock dir cannot be read
            parser.exit(1, f"pytest-ephemeral: error: {error}\n")
        sys.stdout.flush()  # here, so that a failed write is seen while it can still be handled
    except OSError as error:  # writing the output failed: every other error is one of ours
        # Point stdout at devnull, so that the flush at interpreter exit does not fail again and
        # print a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if not isinstance(error, BrokenPipeError):  # a reader gone away (``| head``) is no error
            print(f"pytest-ephemeral: error: cannot write the output: {error}", file=sys.stderr)
        return 1
    return code
