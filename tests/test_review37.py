"""Review 37: files the agent can plant where the server reads or writes them, as named pipes (an
open blocks until someone opens the other end)."""
import os
import threading

import pytest

from server_support import set_knobs


def call_within(lab, seconds, name, **args):
    box = {}

    def go():
        try:
            box["answer"] = lab.call(name, **args)
        except BaseException as exc:  # noqa: BLE001 - what happened is the finding
            box["error"] = exc

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    return t.is_alive(), box


@pytest.mark.parametrize("planted,endless", [("results.tsv", False), ("results.tsv", True), ("progress.png", False),
                                            (".research-loop/state.json", False), (".research-loop/state.json", True)])
def test_a_fifo_planted_where_the_server_reads_or_writes_does_not_hang_a_tool(lab, planted, endless):
    """results.tsv or state.json replaced by a FIFO (an open blocks: before the fix every later call
    hung, the ledger's under the state lock) or a link to /dev/zero (a read that never ends)."""
    lab.baseline()
    path = lab.ws / planted
    path.unlink(missing_ok=True)
    if endless:
        path.symlink_to("/dev/zero")
    else:
        os.mkfifo(path)
    try:
        hung = {}
        for tool in ("status", "plot_progress", "history"):
            alive, box = call_within(lab, 20, tool)
            hung[tool] = alive
            if alive:
                break
        assert not any(hung.values()), f"{planted} as a FIFO hung: {hung}"
        if planted != "progress.png":  # set right from the server's own records
            assert path.is_file() and not path.is_symlink() and path.read_bytes()
    finally:
        # unblock a hung thread: open the other end
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass


def test_a_fifo_in_place_of_train_py_does_not_hang_keep(lab):
    """keep compares the working train.py with the kept code (a note): a FIFO there blocked the open."""
    lab.baseline()
    set_knobs(lab.ws, VAL_BPB=0.9)
    lab.ok("run_experiment", description="better")
    path = lab.ws / "train.py"
    path.unlink()
    os.mkfifo(path)
    try:
        alive, box = call_within(lab, 20, "keep")
        assert not alive, "a FIFO at train.py hung keep"
        alive, box = call_within(lab, 20, "status")
        assert not alive, "a FIFO at train.py hung status"
    finally:
        try:
            os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
        except OSError:
            pass


@pytest.mark.xfail(strict=True, reason="open: the server reads the worker's report from runs/, which the agent can write")
def test_the_workers_final_report_rewritten_before_the_server_reads_it_is_believed(lab):
    """The worker's report (exit code, wall time, device, sandbox, the harness's evaluation with the
    verified val_bpb, the imports' digests) lies in runs/, the agent's folder, and the server reads it
    only after the worker has exited. A process of the agent that watches runs/ and rewrites the final
    report in that moment has the server believe what it wrote."""
    import json
    import time

    lab.baseline()
    runs = lab.ws / "runs"
    before = set(runs.glob("*.report.json"))
    stop, forged = threading.Event(), []

    def forger():
        while not stop.is_set():
            for path in set(runs.glob("*.report.json")) - before:
                try:
                    report = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                if "running" in report or report.get("device") == "FORGED":
                    continue
                report |= {"device": "FORGED", "evaluation": {"val_bpb": 0.25, "causal": True}}
                tmp = path.with_name(path.name + ".forged")
                tmp.write_text(json.dumps(report))
                os.replace(tmp, path)
                forged.append(path.name)
            time.sleep(0.0005)

    thread = threading.Thread(target=forger, daemon=True)
    thread.start()
    try:
        set_knobs(lab.ws, VAL_BPB=0.9)
        run = lab.ok("run_experiment", description="idea")
    finally:
        stop.set()
        thread.join(5)
    assert forged, "the forger never saw the final report"
    assert run.get("device") != "FORGED", f"the server believed the rewritten report: {run}"


def test_a_nodes_sandboxed_training_cannot_rewrite_the_node_scripts(tmp_path, bubblewrap):
    """With --verify the node's sandbox made read-only only the harness's names in the code folder, not
    research-loop-node/: the training could rewrite trusted_import.py, which the node's evaluator runs."""
    import test_node
    from mcp_server.scripts import node
    write = (f"try:\n    open('{node.NODE_DIR}/trusted_import.py', 'a').write('#')\n    print('NODE SCRIPTS WRITTEN')\n"
             "except OSError as exc:\n    print('node scripts:', exc)\n")
    train = test_node.TAMPERING_TRAIN.replace("SCOPE", str(tmp_path)).replace('print("---")', write + 'print("---")')
    original = test_node.TAMPERING_TRAIN
    test_node.TAMPERING_TRAIN = train
    try:
        result, out = test_node.verified_job(tmp_path, "/usr/bin:/bin")
    finally:
        test_node.TAMPERING_TRAIN = original
    assert result["sandbox"] is True and "node scripts: " in out and "NODE SCRIPTS WRITTEN" not in out, out
