"""Pieces the Hugging Face layouts of the moe arch share (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek):
SwiGLU and expert weights, embeddings and the Llama-like part of config.json."""

from __future__ import annotations

import torch

from ..models.transformer import dense_hidden, expert_hidden


def swiglu(take, src: str, dst: str, t: dict, names=("gate_proj", "up_proj", "down_proj"), scale_down: float = 1.0):
    """Our SwiGLU (Linear w1, w3, w2) -> gate, up, down projections (same layout: no transpose)."""
    t[f"{dst}.{names[0]}.weight"] = take(f"{src}.w1.weight")
    t[f"{dst}.{names[1]}.weight"] = take(f"{src}.w3.weight")
    down = take(f"{src}.w2.weight")
    t[f"{dst}.{names[2]}.weight"] = down * scale_down if scale_down != 1.0 else down


def empty_swiglu(dst: str, t: dict, dim: int, dtype) -> None:
    """A gate/up/down MLP of width 0: its output is exactly 0 (for classes that always build one)."""
    t[f"{dst}.gate_proj.weight"] = torch.zeros(0, dim, dtype=dtype)
    t[f"{dst}.up_proj.weight"] = torch.zeros(0, dim, dtype=dtype)
    t[f"{dst}.down_proj.weight"] = torch.zeros(dim, 0, dtype=dtype)


def expert_weights(take, src: str, dst: str, t: dict, names: tuple[str, str, str]) -> None:
    """Stacked w1, w3 (E, d, h) and w2 (E, h, d), used as x @ w[e] -> per-expert Linear weights."""
    w1, w3, w2 = take(f"{src}.w1"), take(f"{src}.w3"), take(f"{src}.w2")
    for e in range(w1.shape[0]):
        t[f"{dst}.{e}.{names[0]}.weight"] = w1[e].t()  # (h, d)
        t[f"{dst}.{e}.{names[1]}.weight"] = w3[e].t()  # (h, d)
        t[f"{dst}.{e}.{names[2]}.weight"] = w2[e].t()  # (d, h)


def llama_like_config(model) -> dict:
    cfg = model.cfg
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
        "head_dim": cfg.n_embd // cfg.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": model.norm.eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": tied(model),
        "use_cache": True,
        "output_router_logits": False,
        "router_aux_loss_coef": cfg.aux_loss_coef,
    }


def tied(model) -> bool:
    return model.lm_head.weight is model.token_embedding.weight


def embeddings(model, take, t: dict) -> None:
    t["model.embed_tokens.weight"] = take("tok_emb.weight")
    t["model.norm.weight"] = take("norm.weight")
    if not tied(model):
        t["lm_head.weight"] = take("lm_head.weight")


def expert_width(model) -> int:
    return next((b.ffn.experts.w1.shape[2] for b in model.blocks if b.is_moe), expert_hidden(model.cfg))


def dense_width(model) -> int:
    return next((b.ffn.w1.out_features for b in model.blocks if not b.is_moe), dense_hidden(model.cfg))
