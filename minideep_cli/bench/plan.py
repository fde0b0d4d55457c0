"""bench's options turned into what bench.run_bench takes: the config of the preset, the --vs
variants, the sections and their options, and the configs of both arches for the peers section.
Every mistake is found here, before anything is measured."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import DEFAULT_SECTIONS, BenchOptions, bench_config, parse_bytes
from ..config import Config, resolve_config
from ..device import default_preset
from ..errors import UserError
from ..models import arch_names, spec_for


@dataclass
class BenchPlan:
    cfg: Config
    opts: BenchOptions
    preset: Optional[str]  # the preset's name, as the results record it
    variants: dict[str, Config]  # --vs: the overrides as given -> their config
    peers: Optional[dict[str, Config]]  # the peers section: each registered arch's config


def bench_plan(preset: Optional[str] = None, config: Optional[Path] = None, arch: Optional[str] = None,
               overrides: Optional[list[str]] = None, sections: Optional[list[str]] = None, quick: bool = False,
               estimate_memory: bool = False, device_memory: Optional[str] = None, compare_hf: bool = False,
               vs: Optional[list[str]] = None) -> BenchPlan:
    overrides, vs = list(overrides or []), list(vs or [])
    if estimate_memory and ((sections and set(sections) != {"memory"}) or vs or compare_hf):
        raise UserError("--estimate-memory predicts memory alone: drop it, or drop -s, --vs and --compare-hf")
    name = default_preset(preset, config)

    def resolve(extra: list[str], a: Optional[str]) -> Config:
        return bench_config(resolve_config(name, str(config) if config else None, extra, a))

    cfg = resolve(overrides, arch)
    if any(not v.split() for v in vs):
        raise UserError("--vs needs one or more section.key=value overrides, e.g. --vs model.dropout=0")
    variants = {v: resolve(overrides + v.split(), arch) for v in vs}
    chosen = tuple(sections or (("memory",) if estimate_memory else DEFAULT_SECTIONS))
    if compare_hf and "peers" not in chosen:
        chosen += ("peers",)
    if "peers" in chosen and importlib.util.find_spec("transformers") is None:  # before the other sections run
        raise UserError("--compare-hf needs Hugging Face transformers: pip install transformers")
    if variants and "train" not in chosen:
        chosen = ("train",) + chosen
    opts = BenchOptions.for_run(quick, chosen, device_memory=parse_bytes(device_memory) if device_memory else None,
                                measure_memory=not estimate_memory)
    peers = None
    if "peers" in chosen:  # every arch transformers has a class of (gpt2: GPT2LMHeadModel, moe: MixtralForCausalLM)
        peers = {a: resolve(overrides_for(a, overrides), a) for a in arch_names() if "hf" in spec_for(a).exports}
    return BenchPlan(cfg, opts, name, variants, peers)


def overrides_for(arch: str, overrides: list[str]) -> list[str]:
    """The overrides (given for the chosen arch) that `arch` takes: its own model settings, and
    every other section's."""
    keys = spec_for(arch).keys()
    return [o for o in overrides if not (o.startswith("model.") and o.partition("=")[0].strip()[6:] not in keys)]
