"""The layers point one way: index -> decoding -> pipelines / serving -> support -> bench.

Every import of every module is read with `ast`, those inside functions too (an import moved into
a function still ties the layers, it only hides the tie until run time).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# support/ holds what tests and benchmarks share (load generator, fault injection, ports, a
# local cluster, the S3 server): above what it drives, below the benchmarks.
# pipelines/ and serving/ side by side: neither imports the other (the main job is two commands,
# pipelines.quickstart then serving.quickstart).
LAYERS = {"index": 0, "decoding": 1, "pipelines": 2, "serving": 2, "support": 3, "bench": 4}
FORBIDDEN = {"index": {"ray", "torch", "transformers"}, "decoding": {"ray"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in LAYERS for p in sorted((REPO / pkg).rglob("*.py"))}


def _imports(path: Path, name: str) -> list[tuple[str, int, bool]]:
    """(imported module, line) for every import statement in the file; `from a import b` gives
    a.b (when a.b is a module this resolves below) and a. An import under TYPE_CHECKING counts
    too: a type named across layers or round a circle ties them as much as a call does."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names if a.name != "*"]
    return out


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """Project module -> project modules it imports; and the layer violations found on the way."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    problems: list[str] = []
    for name, path in modules.items():
        top = name.split(".")[0]
        where = f"{path.relative_to(REPO)}"
        for imported, line in _imports(path, name):
            root = imported.split(".")[0]
            if root in FORBIDDEN.get(top, ()):
                problems.append(f"{where}:{line} imports {root} ({top}/ must not use {root})")
            if root not in LAYERS:
                continue
            if imported in modules:
                if imported != name:
                    graph[name].add(imported)
            elif imported.rpartition(".")[0] not in modules and imported not in modules:
                problems.append(f"{where}:{line} imports {imported}, which is no module of the project")
            if LAYERS[root] > LAYERS[top]:
                problems.append(f"{where}:{line} imports {root}: {top} (layer {LAYERS[top]}) "
                                f"must not import {root} (layer {LAYERS[root]})")
            elif top != root and LAYERS[root] == LAYERS[top]:
                problems.append(f"{where}:{line} imports {root}: {top} must not import {root}")
    return graph, list(dict.fromkeys(problems))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_every_package():
    graph, _ = _graph()
    assert {m.split(".")[0] for m in graph} == set(LAYERS)
    assert "decoding.engine" in graph["decoding.methods"] or "decoding.drafters" in graph["decoding.methods"]


def test_no_import_points_up_or_sideways():
    _, problems = _graph()
    assert not problems, "layer violations:\n" + "\n".join(problems)


def test_no_import_cycles():
    graph, _ = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)
