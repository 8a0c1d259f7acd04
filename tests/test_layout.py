"""fedcomp's layers import only downward, with no cycle (function-level imports included), and
every package of the repository ships in the wheel."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import modules of its own layer or of a lower one, never a higher one.
LAYERS = [
    ("helpers and schemas", {"fedcomp._host", "fedcomp._schemas", "fedcomp.flat"}),
    ("reference", {"fedcomp.reference"}),
    ("op definitions", {"fedcomp._library"}),
    ("backends", {"fedcomp.triton", "fedcomp.triton.*", "fedcomp.cuda_ops", "fedcomp.build"}),
    ("backend choice", {"fedcomp._backend"}),
    ("ops", {"fedcomp.ops"}),
    ("wire", {"fedcomp.wire"}),
    ("compressors and aggregation", {"fedcomp.compressors", "fedcomp.aggregation", "fedcomp.lowrank"}),
    (
        "integrations",
        {
            "fedcomp.ddp",
            "fedcomp.flower",
            "fedcomp.bench",
            "fedcomp.bench.*",
            "fedcomp.demo",
            "fedcomp.env",
            "fedcomp.gpu_compile",
            "fedcomp",
        },
    ),
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str, package: str, known: set[str]) -> set[str]:
    """The modules of ``package`` that module ``name`` (file ``path``) imports anywhere in its body.
    ``from . import x`` counts as importing module ``x`` when it is one, else the package."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import fedcomp.x.y` where only fedcomp.x is a module
                target = target.rpartition(".")[0]
            if target and (target == package or target.startswith(package + ".")) and target != name:
                found.add(target)
    return found


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    root = package_dir.parent
    files = {module_name(p, root): p for p in package_dir.rglob("*.py")}
    return {name: imports_of(path, name, package_dir.name, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(name: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        if name in members or any(m.endswith(".*") and name.startswith(m[:-1]) for m in members):
            return i
    raise AssertionError(f"{name} is in no layer of tests/test_layout.py: add it to LAYERS")


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_and_relative_imports_are_seen(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("from .sub.c import g\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("import pkg.a\n\ndef g():\n    from .. import a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


def test_fedcomp_has_no_import_cycle():
    assert cycles(import_graph(ROOT / "fedcomp")) == []


def test_fedcomp_imports_only_downward():
    graph = import_graph(ROOT / "fedcomp")
    upward = [
        f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for name, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(name)
    ]
    assert upward == []


def test_every_package_ships_in_the_wheel():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for top in ("fedcomp", "fedsynsam"):
        for init in (ROOT / top).rglob("__init__.py"):
            name = module_name(init, ROOT)
            assert name in listed, f"package {name} is missing from [tool.setuptools] packages in pyproject.toml"
