"""bench/device_check.py's logic, as a dry run on the CPU: the same steps as on a GPU (facts, the
main run and its export, the harness's evaluation of it, an eager run, two experiments through the
server), a tiny budget, one table."""
import subprocess
import sys


def test_the_device_check_runs_dry_on_the_cpu(prepared_env, repo_root):
    done = subprocess.run([sys.executable, "bench/device_check.py", "--cpu", "--cache", prepared_env["AUTORESEARCH_CACHE"],
                           "--budget", "1"], cwd=repo_root, env=prepared_env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    names = [line.split("|")[1].strip() for line in table]
    for name in ("card", "driver", "torch / CUDA", "attention", "train.py, 1 s budget", "  compile",
                 "harness evaluation", "  val_bpb (harness's)", "eager (AUTORESEARCH_COMPILE=0)",
                 "server: baseline", "server: matrix lr 0.05", "device check"):
        assert name.strip() in [n.strip() for n in names], done.stdout
    rows = dict((line.split("|")[1].strip(), line.split("|")[2].strip()) for line in table)
    assert rows["server: baseline"].startswith("ok,") and "verified True" in rows["server: baseline"], rows
    assert "against train.py's" in rows["val_bpb (harness's)"] and "PROBLEM" not in done.stdout
    # the suite's environment trains eager (AUTORESEARCH_COMPILE=0), so the main run is the eager row's run too
    assert "cache off (AUTORESEARCH_COMPILE=0)" in rows["compile"] and "eager: the main run trained eager" in done.stdout
