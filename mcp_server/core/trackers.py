"""The tracker the user asked for (--track): MLflow's (tracking.py) or W&B's (wandb_tracking.py), for
the server's thread and for the demo's catch-up once its server has exited."""
import os
from pathlib import Path

from mcp_server.core import state, tracking


def tracker(root: Path, track: str, mlflow_uri: str | None = None, owned=lambda: True) -> tracking.Tracker:
    """Not started. MLflow's at mlflow_uri, else at MLFLOW_TRACKING_URI, else in the workspace's own store."""
    if track == "wandb":
        from mcp_server.core import wandb_tracking  # imports nothing of W&B's until a run is written
        return wandb_tracking.tracker(root, owned=owned)
    return tracking.Tracker(root, mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None, owned=owned)


def catch_up(root: Path, track: str, mlflow_uri: str | None = None) -> int:
    """One pass, here and now, once the workspace's server has exited: the runs its tracker had not
    written yet (an MCP client gives a server 2 s to exit before it ends it, often too short for the
    night's last decision). Returns how many runs it wrote: none while a server owns the workspace (review 82: one
    still exiting, in its own last pass, or another that took the workspace, would write the same runs again)."""
    owner = state.State(Path(root))
    if not owner.try_own():
        return 0
    try:
        return tracker(root, track, mlflow_uri).sync()
    finally:
        owner.release()
