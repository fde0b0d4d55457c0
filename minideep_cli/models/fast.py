"""The speed paths: where the models leave the reference math for a faster way to the same
numbers, on CPU above all (docs/design.md, The models). This module is the one seam: the
reference modules (attention.py, gpt2.py, moe.py, transformer.py) call into it at the points
below, and read as the math everywhere else. Each path is tested against the one it replaces.

    RMSNorm                   every RMSNorm: in CPU fp32 training, RMSNormFunction's fewer
                              passes over the activations; elsewhere layers.RMSNorm
    dropout, keep_scale       every dropout: CPU masks drawn four to a random number
    attend                    every attention module's kernel (Attention.attend): on CPU, fp32,
                              grouped keys and values as they are, dropout written out
                              (attention_with_dropout); elsewhere layers.causal_attention
    run_experts               Experts.forward: grouped matmuls (GROUPED; EAGER_GROUPED outside
                              bf16) where torch has them and they pay, else Experts.loop
    one_token                 MoE.forward for a single token in eval on CPU (a decoding step)

bench swaps two of them for the reference to time or trace it: `-s moe` times Experts.loop
against run_experts, `-s memory` traces layers.causal_attention, the way a GPU attends.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import layers
from .layers import causal_attention, masked_attention, per_query_head, visible

# torch's CPU flash attention takes grouped keys and values from 2.9 on (pytorch#157893); older
# versions would fall back to the slow math kernel, so there they are copied per head as on GPUs
CPU_FLASH_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 9)


class RMSNormFunction(torch.autograd.Function):
    """F.rms_norm(x, (d,), weight, eps) with its own backward. On CPU torch runs RMSNorm as its
    pieces (square, mean, add, rsqrt, two products), keeps their intermediates and has autograd
    differentiate each one; this keeps only x and the row scales, and its backward is the
    closed form below, with fewer passes over the activations and fewer temporaries. The same
    numbers up to rounding (tested); the moe step about 1.02x as fast
    (docs/results/2026-12-08-rmsnorm.md).

    y = x * r * w with r = 1 / sqrt(mean(x^2) + eps) per row; with xhat = x * r and gn = g * w,
    dL/dw = sum over rows of g * xhat, dL/dx = r * (gn - xhat * mean(gn * xhat))."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        d = x.size(-1)
        r = torch.linalg.vecdot(x, x).div_(d).add_(eps).rsqrt_().unsqueeze(-1)  # (..., 1)
        ctx.save_for_backward(x, weight, r)
        return (x * r).mul_(weight)  # (..., d)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        xhat = x * r
        gw = (g * xhat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None  # (d,)
        gn = g * weight
        mean_dot = torch.linalg.vecdot(gn, xhat).div_(x.size(-1)).unsqueeze(-1)  # (..., 1)
        gx = torch.addcmul(gn, xhat, mean_dot, value=-1).mul_(r) if ctx.needs_input_grad[0] else None
        return gx, gw, None


class RMSNorm(layers.RMSNorm):
    """layers.RMSNorm, the one the models build. Training in fp32 on CPU (no autocast) runs
    RMSNormFunction; evaluation, decoding, other dtypes and devices the reference (GPUs have a
    fused kernel for it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 == self.weight.dtype and torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu")):
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return super().forward(x)


def keep_scale(shape, p: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """The inverted-dropout multiplier for 0 <= p < 1: 0 with probability p, else 1/(1-p). Drawn 16
    bits at a time, four to a 64-bit random number, so p is taken to the nearest 1/65,536 (0.1 ->
    0.100006) and the kept values scaled by that p's 1/(1-p) (in bf16 the scale itself is rounded,
    1.109375 for 0.1, as torch's dropout rounds it). On CPU, where torch draws one number per
    element on one core, this is several times faster than bernoulli_ or torch.rand (measured in
    docs/results/2026-12-07-code-figures.md), which matters for attention-weight dropout."""
    if not 0 <= p < 1:
        raise ValueError(f"a dropout rate is at least 0 and below 1, not {p}")
    n = math.prod(shape)
    cut = min(round(p * 65536), 65535)  # drop where the 16-bit draw, read as a signed number, is below cut - 32,768
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)  # every bit uniform
    keep = words.view(torch.int16)[:n].view(shape) >= cut - 32768
    return keep.to(dtype).mul_(1 / (1 - cut / 65536))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout, skipped outright where it does nothing (eval, p = 0): decoding one token
    at a time pays for every call, and an eval-mode nn.Dropout is still a call. On CPU the mask
    comes from keep_scale, not F.dropout's Bernoulli sampler, which draws one number per element."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    return x * keep_scale(x.shape, p, x.device, x.dtype)


def attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float,
                           scale: float | None = None) -> torch.Tensor:
    """Causal attention with dropout on its weights, written out: on CPU torch's fused kernel has no
    dropout, and its fallback (these same steps) draws the mask one Bernoulli number per weight,
    where keep_scale draws four per random number. Shapes as layers.causal_attention; the rep = H / Hkv
    query heads of a group are stacked as rows against their shared keys, no copies of K or V."""
    B, H, tq, D = q.shape
    hkv, tk = k.size(1), k.size(2)
    rep = H // hkv
    qg = q.reshape(B, hkv, rep * tq, D)  # heads g*rep .. g*rep+rep-1 read group g
    scores = (qg @ k.transpose(-2, -1)) * (scale if scale is not None else 1 / math.sqrt(D))  # (B, Hkv, rep*Tq, Tk)
    weights = scores.masked_fill_(~visible(tq, tk, q.device).repeat(rep, 1), float("-inf")).softmax(dim=-1)
    out = (weights * keep_scale(weights.shape, p, q.device, weights.dtype)) @ v  # (B, Hkv, rep*Tq, Dv)
    return out.view(B, H, tq, v.size(-1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0,
           scale: float | None = None) -> torch.Tensor:
    """layers.causal_attention's result (same shapes), the fastest way this device has. On CPU:
    bf16/fp16 inputs attended in fp32 (torch's CPU kernel is slower in bf16; measured in
    docs/results/2026-12-07-code-figures.md) and cast back; grouped keys and values passed as they
    are where torch takes them (CPU_FLASH_GQA); dropout on the weights written out, as torch's
    fused CPU kernel has none. On other devices, the reference itself."""
    if q.device.type != "cpu":
        return causal_attention(q, k, v, dropout, scale)
    if q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs back down
            return attend(q.float(), k.float(), v.float(), dropout, scale).to(q.dtype)
    if not CPU_FLASH_GQA:
        k, v = per_query_head(q, k, v)  # (B, H, Tk, D*)
    if dropout > 0:
        return attention_with_dropout(q, k, v, dropout, scale)
    return masked_attention(q, k, v, 0.0, scale)


# ---------------------------------------------------------------- experts: grouped matmuls

HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def grouped_mm_ok(x: torch.Tensor, dtype: torch.dtype, *dims: int) -> bool:
    """torch's grouped matmul runs on CPU (any float dtype) and on CUDA for bf16 on SM >= 80 with
    16-byte aligned rows; elsewhere the experts run in a loop (over experts, never tokens)."""
    if not HAS_GROUPED_MM:
        return False
    if x.device.type == "cpu":
        return True
    return (x.is_cuda and dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
            and all(d % 8 == 0 for d in dims))


def grouped_swiglu(x, counts, w1, w3, w2):
    """E SwiGLU experts on expert-sorted rows with grouped matmuls. x (M, d), counts (E,) -> (M, d)."""
    offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's slice
    # two products, not one on cat([w1, w3]): the cat would copy every expert's weights on each
    # call, which dominates decoding a token at a time (docs/results/2026-12-07-code-figures.md)
    g, u = F.grouped_mm(x, w1, offs=offs), F.grouped_mm(x, w3, offs=offs)  # (M, h) each
    return F.grouped_mm(F.silu(g) * u, w2, offs=offs)


def grouped_relu2(x, counts, w1, w2):
    """E ReLU² experts on expert-sorted rows with grouped matmuls. x (M, d), counts (E,) -> (M, d)."""
    offs = counts.cumsum(0).to(torch.int32)
    return F.grouped_mm(F.relu(F.grouped_mm(x, w1, offs=offs)).square(), w2, offs=offs)  # (M, h) -> (M, d)


GROUPED = {"swiglu": grouped_swiglu, "relu2": grouped_relu2}
# torch.compile traces grouped_mm for bf16 only (its shape rule rejects fp32): other dtypes run it
# eagerly, a graph break around the experts
EAGER_GROUPED = {name: torch.compiler.disable(fn) for name, fn in GROUPED.items()}


def run_experts(experts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Experts.forward: x (M, d) sorted by expert, counts (E,) rows per expert -> (M, d), equal to
    experts.loop(x, counts) up to rounding (tested). Grouped matmuls where torch runs them; with
    fewer rows than experts on CPU (a prompt of a few tokens; a single token takes one_token) a
    grouped matmul would still visit every expert, so the loop over the few that received a row."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    few_rows = x.device.type == "cpu" and x.size(0) < len(counts)
    if few_rows or not grouped_mm_ok(x, dtype, *experts.w1.shape[1:]):
        return experts.loop(x, counts)
    run = (GROUPED if dtype == torch.bfloat16 else EAGER_GROUPED)[experts.activation]
    return run(x.to(dtype), counts, *(w.to(dtype) for w in experts.weights()))


# ---------------------------------------------------------------- a decoding step's experts


def one_token(moe, x: torch.Tensor, expert_ids, gates, probs, logits) -> tuple[torch.Tensor, dict]:
    """A single token outside training on CPU (a decoding step): its k experts run on their own
    weights, added in ascending expert order in fp32 as the sorted path's index_add adds them,
    without the sorting and gathering that path needs for many tokens; nothing is dropped, as
    one token takes at most one slot of an expert. x (1, 1, d) -> y (1, 1, d) and the same
    stats. Bit for bit the general path's result where that path loops over experts too
    (top_k < n_experts), else equal up to rounding (tested). CPU only: on CUDA the loop would
    wait for the chosen ids once per layer, and it is unmeasured there."""
    E, k, d = moe.cfg.n_experts, moe.cfg.top_k, x.size(-1)
    flat = x.reshape(1, d)
    acc = None
    for e, j in sorted((e, j) for j, e in enumerate(expert_ids[0].tolist())):
        h = moe.experts.one(e, flat)  # (1, d)
        weighted = (h * gates[0, j].to(h.dtype)).float()
        acc = weighted if acc is None else acc + weighted
    y = acc.to(h.dtype)
    if moe.shared is not None:
        y = y + moe.shared(flat)
    counts = torch.zeros(E, dtype=torch.long, device=x.device).index_fill_(0, expert_ids[0], 1)  # (E,)
    kept = torch.ones(1, k, dtype=torch.bool, device=x.device)
    return y.view(1, 1, d).to(x.dtype), moe.stats(expert_ids, gates, probs, logits, counts, kept)
