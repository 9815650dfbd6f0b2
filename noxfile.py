"""The matrix CI runs: lint and types, the suite on each CPython 3.10-3.13, on the lowest allowed
dependency versions, the demo suite, the built package, and the docs site.

``nox`` runs every session, ``nox -s tests-3.12`` one (``nox -l`` lists them). A CPython that is
not installed is reported as skipped, by session name, never as passed; ``.ci/run`` fails when
fewer than two Python versions ran the suite. Each test session that passes writes which Python and
dependency versions it ran to ``.nox/ran/<session>.json`` for that summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nox

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
#: The floors pyproject.toml declares, installed exactly by the ``minimums`` session.
MINIMUMS = ["pytest==8.4.0", "filelock==3.30.0", "pytest-xdist==3.6.1"]
#: The lowest Python: the minimums session runs there (filelock >= 4.1.1 would need 3.11).
LOWEST_PYTHON = PYTHONS[0]
RAN_DIR = Path(".nox", "ran")
#: What a test session reports about itself: the interpreter and the dependencies it ran with.
VERSIONS_SCRIPT = """
import importlib.metadata as m, json, platform
names = ["pytest", "filelock", "pytest-xdist"]
print(json.dumps({"python": platform.python_version(), **{n: m.version(n) for n in names}}))
"""

nox.options.default_venv_backend = "uv|virtualenv"  # uv when installed: installs take seconds
nox.options.error_on_missing_interpreters = False  # skipped by name; .ci/run counts what ran
nox.options.download_python = "never"  # only this machine's interpreters count
os.environ["UV_PYTHON_DOWNLOADS"] = "never"

# pyenv keeps each CPython in a directory of its own; its shims on PATH answer only for the
# versions selected, so put every installed version's bin directory ahead of them.
_PYENV_VERSIONS = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"), "versions")
os.environ["PATH"] = os.pathsep.join(
    [*sorted(str(path) for path in _PYENV_VERSIONS.glob("3.*/bin")), os.environ["PATH"]]
)


def _run_suite(session: nox.Session, *requirements: str) -> None:
    """Install the project with its test tools (and ``requirements``), run the suite, record it."""
    marker = RAN_DIR / f"{session.name}.json"
    marker.unlink(missing_ok=True)
    session.install("-e", ".[dev]", *requirements)
    ran = session.run("python", "-c", VERSIONS_SCRIPT, silent=True)
    assert isinstance(ran, str)
    session.log(f"ran with {ran.strip()}")
    # The README's test command; posargs replace "-n 2" (for example "-n 4 -x").
    session.run("python", "-m", "pytest", *(session.posargs or ["-n", "2"]))
    RAN_DIR.mkdir(parents=True, exist_ok=True)
    marker.write_text(ran)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format) and mypy in strict mode."""
    session.install("-e", ".[dev]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The suite on one CPython, with the newest dependency versions that install there."""
    _run_suite(session)


@nox.session(python=LOWEST_PYTHON)
def minimums(session: nox.Session) -> None:
    """The suite on the lowest Python with the lowest dependency versions pyproject.toml allows."""
    _run_suite(session, *MINIMUMS)


@nox.session
def examples(session: nox.Session) -> None:
    """The demo suite, as the README runs it: the package alone, 4 xdist workers."""
    session.install("-e", ".")
    session.run("python", "-m", "pytest", "-n", "4", "examples", *session.posargs)


@nox.session
def package(session: nox.Session) -> None:
    """Build the sdist and the wheel, check their metadata and contents."""
    session.install("build[uv]", "twine", "check-wheel-contents")
    out = Path(session.create_tmp(), "dist")
    for old in out.glob("*"):
        old.unlink()
    session.run("python", "-m", "build", "--installer=uv", "--outdir", str(out))
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        session.error(f"expected one sdist and one wheel in {out}, found {sorted(out.iterdir())}")
    session.run("twine", "check", "--strict", str(sdists[0]), str(wheels[0]))
    session.run("check-wheel-contents", str(wheels[0]))
    problems = _sdist_problems(sdists[0]) + _wheel_problems(wheels[0])
    if problems:
        session.error("; ".join(problems))
    session.log(f"{sdists[0].name} and {wheels[0].name} hold what they should")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the docs site offline with warnings as errors, then check its internal links."""
    session.install("-e", ".[docs]")
    out = Path("docs", "_build", "html")
    # -E: read every page again; -n: every cross-reference must resolve. Nothing here downloads:
    # no intersphinx, and external links are not checked.
    session.run("sphinx-build", "-W", "--keep-going", "-E", "-n", "-b", "html", "docs", str(out))
    broken = broken_links(out)
    if broken:
        session.error(f"{len(broken)} broken internal links:\n" + "\n".join(broken))
    session.log(f"every internal link in {out} resolves")


class _Links(HTMLParser):
    """The ids a page defines and the relative links it makes."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name in ("id", "name"):
                self.ids.add(value)
            elif name in ("href", "src") and tag in ("a", "link", "img", "script"):
                self.links.append(value)


def broken_links(root: Path) -> list[str]:
    """Every relative ``href``/``src`` under ``root`` whose file or anchor is missing."""
    pages: dict[Path, _Links] = {}
    for page in sorted(root.rglob("*.html")):
        parser = _Links()
        parser.feed(page.read_text(encoding="utf-8"))
        pages[page.resolve()] = parser
    broken = []
    for page, parser in pages.items():
        for link in parser.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith(("mailto:", "javascript:")):
                continue  # external: not checked offline
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if target.is_dir():
                target = target / "index.html"
            where = f"{page.relative_to(root.resolve())}: {link}"
            if not target.exists():
                broken.append(f"{where} (no such file)")
            elif (
                parts.fragment
                and target in pages
                and unquote(parts.fragment) not in pages[target].ids
            ):
                broken.append(f"{where} (no such anchor)")
    return broken


def _sdist_problems(sdist: Path) -> list[str]:
    with tarfile.open(sdist) as archive:
        # Every member sits under "<name>-<version>/".
        names = {member.name.partition("/")[2] for member in archive.getmembers()}
    wanted = [
        "LICENSE",
        "README.md",
        "CONTRIBUTING.md",
        "CHANGELOG.md",
        "docs/conf.py",
        "pyproject.toml",
        "noxfile.py",
        "pytest_ephemeral/py.typed",
        "tests/conftest.py",
        "examples/conftest.py",
        "benchmarks/bench.py",
    ]
    return [f"{name} missing from {sdist.name}" for name in wanted if name not in names]


def _wheel_problems(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    dist_info = wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info/"
    problems = [
        f"{name} should not be in {wheel.name}"
        for name in names
        if not name.startswith(("pytest_ephemeral/", dist_info))
    ]
    for wanted in ("pytest_ephemeral/py.typed", f"{dist_info}licenses/LICENSE"):
        if wanted not in names:
            problems.append(f"{wanted} missing from {wheel.name}")
    return problems


def summarize(report_path: Path) -> int:
    """Print which Pythons and dependency sets ran the suite and how the other sessions ended;
    1 if fewer than two Pythons ran the suite or another session did not succeed.

    ``report_path`` is nox's ``--report`` JSON; the versions come from each session's marker, and
    the README command's run (made by ``.ci/run`` before nox) has a marker of its own.
    """
    sessions = json.loads(report_path.read_text())["sessions"]
    results = {(entry["signatures"] or [entry["name"]])[0]: entry for entry in sessions}
    # "name" is the function's; a parametrized session's own name is its first signature.
    names = sorted({*results, *(path.stem for path in RAN_DIR.glob("*.json"))})
    pythons: set[str] = set()
    print("Test sessions:")
    for name in names:
        if not name.startswith(("tests-", "minimums")):
            continue
        entry = results.get(name, {"result": "success", "reason": None})
        marker = RAN_DIR / f"{name}.json"
        if entry["result"] == "success" and marker.exists():
            ran = json.loads(marker.read_text())
            pythons.add(".".join(ran["python"].split(".")[:2]))
            deps = "minimums" if name.startswith("minimums") else "newest"
            how = "" if name in results else " (the README command, run by .ci/run)"
            print(
                f"  {name}: passed on Python {ran['python']}{how}, {deps}: pytest {ran['pytest']},"
                f" filelock {ran['filelock']}, pytest-xdist {ran['pytest-xdist']}"
            )
        else:
            reason = f" ({entry['reason']})" if entry["reason"] else ""
            print(f"  {name}: {entry['result']}{reason}")
    print(f"Python versions that ran the suite: {', '.join(sorted(pythons)) or 'none'}")
    # The other sessions (lint, examples, package, docs) run on nox's own Python: never skipped.
    others = sorted(name for name in results if not name.startswith(("tests-", "minimums")))
    print("Other sessions:")
    for name in others:
        print(f"  {name}: {results[name]['result']}")
    status = 0
    if len(pythons) < 2:
        print("FAILED: fewer than two Python versions ran the suite")
        status = 1
    failed = [name for name in others if results[name]["result"] != "success"]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        status = 1
    return status


def _minor() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def _main(argv: list[str]) -> int:
    """For .ci/run: ``minor`` (this Python's X.Y), ``versions OUT`` (what this environment runs
    the suite with, as a marker), ``sessions`` (nox -l --json on stdin: every session but this
    Python's test session), ``summary REPORT``."""
    command, *args = argv
    if command == "minor":
        print(_minor())
    elif command == "versions":
        out = Path(args[0])
        out.parent.mkdir(parents=True, exist_ok=True)
        ran = subprocess.run(
            [sys.executable, "-c", VERSIONS_SCRIPT], capture_output=True, text=True, check=True
        )
        out.write_text(ran.stdout)
    elif command == "sessions":
        skip = f"tests-{_minor()}"
        print(" ".join(s["session"] for s in json.load(sys.stdin) if s["session"] != skip))
    elif command == "summary":
        return summarize(Path(args[0]))
    else:
        raise SystemExit(f"unknown command {command!r}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
