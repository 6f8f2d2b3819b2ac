"""train.py end to end on the CPU: a real (few-second) training run, its progress lines and summary
block, and the fast fail on a NaN loss."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth"]
# upstream's progress line, field for field
PROGRESS_RE = re.compile(r"^step (\d{5}) \((\d+\.\d)%\) \| loss: (\d+\.\d{6}) \| lrm: \d+\.\d\d \| dt: \d+ms \| "
                         r"tok/sec: [\d,]+ \| mfu: \d+\.\d% \| epoch: \d+ \| remaining: \d+s\s*$")
# train.py as it is but tiny, for paths that run slowly on the CPU (fp16 matmuls are emulated there)
SMALL_MODEL = {'\nDEPTH = TRAIN_DEFAULTS["depth"]': "\nDEPTH = 1",
               '\nTOTAL_BATCH_SIZE = TRAIN_DEFAULTS["total_batch_size"]': "\nTOTAL_BATCH_SIZE = 512",
               '\nDEVICE_BATCH_SIZE = TRAIN_DEFAULTS["device_batch_size"]': "\nDEVICE_BATCH_SIZE = 2"}
UNIFORM_BOUND_SCRIPT = """
import json, math
from prepare import EVAL_TOKENS, MAX_SEQ_LEN, TRAIN_DEFAULTS, VOCAB_SIZE, Tokenizer, make_dataloader
tok = Tokenizer.from_directory()
B = TRAIN_DEFAULTS["device_batch_size"]
loader = make_dataloader(tok, B, MAX_SEQ_LEN, "val", device="cpu")
tokens = nbytes = 0
for _ in range(EVAL_TOKENS // (B * MAX_SEQ_LEN)):  # the same targets evaluate_bpb scores
    _, y, _ = next(loader)
    b = tok.token_bytes[y.reshape(-1)]
    tokens += int((b > 0).sum()); nbytes += int(b.sum())
# a uniform guess over the vocabulary costs log2(V) bits per token
print(json.dumps(dict(uniform_bpb=math.log2(VOCAB_SIZE) * tokens / nbytes, depth=TRAIN_DEFAULTS["depth"],
                      total_batch_size=TRAIN_DEFAULTS["total_batch_size"])))
"""


def run_train(script, env, cwd, timeout=300):
    result = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, timeout=timeout)
    # decoded by hand: text mode would turn the progress lines' '\r' into newlines
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def parse_summary(stdout):
    block = stdout.split("\n---\n", 1)[1]
    return dict((key.strip(), value.strip()) for key, _, value in
                (line.partition(":") for line in block.splitlines() if ":" in line))


@pytest.fixture(scope="module")
def trained(prepared_env, repo_root):
    result = run_train(repo_root / "train.py", prepared_env, repo_root)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_summary_block_is_complete_and_sane(trained, prepared_env, repo_root):
    summary = parse_summary(trained.stdout)
    assert list(summary)[:len(SUMMARY_KEYS)] == SUMMARY_KEYS
    for key in SUMMARY_KEYS:  # upstream's alignment: values start in column 19
        assert re.search(rf"^{key}:\s+\S", trained.stdout, re.M)
        assert len(re.search(rf"^{key}:\s+", trained.stdout, re.M).group(0)) == 18
    facts = json.loads(subprocess.run([sys.executable, "-c", UNIFORM_BOUND_SCRIPT], cwd=repo_root,
                                      env=prepared_env, capture_output=True, text=True, check=True).stdout)
    val_bpb = float(summary["val_bpb"])
    assert math.isfinite(val_bpb) and 0 < val_bpb < facts["uniform_bpb"], (val_bpb, facts)
    budget = float(prepared_env["AUTORESEARCH_TIME_BUDGET"])
    assert budget <= float(summary["training_seconds"]) < budget + 30
    assert float(summary["total_seconds"]) > float(summary["training_seconds"])
    assert float(summary["peak_vram_mb"]) > 0
    assert 0 < float(summary["mfu_percent"]) <= 100
    steps = int(summary["num_steps"])
    assert steps >= 2
    assert float(summary["total_tokens_M"]) == pytest.approx(steps * facts["total_batch_size"] / 1e6, abs=0.051)
    assert float(summary["num_params_M"]) > 1
    assert int(summary["depth"]) == facts["depth"]
    assert summary["budget_note"] == f"time budget shortened to {int(budget)}s by AUTORESEARCH_TIME_BUDGET"
    # the eager path (tests/conftest.py): nothing compiled, and the summary says why
    assert summary["compile_cache"] == "off (AUTORESEARCH_COMPILE=0)"
    assert float(summary["compile_seconds"]) == 0 and int(summary["recompiles"]) == 0
    assert summary["attention"] == "explicit scores"  # the cpu profile's short context, window "L"


def test_progress_lines_are_upstream_format(trained):
    progress = trained.stdout.split("\n---\n", 1)[0].split("\r")[1:]  # '\r' starts every progress line
    assert len(progress) >= 2
    for line in progress:
        assert PROGRESS_RE.match(line.rstrip("\n")), repr(line)
    steps = [int(PROGRESS_RE.match(line.rstrip("\n")).group(1)) for line in progress]
    assert steps == list(range(len(steps)))


def test_nan_loss_fails_fast(prepared_env, repo_root, tmp_path):
    """A copy of train.py whose soft-cap constant is NaN: the very first loss is NaN."""
    source = (repo_root / "train.py").read_text()
    assert "\nSOFTCAP = 15.0" in source
    broken = tmp_path / "train.py"
    broken.write_text(source.replace("\nSOFTCAP = 15.0", '\nSOFTCAP = float("nan")'))
    env = dict(prepared_env, PYTHONPATH=str(repo_root))  # the copy still imports prepare and nanochat
    result = run_train(broken, env, tmp_path)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.rstrip().splitlines()[-1] == "FAIL"
    assert "\n---\n" not in result.stdout  # no summary block for a failed run


def test_a_gpu_torch_cannot_use_stops_training_instead_of_the_cpu(prepared_env, repo_root, tmp_path):
    """A cache prepared before (or elsewhere) and a GPU this torch cannot drive: train.py says so
    instead of training on the CPU."""
    from test_prepare import fake_nvidia_smi
    done = run_train(repo_root / "train.py", {**prepared_env, "PATH": fake_nvidia_smi(tmp_path / "bin")}, repo_root)
    assert done.returncode != 0 and "step 0" not in done.stdout
    assert "cannot use it" in done.stderr and "AUTORESEARCH_DEVICE=cpu" in done.stderr, done.stderr


def test_cuda_trains_in_bf16_from_ampere_on_and_in_fp16_before():
    from nanochat.platform import cuda_compute_dtype
    assert cuda_compute_dtype((9, 0)) == cuda_compute_dtype((8, 0)) == cuda_compute_dtype((12, 0)) == torch.bfloat16
    assert cuda_compute_dtype((7, 5)) == cuda_compute_dtype((7, 0)) == cuda_compute_dtype((6, 1)) == torch.float16


def test_fp16_trains_with_loss_scaling_and_says_so(prepared_env, repo_root, tmp_path):
    """The path a T4 or V100 takes (fp16 autocast, the loss scaled), run on the CPU for a few steps of
    a small train.py: the loss falls and stays finite."""
    source = (repo_root / "train.py").read_text()
    for old, new in SMALL_MODEL.items():
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    (tmp_path / "train.py").write_text(source)
    env = dict(prepared_env, PYTHONPATH=str(repo_root), AUTORESEARCH_DTYPE="float16", AUTORESEARCH_BUDGET_CLOCK="wall",
               AUTORESEARCH_TIME_BUDGET="4", AUTORESEARCH_EVAL_TOKENS="1024")  # 2 s gave two loss lines on a 2-core EPYC
    # an fp16 peak for MFU, as a benchmark stores one: measuring it takes a minute where fp16 is emulated
    subprocess.run([sys.executable, "-c", "import torch; from nanochat.platform import save_peak_flops; "
                    "save_peak_flops(1e9, torch.float16)"], cwd=repo_root, env=env, check=True)
    done = run_train(tmp_path / "train.py", env, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "| dtype: float16 with loss scaling |" in done.stdout
    losses = [float(m) for m in re.findall(r"loss: (\d+\.\d+)", done.stdout)]
    assert len(losses) >= 3 and losses[-1] < losses[0], losses
    assert math.isfinite(float(parse_summary(done.stdout)["val_bpb"]))


def test_peak_flops_with_a_read_only_cache(monkeypatch):
    """Inside the research loop's sandbox the cache is read-only (the run writes only its own compile folder): where
    the compile folder cannot be written either, the MFU peak is still measured (CI once crashed every real run
    here), it just is not kept."""
    from nanochat import platform
    monkeypatch.setenv("AUTORESEARCH_CACHE", "/dev/null/cache")  # not writable, even for root
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # set by nanochat.compile's import in this process
    monkeypatch.setattr(platform, "PEAK_MATMUL_SIZE", 128)
    monkeypatch.setattr(platform, "PEAK_MEASURE_SECONDS", 0.05)
    assert platform.save_peak_flops(1e9) is False
    assert platform.peak_flops() > 0


def test_a_new_programs_first_run_reads_the_peak_prepare_measured(prepared_env, repo_root, tmp_path):
    """A run compiles in a folder of its own (its program's, under the research loop), so every new program's first
    run measured the matmul peak for MFU again (a few seconds; the shared compile cache is read-only to runs).
    prepare.py measures it once into the shared cache, and a run with an empty compile folder reads it there."""
    shared = Path(prepared_env["AUTORESEARCH_CACHE"]) / "compile" / "cpu_peak_flops.json"
    own = tmp_path / "own"
    script = "from nanochat import platform; print(platform.peak_flops())"
    out = subprocess.run([sys.executable, "-c", script], cwd=repo_root, env=dict(prepared_env, TORCHINDUCTOR_CACHE_DIR=str(own)),
                         capture_output=True, text=True, check=True, timeout=120).stdout
    flops = float(out.splitlines()[-1])
    assert flops in json.loads(shared.read_text()).values() and not own.exists(), flops  # not measured again


def test_the_summary_names_the_attention_path():
    from nanochat.attention import describe
    assert describe("cpu", 256, windowed=False) == "explicit scores"
    assert describe("cuda", 2048, windowed=True) == "SDPA, sliding windows as a dense mask"  # FA3 loads on Hopper only
    assert describe("mps", 512, windowed=False) == "SDPA"


def test_datasheet_peaks_match_the_most_specific_name_and_a_mig_slice_gets_its_share():
    from nanochat.platform import gpu_peak_flops
    assert gpu_peak_flops("NVIDIA H200 NVL") == 835e12  # not the SXM's 989.5
    assert gpu_peak_flops("NVIDIA H200") == gpu_peak_flops("NVIDIA GH200 480GB") == 989.5e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989.5e12 and gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3 MIG 3g.40gb") == pytest.approx(989.5e12 * 3 / 7)
    assert gpu_peak_flops("NVIDIA A100-SXM4-40GB MIG 1g.5gb") == pytest.approx(312e12 / 7)
    assert gpu_peak_flops("Tesla T4") is None  # measured instead
