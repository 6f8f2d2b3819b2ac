"""A run records the GPU model it ran on, and results from different models are never compared
silently. The GPU is a stand-in `nvidia-smi` on PATH that names the model the test chooses (the
worker asks nvidia-smi, as on a real GPU machine); the runs are real, on the local pool."""
import os
import stat

import pytest

from server_support import Lab, make_workspace, set_knobs

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
    assert "rerun it on NVIDIA H100 80GB HBM3" in other["next"]
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


def test_keep_judges_a_gain_against_its_own_gpu_models_noise(gpu_lab, monkeypatch):
    """Review 58: keep judged a gain against the noise measured last, whatever GPU model: an L4's narrow
    noise, measured after the H100's, let an H100 gain of 0.01 within the H100's noise (threshold 0.04) be
    kept "beyond the noise", unconfirmed, though the run's own answer asked for a confirmation."""
    gpu_lab.baseline()
    monkeypatch.setenv("FAKE_ORDER_EFFECT", "0.02")  # the H100's repeats: 1.02, 1.04 beside the kept 1.0
    gpu_lab.restart()  # a server's pool keeps the environment it started with
    wide = gpu_lab.ok("measure_noise", repeats=2)["noise"]
    assert wide["threshold"] == pytest.approx(0.04)
    gpu_lab.gpu("NVIDIA L4")
    monkeypatch.setenv("FAKE_ORDER_EFFECT", "0.0005")  # the L4's: two values 0.0005 apart
    gpu_lab.restart()
    assert gpu_lab.ok("measure_noise", repeats=2)["noise"]["threshold"] < 0.001
    gpu_lab.gpu("NVIDIA H100 80GB HBM3")
    monkeypatch.delenv("FAKE_ORDER_EFFECT")
    gpu_lab.restart()
    set_knobs(gpu_lab.ws, val_bpb=0.99)
    result = gpu_lab.ok("run_experiment", description="a gain within the H100's noise")
    assert result["delta"] == pytest.approx(-0.01) and "within noise (threshold 0.040000)" in result["noise"]
    assert result["confirm_first"] and result["next"].startswith(f"confirm(run={result['run']})")
    refused = gpu_lab.refused("keep")
    assert "needs confirming before keep" in refused and "0.120000" in refused
    assert gpu_lab.loop.state.load()["kept_commit"][:7] != result["commit"]
