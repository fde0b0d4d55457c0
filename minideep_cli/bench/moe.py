"""The moe section: one MoE layer forward+backward against a dense SwiGLU of the same active
parameters and against the plain loop over experts."""

from __future__ import annotations

import copy
import dataclasses

import torch

from ..config import Config
from ..evaluate import autocast_for
from ..models import ModelConfig, has_experts
from ..models.layers import SwiGLU
from ..models.moe import MoE
from ..models.moe_arch import MoEConfig
from ..models.transformer import expert_hidden
from .timing import MOE_REFERENCE, BenchOptions, median_times, syncer


def moe_layer_row(name: str, mcfg, tokens: int, opts: BenchOptions, device: str, dtype) -> dict:
    """One MoE layer forward+backward against a dense SwiGLU of the same active parameters (hidden
    = top_k x expert_hidden, plus shared experts) and against the loop over experts."""
    h = expert_hidden(mcfg)
    moe = MoE(mcfg, h).to(device).train()
    dense_hidden = (mcfg.top_k + mcfg.n_shared_experts) * h
    dense = SwiGLU(mcfg.n_embd, dense_hidden).to(device)
    for p in [*moe.parameters(), *dense.parameters()]:
        torch.nn.init.normal_(p, 0.0, 0.02)
    x = torch.randn(1, tokens, mcfg.n_embd, device=device, requires_grad=True)
    ctx = autocast_for(device, dtype)
    paths = {True: moe.experts.forward, False: moe.experts.loop}  # fast.run_experts, or the reference loop

    def run_moe(grouped: bool):
        moe.experts.forward = paths[grouped]
        with ctx:
            y, stats = moe(x)
        (y.float().square().mean() + stats["loss"]).backward()

    def run_dense():
        with ctx:
            y = dense(x)
        y.float().square().mean().backward()

    t = median_times({"moe": lambda: run_moe(True), "dense": run_dense, "loop": lambda: run_moe(False)},
                     opts.moe_repeats, opts.warmup, syncer(device))
    return {"name": name, "tokens": tokens, "n_embd": mcfg.n_embd, "n_experts": mcfg.n_experts, "top_k": mcfg.top_k,
            "expert_hidden": h, "dense_hidden": dense_hidden, "moe_ms": t["moe"] * 1e3, "dense_ms": t["dense"] * 1e3,
            "loop_ms": t["loop"] * 1e3, "moe_vs_dense": t["moe"] / t["dense"], "moe_vs_loop": t["moe"] / t["loop"]}


def layer_settings(m: ModelConfig) -> MoEConfig:
    """The MoE layer settings of this model section: its own where its arch has experts, else the
    MoE layer's defaults with the section's common settings."""
    if isinstance(m, MoEConfig):
        return copy.deepcopy(m)
    return MoEConfig(**{f.name: getattr(m, f.name) for f in dataclasses.fields(ModelConfig) if f.name != "arch"})


def bench_moe(cfg: Config, opts: BenchOptions, device: str, dtype) -> dict:
    ref = layer_settings(cfg.model)
    ref.n_embd, ref.n_experts, ref.top_k = MOE_REFERENCE["n_embd"], MOE_REFERENCE["n_experts"], MOE_REFERENCE["top_k"]
    ref.expert_hidden = ref.ffn_hidden = ref.n_shared_experts = 0
    ref.router_noise = "none"
    rows = [moe_layer_row("reference", ref, MOE_REFERENCE["tokens"], opts, device, dtype)]
    m = cfg.model
    if has_experts(m) and not opts.quick:
        own = copy.deepcopy(m)
        own.router_noise = "none"  # timing only; noise is a few elementwise ops
        rows.append(moe_layer_row("model", own, opts.moe_tokens, opts, device, dtype))
    return {"rows": rows}
