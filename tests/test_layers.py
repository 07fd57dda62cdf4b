"""The import drawing of jem_ext: no circle among its modules, and the layers import downwards.

Every module's imports are read with ``ast`` (imports under ``if TYPE_CHECKING:`` count too: an
annotation-only import still ties two modules together). Layers, bottom to top: the modules at
the package's top level (ops, sampler, data, models, checkpoint, accel, metrics, ...), then
``jem_ext.training`` and ``jem_ext.eval`` side by side, then ``jem_ext.bench``; the command shims
``jem_ext.train`` and the ``__main__`` modules stand above all of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import jem_ext

PACKAGE = Path(jem_ext.__file__).resolve().parent
ENTRY_POINTS = {"jem_ext.train"}  # ``python -m jem_ext.train``: the trainer's public face


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports (``from pkg import mod`` names the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if sub in known else target)
    root = PACKAGE.name
    return {m for m in found if m in known and m != name and m.split(".")[0] == root}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    mods = module_files(root)
    return {name: imported(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (as a path that returns to its start), or None."""
    colour: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in colour and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        colour[node] = 2
        return None

    for start in sorted(graph):
        if start not in colour and (cycle := visit(start)) is not None:
            return cycle
    return None


def layer(name: str) -> str:
    """``entry``, ``bench``, ``training``, ``eval`` or ``base``."""
    parts = name.split(".")
    if name in ENTRY_POINTS or parts[-1] == "__main__":
        return "entry"
    if len(parts) > 1 and parts[1] in ("bench", "training", "eval"):
        return parts[1]
    return "base"


# What each layer may import, besides itself.
ALLOWED = {
    "base": {"base"},
    "training": {"base"},
    "eval": {"base"},
    "bench": {"base", "training", "eval"},
    "entry": {"base", "training", "eval", "bench"},
}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            if layer(dst) != layer(src) and layer(dst) not in ALLOWED[layer(src)]:
                bad.append(f"{src} ({layer(src)}) imports {dst} ({layer(dst)})")
    return bad


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_layers_import_downwards():
    assert layer_violations(import_graph()) == []


def test_training_and_eval_do_not_import_each_other():
    graph = import_graph()
    crossing = [
        (src, dst)
        for src, targets in graph.items()
        for dst in targets
        if {layer(src), layer(dst)} == {"training", "eval"}
    ]
    assert crossing == []


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """The checks above can fail: a drawing of a made-up package with a circle through an
    annotation-only relative import, and an upward import, shows both."""
    pkg = tmp_path / "jem_ext"
    (pkg / "training").mkdir(parents=True)
    (pkg / "eval").mkdir()
    for init in (pkg, pkg / "training", pkg / "eval"):
        (init / "__init__.py").write_text("")
    (pkg / "training" / "a.py").write_text("from .b import thing\n")
    (pkg / "training" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n"
    )
    (pkg / "eval" / "c.py").write_text("from ..training import a\nimport jem_ext.models\n")
    (pkg / "models.py").write_text("from jem_ext.eval.c import x\n")
    graph = import_graph(pkg)
    assert graph["jem_ext.training.a"] == {"jem_ext.training.b"}
    assert graph["jem_ext.training.b"] == {"jem_ext.training.a"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert layer_violations(graph) == [
        "jem_ext.eval.c (eval) imports jem_ext.training.a (training)",
        "jem_ext.models (base) imports jem_ext.eval.c (eval)",
    ]


@pytest.mark.parametrize("name", ["jem_ext.train", "jem_ext.eval.__main__"])
def test_entry_points_are_the_only_modules_above_bench(name):
    assert layer(name) == "entry"
    assert layer("jem_ext.bench.cli") == "bench"
    assert layer("jem_ext.accel") == "base"
