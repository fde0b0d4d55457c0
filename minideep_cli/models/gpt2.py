"""GPT-2 as published (Radford et al. 2019): learned positions, pre-LayerNorm, GELU (tanh) MLP,
tied embeddings, biases; parameter names follow Hugging Face's GPT2LMHeadModel so export is a
rename (HF stores c_attn/c_fc/c_proj as Conv1D, i.e. these Linear weights transposed)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .arch import attention_dropout
from .gpt2_arch import GPT2Config
from .attention import Cache, KVCache
from .fast import attend, dropout
from .layers import param_roles
from .output import Output, lm_loss


class GPT2Attention(nn.Module):
    attend = staticmethod(attend)  # the attention kernel (as attention.Attention.attend)

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout  # on the residual branch
        self.attn_dropout = attention_dropout(cfg)  # on the attention weights

    def forward(self, x, cache: KVCache | None, pos: int):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3 * self.n_head, self.head_dim).transpose(1, 2).chunk(3, dim=1)
        if cache is not None:  # q, k, v: (B, nh, T, hs)
            k, v = cache.update(pos, k, v)  # (B, nh, pos+T, hs)
        y = self.attend(q, k, v, self.attn_dropout if self.training else 0.0)  # (B, nh, T, hs)
        return dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)), self.dropout, self.training)


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x):
        return dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")), self.dropout, self.training)


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x, cache=None, pos=0):
        x = x + self.attn(self.ln_1(x), cache, pos)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                h=nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.dropout = cfg.dropout  # on the embeddings
        self.grad_checkpointing = False
        self.init_weights()

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (stored as transformer.h, Hugging Face's name)."""
        return self.transformer.h

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.transformer.wte

    def param_roles(self) -> dict[str, str]:
        """Each parameter's role for the optimizers (layers.param_roles): the blocks' Linear
        weights are the hidden matrices Muon may take; embeddings and LayerNorms go to AdamW."""
        return param_roles(self, [m.weight for m in self.transformer.h.modules() if isinstance(m, nn.Linear)])

    def init_weights(self):
        """GPT-2: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layer)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                nn.init.ones_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, 0.02)

    def new_cache(self, batch: int, max_len: int | None = None, dtype=None, device=None) -> Cache:
        p = self.lm_head.weight
        max_len = max_len or self.cfg.block_size
        hd = self.cfg.n_embd // self.cfg.n_head
        return Cache([KVCache(batch, self.cfg.n_head, max_len, hd, dtype or p.dtype, device or p.device)
                      for _ in range(self.cfg.n_layer)])

    def cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes one sequence's KV cache grows by per token, all layers: K and V, 2 * n_embd numbers."""
        dtype = dtype or self.lm_head.weight.dtype
        return self.cfg.n_layer * 2 * self.cfg.n_embd * dtype.itemsize

    def cache_state_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of the cache that do not grow with the sequence: none for GPT-2."""
        return 0

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: Cache | None = None) -> Output:
        B, T = idx.shape
        pos = cache.pos if cache is not None else 0
        if pos + T > self.cfg.block_size:
            raise ValueError(f"sequence of {pos + T} exceeds block_size {self.cfg.block_size}")
        pos_emb = self.transformer.wpe.weight[pos : pos + T]  # (T, C): positions pos .. pos+T-1
        x = dropout(self.transformer.wte(idx) + pos_emb, self.dropout, self.training)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            layer_cache = cache.layers[i] if cache is not None else None
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, layer_cache, pos)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        loss = lm_loss(logits, targets) if targets is not None else None
        return Output(logits, loss, {})

    def num_params(self, active: bool = False, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.transformer.wpe.weight.numel() + self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 per matmul weight (lm_head included; biases and LayerNorm
        weights are no matmul weights) + attention scores q·k and p·v, 12 * n_embd * seq_len a layer."""
        c = self.cfg
        matmul = sum(p.numel() for p in self.transformer.h.parameters() if p.dim() == 2) + c.vocab_size * c.n_embd
        return 6 * matmul + 12 * c.n_layer * c.n_embd * seq_len
