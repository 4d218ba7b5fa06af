"""The package's layering, read from the source: no import cycles, and each layer imports
only the layers below it (the rules the README's Architecture section draws)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "cmal"

ALLOWED = {
    "config": set(),
    "errors": set(),
    "model": {"config", "errors"},
    "data": {"config", "errors", "model"},
    "tasks": {"config", "errors", "model", "data"},
    "engine": {"config", "errors", "data"},
    "detect": {"config", "errors", "data", "engine"},
    "workflow": {"config", "errors", "model", "data", "tasks", "engine"},
    "launch": {"config", "errors", "data", "engine", "detect", "workflow"},
    "analysis": {"config", "errors", "model", "data", "tasks", "workflow"},
    "cli": {
        "config",
        "errors",
        "model",
        "data",
        "engine",
        "detect",
        "workflow",
        "launch",
        "analysis",
    },  # fmt: skip
}
"""Layer -> the layers it may import. The model reads no data, engine, launch or CLI
code; the engine trains any module and imports no task."""


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the cmal modules it imports (``from pkg import sub`` counts ``pkg.sub``)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cmal"):
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("cmal.")}
        graph[name] = deps - {name}
    return graph


def _layer(module: str) -> str:
    return module.split(".")[1]


def test_every_module_belongs_to_a_known_layer():
    layers = {_layer(m) for m in _modules() if m != "cmal"}
    assert layers == set(ALLOWED), layers ^ set(ALLOWED)


def test_layers_import_only_the_layers_below_them():
    wrong = sorted(
        f"{mod} imports {dep}"
        for mod, deps in _imports(_modules()).items()
        if mod != "cmal"
        for dep in deps
        if _layer(dep) != _layer(mod) and _layer(dep) not in ALLOWED[_layer(mod)]
    )
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = _imports(_modules())
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_a_cycle_and_a_wrong_layer(tmp_path, monkeypatch):
    pkg = tmp_path / "cmal"
    (pkg / "model").mkdir(parents=True)
    (pkg / "engine").mkdir()
    (pkg / "model" / "a.py").write_text("from cmal.engine.b import x\n")
    (pkg / "engine" / "b.py").write_text("from cmal.model.a import y\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    graph = _imports(_modules())
    assert graph == {"cmal.model.a": {"cmal.engine.b"}, "cmal.engine.b": {"cmal.model.a"}}
    for check in (test_layers_import_only_the_layers_below_them, test_no_import_cycles):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed on a broken package")
