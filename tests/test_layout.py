"""The house rules of the layout, read from the source: imports only point down (no cycle,
``models`` imports nothing of ``dynviz``, only ``dynviz/ui`` imports Streamlit) and no module
grows past what a reader takes in at once, nor any line of Python past 100 columns."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dynviz", "models")
MAX_LINES = 450
MAX_COLUMNS = 100


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _module_level(tree: ast.Module) -> list[ast.stmt]:
    """Every statement that runs, or is read, at module level: the body and what ``if``
    (``TYPE_CHECKING`` included) and ``try`` blocks hold, not function or class bodies."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", []) + \
                [s for h in getattr(node, "handlers", []) for s in h.body]
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules ``name`` imports at module level (``from a import b`` counts
    ``a.b`` when that is a module, else ``a``)."""
    tree = ast.parse(path.read_text())
    nodes = _module_level(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


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


def test_module_imports_have_no_cycle():
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(path, name, known)
             for name, path in modules.items()}
    # a package imports its own modules (re-exports); that is no cycle of the layers
    graph = {name: {t for t in deps if not name.startswith(t + ".")}
             for name, deps in graph.items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_models_import_nothing_of_dynviz_and_only_the_ui_imports_streamlit():
    for name, path in _modules().items():
        source = path.read_text()
        tree = ast.parse(source)
        imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and not node.level}
        if name.startswith("models"):
            assert "dynviz" not in imported, name
        if not name.startswith("dynviz.ui"):
            assert "streamlit" not in imported, name


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_is_longer_than_a_reader_takes_in(name):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines"


def test_no_line_of_python_is_wider_than_100_columns():
    paths = [ROOT / "app.py", *(p for d in (*PACKAGES, "tests", "scripts")
                                for p in (ROOT / d).rglob("*.py"))]
    wide = [f"{p.relative_to(ROOT)}:{n}" for p in paths
            for n, line in enumerate(p.read_text().splitlines(), 1) if len(line) > MAX_COLUMNS]
    assert len(paths) > 50 and not wide, wide
