"""The layout's rules, read from the code itself: no import cycle inside mcp_server (imports inside
functions count too: they run sooner or later), no module outside tests/ over MAX_MODULE_LINES and
no class over MAX_CLASS_LINES (a reader holds one module in mind at a time)."""
import ast
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "mcp_server"
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400
# Modules over the limit, each with the reason it may be for now
OVERSIZED: dict[str, str] = {}


def python_files() -> list[Path]:
    """Every .py file git knows or would add (tracked, or untracked and not ignored)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [REPO / name for name in sorted(set(out.split())) if (REPO / name).is_file()]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that this file imports, anywhere in it. `from a import b` names
    module a.b if b is one, else a; importing a.b also runs the packages above it."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            found |= {".".join(parts[:k]) for k in range(1, len(parts) + 1)} & modules
    return found - {here}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in python_files() if p.relative_to(REPO).parts[0] == PACKAGE}
    return {name: imported_modules(path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_walk_sees_the_package_and_a_cycle_when_there_is_one():
    graph = import_graph()
    assert "mcp_server.loop" in graph["mcp_server.server"]  # the walk reads real imports
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_inside_mcp_server():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}: move what both need into a module beneath them"


def test_no_module_outside_tests_is_over_the_limit():
    over = {}
    for path in python_files():
        rel = path.relative_to(REPO).as_posix()
        lines = len(path.read_text().splitlines())
        if rel.split("/")[0] != "tests" and lines > MAX_MODULE_LINES and rel not in OVERSIZED:
            over[rel] = lines
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}; split them by what they do"
    assert all((REPO / rel).exists() for rel in OVERSIZED), "an exempted module is gone: drop it from OVERSIZED"


def test_no_class_outside_tests_is_over_the_limit():
    over = {}
    for path in python_files():
        rel = path.relative_to(REPO).as_posix()
        if rel.split("/")[0] == "tests" or rel in OVERSIZED:
            continue
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                over[f"{rel}::{node.name}"] = node.end_lineno - node.lineno + 1
    assert not over, f"classes over {MAX_CLASS_LINES} lines: {over}; split them by what they do"
