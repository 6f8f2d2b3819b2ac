"""Read and rewrite the hyperparameter constants of train.py with `ast`.

A constant is a module-level `NAME = expression` with an upper-case name. Rewriting swaps only
the right-hand sides of the named constants, character for character, so comments, layout and
every other line stay as they were; the result is checked to compile and to differ from the
original in those assignments only.
"""
import ast
import json
import operator
import re
import subprocess
import sys
from pathlib import Path

from mcp_server.core.history import CONSTANT_NAME, find_constants

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


class ConstantError(ValueError):
    """A constant that is missing, ambiguous or cannot be evaluated or rewritten."""


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


def format_value(value) -> str:
    """Python source for a value, in the style a person would write in a constants block."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int) and value >= 1024 and value & (value - 1) == 0:
        return f"2**{value.bit_length() - 1}"  # batch sizes read better as powers of two
    if isinstance(value, str):
        return json.dumps(value)  # double quotes, like the rest of train.py
    if isinstance(value, tuple):
        inner = ", ".join(format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)


def rewrite_constants(source: str, changes: dict) -> str:
    """train.py's source with the right-hand sides of the named constants replaced by literals."""
    constants = find_constants(source)
    for name in changes:
        if name not in constants:
            raise ConstantError(f"train.py has no constant {name}")
        if constants[name] is None:
            raise ConstantError(f"{name} is assigned more than once at module level in train.py")
    lines = source.splitlines(keepends=True)
    # Bottom-up, so earlier positions stay valid while later segments change length.
    for name in sorted(changes, key=lambda n: (constants[n].value.lineno, constants[n].value.col_offset),
                       reverse=True):
        node = constants[name].value
        start, end = node.lineno - 1, node.end_lineno - 1
        head = lines[start][:byte_to_char(lines[start], node.col_offset)]
        tail = lines[end][byte_to_char(lines[end], node.end_col_offset):]
        lines[start:end + 1] = [head + format_value(changes[name]) + tail]
    new_source = "".join(lines)
    compile(new_source, "train.py", "exec")
    unexpected = changed_statements(source, new_source) - set(changes)
    if unexpected:
        raise ConstantError(f"rewrite changed more than asked: {sorted(unexpected)}")
    return new_source


def byte_to_char(line: str, byte_offset: int) -> int:
    """ast column offsets count UTF-8 bytes; slicing needs characters."""
    return len(line.encode("utf-8")[:byte_offset].decode("utf-8"))


def changed_statements(old_source: str, new_source: str) -> set[str]:
    """Names of the constants whose assignments differ; any other difference is an error."""
    old_body, new_body = ast.parse(old_source).body, ast.parse(new_source).body
    if len(old_body) != len(new_body):
        raise ConstantError("the two versions of train.py have different statements, not just constants")
    changed = set()
    for old, new in zip(old_body, new_body):
        if ast.dump(old) == ast.dump(new):
            continue
        same_target = (isinstance(old, ast.Assign) and isinstance(new, ast.Assign)
                       and ast.dump(old.targets[0]) == ast.dump(new.targets[0]) and len(old.targets) == 1
                       and isinstance(old.targets[0], ast.Name) and CONSTANT_NAME.match(old.targets[0].id))
        if not same_target:
            raise ConstantError(f"line {old.lineno} of train.py changed beyond a constant's value")
        changed.add(old.targets[0].id)
    return changed
