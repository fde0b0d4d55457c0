import math
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_train_cfg, unigram_nats

from minideep_cli.checkpoint import load_checkpoint
from minideep_cli.data import TokenData
from minideep_cli.optim import lr_at
from minideep_cli.train import train


def collect(losses):
    def on_event(kind, info):
        if kind == "step":
            losses.append(info["loss"])
    return on_event


@pytest.mark.parametrize("arch", ["gpt2", "moe"])
def test_resume_gives_the_same_losses_as_never_stopping(tmp_path, small_data, arch):
    cfg = tiny_train_cfg(small_data, arch, dropout=0.0, ckpt_interval=5)
    cfg.model.dropout = 0.1  # RNG state must be restored too
    cfg.model.router_noise = "jitter" if arch == "moe" else "none"
    straight = []
    train(cfg, tmp_path / "a", on_event=collect(straight))

    first = []

    def stop_at_8(kind, info):  # keeps the step-5 checkpoint aside: as if the run died after step 8
        if kind == "step":
            first.append(info["loss"])
            if info["step"] == 6:
                shutil.copy(tmp_path / "b" / "last.pt", tmp_path / "step5.pt")
            return info["step"] == 8
    r = train(cfg, tmp_path / "b", on_event=stop_at_8)
    assert r.stopped == "interrupted" and r.step == 8
    assert load_checkpoint(tmp_path / "b" / "last.pt")["loop"]["step"] == 8
    shutil.copy(tmp_path / "step5.pt", tmp_path / "b" / "last.pt")
    rest = []
    r2 = train(cfg, tmp_path / "b", resume=True, on_event=collect(rest))
    assert r2.step == 20 and r2.stopped == "done"
    assert len(straight) == 20 and len(first) == 8
    assert first[:5] + rest == straight  # exactly, step for step
    # TensorBoard: the first process's steps up to the checkpoint (5 included), none of its 6-8, then the resumed ones
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "b" / "tb"))
    ea.Reload()
    logged = ea.Scalars("train/loss")
    assert [e.step for e in logged] == list(range(1, 21))
    assert [e.value for e in logged] == pytest.approx(straight, rel=1e-6)


def test_tiny_moe_learns_below_unigram_entropy(tmp_path, small_data):
    cfg = tiny_train_cfg(small_data, "moe", max_steps=150, lr=1e-2, eval_interval=150)
    cfg.model.n_embd, cfg.model.block_size = 64, 64
    result = train(cfg, tmp_path / "run")
    unigram = unigram_nats(small_data)
    assert result.val["loss"] < unigram - 0.4, (result.val, unigram)
    assert result.best_val_loss < unigram - 0.4


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, small_data):
    cfg = tiny_train_cfg(small_data, "gpt2", max_steps=40, eval_interval=2)
    good = train(cfg, tmp_path / "run")  # a good run leaves good checkpoints
    before = (tmp_path / "run" / "last.pt").read_bytes()
    cfg.train.lr, cfg.train.grad_clip = 1e12, 0.0
    events = []
    res = train(cfg, tmp_path / "run2", on_event=lambda k, i: events.append(k))
    assert res.stopped == "diverged" and "diverged" in events
    assert good.stopped == "done"
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    if (tmp_path / "run2" / "last.pt").exists():  # whatever was saved is finite
        state = load_checkpoint(tmp_path / "run2" / "last.pt")
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_time_budget_schedule_and_checkpoint_contents(tmp_path, small_data):
    cfg = tiny_train_cfg(small_data, "moe", max_steps=0, max_minutes=0.05, eval_interval=1000)
    res = train(cfg, tmp_path / "run")
    assert res.stopped == "done" and res.step > 0 and 2.5 < res.elapsed < 10
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert set(state) >= {"model", "optimizer", "config", "tokenizer", "loop", "data"}
    assert state["config"]["model"]["arch"] == "moe" and state["loop"]["step"] == res.step
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert math.isfinite(res.val["bpb"]) and res.val["tokens"] == len(TokenData.open(small_data).val) - 1


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    from minideep_cli.config import Config

    cfg = Config()
    cfg.train.lr, cfg.train.warmup, cfg.train.min_lr_ratio = 1.0, 0.1, 0.1
    assert lr_at(0.0, cfg) < 0.02
    assert lr_at(0.1, cfg) == pytest.approx(1.0)
    assert lr_at(0.55, cfg) == pytest.approx(0.55)
    assert lr_at(1.0, cfg) == pytest.approx(0.1)


def test_final_evaluation_measures_the_best_checkpoint(tmp_path, small_data):
    from minideep_cli.checkpoint import model_from_checkpoint
    from minideep_cli.evaluate import evaluate_tokens

    cfg = tiny_train_cfg(small_data, "gpt2", max_steps=30, eval_interval=5, lr=3e-2)
    res = train(cfg, tmp_path / "run")
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert res.val_step == best["loop"]["step"]
    model, _ = model_from_checkpoint(best)
    d = TokenData.open(small_data)
    again = evaluate_tokens(model, d.val, d.byte_lengths(), cfg.model.block_size, batch_size=cfg.train.batch_size)
    assert again["bpb"] == pytest.approx(res.val["bpb"], rel=1e-6)
