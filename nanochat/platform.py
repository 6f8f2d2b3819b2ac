"""The machine training runs on: device, compute dtype, autocast, timing, memory and peak FLOPs.

Everything device-specific lives here so that train.py runs on CUDA, Apple MPS and the CPU
without edits.
"""
import contextlib
import gc
import json
import os
import platform as host
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# bf16 dense tensor-core peaks (FLOP/s, no sparsity) for MFU, matched as substrings of the CUDA
# device name, most specific first. A GPU not listed gets a measured peak, like the CPU.
GPU_PEAK_FLOPS = [
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.5e12),  # SXM
    ("GH200", 989.5e12),
    ("H200 NVL", 835e12),
    ("H200", 989.5e12),  # SXM
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A6000", 154.8e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("4090", 165.2e12),  # GeForce: fp32 accumulate runs at half the fp16-accumulate rate
    ("3090", 71e12),
]
# The oldest Linux driver each CUDA major version of torch's wheels runs on (NVIDIA's minor-version
# compatibility: any 12.x runtime on an R525 driver, any 13.x on R580).
CUDA_MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
# torch builds for older drivers, on PyTorch's own package index: (oldest driver, index suffix)
TORCH_BUILDS = [("580.65.06", "cu130"), ("525.60.13", "cu126"), ("450.80.02", "cu118")]
DEVICE_ENV = "AUTORESEARCH_DEVICE"  # "cpu": train on the CPU although a GPU is here
DTYPE_ENV = "AUTORESEARCH_DTYPE"  # the compute dtype instead of the platform's choice (checks of a platform)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BF16_CAPABILITY = (8, 0)  # CUDA compute capability from which bf16 runs on the tensor cores
MIG_SLICES = 7  # compute slices of an A100/H100/H200: a MIG instance "3g.40gb" has 3 of them
PEAK_MATMUL_SIZE = 2048  # square matmul used to measure a peak: large enough to saturate the cores
PEAK_MEASURE_SECONDS = 1.0  # per repetition; the best of PEAK_REPEATS is the peak
PEAK_FILE = "cpu_peak_flops.json"  # the measured peaks, in a compile folder
PEAK_REPEATS = 3


def get_device() -> torch.device:
    """CUDA, else MPS, else the CPU; never the CPU in silence where an NVIDIA GPU is here that this
    torch cannot use (a wheel built for a newer driver): that stops with the reason and the fix."""
    wanted = os.environ.get(DEVICE_ENV, "").strip()
    if wanted not in ("", "cpu"):
        sys.exit(f"{DEVICE_ENV}={wanted!r}: only 'cpu' is understood (unset it to use the GPU, if any).")
    if wanted == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    problem = unusable_gpu()
    if problem:
        sys.exit(problem)
    return torch.device("cpu")


def nvidia_gpu() -> tuple[str, str] | None:
    """(name, driver version) of the first NVIDIA GPU nvidia-smi shows, ("an NVIDIA GPU", "unknown")
    where only the kernel driver shows one, None where there is none or CUDA_VISIBLE_DEVICES hides them."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return None  # hidden on purpose: the CPU is wanted
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and "," in out.stdout:
                name, driver = out.stdout.strip().splitlines()[0].rsplit(",", 1)
                return name.strip(), driver.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    if not Path("/proc/driver/nvidia/gpus").is_dir():
        return None
    try:  # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  ..."
        words = Path("/proc/driver/nvidia/version").read_text().split()
        driver = next(w for w in words if w.count(".") >= 1 and w.replace(".", "").isdigit())
    except (OSError, StopIteration):
        driver = "unknown"
    return "an NVIDIA GPU", driver


def _version(text: str) -> tuple:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def unusable_gpu() -> str | None:
    """Why torch cannot use the NVIDIA GPU that is here, and what to do; None where there is none."""
    gpu = nvidia_gpu()
    if gpu is None:
        return None
    name, driver = gpu
    cuda = torch.version.cuda
    head = f"{name} (driver {driver}) is here, but torch {torch.__version__} cannot use it"
    anyway = f"To train on the CPU anyway, set {DEVICE_ENV}=cpu."
    if cuda is None:
        return f"{head}: it is a build without CUDA. Install a CUDA build ({torch_build_advice(driver)}). {anyway}"
    needed = CUDA_MIN_DRIVER.get(int(cuda.split(".")[0]))
    if needed and driver != "unknown" and _version(driver) < _version(needed):
        return (f"{head}: it is built for CUDA {cuda} (torch.version.cuda), which needs driver {needed} or newer. "
                f"Update the driver, or install a torch built for this driver ({torch_build_advice(driver)}). "
                f"{anyway}")
    return (f"{head} (built for CUDA {cuda}, torch.version.cuda; driver {needed or 'unknown'} or newer needed). "
            "Check that CUDA_VISIBLE_DEVICES names a GPU that exists, that /dev/nvidia* can be opened, and that "
            "libcuda.so is found (LD_LIBRARY_PATH); `python -c 'import torch; torch.cuda.init()'` says why. "
            f"{anyway}")


def torch_build_advice(driver: str) -> str:
    """How to get a torch wheel that runs on this driver: uv pinned to PyTorch's index for it."""
    if driver == "unknown":
        builds = ", ".join(f"{suffix} for driver {oldest} or newer" for oldest, suffix in TORCH_BUILDS)
        return f"PyTorch's builds: {builds}; pin one in pyproject.toml with uv's [[tool.uv.index]], then `uv sync`"
    suffix = next((build for oldest, build in TORCH_BUILDS if _version(driver) >= _version(oldest)), None)
    if suffix is None:
        return f"driver {driver} is too old for any torch build: update it to R525 or newer"
    return (f"for driver {driver}: PyTorch's {suffix} build. In pyproject.toml add "
            f"[[tool.uv.index]] name = \"pytorch-{suffix}\", url = \"https://download.pytorch.org/whl/{suffix}\", "
            f"explicit = true, and under [tool.uv.sources] torch = {{ index = \"pytorch-{suffix}\" }}; "
            "then `uv lock && uv sync`")


DEVICE = get_device()

if DEVICE.type == "cuda":  # fp32 matmuls (the few outside autocast) on TF32 tensor cores, as upstream
    torch.set_float32_matmul_precision("high")

# CPU: one thread per CPU this process may use: torch counts the machine's cores, which
# overcommits under a CPU mask (taskset, containers).
if DEVICE.type == "cpu" and hasattr(os, "sched_getaffinity"):
    torch.set_num_threads(len(os.sched_getaffinity(0)))

# bf16 on CUDA (tensor cores) and on CPUs with native bf16: on this project's reference CPU (AMD
# Zen4, avx512_bf16, 2 cores) bf16 autocast trains the CPU profile at 1.9x the tokens/sec of fp32
# (4.0k vs 2.1k tok/s measured side by side; bf16 matmuls run at ~2.2x the fp32 rate). CPUs
# without native bf16 would emulate it slowly, so they train in fp32. On MPS, fp32 is the safe
# choice (bf16 autocast support there varies by macOS version).
def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: Apple silicon has native bf16
        return host.machine() == "arm64" and sys.platform == "darwin"
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_compute_dtype(capability: tuple[int, int]) -> torch.dtype:
    """bf16 where the tensor cores have it (compute capability 8.0 on: A100, H100, RTX 30xx and later);
    fp16 before (V100, T4, RTX 20xx: tensor cores in fp16 only), trained with loss scaling."""
    return torch.bfloat16 if capability >= BF16_CAPABILITY else torch.float16


def _compute_dtype() -> torch.dtype:
    wanted = os.environ.get(DTYPE_ENV, "").strip()
    if wanted:
        if wanted not in DTYPES:
            sys.exit(f"{DTYPE_ENV}={wanted!r}: use one of {', '.join(DTYPES)} (or unset it: the platform's choice).")
        return DTYPES[wanted]
    if DEVICE.type == "cuda":
        return cuda_compute_dtype(torch.cuda.get_device_capability())
    if DEVICE.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


COMPUTE_DTYPE = _compute_dtype()


def autocast():
    """Context in which the model's matmuls run in COMPUTE_DTYPE (a no-op for fp32)."""
    if COMPUTE_DTYPE == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=DEVICE.type, dtype=COMPUTE_DTYPE)


def describe_dtype() -> str:
    """The compute dtype as the run's output states it."""
    name = str(COMPUTE_DTYPE).removeprefix("torch.")
    return f"{name} with loss scaling" if COMPUTE_DTYPE == torch.float16 else name


def grad_scaler():
    """fp16's loss scaling (its gradients underflow without it); a pass-through in bf16 and fp32."""
    return torch.amp.GradScaler(DEVICE.type, enabled=COMPUTE_DTYPE == torch.float16)


# MPS reports only what its driver holds now (the allocator's cache included, so the most a step
# needed stays held until it is emptied): the most seen at the waits for the device is the peak
_mps_peak = [0]


def synchronize():
    """Wait for queued device work, so wall-clock timings mean something."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    elif DEVICE.type == "mps":
        torch.mps.synchronize()
        _mps_peak[0] = max(_mps_peak[0], torch.mps.driver_allocated_memory())


def peak_memory_mb() -> float:
    """Peak memory of training in MiB: allocated device memory on CUDA and MPS; on the CPU, where
    the model lives in host memory, the process's peak resident set (what can run out)."""
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    if DEVICE.type == "mps":
        return max(_mps_peak[0], torch.mps.driver_allocated_memory()) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def release_memory():
    """Hand back what training no longer holds: Python's garbage, and the caching allocator's reserve,
    which the harness's evaluation, another process on the same device, could not use otherwise."""
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    elif DEVICE.type == "mps":
        torch.mps.empty_cache()


def cpu_seconds_per_thread() -> float:
    """The CPU profile's clock (prepare.training_clock): a busy neighbour does not slow it down."""
    return time.process_time() / torch.get_num_threads()


def measure_matmul_flops(dtype=COMPUTE_DTYPE, device=DEVICE) -> float:
    """Best sustained FLOP/s of a large square matmul in `dtype`: the machine's practical peak. On the
    CPU per CPU-second of each thread, as the CPU profile's budget is spent, so MFU stays below 100%
    and a peak measured on a busy machine is not too low."""
    n = PEAK_MATMUL_SIZE
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm up kernels, caches and clocks
        a @ b
    return _best_rate(lambda: a @ b, 2 * n**3, torch.device(device).type)


def _best_rate(work, flops: float, device_type: str) -> float:
    """Best FLOP/s of `work` (`flops` each call) over PEAK_REPEATS spells of PEAK_MEASURE_SECONDS; on the
    CPU per CPU-second of each thread (the CPU profile's clock), elsewhere per wall second."""
    clock = cpu_seconds_per_thread if device_type == "cpu" else time.perf_counter
    synchronize()
    best = 0.0
    for _ in range(PEAK_REPEATS):
        calls, t0 = 0, clock()
        while clock() - t0 < PEAK_MEASURE_SECONDS:
            work()
            calls += 1
            synchronize()
        best = max(best, flops * calls / (clock() - t0))
    return best


def measure_model_flops(rows: int, seq_len: int, width: int, depth: int, vocab: int) -> float:
    """Best sustained FLOP/s of training-shaped work on DEVICE: forward and backward, under autocast,
    through `depth` blocks (causal attention, a relu^2 MLP, RMS norms) and an output head at a small
    model's shapes, FLOPs counted as train.py counts them. Where a CPU's matrix units (AMX) multiply
    large matrices far faster than they cast, normalise and add, a large matmul's peak overstates
    the rate a small model trains at (6x on a 2-core Xeon); this does not."""
    heads = max(1, width // 128)

    def weight(fan_in, fan_out):
        return (torch.randn(fan_in, fan_out, device=DEVICE) * fan_in**-0.5).requires_grad_()

    blocks = [[weight(width, 3 * width), weight(width, width), weight(width, 4 * width), weight(4 * width, width)]
              for _ in range(depth)]
    head = weight(width, vocab)
    x0 = torch.randn(rows, seq_len, width, device=DEVICE)
    targets = torch.randint(vocab, (rows * seq_len,), device=DEVICE)

    def split_heads(t):
        return t.view(rows, seq_len, heads, -1).transpose(1, 2)

    def step():
        with autocast():
            x = x0
            for qkv, proj, up, down in blocks:
                q, k, v = (F.rms_norm(x, (width,)) @ qkv).split(width, dim=-1)
                y = F.scaled_dot_product_attention(split_heads(q), split_heads(k), split_heads(v), is_causal=True)
                x = x + y.transpose(1, 2).reshape(rows, seq_len, width) @ proj
                x = x + F.relu(F.rms_norm(x, (width,)) @ up).square() @ down
            logits = F.rms_norm(x, (width,)) @ head
        F.cross_entropy(logits.float().view(-1, vocab), targets).backward()
        for w in (head, *(w for block in blocks for w in block)):
            w.grad = None

    flops = (6 * depth * 12 * width**2 + 6 * width * vocab + depth * 12 * width * seq_len) * rows * seq_len
    step()  # warm up kernels, caches and clocks
    return _best_rate(step, flops, DEVICE.type)


def _cache_dir() -> Path:
    return Path(os.environ.get("AUTORESEARCH_CACHE", Path.home() / ".cache" / "autoresearch"))


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    if DEVICE.type == "mps":
        return f"mps {host.machine()} {host.processor()}"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return host.processor() or host.machine()


def _peak_cache_path() -> Path:
    # beside the compiled graphs (TORCHINDUCTOR_CACHE_DIR: a run's own folder under the research loop, kept for its
    # program), the one folder a sandboxed run may write
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or _cache_dir() / "compile") / PEAK_FILE


def _shared_peak_path() -> Path:
    # the harness's compile cache, where prepare.py measures once (read-only to runs: each new program's first run,
    # whose compile folder starts empty, measured again)
    return _cache_dir() / "compile" / PEAK_FILE


def _peak_cache_key(dtype) -> str:
    clock = " | per CPU-second" if DEVICE.type == "cpu" else ""  # peaks cached before were per wall second
    return (f"{device_name()} | {DEVICE.type} | threads={torch.get_num_threads()} | "
            f"{str(dtype).removeprefix('torch.')}{clock}")


def _read_peak_cache() -> dict:
    """The peaks measured: prepare's, then this process's compile folder's over them."""
    table = {}
    for path in dict.fromkeys((_shared_peak_path(), _peak_cache_path())):
        try:
            table |= json.loads(path.read_text())
        except (OSError, ValueError, TypeError):  # none yet, or unreadable: measure again
            pass
    return table


def save_peak_flops(flops: float, dtype=COMPUTE_DTYPE) -> bool:
    """Record a measured peak for this machine (benchmarks store the one they measured).
    False when the cache is read-only, as it is inside the research loop's sandbox: the
    measurement still counts for this run, the next run just measures again."""
    table = _read_peak_cache()
    table[_peak_cache_key(dtype)] = flops
    path = _peak_cache_path()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(table, indent=1) + "\n")
        tmp.replace(path)  # atomic: concurrent runs never read half a file
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
    return True


def gpu_peak_flops(name: str) -> float | None:
    """The datasheet peak of a CUDA device by its name (the first entry that matches, most specific
    first), scaled to a MIG instance's share of the card; None for a card not listed."""
    flops = next((flops for key, flops in GPU_PEAK_FLOPS if key in name), None)
    mig = re.search(r"MIG (\d+)g\.", name)
    return flops * int(mig.group(1)) / MIG_SLICES if flops and mig else flops


def known_peak(dtype=COMPUTE_DTYPE) -> float | None:
    """The peak FLOP/s with no measuring: a known GPU's datasheet figure, or a peak measured before; else None."""
    if DEVICE.type == "cuda" and (flops := gpu_peak_flops(device_name())):
        return flops
    return _read_peak_cache().get(_peak_cache_key(dtype))


def peak_flops(dtype=COMPUTE_DTYPE) -> float:
    """Peak FLOP/s for MFU: the datasheet figure for known GPUs, else a matmul peak measured once
    per (device, threads, dtype) and cached in cpu_peak_flops.json (prepare.py's, in the harness's compile cache, or
    the compile folder's), so only the first run pays the few seconds of measuring."""
    known = known_peak(dtype)
    if known:
        return known
    flops = measure_matmul_flops(dtype)
    save_peak_flops(flops, dtype)
    return flops
