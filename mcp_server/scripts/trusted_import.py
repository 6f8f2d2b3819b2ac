"""An importer that says what it compiled: the SHA-256 of every Python source a process imported, as
it read it, and no bytecode from a file.

The server pins the environments' sources by their content at each run's check, and inotify reports
what is written between checks, but neither sees an edit made and undone between two checks through
a hard link or a memory mapping (inotify reports neither). What a process imported in that window is
known only to the process: this importer hashes each source as it reads it to compile it, and the
server compares those digests with the contents its last check verified (core/envpin.py). The
harness's evaluator and the runs' interpreters (warm_train.py) install it before they import torch.

It never reads bytecode from a `__pycache__` (a crafted `.pyc` there would run with its source's
digest) and writes none: it compiles each source, or takes the code of the server's bytecode archive
(bytecode_archive.py) where the archive's checked hash is the source's. Modules loaded from a file
that is no source (compiled ones, a `.pyc` on the path itself) are named without a digest: the server
knows whether its last check found them.

    python -I -S -B trusted_import.py SCRIPT [ARG ...]

runs SCRIPT as __main__ with this importer installed (the evaluator's command line), streaming the
digests to the descriptor RESEARCH_LOOP_DIGESTS_FD names, where it does (the worker's cold evaluator,
the pool's warm one, read by follow()); a script imports it as `trusted_import`. Standard library only, and before install() only
what is frozen or built in (no `from __future__` either: `__future__` is a source), so that nothing
but the interpreter's own start-up (its `encodings`) is compiled before the importer.
"""
import _imp
import marshal
import posix
import sys

import _frozen_importlib_external as bootstrap

try:  # an extension module: no Python source is compiled to import it
    from _hashlib import openssl_sha256 as sha256
except ImportError:  # a Python built without OpenSSL
    from hashlib import sha256

PYC_HEADER = 16  # magic, flags, the source's hash
CHECKED_HASH_FLAGS = (0b11).to_bytes(4, "little")

_IMPORTED: dict = {}  # source path -> SHA-256 (hex) of what was compiled from it, or taken from the archive
_ARCHIVE: dict = {}  # source path -> checked hash-based .pyc bytes (the server's bytecode archive)
# the descriptor each digest is written to as it is taken (warm_train.py's hand-over socket): the
# record above is the process's own, which the code of a module it imported can rewrite
_STREAM: list = []
# each .pth file's bytes as start_site() first read them (site goes over a venv's site folder twice): a file
# edited between its two readings would run lines the stream has no digest of (the first line of a path counts)
_PTH: dict = {}
# a commit's checkout (expect()): {its folder + os.sep: {path inside it: SHA-256 its commit holds}}
_CHECKOUTS: dict = {}
END = b"\n"  # the stream's last line
LOADED = "loaded"  # a line's digest for a module loaded from a file that is no source (never hashed)
DIGESTS_ENV = "RESEARCH_LOOP_DIGESTS_FD"  # the runner's stream (the evaluator's): a descriptor it inherits


class TrustedSourceLoader(bootstrap.SourceFileLoader):
    """SourceFileLoader that hashes the source it reads and never reads or writes a .pyc."""

    def get_code(self, fullname):
        path = self.get_filename(fullname)
        data = self.get_data(path)
        _took(path, data)
        _refuse_elsewhere(fullname, path, self.is_package(fullname))
        pyc = _ARCHIVE.get(path)
        if pyc is not None and archived_code_fits(pyc, data):
            return marshal.loads(memoryview(pyc)[PYC_HEADER:])
        return self.source_to_code(data, path)


class TrustedExtensionLoader(bootstrap.ExtensionFileLoader):
    """ExtensionFileLoader that names each compiled module before the dynamic linker loads it (and runs
    its code): not hashed (torch's are gigabytes), but one planted since the last check is named."""

    def create_module(self, spec):
        _stream(LOADED, self.path)
        _refuse_in_checkout(self.path)
        _refuse_elsewhere(spec.name, self.path, self.is_package(spec.name))
        return super().create_module(spec)


class TrustedSourcelessLoader(bootstrap.SourcelessFileLoader):
    """SourcelessFileLoader (a .pyc on the path itself, outside any __pycache__) that names the file."""

    def get_code(self, fullname):
        _stream(LOADED, self.get_filename(fullname))
        _refuse_in_checkout(self.get_filename(fullname))
        _refuse_elsewhere(fullname, self.get_filename(fullname), self.is_package(fullname))
        return super().get_code(fullname)


def _took(path: str, data: bytes) -> None:
    """The digest of what this process is about to run from path: recorded, and streamed before the
    code runs, which can then add lines but never take this one back. Under a checkout expect() named,
    only its commit's sources run: ImportError otherwise."""
    digest = _IMPORTED[path] = sha256(data).hexdigest()
    _stream(digest, path)
    _refuse_in_checkout(path, digest)


def _in_checkout(path: str):
    """(the commit's sources, path's name inside the checkout) for a file in a checkout expect() named, however
    its path is spelled (relative, `//`, through /proc/self/cwd, a symlink: its real path counts first, then
    the spelling); None outside any."""
    if not _CHECKOUTS:
        return None
    import os
    for name in (os.path.realpath(path), os.path.abspath(path)):
        for folder, sources in _CHECKOUTS.items():
            if name.startswith(folder):
                return sources, name[len(folder):]
    return None


def _refuse_in_checkout(path: str, digest=None) -> None:
    """ImportError for a file of a checkout expect() named whose digest is not its commit's (a file that is no
    source, digest None: a .pyc or a compiled module, never the commit's sources)."""
    found = _in_checkout(path)
    if found is not None and (digest is None or found[0].get(found[1]) != digest):
        raise ImportError(f"{path} is not the run's commit's (changed after the server checked the run's "
                          "worktree out, or no source of the commit): it was not run")


def _refuse_elsewhere(fullname: str, path: str, package: bool) -> None:
    """ImportError for a module whose file a checkout's commit holds (by its name, from the checkout's top, the
    run's sys.path[0]) loaded from another folder: with that file removed after checkout (nanochat/__init__.py:
    the slot's folder becomes a namespace portion), the name is found further down the path (an editable
    install's project: the workspace itself, whose files the agent edits freely)."""
    if not _CHECKOUTS:
        return
    name = fullname.replace(".", "/") + ("/__init__.py" if package else ".py")
    if any(name in sources for sources in _CHECKOUTS.values()) and _in_checkout(path) is None:
        raise ImportError(f"{path} stands in for {name}, a source of the run's commit missing from the run's "
                          "folder (removed after the server checked the run's worktree out): it was not run")


def expect(folder: str, sources: dict) -> None:
    """From now on, a source under folder (a commit's checkout) runs only with the digest its commit holds
    (sources: {path inside it: SHA-256}, the server's): the run's worktree is the agent's to rewrite after
    the server found it clean, and the run would train code its commit does not hold (review 43)."""
    import os  # after install(): frozen in the interpreter, but imported here as run_script does
    _CHECKOUTS[os.path.join(os.path.realpath(folder), "")] = dict(sources)
    # the other loaders that run a file of the folder: a zip on the path (zipimport runs what it holds
    # unhashed) is refused there, and importlib.util.spec_from_file_location makes this importer's loaders
    sys.path_hooks[:] = [_zip_hook(each) if getattr(each, "__name__", "") == "zipimporter" else each
                         for each in sys.path_hooks]
    sys.path_importer_cache.clear()
    bootstrap._get_supported_file_loaders = _trusted_loaders


def _trusted_loaders():
    return [(TrustedExtensionLoader, bootstrap.EXTENSION_SUFFIXES), (TrustedSourceLoader, bootstrap.SOURCE_SUFFIXES),
            (TrustedSourcelessLoader, bootstrap.BYTECODE_SUFFIXES)]


def _zip_hook(zipimporter):
    def hook(entry):
        found = _in_checkout(entry) if isinstance(entry, str) else None
        if found is not None:
            raise ImportError(f"{entry}: a zip in the run's folder is never imported from")
        return zipimporter(entry)
    hook.__name__ = "zipimporter"
    return hook


def _stream(digest: str, path: str) -> None:
    if _STREAM:
        _write(f"{digest} {path.encode('utf-8', 'surrogateescape').hex()}\n".encode())


def archived_code_fits(pyc: bytes, source: bytes) -> bool:
    """A checked hash-based .pyc of this interpreter made from exactly this source."""
    return (pyc[:4] == bootstrap.MAGIC_NUMBER and pyc[4:8] == CHECKED_HASH_FLAGS
            and pyc[8:PYC_HEADER] == _imp.source_hash(bootstrap._RAW_MAGIC_NUMBER, source))


def install(archive=None, stream=None) -> None:
    """From now on, every source this process imports goes through TrustedSourceLoader; archive: the
    server's {source path: checked .pyc}, whose code is used where it fits the source; stream: a
    descriptor each digest is written to as it is taken, until end_stream()."""
    if isinstance(archive, dict):
        _ARCHIVE.update(archive)
    if stream is not None:
        _STREAM[:] = [stream]
    hook = bootstrap.FileFinder.path_hook((TrustedExtensionLoader, bootstrap.EXTENSION_SUFFIXES),
                                          (TrustedSourceLoader, bootstrap.SOURCE_SUFFIXES),
                                          (TrustedSourcelessLoader, bootstrap.BYTECODE_SUFFIXES))
    sys.path_hooks[:] = [hook if _is_file_finder_hook(each) else each for each in sys.path_hooks]
    sys.path_importer_cache.clear()
    sys.dont_write_bytecode = True
    sys.modules.setdefault("trusted_import", sys.modules[__name__])


def start_site() -> None:
    """What site does as a plain interpreter starts (the venv's prefix, the site folders, their .pth
    files, sitecustomize and usercustomize: site.main()), for an interpreter started without it (-S)
    once install() has run, so that what a .pth file imports, and sitecustomize, go through the
    importer, and each .pth file is read once, its digest streamed before any of its lines acts
    (_add_pth in place of site's own reading of it)."""
    import site
    own = site.addpackage
    site.addpackage = _add_pth
    try:
        site.main()
    finally:
        site.addpackage = own  # for whatever the run itself asks of site later


def _add_pth(sitedir, name, known_paths):
    """site.addpackage's work from the file's bytes, read once (_PTH): a line starting with `import` is
    run (in site's namespace, from a frame whose `sitedir` is the folder's, as setuptools' namespace .pth
    files look it up), any other that is no comment nor blank names a folder added to sys.path where it
    exists; the first line that raises ends the file, as it does site's."""
    import io
    import os
    import site
    path = os.path.join(sitedir, name)
    data = _PTH.get(path)
    if data is None:
        try:
            with io.open_code(path) as f:
                data = _PTH[path] = f.read()
        except OSError:
            return known_paths
        _took(path, data)
    for number, line in enumerate(_pth_lines(data), 1):
        if line.startswith("#") or not line.strip():
            continue
        try:
            if line.startswith(("import ", "import\t")):
                exec(line, vars(site), locals())
                continue
            folder, case = site.makepath(sitedir, line.rstrip())
            if case not in known_paths and os.path.exists(folder):
                sys.path.append(folder)
                known_paths.add(case)
        except Exception:
            import traceback
            print(f"Error processing line {number} of {path}:", file=sys.stderr)
            traceback.print_exc()
            print("Remainder of file ignored", file=sys.stderr)
            break
    return known_paths


def _pth_lines(data: bytes) -> list:
    """A .pth file's lines as this interpreter's site decodes and splits them (the locale's encoding
    up to 3.12; 3.13 tries UTF-8 first)."""
    import io
    if sys.version_info < (3, 13):
        return list(io.TextIOWrapper(io.BytesIO(data), encoding="locale"))
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError:
        import locale
        return data.decode(locale.getencoding()).splitlines()


def _is_file_finder_hook(hook) -> bool:
    return getattr(hook, "__qualname__", "").startswith("FileFinder.path_hook")


def _write(data: bytes) -> None:
    while data:
        data = data[posix.write(_STREAM[0], data):]


def end_stream() -> None:
    """The stream's end line; nothing more is written to it."""
    if _STREAM:
        _write(END)
        _STREAM.clear()


def _add(found: dict, line: bytes) -> None:
    """One line of a stream into {source path: digest}: the first line of a path counts. A line no
    importer wrote: ValueError."""
    digest, path = line.split()
    found.setdefault(bytes.fromhex(path.decode()).decode("utf-8", "surrogateescape"), digest.decode())


def read_digests(lines):
    """What a stream holds, from a binary file of it: {source path: digest}; None where it ended
    before its end line. A line no importer wrote: ValueError."""
    found = {}
    for line in iter(lines.readline, END):
        if not line:
            return None
        _add(found, line)
    return found


def read_in_background(fd: int):
    """A thread that reads the stream on fd as it is written (a socket holds some 200 kB unread, and
    torch's imports write 600 kB: unread, they would wait): its .digests, once it ended, are
    read_digests' (None also for a line no importer wrote)."""
    import threading

    def read():
        try:
            with open(posix.dup(fd), "rb") as lines:
                thread.digests = read_digests(lines)
        except (OSError, ValueError):
            pass
    thread = threading.Thread(target=read, daemon=True, name="imported")
    thread.digests = None
    thread.start()
    return thread


def follow(fd: int):
    """A thread that reads a stream its writers never end (an evaluator's, whose forked children inherit
    it), until they all have exited: its .digests, {source path: digest}, the first line of a path
    counting, grow as lines come; .forged once a line no importer wrote came (then it stops reading)."""
    import threading

    def read():
        try:
            with open(fd, "rb") as lines:
                for line in lines:
                    if line != END:
                        _add(thread.digests, line)
        except (OSError, ValueError):
            thread.forged = True
    thread = threading.Thread(target=read, daemon=True, name="imported")
    thread.digests, thread.forged = {}, False
    thread.start()
    return thread


def digests() -> dict:
    """{source path: SHA-256 of the content this process compiled it from}, for every source imported
    since install()."""
    return dict(_IMPORTED)


def main() -> int:
    if len(sys.argv) < 2:
        print(f"usage: {sys.argv[0]} SCRIPT [ARG ...]", file=sys.stderr)
        return 2
    stream = posix.environ.get(DIGESTS_ENV.encode())
    install(stream=int(stream) if stream else None)
    sys.argv = sys.argv[1:]
    run_script(sys.argv[0])
    return 0


def run_script(path: str) -> None:
    """SCRIPT as __main__, compiled from the bytes whose digest is streamed first: runpy.run_path
    compiled it unseen (the evaluator's own script, in the harness copy), from a second reading of the
    file, and ran a .pyc written at its path."""
    import io
    import os
    import types
    path = os.path.abspath(path)  # as the server names the harness copy's files
    with io.open_code(path) as f:
        data = f.read()
    _took(path, data)
    module = sys.modules["__main__"] = types.ModuleType("__main__")
    module.__file__ = path
    exec(compile(data, path, "exec"), vars(module))


if __name__ == "__main__":
    sys.exit(main())
