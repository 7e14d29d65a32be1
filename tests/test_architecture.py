"""The shape of the code: the import graph of the project's own modules has no circles and no
upward imports between subsystems, no module imports another's private name, and files and
functions stay readable (docs/architecture.md draws the layers)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOP = ("train.py", "trainers.py", "losses.py", "preference_datasets.py")
# lowest first: a module may import its own subsystem and the layers below, never above
LAYERS = [
    ("harness.run_dir",),
    ("losses", "harness.registry", "harness.checkpoints"),
    ("harness.data",),
    ("preference_datasets",),
    ("harness.models",),
    ("harness.parallel",),
    ("harness.objectives", "harness.feedback"),
    ("harness.training",),
    ("harness.rl", "trainers", "harness.evaluation"),
    ("train",),
]


def project_modules() -> dict[str, Path]:
    files = [REPO / f for f in TOP] + sorted((REPO / "harness").rglob("*.py"))
    return {str(f.relative_to(REPO))[:-3].replace("/__init__", "").replace("/", "."): f
            for f in files}


SUBPACKAGES = {p.name for p in (REPO / "harness").iterdir() if (p / "__init__.py").exists()}


def subsystem(module: str) -> str:
    """harness.<package> for the modules of a harness subpackage, else the module itself."""
    parts = module.split(".")
    if parts[0] == "harness" and len(parts) > 1 and parts[1] in SUBPACKAGES:
        return ".".join(parts[:2])
    return module


def layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: add it")


def imports(path: Path, modules: dict) -> list[tuple[str, list[str]]]:
    """(imported project module, names taken from it) for every import, function-local ones
    included."""
    me = next((m for m, f in modules.items() if f == path), path.stem)  # scripts: their stem
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [(f"{base}.{a.name}", []) if f"{base}.{a.name}" in modules else
                       (base, [a.name]) for a in node.names]
        else:
            continue
        for name, taken in targets:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me:
                found.append((name, taken))
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: {t for t, _ in imports(f, modules)} for m, f in modules.items()}


def test_no_import_circles():
    edges, circles = graph(), []
    index, low, stack, on_stack = {}, {}, [], set()

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))
    for v in edges:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_no_upward_imports_between_subsystems():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
              if subsystem(a) != subsystem(b) and layer(b) >= layer(a)]
    assert not upward, "imports of a layer at or above the importer's:\n" + "\n".join(upward)


def test_no_module_imports_a_private_name():
    modules = project_modules()
    scripts = sorted((REPO / "scripts").rglob("*.py")) + sorted((REPO / "tests").glob("*.py"))
    private = []
    for path in [*modules.values(), *scripts]:
        for module, taken in imports(path, modules):
            private += [f"{path.relative_to(REPO)}: {module}.{n}" for n in taken
                        if n.startswith("_")]
    assert not private, "\n".join(private)


def source_files():
    return [REPO / f for f in TOP] + sorted((REPO / "harness").rglob("*.py")) + sorted(
        (REPO / "scripts").rglob("*.py"))


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_files_and_functions_stay_readable(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 420, f"{path.name}: {len(text.splitlines())} lines"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 60]
    assert not long, f"{path.name}: functions over 60 lines: {long}"
