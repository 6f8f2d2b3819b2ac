"""The MCP server: thin tool wrappers over ResearchLoop, on the official SDK's MCPServer.

Each tool returns a pydantic model as structured content plus the same data as compact
JSON text (no indentation, no empty fields): agents read these answers hundreds of times
a night. Refusals become tool errors whose message says what to do next.
"""
import base64
import functools
import json
import logging
import time
from typing import Annotated, Literal

import anyio
import git
import pydantic
from pydantic import Field
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.stdio import stdio_server
from mcp.shared.message import SessionMessage
from mcp.types import (
    INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR, CallToolResult, ErrorData, ImageContent, JSONRPCError, TextContent, ToolAnnotations,
)

from mcp_server import stdio_lines
from mcp_server.stdio_lines import SURROGATE, check_text, not_unicode
from mcp_server.phases import morning, sweep as sweeping
from mcp_server.core import ledger, plot
from mcp_server.loop import ResearchLoop
from mcp_server.core.models import (
    CancelResult, ConfirmResult, DecisionResult, HistoryResult, LoggedRow, Metrics, NoiseResult, PlotResult, Refusal,
    ReportResult, RunResult, SetupResult, StatusResult, StopResult, SweepRange, SweepResult, WaitResult,
)
from mcp_server.core.history import rerun_commits
from mcp_server.core.state import answering
from mcp_server.core.workspace import EDITABLE, RUNS_DIR

SERVER_NAME = "autoresearch"
INSTRUCTIONS = (
    "Autonomous GPT-training research loop on a git workspace. setup(tag) once, run_experiment "
    "('baseline') first, then: edit train.py, run_experiment(description), keep() or discard(). "
    "Only train.py may change. measure_noise() tells which gains are real. With several slots, "
    "run_experiment(..., wait=False) queues candidates and wait() returns their results."
)
MAX_NOISE_REPEATS = 10
MAX_CONFIRM_PAIRS = 5
PROGRESS_POLL_SECONDS = 1.0
PROGRESS_HEARTBEAT_SECONDS = 10.0  # a notification at least this often, even when no step is new

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
            check_text(kwargs)
            with answering(fn.__name__):  # its bookkeeping threads (threaded()) get a copy of this context
                return await fn(*args, **kwargs)
        except ToolError:
            raise
        except Exception as exc:
            raise translate(exc) from exc
    return wrapper


def telling_records_changes(loop: ResearchLoop, fn):
    """The next answer after the server found its state or ledger changed by someone else says so
    (as records_changed), whatever the tool; a refusal says it too."""
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            result = await fn(*args, **kwargs)
        except ToolError as exc:
            notices = loop.state.take_notices()
            if notices:
                raise ToolError(f"{exc} Also: {' '.join(notices)}") from exc
            raise
        notices = loop.state.take_notices()
        if notices and isinstance(result, CallToolResult) and isinstance(result.structured_content, dict):
            told = result.structured_content.get("records_changed") or []
            result.structured_content["records_changed"] = told + [n for n in notices if n not in " ".join(told)]
            body = json.loads(result.content[0].text)
            body["records_changed"] = result.structured_content["records_changed"]
            result.content[0] = TextContent(type="text", text=json.dumps(body, separators=(",", ":")))
        return result
    return wrapper


class AnswersUnreadable:
    """The stdio transport's read stream, answering the requests the SDK cannot read. The SDK's
    parser refuses a lone surrogate escape ("\\udcff": valid JSON, not valid Unicode) and drops the
    line, so its call would never be answered and the client would wait until it gives up; here
    a request with an id gets a JSON-RPC error that says what to send instead, and a line that is
    not JSON a parse error. So does a JSON message that is no JSON-RPC message (no method, a wrong
    version, not an object), which the SDK drops the same way."""

    def __init__(self, inner, write_stream):
        self.inner, self.write_stream = inner, write_stream

    @property
    def last_context(self):  # the sender's context, which the SDK's dispatcher looks for
        return getattr(self.inner, "last_context", None)

    async def receive(self):
        while True:
            item = await self.inner.receive()
            if not (isinstance(item, Exception) and await self.answered(item)):
                return item

    async def answered(self, exc: Exception) -> bool:
        """Answers the line behind a parse failure: a request with an id, or a line that is not JSON
        at all (id null, as JSON-RPC says). True if answered."""
        errors = exc.errors() if isinstance(exc, pydantic.ValidationError) else []
        line = next((e["input"] for e in errors if e["type"] == "json_invalid" and isinstance(e["input"], str)), None)
        if line is None and errors:
            return await self.invalid_request(errors)
        if line is None or not line.strip():
            return False
        try:  # Python's parser reads lone surrogates, which the SDK's refuses
            message = json.loads(line)
        except (ValueError, RecursionError) as bad:  # RecursionError: nested deeper than any call needs
            return await self.reply(None, PARSE_ERROR, f"Parse error: the line is not JSON ({bad}): send one "
                                                       "JSON-RPC message per line.")
        request_id = message.get("id") if isinstance(message, dict) else None
        if isinstance(request_id, bool) or not isinstance(request_id, (int, str)):
            return False  # a notification: there is no call to answer
        text = json.dumps(message, ensure_ascii=False)
        why = (f"the request holds an unpaired surrogate escape ({not_unicode(text)}), which is not valid Unicode "
               "text: send the arguments as plain UTF-8 text, without that character, and retry."
               if SURROGATE.search(text) else f"the request could not be read ({errors[0]['msg']}): send valid JSON.")
        return await self.reply(request_id, INVALID_PARAMS, f"Invalid request: {why}")

    async def invalid_request(self, errors: list) -> bool:
        """Answers JSON that no JSON-RPC message type accepts: a request with an id, or what is no
        object at all (id null, as JSON-RPC says); a notification or a response is not answered."""
        # a missing field's error holds the whole message; a value that is no object fails each type alone
        message = next((e["input"] for e in errors if e["type"] == "missing" and len(e["loc"]) == 2), None)
        if isinstance(message, dict) and ("id" not in message or "result" in message or "error" in message):
            return False
        request_id = message.get("id") if isinstance(message, dict) else None
        if isinstance(request_id, bool) or not isinstance(request_id, (int, str)):
            request_id = None
        wrong = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'the message'}: {e['msg']}"
                          for e in errors if e["loc"][:1] == ("JSONRPCRequest",))
        return await self.reply(request_id, INVALID_REQUEST, f"Invalid request ({wrong}): send a JSON-RPC 2.0 "
                                "request, an object with \"jsonrpc\": \"2.0\", an \"id\" and a \"method\" (and "
                                "\"params\"), one per line.")

    async def reply(self, request_id: int | str | None, code: int, message: str) -> bool:
        error = ErrorData(code=code, message=message)
        await self.write_stream.send(SessionMessage(JSONRPCError(jsonrpc="2.0", id=request_id, error=error)))
        log.warning("answered an unreadable request (id %r): %s", request_id, message)
        return True

    async def aclose(self):
        await self.inner.aclose()

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        await self.aclose()


async def serve_stdio(srv: MCPServer) -> None:
    """What srv.run("stdio") does, with every unreadable request answered (AnswersUnreadable, and
    stdio_lines.CheckedLines for an id the SDK cannot read)."""
    server = srv._lowlevel_server  # the SDK's run_stdio_async reaches it the same way
    lines = stdio_lines.CheckedLines(stdio_lines.wire_stdin())
    async with stdio_server(stdin=lines) as (read_stream, write_stream):
        lines.answer_on(write_stream)
        await server.run(AnswersUnreadable(read_stream, write_stream), write_stream,
                         server.create_initialization_options())


def build_server(loop: ResearchLoop) -> MCPServer:
    srv = MCPServer(SERVER_NAME, instructions=INSTRUCTIONS, log_level="WARNING")
    for group in (register_runs, register_decisions, register_reports, register_measurements, register_search):
        group(srv, loop)  # in this order: the order list_tools answers in
    return srv


def registrar(srv: MCPServer, loop: ResearchLoop):
    """register(annotations), the decorator that adds a tool; its docstring, on one line, is the
    description the agent reads."""
    def register(annotations: ToolAnnotations):
        def decorate(fn):
            srv.add_tool(telling_records_changes(loop, refusals_as_tool_errors(fn)), description=" ".join(fn.__doc__.split()),
                         annotations=annotations)
            return fn
        return decorate
    return register


async def follow(loop: ResearchLoop, runs: list[int], ctx: Context, until_all: bool, done_before: float = 0.0,
                 scale: float = 1.0) -> None:
    """Waits until one of `runs` (or all) has a result, sending a progress notification at every
    new training step and at least every PROGRESS_HEARTBEAT_SECONDS through start-up,
    compilation and evaluation, so a client never sees a silent call."""
    last_value, last_sent, last_message = -1.0, 0.0, None
    while not await anyio.to_thread.run_sync(loop.wait_ended, runs, until_all, PROGRESS_POLL_SECONDS):
        live = [loop.live(e) for n in runs if (e := loop.entry(n)) and e["status"] in ("queued", "running")]
        if not live:
            continue
        percent = sum(r.progress.percent if r.progress else 0.0 for r in live) / len(live)
        phases = [describe_live(r, named=len(runs) > 1, slotted=loop.slots > 1) for r in live]
        message = " | ".join(text for text, _ in phases)
        key = " | ".join(phase for _, phase in phases)  # what changed, elapsed seconds aside
        now = time.monotonic()
        if key == last_message and now - last_sent < PROGRESS_HEARTBEAT_SECONDS:
            continue
        # MCP wants every notification's progress to grow
        value = max(done_before + percent * scale, last_value + 1e-3)
        await ctx.report_progress(value, 100.0, message)
        last_value, last_sent, last_message = value, now, key


def register_runs(srv: MCPServer, loop: ResearchLoop) -> None:
    """setup, run_experiment, wait, read_metrics: a run from its start to its result."""
    register = registrar(srv, loop)

    @register(WRITES)
    async def setup(tag: str, hours: float | None = None, max_experiments: int | None = None,
                    target_val_bpb: float | None = None, max_failures_in_row: int = 10,
                    max_gpu_hours: float | None = None, early_stop: bool = False) -> SetupResult:
        """Start a research run: create branch autoresearch/<tag> from HEAD (refuses an existing one or
        uncommitted changes), create results.tsv, check that data and tokenizer are prepared, and
        fingerprint the harness (every tracked file but train.py). Optional stop conditions: hours
        (a deadline), max_experiments, target_val_bpb, max_failures_in_row (crashes and timeouts in a
        row; 10 by default), max_gpu_hours (the runs' slot time; slot-hours on a CPU). Once one is met
        no new run starts, and the agent may stop. early_stop=true: a run whose training loss falls
        behind the best's run at the same share of the budget by more than a margin set by the measured
        noise (from 50% of the budget; only once measure_noise has run) is stopped and logged as a crash
        row marked 'stopped early'."""
        return compact(await threaded(loop.setup, tag, hours, max_experiments, target_val_bpb, max_failures_in_row,
                                      max_gpu_hours, early_stop))

    @register(WRITES)
    async def run_experiment(description: str, ctx: Context, wait: bool = True,
                             timeout_seconds: float | None = None, rerun: bool = False) -> RunResult:
        """Snapshot train.py as a candidate commit on top of the best (the last kept commit), run it in a
        free slot (or queue it) with a hard timeout (default 3 x budget, at least budget + 5 min; a longer timeout_seconds
        lets a slow run end, but one that took longer than the default before its evaluation is no result), and return status ok/crash/
        timeout, val_bpb, memory, the best and the delta, whether the gain beats the measured noise, and
        the log tail on a crash. The result stays pending until keep() or discard(). wait=False returns
        at once with the run number and its place in the queue: follow with wait() or read_metrics().
        A train.py already tried on the same best is not trained again: a decided run's result comes back
        at once (repeat_of says which run; nothing to decide), a run in flight or the best itself unchanged
        is refused; rerun=true trains it anyway. tried_before names earlier runs that set the same
        constants to the same values."""
        entry = await threaded(lambda: loop.submit(description, timeout_seconds, rerun=rerun))
        if "answered" in entry:
            return compact(RunResult(**entry["answered"]))
        if wait:
            await follow(loop, [entry["run"]], ctx, until_all=True)
        result = loop.answer_for(entry["run"])
        result.tried_before = entry.get("tried_before")
        return compact(result)

    @register(WRITES)
    async def wait(ctx: Context, all: bool = False) -> WaitResult:
        """Wait for a result: returns at once when results are pending, else when the next run in flight
        ends (all=True: when every run in flight has ended), with progress notifications for each.
        Returns the pending results (each stays pending until keep or discard)."""
        state = loop.state.load()
        in_flight = [e["run"] for e in loop.runs_of(state, "queued", "running")]
        if in_flight and (all or not loop.runs_of(state, "pending")):
            await follow(loop, in_flight, ctx, until_all=all)
        state = loop.state.load()
        results = [RunResult(**e["result"]) for e in loop.runs_of(state, "pending")]
        if not results and not in_flight:
            raise Refusal("No run in flight and no pending result: run_experiment(description) first.")
        running, queued = (len(loop.runs_of(state, s)) for s in ("running", "queued"))
        return compact(WaitResult(results=results, running=running, queued=queued, next=loop.status().next))

    @register(READ_ONLY)
    async def read_metrics(run: int | str | None = None) -> Metrics:
        """The live progress of the runs in flight; else the summary of run.log (or of a past run: its
        number or commit). A missing, empty or crashed log gives a status and the log tail."""
        return compact(loop.read_metrics(None if run is None else str(run)))


def register_decisions(srv: MCPServer, loop: ResearchLoop) -> None:
    """keep, discard, cancel, stop, reapply, log_result: what becomes of a result."""
    register = registrar(srv, loop)

    @register(WRITES)
    async def keep(note: str | None = None, run: int | None = None, unverified: bool = False,
                   unconfirmed: bool = False) -> DecisionResult:
        """Accept a pending result (status ok only; run=N when several are pending): the ledger row is
        written with status keep and the branch advances to the run's commit (the new best). A run
        measured on an older best is refused: reapply(run) measures it again on the new one. A result
        the harness could not verify (no export of the model) needs unverified=true. A gain within a
        few noise widths, or measured at another speed than the best's run, needs confirm(run) first,
        or unconfirmed=true; the answer's evidence says what the keep rests on."""
        return compact(await threaded(loop.keep, note, run, unverified, unconfirmed))

    @register(RESETS)
    async def discard(reason: str | None = None, run: int | None = None) -> DecisionResult:
        """Reject a pending result (run=N when several are pending): the ledger row is written
        (discard, or crash for a crash, timeout or interrupted run) and train.py is restored to the
        kept code if it still holds the run's code. Untracked files are not touched; the run's code
        stays reachable in its commit."""
        return compact(await threaded(loop.discard, reason, run))

    @register(RESETS)
    async def cancel(run: int) -> CancelResult:
        """Cancel a queued run (it leaves the queue, no row) or stop a running one (its whole process
        tree is killed and it is logged as a crash). Its code stays in its commit."""
        return compact(await threaded(loop.cancel, run))

    @register(RESETS)
    async def stop(reason: str, now: bool = False) -> StopResult:
        """End the research run on purpose, with a reason: no new run starts. Runs in flight finish and
        still need keep or discard, unless now=True, which cancels them (running ones logged as crashes)."""
        return compact(await threaded(loop.stop, reason, now))

    @register(WRITES)
    async def reapply(run: int, ctx: Context, wait: bool = False) -> RunResult:
        """For a pending run measured on an older best: re-apply its train.py change onto the current
        best (3-way merge) as a new run, and log the stale one as a discard naming it. wait=True waits
        for the new run's result."""
        entry = await threaded(loop.reapply, run)
        if wait:
            await follow(loop, [entry["run"]], ctx, until_all=True)
        return compact(loop.answer_for(entry["run"]))

    @register(WRITES)
    async def log_result(commit: str, val_bpb: float, memory_gb: float, status: str,
                         description: str) -> LoggedRow:
        """Append one validated row to results.tsv for a run managed outside this server (never one of
        its own runs). status is keep, discard or crash (crash rows are written as 0.000000 and 0.0); a
        keep row must be the research branch's tip, on top of the kept commit."""
        return compact(await threaded(loop.log_result, commit, val_bpb, memory_gb, status, description))


def register_reports(srv: MCPServer, loop: ResearchLoop) -> None:
    """history, status, plot_progress, report: reading where the research run stands."""
    register = registrar(srv, loop)

    @register(READ_ONLY)
    async def history(constant: str | None = None, status: str | None = None, limit: int = 30) -> HistoryResult:
        """What has been tried: one line per decided run (oldest first, the last `limit`): run, commit,
        decision, val_bpb and delta against its parent, the train.py constants it changed (old->new) and
        how many other lines, and its description. constant='MATRIX_LR' keeps the runs that changed it;
        status='keep' (or discard, crash) filters by decision. Read it before choosing an idea."""
        return compact(await threaded(loop.history, constant, status, limit))

    @register(READ_ONLY)
    async def status() -> StatusResult:
        """Branch, best val_bpb and its commit, counts per status, recent rows, runs in flight and
        queued, pending or interrupted results, the noise estimate, and the next step."""
        return compact(await threaded(loop.status))

    @register(WRITES)
    async def plot_progress() -> PlotResult:
        """Write progress.png in the workspace: every run's val_bpb, the running best of kept runs as
        a step line, kept runs labelled with their descriptions, reruns (noise repeats, confirmations,
        controls) drawn apart from the ideas. Returned as an image too."""
        rows = loop.rows()
        if not rows:
            raise Refusal("results.tsv has no rows yet: run and keep a baseline first.")
        path = loop.root / plot.PLOT_NAME
        reruns = set(rerun_commits(loop.root / RUNS_DIR, loop.state.load(), [r.commit for r in rows]))
        plotted, kept, crashes, apart, unmeasured = await anyio.to_thread.run_sync(plot.plot_rows, rows, path, reruns)
        result = PlotResult(path=str(path), runs_plotted=plotted, kept=kept, crashes_excluded=crashes, reruns=apart,
                            not_measured=unmeasured)
        image = base64.b64encode(ledger.read_plain(path) or b"").decode()  # a FIFO swapped in since: no wait
        return CallToolResult(content=[TextContent(type="text", text=result.model_dump_json()),
                                       ImageContent(type="image", data=image, mime_type="image/png")],
                              structured_content=result.model_dump(mode="json"))

    @register(WRITES)
    async def report(branch: str | None = None) -> ReportResult:
        """Write the morning report of the research run, a Markdown file under .research-loop/reports/
        (ignored by git) beside its chart: each kept change with its gain over the best before it,
        its evidence and train.py diff; every idea grouped by the constant or code it changed; the
        noise; the time and slot-hours (GPU-hours) spent; the extra runs. branch='pr/<name>' also
        makes that new branch (never main, master or an existing one) with one commit per kept change
        on the research run's starting point, ready for a pull request; the research branch and
        train.py do not move."""
        # the owner puts back a state.json, results.tsv or copy someone else changed, and reports from what it wrote
        return compact(await threaded(morning.write, loop.root, branch, None, loop.state.load_with_copy()))


def register_measurements(srv: MCPServer, loop: ResearchLoop) -> None:
    """measure_noise, confirm: reruns that tell a real gain from noise."""
    register = registrar(srv, loop)

    @register(WRITES)
    async def measure_noise(ctx: Context, repeats: int = 2) -> NoiseResult:
        """Rerun the last kept commit unchanged `repeats` times to measure run-to-run noise, each
        repeat on another stretch of the training data (on the CPU profile's flops clock the same
        code otherwise repeats to within a few 1e-5). Each repeat is logged as a discard row
        'noise repeat k/N of <commit>, data order D' (a crash row if it fails); the std is stored
        and every later result says if a gain beats it; none is where its values on different data
        orders agree to 1e-4 (train.py ignores the order: that is no noise)."""
        if not 1 <= repeats <= MAX_NOISE_REPEATS:
            raise Refusal(f"repeats must be between 1 and {MAX_NOISE_REPEATS}.")
        state = loop.state.load()
        kept = state.get("kept_commit")
        if not kept:
            raise Refusal("This workspace is not set up for a research run: call setup(tag) first.")
        if EDITABLE in loop.ws.changed_since(kept):
            raise Refusal(f"train.py differs from the last kept commit {kept[:7]}: noise is measured on "
                          "the kept code. Save your edit elsewhere, git checkout train.py, and retry.")
        if len(loop.noise_values(state)[0]) + repeats < 2:
            raise Refusal("Two values are needed: keep a baseline first, or pass repeats=2 or more.")
        source = loop.ws.train_at(kept)
        with loop.one_call((source,), f"The noise of {kept[:7]}") as runs:  # one call at a time (review 71)
            orders = await threaded(loop.noise_orders, kept, repeats)  # an unfinished call's orders first
            for k, order in enumerate(orders):
                entry = await threaded(lambda: loop.submit(f"noise repeat {k + 1}/{len(orders)} of {kept[:7]}, data "
                                                           f"order {order}", None, source, data_order=order,
                                                           siblings=tuple(runs)))
                runs.append(entry["run"])
            await follow(loop, runs, ctx, until_all=True)
            ok, failed, devices = [], [], set()
            for result in await threaded(loop.settle_reruns, runs, "measure_noise", "the noise was not measured",
                                         "No noise estimate was stored; the repeats that finished are logged as discard "
                                         "rows and count in the next measure_noise."):
                value = loop.rerun_value(result)  # an unverified one is train.py's word
                (ok if value is not None else failed).append(result.commit)
                if value is not None:
                    devices.add(result.device)
            device = devices.pop() if len(devices) == 1 else None  # repeats on several models: no per-model estimate
            estimate = await threaded(loop.store_measured_noise, len(runs), len(ok), device, kept)
            return compact(NoiseResult(noise=estimate, runs=ok, failed=failed))

    @register(WRITES)
    async def confirm(ctx: Context, run: int | None = None, pairs: int = 1) -> ConfirmResult:
        """Re-measure a pending gain beside a contemporaneous control: the best's code and the
        candidate's are rerun, interleaved, `pairs` times, each pair on another stretch of the
        training data (each rerun logged as a discard row; every confirmation also takes every
        stretch an earlier one of the research run took), and the gain counts as confirmed when
        the candidate beats the control in every pair (and neither code repeats its number on
        different data orders, as one that ignores the order does). On the flops clock a run
        depends only on its code and data (to ~1e-5), so the best's earlier rerun on a stretch (a noise repeat, its own
        confirmation) stands as that pair's control: one run instead of two. keep() requires this
        for a gain within a few noise widths, or one measured at a different speed than the best's
        run; the answer says how many extra runs the research run has spent."""
        if not 1 <= pairs <= MAX_CONFIRM_PAIRS:
            raise Refusal(f"pairs must be between 1 and {MAX_CONFIRM_PAIRS}.")
        entry, control, candidate = await threaded(loop.confirmation_plan, run)
        n, best = entry["run"], entry["parent"][:7]
        with loop.one_call((candidate, control), f"A confirmation of run {n}'s train.py against this best") as runs:
            plan, resumed, held_to = await threaded(loop.confirmation_orders, entry, pairs)
            pairs = len(plan)  # every order an earlier confirmation began, beside fresh ones
            sides, reused = [], []  # per pair (control, candidate): a rerun's number, or a value reused
            for k, (order, known_control, known_candidate) in enumerate(plan):
                pair = []
                for name, what, source, known in (
                        (f"control {k + 1}/{pairs}", f" for run {n}: the best {best} again", control, known_control),
                        (f"confirmation {k + 1}/{pairs}", f" of run {n}", candidate, known_candidate)):
                    if known:
                        pair.append(known)
                        reused.append(f"{name}: run {known['run']}'s {known['val_bpb']:.6f} on data order {order} "
                                      "(on the flops clock a rerun repeats it to ~1e-5)")
                        continue
                    queued = await threaded(lambda: loop.submit(f"{name}{what}, data order {order}", None, source,
                                                                rerun_of=n, data_order=order))
                    runs.append(queued["run"])
                    pair.append(queued["run"])
                # judged once both are filed, whatever becomes of this call; a side reused by its filed rerun's number
                # (review 69: a pair against a reused control was read from the flops clock's values on this slot count
                # until the call returned, and a server killed and started on another clock measured it again)
                if any(isinstance(side, int) for side in pair):
                    await threaded(loop.note_pair, entry, order, *(side if isinstance(side, int) else side["run"]
                                                                     for side in pair))
                sides.append((order, pair))
            await follow(loop, runs, ctx, until_all=True)
            settled = dict(zip(runs, await threaded(
                loop.settle_reruns, runs, "confirm", "the confirmation was not completed",
                f"Run {n} stays pending: keep(run={n}, unconfirmed=true) or discard(run={n}).")))
            failed = [result.commit for result in settled.values() if loop.rerun_value(result) is None]
            pairs_done, across = loop.judge_pairs(sides, settled)  # a pair on two GPU models is none
            across = across and (f"Pair(s) ran on two GPU models ({'; '.join(across)}), which compares the machines: "
                                 f"confirm(run={n}) again measures those data orders first, or discard(run={n}).")
            deltas = [round(cand - ctrl, 6) for _, ctrl, cand in pairs_done]
            confirmed = bool(deltas) and len(deltas) == pairs and all(d < 0 for d in deltas)
            verdict = {"confirmed": confirmed, "paired_deltas": deltas, "runs": runs,
                       "pairs": {str(order): [ctrl, cand] for order, ctrl, cand in pairs_done}} | (
                          {"reason": across} if across else {})
            total, blind = await threaded(loop.record_confirmation, entry, verdict, len(runs),
                                          [order for order, _, _ in plan])
            confirmed = confirmed and not blind
            return compact(ConfirmResult(
                run=n, confirmed=confirmed, paired_deltas=deltas, control_val_bpb=[c for _, c, _ in pairs_done],
                candidate_val_bpb=[c for _, _, c in pairs_done], failed=failed, reused=reused or None,
                resumed=(f"data order(s) {', '.join(map(str, resumed))} again: an earlier confirmation of this train.py "
                         "against this best began them and never judged them (its server stopped, a rerun failed or was "
                         "cancelled); they are measured before any fresh order") if resumed else None,
                held_to=(f"data order(s) {', '.join(map(str, held_to))}: every data order a confirmation of this research "
                         "run (or of one before it on this harness) began and this pair has not judged yet, so that no "
                         "gain is confirmed on orders chosen to miss the pairs another lost") if held_to else None,
                extra_runs=len(runs), extra_runs_total=total,
                next=(f"keep(run={n})" if confirmed else f"{blind} The gain is not confirmed: discard(run={n})" if blind
                      else across or f"the gain did not hold: discard(run={n})")
                + ("" if not failed else "; some reruns failed, or exported no model for the harness: read their logs "
                   "(a confirm again measures their data orders first)")))


def register_search(srv: MCPServer, loop: ResearchLoop) -> None:
    """sweep: an optimiser (Optuna) choosing the values of train.py's constants, run as candidates."""
    register = registrar(srv, loop)

    @register(WRITES)
    async def sweep(
            space: Annotated[dict[str, SweepRange], Field(description=(
                "train.py's module-level constants to search, each mapped to a range {low, high, log} (an integer "
                "constant gets whole numbers) or {choices: [...]}, e.g. {\"MATRIX_LR\": {\"low\": 0.01, "
                "\"high\": 0.1, \"log\": true}, \"WINDOW_PATTERN\": {\"choices\": [\"L\", \"SSSL\"]}}"))],
            ctx: Context,
            trials: Annotated[int, Field(description="runs to spend, side by side on free slots "
                                                     f"(1 to {sweeping.MAX_TRIALS})")] = 8,
            sampler: Annotated[Literal["tpe", "cmaes"], Field(description=(
                "Optuna's sampler: tpe (any space, choices too) or cmaes (numeric ranges; best with "
                "several of them and 20+ trials)"))] = "tpe",
            seed: Annotated[int | None, Field(description="the sampler's seed (0 to 2**32 - 1), for a repeatable sweep")] = None,
    ) -> SweepResult:
        """Search train.py's constants with an Optuna study: each trial is the kept train.py with the
        space's constants set to the sampler's values, run as an ordinary candidate (its own commit,
        slots, timeout, limits, noise verdict), described 'sweep trial N of study K: NAME=value'. Each
        finished trial is discarded at once, except the best one that beats the kept best, which stays pending:
        keep(run) it (confirm first when the answer says so). The study is stored in the workspace
        (.research-loop/optuna.db): the same space on the same code continues it, in any session.
        Needs no run in flight or undecided, and train.py equal to the kept code."""
        plan = await threaded(sweeping.start, loop, space, trials, sampler, seed)
        return compact(await sweeping.run(plan, functools.partial(follow, loop), ctx))


def describe_live(run, named: bool, slotted: bool) -> tuple[str, str]:
    """One run's phase for a progress notification: queued, starting up (imports, compilation),
    a training step, or evaluating. Returns (text, phase): the phase leaves out the seconds, so a
    run that stays in one phase is reported at the heartbeat, not at every poll."""
    prefix = (f"run {run.run}" if named else "") + (f" on {run.slot}" if slotted and run.slot else "")
    prefix = f"{prefix.strip()}: " if prefix else ""
    if run.status == "queued":
        return f"{prefix}queued", f"{prefix}queued"
    if run.progress is None:
        return f"{prefix}starting up ({run.elapsed_s or 0}s)", f"{prefix}starting up"
    p = run.progress
    if p.percent >= 100.0 or p.remaining_s == 0:
        return f"{prefix}training done at step {p.step}, evaluating ({run.elapsed_s}s)", f"{prefix}evaluating"
    text = f"{prefix}step {p.step} ({p.percent:.1f}%) loss {p.loss:.4f} remaining {p.remaining_s}s"
    return text, text


async def threaded(fn, *args):
    """Bookkeeping (git, fsync, flock) off the event loop, so progress of other calls keeps flowing."""
    return await anyio.to_thread.run_sync(lambda: fn(*args))
