"""The train section: tokens/s, step time, FLOPs per token and MFU of one training step, and
the --vs variants timed alongside it."""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch

from ..config import Config
from ..data.integrity import read_meta
from ..evaluate import autocast_for
from ..models import build_model
from ..optim import make_optimizer
from ..device import pick_dtype
from .peak import device_peak, matmul_tflops
from .timing import BenchOptions, median_times, syncer


def bench_config(cfg: Config) -> Config:
    """The config as training would run it: the model's vocabulary is the tokenizer's, i.e. the data
    dir's (meta.json) or data.vocab_size for the bundled corpus."""
    c = copy.deepcopy(cfg)
    meta = read_meta(c.data.dir) if c.data.dir else None  # its shape checked (data/integrity.py)
    if meta is not None:
        c.model.vocab_size = meta["vocab_size"]
    elif not c.data.dir:
        c.model.vocab_size = c.data.vocab_size
    return c


def random_batch(cfg: Config, device: str, batch: Optional[int] = None, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    B, T, V = batch or cfg.train.batch_size, cfg.model.block_size, cfg.model.vocab_size
    x = torch.randint(0, V, (B, T + 1), generator=g)
    return x[:, :-1].to(device), x[:, 1:].to(device)


def step_fn(model, cfg: Config, device: str, dtype, forward: Callable, loss_of: Callable,
            batch: Optional[int] = None) -> Callable[[], None]:
    """One training step as `minideep train` runs it (one micro-batch): out = forward(x, y) with
    the preset's autocast, loss_of(out).backward() while out (the logits) is still held, clipping,
    the optimizer's step (train.optimizer: Muon + AdamW, or AdamW), zero_grad."""
    model.train()
    opt = make_optimizer(model, cfg, device)
    ctx = autocast_for(device, dtype)
    x, y = random_batch(cfg, device, batch)
    clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")

    def step():
        with ctx:
            out = forward(x, y)
        loss_of(out).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_step_fn(model, cfg: Config, device: str, dtype, batch: Optional[int] = None) -> Callable[[], None]:
    """minideep's step: language-model loss + balancing loss, through torch.compile if asked."""
    fwd = torch.compile(model) if cfg.train.compile else model

    def loss_of(out):
        return out.loss + out.aux["loss"] if "loss" in out.aux else out.loss

    return step_fn(model, cfg, device, dtype, fwd, loss_of, batch)


def bench_train(cfg: Config, opts: BenchOptions, device: str, dtype,
                variants: Optional[dict[str, Config]] = None) -> dict:
    """The training step of this config; with variants (`--vs`: label -> this config with more
    overrides), each variant's step is timed interleaved with it and compared by tokens/s."""
    def step_for(c: Config, dt) -> tuple:
        torch.manual_seed(c.train.seed)
        model = build_model(c.model).to(device)
        model.grad_checkpointing = c.train.grad_checkpointing
        return model, train_step_fn(model, c, device, dt)

    model, step = step_for(cfg, dtype)
    steps, vs = {"base": step}, {}
    for label, c in (variants or {}).items():
        vs[label] = c, pick_dtype(c.train.dtype, device)
        steps[f"vs {label}"] = step_for(*vs[label])[1]
    times = median_times(steps, opts.repeats, opts.warmup, syncer(device))
    sec = times["base"]
    B, T = cfg.train.batch_size, cfg.model.block_size
    tps = B * T / sec
    fpt = model.flops_per_token(T)
    peak = device_peak(device, dtype)
    achieved = tps * fpt
    matmul_rate = matmul_tflops(device, dtype, opts)
    rows = []
    for label, (c, dt) in vs.items():
        v_sec = times[f"vs {label}"]
        v_tps = c.train.batch_size * c.model.block_size / v_sec
        rows.append({"overrides": label.split(), "dtype": str(dt).replace("torch.", ""), "step_ms": v_sec * 1e3,
                     "tokens_per_sec": v_tps, "vs_base": v_tps / tps})
    return {
        "device": peak["name"], "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "params": model.num_params(), "active_params": model.num_params(active=True),
        "batch_size": B, "block_size": T, "step_ms": sec * 1e3, "tokens_per_sec": tps,
        "flops_per_token": fpt, "achieved_tflops": achieved / 1e12, "peak_tflops": peak["tflops"],
        "peak_source": peak["source"], "mfu": achieved / (peak["tflops"] * 1e12) if peak["tflops"] else None,
        "matmul_tflops": matmul_rate, "matmul_fraction": achieved / (matmul_rate * 1e12), "variants": rows,
    }
