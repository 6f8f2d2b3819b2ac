"""Whether two train.py sources are one program "but for comments and layout": the same bytes, the same syntax
tree, or, where the server's Python cannot parse one (syntax newer than its own), the same tokens read as Python
reads them. Also the cap on a train.py's size that keeps each comparison cheap, and why a source is too big or
unreadable to compare.

Pure functions over bytes: results.no_change asks them of a run's train.py and its best's.
"""
import ast
import functools
import hashlib
import io
import keyword
import sys
import tokenize
import unicodedata
import warnings

# the most train.py a run takes (upstream's is about 25 kB): each answer parses the undecided runs' train.py and
# their best's to compare them as programs (same_program), 17 s a call for a 6 MB one (review 80)
MAX_PROGRAM_BYTES = 1 << 20
# sources whose tree and tokens are kept, as digests (a 1 MiB source's tokens take tens of MB): every answer compares
# the same few again (the undecided runs' and their best's), and a 1 MiB newer-syntax best took 5.8 s to tokenize
# (review 82)
CACHED_SOURCES = 16


def same_program(a: bytes, b: bytes) -> bool:
    """Whether two train.py sources are one program: the same bytes, or the same syntax tree, or where the server's
    Python cannot parse one (newer syntax: review 81), the same tokens (program_tokens). Compared only up to
    MAX_PROGRAM_BYTES: every answer compares the undecided runs' with their best's."""
    if a == b:
        return True
    if max(len(a), len(b)) > MAX_PROGRAM_BYTES:
        return False
    trees = _tree(a), _tree(b)
    if None not in trees:
        return trees[0] == trees[1]
    tokens = _tokens(a)
    return tokens is not None and tokens == _tokens(b)


# what ast.parse raises on a source it cannot read: a syntax error, a null byte, nesting too deep for the parser
UNPARSABLE = (SyntaxError, ValueError, RecursionError, MemoryError)


@functools.lru_cache(maxsize=CACHED_SOURCES)
def _tree(source: bytes) -> bytes | None:
    """Its syntax tree's digest; None where the server's Python cannot parse it, or cannot write it (an int of over
    4,300 decimal digits: ValueError), where the tokens compare it."""
    try:
        return hashlib.sha256(ast.dump(_parsed(source)).encode()).digest()
    except UNPARSABLE:
        return None


@functools.lru_cache(maxsize=CACHED_SOURCES)
def _tokens(source: bytes) -> bytes | None:
    """Its program_tokens' digest (their repr: each a type and a value, written back unambiguously); None as they."""
    tokens = program_tokens(source)
    return None if tokens is None else hashlib.sha256(repr(tokens).encode()).digest()


def _parsed(source: bytes) -> ast.Module:
    with warnings.catch_warnings():  # an invalid escape in a string warns (3.12: SyntaxWarning on stderr)
        warnings.simplefilter("ignore")
        return ast.parse(source)


def program_tokens(source: bytes) -> tuple | None:
    """A train.py's tokens as its program reads them, for one in syntax newer than the server's Python: what its syntax
    tree leaves out is left out here too (comments, blank lines, spaces, line breaks inside brackets, backslashes that
    join lines, the width of an indent, a trailing semicolon, the coding cookie, how a string or number is spelled);
    docstrings are strings, kept. Stricter than the tree elsewhere (parentheses, a one-line block). None where the
    server's tokenizer may not read it as the newer Python does (a string it cannot read alone, a prefix it does not
    know such as 3.14's t"", a token it does not know) or reads none of it: such a source is compared by its bytes."""
    if b"\0" in source:  # no Python at all (a null byte in a comment ends the tokenizer's line early)
        return None
    # review 82: Python ends a line at a lone \r too (it translates a source's newlines first); tokenize's readline here
    # splits at \n only, so `# knob\rLR = 0.02` was one comment, dropped, and a real edit of LR was "the same program"
    source = source.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    kept: list[tuple] = []
    previous = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for token in tokenize.tokenize(io.BytesIO(source).readline):
                if not _read_alike(token, previous):
                    return None
                _keep(kept, token)
                previous = token
    except (tokenize.TokenError, LookupError, *UNPARSABLE):  # LookupError: a cookie of no text encoding (rot13)
        return None
    return tuple(kept)


_DROPPED = {tokenize.ENCODING, tokenize.COMMENT, tokenize.NL, tokenize.ENDMARKER}
_LAYOUT = {tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}  # their place is the program, not their text


def _read_alike(token: tokenize.TokenInfo, previous: tokenize.TokenInfo | None) -> bool:
    """Whether the server's tokenizer reads this token as a newer Python does. A newer string syntax (3.12's quotes
    nested in an f-string, 3.14's t-strings) would be misread: f"{x["#"]}" is a string f"{x[" and a comment under
    3.11, where a changed key would be a changed comment, so it must not be taken for one."""
    if token.type == tokenize.ERRORTOKEN:
        return False
    if token.type not in _STRING_STARTS:
        return True
    if previous is not None and previous.type == tokenize.NAME and previous.end == token.start \
            and not keyword.iskeyword(previous.string):  # a prefix unknown to this Python (t"...")
        return False
    if token.type == tokenize.STRING:
        ast.parse(token.string, mode="eval")  # a SyntaxError: a string this Python cannot read alone
    return True


_STRING_STARTS = {tokenize.STRING, getattr(tokenize, "FSTRING_START", tokenize.STRING)}  # 3.12 splits f-strings


def _keep(kept: list[tuple], token: tokenize.TokenInfo) -> None:
    kind, text = token.type, token.string
    if kind in _DROPPED:
        return
    if kind in _LAYOUT:
        if kind == tokenize.NEWLINE and kept and kept[-1] == (tokenize.OP, ";"):
            kept.pop()  # `x = 1;` is `x = 1`
        kept.append((kind, ""))
    elif kind == tokenize.NAME:
        kept.append((kind, unicodedata.normalize("NFKC", text)))  # as Python reads identifiers
    elif kind == tokenize.NUMBER:
        value = ast.literal_eval(text)
        # 1_000 is 1000, which is not 1000.0; an int in hex: Python writes none of over 4,300 decimal digits, and the
        # digest's repr raised ValueError on `0xfff...` (review 83), failing each answer that compared its train.py
        kept.append(("number", type(value).__name__, hex(value) if isinstance(value, int) else value))
    elif kind == tokenize.STRING and "f" not in _prefix(text):  # an f-string of 3.11 is kept as written
        value, unicode = ast.literal_eval(text), "u" if "u" in _prefix(text) else ""  # the tree keeps u"" apart
        if kept and kept[-1][:2] == ("string", type(value).__name__):
            kept[-1] = kept[-1][:2] + (kept[-1][2] + value, kept[-1][3])  # "a" "b" is "ab"
        else:
            kept.append(("string", type(value).__name__, value, unicode))
    else:
        kept.append((kind, text))


def _prefix(string: str) -> str:
    return string[:len(string) - len(string.lstrip("rRbBuUfF"))].lower()


def oversized(source: bytes) -> str | None:
    """Why a train.py is too big for a run (over MAX_PROGRAM_BYTES), or None."""
    if len(source) > MAX_PROGRAM_BYTES:
        return f"is {len(source) / 2**20:.1f} MiB, more than the {MAX_PROGRAM_BYTES >> 20} MiB a run takes"
    return None


def unreadable_program(source: bytes) -> str | None:
    """Why same_program cannot read a train.py as a program, or None. A best it cannot read makes a rerun of the
    best's own program a candidate again (review 81: logged as a keep by hand with a comment over the cap). One in
    newer syntax than the server's Python it reads by its tokens."""
    if too_big := oversized(source):
        return too_big
    if _tree(source) is not None or _tokens(source) is not None:
        return None
    why = ""
    try:
        _parsed(source)  # again, for the parser's words
    except UNPARSABLE as exc:
        why = f" ({type(exc).__name__}: {str(exc)[:120]})"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"  # the server's
    return f"does not parse as Python {version}, nor do its tokens read as a newer Python's{why}"
