"""No import cycles between privbench's modules: every import statement is read, function-local ones
included, since a cycle hidden inside a function still ties the two modules together. The one
exception is a package importing its own plug-in modules so that they register (privbench.methods
imports dp_merf, which imports the registry from privbench.methods)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each top-level package of the project lives (pyproject.toml's package-dir).
PACKAGES = {"privbench": ROOT / "privbench", "privbench.methods": ROOT / "methods", "privbench.attacks": ROOT / "attacks"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if any(path.is_relative_to(other) for name, other in PACKAGES.items() if other != folder and other.is_relative_to(folder)):
                continue
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts))
            found[name] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` (module `name`) imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t in known}
    return out - {name}


def graph() -> dict[str, set[str]]:
    found = modules()
    edges = {name: imports(path, name, set(found)) for name, path in found.items()}
    # A package importing its own direct submodules (its plug-ins, or what it re-exports) is no cycle.
    return {name: {t for t in targets if t.rpartition(".")[0] != name} for name, targets in edges.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_reader_sees_function_local_imports_and_finds_a_planted_cycle():
    edges = graph()
    assert "privbench.methods" in edges["privbench.config"] or "privbench.config" not in edges["privbench.methods"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert len(modules()) > 40


def test_no_module_imports_itself_through_others():
    assert cycles(graph()) == []
