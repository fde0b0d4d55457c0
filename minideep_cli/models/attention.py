"""Causal self-attention and its KV cache.

gqa: n_head query heads share n_kv_head key/value heads (plain multi-head when equal); RoPE
on q and k. The cache is an object the caller owns (never a module buffer).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import apply_rope


class KVCache:
    """Preallocated keys and values of one layer: k, v (B, n_kv_head, max_len, head_dim)."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, n_kv_head, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) at pos; return everything so far (B, nkv, pos+T, hs)."""
        end = pos + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"KV cache holds {self.k.size(2)} positions; asked to write up to {end}")
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class Cache:
    """Per-layer caches plus the number of positions already written (pos)."""

    def __init__(self, layers: list):
        self.layers = layers
        self.pos = 0

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """q (B, H, Tq, D) are the last Tq of the Tk positions in k, v (B, H, Tk, D) -> (B, H, Tq, D)."""
    tq, tk = q.size(2), k.size(2)
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
    if tq == 1:  # one new token sees everything cached
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


class GQAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, dropout: float = 0.0):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = n_embd // n_head
        self.wq = nn.Linear(n_embd, n_head * self.head_dim, bias=False)
        self.wkv = nn.Linear(n_embd, 2 * n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(n_head * self.head_dim, n_embd, bias=False)
        self.dropout = dropout

    def new_cache(self, batch: int, max_len: int, dtype, device) -> KVCache:
        return KVCache(batch, self.n_kv_head, max_len, self.head_dim, dtype, device)

    def cache_numbers_per_token(self) -> int:
        return 2 * self.n_kv_head * self.head_dim

    def forward(self, x, cos, sin, cache: KVCache | None = None, pos: int = 0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k, v = self.wkv(x).view(B, T, 2 * self.n_kv_head, self.head_dim).transpose(1, 2).chunk(2, dim=1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # k, v: (B, nkv, T, hs)
        if cache is not None:
            k, v = cache.update(pos, k, v)  # (B, nkv, pos+T, hs)
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, Tk, hs)
        y = causal_attention(q, k, v, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))
