"""The settings' sources of a caller outside pytest (``run``, ``status``, ``range``,
``lease_port()`` outside a session), in precedence order: its own options or arguments, then the
``--ephemeral-*`` and ``-o ephemeral_*`` options of the project's ``addopts`` and of
``PYTEST_ADDOPTS``, then the environment, then the config file. Read with ``_sources``' readers;
a module apart because a pytest run, which loads those, never needs this part.

The config file is found as pytest 9 finds it. From the start directory up to the file system
root, each directory is looked at for, in order, ``pytest.toml``, ``.pytest.toml``, ``pytest.ini``,
``.pytest.ini``, ``pyproject.toml``, ``tox.ini`` and ``setup.cfg``; the first that holds pytest
configuration wins (the ``pytest.*`` files always do, even empty; ``pyproject.toml`` with a
``[tool.pytest]`` or ``[tool.pytest.ini_options]`` table; ``tox.ini`` with ``[pytest]``;
``setup.cfg`` with ``[tool:pytest]``). If none does, the first ``pyproject.toml`` met on the way is
the config file, with nothing in it for pytest. ``-c FILE`` names the file instead.

This lets ``run``, ``status``, ``range`` and ``lease_port()`` use what a pytest run would,
without pytest.
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from ._errors import ConfigError
from ._settings import ROWS, Layer, Raw
from ._sources import (
    Section,
    blank,
    config_file_layer,
    env_layer,
    override_layer,
    read_pytest_section,
)

#: The files pytest looks for in each directory, in the order it prefers them.
CONFIG_NAMES = (
    "pytest.toml",
    ".pytest.toml",
    "pytest.ini",
    ".pytest.ini",
    "pyproject.toml",
    "tox.ini",
    "setup.cfg",
)


def find_config_file(start: Path) -> Path | None:
    """The config file a pytest run started in ``start`` (with no path arguments) would read."""
    first_pyproject = None
    for directory in (start, *start.parents):
        for name in CONFIG_NAMES:
            path = directory / name
            if not path.is_file():
                continue
            if name == "pyproject.toml" and first_pyproject is None:
                first_pyproject = path
            if read_pytest_section(path) is not None:
                return path
    return first_pyproject


def project_config(start: Path, config_file: Path | None = None) -> tuple[Path | None, Section]:
    """The config file a pytest run started in ``start`` would read (``config_file`` if given,
    like pytest's ``-c``) and its pytest settings."""
    if config_file is None:
        path = find_config_file(start)
    else:
        path = Path(os.path.abspath(config_file))
        if not path.exists():
            raise ConfigError(f"config file {path} not found (-c)")
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory (-c)")
        if not path.is_file():  # pytest reads /dev/null and the like as an empty config
            return path, {}
    section = read_pytest_section(path) if path is not None else None
    return path, section or {}


def addopts_layer(
    section: Section | None, path: Path | None, pytest_addopts: str
) -> tuple[Layer, set[str]]:
    """The ``--ephemeral-*`` and ``-o ephemeral_*`` options a pytest run here would be given by
    the config file's ``addopts`` and by ``PYTEST_ADDOPTS``, the plugin's way: a later option
    beats an earlier one of its kind, and an ``--ephemeral-*`` option beats ``-o``. Also the
    names an empty ``-o ephemeral_X=`` clears from the config file."""
    sources: list[tuple[list[str], str]] = []
    addopts = (section or {}).get("addopts")
    if isinstance(addopts, str):
        addopts = _split(addopts, f"addopts in config file {path}")
    if isinstance(addopts, list):
        sources.append(([str(arg) for arg in addopts], f"addopts in config file {path}"))
    where = "environment variable PYTEST_ADDOPTS"
    sources.append((_split(pytest_addopts, where), where))
    overrides: dict[str, Raw] = {}
    options: dict[str, Raw] = {}
    for args, where in sources:
        rest = iter(args)
        for arg in rest:
            option, equals, value = arg.partition("=")
            if option.startswith("--ephemeral-"):
                name = option.removeprefix("--ephemeral-").replace("-", "_")
                if name in ROWS:
                    value = value if equals else next(rest, "")
                    options[name] = Raw(value, f"command-line option {option} in {where}")
                continue
            if option in ("-o", "--override-ini"):
                override = value if equals else next(rest, "")
            elif arg.startswith("-o"):  # -oKEY=VALUE
                override = arg[2:]
            else:
                continue
            for name, raw in override_layer([override], keep_empty=True).items():
                overrides[name] = Raw(raw.value, f"{raw.origin} in {where}")
    cleared = {name for name, raw in overrides.items() if blank(raw.value)}
    given = {name: raw for name, raw in overrides.items() if name not in cleared}
    return {**given, **options}, cleared


def _split(args: str, where: str) -> list[str]:
    try:
        return shlex.split(args)
    except ValueError as error:
        raise ConfigError(f"cannot split {args!r} from {where} into arguments: {error}") from None


def add_options(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """The options ``--<name>`` of the settings ``names``, from the table."""
    for name in names:
        row = ROWS[name]
        parser.add_argument(
            row.cli_option, dest=name, metavar=row.metavar, help=f"{row.help} (${row.env})"
        )


def options_layer(args: argparse.Namespace, names: Sequence[str]) -> Layer:
    """The settings given by the options of ``add_options``."""
    return {
        name: Raw(value, f"option {ROWS[name].cli_option}")
        for name in names
        if (value := getattr(args, name, None)) is not None
    }


def project_layers(
    first: Layer, start: Path, config_file: Path | None, environ: Mapping[str, str]
) -> tuple[Path | None, tuple[Layer, ...]]:
    """The config file a pytest run started in ``start`` would read (``config_file`` if given,
    as ``-c``), and the layers of a caller outside pytest: ``first`` (its own options or
    arguments), the project's ``addopts`` and ``PYTEST_ADDOPTS``, the environment, the file."""
    path, section = project_config(start, config_file)
    options, cleared = addopts_layer(section, path, environ.get("PYTEST_ADDOPTS", ""))
    in_file = config_file_layer(path, section).items()
    file_layer = {name: raw for name, raw in in_file if name not in cleared}
    return path, (first, options, env_layer(environ), file_layer)
