"""The package's layers, read from its imports: no circle, no import of a higher layer from a
lower one, and an import inside a function only where a comment says why.

The layers, lowest first (``docs/architecture.md`` says what each holds)::

    errors, version                     exceptions and the version
    core, compress, data                the model, optimizer, links; compressors; datasets
    config, presets                     the validated configuration and the named methods
    runtime                             what a run records: metrics, checkpoints, disk faults
    ps, baselines                       the parameter-server roles; DDP and the hook
    runner                              starting a job: preflight, torchrun, one rank, --simulate
    analysis, cluster, verify           the link model; simulated clusters; the claims
    plot                                figures and reports read from run directories
    api, train, sweep, cli, hooks       what users call
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dist_quant"

LAYERS = [
    ("errors", "version"),
    ("core", "compress", "data"),
    ("config", "presets"),
    ("runtime",),
    ("ps", "baselines"),
    ("runner",),
    ("analysis", "cluster", "verify"),
    ("plot",),
    ("", "__main__", "api", "cli", "hooks", "localrun", "train", "sweep"),
]
LAYER = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(known: dict[str, Path]) -> dict[str, list[tuple[str, int, bool]]]:
    """module -> [(imported module, line, inside a function)] for the package's own modules."""
    out: dict[str, list[tuple[str, int, bool]]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        functions = [f for f in ast.walk(tree)
                     if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]
        inner = {id(n) for f in functions for n in ast.walk(f)}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == "dist_quant":
                    other = resolve(target, known)
                    if other and other != name:
                        found.append((other, node.lineno, id(node) in inner))
        out[name] = found
    return out


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_import_of_the_package_names_a_module_of_it():
    """``from dist_quant.X import y`` with X a module of the package (a moved module's old path
    fails here, not in the one run that reaches it)."""
    known = modules()
    missing = []
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] == "dist_quant" and node.module not in known:
                missing.append(f"{name}:{node.lineno} {node.module}")
            if isinstance(node, ast.Import):
                missing += [f"{name}:{node.lineno} {a.name}" for a in node.names
                            if a.name.split(".")[0] == "dist_quant" and a.name not in known]
    assert missing == []


def test_every_module_is_in_a_layer():
    assert sorted({room(m) for m in modules()} - set(LAYER)) == []


def test_no_module_imports_a_higher_layer():
    known = modules()
    upward = [f"{m}:{line} imports {other}"
              for m, found in imports(known).items() for other, line, _ in found
              if LAYER[room(other)] > LAYER[room(m)]]
    assert upward == []


def test_no_import_circle():
    graph = {m: {o for o, _, _ in found} for m, found in imports(modules()).items()}
    circles, index, low, stack, on, counter = [], {}, {}, [], set(), [0]

    def visit(v: str) -> None:   # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == []


def test_an_import_inside_a_function_says_why():
    """Inside a function only for an optional or slow dependency or a process entry point,
    with a comment on the line or the line before saying which."""
    known = modules()
    silent = []
    for m, found in imports(known).items():
        lines = known[m].read_text().splitlines()
        for _, line, inner in found:
            if inner and "#" not in lines[line - 1] and not lines[line - 2].strip().startswith("#"):
                silent.append(f"{m}:{line}")
    assert sorted(set(silent)) == []
