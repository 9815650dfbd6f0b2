"""Port ranges: span arithmetic, parsing, and what each operating system auto-assigns.

Other operating systems are covered by playing back their captured command output (the only
stand-in this project allows); Linux is checked against this machine's real ``/proc``.
"""

from __future__ import annotations

import _socket
import copy
import itertools
import locale
import pickle
import random
import re
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import pytest

from pytest_ephemeral._ranges import (
    IANA_DYNAMIC,
    MIN_AUTO_PORTS,
    PortRange,
    Spans,
    SystemPorts,
    _run,
    count,
    derive_auto,
    format_spans,
    intersect,
    normalize,
    parse_netsh_dynamic,
    parse_netsh_excluded,
    parse_spans,
    parse_sysctl_ranges,
    read_system_ports,
    subtract,
    sysctl_command,
)

ON_LINUX = sys.platform.startswith("linux")
IANA_PORTS = frozenset(range(49152, 65536))


def ports_of(spans: Iterable[tuple[int, int]]) -> set[int]:
    return {port for low, high in spans for port in range(low, high + 1)}


def assert_well_formed(spans: Spans) -> None:
    """Sorted, each LOW <= HIGH, and disjoint with a gap between neighbours (fully merged)."""
    assert all(low <= high for low, high in spans), spans
    assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(spans)), spans


# --- Captured output of other operating systems ------------------------------------------------

PORTRANGE = tuple(
    f"net.inet.ip.portrange.{name}" for name in ("first", "last", "hifirst", "hilast")
)
NETBSD_NAMES = ("net.inet.ip.anonportmin", "net.inet.ip.anonportmax")
OPENBSD_NAMES = tuple(
    f"net.inet.ip.{name}" for name in ("portfirst", "portlast", "porthifirst", "porthilast")
)
#: ``sysctl -n`` of the four portrange names, one value a line: macOS' defaults.
SYSCTL_MACOS_DEFAULT = "49152\n65535\n49152\n65535\n"
#: FreeBSD 14's defaults: the default range starts at 10000 (IPPORT_EPHEMERALFIRST).
SYSCTL_FREEBSD_DEFAULT = "10000\n65535\n49152\n65535\n"
#: Both ranges moved below 49152 (``sysctl net.inet.ip.portrange.first=10000`` and so on).
SYSCTL_CUSTOM = "10000\n20000\n20001\n30000\n"
#: NetBSD's defaults, ``sysctl -n net.inet.ip.anonportmin net.inet.ip.anonportmax``.
SYSCTL_NETBSD_DEFAULT = "49152\n65535\n"
#: OpenBSD's defaults: default range 1024-49151, IP_PORTRANGE_HIGH range 49152-65535.
SYSCTL_OPENBSD_DEFAULT = "1024\n49151\n49152\n65535\n"
SYSCTL_UNKNOWN_OID = "sysctl: unknown oid 'net.inet.ip.portrange.first'\n"
#: Where the captured commands' sysctl lives: /usr/sbin on macOS, /sbin on the BSDs.
SYSCTL_AT = {"/usr/sbin/sysctl", "/sbin/sysctl"}
MACOS = ("/usr/sbin/sysctl", "-n", *PORTRANGE)
FREEBSD = ("/sbin/sysctl", "-n", *PORTRANGE)
NETBSD = ("/sbin/sysctl", "-n", *NETBSD_NAMES)
OPENBSD = ("/sbin/sysctl", "-n", *OPENBSD_NAMES)


def netsh_dynamic(protocol: str, family: str = "ipv4") -> tuple[str, ...]:
    return ("netsh", "int", family, "show", "dynamicport", protocol)


def netsh_excluded(protocol: str, family: str = "ipv4") -> tuple[str, ...]:
    return ("netsh", "int", family, "show", "excludedportrange", f"protocol={protocol}")


NETSH_DYNAMIC_TCP = """
Protocol tcp Dynamic Port Range
---------------------------------
Start Port      : 49152
Number of Ports : 16384

"""
NETSH_DYNAMIC_UDP = NETSH_DYNAMIC_TCP.replace("tcp", "udp")
NETSH_DYNAMIC_GERMAN = """
Protokoll tcp Dynamischer Portbereich
---------------------------------
Startport      : 49152
Anzahl der Ports : 16384

"""
#: ``netsh int ipv4 set dynamicport tcp start=1025 num=64510``: ends at 65534, below the cap.
NETSH_DYNAMIC_CUSTOM = """
Protocol tcp Dynamic Port Range
---------------------------------
Start Port      : 1025
Number of Ports : 64510

"""
#: A start and size that overrun 65535: the end must be capped.
NETSH_DYNAMIC_OVERRUN = """
Protocol tcp Dynamic Port Range
---------------------------------
Start Port      : 60000
Number of Ports : 16384

"""
NETSH_EXCLUDED_TCP = """
Protocol tcp Port Exclusion Ranges

Start Port    End Port
----------    --------
      5357        5357
     50000       50059     *
     50060       50159

* - Administered port exclusions.

"""
NETSH_EXCLUDED_UDP = """
Protocol udp Port Exclusion Ranges

Start Port    End Port
----------    --------
     52000       52099

* - Administered port exclusions.

"""
NETSH_EXCLUDED_EMPTY = """
Protocol tcp Port Exclusion Ranges

Start Port    End Port
----------    --------

* - Administered port exclusions.

"""
NETSH_NOT_FOUND = "The following command was not found: int ipv4 show dynamicport tcp.\n"

#: ``netsh int ipv6 show excludedportrange protocol=tcp``: Hyper-V reserves for both families.
NETSH_EXCLUDED_TCP_IPV6 = NETSH_EXCLUDED_TCP.replace("50060       50159", "53000       53049")

WINDOWS_DEFAULT = {
    netsh_dynamic("tcp"): NETSH_DYNAMIC_TCP,
    netsh_dynamic("udp"): NETSH_DYNAMIC_UDP,
    netsh_excluded("tcp"): NETSH_EXCLUDED_TCP,
    netsh_excluded("udp"): NETSH_EXCLUDED_UDP,
    netsh_dynamic("tcp", "ipv6"): NETSH_DYNAMIC_TCP,
    netsh_dynamic("udp", "ipv6"): NETSH_DYNAMIC_UDP,
    netsh_excluded("tcp", "ipv6"): NETSH_EXCLUDED_TCP_IPV6,
    netsh_excluded("udp", "ipv6"): NETSH_EXCLUDED_UDP,
}
#: The TCP and UDP exclusions of both families together.
WINDOWS_DEFAULT_EXCLUDED = ((5357, 5357), (50000, 50159), (52000, 52099), (53000, 53049))


class CapturedRunner:
    """Plays back captured command output; a command it has no output for fails (``""``)."""

    def __init__(self, outputs: Mapping[tuple[str, ...], str]) -> None:
        self.outputs = dict(outputs)
        self.commands: list[tuple[str, ...]] = []

    def __call__(self, command: Sequence[str]) -> str:
        self.commands.append(tuple(command))
        return self.outputs.get(tuple(command), "")


# --- Span arithmetic ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spans", "expected"),
    [
        pytest.param([], (), id="empty"),
        pytest.param([(5, 9)], ((5, 9),), id="one"),
        pytest.param([(20, 30), (1, 5)], ((1, 5), (20, 30)), id="sorts"),
        pytest.param([(1, 10), (5, 20)], ((1, 20),), id="overlapping"),
        pytest.param([(1, 5), (6, 10)], ((1, 10),), id="touching"),
        pytest.param([(1, 5), (7, 10)], ((1, 5), (7, 10)), id="gap-of-one-kept"),
        pytest.param([(1, 100), (3, 4), (50, 60)], ((1, 100),), id="contained"),
        pytest.param([(8, 8), (7, 7), (9, 9), (8, 8)], ((7, 9),), id="single-ports-merge"),
    ],
)
def test_normalize(spans: list[tuple[int, int]], expected: Spans) -> None:
    assert normalize(spans) == expected


@pytest.mark.parametrize(
    ("spans", "removed", "expected"),
    [
        pytest.param(((1, 10),), (), ((1, 10),), id="nothing-removed"),
        pytest.param((), ((1, 10),), (), id="from-nothing"),
        pytest.param(((1, 10),), ((1, 10),), (), id="all"),
        pytest.param(((1, 10),), ((0, 20),), (), id="wider-cut"),
        pytest.param(((1, 10),), ((4, 6),), ((1, 3), (7, 10)), id="middle"),
        pytest.param(((1, 10),), ((1, 1),), ((2, 10),), id="first-port"),
        pytest.param(((1, 10),), ((10, 10),), ((1, 9),), id="last-port"),
        pytest.param(((1, 10),), ((20, 30),), ((1, 10),), id="disjoint"),
        pytest.param(((1, 10), (20, 30)), ((8, 22),), ((1, 7), (23, 30)), id="across-two-spans"),
        pytest.param(
            ((1, 30),), ((3, 4), (10, 12), (29, 40)), ((1, 2), (5, 9), (13, 28)), id="many-cuts"
        ),
        pytest.param(IANA_DYNAMIC, ((32768, 60999),), ((61000, 65535),), id="linux-default"),
        pytest.param(IANA_DYNAMIC, IANA_DYNAMIC, (), id="macos-default"),
    ],
)
def test_subtract(spans: Spans, removed: Spans, expected: Spans) -> None:
    assert subtract(spans, removed) == expected


@pytest.mark.parametrize(
    ("spans", "other", "expected"),
    [
        pytest.param(((1, 10),), (), (), id="with-nothing"),
        pytest.param(((1, 10),), ((5, 20),), ((5, 10),), id="overlap"),
        pytest.param(((1, 10),), ((11, 20),), (), id="touching-is-not-overlap"),
        pytest.param(((1, 10), (20, 30)), ((5, 25),), ((5, 10), (20, 25)), id="two-spans"),
        pytest.param(((8080, 8080), (50000, 50099)), IANA_DYNAMIC, ((50000, 50099),), id="iana"),
    ],
)
def test_intersect(spans: Spans, other: Spans, expected: Spans) -> None:
    assert intersect(spans, other) == expected
    assert intersect(other, spans) == expected


@pytest.mark.parametrize("seed", range(5))
def test_arithmetic_agrees_with_sets(seed: int) -> None:
    """Against plain set operations on many random normalized span lists in a small universe."""
    rng = random.Random(seed)

    def random_spans() -> Spans:
        spans = []
        for _ in range(rng.randint(0, 5)):
            low = rng.randint(1, 60)
            spans.append((low, min(60, low + rng.randint(0, 12))))
        return normalize(spans)

    for _ in range(200):
        a, b = random_spans(), random_spans()
        assert ports_of(a) == ports_of(normalize(list(a) + list(a)))
        difference, common = subtract(a, b), intersect(a, b)
        assert ports_of(difference) == ports_of(a) - ports_of(b)
        assert ports_of(common) == ports_of(a) & ports_of(b)
        assert count(difference) == len(ports_of(a) - ports_of(b))
        for spans in (a, difference, common):
            assert_well_formed(spans)


@pytest.mark.parametrize(
    ("spans", "expected"),
    [((), 0), (((80, 80),), 1), (((1, 10), (20, 29)), 20), (IANA_DYNAMIC, 16384)],
)
def test_count(spans: Spans, expected: int) -> None:
    assert count(spans) == expected


@pytest.mark.parametrize(
    ("spans", "text"),
    [
        ((), "none"),
        (((8080, 8080),), "8080"),
        (((61000, 65535),), "61000-65535"),
        (((50000, 50000), (50002, 50010)), "50000,50002-50010"),
    ],
)
def test_format_spans(spans: Spans, text: str) -> None:
    assert format_spans(spans) == text
    if spans:
        assert parse_spans(text) == spans


# --- parse_spans -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", (), id="empty"),
        pytest.param("\n", (), id="empty-proc-file"),
        pytest.param("8080", ((8080, 8080),), id="port"),
        pytest.param("50000-50099", ((50000, 50099),), id="range"),
        pytest.param("50000-50099,8080\n", ((8080, 8080), (50000, 50099)), id="proc-reserved"),
        pytest.param(" 61000 - 61009 , 80 ,", ((80, 80), (61000, 61009)), id="spaces-trailing"),
        pytest.param("5,3,4,10-12,11", ((3, 5), (10, 12)), id="merges"),
        pytest.param("1-65535", ((1, 65535),), id="everything"),
        pytest.param("7-7", ((7, 7),), id="one-port-range"),
    ],
)
def test_parse_spans(text: str, expected: Spans) -> None:
    assert parse_spans(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("abc", "'abc' is not a port or a LOW-HIGH range", id="word"),
        pytest.param("80,http", "'http' is not a port or a LOW-HIGH range", id="word-in-list"),
        pytest.param("10-x", "'10-x' is not a port or a LOW-HIGH range", id="bad-high"),
        pytest.param("5-", "'5-' is not a port or a LOW-HIGH range", id="no-high"),
        pytest.param("-5", "'-5' is not a port or a LOW-HIGH range", id="negative"),
        pytest.param("1-2-3", "'1-2-3' is not a port or a LOW-HIGH range", id="two-dashes"),
        pytest.param("10 20", "'10 20' is not a port or a LOW-HIGH range", id="space-list"),
        pytest.param("1.5", "'1.5' is not a port or a LOW-HIGH range", id="float"),
        pytest.param("1_000", "'1_000' is not a port or a LOW-HIGH range", id="underscore"),
        pytest.param("+80", "'+80' is not a port or a LOW-HIGH range", id="plus-sign"),
        pytest.param("0", "port 0 is outside 1-65535", id="zero"),
        pytest.param("65536", "port 65536 is outside 1-65535", id="too-high"),
        pytest.param("60000-70000", "port 70000 is outside 1-65535", id="high-too-high"),
        pytest.param("0-10", "port 0 is outside 1-65535", id="low-zero"),
        pytest.param("200-100", "'200-100' has LOW greater than HIGH", id="reversed"),
    ],
)
def test_parse_spans_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_spans(text)


# --- PortRange ---------------------------------------------------------------------------------


def test_port_range() -> None:
    ports = PortRange(((61000, 61002), (61010, 61019), (65535, 65535)), "set by test")
    assert len(ports) == 14
    assert ports.ports.typecode == "H"
    assert ports.ports.tolist() == [61000, 61001, 61002, *range(61010, 61020), 65535]
    assert ports.longest_run() == 10
    assert str(ports) == "61000-61002,61010-61019,65535"
    assert ports.origin == "set by test"
    assert ports.caveat is None


def test_port_range_whole_dynamic_range() -> None:
    ports = PortRange(IANA_DYNAMIC, "iana", caveat="shared")
    assert len(ports) == 16384
    assert ports.ports[0] == 49152
    assert ports.ports[-1] == 65535
    assert ports.longest_run() == 16384
    assert str(ports) == "49152-65535"
    assert ports.caveat == "shared"


def test_empty_port_range() -> None:
    ports = PortRange((), "nothing")
    assert len(ports) == 0
    assert ports.ports.tolist() == []
    assert ports.longest_run() == 0
    assert str(ports) == "none"


def test_port_range_equality_ignores_the_port_array() -> None:
    assert PortRange(((1, 5),), "a") == PortRange(((1, 5),), "a")
    assert PortRange(((1, 5),), "a") != PortRange(((1, 6),), "a")


# --- Parsing captured output of other operating systems ----------------------------------------


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        pytest.param(SYSCTL_MACOS_DEFAULT, ((49152, 65535),), id="macos-default"),
        pytest.param(SYSCTL_FREEBSD_DEFAULT, ((10000, 65535),), id="freebsd-default"),
        pytest.param(SYSCTL_CUSTOM, ((10000, 30000),), id="customised-touching"),
        pytest.param("10000\n20000\n49152\n65535\n", ((10000, 20000), (49152, 65535)), id="apart"),
        pytest.param(SYSCTL_NETBSD_DEFAULT, ((49152, 65535),), id="netbsd-default"),
        pytest.param(SYSCTL_OPENBSD_DEFAULT, ((1024, 65535),), id="openbsd-default"),
        pytest.param("1024\n1024\n", ((1024, 1024),), id="one-port"),
        pytest.param("", None, id="command-failed"),
        pytest.param(SYSCTL_UNKNOWN_OID, None, id="unknown-oid"),
        pytest.param("49152\n", None, id="one-number"),
        pytest.param("49152\n65535\n1\n", None, id="three-numbers"),
        pytest.param("0\n65535\n", None, id="zero"),
        pytest.param("49152\n65535\n0\n0\n", None, id="second-pair-zero"),
        pytest.param("49152\n70000\n", None, id="beyond-65535"),
        pytest.param("65535\n49152\n", ((49152, 65535),), id="first-after-last"),
    ],
)
def test_parse_sysctl_ranges(output: str, expected: Spans | None) -> None:
    assert parse_sysctl_ranges(output) == expected


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        pytest.param(NETSH_DYNAMIC_TCP, ((49152, 65535),), id="default-tcp"),
        pytest.param(NETSH_DYNAMIC_UDP, ((49152, 65535),), id="default-udp"),
        pytest.param(NETSH_DYNAMIC_GERMAN, ((49152, 65535),), id="german"),
        pytest.param(NETSH_DYNAMIC_TCP.replace("\n", "\r\n"), ((49152, 65535),), id="crlf"),
        pytest.param(NETSH_DYNAMIC_CUSTOM, ((1025, 65534),), id="customised-not-capped"),
        pytest.param(NETSH_DYNAMIC_OVERRUN, ((60000, 65535),), id="overrun-capped"),
        pytest.param("", None, id="command-failed"),
        pytest.param(NETSH_NOT_FOUND, None, id="not-found"),
        pytest.param(NETSH_DYNAMIC_TCP.replace("16384", "0"), None, id="no-ports"),
    ],
)
def test_parse_netsh_dynamic(output: str, expected: Spans | None) -> None:
    assert parse_netsh_dynamic(output) == expected


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        pytest.param(
            NETSH_EXCLUDED_TCP, ((5357, 5357), (50000, 50159)), id="rows-with-administered-mark"
        ),
        pytest.param(
            NETSH_EXCLUDED_TCP.replace("\n", "\r\n"), ((5357, 5357), (50000, 50159)), id="crlf"
        ),
        pytest.param(NETSH_EXCLUDED_UDP, ((52000, 52099),), id="udp"),
        pytest.param(NETSH_EXCLUDED_EMPTY, (), id="empty-table"),
        pytest.param("", (), id="command-failed"),
    ],
)
def test_parse_netsh_excluded(output: str, expected: Spans) -> None:
    assert parse_netsh_excluded(output) == expected


# --- read_system_ports with captured output ----------------------------------------------------


def test_read_windows() -> None:
    run = CapturedRunner(WINDOWS_DEFAULT)
    system = read_system_ports("win32", run=run)
    assert system.auto_assign == ((49152, 65535),)
    # TCP and UDP, IPv4 and IPv6 exclusions together: a lease may be used for any of them.
    assert system.excluded == WINDOWS_DEFAULT_EXCLUDED
    assert system.reserved == ()
    assert system.source == "netsh int ipv4/ipv6 show dynamicport tcp/udp"
    assert set(run.commands) == set(WINDOWS_DEFAULT)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_read_windows_ranges_differ(protocol: str, family: str) -> None:
    """Each family's and protocol's own dynamic range counts (``netsh int ipv6 set ...``)."""
    custom = NETSH_DYNAMIC_CUSTOM.replace("tcp", protocol)
    outputs = {**WINDOWS_DEFAULT, netsh_dynamic(protocol, family): custom}
    system = read_system_ports("win32", run=CapturedRunner(outputs))
    assert system.auto_assign == ((1025, 65535),)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_read_windows_dynamicport_failed(protocol: str, family: str) -> None:
    outputs = dict(WINDOWS_DEFAULT)
    del outputs[netsh_dynamic(protocol, family)]
    system = read_system_ports("win32", run=CapturedRunner(outputs))
    assert system.auto_assign is None
    assert system.source == f"netsh int {family} show dynamicport {protocol} unavailable"


def test_read_windows_without_exclusions() -> None:
    outputs = {
        **WINDOWS_DEFAULT,
        netsh_excluded("tcp"): NETSH_EXCLUDED_EMPTY,
        netsh_excluded("udp"): "",
        netsh_excluded("tcp", "ipv6"): NETSH_EXCLUDED_EMPTY,
        netsh_excluded("udp", "ipv6"): "",
    }
    system = read_system_ports("win32", run=CapturedRunner(outputs))
    assert system.auto_assign == ((49152, 65535),)
    assert system.excluded == ()


def test_read_windows_ipv6_exclusions_only() -> None:
    outputs = {**WINDOWS_DEFAULT, netsh_excluded("tcp"): "", netsh_excluded("udp"): ""}
    system = read_system_ports("win32", run=CapturedRunner(outputs))
    assert system.excluded == ((5357, 5357), (50000, 50059), (52000, 52099), (53000, 53049))


@pytest.mark.parametrize(
    ("platform", "existing", "expected"),
    [
        pytest.param(
            "darwin", {"/usr/sbin/sysctl", "/sbin/sysctl"}, "/usr/sbin/sysctl", id="macos"
        ),
        pytest.param("darwin", {"/sbin/sysctl"}, "/sbin/sysctl", id="macos-sbin-only"),
        pytest.param("freebsd", {"/usr/sbin/sysctl", "/sbin/sysctl"}, "/sbin/sysctl", id="bsd"),
        pytest.param("openbsd", {"/usr/sbin/sysctl"}, "/usr/sbin/sysctl", id="bsd-usr-sbin-only"),
        pytest.param("netbsd", set(), "sysctl", id="neither-bare-name"),
    ],
)
def test_sysctl_command(platform: str, existing: set[str], expected: str) -> None:
    assert sysctl_command(platform, exists=existing.__contains__) == expected


@pytest.mark.parametrize(
    ("platform", "names", "output", "expected", "label"),
    [
        pytest.param(
            "darwin", PORTRANGE, SYSCTL_MACOS_DEFAULT, ((49152, 65535),), "portrange", id="macos"
        ),
        pytest.param(
            "freebsd14",
            PORTRANGE,
            SYSCTL_FREEBSD_DEFAULT,
            ((10000, 65535),),
            "portrange",
            id="freebsd",
        ),
        pytest.param(
            "freebsd15",
            PORTRANGE,
            SYSCTL_CUSTOM,
            ((10000, 30000),),
            "portrange",
            id="freebsd-custom",
        ),
        pytest.param(
            "dragonfly6", PORTRANGE, SYSCTL_CUSTOM, ((10000, 30000),), "portrange", id="dragonfly"
        ),
        pytest.param(
            "netbsd10",
            NETBSD_NAMES,
            SYSCTL_NETBSD_DEFAULT,
            ((49152, 65535),),
            "anonportmin",
            id="netbsd",
        ),
        pytest.param(
            "openbsd7",
            OPENBSD_NAMES,
            SYSCTL_OPENBSD_DEFAULT,
            ((1024, 65535),),
            "porthifirst",
            id="openbsd",
        ),
    ],
)
def test_read_bsd(
    platform: str, names: tuple[str, ...], output: str, expected: Spans, label: str
) -> None:
    sysctl = "/usr/sbin/sysctl" if platform == "darwin" else "/sbin/sysctl"
    run = CapturedRunner({(sysctl, "-n", *names): output})
    system = read_system_ports(platform, run=run, exists={sysctl}.__contains__)
    assert system.auto_assign == expected
    assert system.source.startswith("sysctl net.inet.ip.")
    assert label in system.source
    assert system.excluded == system.reserved == ()
    assert run.commands == [(sysctl, "-n", *names)]


@pytest.mark.parametrize("platform", ["win32", "darwin", "freebsd14", "netbsd", "openbsd7"])
def test_read_system_ports_command_failed(platform: str) -> None:
    system = read_system_ports(platform, run=CapturedRunner({}))
    assert system.auto_assign is None
    assert system.source.endswith("unavailable")


@pytest.mark.parametrize("platform", ["sunos5", "aix7", "cygwin", "emscripten"])
def test_read_system_ports_unknown_platform(platform: str) -> None:
    run = CapturedRunner({})
    system = read_system_ports(platform, run=run)
    assert system.auto_assign is None
    assert system.source == f"unknown for platform {platform}"
    assert run.commands == []


# --- derive_auto -------------------------------------------------------------------------------

LINUX_DEFAULT = SystemPorts(((32768, 60999),), "/proc/sys/net/ipv4/ip_local_port_range")
MACOS_DEFAULT = SystemPorts(((49152, 65535),), "sysctl net.inet.ip.portrange.first/last")
WINDOWS_EXCLUDED = ((5357, 5357), (50000, 50159))
WINDOWS = SystemPorts(((49152, 65535),), "netsh", excluded=WINDOWS_EXCLUDED)
#: Whole dynamic range (fallback) minus the exclusions of ``WINDOWS_DEFAULT``.
WINDOWS_DEFAULT_AUTO = ((49152, 49999), (50160, 51999), (52100, 52999), (53050, 65535))
UNKNOWN = SystemPorts(None, "sysctl net.inet.ip.portrange.first/last unavailable")
OUTGOING = "outgoing connections"


def test_derive_auto_linux_default() -> None:
    ports = derive_auto(LINUX_DEFAULT, ())
    assert ports.spans == ((61000, 65535),)
    assert len(ports) == 4536
    assert ports.caveat is None
    assert "minus OS auto-assign 32768-60999" in ports.origin
    assert LINUX_DEFAULT.source in ports.origin


def test_derive_auto_linux_reserved_ports_are_added_back() -> None:
    system = SystemPorts(((32768, 60999),), "proc", reserved=parse_spans("50000-50099,8080"))
    ports = derive_auto(system, ())
    assert ports.spans == ((50000, 50099), (61000, 65535))
    assert len(ports) == 4536 + 100
    assert 8080 not in ports.ports
    assert ports.caveat is None
    assert "plus reserved 50000-50099" in ports.origin
    assert "8080" not in ports.origin


def test_derive_auto_linux_reserved_straddling_iana() -> None:
    system = SystemPorts(((32768, 60999),), "proc", reserved=((49000, 49199),))
    assert derive_auto(system, ()).spans == ((49152, 49199), (61000, 65535))


def test_derive_auto_customised_range_below_iana() -> None:
    ports = derive_auto(SystemPorts(((10000, 20000),), "sysctl"), ())
    assert ports.spans == IANA_DYNAMIC
    assert ports.caveat is None


def test_derive_auto_macos_default_falls_back() -> None:
    ports = derive_auto(MACOS_DEFAULT, ())
    assert ports.spans == IANA_DYNAMIC
    assert ports.caveat is not None
    assert OUTGOING in ports.caveat
    assert f"fewer than {MIN_AUTO_PORTS} left" in ports.origin


def test_derive_auto_windows_fallback_still_removes_excluded() -> None:
    ports = derive_auto(WINDOWS, ())
    assert ports.spans == ((49152, 49999), (50160, 65535))
    assert ports.caveat is not None
    assert OUTGOING in ports.caveat
    assert "minus excluded 5357,50000-50159" in ports.origin


def test_derive_auto_removes_exclusions() -> None:
    ports = derive_auto(LINUX_DEFAULT, ((61000, 61099), (65000, 65535), (8080, 8080)))
    assert ports.spans == ((61100, 64999),)
    assert ports.caveat is None
    assert "minus excluded 8080,61000-61099,65000-65535" in ports.origin


def test_derive_auto_exclusions_and_os_exclusions_together() -> None:
    system = SystemPorts(((32768, 60999),), "proc", excluded=((62000, 62999),))
    ports = derive_auto(system, ((61000, 61999),))
    assert ports.spans == ((63000, 65535),)


def test_derive_auto_exclusions_leaving_too_few_fall_back_without_them() -> None:
    ports = derive_auto(LINUX_DEFAULT, ((61000, 65450),))
    assert ports.spans == ((49152, 60999), (65451, 65535))
    assert ports.caveat is not None
    assert OUTGOING in ports.caveat


def test_derive_auto_unknown_auto_assign_falls_back() -> None:
    ports = derive_auto(UNKNOWN, ((49152, 49999),))
    assert ports.spans == ((50000, 65535),)
    assert ports.caveat is not None
    assert OUTGOING in ports.caveat
    assert UNKNOWN.source in ports.origin


@pytest.mark.parametrize(
    ("auto_high", "falls_back"),
    [(65535 - MIN_AUTO_PORTS, False), (65535 - MIN_AUTO_PORTS + 1, True)],
    ids=["exactly-enough", "one-short"],
)
def test_derive_auto_minimum(auto_high: int, falls_back: bool) -> None:
    ports = derive_auto(SystemPorts(((32768, auto_high),), "proc"), ())
    assert (ports.caveat is not None) is falls_back
    assert ports.spans == (IANA_DYNAMIC if falls_back else ((auto_high + 1, 65535),))


@pytest.mark.parametrize(
    "system",
    [
        LINUX_DEFAULT,
        SystemPorts(((32768, 60999),), "proc", reserved=((50000, 50099), (8080, 8080))),
        SystemPorts(((50000, 59999),), "proc", excluded=((61000, 61009),)),
        MACOS_DEFAULT,
        WINDOWS,
        UNKNOWN,
    ],
    ids=["linux", "linux-reserved", "linux-excluded", "macos", "windows", "unknown"],
)
@pytest.mark.parametrize("exclude", [(), ((49152, 49200), (61000, 61000))], ids=["", "exclude"])
def test_derive_auto_invariants(system: SystemPorts, exclude: Spans) -> None:
    ports = derive_auto(system, exclude)
    leased = set(ports.ports)
    assert_well_formed(ports.spans)
    assert leased <= IANA_PORTS
    assert not leased & ports_of(exclude + system.excluded)
    if ports.caveat is None:
        assert system.auto_assign is not None
        assert len(ports) >= MIN_AUTO_PORTS
        assert not leased & (ports_of(system.auto_assign) - ports_of(system.reserved))


@pytest.mark.parametrize(
    ("platform", "outputs", "expected", "caveat"),
    [
        pytest.param("win32", WINDOWS_DEFAULT, WINDOWS_DEFAULT_AUTO, True, id="windows"),
        pytest.param("darwin", {MACOS: SYSCTL_MACOS_DEFAULT}, IANA_DYNAMIC, True, id="macos"),
        pytest.param("darwin", {MACOS: SYSCTL_CUSTOM}, IANA_DYNAMIC, False, id="macos-custom"),
        pytest.param(
            "freebsd14", {FREEBSD: SYSCTL_FREEBSD_DEFAULT}, IANA_DYNAMIC, True, id="freebsd"
        ),
        pytest.param(
            "freebsd14",
            {FREEBSD: "10000\n20000\n49152\n65535\n"},
            IANA_DYNAMIC,
            True,
            id="freebsd-high-range-left-default",
        ),
        pytest.param("netbsd", {NETBSD: SYSCTL_NETBSD_DEFAULT}, IANA_DYNAMIC, True, id="netbsd"),
        pytest.param(
            "netbsd", {NETBSD: "32768\n59999\n"}, ((60000, 65535),), False, id="netbsd-custom"
        ),
        pytest.param(
            "openbsd7", {OPENBSD: SYSCTL_OPENBSD_DEFAULT}, IANA_DYNAMIC, True, id="openbsd"
        ),
        pytest.param(
            "openbsd7",
            {OPENBSD: "1024\n49151\n55000\n65535\n"},
            ((49152, 54999),),
            False,
            id="openbsd-high-range-narrowed",
        ),
        pytest.param("darwin", {}, IANA_DYNAMIC, True, id="sysctl-failed"),
    ],
)
def test_captured_output_to_auto_range(
    platform: str, outputs: Mapping[tuple[str, ...], str], expected: Spans, caveat: bool
) -> None:
    system = read_system_ports(platform, run=CapturedRunner(outputs), exists=SYSCTL_AT.__contains__)
    ports = derive_auto(system, ())
    assert ports.spans == expected
    assert (ports.caveat is not None) is caveat


# --- Running commands --------------------------------------------------------------------------


def test_run_returns_stdout() -> None:
    assert _run([sys.executable, "-c", "print('49152'); print('65535')"]) == "49152\n65535\n"


def test_run_failures_give_empty_output() -> None:
    assert _run([sys.executable, "-c", "print('partial'); raise SystemExit(1)"]) == ""
    assert _run(["pytest-ephemeral-no-such-command"]) == ""


def test_run_survives_undecodable_output() -> None:
    try:
        b"\x81".decode(locale.getpreferredencoding(False))
    except UnicodeDecodeError:
        pass
    else:  # pragma: no cover - only a Latin-1 locale decodes every byte
        pytest.skip("this locale's codec decodes every byte")
    script = (
        "import sys; sys.stdout.buffer.write(b'Start Port : 49152\\r\\nPortausschl\\x81sse\\r\\n')"
    )
    assert "49152" in _run([sys.executable, "-c", script])


# --- This machine's Linux kernel ---------------------------------------------------------------

PROC = Path("/proc/sys/net/ipv4")


def kernel_auto_assigned() -> set[int]:
    """Ports this kernel hands to connect() and bind(0), read from /proc without the package."""
    low, high = (int(n) for n in (PROC / "ip_local_port_range").read_text().split())
    reserved: set[int] = set()
    for item in (PROC / "ip_local_reserved_ports").read_text().strip().split(","):
        if item:
            first, _, last = item.partition("-")
            reserved.update(range(int(first), int(last or first) + 1))
    return set(range(low, high + 1)) - reserved


@pytest.mark.skipif(not ON_LINUX, reason="reads Linux /proc")
def test_linux_system_ports_match_proc() -> None:
    low, high = (int(n) for n in (PROC / "ip_local_port_range").read_text().split())
    system = read_system_ports()
    assert system.auto_assign == ((low, high),)
    assert system.source == str(PROC / "ip_local_port_range")
    assert read_system_ports("linux") == system


@pytest.mark.skipif(not ON_LINUX, reason="reads Linux /proc")
def test_linux_auto_range_avoids_kernel_auto_assign() -> None:
    assigned = kernel_auto_assigned()
    ports = derive_auto(read_system_ports(), ())
    expected = IANA_PORTS - assigned
    if len(expected) >= MIN_AUTO_PORTS:
        assert ports.caveat is None
        assert set(ports.ports) == expected
        assert not set(ports.ports) & assigned
    else:  # a kernel configured to auto-assign (nearly) all of 49152-65535
        assert ports.spans == IANA_DYNAMIC
        assert ports.caveat is not None


@pytest.mark.skipif(not ON_LINUX, reason="reads Linux /proc")
@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM], ids=["tcp", "udp"])
def test_linux_kernel_never_picks_an_auto_port(kind: int) -> None:
    """What the kernel really hands to bind(0) stays out of the auto range. (Asked through the
    C base socket: this suite's own session leases a ``socket.socket``'s bind(0), adapter bind0.)"""
    ports = derive_auto(read_system_ports(), ())
    if ports.caveat is not None:
        pytest.skip(f"this kernel auto-assigns the dynamic range: {ports.origin}")
    auto = set(ports.ports)
    with ExitStack() as stack:
        picked = []
        for _ in range(200):
            sock = _socket.socket(socket.AF_INET, kind)
            stack.callback(sock.close)
            sock.bind(("127.0.0.1", 0))
            picked.append(sock.getsockname()[1])
    assert len(set(picked)) == 200
    assert not auto.intersection(picked)


def test_a_port_range_survives_pickle_and_copy() -> None:
    original = PortRange(((61000, 61009), (61020, 61020)), "set by a test", "a caveat")
    for again in (
        pickle.loads(pickle.dumps(original)),
        copy.copy(original),
        copy.deepcopy(original),
    ):
        assert again == original
        assert list(again.ports) == list(original.ports)
