"""bf16 training steps of every arch and attention variant at the rtx3060 preset's shapes: the
loss stays finite and falls, and the experts use torch's grouped matmul wherever
fast.grouped_mm_ok says they can."""

import math

import pytest
import torch
from gpu_env import count_grouped, losses_of, preset_data, pytestmark, recorder, rig  # noqa: F401

import minideep_cli.models.fast as fast_mod
from minideep_cli.models.transformer import expert_hidden
from minideep_cli.train import train

VARIANTS = [("gpt2", None), ("moe", "gqa"), ("moe", "mla"), ("moe", "latent")]
STEPS = 8


@pytest.mark.parametrize("arch,attention", VARIANTS, ids=[a if b is None else f"{a}-{b}" for a, b in VARIANTS])
def test_bf16_steps_loss_finite_and_falling(rig, preset_data, tmp_path, monkeypatch, record_property, arch, attention):
    cfg = rig.config("rtx3060", arch, attention, max_steps=STEPS, lr=2e-3, warmup=0.0, eval_interval=1000,
                     ckpt_interval=0)
    cfg.data.dir = str(preset_data)
    calls = count_grouped(monkeypatch)
    events = []
    if rig.cuda:
        torch.cuda.reset_peak_memory_stats()
    res = train(cfg, tmp_path / "run", on_event=recorder(events))
    losses = losses_of(events)
    start = next(info for kind, info in events if kind == "start")
    assert start["dtype"] == "bfloat16" and start["device"].startswith(rig.device)
    assert res.stopped == "done" and len(losses) == STEPS, (res.stopped, losses)
    assert all(math.isfinite(x) for x in losses), losses
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first - 0.05, losses  # falling
    tps = [info["tokens_per_sec"] for kind, info in events if kind == "step"]
    record_property("loss_first", round(losses[0], 4))
    record_property("loss_last", round(losses[-1], 4))
    record_property("tokens_per_sec", round(max(tps), 1))
    record_property("shape", f"{cfg.model.n_layer}x{cfg.model.n_embd}, batch {cfg.train.batch_size}x{cfg.model.block_size}")
    if rig.cuda:
        record_property("max_memory_allocated_gib", round(torch.cuda.max_memory_allocated() / 2**30, 2))
    if arch == "moe":
        m = cfg.model
        probe = torch.empty(1, device=rig.device)
        expected = fast_mod.grouped_mm_ok(probe, torch.bfloat16, m.n_embd, expert_hidden(m))
        record_property("grouped_mm_expected", expected)
        record_property("grouped_mm_calls", calls[0])
        assert (calls[0] > 0) == expected, (calls[0], expected)
