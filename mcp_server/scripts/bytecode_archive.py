"""The bytecode a run's interpreter may trust: none from a `__pycache__` the agent can write.

Python runs a `.pyc` whose header carries its source's size and mtime without reading the source
again, and both fields are easy to copy: a `.pyc` crafted with them and planted beside a module a run
or the harness's evaluator imports would run with train.py's diff and the environment's pin
(core/envpin.py, which leaves bytecode out) unchanged. So neither reads bytecode from the source tree:

- the evaluator runs with `-X pycache_prefix=NOWHERE` (harness_eval.ISOLATED): it finds no bytecode
  and compiles every module from its source, in memory (once per warm evaluator);
- a sandboxed run's interpreter has its bytecode folder in its private /tmp (sandbox.BYTECODE_PREFIX):
  it reads what it compiled itself and, on the warm path, what warm_train.py unpacked there from the
  archive below before importing torch;
- the archive: the modules the warm interpreter preloads, compiled by this script, run by the server
  with the training's interpreter (isolated, without site, with no bytecode of its own: it compiles
  from source), a marshalled {source path: .pyc bytes} that the server keeps in a sealed memory file
  (executors/bytecode.py): no process can write it, and each warm interpreter reads it through its fd.

    python -I -S -B -X pycache_prefix=NOWHERE bytecode_archive.py SITE_FOLDER... > ARCHIVE

Standard library only: it runs with the training's interpreter, beside warm_train.py.
"""
from __future__ import annotations  # a node's Python may be older than 3.10

import importlib.util
import marshal
import os
import sys
from pathlib import Path

READ_CHUNK = 1 << 20


def pyc(source: str) -> bytes | None:
    """The timestamp .pyc of a source file, compiled now (None where it changed while read)."""
    before = os.stat(source)
    with open(source, "rb") as f:
        data = f.read()
    after = os.stat(source)
    if (before.st_mtime_ns, before.st_size) != (after.st_mtime_ns, after.st_size) or len(data) != after.st_size:
        return None
    code = compile(data, source, "exec", dont_inherit=True)
    header = b"".join((importlib.util.MAGIC_NUMBER, bytes(4), (int(after.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little"),
                       (after.st_size & 0xFFFFFFFF).to_bytes(4, "little")))
    return header + marshal.dumps(code)


def compiled_modules() -> dict:
    """{source path: .pyc bytes} of every module imported so far that was loaded from a .py file."""
    archive = {}
    for module in list(sys.modules.values()):
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None)
        if not (spec and spec.has_location and spec.cached and isinstance(origin, str) and origin.endswith(".py")):
            continue
        try:
            compiled = pyc(origin)
        except (OSError, SyntaxError, ValueError):
            continue
        if compiled is not None:
            archive[origin] = compiled
    return archive


def read(fd: int) -> bytes:
    """A whole file from its descriptor without moving its offset (others share it)."""
    size, chunks, offset = os.fstat(fd).st_size, [], 0
    while offset < size:
        chunk = os.pread(fd, min(READ_CHUNK, size - offset), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def unpack(fd: int) -> int:
    """The archive's .pyc files written where this interpreter looks for bytecode, which must be a
    private folder (sys.pycache_prefix, the sandbox's); the number written, 0 where there is none or
    the archive is not one."""
    if not sys.pycache_prefix:
        return 0
    try:
        archive = marshal.loads(read(fd))
    except (OSError, ValueError, EOFError, TypeError):
        return 0
    written = 0
    for source, data in archive.items() if isinstance(archive, dict) else ():
        target = Path(importlib.util.cache_from_source(source))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        except OSError:
            continue
        written += 1
    return written


def main() -> int:
    # -I left this script's folder off the path, -S the site folders: no .pth file or sitecustomize runs here
    sys.path[:0] = [os.path.dirname(os.path.abspath(__file__))]
    sys.path.extend(sys.argv[1:])
    import warm_train  # beside this script
    warm_train.preload()
    sys.stdout.buffer.write(marshal.dumps(compiled_modules()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
