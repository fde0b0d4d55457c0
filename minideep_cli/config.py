"""Every configuration dataclass but the model's, YAML presets and dotted overrides.

Torch-free on purpose: `minideep --help` and config errors must not pay for importing torch.
The model section is the chosen arch's own dataclass (a ModelConfig subclass beside its model,
registered in models/arch.py); this module keeps precedence and coercion, and asks the arch's
spec which model settings exist and what rules they follow.

Precedence (docs/design.md, Definitions): defaults < preset YAML < --config FILE < -o section.key=value.
A YAML file holds the sections `model`, `data`, `train`, `sample`, and may hold per-arch
sections named after an arch (`gpt2:`, `moe:`; each with the same four sections) that apply
only to that arch.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from . import schema
from .errors import UserError
from .models import ModelConfig, arch_names, model_config, spec_for, spec_of
from .models.arch import check_limit, owners
from .models.arch import non_negative as _non_negative
from .models.arch import positive as _positive
from .models.arch import require as _require
from .schema import check_text

DEFAULT_ARCH = "moe"
SECTIONS = ("model", "data", "train", "sample")
OPTIMIZERS = ("adamw", "muon")  # train.optimizer
SCHEDULES = ("cosine", "wsd")  # train.schedule
DATA_ORDERS = ("shuffled", "sequential")  # data.order
DTYPES = ("auto", "float32", "bfloat16")  # train.dtype


@dataclass
class DataConfig:
    dir: str = ""  # token files from `minideep tokenize`; "" = the bundled corpus
    vocab_size: int = 2048  # BPE vocabulary when train tokenizes the bundled corpus itself
    val_fraction: float = 0.1  # the last 10% of the text
    # how training reads the train split: shuffled (epochs of shuffled windows over every shard) |
    # sequential (the shards in order as one stream, as minideep 0.1 read sharded data)
    order: str = "shuffled"


@dataclass
class TrainConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False
    # CPU threads: 0 = as many as the cores other work leaves free, looked at again while the run
    # runs (minideep_cli/threads.py); N = N threads throughout
    threads: int = 0
    seed: int = 1337
    batch_size: int = 16  # sequences per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 2000  # 0 = no step limit (then max_minutes must be set)
    max_minutes: float = 0.0  # time budget; 0 = none. The LR schedule follows it.
    optimizer: str = "adamw"  # adamw | muon (Muon on hidden matrices, AdamW on the rest)
    lr: float = 1e-3  # AdamW's learning rate
    muon_lr: float = 4e-3  # Muon's, for an update scaled like AdamW's (torch's adjust_lr_fn match_rms_adamw)
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5  # Newton-Schulz iterations per Muon update (torch's default 5; the cpu preset 3)
    schedule: str = "cosine"  # cosine | wsd (warmup, stable, then a linear decay over the last `cooldown`)
    cooldown: float = 0.3  # wsd: fraction of the run spent decaying
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    warmup: float = 0.02  # fraction of the run spent warming up
    weight_decay: float = 0.1
    # dropout (model.dropout, model.attention_dropout) acts only once the run has read the training
    # split this many times: text seen once needs no guard against memorising it. 0 = from the start
    dropout_after_epochs: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    grad_checkpointing: bool = False
    eval_interval: int = 250  # steps between validations
    eval_iters: int = 20  # batches per periodic validation
    log_interval: int = 10
    ckpt_interval: int = 0  # steps between checkpoints; 0 = at each validation
    sample_tokens: int = 200  # length of the sample printed at the end; 0 = none
    distributed: str = "ddp"  # under torchrun: ddp | fsdp (FSDP2 fully_shard); one process: unused


@dataclass
class SampleConfig:
    prompt: str = "\n"
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int = 1337
    num_samples: int = 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=lambda: model_config(DEFAULT_ARCH))  # the arch's settings
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """A config minideep saved (a checkpoint's, a run's config.yaml, an export's). minideep 0.1
        saved one flat model section with every arch's settings: the ones the saved arch lacks
        are left out here, as that arch never read them (0.1 refused moe settings changed for
        gpt2; gpt2's bias under moe it accepted and ignored). A key no arch has is still refused."""
        model = d.get("model")
        if not isinstance(model, dict):  # none (the defaults), or not a mapping (apply_sections says so)
            cfg = cls()
            apply_sections(cfg, d, "saved config")
            return cfg
        cfg = cls(model=model_config(str(model.get("arch", DEFAULT_ARCH))))
        keys = spec_of(cfg.model).keys()
        own = {k: v for k, v in model.items() if k in keys or not owners(str(k))}
        apply_sections(cfg, {**d, "model": own}, "saved config")
        return cfg


# ---------------------------------------------------------------- presets


def preset_dir() -> Path:
    """presets/ is the source; the wheel ships it as `minideep_cli.presets`, a namespace package
    (YAML files, no __init__.py), whose folders are its module search locations. (Its
    resources.files() is a MultiplexedPath, whose str() is no path.)"""
    try:
        spec = importlib.util.find_spec("minideep_cli.presets")
    except ModuleNotFoundError:
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if any(Path(folder).glob("*.yaml")):
            return Path(folder)
    return Path(__file__).resolve().parent.parent / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def read_yaml(path: Path, what: str) -> dict:
    """A preset or --config file: a bounded YAML mapping (schema.read_yaml)."""
    return schema.read_yaml(path, what)


def load_preset(name: str) -> dict:
    path = preset_dir() / f"{name}.yaml"
    if not path.is_file():
        names = list_presets()
        near = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise UserError(f"unknown preset '{name}'{hint}; available: {', '.join(names)}")
    return read_yaml(path, "preset")


# ---------------------------------------------------------------- coercion


def _field_types(obj) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def coerce(value: Any, typ: Any, key: str) -> Any:
    """Coerce a YAML or command-line value to a field's declared type. Integers never pass
    through a float (2**53 + 1 stays exact); strings are kept as given (spaces included)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            return None
        return coerce(value, args[0], key)
    if value is None:
        raise UserError(f"{key} cannot be null")
    wanted = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(typ)
    if wanted is None:
        raise UserError(f"{key}: unsupported type {typ}")
    if not isinstance(value, (str, int, float)):  # a list, a mapping, a date: never a setting's value
        raise UserError(f"{key} must be {wanted}, got {schema.kind(value)}")
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("true", "1", "yes", "on"):
                return True
            if s in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            s = value.strip().replace("_", "")
            if re.fullmatch(r"[+-]?\d+", s):
                return int(s)  # exact, however long (the range check comes in validate_numbers)
            f = float(s)  # 1e3
            if not f.is_integer():
                raise ValueError
            return int(f)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value.strip()) if isinstance(value, str) else float(value)
        return str(value)  # typ is str
    except (ValueError, OverflowError):
        raise UserError(f"{key} must be {wanted}, got {schema.kind(value)}")


def _unknown(key: str, valid: list[str], where: str) -> UserError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else f"; valid: {', '.join(valid)}"
    return UserError(f"unknown key '{key}' in {where}{hint}")


def set_value(cfg: Config, dotted: str, value: Any, where: str) -> None:
    section, _, key = dotted.partition(".")
    all_keys = [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(cfg, s))]
    if section not in SECTIONS or not key:
        raise _unknown(dotted, all_keys, where)
    obj = getattr(cfg, section)
    types_ = _field_types(obj)
    if key not in types_:
        if section == "model" and owners(key):
            raise other_arch_key(key, cfg.model.arch)
        raise _unknown(dotted, all_keys, where)
    setattr(obj, key, coerce(value, types_[key], dotted))


def other_arch_key(key: str, arch: str) -> UserError:
    """model.<key> given for an arch that does not have it: one line naming where it belongs."""
    there = owners(key)
    return UserError(f"model.{key} is a {'/'.join(there)}-arch setting (the {arch} arch does not have it); "
                     f"set it under the {there[0]}: section or use --arch {there[0]}")


def apply_sections(cfg: Config, d: dict, where: str, arch_sections: bool = False) -> None:
    """Apply {section: {key: value}} onto cfg; with arch_sections, also accept gpt2:/moe:."""
    for section, values in d.items():
        if arch_sections and section in arch_names():
            continue
        if section not in SECTIONS:
            valid = list(SECTIONS) + (list(arch_names()) if arch_sections else [])
            raise _unknown(str(section), valid, where)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UserError(f"section '{section}' in {where} must be a mapping")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value, where)


def apply_yaml(cfg: Config, d: dict, where: str, arch: str) -> None:
    apply_sections(cfg, d, where, arch_sections=True)
    per_arch = d.get(arch)
    if per_arch:
        if not isinstance(per_arch, dict):
            raise UserError(f"section '{arch}' in {where} must be a mapping")
        apply_sections(cfg, per_arch, f"{where} ({arch}:)")


def parse_override(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise UserError(f"override '{text}' must look like section.key=value")
    return key.strip(), value  # the value as given: a prompt keeps its spaces (coerce strips numbers)


def resolve_config(
    preset: Optional[str] = None,
    config_file: Optional[str] = None,
    overrides: tuple[str, ...] | list[str] = (),
    arch: Optional[str] = None,
) -> Config:
    """defaults < preset < config file < overrides; per-arch sections for the chosen arch."""
    layers: list[tuple[str, dict]] = []
    if preset is not None:
        layers.append((f"preset '{preset}'", load_preset(preset)))
    if config_file:
        layers.append((f"config {config_file}", read_yaml(Path(config_file), "config file")))
    pairs = [parse_override(o) for o in overrides]

    # The arch decides which per-arch sections apply, so find it first (same precedence).
    chosen = DEFAULT_ARCH
    for _, d in layers:
        m = d.get("model") or {}
        if isinstance(m, dict) and "arch" in m:
            chosen = str(m["arch"])
    for k, v in pairs:
        if k == "model.arch":
            chosen = v
    if arch:
        chosen = arch
    cfg = Config(model=model_config(chosen))  # the chosen arch's settings: another arch's keys are refused
    for where, d in layers:
        apply_yaml(cfg, d, where, chosen)
    for k, v in pairs:
        set_value(cfg, k, v, "overrides")
    cfg.model.arch = chosen
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every setting in range, for a run: the model, training and sampling sections."""
    validate_numbers(cfg)
    validate_model(cfg.model)
    t = cfg.train
    _require("train", t, ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval", "lr"),
             _positive, "must be positive")
    _require("train", t, ("weight_decay", "grad_clip", "ckpt_interval", "sample_tokens", "dropout_after_epochs"),
             _non_negative,
             "cannot be negative or infinite")
    _require("train", t, ("muon_lr", "muon_ns_steps"), _positive, "must be positive")
    _require("train", t, ("warmup", "beta1", "beta2", "muon_momentum"), lambda v: 0 <= v < 1,
             "must be at least 0 and below 1")
    _require("train", t, ("cooldown",), lambda v: 0 <= v <= 1, "must be between 0 and 1")
    cores = os.cpu_count() or 1
    if not 0 <= t.threads <= cores:
        raise UserError(f"train.threads must be from 0 (follow the free cores) to this machine's {cores:,} CPUs, "
                        f"got {t.threads:,}")
    if t.optimizer not in OPTIMIZERS:
        raise UserError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got '{t.optimizer}'")
    if cfg.data.order not in DATA_ORDERS:
        raise UserError(f"data.order must be one of {', '.join(DATA_ORDERS)}, got '{cfg.data.order}'")
    if t.schedule not in SCHEDULES:
        raise UserError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got '{t.schedule}'")
    if t.schedule == "wsd" and t.warmup + t.cooldown > 1:
        raise UserError(f"train.warmup + train.cooldown must be at most 1 for wsd, got {t.warmup + t.cooldown:g}")
    _require("train", t, ("min_lr_ratio",), lambda v: 0 <= v <= 1, "must be between 0 and 1")
    _require("train", t, ("max_steps", "max_minutes"), _non_negative, "cannot be negative")
    if t.max_steps == 0 and t.max_minutes == 0:
        raise UserError("set train.max_steps or train.max_minutes (both are 0)")
    if t.dtype not in DTYPES:
        raise UserError(f"train.dtype must be auto, float32 or bfloat16, got '{t.dtype}'")
    if not 0 < cfg.data.val_fraction < 1:
        raise UserError("data.val_fraction must be between 0 and 1")
    if cfg.data.vocab_size < 257:
        raise UserError("data.vocab_size must be at least 257 (256 bytes + <|endoftext|>)")
    check_limit(cfg.data.vocab_size, MAX_VOCAB, "data.vocab_size")
    check_limit(t.eval_iters, MAX_EVAL_ITERS, "train.eval_iters")
    check_limit(t.sample_tokens, MAX_NEW_TOKENS, "train.sample_tokens")
    validate_sample(cfg.sample)


# What one machine can do, as ceilings on sizes and counts (docs/design.md, Inputs): a setting
# beyond one is refused by name instead of running for years or growing until the OS kills it.
MAX_NEW_TOKENS = 1_000_000  # sample.max_new_tokens, train.sample_tokens: ~4 MB of text per sample
MAX_SAMPLES = 10_000  # sample.num_samples
MAX_EVAL_ITERS = 10_000  # train.eval_iters: batches per periodic validation (nanoGPT uses 200)
MAX_VOCAB = 1 << 22  # data.vocab_size, model.vocab_size, tokenize --vocab-size (GPT-4o's is ~200k)
MODEL_LIMITS = {  # the model settings every arch has (each arch limits its own: moe_arch.LIMITS): far
    # beyond any model a single machine trains, small enough to build on the meta device
    "n_layer": 1024, "n_head": 1024, "n_embd": 1 << 16, "block_size": 1 << 20, "vocab_size": MAX_VOCAB,
}


FLOAT_MAX = 3.4e38  # about float32's largest: a setting beyond it overflows in the tensors it scales
INT_MAX = 2**63 - 1  # torch's integers (and seeds) are 64-bit


def validate_numbers(cfg: Config) -> None:
    """Every number setting of every section (new ones too) finite and within 64-bit range:
    nan passes every comparison, so a nan budget or capacity would otherwise never stop a run."""
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            name, v = f.name, getattr(obj, f.name)
            if isinstance(v, float) and not -FLOAT_MAX <= v <= FLOAT_MAX:
                raise UserError(f"{section}.{name} must be a finite number (at most {FLOAT_MAX:g}), got {v}")
            if isinstance(v, int) and not isinstance(v, bool) and not -INT_MAX <= v <= INT_MAX:
                raise UserError(f"{section}.{name} is too large, got {v}")


def validate_sample(s: SampleConfig, label=lambda name: f"sample.{name}") -> None:
    """Sampling settings in range (temperature 0 = greedy, top_k 0 = off); label(name) names a
    setting in messages (the sample command's options: --top-k, ...)."""
    check_text(s.prompt, label("prompt"))
    _require(label, s, ("seed",), lambda v: -INT_MAX <= v <= INT_MAX, "is too large")
    _require(label, s, ("temperature", "top_k", "max_new_tokens"), _non_negative, "cannot be negative or infinite")
    _require(label, s, ("top_p",), lambda v: 0 < v <= 1, "must be above 0 and at most 1")
    _require(label, s, ("num_samples",), lambda v: v >= 1, "must be at least 1")
    check_limit(s.max_new_tokens, MAX_NEW_TOKENS, label("max_new_tokens"))
    check_limit(s.num_samples, MAX_SAMPLES, label("num_samples"))


def validate_model(m: ModelConfig) -> None:
    """The model section alone: what building a model needs (also checked when a checkpoint loads).
    The settings every arch has, then the arch's own rules (its spec's validate)."""
    spec = spec_for(m.arch)
    for key in ("dropout", "attention_dropout"):
        p = getattr(m, key)
        if p is not None and not 0 <= p < 1:
            raise UserError(f"model.{key} must be at least 0 and below 1, got {p}")
    _require("model", m, ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"), _positive, "must be positive")
    for name, limit in MODEL_LIMITS.items():
        check_limit(getattr(m, name), limit, f"model.{name}")
    if m.n_embd % m.n_head:
        raise UserError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    spec.validate(m)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
