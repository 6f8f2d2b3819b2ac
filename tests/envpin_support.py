"""The stand-ins of tests/test_envpin.py and tests/test_trusted_import.py: a workspace whose runs
train with a venv holding a stand-in torch package (conftest's stand_in_torch fixture), and an edit
of a source made through a hard link, as uv's cache links a venv's files."""
import json
import os
import subprocess
import sys
from pathlib import Path

from server_support import make_workspace

WARM_TRAIN = """import os, time
while os.path.exists({hold!r}):
    time.sleep(0.05)
import torch
print("torch:", torch.SOURCE)
export = os.environ["RESEARCH_LOOP_EXPORT"]
open(export + ".json", "w").write("{{}}")
open(export, "w").write("model")
print("val_bpb: 1.5")
"""


class StandInTorch:
    """A workspace whose runs train with a venv holding a stand-in torch package (the warm interpreter
    imports it before any run is handed to it), run through a real LocalPool with a stand-in evaluator;
    train.py waits while `hold` exists (inside the workspace, which the sandbox shows)."""

    def __init__(self, folder: Path):
        from mcp_server.core.workspace import Workspace
        from mcp_server.executors import executor
        from server_support import git
        self.folder, self.hold = folder, folder / "ws" / "hold"
        self.ws = make_workspace(folder, WARM_TRAIN.format(hold=str(self.hold)))
        self.hold.touch()
        venv = folder / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        (self.site,) = venv.glob("lib/python*/site-packages")
        (self.site / "torch").mkdir()
        self.source = self.site / "torch" / "__init__.py"
        self.source.write_text("SOURCE = 'compiled from its source'  # a stand-in for torch's own code\n")
        self.python = str(venv / "bin" / "python")
        self.harness = folder / "harness"
        git(self.ws, "worktree", "add", "-q", "--detach", str(self.harness))
        self.pool = executor.LocalPool(Workspace(self.ws), 1, env=dict(os.environ))

    def spec(self, run: int, sandboxed: bool, environment: dict | None = None, evaluator: list | None = None,
             evaluation_seconds: float = 1):
        """The run's spec; its evaluator, unless given, answers 1.5 evaluation_seconds after its go (1 s: long
        enough for the pool to start the slot's next interpreter while it evaluates, as it looks every 0.5 s)."""
        from mcp_server.executors import executor
        from server_support import git
        from test_warm_start import ANSWERING_EVALUATOR
        export = self.ws / ".research-loop" / "exports" / str(run) / "model.pt2"
        export.parent.mkdir(parents=True, exist_ok=True)  # as integrity.worker_args makes it: the sandbox binds it
        evaluator = evaluator or [sys.executable, "-c", ANSWERING_EVALUATOR, "1.5", str(self.folder / "go"),
                                  str(evaluation_seconds)]
        evaluate = {"argv": evaluator,
                    "env": dict(os.environ), "timeout": 60, "harness": str(self.harness), "harness_commit": None}
        # the checkout too (warm_train.py): CI's clone may live under /tmp, which the sandbox replaces
        readonly = [str(self.ws), str(Path(__file__).resolve().parent.parent)]
        sandbox = ["--sandbox", json.dumps({"readonly": readonly, "writable": [".", str(export.parent)]})]
        return executor.RunSpec(run=run, commit=git(self.ws, "rev-parse", "HEAD").strip(),
                                command=[self.python, "train.py"], timeout=120, log=self.folder / f"{run}.log",
                                report=self.folder / f"{run}.report.json", after_seconds=60, environment=environment,
                                worker_args=[*(sandbox if sandboxed else []), "--export", str(export),
                                             "--evaluate", json.dumps(evaluate)])

    def log(self, run: int) -> str:
        return (self.folder / f"{run}.log").read_text()


def edit_through_a_link(source: Path, content: str):
    """source rewritten through a hard link in an unwatched folder (inotify reports a write to the
    folder of the name it went through), mtime put back; (a function that puts it back the same way,
    the file the edited module creates beside the link when a run's interpreter or evaluator runs it).
    A .pth file gets one import line that runs the same code."""
    alias = source.parent.parent.parent / "alias" / source.name
    alias.parent.mkdir(exist_ok=True)
    if not alias.exists():
        os.link(source, alias)
    genuine, st = source.read_bytes(), source.stat()
    imported = Path(str(alias) + ".imported")

    def write(data: bytes):
        with open(alias, "r+b") as f:
            f.truncate(0)
            f.write(data)
        os.utime(alias, ns=(st.st_atime_ns, st.st_mtime_ns))
    # only in a run's interpreter (warm_train.py, before or after its importer) or an evaluator (through the
    # server's importer): the archive's builder also imports torch, outside any run
    code = (f"import sys\nif 'trusted_import' in sys.modules or sys.argv[0].endswith('warm_train.py'): "
            f"open({str(imported)!r}, 'w').close()\n{content}\n")
    write((f"import sys; exec({code!r})\n" if source.suffix == ".pth" else code).encode())
    return lambda: write(genuine), imported
