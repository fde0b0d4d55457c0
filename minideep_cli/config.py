"""Every configuration dataclass, YAML presets and dotted overrides.

Torch-free on purpose: `minideep --help` and config errors must not pay for importing torch.

Precedence (docs/design.md, Definitions): defaults < preset YAML < --config FILE < -o section.key=value.
A YAML file holds the sections `model`, `data`, `train`, `sample`, and may hold per-arch
sections `gpt2:` / `moe:` (each with the same four sections) that apply only to that arch.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
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
from .models.rules import check_attention
from .schema import check_text

ARCHES = ("gpt2", "moe")
GPT2_KEYS = ("arch", "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "attention_dropout",
             "bias")  # the model settings gpt2 reads; every other model.* key is a moe-arch setting
SECTIONS = ("model", "data", "train", "sample")
ACTIVATIONS = ("swiglu", "relu2")  # model.activation (moe arch)
OPTIMIZERS = ("adamw", "muon")  # train.optimizer
SCHEDULES = ("cosine", "wsd")  # train.schedule
DATA_ORDERS = ("shuffled", "sequential")  # data.order
DTYPES = ("auto", "float32", "bfloat16")  # train.dtype


@dataclass
class ModelConfig:
    arch: str = "moe"  # gpt2 | moe
    vocab_size: int = 2048  # taken from the tokenizer at train time
    block_size: int = 256  # context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0  # on the embeddings and residual branches (and attention weights, see below)
    attention_dropout: Optional[float] = None  # on the attention weights; null = dropout
    # gpt2
    bias: bool = True  # biases in Linear and LayerNorm (GPT-2 has them)
    # moe transformer
    n_kv_head: int = 0  # 0 = n_head (plain multi-head attention)
    attention: str = "gqa"  # gqa | mla | latent (docs/design.md, The models); moe arch only, gpt2 is always MHA
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
    # moe: which layers are sparse
    n_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 0  # hidden width of one expert; 0 = ffn_hidden // top_k
    n_shared_experts: int = 0  # always-on experts of expert_hidden each
    first_k_dense: int = 0  # the first k blocks use a dense SwiGLU
    moe_every: int = 1  # after those, every n-th block is sparse (1 = all)
    # moe: router
    router: str = "softmax"  # softmax | sigmoid (DeepSeek-V3 scores, selection-only bias)
    norm_topk: bool = False  # renormalise the k gates to sum to 1 (Mixtral); k >= 2 only
    router_noise: str = "none"  # none | jitter (Gaussian on logits) | noisy_topk (Shazeer 2017)
    router_noise_std: float = 1.0  # std of the jitter on the router logits
    # moe: capacity
    capacity_factor: Optional[float] = 1.25  # null = dropless
    eval_capacity_factor: Optional[float] = None  # eval and generation; null = dropless
    drop_policy: str = "position"  # position (causal-safe) | gate (leaks the future; docs/design.md, The MoE layer)
    # moe: balancing
    aux_loss_coef: float = 0.01  # Switch load-balancing loss
    z_loss_coef: float = 0.001  # router z-loss
    bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3); 0 = off
    # moe transformer: block options of the 2026 recipe (docs/design.md, "The recipe")
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before RoPE; gqa only (mla and latent keep their own norms)
    activation: str = "swiglu"  # swiglu | relu2 (relu(x)^2, no gate), for experts and dense feed-forwards
    logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap); 0 = off
    zero_init_out: bool = False  # output projections (attention wo, feed-forward w2) start at zero


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
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        cfg = cls()
        apply_sections(cfg, d, "saved config")
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
        raise _unknown(dotted, all_keys, where)
    setattr(obj, key, coerce(value, types_[key], dotted))


def apply_sections(cfg: Config, d: dict, where: str, arch_sections: bool = False) -> None:
    """Apply {section: {key: value}} onto cfg; with arch_sections, also accept gpt2:/moe:."""
    for section, values in d.items():
        if arch_sections and section in ARCHES:
            continue
        if section not in SECTIONS:
            valid = list(SECTIONS) + (list(ARCHES) if arch_sections else [])
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
    chosen = ModelConfig().arch
    for _, d in layers:
        m = d.get("model") or {}
        if isinstance(m, dict) and "arch" in m:
            chosen = str(m["arch"])
    for k, v in pairs:
        if k == "model.arch":
            chosen = v
    if arch:
        chosen = arch
    if chosen not in ARCHES:
        raise UserError(f"unknown arch '{chosen}'; choose one of: {', '.join(ARCHES)}")

    cfg = Config()
    for where, d in layers:
        apply_yaml(cfg, d, where, chosen)
    for k, v in pairs:
        set_value(cfg, k, v, "overrides")
    cfg.model.arch = chosen
    validate(cfg)
    if chosen == "gpt2":
        check_gpt2_keys(cfg.model)
    return cfg


def moe_only_keys() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in GPT2_KEYS)


def check_gpt2_keys(m: ModelConfig) -> None:
    """A moe-arch setting changed for a gpt2 run would be silently ignored: refuse it, by name."""
    default = ModelConfig()
    for key in moe_only_keys():
        if getattr(m, key) != getattr(default, key):
            raise UserError(f"model.{key}={getattr(m, key)} is a moe-arch setting (gpt2 does not use it); "
                            "set it under the moe: section or use --arch moe")


def attention_dropout(m: ModelConfig) -> float:
    """Dropout on the attention weights: model.attention_dropout, or model.dropout when unset."""
    return m.dropout if m.attention_dropout is None else m.attention_dropout


def _require(section, obj, names: tuple[str, ...], ok, what: str) -> None:
    """Each of obj's `names` passes ok, or a UserError naming it: section.name, or section(name)."""
    for name in names:
        if not ok(getattr(obj, name)):
            label = section(name) if callable(section) else f"{section}.{name}"
            raise UserError(f"{label} {what}, got {getattr(obj, name)}")


def _positive(v) -> bool:
    return 0 < v < math.inf


def _non_negative(v) -> bool:
    return 0 <= v < math.inf


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
MODEL_LIMITS = {  # model.*: far beyond any model a single machine trains, small enough to build on meta
    "n_layer": 1024, "n_head": 1024, "n_kv_head": 1024, "n_embd": 1 << 16, "block_size": 1 << 20,
    "vocab_size": MAX_VOCAB, "ffn_hidden": 1 << 20, "expert_hidden": 1 << 20, "n_experts": 4096,
    "n_shared_experts": 4096, "first_k_dense": 1024, "moe_every": 1024, "q_lora_rank": 1 << 16,
    "kv_lora_rank": 1 << 16, "qk_nope_head_dim": 1 << 16, "qk_rope_head_dim": 1 << 16, "v_head_dim": 1 << 16,
    "n_latents": 1 << 16,
}


def check_limit(value: int, limit: int, label: str) -> None:
    if value > limit:
        raise UserError(f"{label} is {value:,}, more than the {limit:,} minideep allows")


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
    """The model section alone: what building a model needs (also checked when a checkpoint loads)."""
    if m.arch not in ARCHES:
        raise UserError(f"unknown arch '{m.arch}'; choose one of: {', '.join(ARCHES)}")
    for key in ("dropout", "attention_dropout"):
        p = getattr(m, key)
        if p is not None and not 0 <= p < 1:
            raise UserError(f"model.{key} must be at least 0 and below 1, got {p}")
    _require("model", m, ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "moe_every", "rope_theta"),
             _positive, "must be positive")
    for name, limit in MODEL_LIMITS.items():
        check_limit(getattr(m, name), limit, f"model.{name}")
    _require("model", m, ("n_kv_head", "ffn_hidden", "expert_hidden", "n_shared_experts", "first_k_dense",
                          "router_noise_std", "aux_loss_coef", "z_loss_coef", "bias_update_rate"),
             _non_negative, "cannot be negative or infinite")
    if m.n_embd % m.n_head:
        raise UserError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    kv = m.n_kv_head or m.n_head
    if m.n_head % kv:
        raise UserError(f"model.n_head ({m.n_head}) must be a multiple of model.n_kv_head ({kv})")
    check_attention(m)  # what the arch needs of model.attention and the head width
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
    if m.activation not in ACTIVATIONS:
        raise UserError(f"model.activation must be one of {', '.join(ACTIVATIONS)}, got '{m.activation}'")
    _require("model", m, ("logit_softcap",), _non_negative, "cannot be negative or infinite")
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


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
