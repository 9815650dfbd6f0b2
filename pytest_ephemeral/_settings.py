"""Settings: every raw value and where it came from, resolved once into a frozen ``Settings``.

Each setting has one name used everywhere: ``port_range`` is the command-line option
``--ephemeral-port-range``, the ini key ``ephemeral_port_range`` and the environment variable
``PYTEST_EPHEMERAL_PORT_RANGE``. Callers pass layers in precedence order (the plugin: command line,
environment, config file; the library API: arguments, environment); the first layer that has a
value wins.
"""

from __future__ import annotations

import getpass
import ipaddress
import math
import os
import re
import socket
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

from ._errors import ConfigError
from ._ranges import (
    PortRange,
    Spans,
    derive_auto,
    format_spans,
    parse_spans,
    read_system_ports,
    subtract,
)

NAMES = ("port_range", "exclude", "lock_dir", "host", "timeout")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_TIMEOUT = 10.0


class Raw(NamedTuple):
    """One setting's value as given, and where it was given (for error messages)."""

    value: object
    origin: str


Layer = Mapping[str, Raw]


class Settings(NamedTuple):
    """Everything a lease needs, resolved and checked."""

    ports: PortRange
    lock_dir: Path
    host: str
    timeout: float


#: While a pytest session is configured in this process, its layers (command line, environment,
#: config file), so ``lease_port()`` called during the session uses the session's settings.
_session_layers: tuple[Layer, ...] | None = None


def push_session_layers(layers: tuple[Layer, ...]) -> tuple[Layer, ...] | None:
    """Make ``layers`` the defaults of ``default_layers``; returns the ones to restore later."""
    global _session_layers
    outer, _session_layers = _session_layers, layers
    return outer


def pop_session_layers(outer: tuple[Layer, ...] | None) -> None:
    global _session_layers
    _session_layers = outer


def default_layers() -> tuple[Layer, ...]:
    """The settings code outside fixtures gets by default: the running pytest session's, or the
    ``PYTEST_EPHEMERAL_*`` environment variables."""
    return _session_layers or (env_layer(os.environ),)


def env_var(name: str) -> str:
    return f"PYTEST_EPHEMERAL_{name.upper()}"


def env_layer(environ: Mapping[str, str]) -> Layer:
    """The settings given by ``PYTEST_EPHEMERAL_*`` environment variables (empty ones are unset)."""
    return {
        name: Raw(environ[env_var(name)], f"environment variable {env_var(name)}")
        for name in NAMES
        if environ.get(env_var(name), "").strip()
    }


def resolve(*layers: Layer) -> Settings:
    """Pick each setting from the first layer that has it, check it, and derive the port range."""

    def pick(name: str) -> Raw | None:
        return next((layer[name] for layer in layers if name in layer), None)

    exclude_raw = pick("exclude")
    exclude = exclusions(exclude_raw)
    range_raw = pick("port_range")
    if range_raw is None or str(range_raw.value).strip().lower() == "auto":
        ports = derive_auto(read_system_ports(), exclude)
        before = "the auto range 49152-65535"
    else:
        spans = _parse(range_raw, _parse_low_high, "LOW-HIGH or auto")
        before = f"{format_spans(spans)} from {range_raw.origin}"
        origin = f"set by {range_raw.origin}"
        if exclude:
            origin += f", minus excluded {format_spans(exclude)}"
        ports = PortRange(subtract(spans, exclude), origin)
    if not ports.spans:
        excluded_by = (
            f"{format_spans(exclude)} from {exclude_raw.origin}" if exclude_raw else "none"
        )
        raise ConfigError(
            f"no port left to lease: {before} minus the exclusions ({excluded_by}) is empty"
        )
    return Settings(
        ports=ports,
        lock_dir=_lock_dir(pick("lock_dir")),
        host=_host(pick("host")),
        timeout=_timeout(pick("timeout")),
    )


def exclusions(raw: Raw | None) -> Spans:
    """The ports an ``exclude`` setting names (none when unset)."""
    return _parse(raw, parse_spans, "ports and LOW-HIGH ranges") if raw else ()


def _describe(raw: Raw) -> str:
    return f"{raw.value!r} from {raw.origin}"


def _parse(raw: Raw, parser: Callable[[str], Spans], expected: str) -> Spans:
    try:
        return parser(str(raw.value))
    except ValueError as error:
        raise ConfigError(f"bad value {_describe(raw)}: {error} (expected {expected})") from None


def _parse_low_high(text: str) -> Spans:
    if not re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", text):
        raise ValueError(f"{text!r} is not LOW-HIGH")
    return parse_spans(text)


def _timeout(raw: Raw | None) -> float:
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(raw.value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"bad value {_describe(raw)}: not a number of seconds") from None
    if seconds < 0 or not math.isfinite(seconds):
        raise ConfigError(f"bad value {_describe(raw)}: the timeout must be a finite number >= 0")
    return seconds


def _host(raw: Raw | None) -> str:
    if raw is None:
        return DEFAULT_HOST
    text = str(raw.value).strip().strip("[]")
    host = "127.0.0.1" if text.lower() == "localhost" else text
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"bad value {_describe(raw)}: not an IP address (use a numeric address or localhost)"
        ) from None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except OSError as error:
        raise ConfigError(
            f"bad value {_describe(raw)}: not a local address of this machine ({error.strerror})"
        ) from None
    return host


# --- The lock directory ---------------------------------------------------------------------


def default_lock_dir() -> Path:
    """``<temp dir>/pytest-ephemeral-of-<user>``, the temp dir taken the way pytest takes it."""
    root = Path(os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir()).resolve()
    try:
        user = getpass.getuser()
    except (ImportError, OSError, KeyError):
        user = "unknown"
    return root / f"pytest-ephemeral-of-{re.sub(r'[^A-Za-z0-9_.-]', '_', user)}"


def _lock_dir(raw: Raw | None) -> Path:
    """Create (mode 0o700) and vet the lock directory; refuse one another user could tamper with."""
    explicit = raw is not None
    if raw is None:
        path = default_lock_dir()
    elif isinstance(raw.value, (str, os.PathLike)):
        path = Path(os.path.abspath(os.fspath(raw.value)))
    else:
        raise ConfigError(f"bad value {_describe(raw)}: not a path")
    what = f"lock dir {str(path)!r}" + (f" from {raw.origin}" if raw else "")
    fix = "Fix this and try again, or choose another one with --ephemeral-lock-dir."
    try:
        path.mkdir(mode=0o700, parents=explicit, exist_ok=True)
    except FileExistsError:
        pass  # something that is not a directory: the checks below say what
    except OSError as error:
        raise ConfigError(f"cannot create {what}: {error.strerror or error}") from None
    # lstat, not stat: following a symlink planted by someone else is the attack refused here.
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(f"{what} is a symbolic link. {fix}")
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{what} is not a directory. {fix}")
    if hasattr(os, "getuid"):
        # Another user who owns the directory could swap our lock files under us.
        if info.st_uid != os.getuid():
            raise ConfigError(f"{what} is not owned by the current user. {fix}")
        # Our own default directory stays private; an explicit one may be shared on purpose.
        if not explicit and info.st_mode & 0o077:
            os.chmod(path, 0o700)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise ConfigError(f"cannot write to {what}: {error.strerror or error}") from None
    return path.resolve()  # one spelling per directory: runs and allocators compare it
