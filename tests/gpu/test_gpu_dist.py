"""torchrun --nproc_per_node=2 on two GPUs (NCCL), DDP and FSDP2: the losses of one process with
twice the gradient accumulation (within bf16 rounding), and a checkpoint one process loads.
Runs only where two GPUs are present; gloo on the CPU is tests/test_distributed.py's."""

import subprocess
import sys

import pytest
import torch
import yaml
from gpu_env import CPU_MODE, losses_of, preset_data, pytestmark, recorder, rig, subprocess_env  # noqa: F401

from minideep_cli.checkpoint import load_checkpoint, model_from_checkpoint
from minideep_cli.train import train

STEPS = 4
two_gpus = pytest.mark.skipif(CPU_MODE or torch.cuda.device_count() < 2,
                              reason="needs two CUDA GPUs (torchrun on CPU: tests/test_distributed.py)")


def tb_losses(run_dir) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tb"))
    ea.Reload()
    return [e.value for e in sorted(ea.Scalars("train/loss"), key=lambda e: e.step)]


@two_gpus
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_gpus_matches_one(rig, preset_data, tmp_path, record_property, mode):
    cfg = rig.config("rtx3060", "moe", overrides=["model.n_layer=2", "model.router_noise=none"], max_steps=STEPS,
                     lr=2e-3, eval_interval=1000, grad_accum=2)
    cfg.data.dir = str(preset_data)
    ref = []
    train(cfg, tmp_path / "one", on_event=recorder(ref))
    ref = losses_of(ref)
    cfg.train.grad_accum, cfg.train.distributed = 1, mode
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    env = subprocess_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minideep_cli",
           "train", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / mode)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = tb_losses(tmp_path / mode)
    record_property("losses_one", [round(x, 4) for x in ref])
    record_property(f"losses_{mode}", [round(x, 4) for x in got])
    assert got == pytest.approx(ref, rel=2e-2)
    state = load_checkpoint(tmp_path / mode / "last.pt")
    assert state["loop"]["step"] == STEPS
    model, _ = model_from_checkpoint(state)
    assert all(torch.isfinite(p).all() for p in model.parameters())
