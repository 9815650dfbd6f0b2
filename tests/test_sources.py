"""The sources: every caller's layers, blank values, ``~``; the table every spelling comes from."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_ephemeral import ConfigError, lease_block, lease_port
from pytest_ephemeral._project import project_layers
from pytest_ephemeral._ranges import SystemPorts
from pytest_ephemeral._run import build_parser
from pytest_ephemeral._settings import LEASE_NAMES, NAMES, TABLE, Raw, markdown_table, resolve
from pytest_ephemeral._sources import config_file_layer, env_layer, load, plugin_layers

from .conftest import HOLDER_SCRIPT, MakeRange

SYSTEM = SystemPorts(((32768, 60999),), "a test")


def test_every_spelling_comes_from_the_name() -> None:
    assert NAMES == (
        "port_range",
        "exclude",
        "lock_dir",
        "host",
        "timeout",
        "reuse_addr",
        "adopt",
        "audit",
    )
    for row in TABLE:
        assert row.option == "--ephemeral-" + row.name.replace("_", "-")
        assert row.ini == "ephemeral_" + row.name
        assert row.env == "PYTEST_EPHEMERAL_" + row.name.upper()
        assert row.help[0].isupper(), row.help
        assert not row.help.endswith("."), row.help
        assert not row.option_help().endswith(".")
    assert set(LEASE_NAMES) == set(NAMES) - {"adopt", "audit"}


def test_lease_port_and_lease_block_take_the_table_s_settings() -> None:
    port = set(inspect.signature(lease_port).parameters) - {"protocol"}
    block = set(inspect.signature(lease_block).parameters) - {"n", "protocol"}
    assert port == block == set(LEASE_NAMES)


def test_run_takes_an_option_for_each_lease_setting() -> None:
    options = {option for action in build_parser()._actions for option in action.option_strings}
    assert {row.cli_option for row in TABLE if row.name in LEASE_NAMES} <= options


def test_pytest_help_lists_every_option_and_ini_key() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for row in TABLE:
        assert f"{row.option}={row.metavar}" in done.stdout, row.name
        assert f"  {row.ini} " in done.stdout, row.name


def test_every_environment_variable_is_read() -> None:
    environ = {row.env: "x" for row in TABLE}
    assert set(env_layer(environ)) == set(NAMES)


def test_the_docs_table_has_a_row_for_each_setting() -> None:
    lines = markdown_table().splitlines()
    assert lines[0] == "| option | ini key | environment variable | default | meaning |"
    assert len(lines) == 2 + len(TABLE)
    for row, line in zip(TABLE, lines[2:], strict=True):
        assert line.startswith(f"| `{row.option}=")
        assert f"`{row.env}`" in line


def test_the_first_layer_that_has_a_value_wins_and_its_origin_is_kept() -> None:
    first = {"timeout": Raw("3", "first")}
    second = {"timeout": Raw("4", "second"), "host": Raw("localhost", "second")}
    settings = resolve([first, second], SYSTEM)
    assert (settings.timeout, settings.host) == (3.0, "127.0.0.1")
    assert settings.origin("timeout") == "first"
    assert settings.origin("host") == "second"
    assert settings.origin("lock_dir") == "default"
    assert settings.system is SYSTEM
    assert settings.adopt == {
        "pytest-asyncio",
        "anyio",
        "portpicker",
        "port-for",
        "aiohttp",
        "bind0",
    }
    assert settings.audit is False


def test_resolve_does_not_touch_sockets_verify_does() -> None:
    settings = resolve([{"host": Raw("192.0.2.7", "test")}], SYSTEM)  # TEST-NET-1: not ours
    assert settings.host == "192.0.2.7"
    with pytest.raises(ConfigError, match="not a local address of this machine"):
        load({"host": Raw("192.0.2.7", "test")})


@pytest.mark.parametrize("name", NAMES)
def test_blank_values_from_files_and_the_environment_mean_the_default(
    name: str, tmp_path: Path
) -> None:
    row = next(row for row in TABLE if row.name == name)
    assert env_layer({row.env: "  "}) == {}
    assert config_file_layer(tmp_path / "tox.ini", {row.ini: " \t"}) == {}
    layers = plugin_layers({}, [f"{row.ini}= "], {}, None)
    assert all(name not in layer for layer in layers)


def test_a_blank_value_given_to_an_option_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match="'' from option --lock-dir: empty"):
        resolve([{"lock_dir": Raw("", "option --lock-dir")}], SYSTEM)


def test_a_boolean_is_not_a_timeout() -> None:
    with pytest.raises(ConfigError, match=r"True from ephemeral_timeout.*not a number"):
        resolve([{"timeout": Raw(True, "ephemeral_timeout in config file x")}], SYSTEM)
    assert resolve([{"timeout": Raw(3, "toml")}], SYSTEM).timeout == 3.0


def test_a_lock_dir_expands_tilde_from_every_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    home = os.path.expanduser("~")
    for layer in (
        env_layer({"PYTEST_EPHEMERAL_LOCK_DIR": "~/locks"}),
        config_file_layer(tmp_path / "sub" / "tox.ini", {"ephemeral_lock_dir": "~/locks"}),
        {"lock_dir": Raw("~/locks", "argument lock_dir=")},
    ):
        assert resolve([layer], SYSTEM).lock_dir == os.path.join(home, "locks")


def test_project_layers_put_own_options_addopts_environment_and_file_in_order(
    tmp_path: Path,
) -> None:
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\naddopts = --ephemeral-timeout=2 -o ephemeral_host=::1\n"
        "ephemeral_timeout = 9\nephemeral_exclude = 61000\nephemeral_lock_dir = locks\n"
    )
    environ = {"PYTEST_ADDOPTS": "--ephemeral-timeout=3", "PYTEST_EPHEMERAL_EXCLUDE": "61001"}
    path, layers = project_layers({"timeout": Raw("4", "option")}, tmp_path, None, environ)
    assert path == tmp_path / "pytest.ini"
    first, addopts, env, in_file = layers
    assert first["timeout"].value == "4"
    assert addopts["timeout"].origin.endswith("in environment variable PYTEST_ADDOPTS")
    assert addopts["host"].value == "::1"
    assert env["exclude"].value == "61001"
    assert in_file["lock_dir"].value == str(tmp_path / "locks")  # relative to the file


# --- Defect 1: every caller reads the project's settings -------------------------------------


def test_run_in_a_project_with_addopts_lock_dir_does_not_take_a_held_port(
    private_range: MakeRange, tmp_path: Path
) -> None:
    private = private_range(1)
    command = [sys.executable, "-c", HOLDER_SCRIPT, private.spec, str(private.lock_dir)]
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text(
        f"[pytest]\naddopts = --ephemeral-lock-dir={private.lock_dir}\n"
        f"ephemeral_port_range = {private.spec}\nephemeral_timeout = 0.2\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_EPHEMERAL_")}
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().split() == [str(private.ports[0])]
            done = subprocess.run(
                [sys.executable, "-m", "pytest_ephemeral", "run", "--", "true"],
                cwd=project,
                env=environ,
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            holder.kill()
    assert done.returncode == 75, done.stderr
    assert f"no free port in {private.ports[0]} (1 port)" in done.stderr


def test_lease_port_in_a_script_uses_the_project_s_pyproject(
    private_range: MakeRange, tmp_path: Path
) -> None:
    private = private_range(1)
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        "[tool.pytest.ini_options]\n"
        f'ephemeral_port_range = "{private.spec}"\nephemeral_lock_dir = ".locks"\n'
    )
    script = (
        "import os\nfrom pytest_ephemeral import lease_port\n"
        "with lease_port() as port:\n"
        "    print(port, sorted(os.listdir(os.path.join('..', '.locks'))))\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_EPHEMERAL_")}
    environ.pop("PYTEST_ADDOPTS", None)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=project / "scripts",
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    port = private.ports[0]
    assert done.stdout.strip() == f"{port} ['{port}.lock']"
