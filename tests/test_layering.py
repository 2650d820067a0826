"""The package imports one way: cli → experiments → training, evaluation, inference → data → core → base.

Read from the source with `ast` (nothing is imported): every `import` of a bitune module, at module level or
inside a function, must go to a lower layer or stay inside its own package, and no import circle may appear.
Imports under `if TYPE_CHECKING:` only name types for annotations and are not followed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"

# Lower numbers are lower layers. A module may import its own package and any lower layer, nothing else.
LAYERS = {
    "bitune._version": 0,
    "bitune.errors": 0,
    "bitune.files": 1,
    "bitune.settings": 1,
    "bitune.core": 2,
    "bitune.data": 3,
    "bitune.training": 4,
    "bitune.evaluation": 4,
    "bitune.inference": 4,
    "bitune.experiments": 5,
    "bitune.cli": 6,
    "bitune.__main__": 7,
    "bitune": 8,  # the facade (`bitune/__init__.py`) re-exports the public API; nothing imports it
}


def module_name(path: Path, source: Path = SOURCE) -> str:
    parts = path.relative_to(source).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    """The layer entry a module belongs to (its package, or the module itself for top-level modules)."""
    parts = module.split(".")
    for length in range(len(parts), 0, -1):
        if ".".join(parts[:length]) in LAYERS:
            return ".".join(parts[:length])
    raise AssertionError(f"{module} belongs to no layer; add its package to LAYERS in {__file__}")


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(path: Path, source: Path = SOURCE) -> set[str]:
    """The bitune modules `path` imports at run time (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = {id(n) for block in ast.walk(tree) if _type_checking_block(block) for n in ast.walk(block)}
    name = module_name(path, source)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from bitune.core import model` imports the module bitune.core.model
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _is_module(candidate, source) else base)
    return {name for name in found if name == "bitune" or name.startswith("bitune.")}


def _is_module(name: str, source: Path) -> bool:
    path = source.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph(source: Path = SOURCE) -> dict[str, set[str]]:
    return {
        module_name(path, source): imported_modules(path, source)
        for path in sorted((source / "bitune").rglob("*.py"))
    }


def wrong_way_imports(graph: dict[str, set[str]]) -> list[str]:
    upward = []
    for module, imports in graph.items():
        for target in imports:
            if target == "bitune" and module != "bitune":
                upward.append(f"{module} imports the facade `bitune`; import the defining module instead")
                continue
            here, there = room(module), room(target)
            if here != there and LAYERS[there] >= LAYERS[here]:
                upward.append(f"{module} (layer {LAYERS[here]}) imports {target} (layer {LAYERS[there]})")
    return sorted(upward)


def test_every_import_goes_down_or_stays_in_its_package():
    upward = wrong_way_imports(import_graph())
    assert not upward, "imports that go up or sideways:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = import_graph()
    circles = []

    def visit(module: str, trail: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in trail:
                circles.append(" → ".join([*trail[trail.index(target) :], target]))
            elif target in graph and target not in finished:
                visit(target, [*trail, target])
        finished.add(module)

    finished: set[str] = set()
    for module in graph:
        if module not in finished:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(sorted(set(circles)))


def test_argparse_lives_only_in_the_cli():
    users = [
        module
        for module, path in ((module_name(p), p) for p in (SOURCE / "bitune").rglob("*.py"))
        if "argparse"
        in {
            a.name
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Import)
            for a in n.names
        }
        and room(module) != "bitune.cli"
    ]
    assert not users, f"argparse outside bitune.cli: {users}"


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from bitune.cli import main\n", "bitune.core.model (layer 2) imports bitune.cli (layer 6)"),
        (
            "def f():\n    from bitune.data import samples\n",
            "bitune.core.model (layer 2) imports bitune.data.samples",
        ),
        (
            "from bitune.training import trainer\n",
            "bitune.core.model (layer 2) imports bitune.training.trainer",
        ),
    ],
)
def test_the_check_catches_an_upward_import(tmp_path, source, expected):
    for module in (
        "core/model.py",
        "core/__init__.py",
        "cli/__init__.py",
        "data/samples.py",
        "data/__init__.py",
        "training/__init__.py",
        "training/trainer.py",
    ):
        (tmp_path / "bitune" / module).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "bitune" / module).touch()
    (tmp_path / "bitune" / "core" / "model.py").write_text(source)
    assert any(line.startswith(expected) for line in wrong_way_imports(import_graph(tmp_path)))


def test_the_check_ignores_imports_for_type_annotations_only(tmp_path):
    (tmp_path / "bitune" / "core").mkdir(parents=True)
    (tmp_path / "bitune" / "cli").mkdir()
    (tmp_path / "bitune" / "cli" / "__init__.py").touch()
    (tmp_path / "bitune" / "core" / "model.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bitune.cli import main\n"
    )
    assert wrong_way_imports(import_graph(tmp_path)) == []
