"""gpt2 -> GPT2LMHeadModel: the same names, Linear weights transposed into HF's Conv1D."""

from __future__ import annotations

import torch

TARGET = "GPT2LMHeadModel"


def gpt2_weights(model, take) -> tuple[dict, dict]:
    cfg = model.cfg
    t = {
        "transformer.wte.weight": take("transformer.wte.weight"),
        "transformer.wpe.weight": take("transformer.wpe.weight"),
    }

    def ln(src: str, dst: str):
        mod = model.get_submodule(src)
        t[f"{dst}.weight"] = take(f"{src}.weight")
        # LayerNorm without bias (model.bias false) equals one with a zero bias
        t[f"{dst}.bias"] = take(f"{src}.bias") if mod.bias is not None else torch.zeros_like(mod.weight).detach()

    def conv1d(src: str, dst: str):  # HF Conv1D: y = x @ W + b with W (in, out): our Linear transposed
        mod = model.get_submodule(src)
        t[f"{dst}.weight"] = take(f"{src}.weight").t()
        t[f"{dst}.bias"] = take(f"{src}.bias") if mod.bias is not None else torch.zeros(mod.out_features)

    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        ln(f"{p}.ln_1", f"{p}.ln_1")
        conv1d(f"{p}.attn.c_attn", f"{p}.attn.c_attn")
        conv1d(f"{p}.attn.c_proj", f"{p}.attn.c_proj")
        ln(f"{p}.ln_2", f"{p}.ln_2")
        conv1d(f"{p}.mlp.c_fc", f"{p}.mlp.c_fc")
        conv1d(f"{p}.mlp.c_proj", f"{p}.mlp.c_proj")
    ln("transformer.ln_f", "transformer.ln_f")
    eps = model.transformer.ln_f.eps
    config = {
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",  # the tanh approximation, as ours
        "layer_norm_epsilon": eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
    }
    return config, t
