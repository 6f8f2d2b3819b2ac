"""Read the hyperparameter constants of train.py with `ast` (rewriting them: mcp_server.core.constants).

A constant is a module-level `NAME = expression` with an upper-case name. Its value is evaluated
here, names resolved against earlier constants and the harness's exports.
"""
import ast
import json
import operator
import subprocess
import sys
from pathlib import Path

from mcp_server.core.constants import ConstantError, format_value, rewrite_constants  # noqa: F401 (the demo's names)
from mcp_server.core.history import find_constants

# Arithmetic a constants block may use, e.g. `2**19` or `8 * 64`.
BINARY_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos}
# Printed by a child process that imports the workspace's prepare.py: its upper-case exports
# (TRAIN_DEFAULTS, MAX_SEQ_LEN, ...) are what non-literal constants refer to.
HARNESS_EXPORTS_SCRIPT = (
    "import json, prepare\n"
    "names = {k: getattr(prepare, k) for k in dir(prepare) if k.isupper()}\n"
    "print(json.dumps({k: v for k, v in names.items() if isinstance(v, (int, float, str, bool, dict, list, tuple))}))\n"
)


def harness_exports(workspace: Path, env: dict | None = None) -> dict:
    """The upper-case exports of the workspace's prepare.py, read in a child process (it imports torch)."""
    proc = subprocess.run([sys.executable, "-c", HARNESS_EXPORTS_SCRIPT], cwd=workspace, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise ConstantError(f"could not import prepare.py in {workspace} to resolve train.py's constants:\n{tail}\n"
                            "Prepare the harness first: uv run prepare.py")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def evaluate_constants(source: str, names, harness: dict | None = None) -> dict:
    """Values of the named constants. Literals and arithmetic are evaluated here; names refer to
    earlier constants or to `harness` (prepare.py's exports), e.g. `TRAIN_DEFAULTS["depth"]`."""
    constants = find_constants(source)
    values: dict = {}

    def value_of(name: str, chain: tuple = ()):
        if name in values:
            return values[name]
        if name in chain:
            raise ConstantError(f"constant {name} refers to itself")
        node = constants.get(name)
        if node is None:
            if name in constants:
                raise ConstantError(f"{name} is assigned more than once at module level in train.py; "
                                    "keep one assignment so it can be searched")
            if harness is not None and name in harness:
                return harness[name]
            raise ConstantError(f"train.py has no constant {name}")
        values[name] = evaluate(node.value, lambda n: value_of(n, chain + (name,)), source)
        return values[name]

    return {name: value_of(name) for name in names}


def evaluate(node: ast.expr, lookup, source: str):
    """Evaluate a constant's expression: literals, tuples/lists, arithmetic, names and subscripts."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [evaluate(item, lookup, source) for item in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPS:
        return UNARY_OPS[type(node.op)](evaluate(node.operand, lookup, source))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPS:
        return BINARY_OPS[type(node.op)](evaluate(node.left, lookup, source), evaluate(node.right, lookup, source))
    if isinstance(node, ast.Name):
        return lookup(node.id)
    if isinstance(node, ast.Subscript):
        return evaluate(node.value, lookup, source)[evaluate(node.slice, lookup, source)]
    raise ConstantError(f"cannot evaluate `{ast.get_source_segment(source, node)}`: "
                        "only literals, arithmetic, names and subscripts are understood")
