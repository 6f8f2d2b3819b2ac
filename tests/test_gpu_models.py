"""A run records the GPU model it ran on, and results from different models are never compared
silently. The GPU is a stand-in `nvidia-smi` on PATH that names the model the test chooses (the
worker asks nvidia-smi, as on a real GPU machine); the runs are real, on the local pool."""
import os
import stat

import pytest

from server_support import Lab, git, make_workspace, set_knobs

FAKE_NVIDIA_SMI = """#!/bin/sh
# the GPU model this machine has, as the test's file says; no GPU list (-L), so the pool pins nothing
case "$*" in *--query-gpu=name*) cat "$FAKE_GPU_FILE" ;; esac
"""


@pytest.fixture
def gpu_lab(fake_env, monkeypatch):
    bin_dir = fake_env / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_NVIDIA_SMI)
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("FAKE_GPU_FILE", str(fake_env / "gpu"))
    lab = Lab(make_workspace(fake_env))
    lab.gpu = lambda name: (fake_env / "gpu").write_text(name + "\n")
    lab.gpu("NVIDIA H100 80GB HBM3")
    yield lab
    lab.loop.shutdown()


def test_a_result_on_another_gpu_model_is_not_compared_with_the_best(gpu_lab):
    gpu_lab.ok("setup", tag="t")
    baseline = gpu_lab.ok("run_experiment", description="baseline")
    assert baseline["device"] == "NVIDIA H100 80GB HBM3"
    gpu_lab.ok("keep")
    gpu_lab.gpu("NVIDIA A100-SXM4-40GB")
    set_knobs(gpu_lab.ws, val_bpb=0.9)
    other = gpu_lab.ok("run_experiment", description="on an A100")
    assert other["device"] == "NVIDIA A100-SXM4-40GB" and other["val_bpb"] == 0.9
    assert other["delta"] is None and other["best_val_bpb"] == 1.0  # the best is shown, not compared with
    assert "run it again on NVIDIA H100 80GB HBM3" in other["next"]
    assert other["noise"].startswith("not compared: measured on NVIDIA A100-SXM4-40GB, the best")
    assert "on NVIDIA H100 80GB HBM3" in other["noise"]
    assert any("different GPU models are not comparable" in w for w in other["warnings"])
    gpu_lab.ok("discard")
    gpu_lab.gpu("NVIDIA H100 80GB HBM3")
    set_knobs(gpu_lab.ws, val_bpb=0.95)
    same = gpu_lab.ok("run_experiment", description="on the H100 again")
    assert same["delta"] == pytest.approx(-0.05) and same["noise"].startswith("better by 0.050000")


def test_noise_is_estimated_per_gpu_model(gpu_lab):
    gpu_lab.baseline()
    noise = gpu_lab.ok("measure_noise", repeats=1)["noise"]  # the kept H100 value and one repeat
    assert noise["std"] == 0.0
    state = gpu_lab.loop.state.load()
    assert list(state["noise_by_device"]) == ["NVIDIA H100 80GB HBM3"]
    gpu_lab.gpu("NVIDIA L4")
    refused = gpu_lab.refused("measure_noise", repeats=1)  # one L4 value, and the kept one is the H100's
    assert "on NVIDIA L4 (the kept value is from NVIDIA H100 80GB HBM3)" in refused


def test_keep_judges_a_gain_by_the_noise_of_its_own_gpu_model(gpu_lab):
    """Found by review 56: keep asked for a confirmation from the last estimate stored (another model's), while
    the result used its own model's: an H100 gain inside the H100's noise was kept unconfirmed, once a quieter
    L4 had been measured last."""
    set_knobs(gpu_lab.ws, val_bpb=1.0, noise=0.01)
    git(gpu_lab.ws, "commit", "-qam", "noisy")
    gpu_lab.baseline()  # run 1 on the H100: 1.0
    h100 = gpu_lab.ok("measure_noise", repeats=2)["noise"]  # runs 2, 3: 1.01, 0.99
    assert h100["threshold"] == 0.02
    gpu_lab.gpu("NVIDIA L4")
    l4 = gpu_lab.ok("measure_noise", repeats=2)["noise"]  # runs 4, 5 on the L4: 1.0, 1.01
    assert l4["threshold"] == 0.014142 and gpu_lab.loop.state.load()["noise"] == l4  # the last one stored
    gpu_lab.gpu("NVIDIA H100 80GB HBM3")
    set_knobs(gpu_lab.ws, val_bpb=0.955, noise=0.01)
    result = gpu_lab.ok("run_experiment", description="a gain inside the H100's noise")  # run 6: 0.945
    assert result["delta"] == -0.055 and "within 3 noise thresholds (0.060000)" in result["confirm_first"]
    refused = gpu_lab.refused("keep")
    assert "needs confirming before keep: its gain 0.055000 is within 3 noise thresholds (0.060000)" in refused


def test_a_result_on_a_faster_gpu_model_is_not_kept_as_a_gain_unasked(gpu_lab):
    """Found by review 56: keep took a result that was not compared with the best (another GPU model, which can
    give a lower val_bpb for the same code) without a word, as "the first result of the research run"."""
    gpu_lab.baseline()  # on the H100: 1.0
    gpu_lab.gpu("NVIDIA B200")
    set_knobs(gpu_lab.ws, val_bpb=0.9)  # the same code trains further on a faster model
    result = gpu_lab.ok("run_experiment", description="the same idea, on a faster GPU")
    assert result["delta"] is None and "discard(run=2)" in result["next"] and "rerun=true" in result["next"]
    refused = gpu_lab.refused("keep")
    assert "Run 2 was not compared: measured on NVIDIA B200, the best" in refused
    assert "keep(run=2, unconfirmed=true)" in refused
    kept = gpu_lab.ok("keep", unconfirmed=True)
    assert kept["evidence"].startswith("kept on request, not compared with the best: measured on NVIDIA B200")
