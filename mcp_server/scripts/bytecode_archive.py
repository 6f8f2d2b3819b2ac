"""The bytecode a run's interpreter may trust: none from a `__pycache__` the agent can write.

Python runs a `.pyc` whose header carries its source's size and mtime without reading the source
again, and both fields are easy to copy: a `.pyc` crafted with them and planted beside a module a run
or the harness's evaluator imports would run with train.py's diff and the environment's pin
(core/envpin.py, which leaves bytecode out) unchanged. So neither reads bytecode from the source tree:

- the evaluator and a harness run's interpreter import through trusted_import.py, which reads no
  bytecode from a file: it compiles each module from its source, or takes the archive's code where
  its checked hash fits the source;
- a sandboxed run's bytecode folder (its subprocesses') is in its private /tmp
  (sandbox.BYTECODE_PREFIX): they read what they compiled and what warm_train.py unpacked there from
  the archive below;
- the archive: checked hash-based `.pyc` files (PEP 552) of the modules the warm interpreter preloads.
  The importer hashes each module's source as it is at import time and compiles it afresh where the
  hash differs, so an archive made while a source was edited (and put back since) only costs a
  compile. Two processes of the training's interpreter make it, both isolated, without site and
  writing no bytecode: one imports the preload to list the source files (it runs the environment's
  code, its bytecode included, so its list is all it gives), the other, which imports nothing from the
  environment and reads no bytecode, compiles each listed source. The server keeps the archive, a
  marshalled {source path: .pyc bytes}, in a sealed memory file (executors/bytecode.py): no process
  can write it, and each run's interpreter reads it through its fd.

    python -I -S -B bytecode_archive.py --list SITE_FOLDER...  > SOURCES
    python -I -S -B -X pycache_prefix=NOWHERE bytecode_archive.py --compile < SOURCES > ARCHIVE

Standard library only: it runs with the training's interpreter, beside warm_train.py.
"""
from __future__ import annotations  # a node's Python may be older than 3.10

import importlib.util
import json
import marshal
import os
import sys
from pathlib import Path

READ_CHUNK = 1 << 20


def checked_pyc(source: str) -> bytes:
    """A checked hash-based .pyc of a source file: the importer compares the hash with the source's."""
    with open(source, "rb") as f:
        data = f.read()
    code = compile(data, source, "exec", dont_inherit=True)
    flags = 0b11  # hash-based, check the source
    return importlib.util.MAGIC_NUMBER + flags.to_bytes(4, "little") + importlib.util.source_hash(data) + \
        marshal.dumps(code)


def imported_sources() -> list[str]:
    """The source file of every module imported so far that was loaded from a .py file."""
    found = []
    for module in list(sys.modules.values()):
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None)
        if spec and spec.has_location and spec.cached and isinstance(origin, str) and origin.endswith(".py"):
            found.append(origin)
    return sorted(set(found))


def compiled(sources: list[str]) -> dict:
    """{source path: checked .pyc bytes} of those that compile."""
    archive = {}
    for source in sources:
        try:
            archive[source] = checked_pyc(source)
        except (OSError, SyntaxError, ValueError):
            continue
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


def unpack(fd: int) -> dict:
    """The archive, {source path: .pyc}, its files written where this interpreter's subprocesses look
    for bytecode where that is a private folder (sys.pycache_prefix, the sandbox's); {} where there is
    none or it is not one."""
    try:
        archive = marshal.loads(read(fd))
    except (OSError, ValueError, EOFError, TypeError):
        return {}
    if not isinstance(archive, dict):
        return {}
    for source, data in archive.items() if sys.pycache_prefix else ():
        target = Path(importlib.util.cache_from_source(source))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        except OSError:
            continue
    return archive


def main() -> int:
    if sys.argv[1:2] == ["--compile"]:  # imports nothing from the environment: the listed sources compiled
        sources = json.load(sys.stdin)
        sys.stdout.buffer.write(marshal.dumps(compiled([s for s in sources if isinstance(s, str)])))
        return 0
    # --list: -I left this script's folder off the path, -S the site folders (no .pth or sitecustomize runs)
    sys.path[:0] = [os.path.dirname(os.path.abspath(__file__))]
    sys.path.extend(sys.argv[2:])
    import warm_train  # beside this script
    warm_train.preload()
    print(json.dumps(imported_sources()))  # the last line: what the imports printed comes before it
    return 0


if __name__ == "__main__":
    sys.exit(main())
