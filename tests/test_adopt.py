"""Adapters (setting ``adopt``): the real pytest-asyncio, anyio, portpicker, port-for and aiohttp
in real pytest sessions, and pytest-run-parallel's threads."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pytest_ephemeral import ConfigError
from pytest_ephemeral._settings import ADAPTERS, Raw, parse_adopt

from .conftest import MakeRange
from .helpers import run_inline

ALL = "pytest-asyncio, anyio, portpicker, port-for, aiohttp, bind0"
# --- the setting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("all", set(ADAPTERS)),
        (" ALL ", set(ADAPTERS)),
        ("none", set()),
        ("anyio", {"anyio"}),
        ("port-for, aiohttp,", {"port-for", "aiohttp"}),
    ],
)
def test_parse_adopt(value: str, expected: set[str]) -> None:
    assert parse_adopt(Raw(value, "test")) == expected


@pytest.mark.parametrize("value", ["anyio,bogus", "all,anyio", "portfor"])
def test_parse_adopt_refuses_unknown_names(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_adopt(Raw(value, "environment variable X"))
    message = str(caught.value)
    assert repr(value) in message
    assert "environment variable X" in message
    assert ALL in message


@pytest.mark.parametrize(
    ("how", "source"),
    [
        ("option", "command-line option --ephemeral-adopt"),
        ("env", "environment variable PYTEST_EPHEMERAL_ADOPT"),
        ("ini", "ephemeral_adopt in config file"),
    ],
)
def test_an_unknown_adapter_is_a_usage_error_naming_its_source(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: str, source: str
) -> None:
    args = []
    if how == "option":
        args.append("--ephemeral-adopt=asyncio")
    elif how == "env":
        monkeypatch.setenv("PYTEST_EPHEMERAL_ADOPT", "asyncio")
    else:
        pytester.makeini("[pytest]\nephemeral_adopt = asyncio\n")
    pytester.makepyfile("def test_nothing(): pass")
    result = run_inline(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: bad value 'asyncio' from {source}*unknown adapter*"])


@pytest.mark.parametrize(
    ("args", "header"),
    [
        ([], ALL),
        (["--ephemeral-adopt=port-for,anyio"], "anyio, port-for"),
        (["--ephemeral-adopt=none"], "none"),
    ],
)
def test_header_names_the_active_adapters(
    pytester: pytest.Pytester, args: list[str], header: str
) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = run_inline(pytester, *args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"ephemeral adapters: {header}"])


# --- fixture adapters -------------------------------------------------------------------------

FIXTURE_TESTS = """
from __future__ import annotations
import os
import socket

from anyio.pytest_plugin import FreePortFactory

RANGE = range(int(os.environ["LOW"]), int(os.environ["HIGH"]) + 1)


def test_asyncio(
    unused_tcp_port, unused_udp_port, unused_tcp_port_factory, unused_udp_port_factory
):
    ports = [unused_tcp_port, unused_udp_port, unused_tcp_port_factory(), unused_udp_port_factory()]
    assert all(type(port) is int and port in RANGE for port in ports), ports
    assert len(set(ports)) == 4


def test_anyio(free_tcp_port, free_udp_port, free_tcp_port_factory, free_udp_port_factory):
    assert isinstance(free_tcp_port_factory, FreePortFactory)
    assert free_tcp_port_factory.kind == socket.SOCK_STREAM
    assert free_udp_port_factory.kind == socket.SOCK_DGRAM
    ports = [free_tcp_port, free_udp_port, free_tcp_port_factory(), free_udp_port_factory()]
    assert all(type(port) is int and port in RANGE for port in ports), ports
    with socket.socket(type=socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", free_udp_port))  # free for UDP
"""


@pytest.mark.parametrize(
    "order",
    [
        ["pytest_asyncio.plugin", "anyio.pytest_plugin", "pytest_ephemeral.plugin"],
        ["pytest_ephemeral.plugin", "pytest_asyncio.plugin", "anyio.pytest_plugin"],
    ],
    ids=["originals-first", "ephemeral-first"],
)
def test_fixture_adapters_win_whatever_the_load_order(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    private_range: MakeRange,
    order: list[str],
) -> None:
    private = private_range(12)
    monkeypatch.setenv("LOW", str(private.ports[0]))
    monkeypatch.setenv("HIGH", str(private.ports[-1]))
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(FIXTURE_TESTS)
    plugins = [arg for name in [*order, "xdist.plugin"] for arg in ("-p", name)]
    result = run_inline(pytester, *plugins, *private.args)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["ephemeral adapters: pytest-asyncio, anyio, *"])


@pytest.mark.parametrize("mode", [["-n", "2"], ["-p", "no:xdist"]], ids=" ".join)
def test_fixture_adapters_under_xdist_and_without(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    private_range: MakeRange,
    mode: list[str],
) -> None:
    private = private_range(12)
    monkeypatch.setenv("LOW", str(private.ports[0]))
    monkeypatch.setenv("HIGH", str(private.ports[-1]))
    pytester.makepyfile(FIXTURE_TESTS)
    result = run_inline(pytester, *mode, *private.args)
    result.assert_outcomes(passed=2)


def test_adopt_none_leaves_the_original_fixtures(
    pytester: pytest.Pytester, private_range: MakeRange
) -> None:
    private = private_range(1)
    pytester.makepyfile(
        f"""
        def test_original(unused_tcp_port, free_tcp_port):
            assert {private.ports[0]} not in (unused_tcp_port, free_tcp_port)
            assert unused_tcp_port < 61000 or free_tcp_port < 61000  # the kernel's range
        """
    )
    # In a process of its own: in this one, this suite's session leases bind(0) (bind0) too.
    result = pytester.runpytest_subprocess("--ephemeral-adopt=none", *private.args)
    result.assert_outcomes(passed=1)


def test_a_conftest_fixture_of_the_same_name_wins(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture
        def unused_tcp_port():
            return 1234

        @pytest.fixture(scope="session")
        def free_tcp_port_factory():
            return lambda: 4321
        """
    )
    pytester.makepyfile(
        """
        def test_mine(unused_tcp_port, free_tcp_port_factory):
            assert unused_tcp_port == 1234
            assert free_tcp_port_factory() == 4321
        """
    )
    result = run_inline(pytester, "-n", "2")
    result.assert_outcomes(passed=1)


def test_function_leases_end_at_teardown_and_factory_leases_at_session_end(
    pytester: pytest.Pytester, private_range: MakeRange
) -> None:
    """Two ports: the per-test fixtures reuse one in turn; the factories' leases pile up."""
    private = private_range(2)
    pytester.makepyfile(
        """
        import pytest
        from pytest_ephemeral import PortsExhausted

        @pytest.mark.parametrize("i", range(3))
        def test_in_turn(unused_tcp_port, free_udp_port, i):
            pass

        def test_factory_1(unused_tcp_port_factory):
            unused_tcp_port_factory()

        def test_factory_2(free_tcp_port_factory):
            free_tcp_port_factory()

        def test_factory_3(unused_udp_port_factory):
            with pytest.raises(PortsExhausted):  # both ports still leased by the factories
                unused_udp_port_factory()
        """
    )
    result = run_inline(
        pytester, "-p", "no:xdist", "-p", "no:randomly", "--ephemeral-timeout=0", *private.args
    )
    result.assert_outcomes(passed=6)


def test_a_fixture_adapter_port_left_in_use_warns(
    pytester: pytest.Pytester, private_range: MakeRange
) -> None:
    private = private_range(1)
    pytester.makepyfile(
        """
        import socket
        LEFT = []

        def teardown_module():  # after the test's leak check
            for sock in LEFT:
                sock.close()

        def test_leaks(free_udp_port):
            sock = socket.socket(type=socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", free_udp_port))
            LEFT.append(sock)
        """
    )
    result = run_inline(pytester, "-p", "no:xdist", *private.args)
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*EphemeralPortWarning: port * is still*"])


# --- library adapters -------------------------------------------------------------------------

LIBRARY_TESTS = """
from __future__ import annotations
import os
import sys

import pytest

RANGE = range(int(os.environ["LOW"]), int(os.environ["HIGH"]) + 1)


def test_not_imported_at_start_up():
    # (pytest-postgresql and pytest-redis import port_for: disabled in this run)
    assert not {"portpicker", "port_for", "aiohttp"} & set(sys.modules)


def test_every_helper_leases():
    import aiohttp.test_utils
    import port_for
    import portpicker

    ports = [
        portpicker.pick_unused_port(),
        port_for.select_random(),
        port_for.get_port(None),
        aiohttp.test_utils.unused_port(),
    ]
    assert all(port in RANGE for port in ports), ports
    assert len(set(ports)) == 4
    assert port_for.get_port(5432) == 5432 and port_for.get_port("80") == 80
    assert port_for.get_port(-1) is None
"""


@pytest.mark.parametrize("mode", [["-n", "2"], ["-p", "no:xdist"]], ids=" ".join)
def test_library_adapters_lease_in_every_process(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    private_range: MakeRange,
    mode: list[str],
) -> None:
    private = private_range(8)
    monkeypatch.setenv("LOW", str(private.ports[0]))
    monkeypatch.setenv("HIGH", str(private.ports[-1]))
    pytester.makepyfile(LIBRARY_TESTS)
    no_servers = ["-p", "no:pytest_postgresql", "-p", "no:pytest_redis"]
    args = [*mode, *no_servers, "-p", "no:randomly", *private.args]
    if "no:xdist" in mode:  # the tests run in the inner session's process: it must be fresh
        result = pytester.runpytest_subprocess(*args)
    else:
        result = run_inline(pytester, *args)
    result.assert_outcomes(passed=2)


def test_a_copy_made_before_the_session_is_replaced_too(
    pytester: pytest.Pytester, private_range: MakeRange
) -> None:
    """aiohttp's pytest plugin, loaded by -p before the session is configured, copied
    ``unused_port`` with ``from .test_utils import unused_port``: its fixture leases too."""
    private = private_range(2)
    pytester.makepyfile(
        f"""
        def test_fixture(aiohttp_unused_port):
            assert aiohttp_unused_port() in {private.ports!r}
        """
    )
    result = run_inline(pytester, "-p", "aiohttp.pytest_plugin", *private.args)
    result.assert_outcomes(passed=1)


def test_a_copy_outside_the_library_made_before_the_session_is_replaced_too(
    pytester: pytest.Pytester, private_range: MakeRange
) -> None:
    """A conftest module, imported before the session is configured, holds its own copy of
    ``port_for.select_random``, outside port_for's package: it is found and leases too (the
    search goes on past the library's modules while anything else refers to the original)."""
    private = private_range(2)
    pytester.makeconftest("from port_for import select_random as picked\n")
    pytester.makepyfile(
        f"""
        import conftest

        def test_copy():
            assert conftest.picked() in {private.ports!r}
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", *private.args)
    result.assert_outcomes(passed=1)


def test_library_ports_last_as_long_as_the_scope_that_asked(
    pytester: pytest.Pytester, private_range: MakeRange
) -> None:
    """Three ports: the session holds one (asked at collection), each module's fixture one while
    its module runs, and the tests the third in turn. Passes only if each lease ends with its
    scope: the second module needs the first module's fixture port back."""
    private = private_range(3)
    pytester.makepyfile(
        at_import="""
        import port_for
        SESSION_PORT = port_for.get_port(None)  # asked at collection, outside tests and fixtures
        """
    )
    common = """
        import aiohttp.test_utils
        import port_for
        import portpicker
        import pytest
        from port_for import PortForException
        from at_import import SESSION_PORT

        @pytest.fixture(scope="module")
        def server_port():
            return port_for.get_port(None)

        def test_a(server_port):
            assert len({SESSION_PORT, server_port, aiohttp.test_utils.unused_port()}) == 3
            with pytest.raises(PortForException):  # all three still leased
                port_for.get_port(None)

        def test_b(server_port):
            port = portpicker.pick_unused_port()
            portpicker.return_port(port)  # ends the lease early
            assert portpicker.pick_unused_port() == port
        """
    pytester.makepyfile(test_one=common, test_two=common)
    result = run_inline(
        pytester, "-p", "no:xdist", "-p", "no:randomly", "--ephemeral-timeout=0", *private.args
    )
    result.assert_outcomes(passed=4)


def test_restrictions_are_honoured(pytester: pytest.Pytester, private_range: MakeRange) -> None:
    """A set or a range of the caller's own wins over the configured range; exclusions too."""
    inside = private_range(2)
    chosen = private_range(3)
    a, b, c = chosen.ports
    pytester.makepyfile(
        f"""
        import port_for
        import pytest
        from port_for import PortForException

        def test_restricted():
            assert port_for.select_random({{{a}, {b}}}, exclude_ports=[{a}]) == {b}
            assert port_for.get_port(({a}, {c})) in ({a}, {c})  # {b} is leased now
            with pytest.raises(PortForException):
                port_for.get_port([{{{b}}}])
            with pytest.raises(PortForException):
                port_for.select_random({{{a}}}, exclude_ports=[{a}])

        def test_excluded():
            first = port_for.get_port(None, exclude_ports=[{inside.ports[0]}])
            assert first == {inside.ports[1]}
        """
    )
    result = run_inline(pytester, "-p", "no:xdist", "--ephemeral-timeout=0", *inside.args)
    result.assert_outcomes(passed=2)


def test_originals_are_restored_after_the_session(
    pytester: pytest.Pytester, private_range: MakeRange
) -> None:
    """In one process: patched during ``pytest.main``, the originals again afterwards (modules
    that copied the function with ``from ... import`` included)."""
    private = private_range(2)
    pytester.makepyfile(
        test_inner="""
        import aiohttp.test_utils
        import port_for
        import port_for.api
        from pytest_redis.factories import proc

        def test_patched():
            assert port_for.select_random.__module__ == "pytest_ephemeral._adopt"
            assert port_for.api.select_random is port_for.select_random
            assert aiohttp.test_utils.unused_port.__module__ == "pytest_ephemeral._adopt"
            assert proc.get_port(None) in PORTS  # pytest-redis's own name for get_port
        """.replace("PORTS", repr(private.ports))
    )
    script = textwrap.dedent(
        f"""
        import sys
        import aiohttp.test_utils, port_for, port_for.api, portpicker, pytest
        before = (port_for.select_random, port_for.api.select_random,
                  portpicker.pick_unused_port, portpicker.return_port,
                  aiohttp.test_utils.unused_port)
        code = pytest.main(["-p", "no:xdist", "-p", "no:cacheprovider", *{private.args!r}])
        after = (port_for.select_random, port_for.api.select_random,
                 portpicker.pick_unused_port, portpicker.return_port,
                 aiohttp.test_utils.unused_port)
        assert code == 0, code
        assert after == before, (before, after)
        assert not any(finder.__module__.startswith("pytest_ephemeral") for finder in sys.meta_path)
        print("RESTORED")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "RESTORED" in done.stdout


def test_a_session_inside_another_in_one_process_leases_through_its_own_patch(
    pytester: pytest.Pytester, private_range: MakeRange
) -> None:
    """pytester's in-process runs nest one session in another: both wait for portpicker to be
    imported (in a fresh process nothing has imported it yet), and the inner session's patch is
    the one in force while it runs."""
    private = private_range(1)
    pytester.makepyfile(
        test_outer=f'''
        pytest_plugins = ["pytester"]

        def test_inner_session(pytester):
            pytester.makepyfile(
                test_inner="""
                def test_leased():
                    import portpicker
                    assert portpicker.pick_unused_port() == {private.ports[0]}
                """
            )
            result = pytester.runpytest("-p", "no:xdist", *{private.args!r})
            result.assert_outcomes(passed=1)
        '''
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist")  # fresh: portpicker not imported
    result.assert_outcomes(passed=1)


# --- threads: pytest-run-parallel -------------------------------------------------------------


def test_run_parallel_one_port_fixtures_run_in_one_thread(pytester: pytest.Pytester) -> None:
    """Each of these tests binds its one port: in four threads three would get EADDRINUSE."""
    pytester.makepyfile(
        """
        import socket

        def listen(port):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port))
                sock.listen()

        def test_free_port(free_port):
            listen(free_port)

        def test_free_socket(free_socket):
            free_socket.listen()
            free_socket.close()

        def test_asyncio(unused_tcp_port):
            listen(unused_tcp_port)

        def test_anyio(free_tcp_port):
            listen(free_tcp_port)
        """
    )
    result = run_inline(pytester, "-p", "no:xdist", "--parallel-threads=4", "-v")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(
        ["*::test_free_port was not run in parallel: uses thread-unsafe fixture(s): {'free_port'}"]
    )


def test_run_parallel_keeps_the_projects_own_thread_unsafe_fixtures(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\nthread_unsafe_fixtures =\n    my_fixture\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def my_fixture():
            return 1

        def test_mine(my_fixture):
            pass

        def test_port(free_port):
            pass
        """
    )
    result = run_inline(pytester, "-p", "no:xdist", "--parallel-threads=4", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines_random(
        [
            "*::test_mine was not run in parallel: uses thread-unsafe fixture(s): {'my_fixture'}",
            "*::test_port was not run in parallel: uses thread-unsafe fixture(s): {'free_port'}",
        ]
    )
    without = run_inline(pytester, "-p", "no:xdist", "-p", "no:run-parallel")
    without.assert_outcomes(passed=2)  # no setting to add to: nothing to do


def test_run_parallel_factory_methods_are_safe_from_many_threads(
    pytester: pytest.Pytester,
) -> None:
    """The test body runs in eight threads at once, each leasing through the shared factories."""
    pytester.makepyfile(
        """
        import threading

        LEASED = []
        GUARD = threading.Lock()

        def test_lease(port_factory, unused_tcp_port_factory, free_udp_port_factory):
            mine = [port_factory() for _ in range(5)]
            mine += [unused_tcp_port_factory() for _ in range(5)]
            mine += [free_udp_port_factory() for _ in range(5)]
            with GUARD:
                LEASED.extend(mine)

        def test_all_distinct():
            assert len(LEASED) == 8 * 15
            assert len(set(LEASED)) == len(LEASED)
        """
    )
    result = run_inline(pytester, "-p", "no:xdist", "-p", "no:randomly", "--parallel-threads=8")
    result.assert_outcomes(passed=2)
