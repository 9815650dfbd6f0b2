"""Settings: precedence, every config file format, and a clear usage error for every bad value."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from .conftest import MakeRange

ENV_RANGE = "PYTEST_EPHEMERAL_PORT_RANGE"
#: pytest 9.0 added the native ``[tool.pytest]`` table; pytest 8.4, the declared floor, ignores it.
NEEDS_NATIVE_TOML = pytest.mark.skipif(
    pytest.version_tuple < (9,), reason="pytest < 9 has no native [tool.pytest] table"
)


#: Windows has no group and other permission bits (chmod sets only read-only) and creating a
#: symbolic link there needs a privilege or developer mode.
POSIX_MODES = pytest.mark.skipif(sys.platform == "win32", reason="no POSIX mode bits on Windows")


def header(result: pytest.RunResult) -> str:
    return next(line for line in result.outlines if line.startswith("ephemeral ports: "))


@pytest.fixture
def run(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile("def test_nothing(): pass")
    return pytester


@pytest.mark.parametrize(
    ("args", "env", "ini", "expected"),
    [
        (
            ["--ephemeral-port-range=abc"],
            {},
            "",
            "'abc' from command-line option --ephemeral-port-range",
        ),
        (
            [],
            {ENV_RANGE: "62000-61000"},
            "",
            f"'62000-61000' from environment variable {ENV_RANGE}",
        ),
        (
            [],
            {},
            "ephemeral_port_range = 0-70000",
            "'0-70000' from ephemeral_port_range in config file",
        ),
        (["--ephemeral-port-range=61000-99999"], {}, "", "port 99999 is outside 1-65535"),
        (
            ["--ephemeral-exclude=61000-x"],
            {},
            "",
            "'61000-x' from command-line option --ephemeral-exclude",
        ),
        (
            ["--ephemeral-port-range=61000-61001"],
            {"PYTEST_EPHEMERAL_EXCLUDE": "61000, 61001"},
            "",
            "no port left to lease: 61000-61001 from command-line option --ephemeral-port-range"
            " minus the exclusions (61000-61001 from environment variable"
            " PYTEST_EPHEMERAL_EXCLUDE) is empty",
        ),
        ([], {}, "ephemeral_exclude = 1-65535", "no port left to lease: the auto range"),
        (["--ephemeral-host=192.0.2.7"], {}, "", "not a local address of this machine"),
        (
            [],
            {"PYTEST_EPHEMERAL_HOST": "example.org"},
            "",
            "'example.org' from environment variable",
        ),
        (["--ephemeral-timeout=-1"], {}, "", "'-1' from command-line option --ephemeral-timeout"),
        (["--ephemeral-timeout=inf"], {}, "", "the timeout must be a finite number >= 0"),
        ([], {"PYTEST_EPHEMERAL_TIMEOUT": "soon"}, "", "'soon' from environment variable"),
        (
            [],
            {},
            "ephemeral_timeout = soon",
            "bad value 'soon' from ephemeral_timeout in config file *tox.ini: not a number of*",
        ),
    ],
)
def test_bad_value_is_a_usage_error_naming_its_source(
    run: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    ini: str,
    expected: str,
) -> None:
    monkeypatch.delenv(ENV_RANGE)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if ini:
        run.makefile(".ini", tox=f"[pytest]\n{ini}\n")
    result = run.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: *{expected}*"])


def test_precedence_command_line_then_environment_then_config_file(
    run: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    run.makefile(".ini", pytest="[pytest]\nephemeral_port_range = 61000-61099\n")
    monkeypatch.delenv(ENV_RANGE)
    assert "61000-61099 (100 ports; set by ephemeral_port_range in config file" in header(
        run.runpytest()
    )
    monkeypatch.setenv(ENV_RANGE, "61100-61199")
    assert "61100-61199 (100 ports; set by environment variable" in header(run.runpytest())
    result = run.runpytest("--ephemeral-port-range=61200-61299")
    assert "61200-61299 (100 ports; set by command-line option" in header(result)


def test_o_and_options_beat_the_environment_which_beats_the_config_file(
    run: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    run.makefile(".ini", pytest="[pytest]\nephemeral_port_range = 61000-61099\n")
    monkeypatch.setenv(ENV_RANGE, "61100-61199")
    result = run.runpytest("-o", "ephemeral_port_range=61200-61299")
    assert "61200-61299 (100 ports; set by command-line option -o ephemeral_port_range)" in header(
        result
    )
    result = run.runpytest(
        "-o", "ephemeral_port_range=61200-61299", "--ephemeral-port-range=61300-61399"
    )
    assert "61300-61399 (100 ports; set by command-line option --ephemeral-port-range" in header(
        result
    )
    monkeypatch.delenv(ENV_RANGE)
    result = run.runpytest("-o", "ephemeral_port_range=61200-61299")
    assert "61200-61299 (100 ports; set by command-line option -o" in header(result)


def test_an_empty_o_clears_the_config_file_value(
    run: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    run.makefile(".ini", pytest="[pytest]\nephemeral_port_range = 61000-61099\n")
    monkeypatch.delenv(ENV_RANGE)
    assert "(100 ports; set by ephemeral_port_range in config file" in header(run.runpytest())
    assert "; auto: 49152-65535" in header(run.runpytest("-o", "ephemeral_port_range="))
    monkeypatch.setenv(ENV_RANGE, "61100-61199")
    result = run.runpytest("-o", "ephemeral_port_range=")
    assert "61100-61199 (100 ports; set by environment variable" in header(result)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "ephemeral_port_range=abc",
            "ERROR: bad value 'abc' from command-line option -o ephemeral_port_range: *",
        ),
        (
            "ephemeral_timeout=soon",
            "ERROR: bad value 'soon' from command-line option -o ephemeral_timeout:"
            " not a number of seconds",
        ),
    ],
)
@pytest.mark.parametrize("config_file", [True, False])
def test_a_bad_o_value_is_blamed_on_o(
    run: pytest.Pytester, override: str, expected: str, config_file: bool
) -> None:
    if config_file:
        run.makefile(".ini", pytest="[pytest]\nephemeral_timeout = 3\n")
    result = run.runpytest("-o", override)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])
    assert "config file" not in result.stderr.str()


@pytest.mark.parametrize(
    ("filename", "text"),
    [
        ("pytest.ini", "[pytest]\nephemeral_exclude = 61000-61009\nephemeral_timeout = 2.5\n"),
        ("tox.ini", "[pytest]\nephemeral_exclude = 61000-61009\nephemeral_timeout = 2.5\n"),
        ("setup.cfg", "[tool:pytest]\nephemeral_exclude = 61000-61009\nephemeral_timeout = 2.5\n"),
        (
            "pyproject.toml",
            '[tool.pytest.ini_options]\nephemeral_exclude = "61000-61009"\n'
            'ephemeral_timeout = "2.5"\n',
        ),
        pytest.param(
            "pyproject.toml",
            '[tool.pytest]\nephemeral_exclude = "61000-61009"\nephemeral_timeout = 2.5\n',
            marks=NEEDS_NATIVE_TOML,
        ),
    ],
    ids=["pytest.ini", "tox.ini", "setup.cfg", "ini_options", "native-toml"],
)
def test_every_config_file_format(run: pytest.Pytester, filename: str, text: str) -> None:
    (run.path / filename).write_text(text)
    result = run.runpytest()
    assert result.ret == pytest.ExitCode.OK
    assert "ephemeral ports: 61010-64999 (3990 ports; set by environment variable" in header(result)
    assert header(result).endswith(", timeout: 2.5 s")  # the timeout was read too


@NEEDS_NATIVE_TOML
def test_native_toml_takes_strings_numbers_and_lists(run: pytest.Pytester) -> None:
    (run.path / "pyproject.toml").write_text(
        '[tool.pytest]\nephemeral_timeout = "3"\nephemeral_exclude = [61005, "62000-62099"]\n'
    )
    result = run.runpytest()
    assert result.ret == pytest.ExitCode.OK
    assert "minus excluded 61005,62000-62099" in header(result)
    assert header(result).endswith(", timeout: 3 s")


@pytest.mark.parametrize(
    "where",
    ["--ephemeral-timeout=soon", "-o", "env", "ini"],
    ids=["option", "-o", "environment", "config-file"],
)
def test_a_bad_timeout_reads_the_same_from_every_source(
    run: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    args = [where] if where.startswith("--") else []
    if where == "-o":
        args = ["-o", "ephemeral_timeout=soon"]
    elif where == "env":
        monkeypatch.setenv("PYTEST_EPHEMERAL_TIMEOUT", "soon")
    elif where == "ini":
        run.makefile(".ini", pytest="[pytest]\nephemeral_timeout = soon\n")
    result = run.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: bad value 'soon' from *: not a number of seconds"])


@pytest.mark.parametrize(
    "spec",
    ["\uff12\uff11\uff10\uff10\uff10-\uff12\uff11\uff10\uff11\uff10", "61\u0660\u0660\u0660-61010"],
)
def test_ranges_take_ascii_digits_only(run: pytest.Pytester, spec: str) -> None:
    result = run.runpytest(f"--ephemeral-port-range={spec}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: bad value * is not LOW-HIGH*"])


# --- The lock directory ---------------------------------------------------------------------


@POSIX_MODES
def test_explicit_shared_lock_dir_keeps_its_permissions(
    run: pytest.Pytester, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # writable by all, with the sticky bit: nobody deletes our files
    run.makepyfile("def test_lease(free_port): pass")
    result = run.runpytest(f"--ephemeral-lock-dir={shared}")
    result.assert_outcomes(passed=1)
    assert shared.stat().st_mode & 0o7777 == 0o1777


def test_help_shows_despite_a_bad_setting(
    run: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_RANGE, "nonsense")
    result = run.runpytest("--help")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*--ephemeral-port-range=LOW-HIGH|auto*"])


def test_a_relative_lock_dir_in_a_config_file_is_relative_to_it(
    run: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTEST_EPHEMERAL_LOCK_DIR")
    run.makefile(".ini", pytest="[pytest]\nephemeral_lock_dir = .locks\n")
    (run.path / "sub").mkdir()
    monkeypatch.chdir(run.path / "sub")
    result = run.runpytest(str(run.path))
    assert f"lock dir: {run.path.resolve() / '.locks'}, timeout: 10 s" in header(result)


def test_lease_port_during_a_session_uses_its_settings(
    run: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_RANGE)
    run.makefile(".ini", pytest="[pytest]\nephemeral_port_range = 61700-61709\n")
    run.makeconftest(
        """
        from pytest_ephemeral import lease_port

        def pytest_sessionstart(session):
            with lease_port() as port:
                assert 61700 <= port <= 61709, port
        """
    )
    run.makepyfile(
        test_inside="""
        from pytest_ephemeral import lease_port

        def test_inside():
            with lease_port() as port:
                assert 61700 <= port <= 61709, port
        """
    )
    result = run.runpytest_subprocess("-p", "no:xdist", "test_inside.py")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("where", "value", "expected"),
    [
        ("option", "yes", True),
        ("option", "maybe", None),
        ("env", "1", True),
        ("env", "off", False),
        ("ini", "true", True),
    ],
)
def test_reuse_addr_takes_yes_or_no_from_every_source(
    run: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    value: str,
    expected: bool | None,
) -> None:
    args = []
    if where == "option":
        args = [f"--ephemeral-reuse-addr={value}"]
    elif where == "env":
        monkeypatch.setenv("PYTEST_EPHEMERAL_REUSE_ADDR", value)
    else:
        run.makefile(".ini", pytest=f"[pytest]\nephemeral_reuse_addr = {value}\n")
    run.makeconftest(
        """
        def pytest_report_header(config):
            from pytest_ephemeral._leases import leases_of
            return f"reuse_addr={leases_of(config).settings.reuse_addr}"
        """
    )
    result = run.runpytest(*args)
    if expected is None:
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            ["ERROR: bad value 'maybe' from command-line option --ephemeral-reuse-addr: not yes*"]
        )
    else:
        result.stdout.fnmatch_lines([f"reuse_addr={expected}"])


# --- Blank values, ~, and the session handle ---------------------------------------------------


@pytest.mark.parametrize(
    "name", ["port_range", "exclude", "host", "timeout", "reuse_addr", "audit"]
)
def test_a_blank_value_in_the_config_file_or_o_means_the_default(
    run: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.delenv(ENV_RANGE)
    run.makepyprojecttoml(f'[tool.pytest.ini_options]\nephemeral_{name} = "  "\n')
    result = run.runpytest()
    result.assert_outcomes(passed=1)
    result = run.runpytest("-o", f"ephemeral_{name}= ")
    result.assert_outcomes(passed=1)


def test_a_blank_lock_dir_or_adopt_is_the_default_from_every_source(
    run: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_ephemeral._settings import default_lock_dir

    monkeypatch.delenv("PYTEST_EPHEMERAL_LOCK_DIR")
    run.makepyprojecttoml(
        '[tool.pytest.ini_options]\nephemeral_lock_dir = "  "\nephemeral_adopt = "  "\n'
    )
    adapters = "ephemeral adapters: pytest-asyncio, anyio, portpicker, port-for, aiohttp, bind0"
    for args in ([], ["-o", "ephemeral_adopt= ", "-o", "ephemeral_lock_dir=  "]):
        result = run.runpytest(*args)
        assert f"lock dir: {default_lock_dir()}," in header(result)
        result.stdout.fnmatch_lines([adapters])
    monkeypatch.setenv("PYTEST_EPHEMERAL_LOCK_DIR", "  ")
    monkeypatch.setenv("PYTEST_EPHEMERAL_ADOPT", " ")
    result = run.runpytest()
    assert f"lock dir: {default_lock_dir()}," in header(result)
    result.stdout.fnmatch_lines([adapters])
    assert not (run.path / "  ").exists()


def test_an_empty_lock_dir_option_is_a_usage_error_naming_it(run: pytest.Pytester) -> None:
    result = run.runpytest("--ephemeral-lock-dir", "")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: bad value '' from command-line option --ephemeral-lock-dir: empty (leave it out*"]
    )


@NEEDS_NATIVE_TOML
def test_a_native_toml_boolean_is_not_a_timeout(run: pytest.Pytester) -> None:
    run.makepyprojecttoml("[tool.pytest]\nephemeral_timeout = true\n")
    result = run.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: bad value True from ephemeral_timeout*not a number*"])
    run.makepyprojecttoml("[tool.pytest]\nephemeral_timeout = 2\n")
    assert header(run.runpytest()).endswith(", timeout: 2 s")


def test_a_lock_dir_starting_with_tilde_is_in_the_home_directory(
    run: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(run.path / "home"))
    monkeypatch.setenv("PYTEST_EPHEMERAL_LOCK_DIR", "~/locks")
    home = os.path.expanduser("~")
    assert f"lock dir: {os.path.join(home, 'locks')}," in header(run.runpytest())
    monkeypatch.delenv("PYTEST_EPHEMERAL_LOCK_DIR")
    run.makeini("[pytest]\nephemeral_lock_dir = ~/other\n")
    assert f"lock dir: {os.path.join(home, 'other')}," in header(run.runpytest())
    assert not (run.path / "~").exists()


def test_the_audit_setting_is_a_yes_or_no_row(run: pytest.Pytester) -> None:
    assert header(run.runpytest("--ephemeral-audit=yes")).endswith(", audit: yes")
    result = run.runpytest("-o", "ephemeral_audit=maybe", "--strict-config")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: bad value 'maybe' from command-line option -o*not yes*"])


def test_an_inner_session_s_settings_end_with_it(
    pytester: pytest.Pytester, private_range: MakeRange
) -> None:
    from pytest_ephemeral._current import SESSION

    outer = SESSION.session
    private = private_range(2)
    pytester.makepyfile(
        f"""
        from pytest_ephemeral import lease_port

        def test_inner():
            with lease_port() as port:
                assert port in {private.ports}, port
            with lease_port(port_range="{private.ports[0]}-{private.ports[0]}") as port:
                assert port == {private.ports[0]}
        """
    )
    pytester.runpytest_inprocess(*private.args, "-p", "no:xdist").assert_outcomes(passed=1)
    assert SESSION.session is outer


def test_sessions_may_end_in_any_order() -> None:
    from pytest_ephemeral._current import SESSION, Session, close_session, open_session
    from pytest_ephemeral._sources import load

    outer = SESSION.session
    first = open_session(Session((), load()))
    second = open_session(Session((), load()))
    close_session(first)  # a pytester config that outlives a session started after it
    assert SESSION.session is second
    close_session(second)
    assert SESSION.session is outer
