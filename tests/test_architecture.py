"""The architecture's promises, checked on the source: one update loop, plugins that stand alone,
no import circle in ``mmpo``, small trainer files."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MMPO = ROOT / "mmpo"
TASKS = ROOT / "tasks"
MAX_TRAINER_LINES = 450


def _modules(package: Path, prefix: str) -> dict[str, Path]:
    out = {}
    for p in package.rglob("*.py"):
        parts = p.relative_to(package).with_suffix("").parts
        name = ".".join((prefix, *parts))
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


def _imports(path: Path) -> set[str]:
    """Every module name imported anywhere in the file (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    mods = _modules(MMPO, "mmpo")

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    return {m: {r for n in _imports(p) if (r := resolve(n)) and r != m} for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_in_mmpo():
    assert _cycles(_graph()) == []


def test_mmpo_imports_no_plugin():
    offenders = [
        str(p.relative_to(ROOT)) for p in MMPO.rglob("*.py") if any(n.startswith("mmpo_tasks") for n in _imports(p))
    ]
    assert offenders == []


def test_no_plugin_imports_another_plugin():
    offenders = []
    for plugin in sorted(d for d in TASKS.iterdir() if d.is_dir() and (d / "__init__.py").exists()):
        for p in plugin.rglob("*.py"):
            for name in _imports(p):
                if name.startswith("mmpo_tasks.") and name.split(".")[1] != plugin.name:
                    offenders.append(f"{p.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_one_loop_over_update_epochs():
    loops = []
    for p in [*MMPO.rglob("*.py"), *TASKS.rglob("*.py")]:
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"for .* in range\(.*(update_epochs|shape\.epochs)", line):
                loops.append(f"{p.relative_to(ROOT)}:{i}")
    assert loops == ["mmpo/trainers/update.py:" + loops[0].split(":")[1]] if loops else False, loops


def test_trainer_files_stay_small():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (MMPO / "trainers").glob("*.py")}
    assert {k: v for k, v in sizes.items() if v > MAX_TRAINER_LINES} == {}
