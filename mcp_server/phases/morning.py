"""The morning report: a research run as Markdown for the person who reviews it, and on request a
clean branch with one commit per kept change, ready to open as a pull request.

Everything comes from the server's records, never from results.tsv (an output anyone can edit):
the rows and the noise from the server's own copy of its state (under the git directory), each
run's details from its record under runs/, every diff and train.py from git. The report and its
chart go to .research-loop/reports/, which setup excludes from git: `git status` stays clean and the
harness guard sees no new file.
"""
import ast
import json
import os
import time
from pathlib import Path

import git

from mcp_server.core import budget_settings, cost, history, ledger, limits, plot
from mcp_server.core.models import Refusal, ReportResult, Row
from mcp_server.core.programs import UNPARSABLE
from mcp_server.core.state import STATE_DIR, State, malformed
from mcp_server.core.workspace import EDITABLE, RUNS_DIR, Workspace, commit_named, validate_new_branch
from mcp_server.phases.results import NOT_COMPARED

REPORTS_DIR = f"{STATE_DIR}/reports"
NO_CHANGE = "no change to train.py"
MODULE_LEVEL = "module level"
UNTRUSTED = "its record under runs/ is not what the server wrote (changed by hand?): not used"


def recorded_state(root: Path) -> dict:
    """The state as the server last wrote it: its copy under the git directory (which a run or an
    agent cannot reach), else state.json for a workspace set up before the server kept one."""
    state, problem = State(root), None
    for path in (state.copy, state.path):
        try:
            data = json.loads(limits.read_record(path))  # bounded: a planted giant or FIFO stalls nothing
        except FileNotFoundError:
            continue
        except (OSError, ValueError, RecursionError) as exc:
            raise Refusal(f"{path} is no readable JSON record ({exc}): the report needs the server's records; "
                          "start the server once (it puts its own copy back), then retry.") from None
        if not isinstance(data, dict):
            continue
        odd = malformed(data)
        if not odd:
            return data
        problem = problem or f"{path}: {odd}"  # a malformed copy: state.json is read instead
    if problem:  # review 74: a forged copy with a number for a description failed the report, not refused it
        raise Refusal(f"The server's records of {root} are no state the server writes ({problem}): none of it is "
                      "believed. The server that owns the workspace writes them again at its next call; retry then.")
    raise Refusal(f"No research run recorded in {root}: setup(tag) starts one; the report follows its runs.")


def spent(records: list[dict], state: dict, now: float) -> dict:
    """The research run's wall time (setup to the last run's end, from the runs' records) and its
    runs' slot time (cost.run_hours: GPU-hours on GPUs, slot-hours on CPUs, from the server's state)."""
    started_at = state.get("started_at")
    ends = [r["run"]["ended_at"] for r in records if isinstance(r["run"].get("ended_at"), (int, float))]
    end = max(ends, default=now)
    wall = max(0.0, end - started_at) / 3600 if isinstance(started_at, (int, float)) else None
    devices = sorted({str(r["run"]["device"]) for r in records if r["run"].get("device")})
    return {"wall_hours": wall, **cost.run_hours(state), "devices": devices}


def touched_parts(old: str, new: str) -> list[str]:
    """The parts of train.py an edit touched beyond its constants: the functions, classes and
    methods holding its changed lines, or the module level."""
    try:
        old_spans, new_spans = _spans(old), _spans(new)
    except UNPARSABLE:  # review 83: nested too deep failed the report
        return ["train.py (does not parse)"]
    old_lines, new_lines = old.splitlines(), new.splitlines()
    parts = set()
    # history's matching, bounded (review 83: SequenceMatcher without autojunk took 81 s for 2,000 lines, per idea)
    for lines, (spans, constants), indexes in zip((old_lines, new_lines), (old_spans, new_spans),
                                                  history.unmatched(old_lines, new_lines)):
        for number in (index + 1 for index in indexes):
            if lines[number - 1].strip() and number not in constants:
                inner = [s for s in spans if s[0] <= number <= s[1]]
                parts.add(min(inner, key=lambda s: s[1] - s[0])[2] if inner else MODULE_LEVEL)
    return sorted(parts)


def _spans(source: str) -> tuple[list[tuple[int, int, str]], set[int]]:
    """(first line, last line, name) of each top-level function, class and method; and the lines of
    the constants (history's, counted apart)."""
    tree, spans = ast.parse(source), []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            spans.append((first, node.end_lineno, node.name))
            if isinstance(node, ast.ClassDef):
                spans += [(sub.lineno, sub.end_lineno, f"{node.name}.{sub.name}") for sub in node.body
                          if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef))]
    constants = {line for node in history.find_constants(source).values() if node is not None
                 for line in range(node.lineno, node.end_lineno + 1)}
    return spans, constants


class Night:
    """One research run read from the records: its rows, runs, kept chain and reruns."""

    def __init__(self, root: Path, state: dict | None = None):
        """state: the records as the server that owns the workspace holds them (the report tool's), else read here."""
        self.root = Path(root).resolve()
        self.ws = Workspace(self.root)
        self.state = recorded_state(self.root) if state is None else state
        if not self.state.get("branch"):
            raise Refusal(f"No research run is set up in {self.root}: setup(tag) starts one.")
        self.rows = ledger.rows_of(self.state)
        logged = {r.commit for r in self.rows}
        # only the records the server's state vouches for: one edited by hand (a better gain, more
        # confirmations) is left out, and the report says so
        found, self.refused = history.checked(self.root / RUNS_DIR, self.state)
        self.records = {r["result"].get("commit"): r for r in found.values()
                        if r.get("decision") and r["result"].get("commit") in logged}
        self.untrusted = {name.removesuffix(".json").partition("-")[2] for name in self.refused} - set(self.records)
        self.reruns = {c: k for c, r in self.records.items() if (k := history.rerun_kind(r))}
        self.start_commit = self._recorded_start()
        self.kept = self._kept_chain()

    def _recorded_start(self) -> str | None:
        """setup's start_commit, where the state has one: a commit with the research run's harness, below its best
        (review 86: one forged in the copy a reader believes failed the report as a tree, or gave the pull request's
        branch the tree of a commit of the agent's own)."""
        start, kept = self.state.get("start_commit"), self.state.get("kept_commit")
        if start is None:
            return None  # a state from before setup recorded it: the first kept commit's parent, as before
        if commit_named(self.ws.git_or_none, start) != start or not (kept and self.ws.is_ancestor(start, kept)) \
                or self.state.get("fingerprint") not in (None, self.ws.fingerprint(start)):
            raise Refusal(f"The server's records name start_commit {start[:12]} as the start of "
                          f"{self.state['branch']}, but it is no commit with that run's harness below its best: the "
                          "records were changed outside the server. Call report() from the server that owns the "
                          "workspace (it writes its records again).")
        return start

    def _kept_chain(self) -> list[dict]:
        """The kept rows in order, each with its full commit, its parent (the best before it) and
        the parent's value; the first one's parent is the research run's starting point."""
        chain, previous, value, before = [], None, None, None
        for row in self.rows:
            if row.status != "keep":
                continue
            # the full commit the server recorded for its run (7 hex digits may be shared by a commit made to match)
            recorded = ((self.records.get(row.commit) or {}).get("run") or {}).get("commit")
            full = self.ws.resolve_commit(recorded if isinstance(recorded, str) else row.commit)
            if full is None:
                raise Refusal(f"Kept commit {row.commit} is not in this repository, or more than one commit's hash "
                              "begins with it: the report reads its diff from git; fetch the research branch, then "
                              "retry.")
            # the start as setup recorded it, never the first kept commit's parent, which may be a commit of the agent's
            # own under a keep logged by hand (a state from before start_commit: that parent, as before)
            parent = previous or self.start_commit or self.ws.repo.git.rev_parse(f"{full}^")
            chain.append({"row": row, "commit": full, "parent": parent, "parent_val_bpb": value, "parent_row": before,
                          "record": self.records.get(row.commit), "untrusted": row.commit in self.untrusted})
            previous, value, before = full, row.val_bpb, row
        return chain

    @property
    def start(self) -> str:
        return self.kept[0]["parent"] if self.kept else self.start_commit or self.state["kept_commit"]

    def train_at(self, commit: str) -> str:
        return self.ws.train_at(commit).decode(errors="replace")

    def diff(self, parent: str, commit: str) -> str:
        return self.ws.repo.git.diff("--no-color", "--no-ext-diff", "--no-textconv", parent, commit, "--", EDITABLE)

    def tried(self) -> dict[str, list[tuple[Row, dict | None]]]:
        """The ideas (reruns aside) grouped by what each changed: every constant, and every part of
        the code beyond the constants; an idea that touched several is listed under each."""
        groups: dict[str, list] = {}
        for row in self.rows:
            if row.commit in self.reruns:
                continue
            record = self.records.get(row.commit)
            for key in [UNTRUSTED] if row.commit in self.untrusted else self._keys(record):
                groups.setdefault(key, []).append((row, record))
        return dict(sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])))

    def _keys(self, record: dict | None) -> list[str]:
        if not record:
            return ["logged by hand (log_result): no record of its change"]
        run = record["run"]
        changes = (record.get("decision") or {}).get("changes") or {}
        keys = [f"constant {name}" for name in changes.get("constants", {})]
        if changes.get("other_lines") or not changes:
            try:
                keys += [f"code: {part}" for part in touched_parts(self.train_at(run["parent"]),
                                                                     self.train_at(run["commit"]))]
            except (git.GitCommandError, ValueError, KeyError, TypeError):  # a commit git no longer has
                keys.append("code: (its commit is gone)")
        return keys or [NO_CHANGE]


def write(root: Path, branch: str | None = None, now: float | None = None, state: dict | None = None) -> ReportResult:
    """Writes the report (and first the pull request's branch when `branch` is given); returns where. state: the
    server's records as a server read them (review 85: the owner's report read a copy forged since its last call)."""
    now = time.time() if now is None else now
    night = Night(root, state)
    folder = reports_folder(night.root)  # before the branch: a report that cannot be written makes none
    made = make_branch(night, branch) if branch is not None else None
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{night.state.get('tag') or 'research'}-{time.strftime('%Y-%m-%d', time.gmtime(now))}"
    chart = folder / f"{stem}.png"
    if night.rows:
        plot.plot_rows(night.rows, chart, set(night.reruns))
    path = folder / f"{stem}.md"
    times = spent(list(night.records.values()), night.state, now)
    text = render(night, chart.name if night.rows else None, times, made, now)
    ledger.replace_bytes(path, text.encode())  # never through a file planted at a temp name
    ideas = sum(r.commit not in night.reruns for r in night.rows)
    return ReportResult(path=str(path), chart=str(chart) if night.rows else None, kept=len(night.kept), ideas=ideas,
                        extra_runs=len(night.reruns), slot_hours=round(times["gpu_hours"] + times["slot_hours"], 4),
                        branch=made["branch"] if made else None, commits=made["commits"] if made else None,
                        next=(f"open a pull request from {made['branch']} (base {night.start[:7]})" if made else
                              "read the report; report(branch='pr/<name>') also makes a branch of the kept changes"))


def reports_folder(root: Path) -> Path:
    """The reports' folder; something else at its name (the agent can write the server's folder) is refused, saying how
    to move it aside: making the folder raised out of the report tool and the CLI."""
    folder = root / REPORTS_DIR
    if os.path.lexists(folder) and not folder.is_dir():
        raise Refusal(f"{REPORTS_DIR} is not a folder (something else was put at its name): move it aside (`mv "
                      f"{REPORTS_DIR} {REPORTS_DIR}.old`) and write the report again; nothing was written.")
    return folder


def make_branch(night: Night, name: str) -> dict:
    """A new branch on the research run's starting point with one commit per kept change (train.py
    as kept; a keep that did not change train.py, such as the baseline, adds none). Neither the
    research branch nor the working tree moves."""
    name = validate_new_branch(night.ws.repo, name)
    parent, commits = night.start, []
    for change in night.kept:
        source = night.ws.train_at(change["commit"])
        if source == night.ws.train_at(parent):
            continue
        parent = night.ws.commit_train(parent, source, commit_message(night, change))
        commits.append(parent)
    if not commits:
        raise Refusal("No kept change alters train.py yet (only the baseline is kept): there is nothing to put on "
                      "a branch. Keep an idea first, or call report() without branch.")
    night.ws.create_branch_at(name, parent)
    return {"branch": name, "commits": [c[:7] for c in commits], "base": night.start}


def gain_text(change: dict) -> str:
    """The kept change's val_bpb against the best before it, and whose numbers they are where the harness did not
    measure one (review 62: after a best logged by hand at 99.0, a confirmed run at 1.04 read "gain +97.96" in the
    report and in its pull request's commit message)."""
    before, after = change["parent_val_bpb"], change["row"].val_bpb
    whose = [f"{which} is {said}" for which, row in (("the val_bpb before", change.get("parent_row")),
                                                     ("this val_bpb", change["row"]))
             if row and (said := limits.not_measured(row.description))] + across_models(change)
    unmeasured = f"; not a measured gain: {'; '.join(whose)}" if whose else ""
    if before is None:
        return f"val_bpb {after:.6f} (the first kept result{unmeasured})"
    gain = before - after
    percent = f", {100 * gain / before:.2f}%" if before else ""
    return f"val_bpb {before:.6f} -> {after:.6f} (gain {gain:+.6f}{percent}{unmeasured})"


def across_models(change: dict) -> list[str]:
    """Where the kept run was measured on another GPU model than the best before it (kept unconfirmed, review 85: its
    val_bpb against the best's read as a gain), that."""
    noise = ((change["record"] or {}).get("result") or {}).get("noise")
    return [noise] if isinstance(noise, str) and noise.startswith(NOT_COMPARED) else []


def evidence_text(change: dict) -> str:
    """What the keep rested on, as the server said it when it kept the run, and what the run's
    result said against the noise."""
    if change.get("untrusted"):
        return UNTRUSTED
    record = change["record"] or {}
    decision, result, run = record.get("decision") or {}, record.get("result") or {}, record.get("run") or {}
    confirmation = run.get("confirmation") or {}
    deltas = ", ".join(f"{d:+.6f}" for d in confirmation.get("paired_deltas") or [])
    said = decision.get("evidence") or (
        f"confirmation {'held' if confirmation.get('confirmed') else 'failed'} (paired deltas {deltas or 'none'})"
        if confirmation else "logged by hand (log_result): no evidence recorded" if not record else "not recorded")
    if confirmation.get("runs"):
        said += f" (reruns {', '.join(map(str, confirmation['runs']))})"
    if result.get("noise") and result.get("delta") is not None:
        said += f"; measured {result['noise']}"
    return said


def commit_message(night: Night, change: dict) -> str:
    row, record = change["row"], change["record"] or {}
    number = (record.get("run") or {}).get("run")
    return (f"{row.description}\n\n{gain_text(change)}\nEvidence: {evidence_text(change)}\n"
            f"Research run {night.state['branch']}" + (f", run {number}" if number else "")
            + f", commit {row.commit}.\n")


# --- the Markdown --------------------------------------------------------------------------------
def cell(text) -> str:
    """Text of the workspace (descriptions) in a table cell or heading: never markup of its own."""
    for char, escaped in (("\\", "\\\\"), ("|", "\\|"), ("<", "&lt;"), ("`", "'"), ("*", "\\*"), ("[", "\\[")):
        text = str(text).replace(char, escaped)
    return text


def code(text) -> str:
    """A change's summary (constants and their values) as code, as it reads in train.py."""
    return "`" + str(text).replace("`", "'").replace("|", "\\|") + "`"


def value(row: Row) -> str:
    return "crash" if row.status == "crash" else f"{row.val_bpb:.6f}"


def fenced(text: str, language: str = "") -> str:
    """A code block whose fence no run of backticks inside it can close."""
    longest = max((len(run) for run in text.replace("\n", " ").split(" ") if set(run) == {"`"}), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"


def render(night: Night, chart: str | None, times: dict, made: dict | None, now: float) -> str:
    out = [f"# Research report: {night.state['branch']}", "",
           f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(now))} from the server's records (its state, "
           "the run records under runs/, train.py and diffs from git), not from results.tsv.", ""]
    if night.refused:
        out += [f"{len(night.refused)} record(s) under {RUNS_DIR}/ are not what the server wrote (edited, deleted or "
                f"unreadable: {', '.join(cell(n) for n in night.refused[:5])}{' ...' if len(night.refused) > 5 else ''}); "
                "nothing in them is used here.", ""]
    out += summary(night, times, made)
    out += ["## Progress", ""]
    out += ([f"![val_bpb of every run]({chart})", "",
             "Kept runs green (hollow where the harness did not measure the number), their line the best the branch held as the harness measured it (a worse keep moves it, a hollow one does not); ideas that were discarded grey; reruns (noise repeats, "
             "confirmations, controls) blue diamonds; crashes are left out of the chart.", ""]
            if chart else ["No run logged yet.", ""])
    out += kept_section(night)
    out += tried_section(night)
    out += noise_section(night)
    out += reruns_section(night)
    out += time_section(times, night)
    if made:
        out += ["## Pull request branch", "",
                f"`{made['branch']}`: {len(made['commits'])} commit(s), one per kept change, on the research run's "
                f"starting point `{made['base'][:7]}` ({', '.join(f'`{c}`' for c in made['commits'])}). "
                f"`git push origin {made['branch']}` and open the pull request against the branch that holds "
                f"`{made['base'][:7]}`.", ""]
    return "\n".join(out)


def summary(night: Night, times: dict, made: dict | None) -> list[str]:
    ideas = [r for r in night.rows if r.commit not in night.reruns]
    counts = {s: sum(r.status == s for r in ideas) for s in ledger.STATUSES}
    best = ledger.best_kept(night.rows)
    first = night.kept[0]["row"] if night.kept else None
    lines = ["## Summary", "", "| | |", "|---|---|",
             f"| research branch | `{night.state['branch']}`, started from `{night.start[:7]}` |"]
    if night.state.get("harness_changed"):
        lines.append(f"| harness | {cell(night.state['harness_changed'])} |")
    if night.state.get(budget_settings.CHANGED):
        lines.append(f"| budget settings | {cell(night.state[budget_settings.CHANGED])} |")
    if best and first:
        gain = first.val_bpb - best.val_bpb
        # review 72: a first keep logged by hand (or train.py's own number) made an unmarked gain here; review 74: so
        # did a best logged by hand, its marker said beside the best but the gain to it a bare number
        whose = [f"the {which} val_bpb is {said}" for which, row in (("first kept", first), ("best", best))
                 if first is not best and (said := limits.not_measured(row.description))] + \
            [f"a kept run {each}" for change in night.kept[1:] for each in across_models(change)]
        notes = ([f"{100 * gain / first.val_bpb:.2f}%"] if first.val_bpb else []) + \
            ([f"not a measured gain: {'; '.join(whose)}"] if whose else [])
        share = f" ({'; '.join(notes)})" if notes else ""
        lines.append(f"| best val_bpb | {best.val_bpb:.6f} (`{best.commit}`{unmeasured(best)}), against "
                     f"{first.val_bpb:.6f} for the first kept result: gain {gain:+.6f}{share} |")
    lines.append(f"| runs | {len(night.rows)} logged: {len(ideas)} ideas ({counts['keep']} kept, {counts['discard']} "
                 f"discarded, {counts['crash']} crashed) and {len(night.reruns)} extra "
                 f"run{'' if len(night.reruns) == 1 else 's'} |")
    noise = night.state.get("noise")
    if noise:
        lines.append(f"| noise | std {noise['std']:.6f} over {len(noise['values'])} values; gains under "
                     f"{noise['threshold']:.6f} are within it |")
    lines.append(f"| time | {hours(times['wall_hours'])} wall; {cost.hours_text(times) or 'no run trained'} |")
    if made:
        lines.append(f"| pull request branch | `{made['branch']}`: {len(made['commits'])} commit(s) |")
    undecided = sorted(e.get("run") for e in (night.state.get("runs") or {}).values() if isinstance(e, dict))
    if undecided:
        lines.append(f"| not in this report | runs {', '.join(map(str, undecided))}: in flight or not decided yet |")
    return lines + [""]


def unmeasured(row: Row) -> str:
    """What the best's number is where the harness did not measure it or no sandbox ran it (the row's marker says)."""
    said = limits.caveat(row.description)
    return f": {said}" if said else ""


def hours(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f} h"


def kept_section(night: Night) -> list[str]:
    lines = ["## Kept changes", "", "Each kept run against the best before it, in the order they were kept.", ""]
    if not night.kept:
        return lines + ["Nothing kept yet.", ""]
    for k, change in enumerate(night.kept, 1):
        row, record = change["row"], change["record"] or {}
        number = (record.get("run") or {}).get("run")
        lines += [f"### {k}. {cell(row.description)}", "",
                  f"Run {number if number else '(record not used)' if change.get('untrusted') else '(logged by hand)'}, commit `{row.commit}` on `{change['parent'][:7]}`: "
                  f"{gain_text(change)}.", "",
                  f"Evidence: {cell(evidence_text(change))}.", "",
                  f"Changed: {code(history.change_text((record.get('decision') or {}).get('changes')))}.", ""]
        diff, hidden = ledger.written_out(night.diff(change["parent"], change["commit"]))
        if hidden:  # a right-to-left override can make a line read otherwise than it runs
            lines += [f"**This diff holds invisible characters** ({', '.join(hidden)}), each written below as "
                      "<U+XXXX>: the code runs as written there, not as an editor may show it.", ""]
        lines += ([fenced(diff, "diff"), ""] if diff.strip() else ["train.py unchanged (the baseline).", ""])
    return lines


def tried_section(night: Night) -> list[str]:
    lines = ["## What was tried", "",
             "Every idea (reruns aside) under each train.py constant it changed and each part of the code it "
             "touched beyond its constants; an idea that touched several is under each. Delta: against the best "
             "it was built on.", ""]
    groups, bases = night.tried(), history.last_keeps(night.rows)
    if not groups:
        return lines + ["No idea logged yet.", ""]
    for key, entries in groups.items():
        kept = sum(row.status == "keep" for row, _ in entries)
        lines += [f"### {cell(key)}: {len(entries)} tried, {kept} kept", "",
                  "| run | commit | decision | val_bpb | delta | change | description |", "|---|---|---|---|---|---|---|"]
        for row, record in entries:
            delta = history.shown_delta(record, bases) if record and row.status != "crash" else None
            change = history.change_text((record or {}).get("decision", {}).get("changes")) if record else "?"
            lines.append(f"| {(record or {}).get('run', {}).get('run', '')} | `{row.commit}` | {row.status} | "
                         f"{value(row)} | {'' if delta is None else f'{delta:+.6f}'} | {code(change)} | "
                         f"{cell(row.description)} |")
        lines.append("")
    return lines


def noise_section(night: Night) -> list[str]:
    noise = night.state.get("noise")
    lines = ["## Noise", ""]
    if not noise:
        return lines + ["Not measured: no gain in this run was judged against the noise (measure_noise).", ""]
    lines.append(f"The best's code rerun on other stretches of the data: values "
                 f"{', '.join(f'{v:.6f}' for v in noise['values'])}; std {noise['std']:.6f}, spread "
                 f"{noise['spread']:.6f}; a gain counts as real beyond {noise['threshold']:.6f}.")
    for device, estimate in sorted((night.state.get("noise_by_device") or {}).items()):
        lines.append(f"- on {cell(device)}: std {estimate['std']:.6f}, threshold {estimate['threshold']:.6f}")
    return lines + [""]


def reruns_section(night: Night) -> list[str]:
    lines = ["## Extra runs", "", "Reruns that measured code again rather than try an idea: noise repeats of the "
             "best, confirmations of a candidate and their controls (the best again).", ""]
    reruns = [row for row in night.rows if row.commit in night.reruns]
    if not reruns:
        return lines + ["None.", ""]
    kinds = {kind: sum(k == kind for k in night.reruns.values()) for kind in history.RERUN_KINDS}
    lines += [", ".join(f"{n} {kind}{'s' if n != 1 else ''}" for kind, n in kinds.items() if n) + ".", "",
              "| run | kind | for run | val_bpb | description |", "|---|---|---|---|---|"]
    for row in reruns:
        run = night.records[row.commit]["run"]
        lines.append(f"| {run.get('run')} | {night.reruns[row.commit]} | {run.get('rerun_of') or ''} | {value(row)} | "
                     f"{cell(row.description)} |")
    return lines + [""]


def time_section(times: dict, night: Night) -> list[str]:
    devices = ", ".join(cell(d) for d in times["devices"]) or "not recorded"
    return ["## Time spent", "",
            f"- wall time of the research run: {hours(times['wall_hours'])} (from setup to the last run's end)",
            f"- slot time: {cost.hours_text(times) or 'no run trained'}, the runs' wall times as their workers "
            f"measured them, summed by the server as each run ended (cost.run_hours)",
            f"- on: {devices}", ""]
