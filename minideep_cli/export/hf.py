"""--format hf: which transformers class computes exactly this model's function, its weights
under that class's names (one file per family: gpt2.py, qwen.py, deepseek.py) and the tokenizer
files (docs at the top of export/__init__.py)."""

from __future__ import annotations

import json
from typing import Optional

from ..checkpoint import TOKENIZER
from ..errors import UserError
from ..models import has_experts
from ..tokenizer import EOT
from . import gpt2
from .deepseek import deepseek
from .layout import tied
from .qwen import mixtral, qwen2_moe, qwen3_moe


def json_text(d: dict) -> str:
    return json.dumps(d, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------- which class


def hf_target(model) -> str:
    """The transformers class that computes exactly this model's function, or a UserError that
    names every setting without a standard equivalent."""
    cfg = model.cfg
    if not has_experts(cfg):  # gpt2: GPT-2 as published
        return gpt2.TARGET
    problems, target = [], None
    biased = any(b.ffn.router.bias.abs().sum().item() != 0 for b in model.blocks if b.is_moe)
    renormalised = cfg.norm_topk and cfg.top_k >= 2
    if cfg.attention == "gqa":
        if cfg.router != "softmax":
            problems.append(f"the {cfg.router} router with gqa attention (DeepSeek-V3's sigmoid routing exists "
                            "only with mla attention)")
        elif biased:
            problems.append("a nonzero router selection bias (bias_update_rate) with a softmax router")
        everywhere = all(b.is_moe for b in model.blocks)
        if cfg.qk_norm:  # Qwen3-MoE normalises each head's queries and keys, as model.qk_norm does
            target = "Qwen3MoeForCausalLM"
            if cfg.n_shared_experts:
                problems.append("shared experts with model.qk_norm (Qwen3-MoE has none)")
        else:
            target = ("MixtralForCausalLM" if everywhere and cfg.n_shared_experts == 0 and renormalised
                      else "Qwen2MoeForCausalLM")
    elif cfg.attention == "mla":
        if [b.is_moe for b in model.blocks] != [i >= cfg.first_k_dense for i in range(cfg.n_layer)]:
            problems.append(f"dense blocks between sparse ones (model.moe_every={cfg.moe_every}) with mla attention "
                            "(DeepSeek classes have first_k_dense_replace only)")
        if cfg.router == "sigmoid":
            target = "DeepseekV3ForCausalLM"
            if cfg.n_experts < 2:
                problems.append("DeepSeek-V3 routing needs at least 2 experts")
        else:
            target = "DeepseekV2ForCausalLM"
            if biased:
                problems.append("a nonzero router selection bias (bias_update_rate) with a softmax router")
            if renormalised:
                problems.append("renormalised softmax gates (model.norm_topk with top_k >= 2) with mla attention "
                                "(DeepSeek-V2 never renormalises; DeepSeek-V3 routes with a sigmoid)")
    else:
        problems.append(f"{cfg.attention} attention")
    if cfg.activation != "swiglu":
        problems.append(f"the {cfg.activation} activation (model.activation)")
    if cfg.logit_softcap:
        problems.append(f"soft-capped logits (model.logit_softcap={cfg.logit_softcap:g})")
    if cfg.eval_capacity_factor is not None:
        problems.append(f"capacity dropping at inference (model.eval_capacity_factor={cfg.eval_capacity_factor:g}, "
                        f"drop_policy {cfg.drop_policy})")
    if problems:
        raise UserError("cannot export to --format hf, no transformers class computes the same function: "
                        + "; ".join(problems) + " (use --format safetensors for a minideep-only export)")
    return target


def hf_weights(model, eot_id: Optional[int] = None) -> tuple[str, dict, dict]:
    """(class name, config.json dict, tensors with HF names). Every minideep weight must be used."""
    target = hf_target(model)
    state = model.state_dict()
    conv = {gpt2.TARGET: gpt2.gpt2_weights, "MixtralForCausalLM": mixtral, "Qwen2MoeForCausalLM": qwen2_moe,
            "Qwen3MoeForCausalLM": qwen3_moe,
            "DeepseekV2ForCausalLM": deepseek, "DeepseekV3ForCausalLM": deepseek}[target]
    used: set[str] = set()

    def take(name: str):
        used.add(name)
        return state[name].detach()

    config, tensors = conv(model, take)
    # Weights the exported function does not read: the learned-noise scale (training only), the
    # router's selection bias (checked to be zero above), a tied output head (written once).
    unused = {n for n in state if n not in used and not n.endswith(("router.noise_weight", "router.bias"))}
    if tied(model):
        unused.discard("lm_head.weight")
    if unused:
        raise UserError(f"cannot export to --format hf: weights with no place in {target}: {', '.join(sorted(unused))}")
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    config.update(architectures=[target], dtype=str(next(iter(tensors.values())).dtype).removeprefix("torch."))
    config.update(bos_token_id=eot_id, eos_token_id=eot_id)
    return target, config, tensors


# ---------------------------------------------------------------- tokenizer


def hf_tokenizer_files(tokenizer_json: str, cfg) -> dict[str, str]:
    """Our byte-level BPE as a PreTrainedTokenizerFast: tokenizer.json as is, <|endoftext|> as
    bos/eos/unk, and split_special_tokens so a literal "<|endoftext|>" in a text stays text,
    exactly as minideep encodes it."""
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": cfg.model.block_size,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
    }
    return {TOKENIZER: tokenizer_json, "tokenizer_config.json": json_text(config),
            "special_tokens_map.json": json_text(special)}


def generation_config(hf_config: dict) -> dict:
    return {"bos_token_id": hf_config.get("bos_token_id"), "eos_token_id": hf_config.get("eos_token_id"),
            "pad_token_id": hf_config.get("eos_token_id")}
