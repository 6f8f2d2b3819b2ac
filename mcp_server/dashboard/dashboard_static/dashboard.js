// The research-loop dashboard: plain DOM and SVG, fed by one server-sent event stream.
// Everything the workspace wrote (descriptions, logs, diffs) goes in as text, never as HTML.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const CHART = { width: 960, height: 380, left: 70, right: 20, top: 20, bottom: 40 };
const SPARK = { width: 320, height: 70 };

const state = { ledger: null, filter: "all", openDiffs: new Set(), openTails: new Set(), fetched: new Map() };

function $(id) { return document.getElementById(id); }

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function num(value, digits = 6) { return value == null ? "–" : value.toFixed(digits); }
function signed(value) { return value == null ? "" : (value > 0 ? "+" : "") + value.toFixed(6); }
function seconds(s) { return s == null ? "?" : s >= 90 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`; }

// --- the stream ---------------------------------------------------------------------------

function connect() {
  const events = new EventSource("api/events");
  events.addEventListener("ledger", (e) => { state.ledger = JSON.parse(e.data); renderLedger(); });
  events.addEventListener("live", (e) => renderLive(JSON.parse(e.data)));
  events.onopen = () => setConnection("live", true);
  // EventSource reconnects by itself; the server told it how long to wait
  events.onerror = () => setConnection("reconnecting…", false);
}

function setConnection(text, on) {
  const node = $("connection");
  node.textContent = text;
  node.className = on ? "on" : "off";
}

// --- the ledger: summary, chart, kept changes, table ---------------------------------------

function renderLedger() {
  const data = state.ledger;
  const rows = data.rows.filter((r) => r.status !== "malformed");
  $("where").textContent = `${data.workspace} · ${data.branch || "no branch"}`;
  showNotice("problem", data.problem);
  showNotice("first-step", data.first_step);
  renderSummary(data, rows);
  renderChart(rows, data.noise);
  renderKept(rows);
  renderTable(data.rows);
}

function showNotice(id, text) {
  $(id).hidden = !text;
  $(id).textContent = text || "";
}

function renderSummary(data, rows) {
  const counts = { keep: 0, discard: 0, crash: 0, malformed: data.rows.length - rows.length };
  for (const row of rows) counts[row.status] += 1;
  const kept = rows.filter((r) => r.status === "keep");
  const best = kept.length ? kept[kept.length - 1] : null;  // what the branch holds, as status() says
  const parts = [el("span", { class: "big", text: best ? num(best.val_bpb) : "no kept run yet" })];
  // cut by the server, its markers ("(unsandboxed)", "(unverified)") kept whole
  if (best) parts.push(el("span", { text: ` best val_bpb, ${best.commit} “${best.headline}”` }));
  if (best && best.not_measured) parts.push(el("div", { class: "warn", text: `this best is ${best.not_measured}` }));
  const reruns = rows.filter((r) => r.rerun).length;
  const tally = `${rows.length} runs: ${counts.keep} kept, ${counts.discard} discarded`
    + (reruns ? ` (${reruns} of them reruns)` : "") + `, ${counts.crash} crashed`
    + (counts.malformed ? `, ${counts.malformed} malformed ledger line(s)` : "");
  parts.push(el("div", { class: "quiet", text: tally }));
  if (data.noise) {
    parts.push(el("div", { class: "quiet", text: `noise: std ${num(data.noise.std)}, gains under `
      + `${num(data.noise.threshold)} are within it` }));
  }
  $("summary").replaceChildren(...parts);
}

function renderChart(rows, noise) {
  const chart = $("chart");
  chart.replaceChildren();
  if (!rows.length) {
    chart.append(svg("text", { x: CHART.width / 2, y: CHART.height / 2, class: "empty" }, "no runs in results.tsv yet"));
    return;
  }
  const measured = rows.map((r, i) => ({ ...r, x: i + 1 }));
  const valued = measured.filter((r) => r.status !== "crash" && r.val_bpb > 0 && Number.isFinite(r.val_bpb));
  const band = noise ? noise.threshold : 0;
  const best = runningBest(measured);
  const values = valued.map((r) => r.val_bpb).concat(best.flatMap((p) => [p.y - band, p.y + band]));
  let low = Math.min(...values), high = Math.max(...values);
  if (!values.length) { low = 0; high = 1; }
  const pad = (high - low) * 0.08 || 0.01;
  low -= pad; high += pad;
  const X = (x) => CHART.left + (x - 0.5) / measured.length * (CHART.width - CHART.left - CHART.right);
  const Y = (y) => CHART.top + (high - y) / (high - low) * (CHART.height - CHART.top - CHART.bottom);
  drawAxes(chart, measured.length, low, high, X, Y);
  if (best.length) {
    const steps = stepPoints(best, measured.length);
    if (band) {
      const upper = steps.map(([x, y]) => `${X(x)},${Y(y + band)}`);
      const lower = steps.slice().reverse().map(([x, y]) => `${X(x)},${Y(y - band)}`);
      chart.append(svg("polygon", { class: "band", points: upper.concat(lower).join(" ") }));
    }
    chart.append(svg("polyline", { class: "best", points: steps.map(([x, y]) => `${X(x)},${Y(y)}`).join(" ") }));
  }
  for (const row of measured) {
    const point = row.status === "crash" || !valued.includes(row)
      ? svg("path", { d: cross(X(row.x), CHART.height - CHART.bottom - 6), class: "point crash" })
      : row.rerun && row.status === "discard"  // a measurement, not an idea that failed: a marker of its own
        ? svg("path", { d: diamond(X(row.x), Y(row.val_bpb)), class: "point rerun" })
        : svg("circle", { cx: X(row.x), cy: Y(row.val_bpb), r: row.status === "keep" ? 5 : 3.5,
          class: `point ${row.status}${row.not_measured ? " unmeasured" : ""}` });  // hollow: no measured gain
    point.dataset.commit = row.commit;
    point.addEventListener("mouseenter", () => showTip(point, row));
    point.addEventListener("mouseleave", () => { $("tip").hidden = true; });
    chart.append(point);
    if (row.status === "keep" && valued.includes(row)) {
      const x = X(row.x) + 7, y = Y(row.val_bpb) - 7;
      chart.append(svg("text", { x, y, class: "label", transform: `rotate(-18 ${x} ${y})` },
        row.label));  // cut by the server, a marker of a number the harness did not measure kept whole
    }
  }
  drawLegend(chart, measured.some((r) => r.not_measured));
}

const LEGEND = [["keep", "kept"], ["discard", "discarded idea"], ["rerun", "rerun (noise, confirmation, control)"],
  ["crash", "crash"], ["best", "best kept"]];

function drawLegend(chart, unmeasured) {
  const x = CHART.width - CHART.right - 236, top = CHART.top + 4;
  const entries = unmeasured ? [LEGEND[0], ["keep unmeasured", "kept, not measured by the harness"], ...LEGEND.slice(1)]
    : LEGEND;
  const legend = svg("g", { class: "legend" });
  legend.append(svg("rect", { x: x - 8, y: top - 2, width: 244, height: entries.length * 16 + 6, class: "legend-box" }));
  entries.forEach(([kind, text], i) => {
    const cx = x + 6, cy = top + 10 + i * 16;
    const mark = kind === "best" ? svg("line", { x1: cx - 6, y1: cy, x2: cx + 6, y2: cy, class: "mark best" })
      : kind === "crash" ? svg("path", { d: cross(cx, cy), class: "mark crash" })
        : kind === "rerun" ? svg("path", { d: diamond(cx, cy), class: "mark rerun" })
          : svg("circle", { cx, cy, r: kind.startsWith("keep") ? 5 : 3.5, class: `mark ${kind}` });
    legend.append(mark, svg("text", { x: x + 18, y: cy + 4, class: "legend-text", "data-kind": kind }, text));
  });
  chart.append(legend);
}

// the best the branch held after each row: the last measured keep's value, a worse one too (as the summary says);
// a keep the harness did not measure moves neither the line nor the noise band (its point is hollow)
function runningBest(rows) {
  const points = [];
  let best = null;
  for (const row of rows) {
    if (row.status === "keep" && row.val_bpb > 0 && !row.not_measured) best = row.val_bpb;
    if (best !== null) points.push({ x: row.x, y: best });
  }
  return points;
}

function stepPoints(best, last) {
  const steps = [];
  best.forEach((p, i) => {
    if (i > 0 && p.y !== best[i - 1].y) steps.push([p.x, best[i - 1].y]);
    steps.push([p.x, p.y]);
  });
  steps.push([last + 0.5, best[best.length - 1].y]);
  return steps;
}

function diamond(x, y) { return `M${x},${y - 5}L${x + 5},${y}L${x},${y + 5}L${x - 5},${y}Z`; }

function cross(x, y) { return `M${x - 4},${y - 4}L${x + 4},${y + 4}M${x - 4},${y + 4}L${x + 4},${y - 4}`; }

function drawAxes(chart, count, low, high, X, Y) {
  const bottom = CHART.height - CHART.bottom;
  chart.append(svg("line", { x1: CHART.left, y1: bottom, x2: CHART.width - CHART.right, y2: bottom, class: "axis" }));
  chart.append(svg("line", { x1: CHART.left, y1: CHART.top, x2: CHART.left, y2: bottom, class: "axis" }));
  for (let k = 0; k <= 4; k++) {
    const value = low + (high - low) * k / 4;
    chart.append(svg("line", { x1: CHART.left, y1: Y(value), x2: CHART.width - CHART.right, y2: Y(value), class: "grid" }));
    chart.append(svg("text", { x: CHART.left - 6, y: Y(value) + 4, class: "tick y" }, value.toFixed(4)));
  }
  const every = Math.max(1, Math.ceil(count / 12));
  for (let x = 1; x <= count; x += every) {
    chart.append(svg("text", { x: X(x), y: bottom + 16, class: "tick x" }, String(x)));
  }
  chart.append(svg("text", { x: (CHART.width + CHART.left) / 2, y: CHART.height - 4, class: "title" },
    "run (ledger order)"));
  chart.append(svg("text", { x: 14, y: CHART.top + 8, class: "title", transform: `rotate(-90 14 ${CHART.top + 8})` },
    "val_bpb ↓"));
}

function showTip(point, row) {
  const tip = $("tip");
  const measured = row.status === "crash" ? "crash" : `${num(row.val_bpb)} ${signed(row.delta)}`;
  tip.replaceChildren(
    el("div", { class: "mono", text: `#${row.x} ${row.commit} · ${row.rerun ? row.rerun : row.status}` }),
    el("div", { class: "mono", text: measured }),
    el("div", { text: row.description }));
  const box = point.getBoundingClientRect(), frame = $("chart-box").getBoundingClientRect();
  tip.style.left = `${Math.min(box.right - frame.left + 8, frame.width - 280)}px`;
  tip.style.top = `${box.top - frame.top + 8}px`;
  tip.hidden = false;
}

function renderKept(rows) {
  const kept = rows.filter((r) => r.status === "keep");
  const items = kept.map((row) => {
    const head = el("summary", {},
      el("span", { class: "mono", text: `${row.run ? "run " + row.run + " · " : ""}${row.commit} · ${num(row.val_bpb)}` }),
      el("span", { class: "mono delta", text: row.delta == null ? "" : ` ${signed(row.delta)}` }),
      el("span", { text: ` ${row.description}` }),
      el("span", { class: "quiet", text: row.changes ? ` (${row.changes})` : "" }));
    const body = el("pre", { class: "diff" });
    const details = el("details", { "data-commit": row.commit }, head, body);
    details.open = state.openDiffs.has(row.commit);
    if (details.open) fillDiff(row.commit, body);
    details.addEventListener("toggle", () => {
      if (details.open) { state.openDiffs.add(row.commit); fillDiff(row.commit, body); }
      else state.openDiffs.delete(row.commit);
    });
    return el("li", {}, details);
  });
  $("kept").replaceChildren(...items);
  if (!items.length) $("kept").append(el("li", { class: "quiet", text: "nothing kept yet" }));
}

async function fetched(kind, commit) {
  const key = `${kind}:${commit}`;
  if (!state.fetched.has(key)) {
    state.fetched.set(key, fetch(`api/${kind}?commit=${encodeURIComponent(commit)}`).then(async (response) => {
      const data = await response.json();
      if (!response.ok) { state.fetched.delete(key); throw new Error(data.error || response.statusText); }
      return data;
    }));
  }
  return state.fetched.get(key);
}

async function fillDiff(commit, pre) {
  try {
    const data = await fetched("diff", commit);
    if (!data.diff) { pre.textContent = `train.py unchanged against ${data.parent} (the baseline)`; return; }
    pre.replaceChildren(...data.diff.replace(/\n$/, "").split("\n").map((line) => el("span", { class: diffClass(line), text: line + "\n" })));
    if (data.truncated) pre.append(el("span", { class: "quiet", text: "… (cut: the diff is longer)" }));
  } catch (error) {
    pre.textContent = `no diff: ${error.message}`;
  }
}

function diffClass(line) {
  if (line.startsWith("@@")) return "hunk";
  if (line.startsWith("+++") || line.startsWith("---") || line.startsWith("diff ") || line.startsWith("index ")) return "file";
  return line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : "";
}

function renderTable(all) {
  const statuses = ["all", "keep", "discard", "crash"].concat(all.some((r) => r.status === "malformed") ? ["malformed"] : []);
  $("filters").replaceChildren(...statuses.map((status) => {
    const count = status === "all" ? all.length : all.filter((r) => r.status === status).length;
    const button = el("button", { class: status === state.filter ? "chosen" : "", "data-status": status,
      text: `${status} (${count})` });
    button.addEventListener("click", () => { state.filter = status; renderTable(state.ledger.rows); });
    return button;
  }));
  const body = $("ledger").tBodies[0];
  body.replaceChildren();
  let ordinal = all.filter((r) => r.status !== "malformed").length;
  for (const row of all.slice().reverse()) {
    const shown = state.filter === "all" || row.status === state.filter;
    if (row.status === "malformed") {
      if (shown) body.append(el("tr", { class: "row malformed" }, el("td", { text: "?" }),
        el("td", { colspan: "6", text: `malformed ledger line ${row.line}: ${row.text}` })));
      continue;
    }
    const number = ordinal--;
    if (!shown) continue;
    const description = el("td", { text: row.description });
    const tr = el("tr", { class: `row ${row.status}`, "data-commit": row.commit },
      el("td", { class: "mono", text: String(number) }), el("td", { class: "mono", text: row.commit }),
      el("td", { class: "mono", text: row.status === "crash" ? "–" : num(row.val_bpb) }),
      el("td", { class: "mono", text: signed(row.delta) }), el("td", { class: "mono", text: row.memory_gb.toFixed(1) }),
      el("td", { text: row.status }), description);
    if (row.changes) tr.title = row.changes;
    body.append(tr);
    if (row.status === "crash") addTail(body, description, row.commit);
  }
}

function addTail(body, cell, commit) {
  const button = el("button", { class: "tail-button", text: "log tail" });
  const pre = el("pre", { class: "tail" });
  const extra = el("tr", { class: "tail-row" }, el("td", { colspan: "7" }, pre));
  const show = (open) => {
    extra.hidden = !open;
    if (open) fetched("tail", commit).then((d) => { pre.textContent = d.tail; }, (e) => { pre.textContent = e.message; });
  };
  button.addEventListener("click", () => {
    const open = !state.openTails.has(commit);
    if (open) state.openTails.add(commit); else state.openTails.delete(commit);
    show(open);
  });
  cell.append(" ", button);
  body.append(extra);
  show(state.openTails.has(commit));
}

// --- runs in flight and limits -------------------------------------------------------------

function renderLive(data) {
  $("limits").textContent = data.ended ? `the research run has ended: ${data.ended}`
    : data.limits ? `limits: ${data.limits}` : "";
  $("spent").textContent = data.spent ? `spent: ${data.spent}` : "";
  if (data.problem) showNotice("problem", data.problem);
  const cards = data.runs.map(runCard);
  $("live").replaceChildren(...(cards.length ? cards : [el("p", { class: "quiet", text: "No run in flight." })]));
}

function runCard(run) {
  const several = run.slot && run.slot !== "slot 0";
  const title = el("div", { class: "run-title" },
    el("span", { class: "mono", text: `run ${run.run} · ${run.commit}` }),
    el("span", { class: `badge ${run.status}`, text: run.status }),
    el("span", { class: run.unsandboxed ? "badge unsandboxed" : "", text: run.unsandboxed ? "unsandboxed" : "" }),
    el("span", { text: ` ${run.description}` }),
    el("span", { class: "quiet", text: several ? ` · ${run.slot}` : "" }));
  const card = el("div", { class: "run", "data-run": String(run.run) }, title);
  const p = run.progress;
  if (run.server_gone) {
    card.append(el("div", { class: "quiet", text: "its server has stopped: the next one records its result, or marks it interrupted" }));
  } else if (run.status === "running") {
    const where = p
      ? `step ${p.step} (${p.percent.toFixed(1)}%) · loss ${p.loss == null ? "NaN" : p.loss.toFixed(4)} · `
        + `${seconds(p.remaining_s)} of training left`
      : "starting up";
    card.append(el("div", { class: "mono step", "data-step": p ? String(p.step) : "", text: where }),
      el("div", { class: "quiet", text: `${seconds(run.elapsed_s)} so far; timeout ${seconds(Math.round(run.timeout_s))}` }));
    if (run.curve && run.curve.length > 1) card.append(sparkline(run.curve));
  } else if (run.status === "queued") {
    card.append(el("div", { class: "quiet", text: "waits for a free slot" }));
  } else if (run.status === "interrupted") {
    card.append(el("div", { class: "quiet", text: "its server stopped mid-run: discard() logs it as a crash" }));
  } else if (run.result) {
    const r = run.result;
    const text = r.status === "ok" ? `val_bpb ${num(r.val_bpb)} ${signed(r.delta)}${r.noise ? " · " + r.noise : ""}`
      + (r.verified === false ? " · train.py's own, not measured by the harness" : "") : r.status;
    card.append(el("div", { class: "mono", text: `${text} · waits for keep or discard` }));
  }
  return card;
}

function sparkline(curve) {
  const losses = curve.map(([, loss]) => loss).filter((v) => v != null);
  const steps = curve.map(([step]) => step);
  const low = Math.min(...losses), high = Math.max(...losses);
  const first = steps[0], last = steps[steps.length - 1];
  const X = (s) => 4 + (s - first) / Math.max(1, last - first) * (SPARK.width - 8);
  const Y = (v) => 4 + (high - v) / Math.max(1e-9, high - low) * (SPARK.height - 8);
  const points = curve.filter(([, loss]) => loss != null).map(([s, v]) => `${X(s)},${Y(v)}`).join(" ");
  const chart = svg("svg", { class: "spark", viewBox: `0 0 ${SPARK.width} ${SPARK.height}` });
  chart.append(svg("polyline", { points }),
    svg("text", { x: SPARK.width - 4, y: 12, class: "tick" }, `loss ${high.toFixed(2)} → ${losses[losses.length - 1].toFixed(2)}`));
  return chart;
}

connect();
