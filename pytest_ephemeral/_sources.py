"""The sources of the settings, read into layers in precedence order: one place for every caller.

The plugin (``plugin_layers``): its command line (pytest has merged ``addopts`` and
``PYTEST_ADDOPTS`` into it already), ``-o ephemeral_*``, the environment, the config file.
``run``, ``status``, ``range`` and ``lease_port()`` outside a session (``project_layers``): their
own options or arguments, then the ``--ephemeral-*`` and ``-o ephemeral_*`` options of the
project's ``addopts`` and of ``PYTEST_ADDOPTS``, then the environment, then the config file.
A value of only blanks in the config file, the environment or ``-o`` means the default: it is
left out of its layer (and a blank ``-o`` hides the config file's value, as pytest's ``-o`` does).

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
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ._errors import ConfigError
from ._ranges import read_system_ports
from ._settings import NAMES, ROWS, Layer, Raw, Settings, resolve, verify

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

Section = Mapping[str, object]


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


def read_pytest_section(path: Path) -> Section | None:
    """The pytest settings in ``path``, None if it has no pytest section; ``ConfigError`` if it
    cannot be read. How a file is read follows its name, else its suffix (for ``-c FILE``)."""
    try:
        if path.name in ("pytest.toml", ".pytest.toml"):
            return _toml_pytest_table(path, _read_toml(path)) or {}
        if path.name in ("pytest.ini", ".pytest.ini"):
            return _read_ini(path).get("pytest", {})
        if path.name == "pyproject.toml":
            return _toml_tool_pytest(path, _read_toml(path))
        if path.name == "setup.cfg" or path.suffix == ".cfg":
            sections = _read_ini(path)
            if "pytest" in sections and "tool:pytest" not in sections:
                raise ConfigError(f"{path}: use [tool:pytest], not [pytest], in a .cfg file")
            return sections.get("tool:pytest")
        if path.suffix == ".ini":
            return _read_ini(path).get("pytest")
        if path.suffix == ".toml":
            document = _read_toml(path)
            table = _toml_tool_pytest(path, document)
            if table is not None and "pytest" in document:
                raise ConfigError(f"{path}: use either [pytest] or [tool.pytest], not both")
            return table if table is not None else _toml_pytest_table(path, document)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    raise ConfigError(f"config file {path} has an unsupported format (use .ini, .cfg or .toml)")


def config_file_layer(path: Path | None, section: Section | None) -> Layer:
    """The ``ephemeral_*`` values of a config file's pytest section.

    A relative ``ephemeral_lock_dir`` is relative to the file, as pytest's own paths there are.
    """
    if path is None or not section:
        return {}
    layer = {}
    for name in NAMES:
        value = section.get(ROWS[name].ini)
        if value is None or _blank(value):
            continue
        if name == "lock_dir" and isinstance(value, str):
            here = os.path.dirname(os.path.abspath(path))
            value = os.path.join(here, os.path.expanduser(value))
        layer[name] = Raw(value, f"{ROWS[name].ini} in config file {path}")
    return layer


def env_layer(environ: Mapping[str, str]) -> Layer:
    """The settings given by ``PYTEST_EPHEMERAL_*`` environment variables (blank ones are unset)."""
    return {
        name: Raw(environ[row.env], f"environment variable {row.env}")
        for name, row in ROWS.items()
        if not _blank(environ.get(row.env, ""))
    }


def _blank(value: object) -> bool:
    return isinstance(value, str) and not value.strip()


def override_layer(overrides: Iterable[str] | None, keep_empty: bool = False) -> Layer:
    """The ``ephemeral_*`` values of pytest's ``-o KEY=VALUE`` options (the last one wins).

    An empty value clears the config file's value; it is left out unless ``keep_empty``.
    """
    layer = {}
    for override in overrides or ():
        key, equals, value = override.partition("=")
        key = key.strip()
        name = key.removeprefix("ephemeral_")
        if equals and key.startswith("ephemeral_") and name in NAMES:
            layer[name] = Raw(value, f"command-line option -o {key}")
    return {name: raw for name, raw in layer.items() if keep_empty or not _blank(raw.value)}


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
    cleared = {name for name, raw in overrides.items() if _blank(raw.value)}
    given = {name: raw for name, raw in overrides.items() if name not in cleared}
    return {**given, **options}, cleared


def _split(args: str, where: str) -> list[str]:
    try:
        return shlex.split(args)
    except ValueError as error:
        raise ConfigError(f"cannot split {args!r} from {where} into arguments: {error}") from None


# --- Reading the formats ----------------------------------------------------------------------


def _read_toml(path: Path) -> dict[str, object]:
    if sys.version_info >= (3, 11):  # imported here: a project without TOML files never pays
        import tomllib
    else:  # pytest itself depends on tomli before 3.11
        import tomli as tomllib

    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot parse config file {path}: {error}") from None


def _toml_pytest_table(path: Path, document: dict[str, object]) -> Section | None:
    table = document.get("pytest")
    if table is None:
        stray = [key for key, value in document.items() if not isinstance(value, dict)]
        if stray:  # pytest refuses these too: settings written before any table
            raise ConfigError(f"{path}: put pytest settings under [pytest], not {stray[0]!r}")
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: pytest must be a table")
    return table


def _toml_tool_pytest(path: Path, document: dict[str, object]) -> Section | None:
    """``[tool.pytest]`` (native TOML values) or ``[tool.pytest.ini_options]`` (strings)."""
    tool = document.get("tool")
    table = tool.get("pytest") if isinstance(tool, dict) else None
    if not isinstance(table, dict):
        return None
    native = {key: value for key, value in table.items() if key != "ini_options"}
    ini_options = table.get("ini_options")
    if native and ini_options is not None:
        raise ConfigError(
            f"{path}: use either [tool.pytest] or [tool.pytest.ini_options], not both"
        )
    if native:
        return native
    if isinstance(ini_options, dict):
        # pytest reads this table as it reads an ini file: every value but a list as a string
        return {
            key: value if isinstance(value, list) else str(value)
            for key, value in ini_options.items()
        }
    return None


def _read_ini(path: Path) -> dict[str, dict[str, str]]:
    """Sections of an ini file read with pytest's rules (those of ``iniconfig``): comment lines
    start with ``#`` or ``;``, no inline comments, ``key = value`` or ``key: value``, indented
    lines continue the value above, case kept, a repeated key or section is an error."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    last_key: str | None = None
    text = path.read_text(encoding="utf-8").removeprefix("\N{BYTE ORDER MARK}")
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{number}"
        if line.lstrip()[:1] in ("#", ";") or not line.strip():
            continue
        line = line.rstrip()
        if line.startswith("["):
            header = line.split("#")[0].split(";")[0].rstrip()
            if header.endswith("]"):
                name = header[1:-1]
                if not name or name in sections:
                    raise ConfigError(f"{where}: empty or repeated section [{name}]")
                current = sections[name] = {}
                last_key = None
                continue
        if line[0].isspace() or line.startswith("["):
            if current is None or last_key is None:
                raise ConfigError(f"{where}: a continuation line with no value above it")
            current[last_key] = f"{current[last_key]}\n{line.strip()}".lstrip("\n")
            continue
        key, equals, value = line.partition("=")
        if not equals or ":" in key:
            key, colon, value = line.partition(":")
            if not colon:
                raise ConfigError(f"{where}: not KEY = VALUE: {line!r}")
        if current is None:
            raise ConfigError(f"{where}: a value before any [section]")
        key = key.strip()
        if key in current:
            raise ConfigError(f"{where}: {key!r} is set twice")
        current[key] = value.strip()
        last_key = key
    return sections


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


# --- The layers of each caller ----------------------------------------------------------------


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


def plugin_layers(
    options: Mapping[str, object],
    overrides: Iterable[str] | None,
    environ: Mapping[str, str],
    config_file: Path | None,
) -> tuple[Layer, ...]:
    """A pytest session's layers: ``options`` (each setting's ``--ephemeral-*`` value, None if not
    given), ``-o`` ``overrides``, the environment, the config file pytest read.

    The config file is read here, not through pytest's typed ini values, which are strict both
    ways: ``ephemeral_timeout = "3"`` or a list of exclusions in a native ``[tool.pytest]`` table
    work as well as in an ini file.
    """
    given = {
        name: Raw(value, f"command-line option {ROWS[name].option}")
        for name, value in options.items()
        if value is not None
    }
    # Given with -o, or cleared by a blank -o ephemeral_X=, as pytest clears it
    overridden = override_layer(overrides, keep_empty=True)
    in_file: Layer = {}
    if config_file is not None:
        in_file = config_file_layer(config_file, read_pytest_section(config_file))
    file_layer = {name: raw for name, raw in in_file.items() if name not in overridden}
    return given, override_layer(overrides), env_layer(environ), file_layer


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


def load(*layers: Layer) -> Settings:
    """Resolve ``layers`` (first wins) with this machine's range data, and run the checks that
    need sockets: what every caller does with the layers it read."""
    settings = resolve(layers, read_system_ports())
    verify(settings)
    return settings
