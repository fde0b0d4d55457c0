"""build_model(cfg) for every arch minideep trains."""

from __future__ import annotations

from ..config import ModelConfig
from .gpt2 import GPT2
from .transformer import MoETransformer

MODELS = {"gpt2": GPT2, "moe": MoETransformer}


def build_model(cfg: ModelConfig):
    return MODELS[cfg.arch](cfg)
