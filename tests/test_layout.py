"""The layout's rules, read from the code itself: no import cycle inside mcp_server (imports inside
functions count too: they run sooner or later), nor between its sub-packages; each sub-package
imports only what its __init__ docstring allows; no module outside tests/ over MAX_MODULE_LINES and
no class over MAX_CLASS_LINES (a reader holds one module in mind at a time)."""
import ast
import re
import subprocess
import sys
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


def sub_packages() -> list[str]:
    return sorted(module_name(p) for p in python_files()
                  if p.name == "__init__.py" and p.relative_to(REPO).parts[0] == PACKAGE and p.parent != REPO / PACKAGE)


def package_of(module: str, packages: list[str]) -> str:
    """The sub-package a module is in, or mcp_server for the top level (the MCP surface)."""
    return next((p for p in packages if module == p or module.startswith(p + ".")), PACKAGE)


def declared_imports(package: str) -> set[str]:
    """What the package's docstring says it may import, from its line 'Imports from the package: a, b.'"""
    doc = ast.get_docstring(ast.parse((REPO / package.replace(".", "/") / "__init__.py").read_text())) or ""
    line = re.search(r"^Imports from the package: (.+?)\.?$", doc, re.M)
    assert line, f"{package}/__init__.py must say what it may import ('Imports from the package: ...')"
    names = line.group(1).strip()
    return set() if names == "nothing" else {f"{PACKAGE}.{name.strip()}" for name in names.split(",")}


def package_graph() -> dict[str, set[str]]:
    """Which sub-package (or the top level) imports which. A package's own __init__ imports nothing
    (test_package_inits_import_nothing), so importing through it adds no edge."""
    packages, graph = sub_packages(), import_graph()
    edges: dict[str, set[str]] = {}
    for module, targets in graph.items():
        here = package_of(module, packages)
        edges.setdefault(here, set()).update(
            package_of(t, packages) for t in targets if t not in packages and t != PACKAGE)
    return {p: targets - {p} for p, targets in edges.items()}


def test_package_inits_import_nothing():
    """The hooks import mcp_server.core.limits with a bare Python: the packages above it must import nothing."""
    for path in python_files():
        if path.name == "__init__.py" and path.relative_to(REPO).parts[0] == PACKAGE:
            tree = ast.parse(path.read_text())
            assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))], path


def test_each_package_imports_only_what_its_docstring_says_and_none_the_top_level():
    graph = package_graph()
    assert sub_packages(), "the walk found no sub-package"
    for package in sub_packages():
        extra = graph.get(package, set()) - declared_imports(package)
        assert not extra, f"{package} imports {sorted(extra)}, which its docstring does not allow"
    cycle = find_cycle(graph)
    assert cycle is None, f"packages import each other: {' -> '.join(cycle)}"


def test_standard_library_only_packages_import_nothing_else():
    """A package whose docstring says 'Standard library only' (the scripts cluster.package ships to a
    node's bare Python) imports only the standard library and its own modules."""
    for package in sub_packages():
        folder = REPO / package.replace(".", "/")
        if "Standard library only" not in (ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""):
            continue
        own = {p.stem for p in folder.glob("*.py")} | {package}
        for path in folder.glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                for name in names:
                    allowed = name.split(".")[0] in sys.stdlib_module_names | {"__future__"} or \
                        name in own or name.rpartition(".")[0] == package or name == package
                    assert allowed, f"{path.relative_to(REPO)} imports {name}: its package is standard library only"
