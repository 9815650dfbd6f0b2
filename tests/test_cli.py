"""The ``pytest-ephemeral`` command: it reads the settings a pytest run in the project would use.

Every test runs the real command in a subprocess, in a project directory of its own, with none of
this suite's ``PYTEST_EPHEMERAL_*`` variables unless it sets them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

import pytest_ephemeral
from pytest_ephemeral._portmap import Row, draw

from .conftest import MakeRange
from .harness import PrivateRange


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_EPHEMERAL_")}
    environ.pop("NO_COLOR", None)
    command = [sys.executable, "-m", "pytest_ephemeral", *args]
    done = subprocess.run(
        command, cwd=cwd, env={**environ, **(env or {})}, capture_output=True, text=True, timeout=60
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def range_json(cwd: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    figures: dict[str, Any] = json.loads(cli("range", "--json", *args, cwd=cwd, env=env).stdout)
    return figures


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project directory with a subdirectory ``tests`` to run the command from."""
    (tmp_path / "proj" / "tests").mkdir(parents=True)
    return tmp_path / "proj"


EXCLUDE = "61000-61009"
FORMATS = {
    "pytest.toml": f'[pytest]\nephemeral_exclude = "{EXCLUDE}"\n',
    ".pytest.toml": f'[pytest]\nephemeral_exclude = "{EXCLUDE}"\n',
    "pytest.ini": f"[pytest]\nephemeral_exclude = {EXCLUDE}\n",
    ".pytest.ini": f"[pytest]\nephemeral_exclude = {EXCLUDE}\n",
    "pyproject.toml": f'[tool.pytest.ini_options]\nephemeral_exclude = "{EXCLUDE}"\n',
    "tox.ini": f"[tox]\nenvlist = py\n\n[pytest]\n; a comment\nephemeral_exclude =\n  {EXCLUDE}\n",
    "setup.cfg": f"[metadata]\nname = x\n\n[tool:pytest]\nephemeral_exclude: {EXCLUDE}\n",
}


@pytest.mark.parametrize("name", FORMATS)
def test_range_reads_every_config_file_format_walking_up(project: Path, name: str) -> None:
    (project / name).write_text(FORMATS[name])
    figures = range_json(project / "tests")
    assert figures["config_file"] == str(project / name)
    assert figures["excluded"] == EXCLUDE
    assert figures["sources"]["exclude"] == {
        "value": EXCLUDE,
        "origin": f"ephemeral_exclude in config file {project / name}",
    }
    assert figures["range"].startswith("61010-")


def test_native_toml_table(project: Path) -> None:
    (project / "pyproject.toml").write_text(
        '[tool.pytest]\nephemeral_exclude = "61000-61009"\nephemeral_timeout = 3\n'
    )
    sources = range_json(project)["sources"]
    assert sources["timeout"]["value"] == 3.0
    assert sources["timeout"]["origin"].startswith("ephemeral_timeout in config file")


def test_pytests_order_of_files_in_a_directory(project: Path) -> None:
    (project / "tox.ini").write_text("[tox]\nenvlist = py\n")  # no [pytest]: not a config file
    (project / "setup.cfg").write_text("[tool:pytest]\nephemeral_exclude = 61000\n")
    assert range_json(project)["config_file"] == str(project / "setup.cfg")
    (project / "pyproject.toml").write_text(
        "[tool.pytest.ini_options]\nephemeral_exclude = 61001\n"
    )
    assert range_json(project)["excluded"] == "61001"
    (project / "pytest.ini").write_text("")  # a pytest.ini counts even empty
    figures = range_json(project)
    assert (figures["config_file"], figures["excluded"]) == (str(project / "pytest.ini"), "none")


def test_a_pyproject_without_pytest_settings_is_used_only_if_nothing_else_is_found(
    project: Path,
) -> None:
    (project / "tests" / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert range_json(project / "tests")["config_file"] == str(project / "tests/pyproject.toml")
    (project / "tox.ini").write_text("[pytest]\nephemeral_exclude = 61000\n")
    figures = range_json(project / "tests")
    assert (figures["config_file"], figures["excluded"]) == (str(project / "tox.ini"), "61000")


def test_c_and_rootdir_point_elsewhere(project: Path, tmp_path: Path) -> None:
    (project / "pytest.ini").write_text("[pytest]\nephemeral_exclude = 61000\n")
    other = tmp_path / "other.toml"
    other.write_text("[pytest]\nephemeral_exclude = 61001\n")
    assert range_json(tmp_path, "--rootdir", str(project / "tests"))["excluded"] == "61000"
    assert range_json(project, "-c", str(other))["excluded"] == "61001"
    assert range_json(project, "-c", os.devnull)["excluded"] == "none"


def test_environment_beats_the_config_file_and_sources_say_so(project: Path) -> None:
    (project / "pytest.ini").write_text("[pytest]\nephemeral_port_range = 61000-61099\n")
    assert range_json(project)["sources"]["port_range"] == {
        "value": "61000-61099",
        "origin": f"ephemeral_port_range in config file {project / 'pytest.ini'}",
    }
    figures = range_json(project, env={"PYTEST_EPHEMERAL_PORT_RANGE": "61100-61199"})
    assert figures["sources"]["port_range"] == {
        "value": "61100-61199",
        "origin": "environment variable PYTEST_EPHEMERAL_PORT_RANGE",
    }
    text = cli("range", cwd=project).stdout.splitlines()
    assert text[0].startswith("ports a pytest run here leases: 61000-61099 (100 ports; set by")
    assert any(line.split()[:2] == ["port_range", "61000-61099"] for line in text)


def test_options_in_addopts_and_pytest_addopts_count_as_pytest_counts_them(project: Path) -> None:
    config = project / "pyproject.toml"
    config.write_text(
        "[tool.pytest.ini_options]\n"
        'addopts = "-ra --ephemeral-timeout 4 -o ephemeral_port_range=61000-61099"\n'
        'ephemeral_timeout = "2"\n'
    )
    sources = range_json(project)["sources"]
    assert sources["timeout"] == {
        "value": 4.0,
        "origin": f"command-line option --ephemeral-timeout in addopts in config file {config}",
    }
    assert sources["port_range"]["origin"] == (
        f"command-line option -o ephemeral_port_range in addopts in config file {config}"
    )
    env = {"PYTEST_ADDOPTS": "-oephemeral_port_range=61100-61199 --ephemeral-host=localhost"}
    sources = range_json(project, env={**env, "PYTEST_EPHEMERAL_PORT_RANGE": "61200-61299"})[
        "sources"
    ]
    assert sources["port_range"] == {
        "value": "61100-61199",
        "origin": "command-line option -o ephemeral_port_range in environment variable"
        " PYTEST_ADDOPTS",
    }
    assert sources["host"]["value"] == "127.0.0.1"


def test_an_empty_o_in_addopts_clears_the_config_file_value(project: Path) -> None:
    (project / "pytest.ini").write_text(
        "[pytest]\naddopts = -o ephemeral_exclude=\nephemeral_exclude = 61000\n"
    )
    assert range_json(project)["sources"]["exclude"] == {"value": "none", "origin": "default"}


@pytest.mark.parametrize(
    ("text", "env"),
    [
        ("[pytest]\nephemeral_port_range = 61000-61099\nephemeral_exclude = 61005\n", {}),
        (
            "[pytest]\naddopts = -o ephemeral_port_range=61000-61099\n",
            {"PYTEST_EPHEMERAL_PORT_RANGE": "61100-61199"},
        ),
        (
            "[pytest]\naddopts = --ephemeral-port-range=61000-61099\n",
            {"PYTEST_ADDOPTS": "-o ephemeral_port_range=61100-61199"},
        ),
        (
            "[pytest]\naddopts = -o ephemeral_port_range=\nephemeral_port_range = 61000-61099\n",
            {},
        ),
    ],
)
def test_range_says_what_pytest_itself_uses(project: Path, text: str, env: dict[str, str]) -> None:
    (project / "tox.ini").write_text(text)
    (project / "tests" / "test_nothing.py").write_text("def test_nothing(): pass\n")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_EPHEMERAL_")}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider"],
        cwd=project / "tests",
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    header = next(line for line in run.stdout.splitlines() if line.startswith("ephemeral ports"))
    first = cli("range", cwd=project / "tests", env=env).stdout.splitlines()[0]
    in_force = first.removeprefix("ports a pytest run here leases: ").split(" (")[0]
    assert header.startswith(f"ephemeral ports: {in_force} (")


@pytest.mark.parametrize(
    ("files", "args", "env", "expected"),
    [
        (
            {"pytest.ini": "[pytest]\nephemeral_port_range = 0-70000\n"},
            [],
            {},
            "bad value '0-70000' from ephemeral_port_range in config file {project}/pytest.ini:"
            " port 0 is outside 1-65535 (expected LOW-HIGH or auto)",
        ),
        (
            {},
            [],
            {"PYTEST_EPHEMERAL_TIMEOUT": "soon"},
            "bad value 'soon' from environment variable PYTEST_EPHEMERAL_TIMEOUT:"
            " not a number of seconds",
        ),
        (
            {"pyproject.toml": "[tool.pytest\n"},
            [],
            {},
            "cannot parse config file {project}/pyproject.toml: *",
        ),
        (
            {"setup.cfg": "[pytest]\nephemeral_exclude = 1\n"},
            [],
            {},
            "{project}/setup.cfg: use [tool:pytest], not [pytest], in a .cfg file",
        ),
        (
            {"pytest.toml": 'ephemeral_exclude = "1"\n'},
            [],
            {},
            "{project}/pytest.toml: put pytest settings under [pytest], not 'ephemeral_exclude'",
        ),
        ({}, ["-c", "missing.ini"], {}, "config file {project}/missing.ini not found (-c)"),
        ({}, ["--rootdir", "missing"], {}, "directory {project}/missing not found (--rootdir)"),
    ],
)
@pytest.mark.parametrize("command", ["status", "range"])
def test_a_bad_value_is_one_line_naming_it_and_its_source_exit_2(
    project: Path,
    command: str,
    files: dict[str, str],
    args: list[str],
    env: dict[str, str],
    expected: str,
) -> None:
    for name, text in files.items():
        (project / name).write_text(text)
    done = cli(command, *args, cwd=project, env=env, check=False)
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    pattern = "pytest-ephemeral: error: " + expected.format(project=project)
    assert line == pattern or (pattern.endswith("*") and line.startswith(pattern[:-1]))


def test_a_lock_dir_that_does_not_exist_is_said_so_and_not_created(project: Path) -> None:
    (project / "pytest.ini").write_text("[pytest]\nephemeral_lock_dir = .locks\n")
    done = cli("status", cwd=project / "tests", check=False)
    assert done.returncode == 1
    assert done.stderr == (
        f"pytest-ephemeral: lock dir {project / '.locks'} (from ephemeral_lock_dir in config"
        f" file {project / 'pytest.ini'}) does not exist: no pytest run has leased a port with it\n"
    )
    assert range_json(project)["sources"]["lock_dir"]["value"] == str(project / ".locks")
    assert not (project / ".locks").exists()


HOLDING_TEST = """
import os


def test_holding(port_factory):
    (port,) = port_factory.block(1)
    print(f"HOLDING {port}", flush=True)
    assert os.read(0, 1) == b"x"  # hold the port until the outer test writes to stdin
"""


@contextmanager
def holding_run(project: Path, private: PrivateRange) -> Iterator[int]:
    """A pytest run in ``project`` (with its own config file) holding one port until the end."""
    (project / "test_holding.py").write_text(HOLDING_TEST)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_EPHEMERAL_")}
    command = [
        *(sys.executable, "-m", "pytest", "-s", "-p", "no:xdist", "-p", "no:cacheprovider"),
        *(f"--ephemeral-port-range={private.spec}", "test_holding.py"),
    ]
    with subprocess.Popen(
        command,
        cwd=project,
        env=environ,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as run:
        assert run.stdin is not None
        assert run.stdout is not None
        try:
            output = []
            for line in run.stdout:  # ends if the run ends early: then the assert below says why
                output.append(line)
                if "HOLDING " in line:
                    break
            assert "HOLDING " in output[-1], "".join(output)
            yield int(output[-1].split("HOLDING ")[1])
        finally:
            run.stdin.write("x")
            run.stdin.close()
            rest = run.stdout.read()
            run.wait(timeout=120)
        assert run.returncode == 0, "".join(output) + rest


def test_status_and_range_show_a_lease_of_a_run_with_a_config_file_lock_dir(
    project: Path, private_range: MakeRange
) -> None:
    """The issue's case: ``ephemeral_lock_dir = ".locks"`` in pyproject.toml, a test holding."""
    (project / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\nephemeral_lock_dir = ".locks"\n'
    )
    private = private_range(1)
    with holding_run(project, private) as port:
        lines = cli("status", cwd=project / "tests").stdout.splitlines()
        figures = range_json(project / "tests")
        text = cli("range", cwd=project / "tests").stdout.splitlines()
    assert lines[1].split()[0] == str(port)
    assert lines[1].split()[-1] == "test_holding.py::test_holding"
    assert lines[-1] == (
        f"1 live lease in {project / '.locks'} (lock dir from ephemeral_lock_dir in config file"
        f" {project / 'pyproject.toml'})"
    )
    assert figures["leased"] == [port]
    leased = next(line for line in text if line.startswith("leased now"))
    assert leased.endswith(f"1 port: {port} (in {project / '.locks'})")
    assert leased.count("#") == 1
    assert cli("status", cwd=project).stdout.splitlines()[-1].startswith("0 live leases")


def test_range_map_in_plain_text(project: Path) -> None:
    (project / "pytest.ini").write_text("[pytest]\nephemeral_exclude = 65535\n")
    lines = cli("range", cwd=project).stdout.splitlines()
    assert "\033" not in "".join(lines)
    rows = {line.split("  ")[0]: line for line in lines if "  " in line and line[0] != " "}
    for label in ("IANA dynamic", "OS auto-assign", "reserved", "excluded", "auto range"):
        assert label in rows
    axis = next(line for line in lines if line.strip().endswith("65535") and line[0] == " ")
    bar_start = axis.index(axis.strip())
    excluded_bar = rows["excluded"][bar_start : bar_start + 64]
    assert excluded_bar == "." * 63 + "#"  # 65535 is in the last column only
    assert any(line.startswith("#: some ports of the line's set, .: none;") for line in lines)


def test_draw_puts_each_port_in_its_column() -> None:
    rows = [Row("a", ((0, 0), (65535, 65535)), "ends"), Row("b", (), "none")]
    lines = draw(rows, 0)
    assert lines[1] == "a  #" + "." * 62 + "#  ends"
    assert lines[2] == "b  " + "." * 64 + "  none"
    assert lines[-1].endswith("one column is 1024 ports, 0 to 65535")


def run_in_a_terminal(*args: str, env: dict[str, str]) -> str:
    """The command's output when its stdout is a real terminal (a pseudo-terminal)."""
    import pty  # POSIX only

    controller, terminal = pty.openpty()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_EPHEMERAL_")}
    environ.pop("NO_COLOR", None)
    command = [sys.executable, "-m", "pytest_ephemeral", *args]
    with subprocess.Popen(command, stdout=terminal, env={**environ, **env}) as process:
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
    os.close(controller)
    assert process.returncode == 0
    return b"".join(chunks).decode()


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_range_uses_colour_on_a_terminal_unless_no_color(tmp_path: Path) -> None:
    utf8 = {"PYTHONIOENCODING": "utf-8"}
    assert "\033[" in run_in_a_terminal("range", "-c", os.devnull, env=utf8)
    plain = run_in_a_terminal("range", "-c", os.devnull, env={**utf8, "NO_COLOR": "1"})
    assert "\033" not in plain
    assert "#: some ports" in plain


@pytest.mark.parametrize("command", ["range", "status"])
def test_a_closed_pipe_ends_the_command_quietly(project: Path, command: str) -> None:
    """``| head`` that has already stopped reading: no 'Broken pipe' and no traceback."""
    (project / "locks").mkdir(mode=0o700)
    env = {"PYTEST_EPHEMERAL_LOCK_DIR": str(project / "locks")}
    reader, writer = os.pipe()
    os.close(reader)  # every write to the pipe now fails with EPIPE
    try:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_EPHEMERAL_")}
        done = subprocess.run(
            [sys.executable, "-m", "pytest_ephemeral", command],
            stdout=writer,
            stderr=subprocess.PIPE,
            env={**environ, **env},
            cwd=project,
            text=True,
            timeout=60,
        )
    finally:
        os.close(writer)
    assert done.stderr == ""
    assert done.returncode == 1


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX shell and head")
def test_head_of_the_output(project: Path) -> None:
    command = f"{sys.executable} -m pytest_ephemeral range | head -1"
    done = subprocess.run(
        ["sh", "-c", command], cwd=project, capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stderr == ""
    assert done.stdout.startswith("ports a pytest run here leases: ")


def test_version(project: Path) -> None:
    installed = version("pytest-ephemeral")
    assert cli("--version", cwd=project).stdout == f"pytest-ephemeral {installed}\n"
    assert pytest_ephemeral.__version__ == installed
    assert "__version__" not in pytest_ephemeral.__all__


# --- The command itself: what /proc says, help, usage errors, the installed script -------------


def test_range_reports_what_proc_says() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    command = [sys.executable, "-m", "pytest_ephemeral", "range", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    figures = json.loads(done.stdout)
    assert figures["auto_assign"] == f"{low}-{high}"
    assert figures["source"] == "/proc/sys/net/ipv4/ip_local_port_range"
    assert figures["dynamic"] == "49152-65535"
    text = subprocess.run(command[:-1], capture_output=True, text=True, timeout=60, check=True)
    auto_assign = next(line for line in text.stdout.splitlines() if "OS auto-assign" in line)
    assert auto_assign.endswith(f"  {low}-{high} (/proc/sys/net/ipv4/ip_local_port_range)")
    auto = next(line for line in text.stdout.splitlines() if line.startswith("auto range "))
    assert auto.endswith(f"  {figures['range']} ({figures['size']} ports)")


@pytest.mark.parametrize("args", [["status", "--help"], ["range", "--help"], ["--help"]])
def test_help(args: list[str]) -> None:
    command = [sys.executable, "-m", "pytest_ephemeral", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.startswith("usage: pytest-ephemeral")


@pytest.mark.parametrize("args", [["status", "--bogus"], ["fly"], []])
def test_bad_arguments_exit_2(args: list[str]) -> None:
    command = [sys.executable, "-m", "pytest_ephemeral", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith("pytest-ephemeral: error: ")


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("pytest-ephemeral")
    done = subprocess.run(
        [str(script), "range", "--json"], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout)["dynamic"] == "49152-65535"


@pytest.mark.parametrize("command", ["status", "range"])
def test_an_empty_lock_dir_option_is_refused_naming_it(project: Path, command: str) -> None:
    done = cli(command, "--lock-dir", "", cwd=project, check=False)
    assert done.returncode == 2
    assert done.stderr == (
        "pytest-ephemeral: error: bad value '' from option --lock-dir: empty"
        " (leave it out for the default)\n"
    )


def test_range_takes_the_lease_settings_as_options(project: Path) -> None:
    (project / "pytest.ini").write_text("[pytest]\nephemeral_timeout = 9\n")
    sources = range_json(project, "--timeout", "3", "--exclude", "61000")["sources"]
    assert sources["timeout"] == {"value": 3.0, "origin": "option --timeout"}
    assert sources["exclude"] == {"value": "61000", "origin": "option --exclude"}
    assert sources["audit"] == {"value": "no", "origin": "default"}
