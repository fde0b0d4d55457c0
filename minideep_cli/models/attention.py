"""Causal self-attention variants and their caches (docs/design.md, The models).

gqa     n_head query heads share n_kv_head key/value heads (plain multi-head when equal); RoPE on
        q and k; the cache holds K and V.
mla     DeepSeek-V2 Multi-head Latent Attention: K and V are rebuilt from a per-token latent of
        kv_lora_rank plus one RoPE key of qk_rope_head_dim shared by all heads. The cache holds
        only those two; decoding absorbs the up-projections into the query and the output.
latent  causal latent-slot attention: per head, n_latents slots, each a softmax-weighted summary
        of the keys and values at positions <= t; the query at t attends over the slots.
        Decoding carries a recurrent state of fixed size instead of a growing cache.

Every variant offers forward(x, cos, sin, cache=None, pos=0), new_cache(batch, max_len, dtype,
device), rope_dim (the width the model's RoPE tables are built for) and the cache accounting that
`minideep bench` reads: cache_numbers_per_token(), cache_bytes_per_token(dtype), state_numbers(),
state_bytes(dtype). Caches are objects the caller owns, never module buffers.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .arch import attention_dropout
from .fast import RMSNorm, attend
from .layers import apply_rope

# ---------------------------------------------------------------- caches


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


class LatentKVCache:
    """MLA's cache for one layer: per position the normalised KV latent (kv_lora_rank numbers)
    followed by the rotated RoPE key (qk_rope_head_dim), in one buffer ckv (B, max_len, r + dr),
    so decoding reads the keys without concatenating them. Nothing per head is stored."""

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, dtype, device):
        self.rank = kv_lora_rank
        self.ckv = torch.zeros(batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)

    def update(self, pos: int, c: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """Write c (B, T, r), k_pe (B, T, dr) at pos; return everything so far, [c, k_pe] (B, pos+T, r+dr)."""
        end = pos + c.size(1)
        if end > self.ckv.size(1):
            raise ValueError(f"MLA cache holds {self.ckv.size(1)} positions; asked to write up to {end}")
        self.ckv[:, pos:end, : self.rank] = c
        self.ckv[:, pos:end, self.rank :] = k_pe
        return self.ckv[:, :end]

    def nbytes(self) -> int:
        return self.ckv.nbytes


class SlotCache:
    """Latent attention's recurrent state for one layer, fp32 whatever the model dtype: per head
    and slot the running max m and normaliser z (B, nh, L), and the sums of keys and values
    rescaled by exp(-m), kn and vn (B, nh, L, hs). Decoding overwrites it in place: it never grows."""

    def __init__(self, batch: int, n_head: int, n_latents: int, head_dim: int, device):
        f32 = dict(dtype=torch.float32, device=device)
        self.m = torch.full((batch, n_head, n_latents), float("-inf"), **f32)
        self.z = torch.zeros(batch, n_head, n_latents, **f32)
        self.kn = torch.zeros(batch, n_head, n_latents, head_dim, **f32)
        self.vn = torch.zeros_like(self.kn)

    def read(self) -> tuple:
        return self.m, self.z, self.kn, self.vn

    def write(self, state: tuple) -> None:
        for mine, new in zip(self.read(), state):
            mine.copy_(new)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.read())


class Cache:
    """Per-layer caches plus the number of positions already written (pos)."""

    def __init__(self, layers: list):
        self.layers = layers
        self.pos = 0

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers)


# ---------------------------------------------------------------- shared pieces


class Attention(nn.Module):
    """Cache accounting every variant shares. Per sequence and layer, a cache holds
    cache_numbers_per_token() numbers for each position plus state_numbers() fixed ones."""

    rope_dim: int
    # the kernel every variant attends with: fast.attend, layers.causal_attention's result the
    # fastest way the device has (bench's memory trace gives an instance the reference itself)
    attend = staticmethod(attend)

    def cache_numbers_per_token(self) -> int:
        raise NotImplementedError

    def state_numbers(self) -> int:
        return 0

    def cache_bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.cache_numbers_per_token() * dtype.itemsize

    def state_bytes(self, dtype: torch.dtype) -> int:
        return self.state_numbers() * dtype.itemsize


# ---------------------------------------------------------------- gqa


class GQAttention(Attention):
    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, dropout: float = 0.0, qk_norm: bool = False):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = self.rope_dim = n_embd // n_head
        self.wq = nn.Linear(n_embd, n_head * self.head_dim, bias=False)
        self.wkv = nn.Linear(n_embd, 2 * n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(n_head * self.head_dim, n_embd, bias=False)
        self.dropout = dropout
        if qk_norm:  # each head's query and key scaled to RMS 1 (times a learned gain) before RoPE
            self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        self.qk_norm = qk_norm

    def new_cache(self, batch: int, max_len: int, dtype, device) -> KVCache:
        return KVCache(batch, self.n_kv_head, max_len, self.head_dim, dtype, device)

    def cache_numbers_per_token(self) -> int:
        return 2 * self.n_kv_head * self.head_dim

    def score_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) of q·k and p·v for one token."""
        return 12 * self.n_head * self.head_dim * seq_len

    def forward(self, x, cos, sin, cache: KVCache | None = None, pos: int = 0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k, v = self.wkv(x).view(B, T, 2 * self.n_kv_head, self.head_dim).transpose(1, 2).chunk(2, dim=1)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # k, v: (B, nkv, T, hs)
        if cache is not None:
            k, v = cache.update(pos, k, v)  # (B, nkv, pos+T, hs)
        y = self.attend(q, k, v, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


# ---------------------------------------------------------------- mla


class MLAttention(Attention):
    """Per head, a query of qk_nope_head_dim (no position) + qk_rope_head_dim (RoPE) meets a key
    made of an up-projected latent part and the RoPE key shared by every head; values are
    up-projected from the same latent. Training decompresses K and V (`naive`); a cached forward
    attends in latent space (`absorbed`), which equals `naive` up to rounding."""

    def __init__(self, n_embd: int, n_head: int, q_lora_rank: int, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.n_head, self.rank, self.q_lora_rank = n_head, kv_lora_rank, q_lora_rank
        self.dn, self.dr, self.dv = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.rope_dim = qk_rope_head_dim
        qk = self.dn + self.dr
        if q_lora_rank:  # low-rank query: down, RMSNorm, up
            self.wq_a = nn.Linear(n_embd, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank)
            self.wq_b = nn.Linear(q_lora_rank, n_head * qk, bias=False)
        else:
            self.wq = nn.Linear(n_embd, n_head * qk, bias=False)
        self.wkv_a = nn.Linear(n_embd, kv_lora_rank + self.dr, bias=False)  # latent + shared RoPE key
        self.kv_norm = RMSNorm(kv_lora_rank)
        self.wkv_b = nn.Linear(kv_lora_rank, n_head * (self.dn + self.dv), bias=False)  # per head [k_nope, v]
        self.wo = nn.Linear(n_head * self.dv, n_embd, bias=False)
        self.dropout = dropout

    def new_cache(self, batch: int, max_len: int, dtype, device) -> LatentKVCache:
        return LatentKVCache(batch, max_len, self.rank, self.dr, dtype, device)

    def cache_numbers_per_token(self) -> int:
        return self.rank + self.dr

    def score_flops_per_token(self, seq_len: int) -> int:
        return 6 * self.n_head * (self.dn + self.dr + self.dv) * seq_len

    def project(self, x, cos, sin) -> tuple[torch.Tensor, ...]:
        """x (B, T, C) -> q_nope (B, nh, T, dn), rotated q_pe (B, nh, T, dr), the normalised latent
        c (B, T, r) and the rotated shared key k_pe (B, T, dr)."""
        B, T, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank else self.wq(x)
        q_nope, q_pe = q.view(B, T, self.n_head, -1).transpose(1, 2).split([self.dn, self.dr], -1)
        c, k_pe = self.wkv_a(x).split([self.rank, self.dr], -1)
        return q_nope, apply_rope(q_pe, cos, sin), self.kv_norm(c), apply_rope(k_pe, cos, sin)

    def forward(self, x, cos, sin, cache: LatentKVCache | None = None, pos: int = 0):
        B, T, _ = x.shape
        q_nope, q_pe, c, k_pe = self.project(x, cos, sin)
        if cache is None:
            y = self.naive(q_nope, q_pe, c, k_pe)
        else:
            y = self.absorbed(q_nope, q_pe, cache.update(pos, c, k_pe))  # cache: (B, pos+T, r+dr)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # y: (B, nh, T, dv)

    def naive(self, q_nope, q_pe, c, k_pe) -> torch.Tensor:
        """Decompress K and V at every position. q_* (B, nh, Tq, d*), c (B, Tk, r), k_pe (B, Tk, dr)."""
        B, Tk, _ = c.shape
        kv = self.wkv_b(c).view(B, Tk, self.n_head, self.dn + self.dv).transpose(1, 2)  # (B, nh, Tk, dn+dv)
        k_nope, v = kv.split([self.dn, self.dv], -1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(B, self.n_head, Tk, self.dr)], -1)  # (B, nh, Tk, dn+dr)
        q = torch.cat([q_nope, q_pe], -1)
        return self.attend(q, k, v, self.dropout if self.training else 0.0)  # (B, nh, Tq, dv)

    def absorbed(self, q_nope, q_pe, ckv) -> torch.Tensor:
        """Attend in latent space: q_nope·k_nope = (q_nope W_uk)·c, and p·v = (p·c) W_uv^T, so K and
        V are never built. Every head reads the same keys ckv = [c, k_pe] (B, Tk, r+dr)."""
        B, Tk, _ = ckv.shape
        H, Tq, r = self.n_head, q_nope.size(2), self.rank
        w_uk, w_uv = self.wkv_b.weight.view(H, self.dn + self.dv, r).split([self.dn, self.dv], 1)
        q = torch.cat([q_nope @ w_uk, q_pe], -1)  # (B, nh, Tq, dn) @ (nh, dn, r) -> (B, nh, Tq, r+dr)
        scale = 1.0 / math.sqrt(self.dn + self.dr)  # the naive path's scale
        if Tq == 1 and not self.training:  # a decoding step sees every key: the heads are rows of one product
            s = torch.bmm(q.view(B, H, r + self.dr), ckv.transpose(1, 2)) * scale  # (B, nh, Tk)
            o = torch.bmm(s.float().softmax(-1).to(ckv.dtype), ckv[..., :r]).view(B, H, 1, r)
        else:
            k = ckv.unsqueeze(1).expand(B, H, Tk, r + self.dr)  # (B, nh, Tk, r+dr)
            v = ckv[..., :r].unsqueeze(1).expand(B, H, Tk, r)  # (B, nh, Tk, r)
            o = self.attend(q, k, v, self.dropout if self.training else 0.0, scale)  # (B, nh, Tq, r)
        return o @ w_uv.transpose(1, 2)  # (B, nh, Tq, r) @ (nh, r, dv) -> (B, nh, Tq, dv)


# ---------------------------------------------------------------- latent


def slot_attention_step(q, k, v, s, state: tuple) -> tuple[torch.Tensor, tuple]:
    """The recurrent form, one position. q (scaled), k, v (B, nh, hs), slot logits s (B, nh, L),
    state (m, z, kn, vn) -> y (B, nh, hs) and the state including this position."""
    m0, z0, kn0, vn0 = state
    m = torch.maximum(m0, s)
    a, b = torch.exp(m0 - m), torch.exp(s - m)  # rescale the old sums; weight the new position
    z = a * z0 + b  # (B, nh, L)
    kn = a.unsqueeze(-1) * kn0 + b.unsqueeze(-1) * k.unsqueeze(2)  # (B, nh, L, hs)
    vn = a.unsqueeze(-1) * vn0 + b.unsqueeze(-1) * v.unsqueeze(2)
    p = ((kn @ q.unsqueeze(-1)).squeeze(-1) / z).softmax(-1)  # q · slot key, over slots: (B, nh, L)
    y = ((p / z).unsqueeze(-1) * vn).sum(2)  # (B, nh, hs)
    return y, (m, z, kn, vn)


def _chunk_starts(s, k, v, state: tuple) -> tuple:
    """The state before each chunk, by a scan over chunks. s (B, nh, n, C, L); k, v (B, nh, n, C, hs)
    -> m, z (B, nh, n, L), kn, vn (B, nh, n, L, hs); and the state after the last chunk."""
    cmax = s.amax(3)  # (B, nh, n, L)
    e = torch.exp(s - cmax.unsqueeze(3)).transpose(-1, -2)  # (B, nh, n, L, C), relative to the chunk max
    starts = []
    m, z, kn, vn = state
    for c in range(s.size(2)):
        starts.append((m, z, kn, vn))
        new = torch.maximum(m, cmax[:, :, c])
        a, b = torch.exp(m - new), torch.exp(cmax[:, :, c] - new)  # (B, nh, L)
        z = a * z + b * e[:, :, c].sum(-1)
        kn = a.unsqueeze(-1) * kn + b.unsqueeze(-1) * (e[:, :, c] @ k[:, :, c])  # (B, nh, L, hs)
        vn = a.unsqueeze(-1) * vn + b.unsqueeze(-1) * (e[:, :, c] @ v[:, :, c])
        m = new
    return tuple(torch.stack(t, 2) for t in zip(*starts)), (m, z, kn, vn)


def slot_attention_parallel(q, k, v, s, state: tuple, chunk: int = 32) -> tuple[torch.Tensor, tuple]:
    """Every position at once, equal to slot_attention_step applied in order. q (scaled), k, v
    (B, nh, T, hs), s (B, nh, T, L), state before position 0 -> y (B, nh, T, hs), final state.

    In chunks of C positions: the state at each chunk start comes from a scan over chunks; inside
    a chunk, position t weighs position i <= t by exp(s_i - m_t) with m_t its running max, and the
    start state by exp(m_start - m_t). Every exponent is <= 0, so nothing overflows whatever the
    logits, and slot keys are never built: q·slot = (g q·kn + sum_i w_ti q·k_i) / z_t."""
    B, H, T, D = q.shape
    C = min(chunk, T)
    n, pad = -(-T // C), -T % C
    if pad:  # padding after the last position cannot reach it; a -inf logit adds nothing to the state
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        s = F.pad(s, (0, 0, 0, pad), value=float("-inf"))
    q, k, v = (t.view(B, H, n, C, D) for t in (q, k, v))
    s = s.view(B, H, n, C, -1)  # (B, nh, n, C, L)
    (m0, z0, kn0, vn0), final = _chunk_starts(s, k, v, state)
    mt = torch.maximum(m0.unsqueeze(3), s.cummax(3).values)  # running max: (B, nh, n, C, L)
    g = torch.exp(m0.unsqueeze(3) - mt)  # weight of the chunk-start state at t
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril().unsqueeze(-1)  # (C_t, C_i, 1)
    w = torch.exp(torch.where(causal, s.unsqueeze(3) - mt.unsqueeze(4), float("-inf")))  # (B, nh, n, C_t, C_i, L)
    z = g * z0.unsqueeze(3) + w.sum(4)  # (B, nh, n, C, L)
    qk = q @ k.transpose(-1, -2)  # (B, nh, n, C_t, C_i)
    score = (g * (q @ kn0.transpose(-1, -2)) + torch.einsum("...tij,...ti->...tj", w, qk)) / z
    r = score.softmax(-1) / z  # slot probabilities over the normaliser: (B, nh, n, C, L)
    y = (r * g) @ vn0 + torch.einsum("...tj,...tij->...ti", r, w) @ v  # (B, nh, n, C, hs)
    return y.reshape(B, H, n * C, D)[:, :, :T], final


def slot_decay_init(n_head: int, n_latents: int) -> torch.Tensor:
    """Recency rates 1/tau with time scales tau log-spaced from 1 to 1000 tokens, per head."""
    return torch.logspace(0, -3, n_latents).repeat(n_head)  # (nh * L,)


class LatentAttention(Attention):
    """Causal latent-slot attention. Per head h and slot j, a learned latent l_hj scores each
    position: s_ij = l_hj·k_i / sqrt(hs) + decay_hj · i, content plus a learned recency rate. The
    slot seen from position t holds softmax_{i<=t}(s_ij)-weighted sums of the keys and values;
    the query at t attends over the slots (no dropout on that). RoPE rotates q at t and each key
    at its own position before pooling, so q·slot = sum_i w_i q·R(i-t)k_i depends on offsets only;
    slot logits use the unrotated keys, and a recency term in a softmax over i depends on t - i."""

    def __init__(self, n_embd: int, n_head: int, n_latents: int, chunk: int = 32):
        super().__init__()
        self.n_head, self.n_latents, self.chunk = n_head, n_latents, chunk
        self.head_dim = self.rope_dim = n_embd // n_head
        self.wq = nn.Linear(n_embd, n_embd, bias=False)
        self.wkv = nn.Linear(n_embd, 2 * n_embd, bias=False)
        self.wo = nn.Linear(n_embd, n_embd, bias=False)
        self.latents = nn.Parameter(torch.empty(n_head, n_latents, self.head_dim))
        # 1-D, so AdamW leaves it undecayed (like norms): decay would pull every slot to a plain mean
        self.slot_decay = nn.Parameter(slot_decay_init(n_head, n_latents))

    def new_cache(self, batch: int, max_len: int, dtype, device) -> SlotCache:
        return SlotCache(batch, self.n_head, self.n_latents, self.head_dim, device)

    def cache_numbers_per_token(self) -> int:
        return 0

    def state_numbers(self) -> int:
        return self.n_head * self.n_latents * (2 * self.head_dim + 2)

    def state_bytes(self, dtype: torch.dtype | None = None) -> int:
        return self.state_numbers() * 4  # fp32 whatever the model dtype

    def score_flops_per_token(self, seq_len: int) -> int:
        C, L, D = min(self.chunk, seq_len), self.n_latents, self.head_dim
        return 6 * self.n_head * (2 * C * (D + L) + 4 * L * D)  # in-chunk, chunk-start and scan terms

    def forward(self, x, cos, sin, cache: SlotCache | None = None, pos: int = 0):
        B, T, _ = x.shape
        H, L, D = self.n_head, self.n_latents, self.head_dim
        q = self.wq(x).view(B, T, H, D).transpose(1, 2)  # (B, nh, T, hs)
        k, v = self.wkv(x).view(B, T, 2 * H, D).transpose(1, 2).chunk(2, dim=1)  # (B, nh, T, hs)
        with torch.autocast(x.device.type, enabled=False):  # slot sums in fp32
            q, k, v = q.float(), k.float(), v.float()
            t = torch.arange(pos, pos + T, device=x.device, dtype=torch.float32)
            s = k @ self.latents.float().transpose(-1, -2) / math.sqrt(D)  # (B, nh, T, L)
            s = s + t[:, None] * self.slot_decay.float().view(H, 1, L)
            q, k = apply_rope(q, cos, sin) / math.sqrt(D), apply_rope(k, cos, sin)
            state = (cache if cache is not None else SlotCache(B, H, L, D, x.device)).read()
            if cache is not None and T == 1:
                y, state = slot_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], s[:, :, 0], state)
                y = y.unsqueeze(2)
            else:
                y, state = slot_attention_parallel(q, k, v, s, state, self.chunk)  # (B, nh, T, hs)
            if cache is not None:
                cache.write(state)
        return self.wo(y.to(x.dtype).transpose(1, 2).reshape(B, T, -1))


# ---------------------------------------------------------------- choice


def build_attention(cfg) -> Attention:
    """The attention module a moe-arch block uses, from MoEConfig.attention."""
    if cfg.attention == "gqa":
        return GQAttention(cfg.n_embd, cfg.n_head, cfg.n_kv_head or cfg.n_head, attention_dropout(cfg), cfg.qk_norm)
    if cfg.attention == "mla":
        return MLAttention(cfg.n_embd, cfg.n_head, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
                           cfg.qk_rope_head_dim, cfg.v_head_dim, attention_dropout(cfg))
    if cfg.attention == "latent":
        return LatentAttention(cfg.n_embd, cfg.n_head, cfg.n_latents)
    raise ValueError(f"unknown attention '{cfg.attention}'")
