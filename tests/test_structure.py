"""The package's shape: no import cycle, io/ knows nothing of LoRA, the CLI starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys

from helpers import ROOT

PACKAGE = ROOT / "adaptkit"


def _modules() -> dict[str, object]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the adaptkit modules it imports (top level or inside functions)."""
    mods = _modules()
    graph = {}
    for mod, path in mods.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                name = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                targets = [name] + [f"{name}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in mods and t != mod}
        graph[mod] = deps - {"adaptkit"}  # the package root only holds __version__ and lazy names
    return graph


def strongly_connected(graph):
    """Tarjan's algorithm: the components of more than one module are the import cycles."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]


def test_no_import_cycle():
    assert strongly_connected(import_graph()) == []


def test_io_imports_nothing_of_lora():
    for mod, deps in import_graph().items():
        if mod.startswith("adaptkit.io"):
            assert all(d.startswith("adaptkit.io") or d == "adaptkit.errors" for d in deps), (mod, deps)


def test_the_adapter_model_does_not_import_its_formats():
    assert not any(d.startswith("adaptkit.formats") for d in import_graph()["adaptkit.adapter"])


def test_cli_help_does_not_import_torch():
    code = "import sys; from adaptkit.cli import main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
