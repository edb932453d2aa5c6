"""Arrows between the packages point one way: the model and the data know nothing of training, the checkpoint tools
do not import the trainer, the runtime imports no other part of the project, and no two modules import each other.

Imports are read from the source (module level and inside functions, so a lazy import counts too); imports under
``if TYPE_CHECKING:`` are annotations only and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "biomedgpt"

# package -> the packages of the project it must never import
FORBIDDEN = {
    "biomedgpt.model": ("biomedgpt.train", "biomedgpt.data", "biomedgpt.checkpoint", "biomedgpt.evaluation"),
    "biomedgpt.data": ("biomedgpt.train", "biomedgpt.checkpoint", "biomedgpt.evaluation", "biomedgpt.cli"),
    "biomedgpt.checkpoint": ("biomedgpt.train", "biomedgpt.data", "biomedgpt.evaluation", "biomedgpt.cli"),
    "biomedgpt.runtime": ("biomedgpt.",),  # only itself
    "biomedgpt.kernels": ("biomedgpt.model", "biomedgpt.train", "biomedgpt.data"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path) -> set[str]:
    """The project modules ``path`` imports at run time (``from pkg import mod`` counts as pkg.mod when it is one)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").is_file():
                    found.add(candidate)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {name for name in found if name == "biomedgpt" or name.startswith("biomedgpt.")}


MODULES = {module_name(path): imports_of(path) for path in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_never_imports_what_it_must_not(package: str) -> None:
    offending = [
        f"{module} imports {target}"
        for module, targets in MODULES.items()
        if module == package or module.startswith(package + ".")
        for target in sorted(targets)
        if not (target == package or target.startswith(package + "."))
        and any(target == banned or target.startswith(banned.rstrip(".") + ".") for banned in FORBIDDEN[package])
    ]
    assert offending == []


def test_no_two_modules_import_each_other() -> None:
    # A package's __init__ re-exporting its own modules is not a cycle worth naming; module pairs are.
    pairs = sorted(
        f"{a} <-> {b}"
        for a, targets in MODULES.items()
        for b in targets
        if a < b and b in MODULES and a in MODULES[b] and not (a == b.rsplit(".", 1)[0] or b == a.rsplit(".", 1)[0])
    )
    assert pairs == []
