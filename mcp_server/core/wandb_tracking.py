"""Experiment tracking in Weights & Biases (the `wandb` extra): the same runs as the MLflow tracker,
synced by the same thread (tracking.Tracker) from the same records, written by a W&B sink.

Offline by default: each run is a W&B offline run under the workspace's .research-loop/wandb/, and
`wandb sync .research-loop/wandb/offline-run-*` uploads the night later. Online when the user asked for it: WANDB_MODE
set, or WANDB_API_KEY (WANDB_PROJECT and WANDB_ENTITY are W&B's own, and are honoured).

A W&B run per research run: its id is fixed by the workspace, branch and run, so a run written again
replaces its local copy (and online, resumes the same run). It is grouped by research branch; the
constants it changed are its config, its loss curve its history (by step), its numbers, decision,
evidence and ledger row its summary, its decision and status its tags, and the train.py diff, the
log and the record its files. What was written is read from W&B's own folder: once W&B has finished
a run, its stage is noted in the run's folder (STAGE_FILE beside W&B's run file); a run cut short
has no note and is written again whole by the next pass. (A list of what was written, kept apart,
could be pre-filled by the agent so that runs were never written; a note counts only beside the
run file W&B wrote.)
wandb is imported in the tracker's thread, when first needed.
"""
import hashlib
import os
import re
import shutil
from pathlib import Path

from mcp_server.core import tracking
from mcp_server.core.state import STATE_DIR

LOCAL_DIR = "wandb"  # in .research-loop/: where W&B writes its runs (named by W&B, not by us)
STAGE_FILE = "research-loop-stage"  # in a W&B run's folder, once W&B finished it: the stage written
RUN_FOLDER = re.compile(r"(?:offline-)?run-\d{8}_\d{6}-(?P<rid>.+)")  # W&B's name of a run's folder
DEFAULT_PROJECT = "research-loop"
# W&B's own reporting and printing: its error reports go to the network, its messages to stdout
# (the MCP protocol's channel over stdio); a user's own settings win
QUIET = {"WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false", "WANDB_CONSOLE": "off"}
SETTINGS = dict(console="off", silent=True, disable_code=True, save_code=False, disable_git=True,
                disable_job_creation=True, x_disable_stats=True, x_disable_meta=True, x_disable_machine_info=True,
                x_save_requirements=False)
MAX_TAG_CHARS = 64  # W&B's limit on a tag


def local_dir(root: Path) -> Path:
    return Path(root).resolve() / STATE_DIR / LOCAL_DIR


def mode() -> str:
    """The user's WANDB_MODE; else online with an API key in the environment; else offline."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def where(root: Path) -> str:
    """The tracker's address in messages and the demo's summary."""
    return f"W&B ({mode()}, {local_dir(root)})"


def tracker(root: Path, owned=lambda: True, **timing) -> tracking.Tracker:
    """The tracking thread (not started), writing to W&B."""
    return tracking.Tracker(root, where(root), owned, sink=lambda: WandbSink(root), **timing)


def stored_stages(folder: Path) -> dict[str, str]:
    """{run id: stage} of the runs W&B holds in its folder, each with the stage noted once it finished."""
    stages = {}
    for run in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = RUN_FOLDER.fullmatch(run.name)
        if match and (run / f"run-{match['rid']}.wandb").is_file() and (run / STAGE_FILE).is_file():
            try:
                stages[match["rid"]] = (run / STAGE_FILE).read_text()[:64]
            except (OSError, UnicodeDecodeError):
                continue
    return stages


def run_id(root: Path, branch: str, key: str) -> str:
    """Unique in a team's project (every clone may have a run 0001-<same commit> on autoresearch/x)."""
    digest = hashlib.sha1(tracking.experiment_name(root, branch).encode()).hexdigest()[:8]
    return f"{digest}-{key}"


class WandbSink:
    """The W&B side: one run per research run, written whole at each stage."""

    def __init__(self, root: Path):
        for name, value in QUIET.items():
            os.environ.setdefault(name, value)
        import wandb
        self.wandb = wandb
        self.root = Path(root).resolve()
        self.dir = local_dir(self.root)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not os.access(self.dir, os.W_OK | os.X_OK):  # W&B would write to a temporary folder instead
            raise PermissionError(f"{self.dir} is not writable: W&B's runs cannot be kept there")
        self.tracked: dict[str, str] = stored_stages(self.dir)
        self.settings = wandb.Settings(mode=mode(), **SETTINGS)

    def track(self, branch: str, key: str, stage: str, describe) -> bool:
        """The run at this stage in W&B; False if it was already."""
        rid = run_id(self.root, branch, key)
        if self.tracked.get(rid) == stage:
            return False
        what = describe()
        self._forget(rid)  # a copy at an earlier stage, or cut short: this one replaces it
        folder = self._write(rid, branch, key, stage, what)
        (folder / STAGE_FILE).write_text(stage)
        self.tracked[rid] = stage
        return True

    def _forget(self, rid: str) -> None:
        for folder in self.dir.glob(f"*-{rid}"):
            match = RUN_FOLDER.fullmatch(folder.name)
            if match and match["rid"] == rid:
                shutil.rmtree(folder)

    def _write(self, rid: str, branch: str, key: str, stage: str, what: dict) -> Path:
        """W&B's run, whole on disk; returns its folder."""
        tags = what["tags"]
        try:
            run = self.wandb.init(
                dir=self.dir.parent, id=rid, resume="allow", project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                group=tracking.experiment_name(self.root, branch), job_type="experiment", name=what["name"],
                notes=what["description"], settings=self.settings, reinit="create_new",
                tags=[t[:MAX_TAG_CHARS] for t in (stage, f"status:{tags.get('result.status')}", branch)],
                config=what["params"] | {tracking.KEY_TAG: key, "workspace": str(self.root)})
            folder = Path(run.dir).parent
            try:
                self._fill(run, what)
            finally:
                run.finish(exit_code=1 if what["failed"] else 0)
        finally:
            # W&B's service (wandb-core) ends with each run, its files flushed and closed: the run is
            # whole on disk before it is noted, and no service is left between runs, or after the server
            self.wandb.teardown()
        return folder

    @staticmethod
    def _fill(run, what: dict) -> None:
        for step, loss, _ in what["curve"]:
            run.log({"train_loss": loss}, step=step)
        run.summary.update(what["metrics"] | {k: v for k, v in what["tags"].items() if not k.startswith("mlflow.")})
        files = Path(run.dir)  # the run's own folder: `wandb sync` reads them there, later
        for name, data in tracking.artifacts(what).items():
            (files / name).write_bytes(data)
            run.save(str(files / name), base_path=run.dir, policy="now")
