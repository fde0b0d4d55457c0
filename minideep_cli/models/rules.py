"""What each arch accepts, without torch: config.py validates a model section with these (it
imports no torch), and bench asks them instead of testing the arch by name."""

from __future__ import annotations

from ..errors import UserError

ATTENTIONS = ("gqa", "mla", "latent")  # model.attention (moe arch); gpt2 is always multi-head


def fixed_attention(m) -> str | None:
    """The attention an arch always uses ('mha': gpt2's multi-head attention), or None where
    model.attention chooses it."""
    return "mha" if m.arch == "gpt2" else None


def attention_name(m) -> str:
    """The attention this model section gives: fixed by its arch, or model.attention."""
    return fixed_attention(m) or m.attention


def has_experts(m) -> bool:
    """Whether the arch has MoE feed-forwards at all (gpt2: never)."""
    return m.arch == "moe"


def check_attention(m) -> None:
    """model.attention and the head width, as the arch needs them (docs/design.md, The models)."""
    if m.arch == "moe" and m.attention != "mla" and (m.n_embd // m.n_head) % 2:  # mla: qk_rope_head_dim
        raise UserError("model.n_embd / model.n_head must be even for RoPE")
    if m.attention not in ATTENTIONS:
        raise UserError(f"model.attention must be one of {', '.join(ATTENTIONS)}, got '{m.attention}'")
    if m.arch == "gpt2" and m.attention != "gqa":
        raise UserError(f"model.attention={m.attention} is a moe-arch setting (gpt2 is always multi-head "
                        "attention); set it under the moe: section or use --arch moe")
