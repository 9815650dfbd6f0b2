"""``pytest-ephemeral status`` and ``pytest-ephemeral range``: who holds ports, and which ports.

Same defaults and environment variables as the plugin, so with no arguments ``status`` reads the
lock dir the user's tests use.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._errors import ConfigError
from ._lockdir import default_lock_dir
from ._ranges import IANA_DYNAMIC, derive_auto, format_spans, read_system_ports
from ._settings import Layer, env_layer, env_var, exclusions

_LOCK_FILE = re.compile(r"(\d+)\.lock")


def live_leases(lock_dir: Path) -> list[dict[str, Any]]:
    """The holder records of every lease held right now in ``lock_dir``, by port."""
    from ._lockfile import RECORD_KEYS, Unusable, read_live_record  # imports filelock

    try:
        names = os.listdir(lock_dir)
    except FileNotFoundError:
        return []
    ports = sorted(int(m[1]) for name in names if (m := _LOCK_FILE.fullmatch(name)))
    records = []
    for port in ports:
        try:
            record = read_live_record(str(lock_dir), port)
        except Unusable as unusable:
            record = {
                **dict.fromkeys(RECORD_KEYS),
                "port": port,
                "problem": f"unusable lock file: {unusable}",
            }
        if record is not None:
            records.append(record)
    return records


def _status(lock_dir: Path, as_json: bool) -> None:
    leases = live_leases(lock_dir)
    for lease in leases:
        if "unreadable" in lease.get("problem", ""):
            print(
                f"pytest-ephemeral: warning: port {lease['port']}: {lease['problem']}",
                file=sys.stderr,
            )
    if as_json:
        print(json.dumps(leases, indent=2))
        return
    now = time.time()
    rows = [("PORT", "PID", "HOST", "WORKER", "AGE", "TEST")]
    for lease in leases:
        since = lease["since"]
        age = f"{now - since:.1f} s" if isinstance(since, (int, float)) else "?"
        rows.append(
            (
                str(lease["port"]),
                str(lease["pid"] or "?"),
                str(lease["host"] or "?"),
                str(lease["worker"] or "-"),
                age,
                str(lease["nodeid"] or lease.get("problem") or "-"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print(
            "  ".join(
                [*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]
            )
        )
    print(f"{len(leases)} live lease{'s' * (len(leases) != 1)} in {lock_dir}")


def _range(env: Layer, as_json: bool) -> None:
    system = read_system_ports()
    exclude = exclusions(env.get("exclude"))
    ports = derive_auto(system, exclude)
    figures = {
        "range": format_spans(ports.spans),
        "size": len(ports),
        "dynamic": format_spans(IANA_DYNAMIC),
        "auto_assign": None if system.auto_assign is None else format_spans(system.auto_assign),
        "source": system.source,
        "reserved": format_spans(system.reserved),
        "os_excluded": format_spans(system.excluded),
        "excluded": format_spans(exclude),
        "caveat": ports.caveat,
        "origin": ports.origin,
    }
    if as_json:
        print(json.dumps(figures, indent=2))
        return
    print(f"auto range: {ports} ({ports.size})")
    print(f"  dynamic range (IANA):      {figures['dynamic']}")
    print(f"  OS auto-assign range:      {figures['auto_assign'] or 'unknown'} ({system.source})")
    print(f"  reserved (never assigned): {figures['reserved']}")
    print(f"  excluded by the OS:        {figures['os_excluded']}")
    print(f"  excluded ({env_var('exclude')}): {figures['excluded']}")
    if ports.caveat:
        print(f"  note: {ports.caveat}")
    port_range = env.get("port_range")
    if port_range and str(port_range.value).strip().lower() != "auto":
        print(f"  note: {env_var('port_range')} is set, so runs with this environment use it")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pytest-ephemeral", description="Leased network ports for tests: who holds what."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = commands.add_parser(
        "status",
        help="list the live leases",
        description="List the leases held right now: port, pid, host, worker, age, test.",
    )
    status.add_argument(
        "--lock-dir",
        type=Path,
        help=f"lock dir to read (default: ${env_var('lock_dir')}, else {default_lock_dir()})",
    )
    status.add_argument("--json", action="store_true", help="print a JSON list, one object each")
    ranges = commands.add_parser(
        "range",
        help="show the auto range and how it was derived",
        description="Show the auto port range on this machine and how it was derived.",
    )
    ranges.add_argument("--json", action="store_true", help="print a JSON object")
    # `run` parses its own arguments (pytest_ephemeral/_run.py): listed here for --help only.
    commands.add_parser("run", help="lease ports and run a command with them", add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        from ._run import main as run

        return run(argv[1:])
    args = parser.parse_args(argv)
    env = env_layer(os.environ)  # the plugin's environment variables, read the plugin's way
    try:
        if args.command == "status":
            env_dir = env.get("lock_dir")
            lock_dir = args.lock_dir or Path(str(env_dir.value) if env_dir else default_lock_dir())
            _status(lock_dir, args.json)
        else:
            _range(env, args.json)
    except (ConfigError, OSError) as error:
        parser.exit(2, f"pytest-ephemeral: error: {error}\n")
    return 0
