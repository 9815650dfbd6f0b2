"""Settings: every raw value and where it came from, resolved once into a frozen ``Settings``.

Each setting has one name used everywhere: ``port_range`` is the command-line option
``--ephemeral-port-range``, the ini key ``ephemeral_port_range`` and the environment variable
``PYTEST_EPHEMERAL_PORT_RANGE``. Callers pass layers in precedence order (the plugin: command line,
environment, config file; the library API: arguments, environment); the first layer that has a
value wins.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from typing import NamedTuple

from ._errors import ConfigError
from ._lockdir import default_lock_dir
from ._probe import FORBIDDEN_ERRNOS, try_bind
from ._ranges import (
    PortRange,
    Spans,
    derive_auto,
    format_spans,
    parse_spans,
    read_system_ports,
    subtract,
)

NAMES = ("port_range", "exclude", "lock_dir", "host", "timeout", "reuse_addr")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_TIMEOUT = 10.0


class Raw(NamedTuple):
    """One setting's value as given, and where it was given (for error messages)."""

    value: object
    origin: str


Layer = Mapping[str, Raw]


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


#: While a pytest session is configured in this process, its layers (command line, environment,
#: config file), so ``lease_port()`` called during the session uses the session's settings.
_session_layers: tuple[Layer, ...] | None = None
#: Changes whenever the session layers do, so caches of what they resolve to can tell.
_session_generation = 0


def push_session_layers(layers: tuple[Layer, ...]) -> tuple[Layer, ...] | None:
    """Make ``layers`` the defaults of ``lease_port()``; returns the ones to restore later."""
    global _session_layers, _session_generation
    outer, _session_layers = _session_layers, layers
    _session_generation += 1
    return outer


def pop_session_layers(outer: tuple[Layer, ...] | None) -> None:
    global _session_layers, _session_generation
    _session_layers = outer
    _session_generation += 1


def session_layers() -> tuple[tuple[Layer, ...] | None, int]:
    """The running pytest session's layers (None outside a session), and their generation."""
    return _session_layers, _session_generation


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
        if ports.spans:
            _check_bindable(ports, range_raw)
    if not ports.spans:
        excluded_by = (
            f"{format_spans(exclude)} from {exclude_raw.origin}" if exclude_raw else "none"
        )
        raise ConfigError(
            f"no port left to lease: {before} minus the exclusions ({excluded_by}) is empty"
        )
    lock_dir, given = _lock_dir(pick("lock_dir"))
    return Settings(
        ports=ports,
        lock_dir=lock_dir,
        host=_host(pick("host")),
        timeout=_timeout(pick("timeout")),
        lock_dir_given=given,
        reuse_addr=_bool(pick("reuse_addr")),
    )


def exclusions(raw: Raw | None) -> Spans:
    """The ports an ``exclude`` setting names (none when unset)."""
    return _parse(raw, parse_spans, "ports and LOW-HIGH ranges") if raw else ()


def _describe(raw: Raw) -> str:
    return f"{raw.value!r} from {raw.origin}"


def _parse(raw: Raw, parser: Callable[[str], Spans], expected: str) -> Spans:
    value = raw.value
    # A TOML list (native [tool.pytest] table): [61005, "62000-62099"]
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    try:
        return parser(text)
    except ValueError as error:
        raise ConfigError(f"bad value {_describe(raw)}: {error} (expected {expected})") from None


def _parse_low_high(text: str) -> Spans:
    if not re.fullmatch(r"\s*[0-9]+\s*-\s*[0-9]+\s*", text):
        raise ValueError(f"{text!r} is not LOW-HIGH")
    return parse_spans(text)


def _check_bindable(ports: PortRange, raw: Raw) -> None:
    """Refuse an explicit range this process may not bind at all (ports below 1024 for a non-root
    user, say): found now, it is one clear error instead of every lease failing."""
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


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _bool(raw: Raw | None) -> bool:
    if raw is None:
        return False
    if isinstance(raw.value, bool):  # a native TOML boolean
        return raw.value
    text = str(raw.value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(f"bad value {_describe(raw)}: not yes or no (or true/false, 1/0, on/off)")


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
    error = try_bind(family, (host, 0))
    if error is not None:
        raise ConfigError(
            f"bad value {_describe(raw)}: not a local address of this machine ({error.strerror})"
        ) from None
    return host


# --- The lock directory ---------------------------------------------------------------------


def _lock_dir(raw: Raw | None) -> tuple[str, bool]:
    """The lock dir as an absolute path, and whether it was given; nothing is created here (the
    allocator prepares it on the first lease, so a bad lock dir fails leases, not the run)."""
    if raw is None:
        return default_lock_dir(), False
    if not isinstance(raw.value, (str, os.PathLike)):
        raise ConfigError(f"bad value {_describe(raw)}: not a path")
    text = os.fspath(raw.value)
    if not str(text).strip():
        raise ConfigError(f"bad value {_describe(raw)}: empty (leave it out for the default)")
    return os.path.abspath(text), True
