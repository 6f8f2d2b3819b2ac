"""The fixed harness entry point: constants, data preparation and tokenizer training.

Run once per machine (or per cache folder):
    uv run prepare.py [--profile auto|h100|gpu|mps|cpu] [--dataset auto|climbmix|tinystories|offline|<folder>]
Then train.py imports the contract:
    from prepare import MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, make_dataloader, evaluate_bpb

The profile and data set chosen here are recorded in <cache>/prepared.json, so every later run
uses the same constants. Research runs must never edit this file or nanochat/.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests
import torch

from nanochat import answer, datasets, evaluation, export, platform
from nanochat.cache import PREPARE_COMMAND, cache_dir, data_dir, prepared_record_path, tokenizer_dir
from nanochat.dataloader import make_dataloader  # noqa: F401  (part of the import contract)
from nanochat.profiles import PROFILES, evaluation_shape
from nanochat.tokenizer import Tokenizer, save_tokenizer, train_bpe

DATASETS = ("auto", "climbmix", "tinystories", "offline")
H100_MIN_BYTES = 70 * 10**9  # CUDA devices with at least this much memory get the upstream profile
CLIMBMIX_TRAIN_SHARDS = 10  # upstream's default download
TOKENIZER_MAX_CHARS = 1_000_000_000  # text the tokenizer trains on, at most (as upstream)
TOKENIZER_DOC_CHARS = 10_000  # per document, so one huge document can't dominate the merges
NETWORK_PROBE_TIMEOUT_S = 3
BUDGET_CLOCKS = ("wall", "cpu", "flops")  # see training_clock and budget_used
# The "flops" clock spends TIME_BUDGET at this share of the rate of training-shaped work measured at
# prepare time (calibrate_flops_clock), so that train.py's budget second takes about 0.8 s of training
# compiled (eager about 1 s), as on a Zen 4 before. A large matmul's peak (the clock's base before) is
# no measure of that: AMX runs it at 5.5x the rate train.py trains at (2-core Xeon: every budget second
# took 2.4-2.8 s). `uv run bench/bench_flops_clock.py` compares the two.
FLOPS_CLOCK_SHARE = 0.75
REPO = Path(__file__).resolve().parent
# prepare_compiler_once's warm-up, run in the runs' sandbox (nanochat/compile.py); the stand-in compiles
# in about 25 s on 2 cores, so this is only a bound on a hung compiler or on code a run planted
COMPILER_WARM_UP = "import sys; from nanochat.compile import prepare_compiler_here; sys.exit(prepare_compiler_here())"
COMPILER_WARM_UP_TIMEOUT_S = 900
STARTING_WIDTH_PER_LAYER = 64  # train.py's starting ASPECT_RATIO: the measured model's width is depth x this
# What prepared.json fixes for every later run (the MCP server reads time_budget from it too);
# the profile's train_defaults are only train.py's starting point, so they come from the code.
RECORDED_CONSTANTS = ("vocab_size", "max_seq_len", "time_budget", "eval_tokens")
PROGRESS_EVERY_S = 0.5  # redraw the download line at most this often
CHARS_PER_ROW_TOKEN = 3  # local corpora are cut to about a row: max_seq_len tokens of ~3 chars


# ---------------------------------------------------------------------------------------------
# The recorded choice and the constants train.py imports

def read_record():
    path = prepared_record_path()
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise RuntimeError(f"{path} is corrupt ({e}). Re-prepare with `{PREPARE_COMMAND} --force`.") from e


def _env_positive_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = int(float(value))
        assert number > 0
    except (ValueError, AssertionError):
        raise RuntimeError(f"{name}={value!r} must be a positive number (or unset).") from None
    return number


def _budget_clock(record: dict) -> str:
    """The record's clock (a record from before clocks: wall), or AUTORESEARCH_BUDGET_CLOCK's (benchmarks)."""
    clock = os.environ.get("AUTORESEARCH_BUDGET_CLOCK") or record.get("budget_clock", "wall")
    if clock not in BUDGET_CLOCKS:
        raise RuntimeError(f"budget clock {clock!r} is not one of {', '.join(BUDGET_CLOCKS)} "
                           "(AUTORESEARCH_BUDGET_CLOCK, or budget_clock in prepared.json).")
    return clock


def _flops_per_budget_second(record: dict, clock: str) -> float | None:
    """The "flops" clock's rate, as recorded at prepare time (or measured now, where a benchmark
    chose that clock on a cache prepared for another)."""
    if clock != "flops":
        return None
    if record.get("flops_per_budget_second"):
        return float(record["flops_per_budget_second"])
    if record.get("budget_clock") != "flops":
        return calibrate_flops_clock(PROFILES[record["profile"]])
    raise RuntimeError(f"{prepared_record_path()} has the flops budget clock but no flops_per_budget_second. "
                       f"Re-prepare with `{PREPARE_COMMAND} --force`.")


def calibrate_flops_clock(profile: dict) -> float:
    """FLOPs per budget second: FLOPS_CLOCK_SHARE of the rate this machine trains the profile's starting
    model at (its shapes: rows per micro-batch, context, depth, width, vocabulary), times its threads.
    Measured on one thread, whose rate per CPU-second a busy machine hardly lowers: on two, threads that
    wait on each other spin, and beside one busy process on 2 cores that cut the rate by 2-4x."""
    depth, threads = profile["train_defaults"]["depth"], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = platform.measure_model_flops(rows=profile["train_defaults"]["device_batch_size"],
                                                  seq_len=profile["max_seq_len"], width=depth * STARTING_WIDTH_PER_LAYER,
                                                  depth=depth, vocab=profile["vocab_size"])
    finally:
        torch.set_num_threads(threads)
    return FLOPS_CLOCK_SHARE * one_thread * threads


def training_clock():
    """The clock a step's time is measured on. "wall": wall-clock seconds (GPUs, as upstream).
    "cpu" and "flops": this process's CPU seconds per thread, which a busy neighbour does not shrink."""
    return time.perf_counter if BUDGET_CLOCK == "wall" else platform.cpu_seconds_per_thread


def budget_used(seconds: float, flops: float) -> float:
    """What one timed step spends of TIME_BUDGET: its seconds on training_clock(), or on the "flops"
    clock its FLOPs at the prepared rate. The flops clock gives the same code the same steps however
    busy or fast the machine is that hour (the CPU profile's); faster code shows in MFU, not steps."""
    return flops / FLOPS_PER_BUDGET_SECOND if BUDGET_CLOCK == "flops" else seconds


def load_constants() -> dict:
    """The constants of the recorded profile, with the test/debug overrides from the environment."""
    record = read_record()
    if record is None:
        raise RuntimeError(f"Nothing is prepared in {cache_dir()}. Run `{PREPARE_COMMAND}` first "
                           f"(it prepares data and trains the tokenizer; see --help).")
    name = record.get("profile")
    if name not in PROFILES or not {"dataset", *RECORDED_CONSTANTS} <= record.keys():
        raise RuntimeError(f"{prepared_record_path()} is not a record this version wrote. "
                           f"Re-prepare with `{PREPARE_COMMAND} --force`.")
    wanted = os.environ.get("AUTORESEARCH_PROFILE")
    if wanted and wanted != name:
        raise RuntimeError(f"AUTORESEARCH_PROFILE={wanted} but {cache_dir()} was prepared for profile '{name}'. "
                           f"Unset it, or prepare that profile: `{PREPARE_COMMAND} --profile {wanted} --force` "
                           f"(or point AUTORESEARCH_CACHE at another folder).")
    profile, clock = PROFILES[name], _budget_clock(record)
    if (record["vocab_size"], record["max_seq_len"]) != (profile["vocab_size"], profile["max_seq_len"]):
        raise RuntimeError(f"Profile '{name}' changed since {cache_dir()} was prepared (vocab or context length). "
                           f"Re-prepare with `{PREPARE_COMMAND} --profile {name} --force`.")
    return dict(
        PROFILE=name,
        DATASET=record["dataset"],
        MAX_SEQ_LEN=profile["max_seq_len"],
        VOCAB_SIZE=profile["vocab_size"],
        TIME_BUDGET=_env_positive_int("AUTORESEARCH_TIME_BUDGET", record["time_budget"]),
        BUDGET_CLOCK=clock,
        FLOPS_PER_BUDGET_SECOND=_flops_per_budget_second(record, clock),
        EVAL_TOKENS=_env_positive_int("AUTORESEARCH_EVAL_TOKENS", record["eval_tokens"]),
        TRAIN_DEFAULTS=dict(profile["train_defaults"]),
    )


if __name__ != "__main__":  # imported (by train.py): resolve the contract's constants now
    _constants = load_constants()
    PROFILE, DATASET = _constants["PROFILE"], _constants["DATASET"]
    MAX_SEQ_LEN, VOCAB_SIZE = _constants["MAX_SEQ_LEN"], _constants["VOCAB_SIZE"]
    TIME_BUDGET, EVAL_TOKENS = _constants["TIME_BUDGET"], _constants["EVAL_TOKENS"]
    BUDGET_CLOCK, FLOPS_PER_BUDGET_SECOND = _constants["BUDGET_CLOCK"], _constants["FLOPS_PER_BUDGET_SECOND"]
    TRAIN_DEFAULTS = _constants["TRAIN_DEFAULTS"]


def evaluate_bpb(model, tokenizer, batch_size):
    """Validation bits per byte over EVAL_TOKENS tokens at MAX_SEQ_LEN (the one number to lower).
    Under the research-loop server, the model is exported for the harness's own, separate
    evaluation (nanochat/export.py), whose number the ledger gets: it is returned here, so the
    validation set is not evaluated twice."""
    eval_batch_size, _ = evaluation_shape(PROFILE)
    exported = export.export_for_evaluation(model, batch_size, MAX_SEQ_LEN, eval_batch_size, VOCAB_SIZE)
    handed = answer.harness_answer() if exported else None
    if handed and "val_bpb" in handed and os.environ.get(answer.CROSSCHECK_ENV) != "1":
        return handed["val_bpb"]
    if os.environ.get(answer.VAL_HIDDEN_ENV) == "1":
        why = ((handed or {}).get("problem") or (handed or {}).get("error")
               or "the model was not exported, as the log says above")
        raise RuntimeError(f"the harness did not score this run ({why}), and under the research loop a run cannot "
                           "evaluate itself: the validation data is the harness's alone. Make the model one the "
                           "harness can export and evaluate, then run again")
    return evaluation.evaluate_bpb(model, tokenizer, batch_size, MAX_SEQ_LEN, EVAL_TOKENS)


# ---------------------------------------------------------------------------------------------
# Choosing a profile and a data set

def detect_profile() -> str:
    """The device train.py will use (nanochat/platform.py: it stops where a GPU is here that torch
    cannot use, rather than let this record the cpu profile in silence)."""
    if platform.DEVICE.type == "cuda":
        return "h100" if torch.cuda.get_device_properties(0).total_memory >= H100_MIN_BYTES else "gpu"
    return platform.DEVICE.type  # "mps" or "cpu"


def _network_answers(url: str) -> bool:
    try:
        return requests.head(url, timeout=NETWORK_PROBE_TIMEOUT_S, allow_redirects=False).status_code < 500
    except requests.RequestException:
        return False


def _data_url(default: str) -> str:
    return os.environ.get("AUTORESEARCH_DATA_URL") or default


def choose_dataset(requested: str, profile: str, record) -> str:
    if requested != "auto":
        if requested in DATASETS:
            return requested
        folder = Path(requested).expanduser()
        if not folder.is_dir():
            raise ValueError(f"--dataset {requested!r} is neither one of {', '.join(DATASETS)} nor a folder. "
                             f"Give a folder of .txt/.jsonl/.parquet files, or a data set name.")
        return str(folder.resolve())
    if record:
        return record["dataset"]
    if profile in ("h100", "gpu") and _network_answers(f"{_data_url(datasets.CLIMBMIX_URL)}/{datasets.SHARD_PATTERN.format(0)}"):
        return "climbmix"
    return "offline"


# ---------------------------------------------------------------------------------------------
# Preparing

_last_progress = [0.0]  # when the download line was last redrawn


def _show_download(done: int, total) -> None:
    finished = bool(total) and done >= total
    if not finished and time.time() - _last_progress[0] < PROGRESS_EVERY_S:
        return
    _last_progress[0] = time.time()
    of = f" of {total / 1e6:.1f} MB" if total else " MB"
    print(f"\r  downloaded {done / 1e6:.1f}{of}   ", end="\n" if finished else "", flush=True)


def write_data(dataset: str, profile: dict, num_shards: int, seed: str | None = None) -> None:
    if dataset == "climbmix":
        datasets.download_climbmix(num_shards, _data_url(datasets.CLIMBMIX_URL), progress=_show_download)
        return
    for stale in datasets.list_shards():  # a local corpus is rewritten whole: its shard count varies
        stale.unlink()
    doc_chars = CHARS_PER_ROW_TOKEN * profile["max_seq_len"]
    if dataset == "offline":
        datasets.keep_offline_seed(seed)
        docs = datasets.offline_documents(doc_chars, seed)
    elif dataset == "tinystories":
        docs = datasets.tinystories_documents(_data_url(datasets.TINYSTORIES_URL), progress=_show_download)
    else:
        docs = datasets.folder_documents(Path(dataset), doc_chars)
    datasets.write_corpus(docs, datasets.val_chars_for(profile["eval_tokens"]), data_dir(), source=dataset,
                          report=lambda line: print(f"  {line}", flush=True))


def train_tokenizer(vocab_size: int) -> None:
    started = time.time()
    print(f"Training a {vocab_size:,}-token BPE tokenizer on the train shards...", flush=True)
    ranks = train_bpe(datasets.iter_training_text(TOKENIZER_MAX_CHARS, TOKENIZER_DOC_CHARS), vocab_size)
    save_tokenizer(ranks, tokenizer_dir())
    trained = Tokenizer.from_directory()
    sample = "Hello world! 12345 <|reserved_1|> \u00e9t\u00e9 def f(x):\n    return x ** 2\n"
    assert trained.decode(trained.encode(sample)) == sample, "tokenizer failed a round trip"
    print(f"  tokenizer ready in {time.time() - started:.1f}s -> {tokenizer_dir()}", flush=True)


def tokenizer_problem(vocab_size: int):
    """What is wrong with the saved tokenizer, or None."""
    try:
        found = Tokenizer.from_directory().get_vocab_size()
    except RuntimeError as e:
        return str(e)
    return None if found == vocab_size else f"the tokenizer has {found} tokens, not {vocab_size}"


def data_problem():
    """What is missing or broken in the data shards, or None (footer checks only: cheap)."""
    try:
        for path in datasets.split_paths("train") + datasets.split_paths("val"):
            datasets.check_shard(path)
    except (RuntimeError, FileNotFoundError) as e:
        return str(e)
    return None


def _write_record(record: dict) -> None:
    path = prepared_record_path()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def flops_clock_rate(profile: dict) -> float:
    print("Calibrating the flops budget clock (a few seconds of training-shaped work)...", flush=True)
    rate = calibrate_flops_clock(profile)
    print(f"  {rate / 1e9:.1f} GFLOP per budget second ({FLOPS_CLOCK_SHARE:.0%} of the rate measured)", flush=True)
    return rate


def prepare_compiler_once() -> bool:
    """What train.py's compiled path builds once per machine, built now instead of in the first run's
    start-up (nanochat/compile.py); True if there was anything to build. Built in a process of its own
    in the runs' sandbox (compiler_sandbox): the compile cache is written by runs, and Inductor loads
    its entries with pickle (and a planted compiled library or precompiled header with them), so code
    a run left there runs with a run's powers, never the user's. Where no sandbox is usable, built here
    only if the user opted in to runs without one (they can write anything anyway); else left to the
    first run."""
    from nanochat import compile as compiling  # sets the compile cache beside the data
    if not compiling.compiler_needs_preparing():
        return False
    print("Preparing the compiler (its checks of this CPU and the C++ headers, once per machine)...", flush=True)
    started, compile_cache = time.time(), compiling.compile_cache_dir_now()
    command, why_not, opted_in = compiler_sandbox([sys.executable, "-c", COMPILER_WARM_UP], compile_cache)
    if command is None and not opted_in:
        print(f"  not prepared: no sandbox here ({why_not}), and the compile cache it would load from is one that "
              f"runs write ({compile_cache}); train.py builds the same in its first run (to build it here, "
              f"unsandboxed, set RESEARCH_LOOP_UNSANDBOXED=1: runs then have no sandbox either)", flush=True)
        return True
    if command is None:  # the user accepts runs without a sandbox: they could write anything this loads
        failure = _compiling_fails_in_process(compiling)
    else:
        failure = _compiling_fails_in_sandbox(command, compile_cache)
    if failure is None:
        print(f"  compiler ready in {time.time() - started:.1f}s -> {compile_cache}", flush=True)
    else:
        print(f"  {failure}", flush=True)
    return True


def measure_peak_once() -> bool:
    """The machine's matmul peak for MFU (nanochat/platform.py), measured here once into the compile cache, which runs
    read but cannot write (a run compiles in a folder of its own: without it every new program's first run measured
    again, a few seconds each); True if it measured. A known GPU's is its datasheet's."""
    from nanochat import platform
    if platform.known_peak():
        return False
    print("Measuring the matmul peak for MFU (once per machine)...", flush=True)
    print(f"  {platform.peak_flops() / 1e9:.1f} GFLOP/s", flush=True)
    return True


def compiler_sandbox(command: list[str], compile_cache: Path) -> tuple[list[str] | None, str, bool]:
    """(the command in the runs' sandbox, or None; why none; whether the user opted in to running
    without one). The sandbox is mcp_server/scripts/sandbox.py's, as a run gets it but narrower: the
    repository and its environment read-only, the compile cache writable, the prepared cache hidden
    (data, tokenizer, the offline seed: the warm-up reads none of them, and code planted in the
    compile cache could copy them there for the next run), as are the data sets' sources and what a
    cluster node hides from its runs (RESEARCH_LOOP_HIDE, a JSON list)."""
    try:
        from mcp_server.scripts import harness_eval, sandbox
    except ImportError:  # a checkout without the plugin's scripts
        return None, "this checkout has no mcp_server/scripts/sandbox.py", False
    cache = cache_dir().resolve()
    compile_cache.mkdir(parents=True, exist_ok=True)  # bound writable: it must exist
    hidden = [str(cache), *json.loads(os.environ.get(sandbox.HIDE_ENV) or "[]")]
    hidden += [path for path in harness_eval.hidden_from_runs(cache, read_record())
               if not Path(path).resolve().is_relative_to(cache)]
    # the prepared cache holds the writable compile cache: sandbox.hidden hides it between the read-only and the
    # writable binds, so the warm-up writes the compile cache itself, not the sandbox's memory
    spec = {"readonly": [str(REPO), sys.prefix], "writable": [str(compile_cache.resolve())], "hidden": hidden}
    wrapped, kind = sandbox.wrap(command, spec, str(REPO))
    if kind is None:
        return None, sandbox.usable()[2], sandbox.opted_in()
    return wrapped, "", False


def _compiling_fails_in_sandbox(command: list[str], compile_cache: Path) -> str | None:
    """Runs the sandboxed warm-up: None, or what went wrong (a line)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(compile_cache), AUTORESEARCH_CACHE=str(cache_dir()))
    try:
        done = subprocess.run(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace", timeout=COMPILER_WARM_UP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return (f"the compiler's warm-up took more than {COMPILER_WARM_UP_TIMEOUT_S} s and was stopped: "
                "train.py builds it in its first run")
    from nanochat.compile import COMPILING_FAILS
    if done.returncode == 0:
        return None
    if done.returncode == COMPILING_FAILS:
        why = (done.stdout.strip().splitlines() or ["no reason given"])[-1]
        return f"compiling does not work here ({why}): train.py will train eager"
    last = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or [""])[-1][:300]
    return (f"the compiler's warm-up in the runs' sandbox failed (exit {done.returncode}: {last}): "
            "train.py builds it in its first run")


def _compiling_fails_in_process(compiling) -> str | None:
    why = compiling.compiling_problem()
    return None if why is None else f"compiling does not work here ({why}): train.py will train eager"


def _foreign_shards(dataset: str) -> list:
    """Shards in the data folder that did not come from this data set."""
    return [path for path in datasets.list_shards() if datasets.shard_source(path) != dataset]


def _refuse(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def prepare(profile_name: str, dataset_request: str, num_shards: int, force: bool) -> int:
    record = None if force else read_record()
    if profile_name == "auto":
        profile_name = record["profile"] if record else detect_profile()
    profile = PROFILES[profile_name]
    dataset = choose_dataset(dataset_request, profile_name, record)
    wanted = {"profile": profile_name, "dataset": dataset, "budget_clock": profile["budget_clock"],
              **{key: profile[key] for key in RECORDED_CONSTANTS}}
    seed = datasets.offline_seed() if dataset == "offline" else None
    reselect = False
    if seed:
        wanted["offline_selection"] = datasets.selection_digest(seed)
        # prepared before the selection was secret: its validation files were public, so they are drawn again
        reselect = bool(record) and "offline_selection" not in record
    print(f"Cache: {cache_dir()}\nProfile: {profile_name}  Data set: {dataset}", flush=True)
    if record and record.get("profile") == profile_name and record.get("budget_clock") != profile["budget_clock"]:
        if "budget_clock" not in record:
            # prepared before budget clocks existed: a research run set up on it sees the record change
            record["budget_clock"] = profile["budget_clock"]
            if profile["budget_clock"] == "flops":
                record["flops_per_budget_second"] = flops_clock_rate(profile)
            _write_record(record)
            print(f"Recorded the profile's budget clock ({profile['budget_clock']}) in {prepared_record_path()}.")
        else:  # the clock a research branch was set up on stays, so its results stay comparable
            wanted["budget_clock"] = record["budget_clock"]
            print(f"Keeping the recorded {record['budget_clock']} budget clock (the {profile_name} profile's is now "
                  f"{profile['budget_clock']}; `{PREPARE_COMMAND} --profile {profile_name} --force` switches, and a "
                  "research branch's results from before it are then not comparable).")
    if record:
        differs = {k: (record.get(k), v) for k, v in wanted.items()
                   if record.get(k) != v and not (reselect and k == "offline_selection")}
        if differs:
            return _refuse(f"{cache_dir()} is already prepared differently: "
                           + ", ".join(f"{k} is {old!r}, asked {new!r}" for k, (old, new) in differs.items())
                           + f".\nTo replace it run `{PREPARE_COMMAND} --profile {profile_name} --dataset "
                           f"{dataset_request} --force`, or set AUTORESEARCH_CACHE to another folder to keep both.")
        problem = (("its offline selection was public (runs could rebuild the validation text)" if reselect else None)
                   or data_problem() or tokenizer_problem(profile["vocab_size"]))
        more_shards = dataset == "climbmix" and num_shards > len(datasets.split_paths("train"))
        if problem is None and not more_shards:
            built = prepare_compiler_once()
            if not (measure_peak_once() or built):
                print("Already prepared with these choices: nothing to do.")
            return 0
        if problem:
            print(f"Prepared before, but: {problem}\nRepairing...", flush=True)
    else:
        foreign = _foreign_shards(dataset)
        if foreign and not force:
            return _refuse(f"{data_dir()} holds {len(foreign)} data shards that are not from '{dataset}' and that "
                           f"no prepare run recorded (e.g. {foreign[0].name}). Pass --force to replace them, or "
                           f"set AUTORESEARCH_CACHE to another folder.")
        prepared_record_path().unlink(missing_ok=True)
        for path in foreign:
            path.unlink()
    started = time.time()
    print(f"Writing data shards to {data_dir()}...", flush=True)
    write_data(dataset, profile, num_shards, seed)
    if record is None or reselect or tokenizer_problem(profile["vocab_size"]):
        train_tokenizer(profile["vocab_size"])
    if wanted["budget_clock"] == "flops":
        wanted["flops_per_budget_second"] = (record or {}).get("flops_per_budget_second") or flops_clock_rate(profile)
    _write_record(dict(wanted, num_train_shards=len(datasets.split_paths("train")), val_shard=datasets.pin(),
                       python=sys.version.split()[0], prepared_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
    prepare_compiler_once()
    measure_peak_once()
    print(f"Done in {time.time() - started:.1f}s. Next: `uv run train.py`.")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Prepare data and train the tokenizer for autoresearch.")
    parser.add_argument("--profile", default=os.environ.get("AUTORESEARCH_PROFILE", "auto"),
                        choices=["auto", *PROFILES], help="hardware profile (default: auto-detect)")
    parser.add_argument("--dataset", default="auto",
                        help="auto | climbmix | tinystories | offline | a folder of .txt/.jsonl/.parquet "
                             "(default auto: climbmix on a CUDA GPU with network, else offline)")
    parser.add_argument("--num-shards", type=int, default=CLIMBMIX_TRAIN_SHARDS,
                        help="climbmix training shards to download (the validation shard comes too)")
    parser.add_argument("--force", action="store_true",
                        help="replace whatever is prepared in the cache with these choices")
    args = parser.parse_args(argv)
    try:
        return prepare(args.profile, args.dataset, args.num_shards, args.force)
    except KeyboardInterrupt:
        print("\nInterrupted: run the same command again to continue.", file=sys.stderr)
        return 130
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
