"""The package's import graph has no cycle, counting function-local imports too (a cycle hidden behind a local
import still couples the modules and breaks as soon as someone hoists the import)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"manu_fast": ROOT / "manu_fast", "manu_fast.backends": ROOT / "manu_fast" / "backends",
            "manu_fast.kernels": ROOT / "kernels"}  # kernels/ installs as manu_fast.kernels


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.glob("*.py"):
            out[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its body (``from . import x`` resolves to module x)."""
    is_pkg = path.stem == "__init__"
    base = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                mod = f"{parent}.{node.module}" if node.module else parent
            else:
                mod = node.module
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import manu_fast.kernels.common` -> that module; a name in a module -> the module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    mods = _modules()
    graph = {name: _imports(name, path, set(mods)) - {"manu_fast"} for name, path in mods.items()}
    assert graph["manu_fast.ops"] >= {"manu_fast.schema", "manu_fast.backends.reference"}  # the parser sees real edges
    assert graph["manu_fast.backends.reference"] >= {"manu_fast.stats", "manu_fast.backends.contract"}  # relative ..
    assert "manu_fast.kernels" in graph["manu_fast.ops"]  # ... function-local ones included
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_low_modules_import_nothing_of_the_package():
    mods = _modules()
    for low in ("manu_fast.schema", "manu_fast.activations"):
        deps = _imports(low, mods[low], set(mods)) - {"manu_fast"}
        assert deps <= {"manu_fast.activations"}, (low, deps)
    assert not _imports("manu_fast.schema", mods["manu_fast.schema"], set(mods)), "schema.py is the vocabulary: no imports"
    assert "import torch" not in mods["manu_fast.schema"].read_text()
