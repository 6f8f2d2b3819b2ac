"""The runs' sandbox: bubblewrap on Linux, sandbox-exec on macOS, or none, and never none silently.

Standard library only: worker.py uses it on this machine and on a cluster's nodes (shipped beside
it). A sandbox counts as usable only once it has run a command here: bubblewrap can be installed
yet refused user namespaces (a container, a hardened kernel). Each probe runs once per process
and executable. Without a usable one a run may start only where the user opted in
(`--unsandboxed`, or RESEARCH_LOOP_UNSANDBOXED=1), and then everything that reports the run says so.

spec, as integrity.sandbox_spec makes it: {"readonly", "writable", "readonly_inside", "hidden"}, lists
of paths (relative ones are inside the run's folder), applied in that order, each overriding the one
before: the workspace read-only, the run's own folders writable again, the harness files inside
the run's folder read-only once more, and last the data sets' sources unreadable (an empty folder or
file in their place). A hidden path that holds the run's folder or another path of the spec (a
cluster's shared folder) is hidden first instead, and those paths are shown again inside it.
"""
from __future__ import annotations  # a node's Python may be older than 3.10

import functools
import os
import shutil
import stat
import subprocess
import sys

UNSANDBOXED_ENV = "RESEARCH_LOOP_UNSANDBOXED"
# What else a sandbox must hide, a JSON list of paths: a cluster node's hidden folders (node.py --hide), for
# prepare.py's compiler warm-up, which it runs in the runs' sandbox
HIDE_ENV = "RESEARCH_LOOP_HIDE"
BUBBLEWRAP, SANDBOX_EXEC = "bubblewrap", "sandbox-exec"
PROBE_TIMEOUT_S = 30
# the server's interpreter as a run's worker and this module's probe start it: without site, so a .pth planted in the
# server's packages, which only a harness that evaluates exports pins (phases/submit.py), runs in neither (review 81)
NO_SITE = ("-S",)
MARKER = " (unsandboxed)"  # in the description of a ledger row whose run had no sandbox
RISK = ("a run could write the ledger, the server's state, the harness and the prepared data, so its number "
        "deserves less trust than a sandboxed run's")
RUN_NOTE = f"unsandboxed: this run had no sandbox (the server runs with --unsandboxed): {RISK}"
# Where a process writes without asking on macOS: the temporary folders and the terminal devices.
SEATBELT_SCRATCH = ("/private/tmp", "/private/var/folders", "/dev")
INSTALL = ("Install bubblewrap: `sudo apt-get install bubblewrap` (Debian, Ubuntu) or `sudo dnf install bubblewrap` "
           "(Fedora)")
OPT_IN = (f"or, to accept runs that can write the workspace, start it with --unsandboxed (or "
          f"{UNSANDBOXED_ENV}=1; `research-loop overnight --unsandboxed`): every answer and ledger row then says "
          "unsandboxed")
SANDBOX_HOME = "/tmp/home"  # a run's home: inside its private /tmp, gone when it ends
# A run's bytecode folder, inside its private /tmp too: its interpreter reads no .pyc from a __pycache__
# the agent could have planted one in (bytecode_archive.py), only what it compiled or was handed itself
BYTECODE_PREFIX = "/tmp/bytecode"
# where a run's interpreter copies its commit's files and runs train.py (checkout_copy.py): in its private /tmp,
# which no process outside the sandbox sees, unlike the slot's worktree, which the agent can rewrite
RUN_COPY = "/tmp/commit"
# where a run exports its model for the harness (nanochat/export.py): in its private /tmp too, which the harness
# reads through the sandbox's own process (private_root); the workspace's export folder is the agent's to write
RUN_EXPORT = "/tmp/export/model.pt2"
# a node's prepare gets the server's offline seed here (nanochat/datasets.py), and the jobs pass AUTORESEARCH_*
# on: with it a run could draw the validation files from the library it reads
SECRET_ENV = ("AUTORESEARCH_OFFLINE_SEED",)
UVM_DEVICE = "/dev/nvidia-uvm"  # CUDA's unified memory node, made by nvidia-modprobe at the first CUDA use
# The machine's device nodes a run gets in its private /dev: the accelerators' (NVIDIA's, and the render nodes and
# kfd of AMD's and Intel's), what container runtimes give a GPU job. The machine's /dev itself is no run's: as root,
# a run could write files there for the next run (or replace /dev/null), open the disks, and on any uid reach the
# machine's POSIX message queues (/dev/mqueue)
ACCELERATORS = ("nvidia", "dri", "kfd")
# The users' runtime folders, where the services that start processes on request listen: systemd's user manager
# (`systemd-run --user`), the session bus, rootless docker and podman. A Unix socket is opened through a read-only
# mount too, so a run that reached one could start a process outside its sandbox, which outlives its timeout and
# its cancel; the network namespace hides only the abstract ones and 127.0.0.1
RUNTIME_FOLDERS = ("/run/user",)
# The machine's services that start processes on request, which a run as root (a GPU container's user) may ask:
# systemd's manager (`systemd-run` over its socket or the system bus) and the container engines
SERVICE_SOCKETS = ("/run/systemd/private", "/run/dbus/system_bus_socket", "/run/docker.sock",
                   "/run/containerd/containerd.sock", "/run/podman/podman.sock")


def opted_in() -> bool:
    """The user's opt-in from the environment (a setting beside the command-line flag)."""
    return os.environ.get(UNSANDBOXED_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def usable() -> tuple[str | None, str | None, str]:
    """(kind, executable, why not): the sandbox this machine can run, or (None, None, the reason)."""
    if sys.platform == "darwin":
        found = shutil.which("sandbox-exec")
        if not found:
            return None, None, "sandbox-exec is not on PATH"
        problem = _probe(tuple(seatbelt_argv(found, [sys.executable, *NO_SITE, "-c", ""], {}, "/")))
        if problem is None:
            return SANDBOX_EXEC, found, ""
        return None, None, f"sandbox-exec cannot run here: {problem}"
    found = shutil.which("bwrap")
    if not found:
        return None, None, "bubblewrap (bwrap) is not installed"
    # the interpreter's environment shown again: it may live under /tmp, which the sandbox replaces
    probe = [sys.executable, *NO_SITE, "-c", ""]
    problem = _probe(tuple(bwrap_argv(found, probe, {"readonly": [sys.prefix]}, "/")))
    if problem is None:
        return BUBBLEWRAP, found, ""
    return None, None, (f"bubblewrap ({found}) is installed but cannot run here ({problem}): it needs unprivileged "
                        "user namespaces, which this kernel or container does not allow")


@functools.lru_cache(maxsize=None)
def _probe(argv: tuple[str, ...]) -> str | None:
    """None where the sandbox ran a command; else what went wrong."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                              timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:300]
    return None


def missing() -> str:
    """Why runs cannot be sandboxed here, and what to do: install the sandbox or opt in."""
    why = usable()[2]
    if sys.platform == "darwin":
        return (f"No sandbox for the runs: {why}. It ships with macOS (/usr/bin/sandbox-exec): restore it, then "
                f"restart the server; {OPT_IN}.")
    return (f"No sandbox for the runs: {why}. Unsandboxed, a run can rewrite the ledger, the server's state and the "
            f"harness. {INSTALL}, then restart the server; {OPT_IN}.")


def wrap(command: list[str], spec: dict, cwd: str, private: dict | None = None) -> tuple[list[str], str | None]:
    """The command in this machine's sandbox and the sandbox's kind; (command, None) where none is
    usable. private: {path: copy}, each copy shown read-only in place of its path (bubblewrap only)."""
    kind, found, _ = usable()
    if kind == BUBBLEWRAP:
        cuda_ready_outside_the_sandbox()  # before the device nodes are listed
        return bwrap_argv(found, command, spec, cwd, private), kind
    if kind == SANDBOX_EXEC:
        return seatbelt_argv(found, command, spec, cwd), kind
    return command, None


def bwrap_argv(bwrap: str, command: list[str], spec: dict, cwd: str, private: dict | None = None) -> list[str]:
    """bubblewrap over a read-only view of the whole machine (a run that could write the user's home,
    /etc or a tool's folder could plant code the server or the user runs later, outside the sandbox),
    with a private /tmp, home and bytecode folder, then the spec's binds in order: its read-only paths shown again
    over the private /tmp, the run's own folders writable, the harness files inside them read-only.
    Its own process, network and IPC namespaces: a run sees no process but its own (no signal to its
    worker or evaluator, no /proc/PID/environ of the server), has no network but its own loopback
    (no call to the server's HTTP transport or dashboard on 127.0.0.1; training and its harness
    read only prepared files) nor the users' runtime folders (no Unix socket of a service that starts a
    process outside the sandbox: RUNTIME_FOLDERS), and its System V shared memory ends with it (no weights left for the next
    run). A run's own processes share the one sandbox, and with it what NCCL and torch's workers share
    between processes (POSIX shared memory in /dev/shm, sockets); not yet run on a GPU."""
    # run as root, bubblewrap keeps root's capabilities unless told: the run could unmount or remount
    # what hides and guards (the data sets' sources, the read-only workspace)
    # its own user namespace even as root (bubblewrap makes one only for other users): root's keyrings are the
    # machine's, and a key a run added (25 MB of them) was there for the next run. A private /dev, with the
    # machine's accelerator nodes in it, and its own /dev/shm (the machine's is shared by every run and outlives
    # them)
    spec = dict(spec, hidden=[*spec.get("hidden", []), *runtime_folders(), *temporary_folder()])
    argv = [bwrap, "--unshare-user", "--cap-drop", "ALL", "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--ro-bind", "/", "/", "--dev", "/dev", *accelerator_binds(), "--proc", "/proc", "--tmpfs", "/tmp",
            "--dir", SANDBOX_HOME, "--dir", os.path.dirname(RUN_EXPORT), "--setenv", "HOME", SANDBOX_HOME,
            "--setenv", "PYTHONPYCACHEPREFIX", BYTECODE_PREFIX, *(a for n in SECRET_ENV for a in ("--unsetenv", n))]
    first, between, last = hidden(spec, cwd)
    binds = [("--ro-bind", cwd)] if first else []  # the run's folder, at least, shown again
    # the command's own environment, wherever it lives
    binds += [("--ro-bind", path) for path in interpreter_folders(command[0], first)]
    for option, key in (("--ro-bind", "readonly"), ("--bind", "writable"), ("--ro-bind", "readonly_inside")):
        if key == "writable":  # hidden over the read-only paths that hold them, under the writable paths they hold
            binds += [("hide", path) for path in between]
        for path in spec.get(key, []):
            path = os.path.join(cwd, path)  # relative: inside the run's worktree
            if os.path.exists(path) and (key == "readonly" or not leaves(path, cwd)):
                binds.append((option, path))
    argv += [*hide(first), *resolved_binds(binds, ["/tmp", *first])]
    argv += [a for path in between for a in ("--remount-ro", path)]  # its empty folder, the binds inside it made
    for path, copy in (private or {}).items():
        argv += ["--ro-bind", str(copy), os.path.realpath(path)]
    return [*argv, *hide(last), "--die-with-parent", "--chdir", cwd, "--", *command]


def resolved_binds(binds: list[tuple[str, str]], emptied: list[str]) -> list[str]:
    """bubblewrap's options for binds, each at its resolved path: bubblewrap mounts onto a symbolic link by
    following it from the machine's root, not the sandbox's, so a path through an absolute link (a .venv linked to
    another environment, a workspace or cache in a linked folder) stopped every run at its start ("Can't bind
    mount"). Where a link on a path lies in a folder the sandbox empties (its /tmp, a hidden folder: emptied) and no
    bind before shows it, the link is made there, to its resolved target, so the path as named still leads to it.
    An entry ("hide", folder) hides the folder at that point of the order."""
    argv, shown, made, emptied = [], [], set(), list(emptied)
    for option, path in binds:
        if option == "hide":  # a folder hidden here (hidden's between), emptied from now on
            argv += hide([path])
            emptied.append(path)
            continue
        real = os.path.realpath(path)
        argv += [option, real, real]
        shown.append(real)
        for link, target in links_on(path):
            if link not in made and any(_holds(f, link) for f in emptied) and not any(_holds(s, link) for s in shown):
                argv += ["--symlink", target, link]
                made.add(link)
    return argv


def links_on(path: str) -> list[tuple[str, str]]:
    """The symbolic links a path goes through, each as (where it lies, with its folder resolved; what it resolves to)."""
    found, walked = [], "/"
    for part in os.path.abspath(path).split(os.sep)[1:]:
        walked = os.path.join(walked, part)
        place = os.path.join(os.path.realpath(os.path.dirname(walked)), part)
        if os.path.islink(place):
            found.append((place, os.path.realpath(place)))
    return found


def leaves(path: str, cwd: str) -> bool:
    """Whether a writable path or a harness file is a link out of the run's folder (one planted in place of the
    workspace's export folder, say). Binds follow links, so such a link is left unfollowed: followed, it made its
    target writable in the run (bubblewrap followed relative links before), or shown; its target stays as the
    sandbox has it, read-only or hidden."""
    real, top = os.path.realpath(path), os.path.realpath(cwd)
    return os.path.islink(path) and not _holds(top, real)


def runtime_folders() -> list[str]:
    """The runtime folders and service sockets a run must not reach (RUNTIME_FOLDERS, SERVICE_SOCKETS), with this
    user's runtime folder wherever it lies ($XDG_RUNTIME_DIR), unless it is / or /tmp: a run's /tmp is its own
    already, and /tmp (a usual fix for "XDG_RUNTIME_DIR not set" in containers) hidden over it took the run's home and
    export folder away (review 62)."""
    found = os.path.normpath(os.environ.get("XDG_RUNTIME_DIR", "").strip() or ".")
    mine = os.path.isabs(found) and found not in (*RUNTIME_FOLDERS, "/", "/tmp")
    return [*RUNTIME_FOLDERS, *SERVICE_SOCKETS, *([found] if mine else [])]


def temporary_folder() -> list[str]:
    """This user's temporary folder where it is not /tmp ($TMPDIR: a cluster's scratch, a container's setting), hidden
    as /tmp is (a run gets an empty one of its own): the agent's client keeps its shell's output there, and the
    server and a node their files, the harness's reasons among them (review 94). Not one that holds the home, which
    holds the runs' interpreters, nor / or /tmp (a run's is its own already)."""
    found = os.path.normpath(os.environ.get("TMPDIR", "").strip() or ".")
    home = os.path.realpath(os.path.expanduser("~"))
    if not os.path.isabs(found) or found in ("/", "/tmp") or _holds(os.path.realpath(found), home):
        return []
    return [found]


def data_folder_problem(root: str | None, checked: str) -> str | None:
    """Why the data folder a sandbox (its root as the machine sees it: private_root) shows is not the one the
    server checked (checked: device:inode:path, integrity.data_folder_id), or None; "" until there is a root."""
    if root is None:
        return ""
    device, inode, path = checked.split(":", 2)
    try:
        seen = os.stat(root + path)
    except OSError as exc:
        seen = exc
    if isinstance(seen, OSError) or (seen.st_dev, seen.st_ino) != (int(device), int(inode)):
        return (f"the prepared data folder the run's sandbox showed at {path} is not the one the server checked as the "
                "run started (the cache, or a folder above it, swapped for another), so it may have trained on data "
                "setup did not pin; put the prepared cache back in its place, then rerun it")
    return None


def accelerator_binds(dev: str = "/dev") -> list[str]:
    """bubblewrap's options that show the machine's accelerator device nodes (ACCELERATORS) in a run's private
    /dev, each node alone: a folder of them bound whole (/dev/dri) could be written into as root."""
    found = []
    for name in sorted(os.listdir(dev)) if os.path.isdir(dev) else []:
        if name.startswith(ACCELERATORS):
            path = os.path.join(dev, name)
            walked = os.walk(path) if os.path.isdir(path) and not os.path.islink(path) else [(dev, [], [name])]
            found += [os.path.join(folder, f) for folder, _, files in walked for f in sorted(files)]
    return [a for node in found if stat.S_ISCHR(os.lstat(node).st_mode) for a in ("--dev-bind", node, node)]


def private_root(bwrap_pid: int) -> str | None:
    """Where the machine sees a bubblewrap sandbox's own root (its private /tmp in it): through its pid 1,
    bubblewrap's one child; None until it has one whose /tmp is not the machine's: the child mounts the
    sandbox and moves into it after it is made, and until then its root is the machine's, whose /tmp/export
    the agent writes. Any process of the user can open it too (docs/trust.md)."""
    try:
        with open(f"/proc/{bwrap_pid}/task/{bwrap_pid}/children") as f:
            children = f.read().split()
        root = f"/proc/{children[0]}/root" if children else None
        return root if root and not os.path.samestat(os.stat(root + "/tmp"), os.stat("/tmp")) else None
    except OSError:
        return None


def hide(paths: list[str]) -> list[str]:
    """bubblewrap's options that put an empty folder over each folder, and an unreadable file over
    each file."""
    return [a for path in paths for a in (["--tmpfs", path] if os.path.isdir(path) else ["--ro-bind", "/dev/null", path])]


def identity(path) -> tuple | None:
    """What a hidden file is (its resolved path, device, inode and change time), to compare with what it was when a
    sandbox hid it: the kernel undoes a bind whose point is renamed over or removed from another mount namespace, so
    a copy the agent's shell renames over the shard (or a link put in its place) is the file the run then reads, and
    renaming the first back changes its change time (review 91)."""
    try:
        real = os.path.realpath(path)
        info = os.stat(real)
    except (OSError, TypeError):
        return None
    return real, info.st_dev, info.st_ino, info.st_ctime_ns


def hidden(spec: dict, cwd: str) -> tuple[list[str], list[str], list[str]]:
    """The spec's hidden paths that exist, as (first, between, last). First: those that hold the run's folder
    or a path the spec shows (a cluster's shared folder, a folder data set around the workspace),
    hidden before the spec's paths, which are then shown again inside them. Between: those inside a read-only
    path that hold writable paths and no harness file (the workspace's `.research-loop`, its state beside the export
    folders), hidden after the read-only paths and before the writable ones, shown again inside them. Last: the rest
    (the downloads inside the cache), hidden over the spec's paths that hold them. One that both lies
    inside a shown path and holds the run's folder or a read-only path is left readable: no order hides it and shows
    the other. Only the run's folder and the read-only paths (the server's) make one first: a harness file or writable
    path is the agent's to link (review 82: a worktree's README.md linked to the cache's downloads, or the exports
    folder linked into them, made the downloads hold a shown path inside the cache shown, so they were left readable
    to the run); the harness files and the writable paths linked into it stay hidden with it."""
    # resolved, as the kernel mounts and matches them: a folder named through a link still sorts right
    shown = [os.path.realpath(os.path.join(cwd, p)) for p in [".", *shown_paths(spec)]]
    ordering = [os.path.realpath(os.path.join(cwd, p)) for p in [".", *spec.get("readonly", [])]]
    # a writable path as named and as resolved: one linked into a hidden folder (review 82) makes it no "between"
    writable = [(os.path.abspath(os.path.join(cwd, p)), os.path.realpath(os.path.join(cwd, p)))
                for p in spec.get("writable", []) if p != "."]
    harness = [os.path.realpath(os.path.join(cwd, p)) for p in spec.get("readonly_inside", [])]
    first, between, last = [], [], []
    for named in filter(os.path.exists, spec.get("hidden", [])):
        path = os.path.realpath(named)
        holds = any(_holds(path, other) for other in ordering)
        inside = any(_holds(other, path) for other in shown)
        if holds and not inside:
            first.append(path)
        elif not holds and os.path.isdir(path) and not any(_holds(path, other) for other in harness) and \
                any(_holds(os.path.abspath(named), w) and _holds(path, real) for w, real in writable):
            between.append(path)
        elif not holds:
            last.append(path)
    return first, between, last


def shown_paths(spec: dict) -> list[str]:
    return [p for key in ("readonly", "writable", "readonly_inside") for p in spec.get(key, [])]


def _holds(folder: str, path: str) -> bool:
    return os.path.commonpath([folder, path]) == folder


def interpreter_folders(program: str, hidden_first: list[str]) -> list[str]:
    """The environment a program runs from (a virtual environment's root, as linked and as resolved:
    the interpreter it was made from), shown again where the sandbox would hide it: inside the
    private /tmp (a project checked out there) or inside a hidden folder that holds it (a data set's
    folder or a cluster's shared folder around a home that holds uv's interpreters)."""
    found = shutil.which(program)
    if not found:
        return []
    roots = {os.path.dirname(os.path.dirname(os.path.abspath(found))),
             os.path.dirname(os.path.dirname(os.path.realpath(found)))}
    # as named and as resolved: a link outside /tmp to an environment in it (or the other way round) is hidden too
    return sorted(root for root in roots if any(
        place.startswith("/tmp/") or any(_holds(folder, place) for folder in hidden_first)
        for place in (root, os.path.realpath(root))))


def seatbelt_argv(sandbox_exec: str, command: list[str], spec: dict, cwd: str) -> list[str]:
    unset = [a for name in SECRET_ENV for a in ("-u", name)]
    return [sandbox_exec, "-p", seatbelt_profile(spec, cwd, command[0]), "/usr/bin/env", *unset, *command]


def seatbelt_profile(spec: dict, cwd: str, program: str | None = None) -> str:
    """A sandbox-exec profile: everything allowed but writes, which only the spec's writable paths
    and the temporary folders get, and reads of the hidden paths. Later rules win, so the spec's
    order holds: the read-only paths are denied after the temporary folders (a workspace may live in
    one), the run's own folders allowed after them, the harness files inside them denied, the hidden
    paths' reads denied last, but those of a hidden folder that holds the run's paths (or the
    program's environment) first, with those reads allowed again after. Paths are resolved, as the kernel matches them (/tmp is /private/tmp)."""
    def rule(verb: str, paths, access: str = "file-write*") -> list[str]:
        return [f"({verb} {access} (subpath {quoted(os.path.realpath(os.path.join(cwd, p)))}))" for p in paths]

    tmp = os.environ.get("TMPDIR")
    scratch = [*SEATBELT_SCRATCH, *([tmp] if tmp else [])]
    first, between, last = hidden(spec, cwd)
    shown_inside = [p for p in [".", *shown_paths(spec), *(interpreter_folders(program, first) if program else [])]
                    if any(_holds(folder, os.path.realpath(os.path.join(cwd, p))) for folder in first)]
    writable_inside = [p for p in spec.get("writable", [])
                       if any(_holds(folder, os.path.realpath(os.path.join(cwd, p))) for folder in between)]
    return "\n".join(["(version 1)", "(allow default)", "(deny file-write*)", *rule("allow", scratch),
                      *rule("deny", first, "file-read*"), *rule("allow", shown_inside, "file-read*"),
                      *rule("deny", spec.get("readonly", [])), *rule("deny", between, "file-read*"),
                      *rule("allow", writable_inside, "file-read*"), *rule("allow", spec.get("writable", [])),
                      *rule("deny", spec.get("readonly_inside", [])),
                      *rule("deny", last, "file-read*")]) + "\n"


def quoted(path: str) -> str:
    """A string literal of the profile language (a Scheme)."""
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cuda_ready_outside_the_sandbox() -> None:
    """bubblewrap sets no-new-privs, so inside it the setuid nvidia-modprobe that the first CUDA use
    after a boot runs to make /dev/nvidia-uvm cannot: where a driver is installed and the node is
    missing, it runs here first (the run then finds the node, or says why it has no GPU)."""
    if os.path.exists(UVM_DEVICE) or not shutil.which("nvidia-modprobe"):
        return
    try:
        subprocess.run(["nvidia-modprobe", "-u", "-c=0"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pass
