"""The shape of `train/` (ARCHITECTURE.md): sub-packages by job that import each other in one
direction only, every import of the package's own modules at the top of its module, and no circle.

Read from the source with `ast`, so a function-local import that hides a circle is found even when
it is never executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TRAIN = Path(__file__).resolve().parents[1] / "train"

MAY_IMPORT: dict[str, set[str]] = {
    "runtime": set(),
    "models": set(),
    "metrics": set(),
    "recipe": set(),
    "config": {"runtime", "models", "recipe"},
    "data": {"config"},
    "runfiles": {"config", "metrics", "models", "runtime"},
    "training": {"config", "data", "metrics", "models", "recipe", "runfiles", "runtime"},
    "apply": {"config", "data", "metrics", "recipe", "runfiles", "runtime", "training"},
    "reporting": {"apply", "data", "metrics", "runfiles", "runtime"},
}
"""Which sub-packages each may import; `fit`, `api` and `cli` (the entry points) sit above all."""
ENTRY_POINTS = {"fit", "api", "cli"}
LAZY = {"train.cli", "train"}
"""Modules whose imports of the package stay inside functions: `train --help` and `import train`
must not load torch (tests/train/test_cli.py, tests/train/test_api.py)."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(TRAIN.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(TRAIN.rglob("*.py"))}


def internal_imports(name: str) -> list[tuple[str, bool]]:
    """(imported train module, at module level?) for every import of the package in module `name`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
            target = ""
        else:
            continue
        for full in names:
            module = full if full in MODULES else target if target in MODULES else None
            if module is not None and module.startswith("train"):
                found.append((module, id(node) in top))
    return found


def group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "train"


def test_the_layering_itself_has_no_circle():
    seen: set[str] = set()

    def visit(package: str, path: tuple[str, ...]) -> None:
        assert package not in path, f"circle in MAY_IMPORT: {' -> '.join(path + (package,))}"
        for below in MAY_IMPORT[package]:
            visit(below, path + (package,))
        seen.add(package)

    for package in MAY_IMPORT:
        visit(package, ())
    assert seen == set(MAY_IMPORT)


def test_every_module_belongs_to_a_known_group():
    groups = {group(m) for m in MODULES}
    assert groups <= set(MAY_IMPORT) | ENTRY_POINTS | {"train"}, groups - set(MAY_IMPORT) - ENTRY_POINTS


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down_the_layers_only(name):
    mine = group(name)
    if mine in ENTRY_POINTS or mine == "train":
        return
    for module, _ in internal_imports(name):
        other = group(module)
        assert other == mine or other in MAY_IMPORT[mine], f"{name} imports {module}: {mine} may not import {other}"


@pytest.mark.parametrize("name", sorted(set(MODULES) - LAZY))
def test_imports_of_the_package_sit_at_the_top(name):
    local = sorted({module for module, at_top in internal_imports(name) if not at_top})
    assert not local, f"{name} imports {local} inside a function: a name in the wrong home?"


def test_no_module_imports_itself_through_others():
    graph = {name: {module for module, _ in internal_imports(name) if module != name} for name in MODULES}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(graph[name]):
            if state.get(other) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(other):] + [name, other]))
            if other not in state:
                visit(other, path + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_the_checker_sees_a_hidden_circle(tmp_path, monkeypatch):
    """The rules above would catch the circles this layout removed: a function-local import from
    `runfiles` up into `apply` (export once reached into inference so)."""
    module = "train.runfiles.export"
    source = MODULES[module].read_text() + "\n\ndef _hidden():\n    from ..apply import inference\n"
    fake = tmp_path / "train" / "runfiles" / "export.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(source)
    monkeypatch.setitem(MODULES, module, fake)
    found = internal_imports(module)
    assert ("train.apply.inference", False) in found
    with pytest.raises(AssertionError, match="runfiles may not import apply"):
        test_imports_go_down_the_layers_only(module)
    with pytest.raises(AssertionError, match="inside a function"):
        test_imports_of_the_package_sit_at_the_top(module)
