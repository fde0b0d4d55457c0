"""Exact resume and torch.compile on the device. Resume: a run stopped after a few steps and
continued from its checkpoint logs, bit for bit, the losses of a run never stopped (dropout and
moe router noise on, so the device's RNG state must come back too). Compile: one step with
train.compile=true gives the eager step's loss within bf16 rounding."""

import functools
import math

import pytest
import torch
from gpu_env import losses_of, preset_data, pytestmark, recorder, rig  # noqa: F401

from minideep_cli.train import train

STEPS, STOP = 6, 3


@pytest.fixture
def deterministic(rig):
    """Deterministic kernels where torch has them (index_add_ and scatter_add_ on CUDA use
    atomics otherwise); warn only where it has none. CUBLAS_WORKSPACE_CONFIG is set by the script.
    The CPU kernels used are deterministic already (and some slower in this mode)."""
    if not rig.cuda:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("arch", ["gpt2", "moe"])
def test_resume_is_bit_exact(rig, preset_data, tmp_path, deterministic, record_property, arch):
    layers = [] if rig.cpu_mode else ["model.n_layer=2"]  # preset widths; small checkpoints
    cfg = rig.config("rtx3060", arch, overrides=[*layers, "model.dropout=0.1"], max_steps=STEPS, lr=2e-3,
                     warmup=0.2, eval_interval=1000, ckpt_interval=0)
    cfg.data.dir = str(preset_data)
    straight, again, first, rest = [], [], [], []
    train(cfg, tmp_path / "a", on_event=recorder(straight))
    if rig.cuda:  # CPU kernels are deterministic: the dry run skips this run
        train(cfg, tmp_path / "a2", on_event=recorder(again))

    def stop(kind, info):
        first.append((kind, info))
        return kind == "step" and info["step"] == STOP  # saves last.pt at step STOP and returns

    r = train(cfg, tmp_path / "b", on_event=stop)
    assert r.stopped == "interrupted" and r.step == STOP
    r2 = train(cfg, tmp_path / "b", resume=True, on_event=recorder(rest))
    assert r2.stopped == "done" and r2.step == STEPS
    straight, again, resumed = losses_of(straight), losses_of(again), losses_of(first) + losses_of(rest)
    assert len(straight) == STEPS and all(math.isfinite(x) for x in straight)
    record_property("repeatable", straight == again if again else None)  # two uninterrupted runs agree: the kernels are deterministic
    record_property("max_abs_diff", max(abs(a - b) for a, b in zip(resumed, straight)))
    assert resumed == straight, (resumed, straight, "uninterrupted runs repeatable:", straight == again if again else None)


def test_compile_one_step(rig, preset_data, tmp_path, monkeypatch, record_property):
    """On CUDA the default (inductor) backend; in the CPU dry run the eager backend, which traces
    the same graph without building C++ kernels."""
    if rig.cpu_mode:
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    layers = [] if rig.cpu_mode else ["model.n_layer=2"]  # preset widths; compile time grows with depth
    losses = {}
    for compiled in (False, True):
        cfg = rig.config("rtx3060", "moe", overrides=[*layers, "model.router_noise=none"], max_steps=1, lr=2e-3,
                         eval_interval=1000, compile=compiled)
        cfg.data.dir = str(preset_data)
        events = []
        res = train(cfg, tmp_path / f"run{int(compiled)}", on_event=recorder(events))
        assert res.stopped == "done" and res.step == 1
        losses[compiled] = losses_of(events)[0]
    record_property("loss_eager", round(losses[False], 5))
    record_property("loss_compiled", round(losses[True], 5))
    assert math.isfinite(losses[True])
    assert abs(losses[True] - losses[False]) <= 2e-2 * abs(losses[False]), losses
