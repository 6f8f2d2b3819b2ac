"""Runs on a machine without a sandbox (bubblewrap left off PATH: the user's --unsandboxed opt-in), where what a run
leaves behind is not ended with a sandbox's namespace. (CI's machines have bubblewrap: the tests elsewhere run there
sandboxed.)"""
import json
import os
import sys

from server_support import processes_in, set_knobs, slot_dir, wait_until


def without_bubblewrap(folder, monkeypatch) -> None:
    """PATH without bwrap: every other program of the machine's bin folders, through links."""
    folder.mkdir()
    for place in ("/usr/local/bin", "/usr/bin", "/bin"):
        for name in os.listdir(place) if os.path.isdir(place) else ():
            if name != "bwrap" and not (folder / name).exists():
                (folder / name).symlink_to(os.path.join(place, name))
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}{os.pathsep}{folder}")


def test_a_daemon_that_escaped_an_unsandboxed_run_cannot_write_its_result(lab, monkeypatch, tmp_path):
    """Found by the flake hunt (stop 51): the worker waited up to 2 s for what a run left behind to end by itself (for
    bubblewrap's namespace, which ends just after the run), and without a sandbox a daemon that escaped the run went on
    writing into the run's output meanwhile: its summary 1.5 s after the run's end (val_bpb 0.1) was the run's result,
    where the run printed 0.95. Without a sandbox what is left is killed as the run ends."""
    without_bubblewrap(tmp_path / "bin", monkeypatch)
    lab.restart()  # a run's environment is its server's as it started
    lab.baseline()
    set_knobs(lab.ws, val_bpb=0.95, escape=1.5)
    first = lab.ok("run_experiment", description="leaves a daemon behind")
    assert json.loads((lab.ws / first["log"].replace(".log", ".report.json")).read_text())["sandbox"] is False
    assert first["val_bpb"] == 0.95, first
    assert "still running when it ended" in " ".join(first["warnings"]), first
    assert "0.100000" not in (lab.ws / first["log"]).read_text()
    assert wait_until(lambda: not processes_in(slot_dir(lab.ws)), 5)
