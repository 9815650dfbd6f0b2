"""Port ranges: parsing, set arithmetic, and what each operating system auto-assigns.

A range is a tuple of sorted, disjoint, inclusive ``(low, high)`` spans. ``auto`` is IANA's dynamic
range minus the ports the operating system hands to outgoing connections and ``bind(0)``, so that a
leased port cannot be taken behind our back by the kernel.
"""

from __future__ import annotations

import os
import re
import sys
from array import array
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

Spans = tuple[tuple[int, int], ...]

IANA_DYNAMIC: Spans = ((49152, 65535),)
#: Below this many ports, ``auto`` falls back to the whole dynamic range (see ``derive_auto``).
MIN_AUTO_PORTS = 100

_LINUX_PROC = Path("/proc/sys/net/ipv4")


def normalize(spans: Iterable[tuple[int, int]]) -> Spans:
    """Sort spans and merge the ones that overlap or touch."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(spans):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
        else:
            merged.append((low, high))
    return tuple(merged)


def subtract(spans: Spans, removed: Spans) -> Spans:
    """The ports of ``spans`` that are not in ``removed``."""
    result: list[tuple[int, int]] = []
    cuts = normalize(removed)
    for low, high in spans:
        for cut_low, cut_high in cuts:
            if cut_high < low or cut_low > high:
                continue
            if cut_low > low:
                result.append((low, cut_low - 1))
            low = cut_high + 1
            if low > high:
                break
        if low <= high:
            result.append((low, high))
    return normalize(result)


def intersect(spans: Spans, other: Spans) -> Spans:
    """The ports in both ``spans`` and ``other``."""
    return normalize(
        (max(a, c), min(b, d)) for a, b in spans for c, d in other if max(a, c) <= min(b, d)
    )


def count(spans: Spans) -> int:
    return sum(high - low + 1 for low, high in spans)


def format_spans(spans: Spans) -> str:
    """``61000-65535`` or ``50000,50002-50010``; ``none`` when empty."""
    if not spans:
        return "none"
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in spans)


def parse_spans(text: str) -> Spans:
    """Parse a comma list of ports and ``LOW-HIGH`` ranges; ``ValueError`` says what is wrong."""
    spans = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        match = re.fullmatch(r"([0-9]+)(?:\s*-\s*([0-9]+))?", item)  # ASCII digits only
        if match is None:
            raise ValueError(f"{item!r} is not a port or a LOW-HIGH range")
        low = int(match[1])
        high = int(match[2] or low)
        for port in (low, high):
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is outside 1-65535")
        if low > high:
            raise ValueError(f"{item!r} has LOW greater than HIGH")
        spans.append((low, high))
    return normalize(spans)


class PortRange:
    """The ports leases are taken from, and a sentence saying how they were chosen.

    An immutable value, compared and hashed by ``spans``, ``origin`` and ``caveat``. Written out
    rather than made a dataclass: building one at import costs more than this module's other code
    (every pytest run with the plugin pays it at start-up).
    """

    __slots__ = ("_longest", "_ports", "caveat", "origin", "spans")
    spans: Spans
    origin: str
    #: Set when ``auto`` had to fall back to ports the OS may also hand to outgoing connections.
    caveat: str | None
    _ports: array[int]
    _longest: int

    def __init__(self, spans: Spans, origin: str, caveat: str | None = None) -> None:
        ports = array("H")
        for low, high in spans:
            ports.extend(range(low, high + 1))
        longest = max((high - low + 1 for low, high in spans), default=0)
        put = object.__setattr__  # the class refuses assignment: it is immutable
        put(self, "spans", spans)
        put(self, "origin", origin)
        put(self, "caveat", caveat)
        put(self, "_ports", ports)
        put(self, "_longest", longest)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def _key(self) -> tuple[Spans, str, str | None]:
        return self.spans, self.origin, self.caveat

    def __reduce__(self) -> tuple[type[PortRange], tuple[Spans, str, str | None]]:
        return PortRange, self._key()  # pickle and copy build it anew: assignment is refused

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PortRange):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"PortRange(spans={self.spans!r}, origin={self.origin!r}, caveat={self.caveat!r})"

    @property
    def ports(self) -> array[int]:
        """Every port of the range in ascending order (two bytes each)."""
        return self._ports

    def __len__(self) -> int:
        return len(self._ports)

    def __str__(self) -> str:
        return format_spans(self.spans)

    @property
    def size(self) -> str:
        """``"4536 ports"``, or ``"1 port"``: for messages."""
        return f"{len(self)} port{'s' * (len(self) != 1)}"

    def longest_run(self) -> int:
        """The most consecutive ports the range holds, the largest block that can be leased."""
        return self._longest


class SystemPorts(NamedTuple):
    """What the operating system says about its ports."""

    #: Ports the OS hands out by itself (outgoing connections, ``bind(0)``); ``None`` if unknown.
    auto_assign: Spans | None
    #: Where ``auto_assign`` was read, for messages.
    source: str
    #: Linux ``ip_local_reserved_ports``: inside the auto-assign range but never auto-assigned.
    reserved: Spans = ()
    #: Windows' excluded port ranges (Hyper-V, WinNAT): binding there fails.
    excluded: Spans = ()


def derive_auto(system: SystemPorts, exclude: Spans) -> PortRange:
    """IANA's dynamic range minus what the OS auto-assigns (bar reserved ports) and exclusions."""
    removed = normalize(exclude + system.excluded)
    if system.auto_assign is None:
        safe: Spans = IANA_DYNAMIC
        how = f"auto: 49152-65535, the OS auto-assign range unknown ({system.source})"
    else:
        never_assigned = subtract(IANA_DYNAMIC, system.auto_assign)
        safe = normalize(never_assigned + intersect(system.reserved, IANA_DYNAMIC))
        how = (
            f"auto: 49152-65535 minus OS auto-assign {format_spans(system.auto_assign)}"
            f" ({system.source})"
        )
        if intersect(system.reserved, IANA_DYNAMIC):
            how += f" plus reserved {format_spans(intersect(system.reserved, IANA_DYNAMIC))}"
    if removed:
        how += f", minus excluded {format_spans(removed)}"
    spans = subtract(safe, removed)
    if count(spans) >= MIN_AUTO_PORTS and system.auto_assign is not None:
        return PortRange(spans, how)
    fallback = subtract(IANA_DYNAMIC, removed)
    caveat = "the OS may also hand these ports to outgoing connections"
    if system.auto_assign is not None:
        how += f"; fewer than {MIN_AUTO_PORTS} left, so all of 49152-65535"
    return PortRange(fallback, how, caveat)


# --- What each operating system says ---------------------------------------------------------

Runner = Callable[[Sequence[str]], str]


def _run(command: Sequence[str]) -> str:
    """Output of a short system command; empty when it fails (the caller then knows nothing)."""
    import subprocess  # only where a command is run (not on Linux): it costs start-up time

    try:
        # errors="replace": localised netsh writes the OEM code page; only the digits matter.
        done = subprocess.run(
            command, capture_output=True, text=True, errors="replace", timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def parse_sysctl_ranges(output: str) -> Spans | None:
    """``sysctl -n FIRST LAST [FIRST LAST ...]``: one number a line, taken in pairs.

    ``None`` unless every pair was printed and every number is a port.
    """
    numbers = [int(n) for n in re.findall(r"\d+", output)]
    if not numbers or len(numbers) % 2 or not all(1 <= n <= 65535 for n in numbers):
        return None
    pairs = zip(numbers[::2], numbers[1::2], strict=True)
    return normalize((min(pair), max(pair)) for pair in pairs)  # first > last: counts down


def parse_netsh_dynamic(output: str) -> Spans | None:
    """``netsh int ipv4 show dynamicport tcp`` (ipv6, udp alike): a start port and a count.

    The labels are translated on non-English Windows, so only the numbers are relied on.
    """
    numbers = [int(n) for n in re.findall(r":[ \t]*(\d+)", output)]
    if len(numbers) < 2 or numbers[1] < 1:
        return None
    start, size = numbers[0], numbers[1]
    return ((start, min(start + size - 1, 65535)),)


def parse_netsh_excluded(output: str) -> Spans:
    """``netsh int ipv4 show excludedportrange protocol=tcp``: rows of ``START END [*]``."""
    rows = re.findall(r"^[ \t]*(\d+)[ \t]+(\d+)\b", output, flags=re.MULTILINE)
    return normalize((int(low), int(high)) for low, high in rows if int(low) <= int(high))


def _read_linux(proc: Path) -> SystemPorts:
    source = str(proc / "ip_local_port_range")
    try:
        low, high = (int(n) for n in (proc / "ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return SystemPorts(None, f"{source} unreadable")
    try:
        reserved = parse_spans((proc / "ip_local_reserved_ports").read_text())
    except (OSError, ValueError):
        reserved = ()  # an old kernel without the file: nothing is reserved
    return SystemPorts(((low, high),), source, reserved=reserved)


#: Where ``sysctl`` lives: ``/usr/sbin`` on macOS, ``/sbin`` on the BSDs; often not on PATH.
_SYSCTL_PATHS = {"darwin": ("/usr/sbin/sysctl", "/sbin/sysctl")}
_SYSCTL_PATHS_BSD = ("/sbin/sysctl", "/usr/sbin/sysctl")


def _sysctls(prefix: str, *names: str) -> tuple[str, tuple[str, ...]]:
    return f"{prefix}{'/'.join(names)}", tuple(prefix + name for name in names)


_PORTRANGE = _sysctls("net.inet.ip.portrange.", "first", "last", "hifirst", "hilast")
#: For each ``sys.platform`` prefix, a label for messages and the sysctl names of every range the
#: kernel picks a local port from for a socket that names none, as pairs of first and last port:
#: the default range and the one a socket gets with ``IP_PORTRANGE_HIGH`` (NetBSD has one for both).
_SYSCTL_RANGES = {
    "darwin": _PORTRANGE,
    "freebsd": _PORTRANGE,
    "dragonfly": _PORTRANGE,
    "netbsd": _sysctls("net.inet.ip.", "anonportmin", "anonportmax"),
    "openbsd": _sysctls("net.inet.ip.", "portfirst", "portlast", "porthifirst", "porthilast"),
}


def sysctl_command(platform: str, exists: Callable[[str], bool] = os.path.exists) -> str:
    """The first ``sysctl`` of this platform's usual places that exists, else the bare name."""
    candidates = _SYSCTL_PATHS.get(platform, _SYSCTL_PATHS_BSD)
    return next((path for path in candidates if exists(path)), "sysctl")


def _read_sysctl(run: Runner, sysctl: str, label: str, names: tuple[str, ...]) -> SystemPorts:
    spans = parse_sysctl_ranges(run([sysctl, "-n", *names]))
    source = f"sysctl {label}"
    return SystemPorts(spans, source if spans else f"{source} unavailable")


def _read_windows(run: Runner) -> SystemPorts:
    # The bind check binds dual-stack, so what IPv6 hands out or excludes counts as much as IPv4.
    assigned: list[tuple[int, int]] = []
    excluded: list[tuple[int, int]] = []
    for family in ("ipv4", "ipv6"):
        for protocol in ("tcp", "udp"):
            command = ["netsh", "int", family, "show", "dynamicport", protocol]
            dynamic = parse_netsh_dynamic(run(command))
            if dynamic is None:
                return SystemPorts(None, f"{' '.join(command)} unavailable")
            assigned.extend(dynamic)
            command = ["netsh", "int", family, "show", "excludedportrange", f"protocol={protocol}"]
            excluded.extend(parse_netsh_excluded(run(command)))
    source = "netsh int ipv4/ipv6 show dynamicport tcp/udp"
    return SystemPorts(normalize(assigned), source, excluded=normalize(excluded))


def read_system_ports(
    platform: str = sys.platform,
    run: Runner = _run,
    exists: Callable[[str], bool] = os.path.exists,
) -> SystemPorts:
    """Ask this operating system which ports it auto-assigns.

    ``platform`` is a ``sys.platform`` value, ``run`` executes a command and returns its output,
    ``exists`` tells whether a file exists (to find ``sysctl``).
    """
    if platform.startswith("linux"):
        return _read_linux(_LINUX_PROC)
    if platform == "win32":
        return _read_windows(run)
    for prefix, (label, names) in _SYSCTL_RANGES.items():
        if platform.startswith(prefix):
            return _read_sysctl(run, sysctl_command(prefix, exists), label, names)
    return SystemPorts(None, f"unknown for platform {platform}")
