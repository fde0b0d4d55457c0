"""Small pure pieces shared by the models: RMSNorm, rotary embeddings, feed-forwards (SwiGLU,
ReLU²), logit soft-capping, the causal mask and causal attention as the math says it, the
parameter roles a model hands the optimizers. (Dropout, the way CPUs attend and RMSNorm's CPU
training path are in fast.py: they are speed paths.)"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each (max_len, head_dim // 2), fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dim. x (B, H, T, D); cos/sin (T, D/2)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


class SwiGLU(nn.Module):
    """Dense gated feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ReLU2(nn.Module):
    """Dense squared-ReLU feed-forward: w2(relu(w1 x)^2). Two matrices where SwiGLU has three, so
    at the same hidden width it costs two thirds of SwiGLU's FLOPs."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.relu(self.w1(x)).square())


def feed_forward(activation: str, dim: int, hidden: int) -> nn.Module:
    """A dense feed-forward of model.activation: swiglu | relu2."""
    return {"swiglu": SwiGLU, "relu2": ReLU2}[activation](dim, hidden)


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap): smooth, bounded in (-cap, cap), nearly the identity for |logits| << cap."""
    return logits if cap <= 0 else cap * torch.tanh(logits / cap)


def visible(tq: int, tk: int, device) -> torch.Tensor:
    """(Tq, Tk) True where query i, at position Tk - Tq + i, may see key j (j <= Tk - Tq + i)."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0,
                     scale: float | None = None) -> torch.Tensor:
    """The reference: q (B, H, Tq, D) are the last Tq of the Tk positions in k (B, Hkv, Tk, D),
    v (B, Hkv, Tk, Dv) -> (B, H, Tq, Dv). scale None = 1/sqrt(D). Grouped-query attention when
    Hkv < H: query head h reads key/value head h // (H / Hkv), here copied per query head, as
    torch's fused GPU kernels take them. The models attend with fast.attend, which is this on GPUs."""
    k, v = per_query_head(q, k, v)  # (B, H, Tk, D*)
    return masked_attention(q, k, v, dropout, scale)


def per_query_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped keys and values (B, Hkv, Tk, D*) copied to one per query head (B, H, Tk, D*)."""
    if k.size(1) == q.size(1):
        return k, v
    rep = q.size(1) // k.size(1)
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float,
                     scale: float | None) -> torch.Tensor:
    """torch's fused attention under the causal mask of causal_attention; grouped keys and values
    (fewer heads than q) are passed as they are."""
    tq, tk, gqa = q.size(2), k.size(2), k.size(1) != q.size(1)
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale, enable_gqa=gqa)
    if tq == 1:  # one new token sees everything cached
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible(tq, tk, q.device), dropout_p=dropout, scale=scale,
                                          enable_gqa=gqa)


def param_roles(model: nn.Module, hidden: list[torch.Tensor]) -> dict[str, str]:
    """Each trainable parameter's role for the optimizers (optim.param_groups): "hidden" for the
    `hidden` matrices (Muon takes them under train.optimizer=muon, AdamW with decay otherwise),
    "decay" for the other matrices and embeddings (AdamW, decayed), "plain" for vectors: norms,
    biases (AdamW, never decayed)."""
    ids = {id(p) for p in hidden}
    return {name: "hidden" if id(p) in ids else "decay" if p.dim() >= 2 else "plain"
            for name, p in model.named_parameters() if p.requires_grad}
