"""The sources of the settings, read into layers in precedence order: the readers every caller
shares, and the plugin's layers.

The plugin (``plugin_layers``): its command line (pytest has merged ``addopts`` and
``PYTEST_ADDOPTS`` into it already), ``-o ephemeral_*``, the environment, the config file pytest
read. Callers outside pytest (``run``, ``status``, ``range``, ``lease_port()`` outside a session)
find the project's config file and read its ``addopts`` in ``_project``, over the same readers.
A value of only blanks in the config file, the environment or ``-o`` means the default: it is
left out of its layer (and a blank ``-o`` hides the config file's value, as pytest's ``-o`` does).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from ._errors import ConfigError
from ._ranges import read_system_ports
from ._settings import NAMES, ROWS, Layer, Raw, Settings, resolve, verify

Section = Mapping[str, object]


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
        if value is None or blank(value):
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
        if not blank(environ.get(row.env, ""))
    }


def blank(value: object) -> bool:
    """Whether a value from a file, the environment or ``-o`` is only blanks (the default)."""
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
    return {name: raw for name, raw in layer.items() if keep_empty or not blank(raw.value)}


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


# --- The layers of each caller ----------------------------------------------------------------


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


def load(*layers: Layer) -> Settings:
    """Resolve ``layers`` (first wins) with this machine's range data, and run the checks that
    need sockets: what every caller does with the layers it read."""
    settings = resolve(layers, read_system_ports())
    verify(settings)
    return settings
