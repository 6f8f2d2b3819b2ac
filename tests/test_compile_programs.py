"""The compile cache kept per program (scripts/compile_programs.py): no run writes what a run of another program
loads, while a new program starts from its best's graphs."""
import os

from mcp_server.scripts import compile_programs
from server_support import Lab, answer, make_workspace, set_knobs


def test_a_run_cannot_put_code_into_what_the_bests_rerun_loads(fake_env, bubblewrap, monkeypatch):
    """Review 64, played in part at stop 53 with torch's Inductor: a line appended to a cached graph's module ran in
    the next process that loaded the graph, so a candidate's run could put code into the best's rerun (a control)
    and train it worse. Each run now compiles in a folder of its own, filled from its program's folder (a new
    program's from its best's) and saved to its program's alone: the candidate starts from the best's graph, and
    what it appends reaches no run of the best."""
    monkeypatch.setenv("FAKE_COMPILE", "1")
    lab = Lab(make_workspace(fake_env), unsandboxed=False)
    try:
        answer(lab.call("setup", tag="programs"))
        answer(lab.call("run_experiment", description="baseline"))
        lab.ok("keep")
        set_knobs(lab.ws, VAL_BPB=0.9, POISON=1)
        candidate = answer(lab.call("run_experiment", description="poisons what it compiled"))
        lab.ok("discard")
        control = answer(lab.call("run_experiment", description="the best again", rerun=True))
    finally:
        lab.loop.shutdown()
    logs = [(lab.ws / run["log"]).read_text() for run in (candidate, control)]
    assert "cache graph.py: 'compiled by run 1'" in logs[0], logs[0]  # warm from the best's graph
    assert "cache graph.py: 'compiled by run 1'" in logs[1] and "POISON" not in logs[1], logs[1]
    programs = fake_env / "cache" / "compile" / compile_programs.FOLDER
    saved = sorted((folder / "graph.py").read_text() for folder in programs.iterdir())
    assert saved == ["compiled by run 1", "compiled by run 1 POISON"], saved  # the candidate's in its own folder
    assert not list((fake_env / "cache" / "compile" / compile_programs.WORK).iterdir())  # each run's removed


def test_what_a_run_left_is_kept_as_plain_files_without_headers(tmp_path):
    """A run's folder may hold anything the run made: its program's folder gets the plain files and folders only
    (a link would be followed by whoever reads the folder next; a FIFO would hang the copy), and no precompiled
    headers (prepare's are shared; 300 MB per program is not kept)."""
    own, programs, program = tmp_path / "own", tmp_path / "programs", "a" * 40
    (own / "fx").mkdir(parents=True)
    (own / "fx" / "graph.py").write_text("graph")
    (own / compile_programs.HEADERS / "env").mkdir(parents=True)
    (own / compile_programs.HEADERS / "env" / "h.gch").write_text("header")
    (own / "link").symlink_to("/etc/passwd")
    (own / "linked-folder").symlink_to(tmp_path)
    os.mkfifo(own / "fifo")
    compile_programs.save(own, programs, program)
    kept = sorted(str(p.relative_to(programs / program)) for p in (programs / program).rglob("*"))
    assert kept == ["fx", "fx/graph.py"] and not own.exists(), kept
    into = tmp_path / "next"
    compile_programs.fill(into, programs, "b" * 40, program)  # a new program starts from its best's
    assert (into / "fx" / "graph.py").read_text() == "graph"
