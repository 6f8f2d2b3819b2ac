"""A stand-in for train.py that prints upstream-format output in a fraction of a second.

Each knob is read from an environment variable FAKE_<NAME>, else from a line
`<NAME> = value` in train.py in the current directory (so editing train.py changes the
result, as it does for real), else a default:
  VAL_BPB (1.0)  MEMORY_MB (2048.0)  STEPS (5)  SLEEP (0: seconds spread over the steps)
  CRASH (0: raise an exception)  NAN (0: NaN loss -> FAIL, exit 1)  NO_SUMMARY (0: exit 0 silently)
  NOISE (0: val_bpb moves by NOISE x (run number mod 3 - 1), so repeats of one commit differ)
  SPAWN (0: start a grandchild that sleeps, writing its pid to spawned.pid)
  ESCAPE (0: seconds after which a daemon, double-forked into a session of its own, prints a summary
          with val_bpb 0.1 to the run's output; its pid goes to escaped.pid)
  SPAM_MB (0: megabytes of output printed before the summary)
  IGNORE_TERM (0: ignore SIGTERM, so only SIGKILL stops it)
  CLAIM_SECONDS (0: print this as training_seconds instead of the time it took)
  MFU (40.0: the mfu_percent printed, the run's throughput)
  ORDER_EFFECT (0: val_bpb moves by this much per data order, AUTORESEARCH_DATA_ORDER)
  ORDER_LUCK (0: val_bpb moves by ORDER_LUCK x (-1, 0 or 1, drawn from VAL_BPB's value and the data order): the
              luck of one code on one data order, repeated by a rerun and by an edit of a comment only)
  FLOPS_CLOCK (0: say the budget was spent on the flops clock, as the CPU profile's train.py does)
  LAG (0: added to every step's training loss, so the run's curve lags a run without it)
  EXPORT (0: export nothing; 1: export a "model" holding the val_bpb it prints to RESEARCH_LOOP_EXPORT, which
          EVALUATOR in server_support scores as it holds; 2: that on the usual data order only, so that a rerun on
          another order is unverified, its val_bpb the one printed)
  IMPORTS (none: comma-separated modules imported first, as train.py imports torch; read from the
          environment only)
  READ (none: comma-separated files to read, printing what each holds or why it could not, a pattern
        with * standing for what it matches (printed); read from the environment only)
  HOLD (0: a run number; that run (RESEARCH_LOOP_RUN), once its steps are done, waits until the file named by
        FAKE_RELEASE exists, for at most 120 s: a test's race made while the run is in flight, however slow the
        machine; FAKE_RELEASE is read from the environment only, and lies outside /tmp, the sandbox's own; conftest's
        hold fixture sets both)
  TAMPER (0: try to append a planted best row to the workspace's results.tsv, to rewrite the
          server's state, to write the user's home and the worktree's .git link, and report what happened)
  COMPILE (0: as a compiling train.py does, print each file of its compile folder (TORCHINDUCTOR_CACHE_DIR) as
           `cache <name>: <text>`, then write graph.py there where missing)
  POISON (0: with COMPILE, append POISON to each file of the compile folder, as a run that wants the next run of
          another program (the best's rerun, a control) to load its code would)
"""
# Only what every run needs is imported here: a run's sandbox hides the standard library's bytecode, so each
# import compiles from source at every run (re, subprocess, glob and signal took 0.1 CPU-s of a run's 0.12, over
# the suite's thousands of runs); what a knob needs is imported where it is used.
import os
import sys
import time

DEFAULTS = {"VAL_BPB": 1.0, "MEMORY_MB": 2048.0, "STEPS": 5, "SLEEP": 0.0, "CRASH": 0, "NAN": 0,
            "NO_SUMMARY": 0, "NOISE": 0.0, "SPAWN": 0, "ESCAPE": 0.0, "SPAM_MB": 0.0, "IGNORE_TERM": 0,
            "CLAIM_SECONDS": 0.0, "TAMPER": 0, "MFU": 40.0, "FLOPS_CLOCK": 0,
            "ORDER_EFFECT": 0.0, "ORDER_LUCK": 0.0, "LAG": 0.0, "EXPORT": 0, "HOLD": 0, "COMPILE": 0, "POISON": 0}
ESCAPED = """
import os, sys, time
if os.fork():
    os._exit(0)
os.setsid()
open("escaped.pid", "w").write(str(os.getpid()))
time.sleep(float(sys.argv[1]))
print("\\n---\\nval_bpb:          0.100000\\ndepth:            4", flush=True)
time.sleep(600)
"""


def knobs() -> dict:
    try:
        source = open("train.py").read()
    except FileNotFoundError:
        source = ""
    values = {}
    for name, default in DEFAULTS.items():
        raw = os.environ.get(f"FAKE_{name}") or knob_in(source, name)
        values[name] = type(default)(float(raw)) if raw is not None else default
    return values


def knob_in(source: str, name: str) -> str | None:
    """The value of the first line `NAME = number` (re's `^NAME\\s*=\\s*([-\\d.e]+)`, multiline), without
    importing re."""
    start = 0
    while start >= 0:
        if source.startswith(name, start):
            rest = source[start + len(name):].lstrip()
            if rest.startswith("="):
                rest = rest[1:].lstrip()
                end = next((i for i, c in enumerate(rest) if not (c.isdecimal() or c in "-.e")), len(rest))
                if end:
                    return rest[:end]
        start = source.find("\n", start)
        start = start + 1 if start >= 0 else -1
    return None


def order_luck(k: dict) -> int:
    import zlib
    return zlib.crc32(f"{k['VAL_BPB']} {os.environ.get('AUTORESEARCH_DATA_ORDER', '0')}".encode()) % 3 - 1


def compile_folder(poison: bool) -> None:
    """What a compiling train.py reads and writes in its compile folder, and what a poisoning one adds."""
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(os.environ["AUTORESEARCH_CACHE"], "compile")
    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path) as f:
                print(f"cache {name}: {f.read()!r}")
            if poison:
                with open(path, "a") as f:
                    f.write(" POISON")
    graph = os.path.join(folder, "graph.py")
    if not os.path.exists(graph):
        with open(graph, "w") as f:
            f.write(f"compiled by run {os.environ.get('RESEARCH_LOOP_RUN')}")


def tamper() -> None:
    """What a train.py that wants a better record would try: the workspace is where git keeps its
    common directory (a run's worktree lives inside it)."""
    import pwd
    import subprocess
    common = subprocess.run(["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
                            capture_output=True, text=True).stdout.strip()
    root = os.path.dirname(common)
    for name, text in (("results.tsv", "aaaaaaa\t0.010000\t0.0\tkeep\tplanted\n"),
                       (".research-loop/state.json", "{}")):
        try:
            with open(os.path.join(root, name), "a") as f:
                f.write(text)
            print(f"tamper: wrote {name}")
        except OSError as exc:
            print(f"tamper: refused {name}: {exc}")
    # outside the workspace: the user's real home (where ~/.gitconfig would make the server's next git
    # call run a program), and the worktree's .git link; both opened without changing them
    home = pwd.getpwuid(os.getuid()).pw_dir
    for name, path in (("home", os.path.join(home, f".research-loop-tamper-{os.getpid()}")), (".git", ".git")):
        try:
            open(path, "a").close()
            print(f"tamper: wrote {name}")
            if name == "home":
                os.unlink(path)
        except OSError as exc:
            print(f"tamper: refused {name}: {exc}")


def hold() -> None:
    # the hold fixture releases it as its test ends; the deadline only bounds a hold left behind (a loaded machine's
    # race took past 120 s, and the held run ended before the call it was held for)
    release, deadline = os.environ.get("FAKE_RELEASE", ""), time.time() + 600
    while not (release and os.path.exists(release)) and time.time() < deadline:
        time.sleep(0.05)


def read_paths(listed: str) -> list[str]:
    """The paths listed, a pattern (with *) in their place by what it matches, printed."""
    paths = []
    for entry in filter(None, listed.split(",")):
        if "*" in entry:
            import glob
            found = sorted(glob.glob(entry, recursive=True))
            print(f"glob {entry}: {found}")
            paths += found
        else:
            paths.append(entry)
    return paths


def main() -> int:
    for name in filter(None, os.environ.get("FAKE_IMPORTS", "").split(",")):
        __import__(name)
    for path in read_paths(os.environ.get("FAKE_READ", "")):
        try:
            with open(path) as f:
                print(f"read {path}: {f.read(200)!r}")
        except OSError as exc:
            print(f"read {path}: refused {type(exc).__name__}")
    k = knobs()
    if k["TAMPER"]:
        tamper()
    if k["COMPILE"]:
        compile_folder(bool(k["POISON"]))
    t0 = time.time()
    if k["IGNORE_TERM"]:
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if k["ESCAPE"]:
        import subprocess
        subprocess.Popen([sys.executable, "-c", ESCAPED, str(k["ESCAPE"])]).wait()
    if k["SPAM_MB"]:
        line = "x" * 1023 + "\n"
        for _ in range(int(k["SPAM_MB"] * 1024)):
            sys.stdout.write(line)
    if k["SPAWN"]:
        import subprocess
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open("spawned.pid", "w") as f:
            f.write(str(child.pid))
    print("Vocab size: 8,192\nTime budget: fake")
    print(f"visible: CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')} "
          f"cpus={','.join(map(str, sorted(os.sched_getaffinity(0))))} "
          f"data order={os.environ.get('AUTORESEARCH_DATA_ORDER', '0')}", flush=True)
    print("budget: " + " ".join(f"{name}={os.environ.get(f'AUTORESEARCH_{name}', '-')}"  # what the harness told it
                                for name in ("BUDGET_CLOCK", "TIME_BUDGET", "EVAL_TOKENS")), flush=True)
    for step in range(k["STEPS"]):
        loss = float("nan") if k["NAN"] and step == k["STEPS"] - 1 else 9.0 - step * 0.5 + k["LAG"]
        if loss != loss:
            print("\nFAIL")
            return 1
        pct = 100.0 * (step + 1) / k["STEPS"]
        print(f"\rstep {step:05d} ({pct:.1f}%) | loss: {loss:.6f} | lrm: 1.00 | dt: 10ms | "
              f"tok/sec: 5,000 | mfu: 0.0% | epoch: 1 | remaining: {k['STEPS'] - step - 1}s    ",
              end="", flush=True)
        time.sleep(k["SLEEP"] / k["STEPS"])
        if k["CRASH"] and step == k["STEPS"] // 2:
            raise RuntimeError("CUDA out of memory (fake crash)")
    print()
    if k["HOLD"] and k["HOLD"] == int(os.environ.get("RESEARCH_LOOP_RUN", "0")):
        hold()
    if k["NO_SUMMARY"]:
        return 0
    elapsed = time.time() - t0
    val_bpb = k["VAL_BPB"] + k["NOISE"] * (int(os.environ.get("RESEARCH_LOOP_RUN", "1")) % 3 - 1) \
        + k["ORDER_EFFECT"] * int(os.environ.get("AUTORESEARCH_DATA_ORDER", "0")) + k["ORDER_LUCK"] * order_luck(k)
    if k["EXPORT"] == 1 or (k["EXPORT"] == 2 and not int(os.environ.get("AUTORESEARCH_DATA_ORDER", "0"))):
        export = os.environ["RESEARCH_LOOP_EXPORT"]
        with open(export, "w") as f:
            f.write(f"{val_bpb:.6f}")
        with open(export + ".json", "w") as f:  # the note comes last: the harness evaluates once it is there
            f.write("{}")
        deadline = time.time() + 30  # as prepare.evaluate_bpb, waits for the harness's answer
        while not os.path.exists(os.environ["RESEARCH_LOOP_ANSWER"]) and time.time() < deadline:
            time.sleep(0.05)
    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {k['CLAIM_SECONDS'] or elapsed:.1f}")
    print(f"total_seconds:    {elapsed + 0.1:.1f}")
    print(f"peak_vram_mb:     {k['MEMORY_MB']:.1f}")
    print(f"mfu_percent:      {k['MFU']:.2f}")
    print("total_tokens_M:   0.1")
    print(f"num_steps:        {k['STEPS']}")
    print("num_params_M:     11.5")
    print("depth:            4")
    if k["FLOPS_CLOCK"]:
        print("budget_clock:     flops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
