"""The MCP server: thin tool wrappers over ResearchLoop, on the official SDK's MCPServer.

Each tool returns a pydantic model as structured content plus the same data as compact
JSON text (no indentation, no empty fields): agents read these answers hundreds of times
a night. Refusals become tool errors whose message says what to do next.
"""
import base64
import functools
import logging

import anyio
import git
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ImageContent, TextContent, ToolAnnotations

from mcp_server import plot
from mcp_server.loop import ResearchLoop
from mcp_server.models import (
    DecisionResult, LoggedRow, Metrics, NoiseResult, PlotResult, Refusal, RunResult, SetupResult,
    StatusResult,
)
from mcp_server.workspace import EDITABLE

SERVER_NAME = "autoresearch"
INSTRUCTIONS = (
    "Autonomous GPT-training research loop on a git workspace. setup(tag) once, run_experiment "
    "('baseline') first, then: edit train.py, run_experiment(description), keep() or discard(). "
    "Only train.py may change. measure_noise() tells which gains are real."
)
MAX_NOISE_REPEATS = 10
PROGRESS_POLL_SECONDS = 1.0

READ_ONLY = ToolAnnotations(readOnlyHint=True, destructiveHint=False, idempotentHint=True, openWorldHint=False)
WRITES = ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=False, openWorldHint=False)
RESETS = ToolAnnotations(readOnlyHint=False, destructiveHint=True, idempotentHint=False, openWorldHint=False)

log = logging.getLogger(__name__)


def compact(model) -> CallToolResult:
    text = model.model_dump_json(exclude_none=True)
    return CallToolResult(content=[TextContent(type="text", text=text)],
                          structured_content=model.model_dump(mode="json"))


def refusals_as_tool_errors(fn):
    """Refusals and git failures reach the agent as tool errors; the server stays up."""
    def translate(exc: Exception) -> ToolError:
        if isinstance(exc, Refusal):
            return ToolError(str(exc))
        if isinstance(exc, git.GitCommandError):
            detail = (exc.stderr or str(exc)).strip().replace("stderr: ", "")
            return ToolError(f"git failed: {detail}. Fix the repository, then retry; status() shows "
                             "where things stand.")
        log.exception("unexpected error in %s", fn.__name__)
        return ToolError(f"Internal error ({type(exc).__name__}: {exc}). The server is still running; "
                         "status() shows the workspace state.")

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except ToolError:
            raise
        except Exception as exc:
            raise translate(exc) from exc
    return wrapper


def build_server(loop: ResearchLoop) -> MCPServer:
    srv = MCPServer(SERVER_NAME, instructions=INSTRUCTIONS, log_level="WARNING")

    def register(annotations: ToolAnnotations):
        """Adds a tool; its docstring, on one line, is the description the agent reads."""
        def decorate(fn):
            srv.add_tool(refusals_as_tool_errors(fn), description=" ".join(fn.__doc__.split()),
                         annotations=annotations)
            return fn
        return decorate

    def locked(fn, *args, **kwargs):
        # tool calls may arrive concurrently: one bookkeeping operation at a time
        with loop.state.mutex:
            return fn(*args, **kwargs)

    async def follow(run, ctx: Context, done_before: float = 0.0, scale: float = 1.0) -> None:
        """Waits for the run, turning its progress lines into MCP progress notifications."""
        last_step = -1
        while not run.done.is_set():
            await anyio.to_thread.run_sync(run.done.wait, PROGRESS_POLL_SECONDS)
            live = loop.read_metrics() if not run.done.is_set() else None
            progress = live.progress if live else None
            if progress and progress.step > last_step:
                last_step = progress.step
                await ctx.report_progress(done_before + progress.percent * scale, 100.0,
                                          f"step {progress.step} ({progress.percent:.1f}%) loss "
                                          f"{progress.loss:.4f} remaining {progress.remaining_s}s")

    @register(WRITES)
    async def setup(tag: str) -> SetupResult:
        """Start a research run: create branch autoresearch/<tag> from HEAD (refuses an existing one or
        uncommitted changes), create results.tsv, check that data and tokenizer are prepared, and
        fingerprint the harness (every tracked file but train.py)."""
        return compact(locked(loop.setup, tag))

    @register(WRITES)
    async def run_experiment(description: str, ctx: Context, wait: bool = True,
                             timeout_seconds: float | None = None) -> RunResult:
        """Commit train.py with the description and train it (hard timeout, default 2 x budget).
        Returns status ok/crash/timeout, val_bpb, memory, best kept so far and the delta, whether the
        gain beats the measured noise, and the log tail on a crash. The result stays pending until
        keep() or discard(). wait=False returns at once: follow with read_metrics()."""
        run = locked(loop.start_run, description, timeout_seconds)
        if not wait:
            return compact(loop.started(run))
        await follow(run, ctx)
        return compact(run.result)

    @register(READ_ONLY)
    async def read_metrics(run: str | None = None) -> Metrics:
        """The summary of run.log (or of a past run: its number or commit), or the live progress
        of a run still going. A missing, empty or crashed log gives a status and the log tail."""
        return compact(loop.read_metrics(run))

    @register(WRITES)
    async def keep(note: str | None = None) -> DecisionResult:
        """Accept the pending result (status ok only): the ledger row is written with status keep and
        the branch advances (this commit is the new base)."""
        return compact(locked(loop.keep, note))

    @register(RESETS)
    async def discard(reason: str | None = None) -> DecisionResult:
        """Reject the pending result: the ledger row is written first (discard, or crash for a crash
        or timeout), then tracked files are reset to the last kept commit. Untracked files are not
        touched. Also resolves an interrupted run as a crash row."""
        return compact(locked(loop.discard, reason))

    @register(WRITES)
    async def log_result(commit: str, val_bpb: float, memory_gb: float, status: str,
                         description: str) -> LoggedRow:
        """Append one validated row to results.tsv for a run managed outside this server.
        status is keep, discard or crash (crash rows are written as 0.000000 and 0.0)."""
        return compact(locked(loop.log_result, commit, val_bpb, memory_gb, status, description))

    @register(READ_ONLY)
    async def status() -> StatusResult:
        """Branch, best val_bpb and its commit, counts per status, recent rows, a run in progress,
        a pending or interrupted result, the noise estimate, and the next step."""
        return compact(loop.status())

    @register(WRITES)
    async def plot_progress() -> PlotResult:
        """Write progress.png in the workspace: every run's val_bpb, the running best of kept runs as
        a step line, kept runs labelled with their descriptions. Returned as an image too."""
        rows = loop.rows()
        if not rows:
            raise Refusal("results.tsv has no rows yet: run and keep a baseline first.")
        path = loop.root / plot.PLOT_NAME
        plotted, kept, crashes = await anyio.to_thread.run_sync(plot.plot_rows, rows, path)
        result = PlotResult(path=str(path), runs_plotted=plotted, kept=kept, crashes_excluded=crashes)
        image = base64.b64encode(path.read_bytes()).decode()
        return CallToolResult(content=[TextContent(type="text", text=result.model_dump_json()),
                                       ImageContent(type="image", data=image, mime_type="image/png")],
                              structured_content=result.model_dump(mode="json"))

    @register(WRITES)
    async def measure_noise(ctx: Context, repeats: int = 2) -> NoiseResult:
        """Rerun the last kept commit unchanged `repeats` times to measure run-to-run noise. Each
        repeat is logged as a discard row 'noise repeat k/N of <commit>' (a crash row if it fails)
        and the tree is reset; the std is stored and every later result says if a gain beats it."""
        if not 1 <= repeats <= MAX_NOISE_REPEATS:
            raise Refusal(f"repeats must be between 1 and {MAX_NOISE_REPEATS}.")
        state = locked(loop._set_up_state)
        kept = state["kept_commit"]
        if EDITABLE in loop.ws.changed_since(kept):
            raise Refusal(f"train.py differs from the last kept commit {kept[:7]}: noise is measured on "
                          "the kept code. Save your edit elsewhere, git checkout train.py, and retry.")
        values = loop.noise_values_from_kept()
        if len(values) + repeats < 2:
            raise Refusal("Two values are needed: keep a baseline first, or pass repeats=2 or more.")
        runs, failed = [], []
        for k in range(repeats):
            run = locked(loop.start_run, f"noise repeat {k + 1}/{repeats} of {kept[:7]}")
            await follow(run, ctx, done_before=100.0 * k / repeats, scale=1.0 / repeats)
            result = run.result
            locked(loop.discard)
            (runs if result.status == "ok" else failed).append(result.commit)
            if result.status == "ok":
                values.append(result.val_bpb)
        if len(values) < 2:
            raise Refusal(f"Too few successful repeats ({len(runs)}): fix the crash (see read_metrics) "
                          "and measure again.")
        return compact(NoiseResult(noise=loop.store_noise(values), runs=runs, failed=failed))

    return srv
