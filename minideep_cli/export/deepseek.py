"""mla blocks -> DeepseekV2ForCausalLM (softmax router, raw gates) or DeepseekV3ForCausalLM
(sigmoid router and selection bias)."""

from __future__ import annotations

import torch

from .layout import dense_width, embeddings, empty_swiglu, expert_weights, expert_width, llama_like_config, swiglu


def _rope_pair_order(dr: int):
    """Our RoPE rotates the pairs (j, j + dr/2) of a vector; DeepSeek's checkpoints (read by
    transformers with rope_interleave) rotate (2j, 2j + 1) with the same frequency j. Taking the
    rows that produce the rotated part in this order, the same for queries and keys, turns one
    into the other and leaves every q.k unchanged: [0, dr/2, 1, dr/2 + 1, ...]."""
    return torch.stack([torch.arange(dr // 2), torch.arange(dr // 2) + dr // 2], dim=1).flatten()


def deepseek(model, take) -> tuple[dict, dict]:
    """mla blocks -> DeepSeek-V2 (softmax, raw gates) or DeepSeek-V3 (sigmoid + selection bias)."""
    cfg, t = model.cfg, {}
    v3 = cfg.router == "sigmoid"
    embeddings(model, take, t)
    dn, dr = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    eh = expert_width(model)
    order = _rope_pair_order(dr)
    for i, b in enumerate(model.blocks):
        p, a = f"model.layers.{i}", f"blocks.{i}.attn"
        t[f"{p}.input_layernorm.weight"] = take(f"blocks.{i}.attn_norm.weight")
        t[f"{p}.post_attention_layernorm.weight"] = take(f"blocks.{i}.ffn_norm.weight")
        wq = take(f"{a}.wq_b.weight" if cfg.q_lora_rank else f"{a}.wq.weight")
        wq = wq.view(cfg.n_head, dn + dr, -1)  # per head [nope; rope] rows
        wq = torch.cat([wq[:, :dn], wq[:, dn:][:, order]], 1).flatten(0, 1)
        if cfg.q_lora_rank:
            t[f"{p}.self_attn.q_a_proj.weight"] = take(f"{a}.wq_a.weight")
            t[f"{p}.self_attn.q_a_layernorm.weight"] = take(f"{a}.q_norm.weight")
            t[f"{p}.self_attn.q_b_proj.weight"] = wq
        else:
            t[f"{p}.self_attn.q_proj.weight"] = wq
        wkv_a = take(f"{a}.wkv_a.weight")  # [latent; shared RoPE key] rows
        rank = wkv_a.shape[0] - dr
        t[f"{p}.self_attn.kv_a_proj_with_mqa.weight"] = torch.cat([wkv_a[:rank], wkv_a[rank:][order]])
        t[f"{p}.self_attn.kv_a_layernorm.weight"] = take(f"{a}.kv_norm.weight")
        t[f"{p}.self_attn.kv_b_proj.weight"] = take(f"{a}.wkv_b.weight")  # per head [k_nope; v], as ours
        t[f"{p}.self_attn.o_proj.weight"] = take(f"{a}.wo.weight")
        if not b.is_moe:
            swiglu(take, f"blocks.{i}.ffn", f"{p}.mlp", t)
            continue
        t[f"{p}.mlp.gate.weight"] = take(f"blocks.{i}.ffn.router.weight")
        if v3:  # selection-only bias: chooses experts, never weighs them, as ours
            t[f"{p}.mlp.gate.e_score_correction_bias"] = take(f"blocks.{i}.ffn.router.bias").float()
        expert_weights(take, f"blocks.{i}.ffn.experts", f"{p}.mlp.experts", t, ("gate_proj", "up_proj", "down_proj"))
        if b.ffn.shared is not None:  # ungated, n_shared_experts * moe_intermediate_size wide, as ours
            swiglu(take, f"blocks.{i}.ffn.shared", f"{p}.mlp.shared_experts", t)
        else:  # DeepSeek always builds the shared MLP: width 0 adds exactly 0
            empty_swiglu(f"{p}.mlp.shared_experts", t, cfg.n_embd, t[f"{p}.mlp.gate.weight"].dtype)
    config = {
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        **llama_like_config(model),
        "num_key_value_heads": cfg.n_head,  # MLA: every head has its own (up-projected) K and V
        "head_dim": dr,
        "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": dn,
        "qk_rope_head_dim": dr,
        "v_head_dim": cfg.v_head_dim,
        "attention_bias": False,
        "mlp_bias": False,
        "intermediate_size": dense_width(model),
        "moe_intermediate_size": eh,
        "n_routed_experts": cfg.n_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.top_k,
        "first_k_dense_replace": cfg.first_k_dense,
        "moe_layer_freq": 1,
        "routed_scaling_factor": 1.0,
        "n_group": 1,
        "topk_group": 1,
    }
    if v3:
        config.update(norm_topk_prob=bool(cfg.norm_topk and cfg.top_k >= 2), scoring_func="sigmoid",
                      topk_method="noaux_tc", rope_interleave=True, num_nextn_predict_layers=0)
    else:  # transformers' DeepSeek-V2 never renormalises the k softmax gates (norm_topk refused above)
        config.update(norm_topk_prob=False, scoring_func="softmax", topk_method="greedy")
    return config, t
