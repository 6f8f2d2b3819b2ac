"""What makes a run's number the harness's, not train.py's.

- The sandbox (bubblewrap, sandbox-exec on macOS; none only with the user's opt-in: sandbox.py): a
  run sees the workspace (records, harness, the agent's files), the prepared cache, the
  environments and this plugin read-only; only its worktree (minus the harness files in it), its
  export folder and the compile cache are writable.
- The separate evaluation: the harness exports the trained model (nanochat/export.py) and the
  worker evaluates it in an isolated interpreter from a pristine copy of the harness
  (nanochat/evaluate_export.py): loss from logits, a causality check, at the prepared profile's
  shapes, on the worker's copy of the program and of the pinned validation shard and tokenizer
  (taken before the training starts): nothing the run writes sets what it is scored with.
- The checks: the prepared cache is what it was at setup, git's index hides no change, and the
  time a run reports agrees with what its worker measured and with the budget.
- The pins: the content of what the harness scores with (tokenizer, token bytes, validation
  shard) is hashed at setup; every run is checked against those hashes, never against a hash
  taken when it starts, so a file swapped at any time after setup makes the run no result.
"""
import hashlib
import json
import math
import os
import sys
import sysconfig
from pathlib import Path
from stat import S_IFDIR, S_IFMT, S_IFREG

import git
import gitdb.exc

from mcp_server.core import ledger
from mcp_server.core.limits import STATE_PATH, records_dir
from mcp_server.core.models import Refusal
from mcp_server.scripts.harness_eval import evaluation_inputs, evaluator_command, hidden_from_runs, sha256_of
from mcp_server.core.workspace import EDITABLE, RUNS_DIR, cache_dir, parse_prepared, prepared_info, read_prepared

HARNESS_DIR = "research-loop/harness"  # inside .git: the pristine harness the evaluation runs from
EXPORTS_DIR = ".research-loop/exports"
EXPORT_NAME = "model.pt2"
EVALUATOR = "nanochat/evaluate_export.py"
EXPORTER = "nanochat/export.py"
FOLDER = "."  # data_stat's name for the data folder itself
# where a client keeps its sessions when told (agent_records), and Claude Code its shell's output (review 94)
AGENT_HOMES = ("CLAUDE_CONFIG_DIR", "CODEX_HOME", "CLAUDE_CODE_TMPDIR")
# in ~/.config (Linux) and ~/Library/Application Support (macOS): the desktop clients' folders (agent_records)
DESKTOP_CLIENTS = ("Claude", "Cursor", "Code", "Code - Insiders", "VSCodium", "Windsurf", "Zed")
# how deep links in the clients' folders are looked for (`~/.claude/projects` is 1, `~/.config/Code/User/*` 2): a walk
# of all of them cost 0.6 s a run where VS Code's workspace storage held 5,000 folders, and they grow with use
LINK_DEPTH = 2
COMPILE_CACHE = "compile"  # inside the prepared cache: compiled graphs and the measured peak FLOP/s, so writable
# What the harness scores with, in the prepared cache (nanochat/cache.py): pinned by content at setup
PINNED_FILES = {"tokenizer": "tokenizer/tokenizer.pkl", "token_bytes": "tokenizer/token_bytes.pt"}
EVAL_TIMEOUT_FACTOR = 0.5  # of the run's timeout, at least EVAL_TIMEOUT_MIN_S
EVAL_TIMEOUT_MIN_S = 300.0
# A run trains until its time passes the budget, so it may overshoot by one step (plus this share).
BUDGET_TOLERANCE = 0.05
CLOCK_SLACK_S = 2.0  # the run's own clocks against its worker's: interpreter start-up and rounding


def supports_export(ws, commit: str) -> bool:
    """The harness at this commit exports the model and evaluates it (this project's does;
    upstream's prepare.py does not)."""
    tree = ws.repo.commit(commit).tree
    try:
        tree / EVALUATOR, tree / EXPORTER  # noqa: B018  (lookups raise KeyError when missing)
    except KeyError:
        return False
    return True


def harness_copy(ws, commit: str, fingerprint: str) -> Path:
    """The pristine harness: a worktree of a commit with the research run's fingerprint, checked out
    when it is not one already, then only read (by every slot's evaluation at once)."""
    path = Path(ws.repo.git_dir) / HARNESS_DIR
    current = ws.worktree_head(path)
    if current and ws.fingerprint(current) == fingerprint and ws.worktree_clean(path):
        return path
    return ws.checkout_worktree(path, commit)


_COMMIT_FILES: dict = {}  # commit -> commit_files' answer (a commit's blobs never change)
_BLOB_SHA256: dict = {}  # a blob's git id -> its SHA-256: each run's commit shares all its blobs but train.py's


def commit_files(ws, commit: str | None) -> dict:
    """{path inside a checkout: [git mode, SHA-256 (hex), size]} of every file a commit holds (a symlink's digest is
    its target's text, as git stores it; submodules left out): what a run's interpreter copies from its slot,
    each file checked, and runs from (scripts/checkout_copy.py); {} where the commit cannot be read."""
    if not commit:
        return {}
    if commit not in _COMMIT_FILES:
        try:
            tree = ws.repo.commit(commit).tree
            _COMMIT_FILES[commit] = {blob.path: [blob.mode, _blob_sha256(blob), blob.size]
                                     for blob in tree.traverse() if blob.type == "blob"}
        except (ValueError, gitdb.exc.ODBError, git.GitError):
            return {}
    return _COMMIT_FILES[commit]


def _blob_sha256(blob) -> str:
    if blob.hexsha not in _BLOB_SHA256:
        _BLOB_SHA256[blob.hexsha] = hashlib.sha256(blob.data_stream.read()).hexdigest()
    return _BLOB_SHA256[blob.hexsha]


def commit_sources(ws, commit: str | None) -> dict:
    """{path inside a checkout: SHA-256 (hex)} of each Python source of a commit: what the evaluator must
    report having compiled from the harness copy (envpin.harness_changes; the training runs from its own
    checked copy, commit_files); {} where the commit cannot be read (then whatever it compiled from the
    checkout is named)."""
    return {path: digest for path, (_, digest, _size) in commit_files(ws, commit).items() if path.endswith(".py")}


def eval_tokens(record: dict | None = None, environ=os.environ) -> int:
    """The evaluation's size: the prepared record's (record: as checked, checked_record; else read now), or the
    server's own AUTORESEARCH_EVAL_TOKENS (tests shorten it; environ: {} for the record's own): never what the
    training process sets. A research run's runs are evaluated at the size its setup recorded (core/budget_settings.py)."""
    override = environ.get("AUTORESEARCH_EVAL_TOKENS")
    if override:
        return int(float(override))
    return int(_or_read(record).get("eval_tokens") or 40 * 524288)


def _or_read(record: dict | None) -> dict:
    return (prepared_info() or {}) if record is None else record


def checked_record(state: dict) -> dict:
    """The prepared record, from the one read whose cache matches setup's fingerprint (Refusal where it does not):
    what a run is judged and scored by is what was checked, never a second read the agent's process could time,
    nor a read when a queued run starts, unchecked (review 48: a budget ten times the research run's, and a
    queued run scored on the validation's first batch)."""
    data = read_prepared()
    recorded = state.get("cache_fingerprint")
    if recorded and fingerprint_of(data) != recorded:
        raise Refusal(f"The prepared data, tokenizer or their record in {cache_dir()} changed since setup "
                      "(prepared.json edited, a shard added or removed?): every run of a research run must see "
                      "the same harness. Restore the cache, or prepare it again and call setup(tag) for a new run.")
    return parse_prepared(data) or {}


def site_packages() -> list[str]:
    """Where this interpreter's packages (torch) are, for an evaluation started without site."""
    paths = sysconfig.get_paths()
    return sorted({paths["purelib"], paths["platlib"]})


def input_pins() -> dict:
    """At setup: the SHA-256 of each file the harness scores with, and the validation shard's name
    and SHA-256 (prepare's pin where it recorded one, hashed now otherwise)."""
    cache = cache_dir()
    pins = {name: sha256_of(cache / rel) for name, rel in PINNED_FILES.items() if (cache / rel).is_file()}
    shard = val_shard()
    if shard is not None:
        recorded = (prepared_info() or {}).get("val_shard") or {}
        same = recorded.get("name") == shard.name and recorded.get("sha256")
        pins["val"] = {"name": shard.name, "sha256": recorded["sha256"] if same else sha256_of(shard)}
    data = data_pin()
    return dict(pins, data=data) if data["stat"] else pins


def check_pins(pins: dict | None) -> None:
    """At each run's start: the tokenizer and its byte table are still what setup pinned (the worker
    checks its copies of the tokenizer and the validation shard by content again), and the data shards
    are (check_data)."""
    for name, rel in PINNED_FILES.items():
        path = cache_dir() / rel
        if name in (pins or {}) and (not path.is_file() or sha256_of(path) != pins[name]):
            raise Refusal(f"{path} is not the file this research run was set up with (its content changed since "
                          "setup): every run must be scored with the same harness inputs. Restore it, or re-run "
                          "`uv run prepare.py` and call setup(tag) for a new research run.")
    if (pins or {}).get("data"):
        check_data(pins["data"])


def data_stat() -> dict:
    """{file: [inode, size, mtime, ctime, type]} of the prepared cache's data folder, and of the folder itself (FOLDER): a
    write into a shard, however made (undone, through a hard link or a mapping, its mtime put back), moves its change
    time, which no process can set. Each name is looked at as itself (lstat): a link's target swapped for another
    file and back during a run moved nothing the stat of what it names shows (review 67); and a shard added for the
    run to list, or the folder swapped for another, and put back before the run's end, moves only the folder's."""
    folder = cache_dir() / "data"
    if not folder.is_dir():
        return {}
    stats = {path.name: path.lstat() for path in sorted(folder.glob("*"))}
    stats[FOLDER] = folder.lstat()
    return {name: [s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns, S_IFMT(s.st_mode)]
            for name, s in stats.items()}


def data_pin() -> dict:
    """At setup: the data shards' stat and content. The fingerprint holds their names and sizes only, and a train
    shard rewritten at its size (the validation text in it, a curated set) changed every later run's number, with
    train.py and its diff as they were."""
    stat = data_stat()  # a link is refused at setup (refuse_linked_data) and at each run's check (check_data); a
    # FIFO is not read (it would hang setup under the state's lock)
    data = cache_dir() / "data"
    return {"stat": stat, "sha256": {name: sha256_of(data / name) for name in _shards(stat) if (data / name).is_file()}}


def _shards(stat: dict) -> list[str]:
    return [name for name in stat if name != FOLDER]


def refuse_linked_data() -> None:
    """At setup, before its branch: the Refusal every run's check would give a data folder that is or holds a link
    (review 68: an honest cache whose data folder links to a bigger disk was set up, and every run of the night
    refused)."""
    _refuse_links(data_stat())


def _refuse_links(stat: dict) -> None:
    """A Refusal where a shard is not a plain file (a link, a FIFO), or the data folder is a link: prepare writes
    plain files in a folder, and a link's target, or a link in the chain it names, can be swapped and put back
    unseen by any stat of the link."""
    odd = [name for name in _shards(stat) if stat[name][4] != S_IFREG]
    if odd:
        raise Refusal(f"The prepared data folder {cache_dir() / 'data'} holds {', '.join(odd)}, which is not a plain "
                      "file (a link?): prepare.py writes its shards as plain files, and the harness pins them by their "
                      "own stat. Put the files themselves there (a copy, not a link), then run again.")
    if FOLDER in stat and stat[FOLDER][4] != S_IFDIR:
        raise Refusal(f"The prepared data folder {cache_dir() / 'data'} is a link: the harness pins the folder by its own "
                      "stat, and a link it names could be swapped during a run and put back unseen. Move the folder "
                      "there itself (or point AUTORESEARCH_CACHE at a cache on the disk that holds it), then run again.")


def check_data(pin: dict) -> None:
    """The data shards are setup's, by their stat or else by content (then their stat as read before the content
    becomes the pin's: a run's end is compared with it, data_changes); a Refusal naming those that differ."""
    stat = data_stat()
    _refuse_links(stat)
    moved = [name for name in _shards(stat) if stat[name] != pin["stat"].get(name)]
    changed = [name for name in moved if sha256_of(cache_dir() / "data" / name) != pin["sha256"].get(name)]
    if changed or set(_shards(stat)) != set(_shards(pin["stat"])):
        raise Refusal(f"The prepared data shards {', '.join(changed) or '(their list)'} in {cache_dir() / 'data'} "
                      "are not what this research run was set up with (their content changed since setup): every run "
                      "of a research run trains on the same data. Restore them, or prepare again (`uv run prepare.py "
                      "--force`) and call setup(tag) for a new research run.")
    pin["stat"] = stat


def data_changes(stat: dict | None) -> list[str]:
    """The data shards whose stat moved since a run's check (stat: the pin's then), each a path: the run may have
    trained on what setup did not pin, however the shard looks now."""
    if not stat:
        return []
    now = data_stat()
    return [str(cache_dir() / "data" / name) for name in sorted(set(stat) | set(now)) if stat.get(name) != now.get(name)]


def pinned_inputs(pins: dict | None, record: dict | None = None) -> dict:
    """The evaluation's inputs with the hashes setup pinned; without pins (a state from before
    them), hashed now."""
    inputs = evaluation_inputs(cache_dir(), val_shard(record), _or_read(record))
    if not pins:
        return inputs
    if "tokenizer" in inputs and "tokenizer" in pins:
        inputs["tokenizer"]["sha256"] = pins["tokenizer"]
    if "val" in inputs and "val" in pins:  # the shard now the last (or recorded) one: the one setup pinned
        inputs["val"]["sha256"] = pins["val"]["sha256"] if Path(inputs["val"]["path"]).name == pins["val"]["name"] \
            else f"{pins['val']['name']} (pinned at setup)"
    return inputs


def evaluation_spec(harness: Path, harness_commit: str, timeout: float, pins: dict | None = None,
                    record: dict | None = None, tokens: int | None = None) -> dict:
    """The worker's --evaluate: this interpreter, isolated (harness_eval.ISOLATED: no PYTHON* variables,
    no user site, no script folder on the path, no .pth file or sitecustomize, and no bytecode read or
    written: the harness copy stays exactly its commit, which the worker checks after the evaluation,
    and no .pyc planted beside a module it imports runs), importing through the server's importer (the
    digests of what it compiled come back with its result), in a clean environment (LD_LIBRARY_PATH kept: where
    libcuda is found only through it, the evaluation would see no GPU). Its shapes are the prepared
    profile's, its size the server's, and its inputs the pinned validation shard and tokenizer, which
    the worker copies and checks before the training starts. The worker adds --out-fd (the result
    comes back through a pipe that the training process cannot reach), the descriptors of its private
    copies of the inputs and the exported program, and its slot's GPU. tokens: the research run's evaluation
    size (core/budget_settings.py), else the server's now."""
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "HOME", "LANG", "LC_ALL", "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH",
                    "AUTORESEARCH_DEVICE", "AUTORESEARCH_CACHE")}
    env["AUTORESEARCH_CACHE"] = str(cache_dir())
    argv = [*evaluator_command(sys.executable, harness / EVALUATOR),
            "--profile", str(_or_read(record).get("profile")),
            "--eval-tokens", str(tokens or eval_tokens(record)), "--site-packages", *site_packages()]
    return {"argv": argv, "env": env, "harness": str(harness), "harness_commit": harness_commit,
            "timeout": evaluation_timeout(timeout),
            "inputs": pinned_inputs(pins, record)}


def evaluation_allowance(entry: dict) -> float:
    """Seconds a run's worker may spend after training (its harness evaluation); 0 where the harness
    does not export."""
    return evaluation_timeout(entry["timeout"]) if entry.get("verifies") else 0.0


def evaluation_timeout(run_timeout: float) -> float:
    """The separate evaluation's own limit, beside the training's (the worker does not count the
    evaluation against the run's timeout): the server's watchdog allows for it too."""
    return max(EVAL_TIMEOUT_MIN_S, EVAL_TIMEOUT_FACTOR * run_timeout)


def sandbox_spec(root: Path, export_dir: Path, harness_files: list[str], record: dict | None = None) -> dict:
    """Read-only: the workspace, the prepared cache, this plugin and its interpreter's environment.
    Writable again: the run's worktree (".": paths relative to it) and its export folder; the worker adds
    the run's own compile folder (`--compile-cache`: scripts/compile_programs.py). Read-only once more: the
    harness files inside the worktree."""
    cache = cache_dir()
    (cache / COMPILE_CACHE).mkdir(parents=True, exist_ok=True)
    readonly = [str(root), str(cache), str(Path(__file__).resolve().parents[2]), sys.prefix]
    writable = [".", str(export_dir)]
    return {"readonly": readonly, "writable": writable, "readonly_inside": harness_files,
            "hidden": [*hidden_from_runs(cache, _or_read(record)), *workspace_hidden(root)]}


def workspace_hidden(root: Path) -> list[str]:
    """The workspace's folders no run may read (a cluster node's too, where it sees the workspace): the runs' logs and
    records, which hold what runs printed and the reasons the harness gave (review 88: an error can name a value
    computed from validation batches), and the state and its copy, which hold each undecided run's result with its
    log's tail and that reason, beside the trackers' stores and the overnight sessions' logs (review 90); and the
    agent's own records of its answers (agent_records)."""
    return [str(root / RUNS_DIR), str(root / Path(STATE_PATH).parent), str(records_dir(root)), *agent_records(),
            *TRACKER_STORES.get(str(Path(root).resolve()), [])]


# {workspace, resolved: the paths on this machine where its MLflow tracker, at a store the user named, writes the runs'
# records and logs (tracking.local_paths)}: hidden from its runs as the workspace's own store is (review 92)
TRACKER_STORES: dict[str, list[str]] = {}


def hide_tracker_store(root: Path, paths: list[tuple[Path, bool]]) -> None:
    """Names a tracker's local store (tracking.local_paths: each path, whether a folder) to the workspace's runs'
    sandboxes; made now where it is not there yet (a sandbox hides only what exists, and a run can live while the
    tracker first writes): folders, and the database file where its folder is there (an empty file is an empty SQLite
    database)."""
    for path, folder in paths:
        try:
            if folder:
                path.mkdir(parents=True, exist_ok=True)
            elif path.parent.is_dir():
                path.touch()
        except OSError:
            pass
    TRACKER_STORES[str(Path(root).resolve())] = [str(path) for path, _ in paths]


def agent_records() -> list[str]:
    """Where the agents that drive the server keep their sessions on this machine, each tool answer in them, the
    harness's reason for a run that is no result among them (review 92: a later run read a value computed from
    validation batches in Claude Code's transcript, as reviews 88 and 90 had it from runs/ and the state): Claude
    Code's config folder (`$CLAUDE_CONFIG_DIR`, else `~/.claude`, or its XDG one: its transcripts) and cache (its MCP
    servers' logs), and those of the other clients docs/other-agents.md names (Codex's `$CODEX_HOME`, else
    `~/.codex`; Claude Desktop's and Cursor's) or takes in as "most clients" (review 94: Gemini CLI's, VS Code's and
    its kin's, opencode's, Goose's, Zed's, Continue's), and what links inside them lead to (linked_from). No run
    needs any of them; a folder that does not exist is hidden by no sandbox."""
    env, home = os.environ, Path(os.path.expanduser("~"))
    named = [Path(env[name].strip()).expanduser() for name in AGENT_HOMES if env.get(name, "").strip()]
    named = [path for path in named if os.path.normpath(path.absolute()) not in ("/", "/tmp")]  # the run's own /tmp
    if not home.is_absolute():  # no home to be found (no HOME, no passwd entry): the variables' folders alone
        return linked_from([str(path.absolute()) for path in named])
    config, cache, data = (Path(env.get(f"XDG_{name}_HOME", "").strip() or home / default) for name, default in
                           (("CONFIG", ".config"), ("CACHE", ".cache"), ("DATA", ".local/share")))
    library = home / "Library"  # macOS
    found = [home / ".claude", config / "claude", cache / "claude-cli-nodejs", library / "Caches" / "claude-cli-nodejs",
             *(home / name for name in (".codex", ".cursor", ".gemini", ".codeium", ".continue")),
             *(folder / app for folder in (config, library / "Application Support") for app in DESKTOP_CLIENTS),
             *(data / app for app in ("opencode", "goose", "zed")), *named]
    return linked_from([str(path.absolute()) for path in found])


def linked_from(folders: list[str], depth: int = LINK_DEPTH) -> list[str]:
    """The folders, and the folders each symbolic link inside them, `depth` levels down at most, leads to outside
    them (review 94: `~/.claude/projects` linked to another disk left the transcripts readable there, the link alone
    hidden). Installed code is not looked in (`plugins`: this plugin, its environment, whose links lead to the
    interpreters runs use), nor is a link to a file (an interpreter) followed, or one to a folder that holds the
    home."""
    home, found = os.path.realpath(os.path.expanduser("~")), list(folders)
    for top in filter(os.path.isdir, folders):
        real, level = os.path.realpath(top), [top]
        for _ in range(depth):
            below = []
            for folder in level:
                for path in _folders_in(folder):
                    if not os.path.islink(path):
                        below.append(path)
                    elif os.path.commonpath([real, target := os.path.realpath(path)]) != real and \
                            os.path.commonpath([target, home]) != target:
                        found.append(target)
            level = below
    return found


def _folders_in(folder: str) -> list[str]:
    """The folders (and links to folders) in a folder, but installed code's; none where it cannot be read."""
    try:
        with os.scandir(folder) as entries:
            return [entry.path for entry in entries if entry.name not in ("plugins", "node_modules", "extensions")
                    and entry.is_dir()]
    except OSError:
        return []


def harness_files(ws, commit: str) -> list[str]:
    """The top-level entries of a commit's tree but train.py, and the worktree's .git link (a run
    that pointed it at a repository of its own, with a hook or an fsmonitor, would have the
    server's next git call in that slot run its code): what a run must not write."""
    return sorted([".git", *(item.name for item in ws.repo.commit(commit).tree if item.name != EDITABLE)])


def val_shard(record: dict | None = None) -> Path | None:
    """The validation shard as prepare pinned it, else the last one in sorted order (upstream's rule)."""
    data = cache_dir() / "data"
    pinned = (_or_read(record).get("val_shard") or {}).get("name")
    if pinned and (data / pinned).exists():
        return data / pinned
    shards = sorted(data.glob("shard_*.parquet")) if data.is_dir() else []
    return shards[-1] if shards else None


def worker_args(ws, root: Path, run: int, commit: str, timeout: float, harness: Path | None,
                harness_commit: str, slots: int, data_order: int = 0, pins: dict | None = None,
                record: dict | None = None, tokens: int | None = None, parent: str | None = None) -> list[str]:
    """The worker's options for one run: the sandbox, the compile cache's program (its train.py's, starting
    from its best's, parent), the data order of a rerun, and where the harness verifies, the export, the
    validation shard and the separate evaluation.
    pins: setup's input_pins (a Refusal where the cache no longer holds them); record: the prepared
    record as checked (checked_record); tokens: the evaluation's size the run was submitted with."""
    data = data_folder_id()  # taken before the check: a folder swapped in between is the one checked, and refused
    check_pins(pins)
    export_dir = root / EXPORTS_DIR / str(run)
    export_dir.mkdir(parents=True, exist_ok=True)
    sandbox = sandbox_spec(root, export_dir, harness_files(ws, commit), record)
    args = ["--sandbox", json.dumps(sandbox), "--compile-cache", str(cache_dir() / COMPILE_CACHE),
            *compile_programs(ws, commit, parent)]
    args += ["--data-order", str(data_order)] if data_order else []
    if data and (pins or {}).get("data"):
        args += ["--data-folder", data]
    if harness is None:
        return args
    program = export_dir / EXPORT_NAME
    args += ["--export", str(program),
             "--evaluate", json.dumps(evaluation_spec(harness, harness_commit, timeout, pins, record, tokens))]
    shard = val_shard(record)
    if shard is not None:
        args += ["--val-shard", str(shard)] + (["--val-shared"] if slots > 1 else [])
    return args


def compile_programs(ws, commit: str, parent: str | None) -> list[str]:
    """The worker's (and a cluster node's) options naming the run's program, its train.py's blob id, whose compile
    folder it fills and saves, and its best's (parent), whose folder a new program's starts from."""
    return ["--compile-program", ws.train_blob(commit)] + (["--compile-seed", ws.train_blob(parent)] if parent else [])


def data_folder_id() -> str | None:
    """The data folder the check looks at, as worker.py --data-folder takes it (`device:inode:path`), or None. The
    sandbox binds the cache as it finds it when the run starts, a moment after the check: the cache (or a folder
    above it) swapped for another in between and put back once the run trained (review 67) moved nothing at the
    path the check and the run's end look at; the worker compares the folder the sandbox shows with this one."""
    folder = cache_dir() / "data"
    try:
        found = folder.stat()
    except OSError:
        return None
    return f"{found.st_dev}:{found.st_ino}:{folder}"


def cache_fingerprint() -> str | None:
    """The prepared record, the tokenizer's files and the data shards' names and sizes: a change
    moves the budget, the tokenizer or what the runs see as data."""
    return fingerprint_of(read_prepared())


def fingerprint_of(record: bytes | None) -> str | None:
    """cache_fingerprint with the prepared record's bytes as read (workspace.read_prepared): a check and
    what is taken from the record after it must be one read, or the agent's process could put another
    record there between the two (review 48: a budget ten times the research run's)."""
    cache = cache_dir()
    if not cache.is_dir():
        return None
    digest = hashlib.sha256()
    # read as plain files without blocking (ledger.read_plain): a FIFO the agent put in the cache hung
    # run_experiment under the state lock, a link to /dev/zero read without end
    digest.update(b"(no record)" if record is None else record)
    for folder in ("tokenizer", "data"):
        for path in sorted((cache / folder).glob("*")) if (cache / folder).is_dir() else ():
            digest.update(f"{folder}/{path.name}\t{path.stat().st_size}\n".encode())
            if folder == "tokenizer":
                digest.update(hashlib.sha256(ledger.read_plain(path) or b"").digest())
    return digest.hexdigest()[:16]


def hidden_index_changes(ws) -> list[str]:
    """Tracked files git was told not to look at (assume-unchanged or skip-worktree): their changes
    would not show in any diff."""
    return [line[2:] for line in ws.repo.git.ls_files("-v").splitlines() if line[:1].islower() or line[:1] == "S"]


def time_problem(summary, report: dict, budget: float, last_step_s: float | None,
                 most_wall: float | None = None, clock: str | None = None) -> str | None:
    """Why the time a run reports cannot stand: more training than the budget allows (the loop
    stops after the step that crosses it, so one step over, the longer of the last one and the
    mean), or more than its worker measured; or a run that took longer before its evaluation than
    most_wall (the server's own timeout for the budget): how long it trained is train.py's word, and
    only the wall bounds it. On the harness's flops clock (clock) the training is budget seconds of FLOPs, so a
    step is its share of them, not its wall time, and the allowance is flops_problem's: one step over, one untimed
    (CI of stop 50: a sweep trial of the real train.py, 3 timed steps of 1.47 budget seconds each, charged 4.4 s on a
    3 s budget, and its last step's wall time of 1.16 s made it "over the budget")."""
    wall = report.get("wall_seconds")
    if most_wall is not None and wall is not None:
        before = wall - ((report.get("evaluation") or {}).get("wall_seconds") or 0.0)
        if before > most_wall * (1 + BUDGET_TOLERANCE) + CLOCK_SLACK_S:  # an honest run's exit comes after it
            return (f"the run took {before:.0f}s before the harness's evaluation, more than the {most_wall:.0f}s "
                    f"the server gives a {budget:.0f}s budget (a longer timeout lets a run end, not count): "
                    "its training time is train.py's own report, which only the wall time bounds")
    training, total, steps = summary.training_seconds, summary.total_seconds, summary.num_steps
    if training is not None:
        step = max(training / max(steps or 1, 1), last_step_s or 0.0)
        allowance = 2 * training / max(steps or 1, 1) if clock == "flops" else step
        if training > budget * (1 + BUDGET_TOLERANCE) + allowance:
            return (f"train.py trained for {training:.1f}s, over the {budget:.0f}s budget (more than one step over): "
                    "the budget is the harness's, not train.py's")
        timed = summary.timed_seconds if summary.timed_seconds is not None else training
        if wall is not None and timed > wall + CLOCK_SLACK_S:
            return f"train.py reports {timed:.1f}s of training, but the whole run took {wall:.1f}s"
    if total is not None and wall is not None and total > wall + CLOCK_SLACK_S:
        return f"train.py reports a total of {total:.1f}s, but the whole run took {wall:.1f}s"
    return None


def flops_problem(summary, evaluation: dict, flops_per_budget_second: float | None, budget: float,
                  clock: str | None) -> str | None:
    """On the flops budget clock (clock: the harness's, whatever train.py says it spent), why the FLOPs a
    run trained cannot stand: train.py charged each token less than its exported model's weights take (the
    harness's floor), or its tokens at that charge are more than the budget (one step over for the loop's
    stop, one untimed step)."""
    if clock != "flops":
        return None
    claimed, floor = summary.flops_per_token, evaluation.get("matmul_flops_per_token")
    # a nan is unequal to everything, and a count below zero is under any budget: printed, either passed the
    # floor and the budget below (reviews 83 and 84)
    if not all(value is not None and math.isfinite(value) and value > 0
               for value in (claimed, summary.total_tokens_M, summary.num_steps)) or not flops_per_budget_second:
        return ("train.py spent its budget on the flops clock but its summary lacks flops_per_token, total_tokens_M "
                "or num_steps, or prints one that is no positive number (or prepared.json lacks its "
                "flops_per_budget_second): the harness cannot check the FLOPs")
    if floor and claimed < floor:
        return (f"train.py charged {claimed:.4g} FLOPs per token to the budget, but its exported model's weight "
                f"matrices alone take {floor:.4g}: the budget is the harness's, not train.py's")
    trained = summary.total_tokens_M * 1e6 * claimed
    allowed = flops_per_budget_second * budget * (1 + BUDGET_TOLERANCE) + 2 * trained / summary.num_steps
    if trained > allowed:
        return (f"train.py trained {trained:.4g} FLOPs ({summary.num_steps} steps, {summary.total_tokens_M:g}M "
                f"tokens at {claimed:.4g} per token), over the budget's {flops_per_budget_second * budget:.4g}: "
                "the budget is the harness's, not train.py's")
    return None


def evaluation_verdict(report: dict) -> tuple[str | None, float | None, str]:
    """(why the run is no result, or None; the harness's val_bpb, or None; a note for the answer)."""
    evaluation = report.get("evaluation") or {}
    if report.get("val_opened_before_export"):
        shared = (" (unsandboxed, the harness watches the cache's own shard, and any process's open counts: a "
                  "second research run or a script reading the same cache reads as this run; give each its own "
                  "AUTORESEARCH_CACHE, or run sandboxed)") if report.get("sandbox") is False else ""
        return ("the training opened the validation data before its model was exported: it may have "
                f"trained on it{shared}", None, "")
    if report.get("val_replaced"):  # the sandbox's bind over the shard undone: the run could read it
        return ("the validation shard was replaced (or renamed away and back) while the run's sandbox hid it, which "
                "undoes the hiding: the run could read it. Leave the prepared cache as prepare.py made it, and run it "
                "again", None, "")
    if evaluation.get("causal") is False or evaluation.get("problem"):
        return evaluation.get("problem") or "the exported model failed the causality check", None, ""
    if "val_bpb" in evaluation:
        note = (f"harness evaluation: val_bpb {evaluation['val_bpb']:.6f} from the exported model "
                f"(export {evaluation.get('export_seconds')}s, evaluation {evaluation.get('wall_seconds')}s)")
        if report.get("sandbox") and report.get("val_watched"):  # the sandbox showed it: the server's setting
            note += ("; the run was shown the validation data after its export (AUTORESEARCH_EVAL_CROSSCHECK=1 in the "
                     "server's environment, a platform's check, not a night's: unset it and restart the server)")
        return None, evaluation["val_bpb"], note
    if report.get("val_hidden"):  # train.py could not read the validation data: a number of its own is made up
        why = evaluation.get("error") or ("train.py did not export its model" if report.get("exported") is False
                                          else "no harness evaluation")
        return (f"the harness did not score this run ({why}), and its sandbox hid the validation data from "
                "train.py, so a number train.py printed itself is not one of the validation set: make the model one "
                "the harness can export and evaluate (keep calling prepare.evaluate_bpb)", None, "")
    if evaluation.get("error"):
        return None, None, f"unverified: {evaluation['error']}"
    if report.get("exported") is False:
        return None, None, "unverified: train.py did not export its model (prepare.evaluate_bpb was not called?)"
    return None, None, "unverified: no harness evaluation"
