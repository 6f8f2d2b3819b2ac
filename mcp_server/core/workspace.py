"""Git for the research loop, through GitPython: branch, commit, reset, fingerprint, rules.

Every git argument built from user text is validated first (a tag or a commit never
starts with '-') and git is called without a shell. The server's git runs none of the agent's code
(HarnessGit: no hook, no fsmonitor, no filter, textconv or merge driver, no signing program) and
writes the blobs' exact bytes (no smudge, eol, ident or export-subst conversion); each call is bounded
in time: what the agent plants in .git/config, .git/hooks or any attributes file can neither hang a
dispatch under the state lock nor act on the server's checkouts or archives.
"""
import ast
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import threading
from pathlib import Path

import git

from mcp_server.core import ledger
from mcp_server.core.models import Refusal

EDITABLE = "train.py"
RUNS_DIR = "runs"  # each run's log and record: runs/<nnnn>-<commit7>.log and .json
REQUIRED_FILES = ("train.py", "prepare.py")
BRANCH_PREFIX = "autoresearch/"
PROTECTED_BRANCHES = ("main", "master")
EXCLUDED_PATHS = ("results.tsv", "run.log", "runs/", ".research-loop/", "progress.png")
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# HEAD, FETCH_HEAD, ORIG_HEAD...: names git gives a meaning of its own (autoresearch/HEAD is also a
# remote's default branch, should a remote be named autoresearch), in any case
RESERVED_TAG_RE = re.compile(r"(?i)([a-z]+_)*head")
COMMIT_ARG_RE = re.compile(r"[0-9a-fA-F]{7,40}")
RUN_REF_PREFIX = "refs/research-loop/runs/"  # every candidate's commit stays reachable here
SLOTS_DIR = "research-loop/slots"  # inside .git: one reused worktree per slot
PROFILES_FILE = "nanochat/profiles.py"
UPSTREAM_TIME_BUDGET = 300.0
# Used only when the repository has no identity configured, so a fresh clone still works.
# For every git call of the server: hooks and the fsmonitor are programs the agent can plant in the
# repository (.git/hooks, .git/config); the server's checkouts, commits and ref moves run neither.
# Signing runs gpg.program (commit-tree honours commit.gpgSign); autocrlf converts line ends.
NO_AGENT_CODE = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "commit.gpgSign=false",
                 "-c", "core.autocrlf=false", "-c", "core.attributesFile=/dev/null")
# No system-wide config or attributes either (a machine's, not the research run's), and no replace refs
# (refs/replace/<commit> shows another commit's tree under that commit's id: the harness's, kept or checked).
GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_ATTR_NOSYSTEM": "1", "GIT_NO_REPLACE_OBJECTS": "1"}
# Filters, textconv and merge drivers are config programs, but only an attribute naming them makes
# git run one; so does every content conversion. $GIT_DIR/info/attributes outranks every
# .gitattributes, and its last line outranks its earlier ones (git < 2.40 has no --attr-source):
# this line, kept last before each server git call, leaves all of them unspecified for every path.
NEUTRAL_ATTRIBUTES = ("* !filter !diff !merge !text !crlf !eol !ident !working-tree-encoding !export-subst "
                      "!export-ignore")  # crlf: the old name of text, still read where text is unspecified
# $GIT_DIR/info/attributes as the server reads it before each git call: larger is not a person's
MAX_ATTRIBUTES_BYTES = 16 << 20
# A checkout of this small repository takes well under a second; a git call still running after
# this long is stuck (a lock, a full disk, a filter program): it is killed and reported.
GIT_TIMEOUT_S = 60.0
FALLBACK_IDENTITY = {
    "GIT_AUTHOR_NAME": "research-loop", "GIT_AUTHOR_EMAIL": "research-loop@localhost",
    "GIT_COMMITTER_NAME": "research-loop", "GIT_COMMITTER_EMAIL": "research-loop@localhost",
}


def cache_dir() -> Path:
    """The harness's cache, found as nanochat/cache.py finds it (`~` expanded the same way)."""
    configured = os.environ.get("AUTORESEARCH_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "autoresearch"


def prepared_info() -> dict | None:
    """What prepare.py recorded, or {} for an upstream cache (tokenizer files only), or None."""
    return parse_prepared(read_prepared())


def read_prepared() -> bytes | None:
    """The prepared record's bytes, or None where there is none."""
    return ledger.read_plain(cache_dir() / "prepared.json")  # the agent's to write: a FIFO there blocked a plain open


def parse_prepared(data: bytes | None) -> dict | None:
    """prepared_info of the record's bytes as read (read_prepared): one read serves a check and what follows it."""
    if data is not None:
        try:
            record = json.loads(data)
        except (ValueError, RecursionError):
            return {}
        return record if isinstance(record, dict) else {}
    tokenizer = cache_dir() / "tokenizer"
    return {} if tokenizer.is_dir() and any(tokenizer.iterdir()) else None


def time_budget(root: Path) -> float:
    """Training budget in seconds: the env override, else what prepare recorded, else upstream's."""
    return budget_of(root, prepared_info() or {})


def budget_of(root: Path, info: dict, environ=os.environ) -> float:
    """time_budget with the prepared record `info` (parse_prepared); environ: {} for the record's own."""
    override = environ.get("AUTORESEARCH_TIME_BUDGET")
    if override:
        return float(override)
    if isinstance(info.get("time_budget"), (int, float)):
        return float(info["time_budget"])
    from_profile = profile_budget(root / PROFILES_FILE, info.get("profile"))
    return from_profile or UPSTREAM_TIME_BUDGET


TIMEOUT_FACTOR = 3.0
# A budget counts training time only: start-up, a cold compile and evaluation come on top (on a
# loaded 2-core CPU: a 2-minute compile, and a CPU-clock budget that stretches the wall time), so
# the default timeout has a floor above the budget. A timeout is for hung runs, not slow ones.
MIN_TIMEOUT_MARGIN_S = 300.0


def timeout_for(budget: float) -> float:
    """The server's own timeout for a run of this budget (the overnight runner's bound on a run in flight too)."""
    return max(TIMEOUT_FACTOR * budget, budget + MIN_TIMEOUT_MARGIN_S)


def budget_clock(info: dict | None = None, environ=os.environ) -> str:
    """The clock a training budget is spent on (prepare.py records it, info: the record as checked, else read
    now; the env overrides it, environ: {} for the record's own)."""
    record = (prepared_info() or {}) if info is None else info
    return environ.get("AUTORESEARCH_BUDGET_CLOCK") or record.get("budget_clock") or "wall"


PROFILES_MAX_BYTES = 1 << 20  # nanochat/profiles.py is a few kB: one larger is none of the harness's


def profile_budget(profiles: Path, profile: str | None) -> float | None:
    """time_budget of a profile in this project's nanochat/profiles.py, read with ast (never run:
    the server imports nothing from the workspace)."""
    if not profile or not profiles.is_file():
        return None
    # read bounded, and parsed where the parser can: status reads it where the record names no budget (a record the
    # agent edited), and a giant file or a deeply nested expression (MemoryError in the parser) failed every status
    source = ledger.read_plain(profiles, PROFILES_MAX_BYTES) or b""
    if len(source) > PROFILES_MAX_BYTES:
        return None
    try:
        tree = ast.parse(source.decode())
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    for node in ast.walk(tree):
        if not isinstance(node, ast.Dict):
            continue
        for key, value in zip(node.keys, node.values):
            if isinstance(key, ast.Constant) and key.value == profile and isinstance(value, ast.Call):
                for keyword in value.keywords:
                    if keyword.arg == "time_budget" and isinstance(keyword.value, ast.Constant):
                        return float(keyword.value.value)
    return None


def validate_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG_RE.fullmatch(tag) or ".." in tag or tag.endswith((".lock", ".")):
        raise Refusal(f"Tag {tag!r} is not a safe branch name: use letters, digits, '.', '_' or '-', "
                      "starting with a letter or digit (e.g. 'nov25').")
    if RESERVED_TAG_RE.fullmatch(tag):
        raise Refusal(f"Tag {tag!r} is a name git reserves (HEAD, FETCH_HEAD, ORIG_HEAD...), so branch "
                      f"{BRANCH_PREFIX}{tag} would be ambiguous: pick another tag (e.g. 'nov25').")
    return tag


def validate_new_branch(repo: git.Repo, name: str) -> str:
    """A name for a new branch made from the research run (the pull request's): a valid git branch
    name, not main or master, not in the research runs' namespace, and not an existing branch."""
    if not isinstance(name, str) or not name or name.startswith("-") or name.strip() != name:
        raise Refusal(f"Branch name {name!r} is not usable: name a new branch such as 'pr/nov25'.")
    try:
        repo.git.check_ref_format("--branch", name)
    except git.GitCommandError:
        raise Refusal(f"Branch name {name!r} is not a valid git branch name: use letters, digits, '/', '.', '_' "
                      "or '-' (e.g. 'pr/nov25').") from None
    if name in PROTECTED_BRANCHES or name.startswith(BRANCH_PREFIX) or RESERVED_TAG_RE.fullmatch(name):
        raise Refusal(f"Branch {name!r} is refused: the pull request's branch is new, never main, master, HEAD or a "
                      f"research run's {BRANCH_PREFIX}<tag>. Name another (e.g. 'pr/nov25').")
    if name in repo.heads:
        raise Refusal(f"Branch {name!r} already exists and is left as it is: name a new branch (e.g. '{name}-2'), "
                      f"or delete that one first (git branch -D {name}).")
    return name_git_can_make(repo, name)


MAX_REF_PART_BYTES = 200  # a loose ref is a file: one part of its name over the file system's 255 bytes cannot be made


NEW_BRANCH = "name a new branch such as 'pr/nov25'"
READ_AS = ("{}", "refs/{}", "refs/tags/{}", "refs/heads/{}", "refs/remotes/{}", "refs/remotes/{}/HEAD")  # git's order
REF_KINDS = {"refs/tags/": "the tag", "refs/heads/": "the branch", "refs/remotes/": "the remote's branch"}


def name_git_can_make(repo: git.Repo, name: str, instead: str = NEW_BRANCH) -> str:
    """A new branch name git reads as that branch only and can create (review 93): `refs/heads/main` or a tag's name
    made an ambiguous branch that git, and the report's `git push origin <name>`, read as the other ref; a name under
    or above an existing branch, or too long, failed in git after the report was written. instead: what to do in
    its place (setup's: another tag)."""
    if name.startswith("refs/") or repo.git.rev_parse("--verify", "-q", name, with_exceptions=False):
        raise Refusal(f"Branch name {name!r} already names {what_git_reads(repo, name)} in this repository, which git "
                      f"would read in its place (`git push` too): {instead}.")
    parts = name.split("/")
    above = ["/".join(parts[:i]) for i in range(1, len(parts)) if "/".join(parts[:i]) in repo.heads]
    below = repo.git.for_each_ref("--count=1", "--format=%(refname:short)", f"refs/heads/{name}/").strip()
    if above or below:
        raise Refusal(f"Branch name {name!r} cannot be made beside the branch {(above or [below])[0]} (git keeps a "
                      f"branch's name as a file, and one name cannot be a file and a folder): {instead}.")
    if any(len(part.encode()) > MAX_REF_PART_BYTES for part in parts):
        raise Refusal(f"Branch name {name[:40]!r}... is too long for git (over {MAX_REF_PART_BYTES} bytes between two "
                      f"'/'): {instead}.")
    return name


def what_git_reads(repo: git.Repo, name: str) -> str:
    """The ref git reads a name as, first in git's order, in words; a name no ref has is a commit's or git's own."""
    refs = [form.format(name) for form in READ_AS]
    found = set(repo.git.for_each_ref("--format=%(refname)", *refs, with_exceptions=False).split())
    ref = next((r for r in refs if r in found), None)
    if ref is None:
        return "a commit or a name of git's own"
    kind = next((k for k in REF_KINDS if ref.startswith(k)), None)
    return f"{REF_KINDS[kind]} {ref.removeprefix(kind)}" if kind else f"the ref {ref}"


MAX_SAME_PREFIX = 16  # objects sharing a commit's abbreviation that are looked at (more are made on purpose only)


def commit_named(run_git, prefix: str) -> str | None:
    """The one commit whose hash begins with prefix (hex), else None. Never a branch or tag of that name, which git
    reads before a hash (review 85: a tag named like a kept run's commit stood in for it in the report and the
    dashboard, and a tag named like a pending run's made log_result check one commit and log another's row).
    run_git(*args): git's output, or None where it failed."""
    found = (run_git("rev-parse", f"--disambiguate={prefix}") or "").split()
    if len(found) > MAX_SAME_PREFIX:
        return None
    commits = [oid for oid in found if (run_git("cat-file", "-t", oid) or "").strip() == "commit"]
    return commits[0] if len(commits) == 1 else None


def validate_commit_arg(commit: str) -> str:
    if not isinstance(commit, str) or not COMMIT_ARG_RE.fullmatch(commit):
        raise Refusal(f"Commit {commit!r} is not a hex hash of 7 to 40 characters.")
    return commit.lower()


class GitTimeout(Refusal):
    """A git call of the server that did not finish within GIT_TIMEOUT_S (and was killed)."""


def neutralize_attributes(common_dir: Path) -> None:
    """Makes NEUTRAL_ATTRIBUTES the last line of the repository's info/attributes; the lines above
    it (the user's, or the agent's) are kept and lose all effect on the server's git."""
    path = Path(common_dir) / "info" / "attributes"
    try:  # read without blocking: a FIFO planted there (nothing in it) is replaced below, never waited on
        found = ledger.read_plain(path, MAX_ATTRIBUTES_BYTES)
    except IsADirectoryError:
        found = None  # which cannot be replaced: the write below says so
    except OSError as exc:
        raise Refusal(f"{path} cannot be read ({exc.strerror}): the server keeps its last line, which stops filters "
                      "and other programs named in git's config from running in its git. Make it a plain file (or "
                      "remove it), then retry.") from None
    if found is not None and len(found) > MAX_ATTRIBUTES_BYTES:
        raise Refusal(f"{path} is over {MAX_ATTRIBUTES_BYTES >> 20} MiB, more than any attributes file a person "
                      "writes: move it away (git reads the attributes in it for every path), then retry.")
    lines = (found or b"").decode("utf-8", errors="replace").splitlines()
    if lines[-1:] == [NEUTRAL_ATTRIBUTES]:
        return
    kept = [line for line in lines if line != NEUTRAL_ATTRIBUTES]
    scratch = path.with_name(f"attributes.{os.getpid()}-{threading.get_ident()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch.write_text("\n".join(kept + [NEUTRAL_ATTRIBUTES]) + "\n")
        os.replace(scratch, path)  # a symlink planted at that path is replaced, never followed
    except OSError as exc:
        scratch.unlink(missing_ok=True)
        raise Refusal(f"{path} cannot be written ({exc.strerror}): the server keeps its last line, which stops "
                      "filters and other programs named in git's config from running in its git. Make it a plain "
                      "file (or remove it), then retry.") from None


def clear_exclude(common_dir: Path) -> None:
    """Review 96: git reads info/exclude in most calls (a diff against the working tree too), through a link; a FIFO
    there, or a link to /dev/zero, held every run_experiment until the git timeout, and setup's own read never ended.
    Anything there but a plain file or a folder (which git refuses, naming it) is moved aside, kept as it was."""
    path = Path(common_dir) / "info" / "exclude"
    try:
        mode = os.stat(path).st_mode
    except OSError:  # none, or a dangling link: git reads nothing there
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        ledger.move_aside(path)


class HarnessGit(git.Git):
    """git as the server runs it: without the repository's hooks, fsmonitor, drivers or content
    conversions (NO_AGENT_CODE, GIT_ENV, NEUTRAL_ATTRIBUTES), killed (with its children) after
    GIT_TIMEOUT_S, which then raises GitTimeout."""

    def __init__(self, working_dir=None):
        super().__init__(working_dir)
        self._persistent_git_options = list(NO_AGENT_CODE)
        self.update_environment(**GIT_ENV)
        self._common_dir: Path | None = None

    def common_dir(self) -> Path | None:
        """The repository's (shared) git directory, asked of git once; None outside a repository."""
        if self._common_dir is None and self._working_dir:
            try:
                found = super().execute(["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
                                        kill_after_timeout=GIT_TIMEOUT_S)
            except git.GitCommandError:
                return None
            self._common_dir = Path(found.strip())
        return self._common_dir

    def execute(self, command, *args, **kwargs):
        kwargs.setdefault("kill_after_timeout", GIT_TIMEOUT_S)
        common = self.common_dir()
        if common is not None:
            neutralize_attributes(common)
            clear_exclude(common)
        try:
            return super().execute(command, *args, **kwargs)
        except git.GitCommandError as exc:
            if "Timeout: the command" in str(exc.stderr):  # GitPython's words for a call it killed
                shown = " ".join(str(arg) for arg in command[1:] if arg not in NO_AGENT_CODE)[:200]
                raise GitTimeout(f"git {shown} did not finish "
                                 f"within {GIT_TIMEOUT_S:.0f}s in {self._working_dir} and was stopped: look for a stuck "
                                 "git process or a leftover .lock file in .git, then retry.") from None
            raise


class HarnessRepo(git.Repo):
    GitCommandWrapperType = HarnessGit


class Workspace:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self._threads = threading.local()
        try:
            self._threads.repo = HarnessRepo(self.root)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            raise Refusal(f"{self.root} is not a git repository: clone autoresearch (or this project) "
                          "there, or start the server with --workspace pointing at one.") from None
        if Path(self.repo.working_tree_dir).resolve() != self.root:
            raise Refusal(f"{self.root} is inside the repository {self.repo.working_tree_dir}; "
                          "point --workspace at the repository root.")
        self._env = None if self._has_identity() else FALLBACK_IDENTITY

    @property
    def repo(self) -> HarnessRepo:
        """This thread's: a Repo reads objects through one `git cat-file` pipe, which two threads at once (two
        slots' runs ending together) put out of step, and a read then waits forever or reads another's object."""
        repo = getattr(self._threads, "repo", None)
        if repo is None:
            repo = self._threads.repo = HarnessRepo(self.root)
        return repo

    def _has_identity(self) -> bool:
        reader = self.repo.config_reader()
        return bool(reader.get_value("user", "name", "")) and bool(reader.get_value("user", "email", ""))

    # --- facts -------------------------------------------------------------------
    def branch(self) -> str | None:
        try:
            return self.repo.active_branch.name
        except TypeError:  # detached HEAD
            return None

    def head(self) -> str:
        return self.repo.head.commit.hexsha

    def branch_exists(self, name: str) -> bool:
        return name in self.repo.heads

    def missing_files(self) -> list[str]:
        return [name for name in REQUIRED_FILES if not (self.root / name).is_file()]

    def tracked(self, path: str) -> bool:
        return bool(self.repo.git.ls_files("--", path))

    def dirty_tracked_files(self) -> list[str]:
        """Tracked files with uncommitted changes (staged or not)."""
        out = self.repo.git.status("--porcelain", "--untracked-files=no", "-z")
        return sorted({entry[3:] for entry in out.split("\0") if len(entry) > 3})

    def changed_since(self, commit: str) -> list[str]:
        """Tracked files whose working copy differs from `commit` (committed or not)."""
        out = self.repo.git.diff("--name-only", "-z", "--no-renames", commit, "--")
        staged_new = self.repo.git.diff("--name-only", "-z", "--cached", "--no-renames", commit, "--")
        return sorted({p for p in (out + "\0" + staged_new).split("\0") if p})

    def fingerprint(self, commit: str = "HEAD") -> str:
        """Hash of every tracked file but train.py (path + blob id): the harness."""
        listing = self.repo.git.ls_tree("-r", "-z", commit)
        digest = hashlib.sha256()
        for entry in sorted(e for e in listing.split("\0") if e):
            meta, path = entry.split("\t", 1)
            if path != EDITABLE:
                digest.update(f"{meta}\t{path}\0".encode())
        return digest.hexdigest()[:16]

    def resolve_commit(self, commit: str) -> str | None:
        """The one commit whose hash begins with `commit` (hex, checked), else None: commit_named."""
        return commit_named(self.git_or_none, validate_commit_arg(commit))

    def git_or_none(self, command: str, *args: str) -> str | None:
        try:  # through the named method, which adds the options that run none of the agent's code (HarnessGit)
            return getattr(self.repo.git, command.replace("-", "_"))(*args)
        except git.GitCommandError:
            return None

    def branch_tip(self, branch: str) -> str | None:
        try:
            return self.repo.git.rev_parse("--verify", "--quiet", f"refs/heads/{branch}^{{commit}}")
        except git.GitCommandError:
            return None

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        try:
            self.repo.git.merge_base("--is-ancestor", ancestor, descendant)
            return True
        except git.GitCommandError:
            return False

    def train_at(self, commit: str) -> bytes:
        """train.py's exact bytes in a commit."""
        return (self.repo.commit(commit).tree / EDITABLE).data_stream.read()

    def train_blob(self, commit: str) -> str:
        """The git object id of train.py in a commit: the same for every commit with the same code."""
        return (self.repo.commit(commit).tree / EDITABLE).hexsha

    def working_train(self) -> bytes:
        """train.py's bytes; b"" where it is missing or not a plain file (a FIFO planted there would
        block the open of keep's and sweep's comparisons; run_experiment refuses it first)."""
        try:
            fd = os.open(self.root / EDITABLE, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            return b""
        with open(fd, "rb") as f:
            return f.read() if stat.S_ISREG(os.fstat(f.fileno()).st_mode) else b""

    def train_is_regular_file(self) -> bool:
        path = self.root / EDITABLE
        return path.is_file() and not path.is_symlink()

    # --- changes -----------------------------------------------------------------
    def create_branch(self, name: str) -> None:
        self.repo.git.checkout("-b", name)

    def create_candidate(self, parent: str, source: bytes, message: str, ref: str) -> str:
        """A commit holding `parent`'s tree with train.py replaced by `source`, stored under `ref`.
        The working tree, the index and HEAD are not touched."""
        commit = self.commit_train(parent, source, message)
        self.repo.git.update_ref(ref, commit)
        return commit

    def commit_train(self, parent: str, source: bytes, message: str) -> str:
        """A commit holding `parent`'s tree with train.py replaced by `source`, on no ref; the
        working tree, the index and HEAD are not touched."""
        scratch = Path(self.repo.git_dir) / "research-loop"
        scratch.mkdir(parents=True, exist_ok=True)
        source_file = scratch / f"candidate-{os.getpid()}-{threading.get_ident()}.py"
        index_file = scratch / f"index-{os.getpid()}-{threading.get_ident()}"
        try:
            source_file.write_bytes(source)
            blob = self.repo.git.hash_object("-w", "--", str(source_file))
            mode = self.repo.git.ls_tree(parent, "--", EDITABLE).split(" ", 1)[0] or "100644"
            env = dict(self._env or {}, GIT_INDEX_FILE=str(index_file))
            self.repo.git.read_tree(parent, env=env)
            self.repo.git.update_index("--add", "--cacheinfo", f"{mode},{blob},{EDITABLE}", env=env)
            tree = self.repo.git.write_tree(env=env)
            return self.repo.git.commit_tree(tree, "-p", parent, "-m", message, env=self._env)
        finally:
            source_file.unlink(missing_ok=True)
            index_file.unlink(missing_ok=True)

    def create_branch_at(self, name: str, commit: str) -> None:
        """A new branch at `commit`, without checking it out; git refuses it if the name exists
        (the empty old value), so an existing branch is never moved."""
        self.repo.git.update_ref(f"refs/heads/{name}", commit, "")

    def advance_branch(self, branch: str, new: str, old: str) -> None:
        """Moves the branch from `old` to `new` (refused by git if it moved meanwhile); where the
        branch is checked out, train.py's index entry follows, and the agent's working file is left
        as it is."""
        self.repo.git.update_ref(f"refs/heads/{branch}", new, old)
        if self.branch() == branch:
            self.repo.git.reset("-q", new, "--", EDITABLE)

    def retreat_branch(self, branch: str, new: str, old: str) -> None:
        """advance_branch undone, where the branch is still at `new`. A failure here is left unsaid: the
        caller's own error is the one to tell, and the branch is then where git left it."""
        try:
            self.repo.git.update_ref(f"refs/heads/{branch}", old, new)
            if self.branch() == branch:
                self.repo.git.reset("-q", old, "--", EDITABLE)
        except git.GitCommandError:
            pass

    def restore_train(self, commit: str) -> None:
        """train.py (file and index) as in `commit`; nothing else is touched."""
        self.repo.git.checkout(commit, "--", EDITABLE)

    def merged_train(self, base: str, change: str, onto: str) -> bytes | None:
        """The edit base -> change of train.py re-applied onto `onto`'s train.py (a 3-way merge),
        or None on a conflict."""
        scratch = Path(self.repo.git_dir) / "research-loop"
        scratch.mkdir(parents=True, exist_ok=True)
        # a folder made new (unguessable name) holds the three: a FIFO planted at a predictable name
        # blocked the write, under the state lock
        with tempfile.TemporaryDirectory(dir=scratch, prefix="merge-") as folder:
            files = [Path(folder) / f"{name}.py" for name in ("onto", "base", "change")]
            for path, commit in zip(files, (onto, base, change)):
                path.write_bytes(self.train_at(commit))
            try:
                return self.repo.git.merge_file("-p", *map(str, files), stdout_as_string=False,
                                                strip_newline_in_stdout=False)
            except git.GitCommandError as exc:
                if exc.status and 0 < exc.status < 128:  # the number of conflicts
                    return None
                raise

    # --- slots -------------------------------------------------------------------
    def slot_path(self, slot: int) -> Path:
        return Path(self.repo.git_dir) / SLOTS_DIR / str(slot)

    def checkout_slot(self, slot: int, commit: str) -> Path:
        """Slot `slot`'s worktree holding exactly `commit` (no untracked or ignored file left from
        an earlier run). Reused between runs; one damaged by hand is rebuilt."""
        return self.checkout_worktree(self.slot_path(slot), commit)

    def checkout_worktree(self, path: Path, commit: str) -> Path:
        """A worktree of this repository at `path` holding exactly `commit`, rebuilt if damaged."""
        for attempt in range(2):
            try:
                if attempt or not (path / ".git").is_file():
                    self._rebuild_worktree(path, commit)
                else:
                    tree = HarnessGit(str(path))
                    tree.update_index("--really-refresh", "--no-assume-unchanged", "--no-skip-worktree", "-q",
                                      with_exceptions=False)
                    tree.checkout("--detach", "--force", "-q", commit)
                    tree.clean("-ffdxq")
                if self.worktree_head(path) == commit and self.worktree_clean(path):
                    return path
            except git.GitCommandError:
                if attempt:
                    raise
        raise Refusal(f"The worktree {path} cannot be made to hold {commit[:7]}: remove that folder and run "
                      "`git worktree prune`, then retry.")

    @staticmethod
    def worktree_head(path: Path) -> str | None:
        if not (path / ".git").is_file():
            return None
        try:
            return HarnessGit(str(path)).rev_parse("HEAD")
        except git.GitCommandError:
            return None

    @staticmethod
    def worktree_clean(path: Path) -> bool:
        """Nothing changed, untracked, ignored or hidden from git's diff (index flags)."""
        tree = HarnessGit(str(path))
        try:
            changed = tree.status("--porcelain", "--ignored", "--untracked-files=all")
            flags = tree.ls_files("-v")
        except git.GitCommandError:
            return False
        hidden = [line for line in flags.splitlines() if line[:1].islower() or line[:1] == "S"]
        return not changed.strip() and not hidden

    def _rebuild_worktree(self, path: Path, commit: str) -> None:
        if path.exists():
            shutil.rmtree(path)
        self.repo.git.worktree("prune")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.repo.git.worktree("add", "--detach", "--force", "-q", str(path), commit)

    def add_excludes(self) -> None:
        exclude = Path(self.repo.git_dir) / "info" / "exclude"
        exclude.parent.mkdir(exist_ok=True)
        content = exclude.read_text() if exclude.exists() else ""
        missing = [p for p in EXCLUDED_PATHS if p not in content.splitlines()]
        if not missing:
            return
        text = "\n".join(missing) + "\n"
        if content and not content.endswith("\n"):
            text = "\n" + text
        with open(exclude, "a") as f:
            f.write(text)
