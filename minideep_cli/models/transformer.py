"""The MoE transformer: pre-RMSNorm blocks of attention (gqa | mla | latent, attention.py) and a
feed-forward that is a sparse MoE or a dense one (SwiGLU or ReLU²), RoPE positions, tied or
untied embeddings, optionally soft-capped logits."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .attention import Cache, build_attention, slot_decay_init
from .fast import RMSNorm, dropout
from .layers import feed_forward, param_roles, rope_tables, softcap
from .moe import Experts, MoE
from .moe_arch import MoEConfig
from .output import Output, lm_loss


def dense_hidden(cfg: MoEConfig) -> int:
    """model.ffn_hidden, or the width that gives a dense feed-forward 8 * n_embd^2 weights: 8/3 of
    n_embd for SwiGLU's three matrices (rounded up to 16), 4 * n_embd for ReLU²'s two."""
    if cfg.ffn_hidden:
        return cfg.ffn_hidden
    return 4 * cfg.n_embd if cfg.activation == "relu2" else 16 * math.ceil(8 * cfg.n_embd / 3 / 16)


def expert_hidden(cfg: MoEConfig) -> int:
    return cfg.expert_hidden or max(16, dense_hidden(cfg) // cfg.top_k)


def is_moe_layer(cfg: MoEConfig, i: int) -> bool:
    return i >= cfg.first_k_dense and (i - cfg.first_k_dense) % cfg.moe_every == 0


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd)
        self.attn = build_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.n_embd)
        self.is_moe = is_moe_layer(cfg, layer)
        self.ffn = MoE(cfg, expert_hidden(cfg)) if self.is_moe else feed_forward(cfg.activation, cfg.n_embd, dense_hidden(cfg))
        self.dropout = cfg.dropout  # on the residual branches (attention weights: in the attention)

    def forward(self, x, cos, sin, cache=None, pos: int = 0):
        x = x + dropout(self.attn(self.attn_norm(x), cos, sin, cache, pos), self.dropout, self.training)
        if self.is_moe:
            h, stats = self.ffn(self.ffn_norm(x))
        else:
            h, stats = self.ffn(self.ffn_norm(x)), None
        return x + dropout(h, self.dropout, self.training), stats


class MoETransformer(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.dropout = cfg.dropout  # on the embeddings
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # RoPE width: the head dim (gqa, latent) or mla's qk_rope_head_dim; every block agrees
        cos, sin = rope_tables(self.blocks[0].attn.rope_dim, cfg.block_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, rope_dim/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpointing = False
        self.init_weights()

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.tok_emb

    def param_roles(self) -> dict[str, str]:
        """Each parameter's role for the optimizers (layers.param_roles): the hidden matrices Muon
        may take are every Linear weight inside the blocks and the experts' stacked (E, d, h)
        weights; the router (no Linear), latent attention's slots, the embeddings and the output
        head go to AdamW."""
        hidden = []
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                hidden.append(m.weight)
            elif isinstance(m, Experts):
                hidden.extend(m.weights())
        return param_roles(self, hidden)

    def init_weights(self):
        """N(0, 0.02) for every matrix, the router and latent attention's slot latents; output
        projections (attention wo, SwiGLU and expert w2) scaled by 1/sqrt(2 * n_layer); norms 1
        (mla's q_norm and kv_norm too); latent attention's recency rates log-spaced
        (slot_decay_init); the router's selection bias 0. With model.zero_init_out the output
        projections start at 0 instead: every block begins as the identity, and the first steps'
        gradients reach the embeddings through the residual stream alone."""
        out_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("slot_decay"):
                with torch.no_grad():
                    p.copy_(slot_decay_init(self.cfg.n_head, self.cfg.n_latents))
            elif name.endswith("noise_weight"):
                nn.init.zeros_(p)
            elif name.endswith(("wo.weight", "w2.weight", "experts.w2")):
                nn.init.normal_(p, 0.0, out_std) if not self.cfg.zero_init_out else nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, 0.02)
        for name, b in self.named_buffers():
            if name.endswith("router.bias"):
                nn.init.zeros_(b)

    def new_cache(self, batch: int, max_len: int | None = None, dtype=None, device=None) -> Cache:
        p = self.tok_emb.weight
        max_len = max_len or self.cfg.block_size
        return Cache([b.attn.new_cache(batch, max_len, dtype or p.dtype, device or p.device) for b in self.blocks])

    def cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes one sequence's decoding cache grows by per token, all layers (0 for latent)."""
        dtype = dtype or self.tok_emb.weight.dtype
        return sum(b.attn.cache_bytes_per_token(dtype) for b in self.blocks)

    def cache_state_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of one sequence's cache that do not depend on its length, all layers (latent's
        recurrent state; 0 for gqa and mla). new_cache(B, n).nbytes() is
        B * (n * cache_bytes_per_token() + cache_state_bytes())."""
        dtype = dtype or self.tok_emb.weight.dtype
        return sum(b.attn.state_bytes(dtype) for b in self.blocks)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: Cache | None = None) -> Output:
        B, T = idx.shape
        pos = cache.pos if cache is not None else 0
        if pos + T > self.cfg.block_size:
            raise ValueError(f"sequence of {pos + T} exceeds block_size {self.cfg.block_size}")
        cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]  # (T, rope_dim/2)
        x = dropout(self.tok_emb(idx), self.dropout, self.training)  # (B, T, d)
        routing, moe_layers = [], []
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                x, stats = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x, stats = block(x, cos, sin, cache.layers[i] if cache is not None else None, pos)
            if stats is not None:
                routing.append(stats)
                moe_layers.append(i)
        if cache is not None:
            cache.pos += T
        logits = softcap(self.lm_head(self.norm(x)), self.cfg.logit_softcap)  # (B, T, vocab)
        loss = lm_loss(logits, targets) if targets is not None else None
        aux = {"routing": routing, "moe_layers": moe_layers}
        if routing:
            aux["loss"] = sum(s["loss"] for s in routing)
        return Output(logits, loss, aux)

    @torch.no_grad()
    def update_router_bias(self, loads: list[torch.Tensor]) -> None:
        """Auxiliary-loss-free balancing: after an optimizer step, nudge each MoE layer's
        selection bias up for under-loaded experts and down for over-loaded ones."""
        rate = self.cfg.bias_update_rate
        moe = [b.ffn for b in self.blocks if b.is_moe]
        for layer, load in zip(moe, loads):
            load = load.float()
            layer.router.bias += rate * torch.sign(load.mean() - load)

    def num_params(self, active: bool = False, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if active:  # only top_k of n_experts routed experts run per token
            cfg = self.cfg
            for b in self.blocks:
                if b.is_moe:
                    per_expert = sum(p[0].numel() for p in b.ffn.experts.parameters())
                    n -= (cfg.n_experts - cfg.top_k) * per_expert
        if not embeddings:
            n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 per active matmul weight (lm_head included) + attention scores.
        Vectors (norm weights, latent attention's recency rates) are no matmul weights: not counted."""
        c = self.cfg
        tied_head = c.vocab_size * c.n_embd if c.tie_embeddings else 0  # removed with the embedding
        vectors = sum(p.numel() for p in self.parameters() if p.dim() < 2)
        matmul = self.num_params(active=True, embeddings=False) + tied_head - vectors
        return 6 * matmul + sum(b.attn.score_flops_per_token(seq_len) for b in self.blocks)
