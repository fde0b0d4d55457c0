"""The models (docs/design.md, Model interface): build_model(cfg) returns a GPT2 or an
MoETransformer. Importing this package loads no torch: config.py reads the per-arch rules
(rules.py) and must stay torch-free, so the models themselves load on first use."""

from __future__ import annotations

import importlib

_WHERE = {"build_model": "registry", "MODELS": "registry", "set_dropout": "registry", "GPT2": "gpt2", "MoETransformer": "transformer",
          "Output": "output"}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)


__all__ = ["MODELS", "Output", "build_model", "set_dropout", "GPT2", "MoETransformer"]
