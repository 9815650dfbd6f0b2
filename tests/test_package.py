"""The package's shape: imports form a chain without cycles, and no module uses another's private
names. Read from the source with ``ast``, so a lazy import inside a function counts too; only
imports under ``if TYPE_CHECKING:`` (never run) are left out."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

import pytest_ephemeral

PACKAGE = Path(pytest_ephemeral.__file__).parent
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))
#: The leasing core: usable without pytest (scripts, ``run``), so it must never import it.
PYTEST_LAYER = {"plugin", "_leases", "_factory", "_adopt", "_bind", "_warnings"}


def _tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module}.py").read_text(), f"{module}.py")


def _run_time_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under ``if TYPE_CHECKING:``."""
    nodes: list[ast.AST] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        nodes.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return nodes


def _imports(module: str) -> dict[str, list[str]]:
    """The package modules ``module`` imports at run time, with the names taken from each."""
    found: dict[str, list[str]] = {}
    for node in _run_time_nodes(_tree(module)):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module is None:  # from . import _a, _b
                for alias in node.names:
                    found.setdefault(alias.name, [])
            else:
                found.setdefault(node.module, []).extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE.name):
            name = (node.module or "").removeprefix(PACKAGE.name).lstrip(".") or "__init__"
            found.setdefault(name, []).extend(alias.name for alias in node.names)
    return found


def _third_party(module: str) -> set[str]:
    names: set[str] = set()
    for node in _run_time_nodes(_tree(module)):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def test_the_imports_form_no_cycle() -> None:
    graph = {module: set(_imports(module)) - {"__init__"} for module in MODULES}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")
    assert set(order) >= set(MODULES) - {"__init__"}


def test_no_module_takes_another_modules_private_names() -> None:
    offences = []
    for module in MODULES:
        for imported, names in _imports(module).items():
            offences += [f"{module} imports {imported}.{n}" for n in names if n.startswith("_")]
        aliases = {name for name in _imports(module) if name.startswith("_")}
        for node in _run_time_nodes(_tree(module)):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
            ):
                offences.append(f"{module} uses {node.value.id}.{node.attr}")
    assert offences == []


@pytest.mark.parametrize("module", sorted(set(MODULES) - PYTEST_LAYER - {"__init__"}))
def test_the_leasing_core_imports_nothing_from_pytest(module: str) -> None:
    assert "pytest" not in _third_party(module)
    assert not PYTEST_LAYER & set(_imports(module))


def test_the_adapters_and_the_plugin_share_the_lease_owner_not_each_other() -> None:
    assert "_leases" in _imports("plugin")
    assert "_factory" in _imports("plugin")
    assert "_factory" in _imports("_adopt")
    assert "plugin" not in _imports("_adopt")
    for owner in ("_leases", "_factory"):
        assert not {"plugin", "_adopt"} & set(_imports(owner))
