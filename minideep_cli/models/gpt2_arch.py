"""The gpt2 arch: its settings and its registration (the model is gpt2.py). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from .arch import ArchSpec, ModelConfig, register


@dataclass
class GPT2Config(ModelConfig):
    """GPT-2 as published: multi-head attention, learned positions, a GELU MLP of 4 * n_embd."""

    arch: str = "gpt2"
    bias: bool = True  # biases in Linear and LayerNorm (GPT-2 has them)


GPT2_SPEC = register(ArchSpec(
    name="gpt2",
    config=GPT2Config,
    model="minideep_cli.models.gpt2:GPT2",
    layer_prefix="transformer.h",  # Hugging Face's GPT2LMHeadModel names, so export is a rename
    attentions=("mha",),
    exports=("hf", "gguf"),
))
