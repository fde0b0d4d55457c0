"""What an architecture is, in one place (docs/design.md, Architectures). Torch-free: config.py
reads it to resolve and check settings, and `minideep --help` must not pay for importing torch.

Each arch is one ArchSpec, registered once with `register` when its module is imported: the
models package imports gpt2_arch.py and moe_arch.py, so both are in ARCHES as soon as anything
reads the configuration. A third arch is one module that defines its settings (a ModelConfig
subclass), its nn.Module and its spec, and calls `register(spec)` (tests/test_third_arch.py does
this without touching minideep_cli/). ARCHES is the only module-level state that changes after
import, and only by `register`.

The rest of minideep asks the spec of a model section (`spec_of(m)`), never the arch's name:
what settings it takes (`keys`), their extra rules (`validate`), what it has (`attentions`,
`has_experts`), its checkpoint weight names (`layer_prefix`), which export formats map it
(`exports`), and its model class (`model_class`, imported on first use). The model names its own
optimizer groups (`param_roles()`, docs/design.md, Model interface).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import UserError


@dataclass
class ModelConfig:
    """The settings every arch has; an arch's settings subclass this, beside its model."""

    arch: str = ""  # the registered arch these settings are for (each subclass sets its name)
    vocab_size: int = 2048  # taken from the tokenizer at train time
    block_size: int = 256  # context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0  # on the embeddings and residual branches (and attention weights, see below)
    attention_dropout: Optional[float] = None  # on the attention weights; null = dropout


def _no_rules(m: ModelConfig) -> None:
    """An arch with no rules beyond the common ones (config.validate_model)."""


@dataclass(frozen=True)
class ArchSpec:
    name: str  # model.arch, --arch, and the per-arch section of a YAML file (`gpt2:`, `moe:`)
    config: type  # its settings: a ModelConfig subclass, every field documented once
    model: str  # "package.module:Class" of its nn.Module, imported on first use (model_class)
    layer_prefix: str  # layer i's weights are named f"{layer_prefix}.{i}.*" in its state dict
    attentions: tuple[str, ...]  # the attentions it offers, the default first; one = fixed
    has_experts: bool = False  # whether it has MoE feed-forwards (routing, inspect-routing, bench -s moe)
    exports: tuple[str, ...] = ()  # `export --format` values that map it, beyond safetensors (every arch)
    validate: Callable[[ModelConfig], None] = _no_rules  # its rules beyond the common ones; UserError

    def keys(self) -> tuple[str, ...]:
        """The model.* settings it takes, in its config's order."""
        return tuple(f.name for f in dataclasses.fields(self.config))

    def model_class(self) -> type:
        module, _, name = self.model.partition(":")
        return getattr(importlib.import_module(module), name)


ARCHES: dict[str, ArchSpec] = {}  # name -> spec, filled by register() as arch modules are imported


def register(spec: ArchSpec) -> ArchSpec:
    """Add an arch (once per name; registering the same spec again is a no-op)."""
    if not issubclass(spec.config, ModelConfig):
        raise TypeError(f"arch {spec.name}: its config must subclass ModelConfig")
    if ARCHES.get(spec.name, spec) is not spec:
        raise ValueError(f"arch '{spec.name}' is registered already")
    ARCHES[spec.name] = spec
    return spec


def arch_names() -> tuple[str, ...]:
    return tuple(ARCHES)


def spec_for(name: str) -> ArchSpec:
    if name not in ARCHES:
        raise UserError(f"unknown arch '{name}'; choose one of: {', '.join(ARCHES)}")
    return ARCHES[name]


def spec_of(m: ModelConfig) -> ArchSpec:
    return spec_for(m.arch)


def model_config(arch: str, **values) -> ModelConfig:
    """The arch's settings at their defaults, with `values` set."""
    return spec_for(arch).config(**{**values, "arch": arch})


def owners(key: str) -> list[str]:
    """The archs that have model.<key>."""
    return [name for name, spec in ARCHES.items() if key in spec.keys()]


def attention_name(m: ModelConfig) -> str:
    """The attention this model section gives: model.attention where the arch offers a choice,
    else the one its arch always uses ('mha': gpt2's multi-head attention)."""
    return getattr(m, "attention", None) or spec_of(m).attentions[0]


def has_experts(m: ModelConfig) -> bool:
    return spec_of(m).has_experts


def attention_dropout(m: ModelConfig) -> float:
    """Dropout on the attention weights: model.attention_dropout, or model.dropout when unset."""
    return m.dropout if m.attention_dropout is None else m.attention_dropout


# ---------------------------------------------------------------- checks the arch rules share


def require(section, obj, names: tuple[str, ...], ok, what: str) -> None:
    """Each of obj's `names` passes ok, or a UserError naming it: section.name, or section(name)."""
    for name in names:
        if not ok(getattr(obj, name)):
            label = section(name) if callable(section) else f"{section}.{name}"
            raise UserError(f"{label} {what}, got {getattr(obj, name)}")


def positive(v) -> bool:
    return 0 < v < math.inf


def non_negative(v) -> bool:
    return 0 <= v < math.inf


def check_limit(value: int, limit: int, label: str) -> None:
    if value > limit:
        raise UserError(f"{label} is {value:,}, more than the {limit:,} minideep allows")


def check_limits(m: ModelConfig, limits: dict[str, int]) -> None:
    """Ceilings on sizes (docs/design.md, Inputs): far beyond any model one machine trains, small
    enough that a model of them can be built on the meta device to check a checkpoint."""
    for name, limit in limits.items():
        check_limit(getattr(m, name), limit, f"model.{name}")


def choice(m: ModelConfig, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(m, name) not in allowed:
        raise UserError(f"model.{name} must be one of {', '.join(allowed)}, got '{getattr(m, name)}'")
