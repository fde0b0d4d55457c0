"""The moe arch: its settings, their rules and its registration (the model is transformer.py,
its layers attention.py and moe.py). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import UserError
from .arch import ArchSpec, ModelConfig, check_limits, choice, non_negative, positive, register, require

ATTENTIONS = ("gqa", "mla", "latent")  # model.attention (docs/design.md, The models)
ACTIVATIONS = ("swiglu", "relu2")  # model.activation


@dataclass
class MoEConfig(ModelConfig):
    """The MoE transformer: pre-RMSNorm blocks of attention and a sparse (or dense) feed-forward."""

    arch: str = "moe"
    # blocks
    n_kv_head: int = 0  # 0 = n_head (plain multi-head attention)
    attention: str = "gqa"  # gqa | mla | latent (docs/design.md, The models)
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    ffn_hidden: int = 0  # hidden width of dense SwiGLU layers; 0 = 8/3 * n_embd rounded to 16
    # mla (attention: mla): caches kv_lora_rank + qk_rope_head_dim numbers per token per layer
    q_lora_rank: int = 0  # low-rank query (down, RMSNorm, up) of this rank; 0 = one plain projection
    kv_lora_rank: int = 64  # the per-token KV latent that is cached; K and V are up-projected from it
    qk_nope_head_dim: int = 32  # per-head query/key width without position (from the latent)
    qk_rope_head_dim: int = 16  # RoPE query/key width; the key part is one per token, shared by heads
    v_head_dim: int = 32  # per-head value width
    # latent (attention: latent): a fixed-size state, n_head * n_latents * (2 * head_dim + 2) fp32
    n_latents: int = 16  # slots per head, each a causal softmax summary of the keys and values so far
    # which layers are sparse
    n_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 0  # hidden width of one expert; 0 = ffn_hidden // top_k
    n_shared_experts: int = 0  # always-on experts of expert_hidden each
    first_k_dense: int = 0  # the first k blocks use a dense SwiGLU
    moe_every: int = 1  # after those, every n-th block is sparse (1 = all)
    # router
    router: str = "softmax"  # softmax | sigmoid (DeepSeek-V3 scores, selection-only bias)
    norm_topk: bool = False  # renormalise the k gates to sum to 1 (Mixtral); k >= 2 only
    router_noise: str = "none"  # none | jitter (Gaussian on logits) | noisy_topk (Shazeer 2017)
    router_noise_std: float = 1.0  # std of the jitter on the router logits
    # capacity
    capacity_factor: Optional[float] = 1.25  # null = dropless
    eval_capacity_factor: Optional[float] = None  # eval and generation; null = dropless
    drop_policy: str = "position"  # position (causal-safe) | gate (leaks the future; docs/design.md, The MoE layer)
    # balancing
    aux_loss_coef: float = 0.01  # Switch load-balancing loss
    z_loss_coef: float = 0.001  # router z-loss
    bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3); 0 = off
    # block options of the 2026 recipe (docs/design.md, "The recipe")
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before RoPE; gqa only (mla and latent keep their own norms)
    activation: str = "swiglu"  # swiglu | relu2 (relu(x)^2, no gate), for experts and dense feed-forwards
    logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap); 0 = off
    zero_init_out: bool = False  # output projections (attention wo, feed-forward w2) start at zero


LIMITS = {  # beside config.MODEL_LIMITS, the common ones (docs/design.md, Inputs)
    "n_kv_head": 1024, "ffn_hidden": 1 << 20, "expert_hidden": 1 << 20, "n_experts": 4096,
    "n_shared_experts": 4096, "first_k_dense": 1024, "moe_every": 1024, "q_lora_rank": 1 << 16,
    "kv_lora_rank": 1 << 16, "qk_nope_head_dim": 1 << 16, "qk_rope_head_dim": 1 << 16, "v_head_dim": 1 << 16,
    "n_latents": 1 << 16,
}


def validate(m: MoEConfig) -> None:
    """The moe arch's rules, after the common ones (config.validate_model)."""
    require("model", m, ("moe_every", "rope_theta"), positive, "must be positive")
    check_limits(m, LIMITS)
    require("model", m, ("n_kv_head", "ffn_hidden", "expert_hidden", "n_shared_experts", "first_k_dense",
                         "router_noise_std", "aux_loss_coef", "z_loss_coef", "bias_update_rate"),
            non_negative, "cannot be negative or infinite")
    kv = m.n_kv_head or m.n_head
    if m.n_head % kv:
        raise UserError(f"model.n_head ({m.n_head}) must be a multiple of model.n_kv_head ({kv})")
    _check_attention(m)
    choice(m, "activation", ACTIVATIONS)
    require("model", m, ("logit_softcap",), non_negative, "cannot be negative or infinite")
    _check_routing(m)


def _check_attention(m: MoEConfig) -> None:
    if m.attention != "mla" and (m.n_embd // m.n_head) % 2:  # mla: qk_rope_head_dim is the RoPE width
        raise UserError("model.n_embd / model.n_head must be even for RoPE")
    choice(m, "attention", ATTENTIONS)
    if m.attention == "mla":
        if m.kv_lora_rank <= 0 or m.v_head_dim <= 0 or m.qk_rope_head_dim <= 0:
            raise UserError("model.kv_lora_rank, model.v_head_dim and model.qk_rope_head_dim must be "
                            "positive for mla")
        if m.qk_rope_head_dim % 2:
            raise UserError(f"model.qk_rope_head_dim ({m.qk_rope_head_dim}) must be even for RoPE")
        if m.q_lora_rank < 0 or m.qk_nope_head_dim < 0:
            raise UserError("model.q_lora_rank and model.qk_nope_head_dim cannot be negative")
    if m.attention == "latent" and m.n_latents <= 0:
        raise UserError("model.n_latents must be positive for latent attention")


def _check_routing(m: MoEConfig) -> None:
    if m.router not in ("softmax", "sigmoid"):
        raise UserError(f"model.router must be softmax or sigmoid, got '{m.router}'")
    if m.router_noise not in ("none", "jitter", "noisy_topk"):
        raise UserError(f"model.router_noise must be none, jitter or noisy_topk, got '{m.router_noise}'")
    if m.drop_policy not in ("position", "gate"):
        raise UserError(f"model.drop_policy must be position or gate, got '{m.drop_policy}'")
    if not 1 <= m.top_k <= m.n_experts:
        raise UserError(f"model.top_k ({m.top_k}) must be between 1 and model.n_experts ({m.n_experts})")
    for name in ("capacity_factor", "eval_capacity_factor"):
        v = getattr(m, name)
        if v is not None and v <= 0:
            raise UserError(f"model.{name} must be positive or null (dropless)")


MOE_SPEC = register(ArchSpec(
    name="moe",
    config=MoEConfig,
    model="minideep_cli.models.transformer:MoETransformer",
    layer_prefix="blocks",
    attentions=ATTENTIONS,
    has_experts=True,
    exports=("hf", "gguf"),
    validate=validate,
))
