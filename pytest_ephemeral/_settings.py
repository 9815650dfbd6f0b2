"""The table of settings, and ``resolve``: the one place precedence is applied.

Each setting is one row of ``TABLE``: name, metavar, help, parser, default. Every spelling comes
from the row's name: ``port_range`` is the pytest option ``--ephemeral-port-range``, the ini key
``ephemeral_port_range``, the environment variable ``PYTEST_EPHEMERAL_PORT_RANGE``, the
``lease_port()`` keyword ``port_range`` and the ``run``/``range`` option ``--port-range``.

The rule: ``resolve(layers, system)`` takes each setting from the first layer that has it, parses
it with its row's parser and derives the port range; it is pure (no file, socket or OS access), so
the caller reads the sources (``_sources.py``) and the OS's range data (``read_system_ports``) and
runs ``verify`` (the bind checks) itself. A layer holds no blank value from a config file, an
environment variable or ``-o`` (``_sources`` leaves them out: blank means the default); a blank
value left in a layer was given to a dedicated option or keyword, and is refused.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from ._errors import ConfigError
from ._ranges import PortRange, Spans, SystemPorts, derive_auto, format_spans, parse_spans, subtract

DEFAULT_HOST = "127.0.0.1"
DEFAULT_TIMEOUT = 10.0
#: Adapter names (setting ``adopt``), in header order, and the top-level module whose presence
#: means "installed" (None: part of this package, always there).
ADAPTERS: Mapping[str, str | None] = {
    "pytest-asyncio": "pytest_asyncio",
    "anyio": "anyio",
    "portpicker": "portpicker",
    "port-for": "port_for",
    "aiohttp": "aiohttp",
    "bind0": None,
}

#: Below this size a tmpfs ``/dev/shm`` is not used for the default lock dir: Docker gives
#: containers 64 MiB by default, and every lock file with a record in it takes a page there.
_MIN_SHM_BYTES = 256 * 2**20


def default_lock_dir(platform: str = sys.platform) -> str:
    """The default lock dir: one directory per OS user per machine, whatever the environment says
    (``TMPDIR``, ``USER`` and ``LOGNAME`` differ between processes of one user; ports are
    machine-wide). On Linux ``/dev/shm/pytest-ephemeral-<uid>`` (tmpfs: creating a lock file there
    costs a third of what it costs on a disk), or ``/tmp/pytest-ephemeral-<uid>`` where
    ``/dev/shm`` is missing or small; on Windows ``%LOCALAPPDATA%\\pytest-ephemeral\\locks``.

    Only the path: ``_lockdir`` creates the directory and proves it safe, on the first lease.
    """
    if platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(
            os.path.expanduser("~"), "AppData", "Local"
        )
        return os.path.join(base, "pytest-ephemeral", "locks")
    name = f"pytest-ephemeral-{os.geteuid()}"
    if platform.startswith("linux") and _roomy_tmpfs("/dev/shm"):
        return f"/dev/shm/{name}"
    return f"/tmp/{name}"


def _roomy_tmpfs(path: str) -> bool:
    try:
        info = os.statvfs(path)
    except OSError:
        return False
    return os.path.isdir(path) and info.f_blocks * info.f_frsize >= _MIN_SHM_BYTES


class Raw(NamedTuple):
    """One setting's value as given, and where it was given (for error messages)."""

    value: object
    origin: str


Layer = Mapping[str, Raw]


def _describe(raw: Raw) -> str:
    return f"{raw.value!r} from {raw.origin}"


def _text(raw: Raw) -> str:
    # A TOML list (native [tool.pytest] table): [61005, "62000-62099"]
    value = raw.value
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _spans(raw: Raw, parser: Callable[[str], Spans], expected: str) -> Spans:
    try:
        return parser(_text(raw))
    except ValueError as error:
        raise ConfigError(f"bad value {_describe(raw)}: {error} (expected {expected})") from None


def _low_high(text: str) -> Spans:
    if not re.fullmatch(r"\s*[0-9]+\s*-\s*[0-9]+\s*", text):
        raise ValueError(f"{text!r} is not LOW-HIGH")
    return parse_spans(text)


def parse_port_range(raw: Raw) -> Spans | None:
    """The spans a ``port_range`` value names; None for ``auto``."""
    if _text(raw).strip().lower() == "auto":
        return None
    return _spans(raw, _low_high, "LOW-HIGH or auto")


def parse_exclude(raw: Raw) -> Spans:
    return _spans(raw, parse_spans, "ports and LOW-HIGH ranges")


def parse_lock_dir(raw: Raw) -> str:
    """An absolute path, ``~`` expanded; nothing is created here (the allocator prepares the
    directory on the first lease, so a bad lock dir fails leases, not the run)."""
    if not isinstance(raw.value, (str, os.PathLike)):
        raise ConfigError(f"bad value {_describe(raw)}: not a path")
    return os.path.abspath(os.path.expanduser(os.fspath(raw.value)))


def parse_host(raw: Raw) -> str:
    """A numeric address (``localhost`` is 127.0.0.1); ``verify`` checks it is this machine's."""
    text = str(raw.value).strip().strip("[]")
    host = DEFAULT_HOST if text.lower() == "localhost" else text
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"bad value {_describe(raw)}: not an IP address (use a numeric address or localhost)"
        ) from None
    return host


def parse_timeout(raw: Raw) -> float:
    if isinstance(raw.value, bool):  # a native TOML boolean is not a number, whatever Python says
        raise ConfigError(f"bad value {_describe(raw)}: not a number of seconds")
    try:
        seconds = float(raw.value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"bad value {_describe(raw)}: not a number of seconds") from None
    if seconds < 0 or not math.isfinite(seconds):
        raise ConfigError(f"bad value {_describe(raw)}: the timeout must be a finite number >= 0")
    return seconds


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def parse_yes_no(raw: Raw) -> bool:
    if isinstance(raw.value, bool):  # a native TOML boolean
        return raw.value
    text = str(raw.value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(f"bad value {_describe(raw)}: not yes or no (or true/false, 1/0, on/off)")


def parse_adopt(raw: Raw) -> frozenset[str]:
    """The adapter names an ``adopt`` value asks for: a comma list, ``all`` or ``none``."""
    names = {part.strip().lower() for part in _text(raw).split(",")} - {""}
    if names == {"all"}:
        return frozenset(ADAPTERS)
    if names == {"none"}:
        return frozenset()
    unknown = sorted(names - set(ADAPTERS))
    if unknown or "all" in names or "none" in names:
        bad = ", ".join(unknown) or "all/none mixed with names"
        raise ConfigError(
            f"bad value {_describe(raw)}: unknown adapter {bad}"
            f" (expected a comma list of {', '.join(ADAPTERS)}, or all or none)"
        )
    return frozenset(names)


class Setting(NamedTuple):
    """One row of the table. (A named tuple, not a dataclass: building a dataclass at import
    would cost every pytest run more than the rest of this module.)"""

    name: str
    metavar: str
    #: Starts with a capital; one phrase, no final period.
    help: str
    parse: Callable[[Raw], object]
    #: The default as the docs and ``--help`` show it.
    default: str
    #: A setting of the pytest session only (not a ``lease_port()`` keyword or ``run`` option).
    session_only: bool = False

    @property
    def option(self) -> str:
        return "--ephemeral-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return f"ephemeral_{self.name}"

    @property
    def env(self) -> str:
        return f"PYTEST_EPHEMERAL_{self.name.upper()}"

    @property
    def cli_option(self) -> str:
        """The option of ``run``, ``status`` and ``range``."""
        return "--" + self.name.replace("_", "-")

    def option_help(self) -> str:
        """``--help`` text of the pytest option (and, without the variable, of the ini key)."""
        return f"{self.help} (default: {self.default}; environment variable {self.env})"


TABLE: tuple[Setting, ...] = (
    Setting(
        "port_range",
        "LOW-HIGH|auto",
        "Ports to lease from: LOW-HIGH, or auto (the part of 49152-65535 the OS never"
        " auto-assigns)",
        parse_port_range,
        "auto",
    ),
    Setting(
        "exclude",
        "SPEC",
        "Ports never to lease: a comma list of ports and LOW-HIGH ranges",
        parse_exclude,
        "none",
    ),
    Setting(
        "lock_dir",
        "PATH",
        "Directory of the per-port lock files shared by all runs that must not clash",
        parse_lock_dir,
        "/dev/shm/pytest-ephemeral-<uid> (or /tmp/...)",
    ),
    Setting(
        "host",
        "ADDRESS",
        "Local address leased ports are bind-checked on, and free_socket binds to",
        parse_host,
        DEFAULT_HOST,
    ),
    Setting(
        "timeout",
        "SECONDS",
        "Seconds to wait for a port while other runs hold them all",
        parse_timeout,
        f"{DEFAULT_TIMEOUT:g}",
    ),
    Setting(
        "reuse_addr",
        "yes|no",
        "Whether the servers under test set SO_REUSEADDR: if yes, a port left only in TIME_WAIT"
        " by such a server may be leased (Linux)",
        parse_yes_no,
        "no",
    ),
    Setting(
        "adopt",
        "NAMES",
        "Port helpers to back with leases: a comma list of " + ", ".join(ADAPTERS) + ", or all"
        " or none",
        parse_adopt,
        "all",
        session_only=True,
    ),
    Setting(
        "audit",
        "yes|no",
        "Whether to warn of ports the tests bind that no lease covers",
        parse_yes_no,
        "no",
        session_only=True,
    ),
)
ROWS: Mapping[str, Setting] = {row.name: row for row in TABLE}
#: Every setting's name, in table order.
NAMES = tuple(ROWS)
#: The settings ``lease_port()``, ``lease_block()`` and ``run`` take.
LEASE_NAMES = tuple(row.name for row in TABLE if not row.session_only)


class Settings(NamedTuple):
    """Everything a lease needs, resolved and checked; reading them does no file-system work."""

    ports: PortRange
    #: Absolute, not yet created or checked: that happens on the first lease.
    lock_dir: str
    host: str
    timeout: float
    #: Whether the lock dir was given (kept as it is) or is the default (kept private).
    lock_dir_given: bool = False
    #: The servers under test set SO_REUSEADDR: a port left only in TIME_WAIT (or connections) by
    #: such a server is free for them, so it may be leased (Linux; elsewhere no effect).
    reuse_addr: bool = False
    #: The adapters asked for (installed or not).
    adopt: frozenset[str] = frozenset(ADAPTERS)
    #: Warn of ports bound in tests that no lease covers.
    audit: bool = False
    #: The excluded ports (already taken out of ``ports``).
    exclude: Spans = ()
    #: Each setting that was given, as given (value and origin); the others are defaults.
    given: Mapping[str, Raw] = {}
    #: What the OS said about its ports, from which the auto range is derived.
    system: SystemPorts = SystemPorts(None, "not read")

    def origin(self, name: str) -> str:
        """Where the setting ``name`` came from: a ``Raw.origin``, or "default"."""
        raw = self.given.get(name)
        return raw.origin if raw is not None else "default"

    def auto(self) -> PortRange:
        """The auto range (minus the exclusions), whether or not it is the range leased from."""
        if "port_range" not in self.given or parse_port_range(self.given["port_range"]) is None:
            return self.ports
        return derive_auto(self.system, self.exclude)

    def show(self, name: str) -> object:
        """The value of setting ``name`` as the header and ``range`` show it."""
        values: dict[str, object] = {
            "port_range": str(self.ports),
            "exclude": format_spans(self.exclude) or "none",
            "adopt": ",".join(sorted(self.adopt)) or "none",
        }
        if name in values:
            return values[name]
        value = getattr(self, name)
        return ("yes" if value else "no") if isinstance(value, bool) else value


def resolve(layers: Sequence[Layer], system: SystemPorts) -> Settings:
    """Pick each setting from the first of ``layers`` that has it, parse it, derive the range.

    Pure: ``system`` is the OS's range data, read by the caller; ``verify`` makes the checks that
    need sockets.
    """
    given: dict[str, Raw] = {}
    for name in NAMES:
        raw = next((layer[name] for layer in layers if name in layer), None)
        if raw is None:
            continue
        if isinstance(raw.value, str) and not raw.value.strip():
            raise ConfigError(f"bad value {_describe(raw)}: empty (leave it out for the default)")
        given[name] = raw
    values = {name: ROWS[name].parse(raw) for name, raw in given.items()}
    exclude: Spans = values.get("exclude", ())  # type: ignore[assignment]
    spans: Spans | None = values.get("port_range")  # type: ignore[assignment]
    if spans is None:
        ports = derive_auto(system, exclude)
        before = "the auto range 49152-65535"
    else:
        before = f"{format_spans(spans)} from {given['port_range'].origin}"
        origin = f"set by {given['port_range'].origin}"
        if exclude:
            origin += f", minus excluded {format_spans(exclude)}"
        ports = PortRange(subtract(spans, exclude), origin)
    if not ports.spans:
        excluded_by = (
            f"{format_spans(exclude)} from {given['exclude'].origin}" if exclude else "none"
        )
        raise ConfigError(
            f"no port left to lease: {before} minus the exclusions ({excluded_by}) is empty"
        )
    return Settings(
        ports=ports,
        lock_dir=values.get("lock_dir") or default_lock_dir(),  # type: ignore[arg-type]
        host=values.get("host", DEFAULT_HOST),  # type: ignore[arg-type]
        timeout=values.get("timeout", DEFAULT_TIMEOUT),  # type: ignore[arg-type]
        lock_dir_given="lock_dir" in values,
        reuse_addr=values.get("reuse_addr", False),  # type: ignore[arg-type]
        adopt=values.get("adopt", frozenset(ADAPTERS)),  # type: ignore[arg-type]
        audit=values.get("audit", False),  # type: ignore[arg-type]
        exclude=exclude,
        given=given,
        system=system,
    )


def verify(settings: Settings) -> None:
    """The checks that need sockets: the host is an address of this machine, and an explicit
    range is one this process may bind at all (ports below 1024 for a non-root user, say): found
    now, each is one clear error instead of every lease failing."""
    raw = settings.given.get("host")
    if raw is not None:
        from ._probe import try_bind  # only when a host is given: most runs bind nothing here

        address = ipaddress.ip_address(settings.host)
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        error = try_bind(family, (settings.host, 0))
        if error is not None:
            raise ConfigError(
                f"bad value {_describe(raw)}: not a local address of this machine"
                f" ({error.strerror})"
            )
    raw = settings.given.get("port_range")
    if raw is not None and parse_port_range(raw) is not None:
        _check_bindable(settings.ports, raw)


def _check_bindable(ports: PortRange, raw: Raw) -> None:
    from ._probe import FORBIDDEN_ERRNOS, try_bind  # only for a range given: see verify()

    numbers = ports.ports
    samples = sorted({numbers[0], numbers[len(numbers) // 2], numbers[-1]})
    causes = []
    for port in samples:
        error = try_bind(socket.AF_INET, ("0.0.0.0", port))
        if error is None or error.errno not in FORBIDDEN_ERRNOS:
            return  # bound, in use, or some other trouble: not a question of privilege
        causes.append(error.strerror or errno.errorcode.get(error.errno or 0, "refused"))
    hint = " (ports below 1024 need root)" if numbers[-1] < 1024 else ""
    raise ConfigError(
        f"bad value {_describe(raw)}: this process may not bind ports in it: {causes[0]}{hint}"
    )


def markdown_table() -> str:
    """The configuration table of the docs: option | ini key | environment variable | default |
    meaning, one row a setting."""
    lines = [
        "| option | ini key | environment variable | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in TABLE:
        cells = (
            f"`{row.option}={row.metavar}`",
            f"`{row.ini}`",
            f"`{row.env}`",
            f"`{row.default}`",
        )
        meaning = row.help.replace("|", "\\|")
        lines.append("| " + " | ".join((*(c.replace("|", "\\|") for c in cells), meaning)) + " |")
    return "\n".join(lines) + "\n"
