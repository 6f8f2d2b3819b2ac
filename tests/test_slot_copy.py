"""A run trains its commit's files, not what the agent writes into the slot's worktree after checkout:
files read other than by import (run as text, run with runpy, read as data), and a commit of more
sources than one argument holds (scripts/checkout_copy.py, docs/trust.md)."""
import os
import queue
import time
from pathlib import Path

import pytest

# how a train.py of the commit reads a file of its folder other than by import, and the file as the commit holds it
READS = {
    "exec": ("exec(open('helper.txt').read())", "helper.txt", "VALUE = 'the commit'\n", "VALUE = 'SWAPPED'\n"),
    "runpy": ("import runpy; VALUE = runpy.run_path('helper.py')['VALUE']", "helper.py", "VALUE = 'the commit'\n",
              "VALUE = 'SWAPPED'\n"),
    "config": ("import json; VALUE = json.load(open('config.json'))['value']", "config.json",
               '{"value": "the commit"}\n', '{"value": "SWAPPED"}\n'),
}

TRAIN = """import os, time
print("train.py started", flush=True)
while os.path.exists({hold!r}):
    time.sleep(0.05)
{read}
export = os.environ["RESEARCH_LOOP_EXPORT"]
open(export + ".json", "w").write("{{}}")
open(export, "w").write("model")
print("val_bpb: 1.5")
"""


def commit(lab, train: str, files: dict) -> dict:
    """train.py and files committed in the lab's workspace: the commit's files as the server passes them."""
    from mcp_server.core import integrity
    from mcp_server.core.workspace import Workspace
    from server_support import git
    for name, content in files.items():
        (lab.ws / name).parent.mkdir(parents=True, exist_ok=True)
        (lab.ws / name).write_text(content)
    (lab.ws / "train.py").write_text(train)
    git(lab.ws, "add", ".")
    git(lab.ws, "commit", "-qm", "train.py reads a file of its folder")
    return integrity.commit_files(Workspace(lab.ws), git(lab.ws, "rev-parse", "HEAD").strip())


def run(lab, n: int, files: dict, sandboxed: bool, during=None):
    """Run n through the lab's pool with the commit's files; during(): called once train.py has started (its
    files copied), before it reads them. The run's outcome."""
    from server_support import wait_until
    outcomes = queue.Queue()
    hold = lab.folder / "ws" / "hold"
    hold.touch()
    spec = lab.spec(n, sandboxed)
    spec.files = files
    lab.pool.start(spec, lambda r, o: outcomes.put(o))
    if during is not None:
        log = lab.folder / f"{n}.log"
        assert wait_until(lambda: log.exists() and "train.py started" in lab.log(n) or not outcomes.empty(), 60)
        during()
    hold.unlink()
    return outcomes.get(timeout=120)


@pytest.mark.parametrize("sandboxed", [True, False], ids=["bubblewrap", "unsandboxed"])
def test_a_file_the_run_reads_as_text_or_data_is_the_commits_whatever_the_slot_holds(stand_in_torch, sandboxed):
    """The agent rewrites files of the commit in the slot after checkout: the train.py runs one as text
    (`exec(open(...).read())`), runs one with runpy, and reads one as a config. The run read them from the
    slot (only imports were checked) and trained the agent's content as the commit's. Now the run copies the
    commit's files, each checked, and runs from its copy: written before the copy, a file stops the run (it
    names it); written while train.py runs, the run reads the commit's. (One train.py reads all three ways: a
    run of its own for each way cost 40 s of the suite, and the copy is the same for each.)"""
    lab = stand_in_torch
    reads = "".join(f"{code}\nprint({name!r}, VALUE, flush=True)\n" for code, name, _, _ in READS.values())
    files = commit(lab, TRAIN.format(hold=str(lab.folder / "ws" / "hold"), read=reads),
                   {name: genuine for _, name, genuine, _ in READS.values()})
    slot = lab.pool.ws.slot_path(0)
    checkout = lab.pool.ws.checkout_slot

    def swap_all(folder):  # the agent's writes
        for _, name, _, swapped in READS.values():
            (folder / name).write_text(swapped)

    def checkout_then_swap(k, commit):  # timed after the server's checkout
        path = checkout(k, commit)
        swap_all(path)
        return path
    lab.pool.ws.checkout_slot = checkout_then_swap
    outcome = run(lab, 1, files, sandboxed)
    lab.pool.ws.checkout_slot = checkout
    assert "SWAPPED" not in lab.log(1) and outcome.report["exit_code"] != 0, lab.log(1)
    named = [name for _, name, _, _ in READS.values()
             if f"{name} is not the run's commit's (other contents than the commit holds" in lab.log(1)]
    assert named, lab.log(1)
    for n in (2, 3):  # the second is handed to a warm interpreter, where the first one was not started
        outcome = run(lab, n, files, sandboxed, during=lambda: swap_all(slot))
        assert outcome.report["exit_code"] == 0 and "SWAPPED" not in lab.log(n), lab.log(n)
        for _, name, _, _ in READS.values():
            assert f"{name} the commit" in lab.log(n), lab.log(n)
    assert outcome.report["warm_start"], lab.log(3)
    if not sandboxed:  # the worker's folder for the copy is gone with the run
        assert not [p for p in Path("/tmp").glob("research-loop-commit-*") if p.stat().st_uid == os.getuid()
                    and time.time() - p.stat().st_mtime < 60]


def test_a_commit_of_more_sources_than_one_argument_holds_is_checked(stand_in_torch):
    """A commit of 2,000 sources (a vendored library) was run without any check of its slot's sources:
    their digests are more than one argument holds (128 KiB). Its files now go on the worker's socket,
    so a module swapped in the slot after checkout stops the run, and the honest run trains the commit's."""
    lab = stand_in_torch
    vendored = {f"vendor/module_{i:04d}.py": f"X = 'the commit {i}'\n" for i in range(2000)}
    read = "import sys; sys.path.insert(0, 'vendor'); import module_1999; print('helper:', module_1999.X, flush=True)"
    files = commit(lab, TRAIN.format(hold=str(lab.folder / "ws" / "hold"), read=read), vendored)
    assert len(files) > 2000
    slot = lab.pool.ws.slot_path(0)
    checkout = lab.pool.ws.checkout_slot

    def checkout_then_swap(k, commit):
        path = checkout(k, commit)
        (path / "vendor" / "module_1999.py").write_text("X = 'SWAPPED'\n")
        return path
    lab.pool.ws.checkout_slot = checkout_then_swap
    outcome = run(lab, 1, files, True)
    lab.pool.ws.checkout_slot = checkout
    assert "SWAPPED" not in lab.log(1) and outcome.report["exit_code"] != 0, lab.log(1)
    assert "vendor/module_1999.py is not the run's commit's" in lab.log(1), lab.log(1)
    outcome = run(lab, 2, files, True, during=lambda: (slot / "vendor" / "module_1999.py").write_text("X = 'SWAPPED'\n"))
    assert outcome.report["exit_code"] == 0 and "helper: the commit 1999" in lab.log(2), lab.log(2)


@pytest.mark.parametrize("planted", ["fifo", "symlink", "removed", "sparse terabyte"])
def test_a_file_replaced_in_the_slot_by_a_fifo_a_link_or_nothing_stops_the_copy_at_once(tmp_path, planted):
    """What the agent may leave at a file's path instead of other contents: a FIFO (reading it would wait
    for a writer, and the run's start with it), a symbolic link to a file holding the commit's bytes (the
    commit's file is no link), or nothing. The copy names the file and stops; the commit's own symbolic
    link is copied as a link. A sparse terabyte is refused by its size, never read (review 47: the copy read
    each file whole into memory before it compared digests)."""
    import hashlib
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mcp_server" / "scripts"))
    import checkout_copy
    slot, genuine = tmp_path / "slot", b"VALUE = 'the commit'\n"
    slot.mkdir()
    (slot / "alias.txt").symlink_to("helper.txt")
    files = {"helper.txt": [0o100644, hashlib.sha256(genuine).hexdigest(), len(genuine)],
             "alias.txt": [checkout_copy.SYMLINK, hashlib.sha256(b"helper.txt").hexdigest(), len(b"helper.txt")]}
    (slot / "helper.txt").write_bytes(genuine)
    copy = checkout_copy.copy(str(slot), files, str(tmp_path / "copy"))
    assert os.readlink(os.path.join(copy, "alias.txt")) == "helper.txt"
    assert Path(copy, "alias.txt").read_bytes() == genuine
    (slot / "helper.txt").unlink()
    if planted == "fifo":
        os.mkfifo(slot / "helper.txt")
    elif planted == "symlink":
        (tmp_path / "elsewhere.txt").write_bytes(genuine)
        (slot / "helper.txt").symlink_to(tmp_path / "elsewhere.txt")
    elif planted == "sparse terabyte":
        with open(slot / "helper.txt", "wb") as f:
            f.write(genuine)
            f.truncate(1 << 40)
    started = time.monotonic()
    with pytest.raises(checkout_copy.ChangedAfterCheckout, match="helper.txt is not the run's commit's"):
        checkout_copy.copy(str(slot), files, str(tmp_path / "again"))
    assert time.monotonic() - started < 5


def test_two_slots_ending_together_read_their_commits_files_at_once(tmp_path):
    """Found while timing the suite: two slots' runs that end together each dispatch the next run from their own
    thread, and each lists its commit's files (integrity.commit_files). One Repo's `git cat-file` pipe, shared
    by both threads, went out of step: one thread waited on it forever (the server hung, nothing running), or
    read an object that was not its own. Each thread now reads through its own Repo."""
    import subprocess
    import threading
    from mcp_server.core import integrity
    from mcp_server.core.workspace import Workspace
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for i in range(30):  # commits of a few files each, never listed before (the listing is cached per commit)
        for j in range(5):
            (repo / f"d{i}" / f"f{j}.txt").parent.mkdir(exist_ok=True)
            (repo / f"d{i}" / f"f{j}.txt").write_bytes(os.urandom(15000).hex().encode())
        subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", f"{i}"],
                       check=True)
    ws = Workspace(repo)
    commits = [c.hexsha for c in ws.repo.iter_commits()]
    listed, errors = {}, []

    def list_files(part: int):
        try:
            for commit in commits[part::3]:
                listed[commit] = integrity.commit_files(ws, commit)
        except Exception as exc:
            errors.append(exc)
    threads = [threading.Thread(target=list_files, args=(k,), daemon=True) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a thread waits on git's pipe forever"
    assert not errors, errors
    for n, commit in enumerate(reversed(commits)):  # every listing is its own commit's: 5 files per commit so far
        assert len(listed[commit]) == 5 * (n + 1), (n, len(listed[commit]))
