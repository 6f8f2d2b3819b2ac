"""Whether two train.py are one program "but for comments and layout" (programs.same_program), where the server's
Python cannot parse them: a best written in newer syntax than the server's interpreter is compared by its tokens,
not byte for byte. Played through the real server (the fake trainer reads its knobs and ignores the rest), and at the
unit level against the syntax trees where the server can parse both."""
import ast
import io
import random
import sys
import tokenize
from pathlib import Path

import pytest

from mcp_server.core.programs import MAX_PROGRAM_BYTES, program_tokens, same_program, unreadable_program
from server_support import Lab, ledger_lines, make_workspace

# a syntax of each newer Python than the oldest server (3.11): a best in it cannot be parsed by an older server
NEWER_SYNTAX = {(3, 12): "type Seconds = float\n\ndef first[T](items: list[T]) -> T:\n    return items[0]\n",
                (3, 14): "try:\n    pass\nexcept ValueError, TypeError:\n    pass\n"}


def newer_best() -> str:
    newer = [source for version, source in NEWER_SYNTAX.items() if version > sys.version_info[:2]]
    if not newer:
        pytest.skip(f"no syntax newer than this Python {sys.version_info[0]}.{sys.version_info[1]} is known here")
    return "VAL_BPB = 1.0  # the baseline\n" + newer[0]


def test_the_bests_program_in_newer_syntax_with_a_comment_edited_is_no_change(fake_env, monkeypatch):
    """Review 81: a best written in syntax newer than the server's Python (`type X = int` under 3.11) did not parse,
    so the comparison fell back to its bytes, and the best's own program with a comment edited was a candidate: a
    second draw of one program, kept once its luck went its way (stop 48's rule got around). Compared by its tokens,
    it is no change, as it is where the server parses it."""
    monkeypatch.setenv("FAKE_NOISE", "0.01")  # runs 1, 2, 3 measure 1.0, 1.01, 0.99
    best = newer_best()
    lab = Lab(make_workspace(fake_env, best))
    try:
        lab.baseline()
        lab.ok("discard", run=lab.ok("run_experiment", description="the best again", rerun=True)["run"])
        edited = best.replace("# the baseline", "# the baseline, a comment edited") + "\n\n# and a blank line\n"
        (lab.ws / "train.py").write_text(edited)
        lucky = lab.ok("run_experiment", description="the best, commented")
        assert lucky["val_bpb"] == 0.99 and lucky["next"].startswith("run 3's train.py is the program of the best"), lucky
        before = (ledger_lines(lab.ws), lab.loop.state.load().get("kept_commit"))
        for refused in (lab.refused("keep"), lab.refused("keep", unconfirmed=True), lab.refused("confirm")):
            assert "no change to keep or confirm. discard(run=3)" in refused, refused
        assert (ledger_lines(lab.ws), lab.loop.state.load().get("kept_commit")) == before
        lab.ok("discard")
        (lab.ws / "train.py").write_text(edited.replace("items[0]", "items[1]").replace("TypeError", "KeyError"))
        changed = lab.ok("run_experiment", description="really another program")
        assert not changed["next"].startswith("run 4's train.py is the program"), changed
    finally:
        lab.loop.shutdown()


def test_a_line_after_a_lone_carriage_return_is_code_not_part_of_the_comment_before_it(fake_env):
    """Review 82: Python reads a lone carriage return as a line end (its source's newlines translated first), so in
    `# knob\rVAL_BPB = 0.9` the assignment is code; the server's tokenize, reading lines split at \n only, took it for
    the rest of the comment and dropped it. A best in newer syntax and a real edit of that line were "the same
    program", and the edit (a gain of 0.1) was refused as no change."""
    best = "# the knob\rVAL_BPB = 1.0\n" + newer_best()
    lab = Lab(make_workspace(fake_env, best))
    try:
        lab.baseline()
        (lab.ws / "train.py").write_bytes(best.replace("VAL_BPB = 1.0\n", "VAL_BPB = 0.9\n", 1).encode())
        changed = lab.ok("run_experiment", description="the knob tuned")
        assert changed["val_bpb"] == 0.9 and "is the program of the best" not in changed["next"], changed
        assert lab.ok("keep", unconfirmed=True)["kept_commit"] == changed["commit"]
    finally:
        lab.loop.shutdown()
    assert not same_program(b"type X = int\n# k\rLR = 1\n", b"type X = int\n# k\rLR = 2\n")
    assert same_program(b"type X = int\r\nLR = 1\r\n", b"type X = int\nLR = 1\n")


# pairs the syntax tree takes for one program, on every Python: comments and layout, and how a literal is spelled
SAME = [("x = 1  # one\n", "x = 1\n\n# a comment of its own\n"),
        ("if x:\n  y = 1\n", "if x:\n        y = 1\n"),
        ("x = f(1,\n      2)\n", "x = f(1, 2)\n"),
        ("x = 1 + \\\n    2\n", "x = 1 + 2\n"),
        ("x = 1;\n", "x = 1\n"),
        ("x = 'a'\n", 'x = """a"""\n'),
        ("x = 'a' 'b'\n", "x = 'ab'\n"),
        ("x = 1_000\n", "x = 1000\n"),
        ("x = 0x10\n", "x = 16\n"),
        ("x = '\\\\d'\n", "x = r'\\d'\n"),
        ("\ufb01 = 1\n", "fi = 1\n"),  # the ligature, as Python reads identifiers (NFKC)
        (b"# -*- coding: latin-1 -*-\nx = '\xe9'\n", "x = '\u00e9'\n"),
        ("def f():\n    return 1\n", "def f():\n\n    return 1   # the same\n")]

# pairs that are other programs: a changed literal, name, operator, docstring or block
OTHER = [("x = 'a'\n", "x = 'b'\n"), ("x = 'a'\n", "x = b'a'\n"), ("x = 'a'\n", "x = u'a'\n"),
         ("x = 1\n", "x = 2\n"), ("x = 1000\n", "x = 1000.0\n"), ("x = 1\n", "x = 1j\n"),
         ("x = 1\n", "y = 1\n"), ("x = a + b\n", "x = a - b\n"), ("x = f'{a!r}'\n", "x = f'{a!s}'\n"),
         ('def f():\n    "what f does"\n', 'def f():\n    "what f did"\n'),
         ('def f():\n    "what f does"\n', "def f():\n    pass\n"),
         ("if x:\n    y()\nz()\n", "if x:\n    y()\n    z()\n"),
         ("x = 'a' 'b'\n", "x = 'a'\n'b'\n")]


def encoded(source) -> bytes:
    return source if isinstance(source, bytes) else source.encode()


@pytest.mark.parametrize("a, b", SAME)
def test_comments_and_layout_are_one_program_by_tokens_as_by_the_syntax_tree(a, b):
    a, b = encoded(a), encoded(b)
    assert ast.dump(ast.parse(a)) == ast.dump(ast.parse(b))
    assert program_tokens(a) is not None and program_tokens(a) == program_tokens(b)


@pytest.mark.parametrize("a, b", OTHER)
def test_a_changed_literal_name_operator_docstring_or_block_is_another_program_by_tokens(a, b):
    """The adversary's side: a change the syntax tree sees is no "same program" by tokens either."""
    a, b = encoded(a), encoded(b)
    assert ast.dump(ast.parse(a)) != ast.dump(ast.parse(b))
    assert program_tokens(a) is not None and program_tokens(a) != program_tokens(b)


def test_tokens_never_call_a_change_to_the_real_train_py_the_same_program():
    """150 tokens of the repository's train.py, each changed alone (a number, a string, a name, an operator, a
    comment): the tokens call it the same program exactly where the syntax tree does."""
    source = (Path(__file__).resolve().parent.parent / "train.py").read_bytes()
    lines, base = source.decode().splitlines(keepends=True), program_tokens(source)
    tokens = [t for t in tokenize.tokenize(io.BytesIO(source).readline) if t.start[0] == t.end[0]]
    changes = {tokenize.NUMBER: lambda s: s + "1", tokenize.NAME: lambda s: s + "x", tokenize.COMMENT: lambda s: "# new",
               tokenize.STRING: lambda s: s[:-1] + "z" + s[-1], tokenize.OP: lambda s: {"+": "-", "*": "+"}.get(s)}
    tried = 0
    for token in random.Random(0).sample([t for t in tokens if t.type in changes], 150):
        new = changes[token.type](token.string)
        if not new or token.string.endswith('"""'):
            continue
        row, (start, end) = token.start[0] - 1, (token.start[1], token.end[1])
        changed = "".join(lines[:row] + [lines[row][:start] + new + lines[row][end:]] + lines[row + 1:]).encode()
        try:
            same_tree = ast.dump(ast.parse(changed)) == ast.dump(ast.parse(source))
        except SyntaxError:
            continue
        assert (program_tokens(changed) == base) == same_tree, (token, new)
        tried += 1
    assert tried > 50


def test_the_bests_program_in_newer_syntax_is_compared_by_tokens():
    best = newer_best().encode()
    edited = best.replace(b"# the baseline", b"# edited") + b"\n# more\n"
    assert unreadable_program(best) is None  # a keep logged by hand of it is a best the rule reads
    assert same_program(best, edited) and same_program(edited, best)
    for other in (best.replace(b"1.0", b"1.5"), best.replace(b"VAL_BPB", b"VAL_BPC"), best + b"x = 'a'\n"):
        assert not same_program(best, other)
    padded = edited + b"# " + b"x" * MAX_PROGRAM_BYTES + b"\n"
    assert not same_program(best, padded)  # over the cap, bytes only


@pytest.mark.parametrize("a, b", [('x = f"{d["#a"]}"\n', 'x = f"{d["#b"]}"\n'),  # 3.12's nested quotes
                                  ('x = f"""{d["""\n#a\n"""]}"""\n', 'x = f"""{d["""\n#b\n"""]}"""\n'),
                                  ('x = t"{d["#a"]}"\n', 'x = t"{d["#b"]}"\n'),  # 3.14's template strings
                                  ('x = f"{d\n[1]}"\n', 'x = f"{d\n[2]}"\n')])  # 3.12's lines in one
def test_a_string_an_older_tokenizer_would_misread_is_never_the_same_program(a, b):
    """Under 3.11, f"{d["#a"]}" reads as the string f"{d[" and a comment: its key changed would be a comment edited.
    Where the server's tokenizer may misread a string, the source is compared by its bytes."""
    a, b = encoded(a), encoded(b)
    assert not same_program(a, b)
    if sys.version_info < (3, 12):
        assert program_tokens(a) is None


@pytest.mark.parametrize("source", [b"x = 1  # \0\n", b"x = '''never closed\n", b"x = (1,\n",
                                    b"if x:\n    y()\n  z()\n",
                                    b"# coding: rot13\nx = 1\n"])  # review 83: no text encoding, LookupError
def test_a_source_no_tokenizer_reads_is_compared_by_its_bytes(source):
    assert program_tokens(source) is None
    assert not same_program(source, source + b"# a comment\n")
    assert "nor do its tokens read" in unreadable_program(source)


def test_a_whole_number_too_long_to_write_in_decimal_fails_no_answer(lab):
    """Review 83: Python writes no int of over 4,300 decimal digits (int_max_str_digits), and both the syntax tree's
    dump and the tokens' digest wrote each number in decimal: a train.py holding `TABLE = 0xfff...` (4 kB of hex, a
    program Python runs) raised ValueError out of the comparison. Its run was recorded as "the server could not record
    this run", status failed while it was pending, and a best holding one made every later run such a crash."""
    big = "TABLE = 0x" + "f" * 4000 + "\n"
    lab.baseline()
    (lab.ws / "train.py").write_text("VAL_BPB = 0.9\n" + big)
    table = lab.ok("run_experiment", description="a table in hex")
    assert table["status"] == "ok" and table["val_bpb"] == 0.9, table
    assert lab.ok("status")["next"].startswith("confirm(run=2)")
    lab.ok("keep", unconfirmed=True)
    (lab.ws / "train.py").write_text("VAL_BPB = 0.9  # the best again\n" + big)
    again = lab.ok("run_experiment", description="the best, commented")
    assert again["status"] == "ok" and again["next"].startswith("run 3's train.py is the program of the best"), again
    assert same_program(big.encode(), big.encode() + b"# c\n") and unreadable_program(big.encode()) is None
    assert not same_program(big.encode(), big.replace("f", "e", 1).encode())
