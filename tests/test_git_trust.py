"""The server's git runs no program the agent names and writes the blobs' exact bytes: filters
(smudge, clean, process), textconv, merge drivers, config pulled in by include.path, signing, and
every content conversion an attributes file can ask for (eol, ident, export-subst, export-ignore),
planted in .git/config, .git/info/attributes or a .gitattributes of the workspace. Each planted
program would touch a marker; the marker never appears and what the server checks out or
archives is byte for byte the commit's blob."""
import os
import shutil
from pathlib import Path

from mcp_server.core.workspace import NEUTRAL_ATTRIBUTES, Workspace
from mcp_server.dashboard import dashboard
from mcp_server.executors import cluster
from server_support import answer, git, set_knobs, slot_dir

ATTRIBUTES = "train.py filter=evil diff=evil merge=evil ident text eol=crlf crlf working-tree-encoding=UTF-16\n"  # crlf: text's old name


def plant(ws, marker):
    """Every program git could be told to run, each touching `marker` (with its name) when run."""
    script = ws.parent / "evil.sh"
    script.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {marker}\ncat\n")
    script.chmod(0o755)
    for key in ("filter.evil.smudge", "filter.evil.clean", "filter.evil.process", "diff.evil.textconv",
                "diff.evil.command", "merge.evil.driver", "core.pager", "core.editor", "gpg.program",
                "core.sshCommand", "credential.helper"):
        git(ws, "config", key, f"{script} {key}")
    git(ws, "config", "filter.evil.required", "true")
    git(ws, "config", "commit.gpgSign", "true")
    git(ws, "config", "core.eol", "crlf")  # with crlf (text's old name) set, every checkout would write CRLF
    git(ws, "config", "diff.external", f"{script} diff.external")
    included = ws.parent / "included.gitconfig"
    included.write_text(f"[filter \"other\"]\n\tsmudge = {script} included\n\tclean = {script} included\n"
                        "\trequired = true\n")
    git(ws, "config", "include.path", str(included))
    (ws / ".git" / "info").mkdir(exist_ok=True)
    (ws / ".git" / "info" / "attributes").write_text(ATTRIBUTES + "* filter=other\n")
    (ws / ".gitattributes").write_text(ATTRIBUTES)  # untracked: the agent's, in the working tree


def blob(ws, commit: str, path: str = "train.py") -> bytes:
    return Workspace(ws).repo.git.cat_file("blob", f"{commit}:{path}", stdout_as_string=False,
                                        strip_newline_in_stdout=False)


def test_programs_and_conversions_the_agent_plants_never_touch_the_servers_checkouts(lab):
    ws, marker = lab.ws, lab.ws.parent / "program-ran"
    lab.baseline()
    plant(ws, marker)
    (ws / "train.py").write_text("VAL_BPB = 0.9\n# $Id$\n")
    run = lab.ok("run_experiment", description="after the planted programs")
    assert run["status"] == "ok", run
    commit = git(ws, "rev-parse", f"{run['commit']}^{{commit}}").strip()
    assert (slot_dir(ws) / "train.py").read_bytes() == blob(ws, commit) == b"VAL_BPB = 0.9\n# $Id$\n"
    lab.ok("keep", unconfirmed=True)
    set_knobs(ws, VAL_BPB=0.95)
    lab.ok("run_experiment", description="worse")
    lab.ok("discard")  # restores train.py in the workspace: a checkout there
    assert (ws / "train.py").read_bytes() == blob(ws, commit)
    lab.ok("report")  # the morning report diffs each kept change
    assert not marker.exists(), f"a program the agent named ran: {marker.read_text()}"
    lines = (ws / ".git" / "info" / "attributes").read_text().splitlines()
    assert lines[-1] == NEUTRAL_ATTRIBUTES and lines[0] == ATTRIBUTES.strip()  # the user's lines are kept


def test_the_cluster_ships_the_commits_blobs_whatever_the_attributes_say(lab, tmp_path):
    ws, marker = lab.ws, lab.ws.parent / "program-ran"
    lab.baseline()
    (ws / "train.py").write_text("VAL_BPB = 0.9\nCOMMIT = '$Format:%H$'\n")
    git(ws, "commit", "-q", "-am", "a candidate")
    commit = git(ws, "rev-parse", "HEAD").strip()
    plant(ws, marker)
    (ws / ".git" / "info" / "attributes").write_text(
        "train.py export-subst filter=evil\nprepare.py export-ignore\nnanochat/** export-ignore\n")
    dest = tmp_path / "shipped"
    cluster.package(Workspace(ws), commit, dest, "token")
    assert (dest / "train.py").read_bytes() == blob(ws, commit) == b"VAL_BPB = 0.9\nCOMMIT = '$Format:%H$'\n"
    assert (dest / "prepare.py").read_bytes() == blob(ws, commit, "prepare.py")
    assert (dest / "nanochat" / "common.py").is_file()
    assert not marker.exists(), f"a program the agent named ran: {marker.read_text()}"



def test_the_overnight_plugin_copy_is_rebuilt_so_nothing_planted_in_it_loads(tmp_path):
    """Between sessions the agent can write the plugin copy the next session's server loads: a
    changed or symlinked plugin file, an untracked sitecustomize.py, a .pth in its environment,
    a hook for the checkout. Each session's copy is made afresh from HEAD's blobs."""
    from mcp_server.overnight.overnight import plugin_copy
    ws, marker = tmp_path / "plugin", tmp_path / "program-ran"
    ws.mkdir()
    (ws / "pyproject.toml").write_text('[project]\nname = "p"\nversion = "0"\nrequires-python = ">=3.10"\n'
                                       'dependencies = []\n')
    (ws / "server.py").write_text("SERVER = 'real'\n")
    (ws / "tool.py").write_text("TOOL = 'real'\n")
    git(ws, "init", "-q", "-b", "main")
    git(ws, "add", ".")
    git(ws, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "plugin")
    copy = plugin_copy(ws)
    (site,) = (copy / ".venv").glob("lib/python*/site-packages")
    (site / "evil.pth").write_text(f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n")
    (copy / "server.py").write_text("SERVER = 'planted'\n")
    (copy / "tool.py").unlink()
    (copy / "tool.py").symlink_to(tmp_path / "elsewhere.py")
    (copy / "sitecustomize.py").write_text("PLANTED = True\n")
    hook = ws / ".git" / "hooks" / "post-checkout"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    hook.chmod(0o755)
    assert plugin_copy(ws) == copy
    assert (copy / "server.py").read_bytes() == blob(ws, "HEAD", "server.py")
    assert not (copy / "tool.py").is_symlink() and (copy / "tool.py").read_bytes() == blob(ws, "HEAD", "tool.py")
    assert not (copy / "sitecustomize.py").exists() and not list(copy.rglob("evil.pth"))
    assert not marker.exists(), "the agent's hook ran"


def test_the_overnight_plugin_copy_is_made_in_a_linked_worktrees_own_git_folder(tmp_path):
    """A workspace that is a linked worktree (`git worktree add`: its .git is a file): the copy is made in its
    own git folder, not under a `.git/` that cannot hold one (review 72)."""
    from mcp_server.overnight.overnight import plugin_copy
    main, linked = tmp_path / "main", tmp_path / "linked"
    main.mkdir()
    (main / "pyproject.toml").write_text('[project]\nname = "p"\nversion = "0"\nrequires-python = ">=3.10"\n'
                                         'dependencies = []\n')
    git(main, "init", "-q", "-b", "main")
    git(main, "add", ".")
    git(main, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "plugin")
    git(main, "worktree", "add", "-q", "-b", "night", str(linked))
    copy = plugin_copy(linked)
    assert copy == Path(git(linked, "rev-parse", "--absolute-git-dir").strip()) / "research-loop" / "plugin"
    assert (copy / "pyproject.toml").read_bytes() == blob(linked, "HEAD", "pyproject.toml")
    assert (copy / ".venv").is_dir()


def test_the_cluster_code_folder_is_made_afresh_whatever_was_left_at_its_path(lab, tmp_path):
    """A code folder of an earlier run (the SLURM executor reuses runs/<n>/code), or a symlink
    planted at its path, could carry a sitecustomize.py into the node's Python: nothing of it stays."""
    ws = lab.ws
    lab.baseline()
    commit = git(ws, "rev-parse", "HEAD").strip()
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "sitecustomize.py").write_text("PLANTED = True\n")
    for dest in (tmp_path / "linked", tmp_path / "left"):
        if dest.name == "linked":
            dest.symlink_to(planted)
        else:
            shutil.copytree(planted, dest)
        cluster.package(Workspace(ws), commit, dest, "token")
        assert not dest.is_symlink() and not (dest / "sitecustomize.py").exists()
        assert (dest / "train.py").read_bytes() == blob(ws, commit)
    assert (planted / "sitecustomize.py").exists() and not (planted / "train.py").exists()


def run_beside_a_fifo(lab, path, seconds: float):
    """run_experiment's answer after the baseline, with a FIFO planted at `path`; fails where the call is not
    answered within `seconds` (the FIFO's other end is opened then, so a hung reader lets go)."""
    import threading
    lab.baseline()
    path.unlink()
    os.mkfifo(path)
    box = {}
    set_knobs(lab.ws, VAL_BPB=0.9)
    caller = threading.Thread(target=lambda: box.update(run=lab.call("run_experiment", description="after the fifo")),
                              daemon=True)
    caller.start()
    caller.join(seconds)
    try:
        assert not caller.is_alive(), f"a FIFO at {path} held the server's git"
    finally:
        try:  # unblock a hung reader: open the other end
            os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
        except OSError:
            pass
    return box["run"]


def test_a_fifo_at_the_attributes_file_hangs_no_git_call_of_the_server(lab):
    """Review 39b: the server reads $GIT_DIR/info/attributes before each of its git calls (to keep its
    neutral line last); a FIFO the agent planted there blocked that read, and every tool with it. It is
    read without waiting (a FIFO holds no lines) and replaced by the plain file with the neutral line."""
    path = lab.ws / ".git" / "info" / "attributes"
    assert answer(run_beside_a_fifo(lab, path, 60))["status"] == "ok"
    assert path.is_file() and path.read_text().splitlines()[-1] == NEUTRAL_ATTRIBUTES


def test_a_fifo_or_device_at_the_exclude_file_hangs_no_git_call_and_no_setup(lab):
    """Review 96, played: git reads $GIT_DIR/info/exclude in the server's calls (run_experiment's diff against the
    working tree), through a link. A FIFO there held each run_experiment for the 60 s git timeout, then refused it
    naming a stuck git or a .lock file; a link to /dev/zero made setup's own read of the file never end. What lies
    there but a plain file is moved aside (kept) before each git call of the server."""
    path = lab.ws / ".git" / "info" / "exclude"
    assert answer(run_beside_a_fifo(lab, path, 30))["status"] == "ok"
    assert not path.exists() and list(path.parent.glob(".exclude.*.moved/exclude"))
    lab.ok("discard")
    lab.ok("stop", reason="a new research run")
    path.symlink_to("/dev/zero")
    assert lab.ok("setup", tag="u")["branch"] == "autoresearch/u"
    assert "runs/" in path.read_text().splitlines()


def test_an_attributes_file_the_server_cannot_write_is_a_clear_refusal(lab):
    lab.baseline()
    (lab.ws / ".git" / "info" / "attributes").unlink()
    (lab.ws / ".git" / "info" / "attributes").mkdir()
    set_knobs(lab.ws, VAL_BPB=0.9)
    said = lab.refused("run_experiment", description="no neutral attributes")
    assert "info/attributes cannot be written" in said and "Make it a plain file" in said, said
    (lab.ws / ".git" / "info" / "attributes").rmdir()
    assert lab.ok("run_experiment", description="once it can")["status"] == "ok"


def test_a_replace_ref_does_not_pass_an_edited_harness_copy_as_its_commit(tmp_path):
    """refs/replace/<commit> makes git show another commit under that id: the agent edited the harness
    copy's evaluator, pointed the harness commit's id at a commit holding the edit, and both checks
    (the worker's bytes against ls-tree, the server's digests of the commit's sources) passed it."""
    import hashlib
    import subprocess
    from mcp_server.core import integrity
    from mcp_server.scripts.harness_copy import harness_problem
    repo = tmp_path / "ws"
    (repo / "nanochat").mkdir(parents=True)
    (repo / "nanochat" / "evaluate_export.py").write_text("VAL_BPB = None\n")
    git(repo.parent, "init", "-q", "-b", "main", str(repo))
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "harness")
    harness_commit = git(repo, "rev-parse", "HEAD").strip()
    harness = repo / ".git" / "research-loop" / "harness"
    git(repo, "worktree", "add", "-q", "--detach", str(harness), harness_commit)
    forged = "VAL_BPB = 0.5\n"
    (harness / "nanochat" / "evaluate_export.py").write_text(forged)  # the agent's edit, then its replace ref
    index = dict(os.environ, GIT_INDEX_FILE=str(tmp_path / "index"))
    blob_id = git(repo, "hash-object", "-w", str(harness / "nanochat" / "evaluate_export.py")).strip()
    subprocess.run(["git", "read-tree", harness_commit], cwd=repo, env=index, check=True)
    subprocess.run(["git", "update-index", "--cacheinfo", f"100644,{blob_id},nanochat/evaluate_export.py"], cwd=repo,
                   env=index, check=True)
    tree = subprocess.run(["git", "write-tree"], cwd=repo, env=index, check=True, capture_output=True,
                          text=True).stdout.strip()
    replacement = git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit-tree", tree, "-m", "harness").strip()
    git(repo, "replace", harness_commit, replacement)
    assert "nanochat/evaluate_export.py" in str(harness_problem(str(harness), harness_commit))
    sources = integrity.commit_sources(Workspace(repo), harness_commit)
    assert sources["nanochat/evaluate_export.py"] == hashlib.sha256(b"VAL_BPB = None\n").hexdigest()


def test_the_workers_git_has_the_servers_overrides():
    """harness_copy.py imports nothing from the package (it is shipped to cluster nodes alone), so it keeps
    its own copy of the server's git overrides: a fix made in one (GIT_NO_REPLACE_OBJECTS, review 41) must
    be in both."""
    from mcp_server.core import workspace
    from mcp_server.scripts import harness_copy
    assert harness_copy.GIT_ENV == workspace.GIT_ENV
    # the server's options that concern what ls-tree runs (the rest concern commits it does not make)
    assert set(harness_copy.NO_AGENT_GIT[1::2]) == set(workspace.NO_AGENT_CODE[1::2]) - {
        "commit.gpgSign=false", "core.autocrlf=false"}


def test_a_ref_named_like_a_kept_commit_does_not_stand_in_for_it(lab):
    """Review 85: the ledger's rows name commits by 7 hex digits, and git resolves a name to a branch or tag of that
    name before it reads it as an abbreviated hash. The agent tagged a commit of its own (train.py never measured)
    with the name of a kept run's commit: the morning report showed that commit's diff as the kept change, with the
    run's number and evidence, and `report(branch=...)` put its train.py on the pull request's branch."""
    lab.baseline()
    set_knobs(lab.ws, val_bpb=0.9)
    kept = lab.ok("run_experiment", description="measured")["commit"]
    lab.ok("keep", unconfirmed=True)
    set_knobs(lab.ws, val_bpb=0.9, unmeasured=1)
    git(lab.ws, "commit", "-q", "-am", "never measured")
    mine = lab.head()
    git(lab.ws, "reset", "-q", "--hard", "HEAD^")
    git(lab.ws, "tag", kept, mine)
    made = lab.ok("report", branch="pr/night")
    assert "UNMEASURED" not in git(lab.ws, "show", "pr/night:train.py")
    assert "UNMEASURED" not in (lab.ws / made["path"]).read_text()


def test_a_ref_named_like_a_run_does_not_log_a_row_for_another_commit(lab):
    """Review 85: log_result took the agent's 7 hex digits as the row's commit and git's reading of them (a tag of that
    name first) as the commit it checked: a tag named like a pending run's commit, on a commit of the agent's own at
    the branch's tip, logged a keep row for the run's commit while the best became the agent's commit."""
    lab.baseline()
    set_knobs(lab.ws, val_bpb=0.9)
    pending = lab.ok("run_experiment", description="waits for a decision")["commit"]
    set_knobs(lab.ws, val_bpb=1.4)
    git(lab.ws, "commit", "-q", "-am", "mine")
    git(lab.ws, "tag", pending, lab.head())
    said = lab.refused("log_result", commit=pending, val_bpb=0.5, memory_gb=1.0, status="keep", description="mine")
    assert "run 2 of this server" in said, said
    assert [row["commit"] for row in lab.ok("status")["recent"]] == [lab.loop.rows()[0].commit]
    logged = lab.ok("log_result", commit=lab.head(), val_bpb=1.05, memory_gb=1.0, status="keep", description="mine")
    assert logged["row"]["commit"] == lab.head()[:7]
    # a keep logged by hand, its name then taken by a tag of another commit: the dashboard shows the logged one
    set_knobs(lab.ws, val_bpb=1.4, unmeasured=1)
    git(lab.ws, "commit", "-q", "-am", "never logged")
    git(lab.ws, "tag", logged["row"]["commit"], lab.head())
    assert "UNMEASURED" not in dashboard.kept_change(lab.ws, logged["row"]["commit"])["diff"]
