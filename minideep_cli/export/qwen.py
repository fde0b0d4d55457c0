"""gqa blocks -> MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM: one Llama-like
attention layout (q/k/v/o projections), experts per expert; the classes differ in the MoE part."""

from __future__ import annotations

import torch

from .layout import dense_width, embeddings, empty_swiglu, expert_weights, expert_width, llama_like_config, swiglu


def _attention_and_norms(model, take, t: dict, p: str, i: int) -> None:
    """gqa block i: wq -> q_proj; wkv ([k heads; v heads] along the output) -> k_proj, v_proj."""
    b = model.blocks[i]
    kv = b.attn.n_kv_head * b.attn.head_dim
    wkv = take(f"blocks.{i}.attn.wkv.weight")
    t[f"{p}.input_layernorm.weight"] = take(f"blocks.{i}.attn_norm.weight")
    t[f"{p}.self_attn.q_proj.weight"] = take(f"blocks.{i}.attn.wq.weight")
    t[f"{p}.self_attn.k_proj.weight"] = wkv[:kv]
    t[f"{p}.self_attn.v_proj.weight"] = wkv[kv:]
    t[f"{p}.self_attn.o_proj.weight"] = take(f"blocks.{i}.attn.wo.weight")
    t[f"{p}.post_attention_layernorm.weight"] = take(f"blocks.{i}.ffn_norm.weight")


def mixtral(model, take) -> tuple[dict, dict]:
    cfg, t = model.cfg, {}
    embeddings(model, take, t)
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}"
        _attention_and_norms(model, take, t, p, i)
        t[f"{p}.block_sparse_moe.gate.weight"] = take(f"blocks.{i}.ffn.router.weight")
        expert_weights(take, f"blocks.{i}.ffn.experts", f"{p}.block_sparse_moe.experts", t, ("w1", "w3", "w2"))
    config = {
        "model_type": "mixtral",
        **llama_like_config(model),
        "intermediate_size": expert_width(model),
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,  # Mixtral always renormalises the k gates (our norm_topk)
        "router_jitter_noise": 0.0,
        "sliding_window": None,
    }
    return config, t


def _qwen_moe_blocks(model, take, t: dict, attention_extra, moe_extra) -> list[int]:
    """The blocks as Qwen2-MoE and Qwen3-MoE lay them out (dense blocks as an `mlp`, sparse ones as
    `mlp.gate` and `mlp.experts`), each class adding its own attention or MoE tensors through the
    two callbacks, (prefix, i) and (prefix, i, block). Returns the dense blocks' indices."""
    dense_layers = []
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}"
        _attention_and_norms(model, take, t, p, i)
        attention_extra(p, i)
        if not b.is_moe:
            dense_layers.append(i)
            swiglu(take, f"blocks.{i}.ffn", f"{p}.mlp", t)
            continue
        t[f"{p}.mlp.gate.weight"] = take(f"blocks.{i}.ffn.router.weight")
        expert_weights(take, f"blocks.{i}.ffn.experts", f"{p}.mlp.experts", t, ("gate_proj", "up_proj", "down_proj"))
        moe_extra(p, i, b)
    return dense_layers


def _qwen_moe_config(model, model_type: str, dense_layers: list[int]) -> dict:
    cfg = model.cfg
    return {
        "model_type": model_type,
        **llama_like_config(model),
        "intermediate_size": dense_width(model),  # width of the dense blocks (mlp_only_layers)
        "moe_intermediate_size": expert_width(model),
        "num_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "norm_topk_prob": bool(cfg.norm_topk and cfg.top_k >= 2),  # ours keeps a single gate raw
        "decoder_sparse_step": 1,
        "mlp_only_layers": dense_layers,
        "use_sliding_window": False,
        "sliding_window": None,
    }


def qwen2_moe(model, take) -> tuple[dict, dict]:
    cfg, t = model.cfg, {}
    embeddings(model, take, t)

    def zero_qkv_biases(p: str, i: int) -> None:  # Qwen2-MoE has q/k/v biases: zero, as ours have none
        for proj in ("q_proj", "k_proj", "v_proj"):
            w = t[f"{p}.self_attn.{proj}.weight"]
            t[f"{p}.self_attn.{proj}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)

    def shared_expert(p: str, i: int, b) -> None:
        # shared expert: output * sigmoid(gate x); gate 0 gives exactly 0.5, so the down projection
        # is doubled (both exact in floating point). Without shared experts: width 0, adds exactly 0.
        t[f"{p}.mlp.shared_expert_gate.weight"] = torch.zeros(1, cfg.n_embd, dtype=t[f"{p}.mlp.gate.weight"].dtype)
        if b.ffn.shared is not None:
            swiglu(take, f"blocks.{i}.ffn.shared", f"{p}.mlp.shared_expert", t, scale_down=2.0)
        else:
            empty_swiglu(f"{p}.mlp.shared_expert", t, cfg.n_embd, t[f"{p}.mlp.gate.weight"].dtype)

    dense_layers = _qwen_moe_blocks(model, take, t, zero_qkv_biases, shared_expert)
    config = {
        **_qwen_moe_config(model, "qwen2_moe", dense_layers),
        "shared_expert_intermediate_size": cfg.n_shared_experts * expert_width(model),
        "qkv_bias": True,
        "max_window_layers": cfg.n_layer,
    }
    return config, t


def qwen3_moe(model, take) -> tuple[dict, dict]:
    """Qwen3-MoE: Qwen2-MoE's layout without biases or a shared expert, plus q_norm and k_norm
    over each head (ours: attn.q_norm, attn.k_norm, applied before RoPE as Qwen3 does)."""
    t = {}
    embeddings(model, take, t)

    def qk_norms(p: str, i: int) -> None:
        t[f"{p}.self_attn.q_norm.weight"] = take(f"blocks.{i}.attn.q_norm.weight")
        t[f"{p}.self_attn.k_norm.weight"] = take(f"blocks.{i}.attn.k_norm.weight")

    dense_layers = _qwen_moe_blocks(model, take, t, qk_norms, lambda p, i, b: None)
    return {**_qwen_moe_config(model, "qwen3_moe", dense_layers), "attention_bias": False}, t
