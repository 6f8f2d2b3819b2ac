"""The server's git runs no program the agent names and writes the blobs' exact bytes: filters
(smudge, clean, process), textconv, merge drivers, config pulled in by include.path, signing, and
every content conversion an attributes file can ask for (eol, ident, export-subst, export-ignore),
planted in .git/config, .git/info/attributes or a .gitattributes of the workspace. Each planted
program would touch a marker; the marker never appears and what the server checks out or
archives is byte for byte the commit's blob."""
from mcp_server.core.workspace import NEUTRAL_ATTRIBUTES, Workspace
from mcp_server.executors import cluster
from server_support import git, set_knobs, slot_dir

ATTRIBUTES = "train.py filter=evil diff=evil merge=evil ident text eol=crlf working-tree-encoding=UTF-16\n"


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
    lab.ok("keep")
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

