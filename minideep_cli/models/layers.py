"""Small pure pieces shared by the models: RMSNorm, rotary embeddings, feed-forwards (SwiGLU,
ReLU²), logit soft-capping, the causal mask. (Dropout is in fast.py: its CPU mask is a speed path.)"""

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
