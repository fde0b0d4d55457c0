"""The speed paths: where the models leave the reference math for a faster way to the same
numbers, on CPU above all (docs/design.md, The models). Each is tested against the path it
replaces: dropout masks drawn four to a random number, attention-weight dropout written out,
and a decoding step's experts run directly.

    dropout, keep_scale       every dropout (layers, attention weights)
    attention_with_dropout    causal_attention on CPU with dropout (attention.py)
    CPU_FLASH_GQA             whether CPU attention takes grouped keys and values as they are
    one_token                 MoE.forward for a single token in eval on CPU (moe.py)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layers import visible

# torch's CPU flash attention takes grouped keys and values from 2.9 on (pytorch#157893); older
# versions would fall back to the slow math kernel, so there they are copied per head as on GPUs
CPU_FLASH_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 9)


def keep_scale(shape, p: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """The inverted-dropout multiplier for 0 <= p < 1: 0 with probability p, else 1/(1-p). Drawn 16
    bits at a time, four to a 64-bit random number, so p is taken to the nearest 1/65,536 (0.1 ->
    0.100006) and the kept values scaled by that p's 1/(1-p) (in bf16 the scale itself is rounded,
    1.109375 for 0.1, as torch's dropout rounds it). On CPU, where torch draws one number per
    element on one core, this is faster: one 16 x 6 x 128 x 128 mask took 2.1-2.8 ms against
    9.1-9.2 ms for bernoulli_ and 4.8-7.6 ms for torch.rand (two micro-benchmarks), which matters
    for attention-weight dropout."""
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
    where keep_scale draws four per random number. Shapes as causal_attention; the rep = H / Hkv
    query heads of a group are stacked as rows against their shared keys, no copies of K or V."""
    B, H, tq, D = q.shape
    hkv, tk = k.size(1), k.size(2)
    rep = H // hkv
    qg = q.reshape(B, hkv, rep * tq, D)  # heads g*rep .. g*rep+rep-1 read group g
    scores = (qg @ k.transpose(-2, -1)) * (scale if scale is not None else 1 / math.sqrt(D))  # (B, Hkv, rep*Tq, Tk)
    weights = scores.masked_fill_(~visible(tq, tk, q.device).repeat(rep, 1), float("-inf")).softmax(dim=-1)
    out = (weights * keep_scale(weights.shape, p, q.device, weights.dtype)) @ v  # (B, Hkv, rep*Tq, Dv)
    return out.view(B, H, tq, v.size(-1))


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
