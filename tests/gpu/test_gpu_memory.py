"""`minideep bench --preset rtx3060 --estimate-memory` against torch.cuda.max_memory_allocated of
the same training step on the card: within 25%. The estimate runs in the CPU dry run too (the
command and its JSON); only the measurement needs CUDA."""

import json
import subprocess
import sys

import pytest
import torch
from gpu_env import CPU_MODE, pytestmark, rig, subprocess_env, tiny_overrides  # noqa: F401

from minideep_cli.bench import bench_config, measure_cuda_peak
from minideep_cli.config import resolve_config

TOLERANCE = 0.25


def estimate_cli(arch: str, overrides: list[str], out) -> dict:
    cmd = [sys.executable, "-m", "minideep_cli", "bench", "--preset", "rtx3060", "--arch", arch, "--estimate-memory",
           "--json", str(out)]
    for o in overrides:
        cmd += ["-o", o]
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(out.read_text())["memory"]["estimate"]


@pytest.mark.parametrize("arch", ["moe", "gpt2"])
def test_memory_estimate_within_25_percent(rig, tmp_path, record_property, arch):
    if CPU_MODE and arch == "gpt2":
        pytest.skip("CPU dry run: the moe estimate exercises the command; the measurement needs CUDA")
    overrides = tiny_overrides(arch) if CPU_MODE else []
    est = estimate_cli(arch, overrides, tmp_path / "estimate.json")
    assert est["predicted_bytes"] > 0 and est["dtype"] == "bfloat16"
    record_property("estimated_gib", round(est["predicted_bytes"] / 2**30, 3))
    if not rig.cuda:
        pytest.skip("CPU dry run: the estimate is compared with torch.cuda.max_memory_allocated, on CUDA only")
    # the same step: the preset's config as bench reads it (compile off: the estimate is eager's)
    cfg = bench_config(resolve_config("rtx3060", arch=arch, overrides=["train.compile=false"]))
    assert cfg.train.grad_checkpointing == est["grad_checkpointing"] and cfg.train.batch_size == est["batch_size"]
    measured = measure_cuda_peak(cfg, "cuda", torch.bfloat16)
    err = (est["predicted_bytes"] - measured) / measured
    record_property("measured_gib", round(measured / 2**30, 3))
    record_property("error", round(err, 3))
    assert abs(err) <= TOLERANCE, f"estimate {est['predicted_bytes']} vs measured {measured}: {err:+.1%}"
