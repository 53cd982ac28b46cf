"""The package's import layers, checked statically (in the spirit of Ray's
python/ray/tests/test_circular_imports.py, which imports every module in a fresh interpreter).

Every ``import`` is read with :mod:`ast`, including those inside functions, which a runtime
import test never sees. From top to bottom::

    cli > sweep > launch > worker, callbacks > engine, analysis
        > models, optim, artifacts, data > config, datasets, errors, fileutil

A module may import its own layer's packages or lower layers, never a higher one; the
package-level graph has no cycle; ``ray`` is imported only by worker, callbacks, launch, sweep.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "resnet_cluster"

LAYERS: list[set[str]] = [
    {"config", "datasets", "errors", "fileutil", "resnet_cluster"},  # "resnet_cluster": its __init__
    {"models", "optim", "artifacts", "data"},
    {"engine", "analysis"},
    {"worker", "callbacks"},
    {"launch"},
    {"sweep"},
    {"cli", "__main__"},
]
RAY_ALLOWED = {"worker", "callbacks", "launch", "sweep"}


def layer_of(unit: str) -> int:
    for i, units in enumerate(LAYERS):
        if unit in units:
            return i
    raise AssertionError(f"resnet_cluster/{unit} has no layer: add it to LAYERS in {__file__}")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """The first component below ``resnet_cluster`` (a subpackage or a top-level module)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports(path: pathlib.Path, module: str | None = None) -> list[tuple[str, int]]:
    """Every module ``path`` imports, anywhere in the file (functions included), with its line."""
    module = module or module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            # `from resnet_cluster import models` imports the subpackage `models`
            if target == "resnet_cluster":
                found += [(f"resnet_cluster.{a.name}", node.lineno) for a in node.names]
    return found


def edges() -> list[tuple[str, str, str, int]]:
    """(importing unit, imported unit or top-level third-party name, file, line)."""
    out = []
    for path in sorted(PKG.rglob("*.py")):
        src = unit_of(module_name(path))
        for target, line in imports(path):
            if target == "resnet_cluster" or target.startswith("resnet_cluster."):
                dst = unit_of(target)
            else:
                dst = "ext:" + target.split(".")[0]
            out.append((src, dst, str(path.relative_to(PKG.parent)), line))
    return out


def test_layer_table_covers_every_package():
    units = {unit_of(module_name(p)) for p in PKG.rglob("*.py")}
    for unit in units:
        layer_of(unit)


def test_no_import_from_a_higher_layer():
    bad = [
        f"{where}:{line}: {src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
        for src, dst, where, line in edges()
        if not dst.startswith("ext:") and layer_of(dst) > layer_of(src)
    ]
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_package_cycles():
    graph: dict[str, set[str]] = {}
    for src, dst, _, _ in edges():
        if not dst.startswith("ext:") and dst != src:
            graph.setdefault(src, set()).add(dst)
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif len(path) < 12:
                visit(nxt, path + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert not cycles, "package cycles:\n" + "\n".join(sorted(set(cycles)))


def test_ray_only_in_the_ray_layers():
    bad = [f"{where}:{line}: {src} imports ray" for src, dst, where, line in edges()
           if dst == "ext:ray" and src not in RAY_ALLOWED]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("text, unit", [("resnet_cluster.sweep.runner", "sweep"), ("resnet_cluster", "resnet_cluster")])
def test_unit_of(text, unit):
    assert unit_of(text) == unit


def test_checker_sees_function_level_and_relative_imports(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("import os\n\ndef f():\n    from resnet_cluster import sweep\n    from ..launch import submit\n")
    found = imports(src, "resnet_cluster.models.x")
    assert found == [("os", 1), ("resnet_cluster", 4), ("resnet_cluster.sweep", 4), ("resnet_cluster.launch", 5)]
