"""scripts/gpu-check.sh: its CPU dry run passes every check it can run (so the GPU checks cannot
rot on machines without one), and without --cpu on such a machine it says so in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
# skipped in the dry run, by design: the measured side of the memory check and torchrun need CUDA
CUDA_ONLY = ("test_gpu_memory::", "test_gpu_dist::")


def run_script(*args, timeout=240):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("MINIDEEP_GPU_CHECK_CPU", None)
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_cpu_dry_run_passes_every_check(tmp_path):
    r = run_script(tmp_path / "out", "--cpu")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert report["mode"] == "cpu" and report["passed"] is True
    checks = {c["name"]: c for c in report["checks"]}
    for name, c in checks.items():
        assert c["status"] == ("skipped" if name.startswith(CUDA_ONLY) else "passed"), c
        assert c["seconds"] >= 0 and (c["status"] == "passed" or c["reason"])
    expected = [
        *(f"test_gpu_train::test_bf16_steps_loss_finite_and_falling[{v}]" for v in ("gpt2", "moe-gqa", "moe-mla", "moe-latent")),
        "test_gpu_moe::test_grouped_mm_equals_loop_over_experts",
        *(f"test_gpu_decode::test_cached_tokens_equal_full_forward[{v}]" for v in ("gpt2", "moe-gqa", "moe-mla", "moe-latent")),
        "test_gpu_resume::test_resume_is_bit_exact[gpt2]", "test_gpu_resume::test_resume_is_bit_exact[moe]",
        "test_gpu_resume::test_compile_one_step",
        "test_gpu_memory::test_memory_estimate_within_25_percent[moe]",
        "test_gpu_dist::test_torchrun_two_gpus_matches_one[ddp]", "test_gpu_dist::test_torchrun_two_gpus_matches_one[fsdp]",
        "bench rtx3060 (train, products, moe, decode)", "bench a100 (train, products, moe)",
    ]
    missing = [n for n in expected if n not in checks]
    assert not missing, (missing, list(checks))
    # the figures the checks exist for
    falling = checks["test_gpu_train::test_bf16_steps_loss_finite_and_falling[moe-mla]"]["figures"]
    assert falling["loss_last"] < falling["loss_first"] and falling["grouped_mm_calls"] > 0
    assert checks["test_gpu_resume::test_resume_is_bit_exact[moe]"]["figures"]["max_abs_diff"] == 0.0
    assert checks["test_gpu_memory::test_memory_estimate_within_25_percent[moe]"]["figures"]["estimated_gib"] > 0
    figures = checks["bench rtx3060 (train, products, moe, decode)"]["figures"]
    assert figures["tokens_per_sec"] > 0 and 0 < figures["products_of_step"]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert summary.startswith("minideep gpu-check (cpu): PASSED") and "FAILED" not in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cpu_and_without_cuda_exits_2_in_one_line(tmp_path):
    r = run_script(tmp_path / "out", timeout=120)
    assert r.returncode == 2
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "--cpu" in lines[0], lines
    assert not (tmp_path / "out").exists()
