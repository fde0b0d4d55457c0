"""The models (docs/design.md, Architectures and Model interface). Importing this package loads
no torch: it registers the archs (gpt2_arch.py, moe_arch.py, each torch-free) so config.py can
resolve and check settings, and a model class loads on first use (build_model, or the names
below, imported when read)."""

from __future__ import annotations

import importlib

from . import gpt2_arch, moe_arch  # noqa: F401  (registers gpt2 and moe, in that order)
from .arch import (ARCHES, ArchSpec, ModelConfig, arch_names, attention_name, has_experts, model_config, register,
                   spec_for, spec_of)

_WHERE = {"GPT2": "gpt2", "MoETransformer": "transformer", "Output": "output"}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)


def build_model(cfg: ModelConfig):
    """The nn.Module of cfg's arch, freshly initialised."""
    return spec_of(cfg).model_class()(cfg)


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


__all__ = ["ARCHES", "ArchSpec", "ModelConfig", "Output", "arch_names", "attention_name", "build_model",
           "has_experts", "model_config", "register", "set_dropout", "spec_for", "spec_of", "GPT2", "MoETransformer"]
