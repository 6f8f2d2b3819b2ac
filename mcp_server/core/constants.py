"""Rewriting train.py's constants: only the right-hand sides of the named module-level
assignments change, character for character, so comments, layout and every other line stay as
they were; the result is checked to compile and to differ from the original in those
assignments only. Used by the sweep tool (mcp_server.phases.sweep) and the demo's search (autosearch).
"""
import ast
import json

from mcp_server.core.history import CONSTANT_NAME, find_constants


class ConstantError(ValueError):
    """A constant that is missing, ambiguous or cannot be evaluated or rewritten."""


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
