"""Sandboxed runs where what the sandbox binds is reached through a symbolic link (mcp_server/scripts/sandbox.py).

bubblewrap follows a link it mounts onto from the machine's root, not the sandbox's, so a bind whose path went
through an absolute link (a server's .venv linked to another environment, seen at stop 49) stopped its probe and
every run ("Can't bind mount"). The servers here start as clients start them, from an environment as linked, and
without the opt-in to unsandboxed runs: a run that trains was sandboxed.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from mcp_server.scripts import sandbox
from server_support import FAKE_PYTHON, REPO, answer, make_cache, make_workspace


def linked_run(ws: Path, cache: Path, python: str, train_python: str) -> dict:
    """setup and a baseline through a stdio server that runs `python`, its runs' trainer `train_python`."""
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), PYTHONUNBUFFERED="1")
    env.pop("AUTORESEARCH_TIME_BUDGET", None)
    env.pop(sandbox.UNSANDBOXED_ENV, None)
    params = StdioServerParameters(command=python, args=["-m", "mcp_server", "--workspace", str(ws),
                                                         "--train-command", f"{train_python} fake_train.py"],
                                   env=env, cwd=str(REPO))

    async def go():
        async with Client(params, mode="legacy") as client:
            answer(await client.call_tool("setup", {"tag": "linked"}))
            return answer(await client.call_tool("run_experiment", {"description": "baseline"}))
    return anyio.run(go)


def link(place: Path, target: str) -> str:
    place.symlink_to(os.path.realpath(target))  # absolute, as `ln -s "$PWD/.venv"` makes it
    return str(place)


@pytest.mark.parametrize("linked", ["server's environment", "trainer's environment", "workspace and cache"])
def test_a_run_trains_sandboxed_where_its_environment_is_reached_through_a_link(bubblewrap, fake_env, outside_tmp,
                                                                                linked):
    """Outside /tmp (/var/tmp), the links are in the sandbox as on the machine: the server's .venv (sys.prefix, which
    every run binds read-only, and the worker's own interpreter), the trainer's venv (its environment in /tmp,
    which the sandbox replaces), or the workspace and prepared cache, named through linked folders."""
    ws, cache = make_workspace(fake_env), make_cache(fake_env)
    python, train_python = sys.executable, FAKE_PYTHON
    if linked == "server's environment":
        python = os.path.join(link(outside_tmp / ".venv", sys.prefix), "bin", "python")
    elif linked == "trainer's environment":
        train_python = os.path.join(link(outside_tmp / "env", os.path.dirname(os.path.dirname(FAKE_PYTHON))),
                                    "bin", "python")
    else:
        ws, cache = Path(link(outside_tmp / "ws", str(ws))), Path(link(outside_tmp / "cache", str(cache)))
    run = linked_run(ws, cache, python, train_python)
    assert run["status"] == "ok" and run["val_bpb"] == 1.0 and not run.get("unsandboxed"), json.dumps(run)


def test_a_writable_path_linked_out_of_the_runs_folder_leaves_its_target_read_only(bubblewrap, tmp_path):
    """Binds follow links now, so one the run's side could plant stays unfollowed: a writable path of the spec
    (an export folder) that is a link out of the run's folder (bubblewrap followed a relative one before, and its
    target, here in the read-only workspace, became writable)."""
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir(), elsewhere.mkdir()
    (run / "exports").symlink_to("../elsewhere")
    code = "open('exports/planted', 'w').write('x')"
    spec = {"readonly": [str(tmp_path)], "writable": [".", "exports"]}
    argv, _ = sandbox.wrap([sys.executable, *sandbox.NO_SITE, "-c", code], spec, str(run))
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode != 0 and "Read-only file system" in done.stderr and not (elsewhere / "planted").exists()


def test_an_environment_linked_inside_a_hidden_folder_is_reached_and_nothing_else_there(bubblewrap, outside_tmp):
    """A link that lies in a folder the sandbox empties (a cluster's shared folder hidden around the run) is made
    there again, to its resolved target, which is shown; the rest of the folder stays hidden."""
    shared = outside_tmp
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(shared / "env")], check=True)
    (shared / "linked-env").symlink_to("env")
    code, other = shared / "ws" / "code", shared / "other"
    code.mkdir(parents=True), other.mkdir()
    listing = f"import os; print(sorted(os.listdir({str(shared)!r})), os.path.islink({str(shared / 'linked-env')!r}))"
    spec = {"readonly": [], "writable": ["."], "hidden": [str(shared)]}
    argv, _ = sandbox.wrap([str(shared / "linked-env" / "bin" / "python"), "-c", listing], spec, str(code))
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['env', 'linked-env', 'ws'] True", out


def test_a_private_copy_replaces_a_file_named_through_a_linked_cache(bubblewrap, tmp_path, outside_tmp):
    """The worker's private copy of the validation shard, in place of the shard as the cache is named
    (AUTORESEARCH_CACHE through a link): the run reads the copy there."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shard.parquet").write_text("the machine's")
    (tmp_path / "copy").write_text("the private copy")
    shard = Path(link(outside_tmp / "cache", str(tmp_path))) / "data" / "shard.parquet"
    argv, _ = sandbox.wrap([sys.executable, *sandbox.NO_SITE, "-c", f"print(open({str(shard)!r}).read())"],
                           {"readonly": [str(shard.parent.parent)]}, str(outside_tmp), {shard: tmp_path / "copy"})
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.stdout.strip() == "the private copy", done.stderr


@pytest.mark.parametrize("planted", ["harness file", "export folder"])
def test_a_link_planted_into_the_hidden_downloads_leaves_them_hidden(bubblewrap, outside_tmp, planted):
    """Review 82: a harness file of the slot's worktree replaced by a link into the cache's downloads (the data sets'
    sources, hidden from runs), or the workspace's exports folder linked there (the run's export folder then inside
    them), made the downloads "hold a path the spec shows" while they lie inside the cache it shows read-only: left
    readable, as neither order could hide one and show the other, so the run read the text the validation is cut
    from. Only the run's folder and the server's read-only paths order a hidden one first now."""
    cache, run, ws = outside_tmp / "cache", outside_tmp / "run", outside_tmp / "ws"
    (cache / "downloads").mkdir(parents=True), run.mkdir(), (ws / ".research-loop").mkdir(parents=True)
    (cache / "downloads" / "val.txt").write_text("the validation's source")
    if planted == "harness file":
        (run / "README.md").symlink_to(cache / "downloads" / "val.txt")
        export = ws / ".research-loop" / "exports" / "3"
    else:
        (ws / ".research-loop" / "exports").symlink_to(cache / "downloads")
        export = ws / ".research-loop" / "exports" / "3"
        export.mkdir()  # as the server makes it, through the link
    spec = {"readonly": [str(ws), str(cache)], "writable": [".", str(export)], "readonly_inside": ["README.md"],
            "hidden": [str(cache / "downloads")]}
    argv, _ = sandbox.wrap(["cat", str(cache / "downloads" / "val.txt")], spec, str(run))
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode != 0 and "the validation's source" not in done.stdout, (done.stdout, done.stderr)
