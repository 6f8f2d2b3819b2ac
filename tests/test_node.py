"""The node side of a cluster run (mcp_server/scripts/node.py) as an engine starts it: a process in the
job's code folder, with the scripts shipped beside the code. Two jobs starting together on one
node prepare the data once; a node that cannot prepare says which node and why."""
import json
import os
import subprocess
import sys
from pathlib import Path

from mcp_server.executors import cluster
from mcp_server.executors.executor import RunSpec
from mcp_server.scripts import node, sandbox
from server_support import make_cache

# a stand-in for prepare.py: counts its runs, takes a moment, records what it prepared
PREPARE = """import json, os, sys, time
cache = os.environ["AUTORESEARCH_CACHE"]
os.makedirs(cache, exist_ok=True)
with open(os.path.join(cache, "runs"), "a") as f:
    f.write("x")
time.sleep(1)
profile = sys.argv[sys.argv.index("--profile") + 1]
json.dump({"profile": profile, "flops_per_budget_second": 3.5e10}, open(os.path.join(cache, "prepared.json"), "w"))
"""


def code_folder(tmp_path: Path, name: str, token: str) -> Path:
    code = tmp_path / name
    scripts = code / node.NODE_DIR
    code.mkdir()
    cluster.ship_node_scripts(scripts)  # as cluster.package does
    (scripts / node.TOKEN_FILE).write_text(token)
    (code / "prepare.py").write_text(PREPARE)
    (code / "train.py").write_text("print('---'); print('val_bpb:          0.987000')\n")
    return code


def start(code: Path, prepare_command: list[str], env: dict) -> subprocess.Popen:
    prepare = json.dumps({"command": prepare_command, "profile": "cpu"})
    return subprocess.Popen([sys.executable, f"{node.NODE_DIR}/node.py", "--timeout", "30", "--prepare", prepare,
                             "--", sys.executable, "train.py"], cwd=code, env=env, stdout=subprocess.PIPE, text=True)


def result_of(out: str) -> dict:
    line = next(l for l in reversed(out.splitlines()) if l.startswith(node.RESULT_MARK))
    return json.loads(line[len(node.RESULT_MARK):])


def test_two_jobs_starting_together_prepare_the_node_once(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "AUTORESEARCH_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    jobs = [start(code_folder(tmp_path, f"job{k}", f"token{k}"), [sys.executable, "prepare.py"], env)
            for k in range(2)]
    outs = [job.communicate(timeout=60)[0] for job in jobs]
    assert (tmp_path / "cache" / "runs").read_text() == "x"  # the second job waited, then found it done
    for k, out in enumerate(outs):
        result = result_of(out)
        assert result["token"] == f"token{k}" and result["exit_code"] == 0 and result["val_bpb"] == 0.987
        assert result["host"] and result["device"]
        assert result["flops_per_budget_second"] == 3.5e10  # the server checks a run's FLOPs at the node's rate
    assert not (tmp_path / "job0" / node.NODE_DIR / node.TOKEN_FILE).exists()  # out of the training's reach


def test_a_node_that_cannot_prepare_says_which_and_why(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "AUTORESEARCH_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    offline = [sys.executable, "-c", "import sys; print('cannot reach huggingface.co'); sys.exit(3)"]
    out = start(code_folder(tmp_path, "job", "t"), offline, env).communicate(timeout=60)[0]
    result = result_of(out)
    assert result["exit_code"] == 1 and result["token"] == "t"
    assert "preparing the data and tokenizer failed on" in result["problem"] and "(exit 3)" in result["problem"]
    assert "cannot reach huggingface.co" in result["problem"] and "training on" not in out


def test_a_nodes_prepare_hides_from_its_compiler_warm_up_what_the_runs_cannot_read(tmp_path):
    """prepare.py compiles its stand-in in the runs' sandbox (the compile cache is the runs'): on a node
    it is told what the node hides from its runs (--hide: SLURM's shared folder) and whether the user
    accepts runs without a sandbox (--unsandboxed)."""
    env = {"PATH": "/usr/bin:/bin", "AUTORESEARCH_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    code = code_folder(tmp_path, "job", "t")
    seen = ("import json, os; print(json.dumps({k: os.environ.get(k) for k in "
            f"({sandbox.HIDE_ENV!r}, {sandbox.UNSANDBOXED_ENV!r})}})); raise SystemExit(3)")
    prepare = json.dumps({"command": [sys.executable, "-c", seen], "profile": "cpu"})
    out = subprocess.run([sys.executable, f"{node.NODE_DIR}/node.py", "--timeout", "30", "--prepare", prepare,
                          "--hide", str(tmp_path / "shared"), "--unsandboxed", "--", sys.executable, "train.py"],
                         cwd=code, env=env, capture_output=True, text=True, timeout=60).stdout
    told = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert json.loads(told[sandbox.HIDE_ENV]) == [str(tmp_path / "shared")] and told[sandbox.UNSANDBOXED_ENV] == "1"


# A stand-in for prepare.py's offline data set: records the selection it drew from the seed it was given
PREPARE_OFFLINE = """import hashlib, json, os
cache = os.environ["AUTORESEARCH_CACHE"]
os.makedirs(cache, exist_ok=True)
with open(os.path.join(cache, "runs"), "a") as f:
    f.write("x")
seed = os.environ["AUTORESEARCH_OFFLINE_SEED"]
json.dump({"profile": "cpu", "dataset": "offline", "offline_selection": hashlib.sha256(seed.encode()).hexdigest()},
          open(os.path.join(cache, "prepared.json"), "w"))
open(os.path.join(cache, "offline_seed"), "w").write(seed)
"""


def test_a_node_draws_the_servers_offline_files_and_its_training_cannot_read_the_seed(tmp_path, fake_env, monkeypatch):
    """The server's secret seed travels with the job, so a node's offline validation files are the
    server's (numbers compare); a node prepared with another seed prepares again; the node's
    training, like a local run, cannot read the seed."""
    server_cache = make_cache(fake_env)
    (server_cache / "prepared.json").write_text(json.dumps({"profile": "cpu", "dataset": "offline"}))
    (server_cache / "offline_seed").write_text("server-seed\n")
    spec = RunSpec(run=1, commit="c" * 40, command=["python", "train.py"], timeout=60, log=tmp_path / "l",
                   report=tmp_path / "r")
    args = cluster.node_args(spec, tmp_path / "ws")
    prepare = json.loads(args[args.index("--prepare") + 1])
    assert prepare["offline_seed"] == "server-seed" and prepare["dataset"] == "offline"

    node_cache = tmp_path / "node-cache"
    env = {"PATH": "/usr/bin:/bin", "AUTORESEARCH_CACHE": str(node_cache), "HOME": str(tmp_path)}
    code = code_folder(tmp_path, "job", "t")
    (code / "prepare.py").write_text(PREPARE_OFFLINE)
    (code / "train.py").write_text("try:\n    print('seed:', open(%r).read())\nexcept OSError as exc:\n"
                                   "    print('seed: refused', type(exc).__name__)\n" % str(node_cache / "offline_seed"))

    def job(seed: str) -> str:
        (code / node.NODE_DIR / node.TOKEN_FILE).write_text("t")
        wanted = json.dumps(dict(prepare, command=[sys.executable, "prepare.py"], offline_seed=seed))
        return subprocess.run([sys.executable, f"{node.NODE_DIR}/node.py", "--timeout", "30", "--prepare", wanted,
                               "--", sys.executable, "train.py"], cwd=code, env=env, capture_output=True, text=True,
                              timeout=60).stdout

    out = job("server-seed")
    assert "seed: refused PermissionError" in out and "server-seed" not in out.split("training on")[-1], out
    assert (node_cache / "runs").read_text() == "x"
    job("server-seed")
    assert (node_cache / "runs").read_text() == "x"  # prepared with this selection already
    job("another-seed")
    assert (node_cache / "runs").read_text() == "xx"


# A stand-in for the harness's evaluator: told "go" once the model is exported, it answers
# through the pipe the worker gave it (--out-fd), a number train.py never sees coming.
EVALUATOR = """import json, os, sys
fd = int(sys.argv[sys.argv.index("--out-fd") + 1])
if sys.stdin.readline().strip() == "go":
    os.write(fd, json.dumps({"val_bpb": 1.234, "causal": True}).encode())
"""

# A train.py that finds the evaluator's harness copy (through /proc, where the sandbox shows it no
# process of the machine, and in the node's scratch folder) and appends to it and to the node's own
# scripts, then exports, waits for the harness's answer and prints a better number of its own. It touches only copies under SCOPE
# (the test's folder): an evaluator of another run on this machine is not its to break.
TAMPERING_TRAIN = """import json, os, time
found = set()
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
    except OSError:
        continue
    found.update(arg.decode() for arg in args if arg.endswith(b"nanochat/evaluate_export.py") and arg.startswith(b"SCOPE/"))
print("evaluator seen" if found else "no evaluator in sight")
found.update(os.path.join(top, "evaluate_export.py") for top, _, files in os.walk("SCOPE/tmp") if
             top.endswith("nanochat") and "evaluate_export.py" in files)
for evaluator in sorted(found):
    try:
        with open(evaluator.replace("nanochat/evaluate_export.py", "prepare.py"), "a") as f:
            f.write("# planted\\n")
        print("tampered")
    except OSError as exc:
        print("could not tamper:", exc)
try:  # the node's scripts in its own folder: the evaluator runs trusted_import.py from there
    open("NODE_DIR/trusted_import.py", "a").write("#")
    print("NODE SCRIPTS WRITTEN")
except OSError as exc:
    print("node scripts:", exc)
export, answer = os.environ["RESEARCH_LOOP_EXPORT"], os.environ["RESEARCH_LOOP_ANSWER"]
open(export, "w").write("model")
open(export + ".json", "w").write("{}")
for _ in range(300):
    if os.path.exists(answer):
        break
    time.sleep(0.1)
print("---")
print("val_bpb:          0.500000")
"""


def verified_job(tmp_path: Path, path: str, *options: str) -> tuple[dict, str]:
    code = code_folder(tmp_path, "job", "t")
    (code / "nanochat").mkdir()
    (code / "nanochat" / "evaluate_export.py").write_text(EVALUATOR)
    (code / "train.py").write_text(TAMPERING_TRAIN.replace("SCOPE", str(tmp_path)).replace("NODE_DIR", node.NODE_DIR))
    verify = {"evaluator": "nanochat/evaluate_export.py", "editable": "train.py", "eval_tokens": 4096, "timeout": 60}
    (tmp_path / "tmp").mkdir()  # the node's scratch, with the harness copy, inside the test's folder
    env = {"PATH": path, "AUTORESEARCH_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path),
           "TMPDIR": str(tmp_path / "tmp")}
    out = subprocess.run([sys.executable, f"{node.NODE_DIR}/node.py", "--timeout", "60", *options,
                          "--verify", json.dumps(verify),
                          "--", sys.executable, "train.py"], cwd=code, env=env, capture_output=True, text=True,
                         timeout=120).stdout
    return result_of(out), out


def test_a_node_has_the_harness_evaluate_from_a_copy_the_run_cannot_change_unseen(tmp_path):
    result, out = verified_job(tmp_path, str(tmp_path / "no-bwrap-here"), "--unsandboxed")  # the user's opt-in
    assert result["sandbox"] is False and result["exported"] is True
    assert "tampered" in out  # without a sandbox the run reached the copy, and the check after the evaluation saw it
    assert "harness copy" in result["evaluation"]["error"] and "prepare.py" in result["evaluation"]["error"]
    assert result["val_bpb"] == 0.5  # what train.py printed; the server records the evaluation's verdict


def test_in_a_nodes_sandbox_the_harness_copy_is_read_only(tmp_path, bubblewrap):
    result, out = verified_job(tmp_path, "/usr/bin:/bin")
    assert result["sandbox"] is True and "could not tamper" in out and "tampered" not in out, out
    assert "node scripts: " in out and "NODE SCRIPTS WRITTEN" not in out, out
    assert "no evaluator in sight" in out  # its own process namespace
    assert result["evaluation"]["val_bpb"] == 1.234 and "error" not in result["evaluation"]


def test_a_node_makes_the_projects_environment_once_with_its_bytecode(tmp_path, monkeypatch):
    """The training imports from that environment inside the sandbox, where it cannot write bytecode."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text('[project]\nname = "tiny"\nversion = "0"\nrequires-python = ">=3.10"\n'
                                            'dependencies = ["idna"]\n')  # small, pure Python, from the index
    monkeypatch.chdir(project)
    monkeypatch.setenv("RESEARCH_LOOP_NODE_DIR", str(tmp_path / "node"))
    monkeypatch.setenv("UV_PROJECT_ENVIRONMENT", "restored after the test")
    monkeypatch.delenv("UV_PROJECT_ENVIRONMENT")
    node.sync_environment()
    env_dir = Path(os.environ["UV_PROJECT_ENVIRONMENT"])
    assert env_dir.parent == tmp_path / "node" / "envs" and (env_dir / ".synced").is_file()
    assert list(env_dir.glob("lib/python*/site-packages/idna/__pycache__/*.pyc")), "no bytecode in the environment"


# A stand-in train.py that compiles: prints what its compile folder held, adds a line of its own, and tries to write
# the node's shared compile cache, as a run that plants code for the next program's run would
COMPILING_TRAIN = """import os, sys
shared = os.path.join(os.environ["AUTORESEARCH_CACHE"], "compile")
folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR", shared)
graph = os.path.join(folder, "graph.py")
print("held:", open(graph).read() if os.path.exists(graph) else "nothing")
with open(graph, "a") as f:
    f.write(sys.argv[1] + ";")
try:
    open(os.path.join(shared, "planted.py"), "w").write("x")
    print("planted")
except OSError as exc:
    print("refused", type(exc).__name__)
"""


def test_a_nodes_run_compiles_in_its_programs_folder_not_the_shared_cache(tmp_path, bubblewrap):
    """A cluster node's runs wrote the node's shared compile cache, which every later run there loads (what stop 53
    mended on the server's machine only): a candidate's run could put code into the best's rerun on that node. A
    node's run now compiles in a folder of its own, filled from its program's (a new program's from its best's) and
    saved to its program's alone; the shared cache is read-only to it."""
    cache = tmp_path / "cache"
    env = {"PATH": "/usr/bin:/bin", "AUTORESEARCH_CACHE": str(cache), "HOME": str(tmp_path)}
    code = code_folder(tmp_path, "job", "t")
    (code / "train.py").write_text(COMPILING_TRAIN)
    best, candidate = "a" * 40, "b" * 40

    def job(line: str, *programs: str) -> str:
        (code / node.NODE_DIR / node.TOKEN_FILE).write_text("t")
        out = subprocess.run([sys.executable, f"{node.NODE_DIR}/node.py", "--timeout", "30", *programs,
                              "--", sys.executable, "train.py", line],
                             cwd=code, env=env, capture_output=True, text=True, timeout=60).stdout
        assert result_of(out)["exit_code"] == 0, out
        return out

    assert "held: nothing" in job("best", "--compile-program", best)
    out = job("POISON", "--compile-program", candidate, "--compile-seed", best)
    assert "held: best;" in out and "refused" in out, out  # warm from the best's graphs; the shared cache not its
    rerun = job("best again", "--compile-program", best)
    assert "held: best;\n" in rerun, rerun  # the candidate's line reached no run of the best
    programs = cache / "compile" / "programs"
    assert (programs / candidate / "graph.py").read_text() == "best;POISON;"
    assert not (cache / "compile" / "planted.py").exists() and not list((cache / "compile" / "work").glob("run-*"))
