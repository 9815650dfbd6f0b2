"""Every Python example in README.md and docs/ runs, found with Sybil.

A code block that defines tests (``def test_...``, unittest methods included) is a test module: it
runs as an inner pytest session, with warnings as errors, and every test in it must pass. Any other
Python block is a script: it runs in a fresh interpreter and must exit 0. TOML blocks must parse,
and a ``[tool.pytest.ini_options]`` table must be one pytest accepts with ``--strict-config``.
Longer examples are included into the docs from examples/, which the demo suite runs.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from sybil import Example, Sybil
from sybil.parsers.markdown import CodeBlockParser

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
TEST_FUNCTION = re.compile(r"^\s*(?:async\s+)?def (test\w*)\(", re.MULTILINE)
TIMEOUT = 120  # seconds: a loaded CI machine fails loudly instead of hanging


def _run_python(example: Example) -> None:
    """A test module runs as an inner pytest session; anything else as a script."""
    pytester: pytest.Pytester = example.namespace["pytester"]
    source = str(example.parsed)
    tests = TEST_FUNCTION.findall(source)
    if tests:
        pytester.makepyfile(test_example=source)
        result = pytester.runpytest("-p", "no:cacheprovider", "-W", "error")
        result.assert_outcomes(passed=len(tests))
        return
    script = pytester.makepyfile(example=source)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def _check_toml(example: Example) -> None:
    """TOML parses; a pytest table in it is one pytest accepts with --strict-config."""
    pytester: pytest.Pytester = example.namespace["pytester"]
    source = str(example.parsed)
    config = tomllib.loads(source)
    if "ini_options" in config.get("tool", {}).get("pytest", {}):
        pytester.makefile(".toml", pyproject=source)
        pytester.makepyfile("def test_nothing(): pass")
        pytester.runpytest("--strict-config", "-W", "error").assert_outcomes(passed=1)


SYBIL = Sybil(
    parsers=[
        CodeBlockParser(language="python", evaluator=_run_python),
        CodeBlockParser(language="toml", evaluator=_check_toml),
    ]
)
#: Every code block of the documents, by ``path:line``.
EXAMPLES = {
    f"{path.relative_to(ROOT).as_posix()}:{example.line}": example
    for path in DOCUMENTS
    for example in SYBIL.parse(path)
}


@pytest.mark.parametrize("where", list(EXAMPLES))
def test_example(where: str, pytester: pytest.Pytester) -> None:
    example = EXAMPLES[where]
    example.namespace["pytester"] = pytester
    example.evaluate()


def test_every_document_is_read() -> None:
    """The docs have Python examples to run (a broken glob would make the test above vacuous)."""
    read = {where.partition(":")[0] for where in EXAMPLES}
    assert {"README.md", "docs/reference/fixtures.md", "docs/howto/scripts.md"} <= read


def test_the_readme_has_the_settings_table() -> None:
    """README.md's configuration table (which the settings page includes) is the one the code
    renders from its settings table, so neither can drift from the other."""
    from pytest_ephemeral._settings import markdown_table

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("<!-- settings-table -->\n", 1)[1].split("<!-- /settings-table -->", 1)[0]
    assert table == markdown_table()


def test_every_public_name_is_in_the_api_reference() -> None:
    """Each name of ``pytest_ephemeral.__all__`` has an autodoc entry in docs/reference/."""
    import pytest_ephemeral

    pages = "".join(path.read_text(encoding="utf-8") for path in (ROOT / "docs").rglob("*.md"))
    documented = set(re.findall(r"^\.\. auto\w+:: pytest_ephemeral\.(\w+)", pages, re.MULTILINE))
    assert set(pytest_ephemeral.__all__) <= documented
