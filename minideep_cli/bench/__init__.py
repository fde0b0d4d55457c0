"""`minideep bench`: speed, memory and cache sizes, measured on this machine (docs/design.md, Tests and measurements).

Every timed figure is the median of several repetitions after warm-up; comparisons (MoE against
dense, minideep against transformers, cached against recomputed decoding) are ratios of timings
taken in the same process with the repetitions interleaved, so a change in machine load hits both
sides alike. The engine returns plain data (the JSON `minideep bench --json` writes); cli.py
renders it. Sections, one file each (peak.py: the device's peak FLOPs; timing.py: the options and
median_times they share; plan.py: the command's options turned into a checked plan; this file:
run_bench, which runs them):

  train      tokens/s, step time, model FLOPs per token, MFU against the device's peak
  busy       the training step alone and beside a busy process bench starts itself (CPU)
  products   the step's matrix products and attention kernels timed alone: the highest share of
             the matmul rate the step could reach with everything else free
  moe        one MoE layer forward+backward against a dense SwiGLU of the same active
             parameters and against the plain loop over experts
  decode     generation tokens/s with and without the KV cache at several context lengths;
             cache bytes per token and per sequence for every attention variant
  memory     predicted peak training memory (traced, nothing allocated) and, when asked, the
             measured peak of a small model (CPU: peak RSS in a subprocess; CUDA: max allocated)
  tokenizer  BPE training time and encode throughput on the bundled corpus
  peers      (--compare-hf) the same models trained and decoded by Hugging Face transformers
"""

from __future__ import annotations

import platform
import time
from typing import Optional

import torch

from .. import __version__
from ..config import Config
from ..errors import UserError
from ..schema import json_text
from ..models import attention_name
from ..device import keep_cpu_memory, pick_device, pick_dtype
from .busy import bench_busy
from .decode import bench_decode, cache_rows
from .memory import bench_memory, estimate_memory, measure_cuda_peak, parse_bytes, traced_activations
from .moe import bench_moe
from .peak import cpu_peak, gpu_peak
from .peers import bench_peers
from .products import bench_products
from .timing import DEFAULT_SECTIONS, SECTIONS, BenchOptions, Event, median_times
from .tokenizer import bench_tokenizer
from .train import bench_config, bench_train, train_step_fn

SCHEMA_VERSION = 1


def run_bench(cfg: Config, opts: BenchOptions, preset: Optional[str] = None, peer_cfgs: Optional[dict] = None,
              on_event: Optional[Event] = None, variants: Optional[dict[str, Config]] = None) -> dict:
    """Run the chosen sections; returns the JSON-ready result (every section key present, None when
    not run). variants: configs whose training steps the train section times alongside cfg's."""
    say = on_event or (lambda text: None)
    unknown = [s for s in opts.sections if s not in SECTIONS]
    if unknown:
        raise UserError(f"unknown bench section '{unknown[0]}'; choose from: {', '.join(SECTIONS)}")
    needs_device = [s for s in opts.sections if s not in ("memory", "tokenizer")] or (
        ["memory"] if "memory" in opts.sections and opts.measure_memory else [])
    device = dtype = None
    try:
        device = pick_device(cfg.train.device)
    except UserError as e:
        if needs_device:
            raise UserError(f"{e}; bench sections {', '.join(needs_device)} need it "
                            "(use -o train.device=cpu, or --estimate-memory for the memory prediction alone)")
    if device is not None:
        dtype = pick_dtype(cfg.train.dtype, device)
    if any(c.train.device != cfg.train.device for c in (variants or {}).values()):
        raise UserError("--vs compares steps on one device: set train.device for all of them, not in --vs")
    result: dict = {
        "schema_version": SCHEMA_VERSION, "minideep": __version__, "torch": torch.__version__,
        "python": platform.python_version(), "preset": preset, "arch": cfg.model.arch,
        "attention": attention_name(cfg.model), "quick": opts.quick,
        "device": device, "threads": torch.get_num_threads(), "sections": list(opts.sections),
        **{s: None for s in SECTIONS},
    }
    if device == "cpu":
        keep_cpu_memory()  # as `minideep train` does, for every section (and the rest of this process)
    start = time.perf_counter()
    for section in SECTIONS:
        if section not in opts.sections:
            continue
        say(f"{section} ... ({time.perf_counter() - start:.0f} s)")
        if section == "train":
            result["train"] = bench_train(cfg, opts, device, dtype, variants)
        elif section == "busy":
            result["busy"] = bench_busy(cfg, opts, device, dtype) if device == "cpu" else None
        elif section == "products":
            result["products"] = bench_products(cfg, opts, device, dtype)
        elif section == "moe":
            result["moe"] = bench_moe(cfg, opts, device, dtype)
        elif section == "decode":
            result["decode"] = bench_decode(cfg, opts, device, dtype)
        elif section == "memory":
            result["memory"] = bench_memory(cfg, opts, device, dtype)
        elif section == "tokenizer":
            result["tokenizer"] = bench_tokenizer(cfg, opts)
        elif section == "peers":
            result["peers"] = bench_peers(peer_cfgs or {cfg.model.arch: cfg}, opts, device, dtype)
    result["elapsed_sec"] = time.perf_counter() - start
    return result


def json_safe(result: dict) -> str:
    """The results as strict JSON: a figure that is not finite is null (schema.json_text)."""
    return json_text(result, indent=2, default=float) + "\n"


__all__ = ["DEFAULT_SECTIONS", "SCHEMA_VERSION", "SECTIONS", "BenchOptions", "bench_config", "bench_memory",
           "bench_peers", "cache_rows", "cpu_peak", "estimate_memory", "gpu_peak", "json_safe", "measure_cuda_peak",
           "median_times", "parse_bytes", "run_bench", "train_step_fn", "traced_activations"]
