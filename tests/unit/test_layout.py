"""The layout reads as the method: imports only go down the stages, and nothing imports in a circle.

Every import counts — module level, inside functions, and under ``if TYPE_CHECKING`` — because a type-only
circle is still a circle a reader has to untangle (and becomes a runtime one the day the type is used).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import persona

SOURCE = Path(persona.__file__).parent

# Lowest first. A module may import its own stage and any stage below it; stages on one line are peers that
# import none of each other.
STAGES = [
    ["core"],
    ["models"],
    ["hooks"],
    ["data"],
    ["judges"],
    ["vectors"],
    ["steering"],
    ["generation"],
    ["training"],
    ["analysis"],
    ["commands"],
    ["serve", "study"],
    ["education"],
    ["cli"],
]
RANK = {stage: rank for rank, line in enumerate(STAGES) for stage in line}
TOP_LEVEL_MODULES = {"__init__.py", "cli.py"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in SOURCE.rglob("*.py")}


def imported_modules(name: str) -> set[str]:
    """Every persona module ``name`` imports, anywhere in the file (``from a import b`` counts as ``a.b`` when
    ``b`` is a module, else as ``a``)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source)
    return {module for module in found if module in MODULES and module != "persona"}


GRAPH = {name: imported_modules(name) for name in MODULES}


def stage(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def test_top_level_holds_only_packages_and_the_cli():
    modules = {path.name for path in SOURCE.glob("*.py")}
    assert modules == TOP_LEVEL_MODULES, (
        f"modules at the top of src/persona/: {sorted(modules - TOP_LEVEL_MODULES)}"
    )
    packages = {path.name for path in SOURCE.iterdir() if (path / "__init__.py").is_file()}
    assert packages | {"cli"} == set(RANK), f"packages without a stage: {sorted(packages - set(RANK))}"


def test_every_package_says_what_it_owns_and_may_import():
    for path in SOURCE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        assert "May import" in doc, f"{path}: the docstring should say what the package may import"


def test_imports_only_go_down_the_stages():
    upward = [
        f"{name} ({stage(name)}) imports {target} ({stage(target)})"
        for name, targets in GRAPH.items()
        for target in targets
        if stage(name) is not None
        and stage(name) != stage(target)
        and RANK[stage(target)] >= RANK[stage(name)]
    ]
    root = {stage(target) for target in GRAPH["persona"]}
    assert root <= {"core"}, f"persona/__init__.py imports {sorted(root)}: it must stay light (core only)"
    assert not upward, "imports that go up or sideways:\n" + "\n".join(sorted(upward))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (a path that ends where it starts), or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for target in sorted(graph.get(node, ())):
            if target in on_path:
                return path[path.index(target) :] + [target]
            if target not in done and (cycle := visit(target)):
                return cycle
        on_path.discard(path.pop())
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_of_any_kind():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
    ],
)
def test_find_cycle_finds_circles(graph, expected):
    assert find_cycle(graph) == expected


def test_type_only_imports_are_walked(tmp_path, monkeypatch):
    """Regression: `judges` ↔ `judges.local_judge` was a circle only under TYPE_CHECKING."""
    module = tmp_path / "persona" / "demo.py"
    module.parent.mkdir()
    module.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from persona.core.errors import PersonaError\n"
    )
    monkeypatch.setitem(MODULES, "persona.demo", module)
    assert imported_modules("persona.demo") == {"persona.core.errors"}


@pytest.mark.parametrize(("old", "new"), sorted(__import__("persona.core.moved").core.moved.MOVED.items()))
def test_moved_modules_keep_their_old_import_path(old, new):
    """Configs and notebooks written against the flat layout keep working; the warning names the new path."""
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    target = importlib.import_module(new)
    public = [name for name in vars(target) if not name.startswith("_")]
    assert public and all(getattr(module, name) is getattr(target, name) for name in public)


def test_an_old_class_path_in_a_config_still_resolves():
    import importlib

    from jsonargparse import ArgumentParser

    from persona.vectors.extraction import VectorExtractor

    parser = ArgumentParser()
    parser.add_argument("--model", type=VectorExtractor)
    config = parser.parse_args(["--model", '{"class_path": "persona.extraction.VectorExtractor"}'])
    module, _, name = config.model.class_path.rpartition(".")
    assert getattr(importlib.import_module(module), name) is VectorExtractor
