"""torch.compile for train.py: whether to compile, a compile cache that outlives the run, and what
the run reports about compiling (seconds, cache warm or cold, graphs compiled late).

The cache is <cache>/compile (beside the data, see nanochat/cache.py), so it survives a reboot.
Inductor's FX-graph cache and AOTAutograd's cache key a graph by its structure, shapes and dtypes,
not by train.py's text: a second run of the same model, or a run whose edit changed only a
learning rate or a schedule constant, loads every compiled graph from there instead of compiling
it. What Inductor builds once per machine (precompiled C++ headers, its checks of the CPU) is
built by prepare.py (prepare_compiler, in a process of its own in the runs' sandbox: runs write
the cache, and Inductor unpickles its entries), so even the first run of a new model compiles only
its own graphs. AUTORESEARCH_COMPILE=0 trains eager; so does any platform where compiling fails, after
one line in the log that says why. An out-of-memory is no such failure: it is raised, and said.
"""
import hashlib
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nanochat.cache import cache_dir

SWITCH = "AUTORESEARCH_COMPILE"  # "0": train eager
# in the headers' key: built since runs compile in folders of their own (stop 53). Before, any run could write the
# shared cache's headers, which every later compile includes: an upgraded cache builds them again at prepare
HEADERS_SINCE = "runs-read-only"
COMPILING_FAILS = 3  # prepare_compiler_here's exit status where compiling does not work


def compile_cache_dir():
    return cache_dir() / "compile"


def compile_cache_dir_now():
    """Where Inductor caches this run's graphs (TORCHINDUCTOR_CACHE_DIR, set below unless given)."""
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def headers_dir() -> Path:
    """Inductor's precompiled C++ headers for this environment's torch: prepare.py's, in the harness's compile
    cache (read-only to a run under the research loop, which compiles in a folder of its own inside it), else
    this process's compile folder's. A clone at another path shares the cache but not the venv: headers built
    against the other venv's torch do not serve this one, and with one folder for all, prepare.py found
    them and left the build to the first run's start-up."""
    environment = hashlib.sha256(f"{torch.__file__}|{torch.__version__}|{HEADERS_SINCE}".encode()).hexdigest()[:12]
    prepared = compile_cache_dir() / "precompiled_headers" / environment
    # a run's own folder lies inside the harness's cache; a folder elsewhere (a benchmark's fresh one) is truly cold
    inside = compile_cache_dir_now().resolve().is_relative_to(compile_cache_dir().resolve())
    return prepared if inside and prepared.is_dir() else compile_cache_dir_now() / "precompiled_headers" / environment


# Read by Inductor when it first compiles, so setting it at import is in time; Triton's cache (CUDA)
# lives inside it. An explicit TORCHINDUCTOR_CACHE_DIR (a benchmark's fresh folder) wins.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))

import torch  # noqa: E402  (after the cache location is set)

from nanochat.platform import DEVICE  # noqa: E402

if DEVICE.type != "cuda" and "triton" not in sys.modules:
    # Triton generates GPU kernels only. Without a GPU it is not imported, as with torch's CPU
    # wheels: that saves its import, and the hundreds of lines its bindings print at exit about
    # objects that train.py's frozen garbage collector never freed.
    sys.modules["triton"] = None
    logging.getLogger("torch.utils.flop_counter").setLevel(logging.ERROR)  # "triton not found"
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"


def switched_off() -> bool:
    return os.environ.get(SWITCH, "1").strip() == "0"


def configure_inductor():
    """Inductor's caches in the compile cache, and its C++ built the fastest way here. Imported only
    to compile: it adds seconds to an eager start-up."""
    import torch._dynamo.utils
    import torch._functorch.config
    import torch._inductor.codecache
    import torch._inductor.config
    build_halves_at_once()
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    # Inductor keeps its precompiled C++ headers in the temp folder whatever the cache dir says;
    # beside the rest they survive a reboot, and a fresh cache dir is truly cold
    if hasattr(torch._inductor.codecache, "_HEADER_DIR"):
        torch._inductor.codecache._HEADER_DIR = str(headers_dir())
        torch._inductor.codecache._HEADER_LOCK_DIR = str(compile_cache_dir_now() / "locks" / "headers")  # writable


def describe(error: Exception) -> str:
    """An exception in one line: its type and the first line of its message."""
    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first_line}"


def out_of_memory(error: BaseException) -> BaseException | None:
    """The out-of-memory error, as raised or as the cause of a compile error Dynamo or Inductor wrapped
    it in; None for any other error."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    by_type = [e for e in chain if isinstance(e, torch.OutOfMemoryError)]
    by_text = [e for e in chain if "out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower()]
    return (by_type or by_text or [None])[0]


class Compiler:
    """Wraps functions and modules in torch.compile, or leaves them eager when compiling is off or
    has failed once. A failure (no C++ compiler, an unsupported platform) surfaces at the first
    call, when the graph is compiled: that call, and every later one, then runs eager."""

    def __init__(self):
        self.off_reason = f"{SWITCH}=0" if switched_off() else None
        self._graphs_at_mark = 0
        if self.enabled:
            configure_inductor()

    @property
    def enabled(self) -> bool:
        return self.off_reason is None

    def __call__(self, fn, **options):
        return _Compiled(self, fn, with_cpu_options(options)) if self.enabled else fn

    def fail(self, error: Exception):
        if self.enabled:
            self.off_reason = f"compile failed: {type(error).__name__}"
            print(f"compile failed ({describe(error)}): training eager", flush=True)
            torch._dynamo.reset()

    # --- what the summary reports --------------------------------------------------------------
    def graphs(self) -> int:
        """Graphs compiled so far in this process (each fresh or loaded from the cache)."""
        return _counters()["stats"]["unique_graphs"] if _dynamo_loaded() else 0

    def mark_warm(self):
        """Call once the warm-up is over: graphs compiled after this are counted as late."""
        self._graphs_at_mark = self.graphs()

    def late_graphs(self) -> int:
        return self.graphs() - self._graphs_at_mark

    def seconds(self) -> float:
        """Seconds spent compiling (tracing, and compiling or loading graphs, backward included)."""
        if not _dynamo_loaded():
            return 0.0
        return torch._dynamo.utils.calculate_time_spent().get("total_wall_time", 0.0)

    def cache_state(self) -> str:
        """warm: every graph came from the cache; cold: none did; partial: some did; or off (why)."""
        if not self.enabled:
            return f"off ({self.off_reason})"
        counters = _counters()
        hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
        misses = counters["inductor"]["fxgraph_cache_miss"] + counters["aot_autograd"]["autograd_cache_miss"]
        if hits and not misses:
            return "warm"
        if misses and not hits:
            return "cold"
        return "partial" if hits else "unused"


def with_cpu_options(options: dict) -> dict:
    """torch.compile's options, with what compiles fastest on the CPU where Inductor compiles C++."""
    if DEVICE.type == "cpu" and "mode" not in options and options.get("backend", "inductor") == "inductor":
        # One C++ module per graph instead of one per kernel: on 2 cores a cold compile of
        # train.py's model took half the time (gcc starts, and loads torch's headers, once per
        # module), and trains as fast. Built in two parts: the kernels at -O3, the wrapper that
        # calls them (most of the code) at -O1, which cut gcc's time per model from 24 s to 15 s
        # on a 2-core Zen 4, at the same step time
        options = dict(options, options={"cpp_wrapper": True, "cpp_wrapper_build_separate": True,
                                         **options.get("options", {})})
    return options


def build_halves_at_once():
    """Inductor builds a graph's two C++ halves (wrapper, kernels) one after the other, then links
    them; here both compile at once, one core each, which takes 4 s off a cold compile of train.py's
    model on 2 cores. Left as it is where this torch has no such step (the private API moved)."""
    import torch._inductor.codecache as codecache
    from torch.utils._filelock import FileLock
    one_by_one = getattr(codecache, "_worker_compile_cpp", None)
    if one_by_one is None or getattr(one_by_one, "at_once", False):
        return

    def build(builder):
        if not os.path.exists(builder.get_target_file_path()):
            builder.build()

    def at_once(lock_path, builders):
        if len(builders) != 3:  # one module, or a shape this was not written for
            return one_by_one(lock_path, builders)
        *halves, linker = builders
        with FileLock(lock_path, timeout=codecache.LOCK_TIMEOUT):
            with ThreadPoolExecutor(len(halves)) as pool:
                list(pool.map(build, halves))
            build(linker)

    at_once.at_once = True
    codecache._worker_compile_cpp = at_once


def compiler_needs_preparing() -> bool:
    """Whether train.py compiles C++ here (the CPU, compiling on) and what prepare_compiler builds is
    not in the cache yet."""
    return DEVICE.type == "cpu" and not switched_off() and not any(headers_dir().glob("*.gch"))


def prepare_compiler():
    """Compile a small stand-in once, so that what Inductor builds once per machine and torch version
    (its checks of the CPU's vector instructions, the precompiled C++ headers: a cold start-up of
    train.py's model on a 2-core Zen 4 takes 53 s without them, 29 s with) is in the cache before
    the first run; a new model then compiles only its own graphs. Raises what torch.compile raises
    where compiling does not work."""
    from nanochat.platform import autocast
    configure_inductor()
    layer = torch.nn.Linear(64, 64)
    compiled = torch.compile(lambda x: torch.nn.functional.gelu(layer(x)).float().square().mean(),
                             **with_cpu_options({"dynamic": False}))
    with autocast():
        compiled(torch.randn(8, 64)).backward()
    torch._dynamo.reset()


def compiling_problem() -> str | None:
    """prepare_compiler, then None; or why compiling does not work here."""
    try:
        prepare_compiler()
    except Exception as error:  # noqa: BLE001  (train.py then trains eager, and says so)
        return describe(error)
    return None


def prepare_compiler_here() -> int:
    """prepare_compiler as a process of its own (prepare.py starts it in the runs' sandbox: the compile
    cache it reads is one that runs write): 0, or COMPILING_FAILS after a line that says why."""
    why = compiling_problem()
    if why is None:
        return 0
    print(why, flush=True)
    return COMPILING_FAILS


def _dynamo_loaded() -> bool:
    return "torch._dynamo.utils" in sys.modules


def _counters():
    return torch._dynamo.utils.counters


class _Compiled:
    """A compiled function or module that falls back to its eager self for good if compiling fails."""

    def __init__(self, compiler, fn, options):
        self._compiler, self._eager = compiler, fn
        self._orig_mod = fn  # torch.compile's name for the eager module: the harness exports that one
        self._compiled = torch.compile(fn, **options)

    def __call__(self, *args, **kwargs):
        if self._compiler.enabled:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as error:  # noqa: BLE001  (a user error re-raises from the eager call)
                oom = out_of_memory(error)
                if oom:  # eager at the same batch would need more memory still
                    print(f"out of memory ({describe(oom)}): lower DEVICE_BATCH_SIZE (TOTAL_BATCH_SIZE can stay: "
                          "more gradient accumulation steps)", flush=True)
                    raise
                self._compiler.fail(error)
        return self._eager(*args, **kwargs)

    def __getattr__(self, name):  # a module's parameters, train/eval, ...
        return getattr(self._eager, name)
