"""build_model(cfg) for every arch minideep trains, and set_dropout for any of them."""

from __future__ import annotations

from ..config import ModelConfig
from .gpt2 import GPT2
from .transformer import MoETransformer

MODELS = {"gpt2": GPT2, "moe": MoETransformer}


def build_model(cfg: ModelConfig):
    return MODELS[cfg.arch](cfg)


DROPOUT_RATES = ("dropout", "attn_dropout")  # a module's dropout rates: its float attributes of these names


def set_dropout(model, active: bool) -> None:
    """Dropout at the rates the model was built with (active), or none, while it trains
    (train.dropout_after_epochs). The built rates are kept on the model the first time."""
    if not hasattr(model, "built_dropout"):
        model.built_dropout = {(name, attr): getattr(m, attr) for name, m in model.named_modules()
                               for attr in DROPOUT_RATES if isinstance(getattr(m, attr, None), float)}
    modules = dict(model.named_modules())
    for (name, attr), rate in model.built_dropout.items():
        setattr(modules[name], attr, rate if active else 0.0)
