"""The node side of a cluster run (mcp_server/node.py) as an engine starts it: a process in the
job's code folder, with the scripts shipped beside the code. Two jobs starting together on one
node prepare the data once; a node that cannot prepare says which node and why."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

from mcp_server import node, worker

# a stand-in for prepare.py: counts its runs, takes a moment, records what it prepared
PREPARE = """import json, os, sys, time
cache = os.environ["AUTORESEARCH_CACHE"]
os.makedirs(cache, exist_ok=True)
with open(os.path.join(cache, "runs"), "a") as f:
    f.write("x")
time.sleep(1)
profile = sys.argv[sys.argv.index("--profile") + 1]
json.dump({"profile": profile}, open(os.path.join(cache, "prepared.json"), "w"))
"""


def code_folder(tmp_path: Path, name: str, token: str) -> Path:
    code = tmp_path / name
    scripts = code / node.NODE_DIR
    scripts.mkdir(parents=True)
    shutil.copy(worker.__file__, scripts / "worker.py")
    shutil.copy(node.__file__, scripts / "node.py")
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
    assert not (tmp_path / "job0" / node.NODE_DIR / node.TOKEN_FILE).exists()  # out of the training's reach


def test_a_node_that_cannot_prepare_says_which_and_why(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "AUTORESEARCH_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    offline = [sys.executable, "-c", "import sys; print('cannot reach huggingface.co'); sys.exit(3)"]
    out = start(code_folder(tmp_path, "job", "t"), offline, env).communicate(timeout=60)[0]
    result = result_of(out)
    assert result["exit_code"] == 1 and result["token"] == "t"
    assert "preparing the data and tokenizer failed on" in result["problem"] and "(exit 3)" in result["problem"]
    assert "cannot reach huggingface.co" in result["problem"] and "training on" not in out
